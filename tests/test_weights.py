"""``--weights FILE|random|pretrained`` (cilearn.models.weights): a bad file is one line and exit 2
before anything is written or run (a pickle that would run code included); a good one is what phase
0 starts from, its digest is in config.yaml and metrics.json, and resume and replay give the run's
matrices."""
import builtins
import hashlib
import json
import pickle
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cilearn.cli import main
from cilearn.models import part
from cilearn.models.weights import WeightsError, check_fit, read_weights
from conftest import replayed_and_resumed

# a small digits run of the convnet (4 + 3 + 3 classes)
RUN = ["run", "--method", "finetune", "--backbone", "convnet", "--base", "4", "--increment", "3",
       "--train-per-class", "20", "--precision", "fp32", "--no-progress", "--quiet"]


def convnet_state(seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in part("backbone", "convnet").create(1).state_dict().items()}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(tmp_path, capsys, weights, *flags) -> str:
    """The one-line error of a run given ``weights``; nothing written."""
    out = tmp_path / "r"
    code = main([*RUN, "--weights", str(weights), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


class Marker:
    """Unpickling this creates the file ``path`` (what a malicious checkpoint would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _missing(sd):
    sd.pop("stages.1.1.running_var")


def _extra(sd):
    sd["stages.9.weight"] = torch.zeros(3)


def _shape(sd):
    sd["stages.0.0.weight"] = torch.zeros(32, 3, 3, 3)


@pytest.mark.parametrize("change,key,says", [
    (_missing, "stages.1.1.running_var", "is missing from the file"),
    (_extra, "stages.9.weight", "is not a tensor of the backbone convnet (an extra key"),
    (_shape, "stages.0.0.weight", "has shape [32, 3, 3, 3] in the file, the backbone convnet has [32, 1, 3, 3]"),
])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_file_that_does_not_fit_names_the_first_offending_key(change, key, says, fmt, tmp_path, capsys):
    sd = convnet_state()
    change(sd)
    f = tmp_path / f"w.{fmt}"
    save_file(sd, f) if fmt == "safetensors" else torch.save(sd, f)
    err = refused(tmp_path, capsys, f)
    assert str(f) in err and f"'{key}'" in err and says in err, err


def test_a_damaged_or_foreign_file_is_one_line(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    save_file(convnet_state(), good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "is not a safetensors file" in refused(tmp_path, capsys, cut)
    torch.save(convnet_state(), tmp_path / "good.pt")
    cut_pt = tmp_path / "cut.pt"
    cut_pt.write_bytes((tmp_path / "good.pt").read_bytes()[:3000])
    assert "cannot be read as a PyTorch state dict" in refused(tmp_path, capsys, cut_pt)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listing)
    assert "is not a state dict: it holds a list" in refused(tmp_path, capsys, listing)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model": convnet_state()}, ckpt)
    assert "key 'epoch' holds an int, not a tensor" in refused(tmp_path, capsys, ckpt)
    text = tmp_path / "notes.txt"
    text.write_text("not weights at all\n")
    assert str(text) in refused(tmp_path, capsys, text)
    assert "cannot read it" in refused(tmp_path, capsys, tmp_path / "absent.safetensors")


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(how, tmp_path, capsys):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({**convnet_state(), "x": Marker(marker)}, f)
    else:
        f.write_bytes(pickle.dumps({"x": Marker(marker)}, protocol=2))
    err = refused(tmp_path, capsys, f)
    assert "nothing in it was run: its pickle calls" in err and "open" in err and str(f) in err, err
    assert not marker.exists()


def test_random_and_pretrained_of_a_backbone_without_its_own(tmp_path, capsys):
    err = refused(tmp_path, capsys, "pretrained")
    assert "the backbone convnet has no pre-trained weights of its own" in err
    out = tmp_path / "r"
    code = main([*RUN, "--weights", "random", "--model.weights-sha256", "ab" * 32, "--out", str(out)])
    assert code == 2 and "applies to runs with a weights file" in capsys.readouterr().err and not out.exists()
    code = main([*RUN, "--model.weights-sha256", "ab" * 32, "--out", str(out)])   # the convnet's default: random
    assert code == 2 and "weights are random" in capsys.readouterr().err and not out.exists()


def test_the_file_s_tensors_are_what_phase_0_starts_from(tmp_path):
    sd = convnet_state()
    f = tmp_path / "w.safetensors"
    save_file(sd, f)
    wf = read_weights(f)
    assert not wf.own and wf.sha256 == sha256(f) and wf.tensors.keys() == sd.keys()
    # no training: the run's final backbone is the file's, bit for bit
    out = tmp_path / "r"
    assert main([*RUN, "--weights", str(f), "--epochs", "0", "--out", str(out)]) == 0
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[f"net.backbone.{k}"], v) for k, v in sd.items())
    conf = yaml.safe_load((out / "config.yaml").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert conf["model"]["weights"] == str(f) and conf["model"]["weights_sha256"] == sha256(f)
    assert conf["meta"]["weights_file"] == str(f.resolve())
    assert metrics["weights"] == str(f) and metrics["weights_sha256"] == sha256(f)


def test_a_cilearn_run_s_model_is_a_weights_file(tmp_path):
    """Pre-train with cilearn, then start another run (another head, other classes) from its backbone."""
    first = tmp_path / "first"
    assert main([*RUN, "--epochs", "1", "--out", str(first)]) == 0
    trained = load_file(first / "model.safetensors")
    wf = read_weights(first / "model.safetensors")
    assert wf.own and set(wf.tensors) == {k[len("net.backbone."):] for k in trained if k.startswith("net.backbone.")}
    second = tmp_path / "second"
    assert main([*RUN, "--weights", str(first / "model.safetensors"), "--epochs", "0", "--seed", "5",
                 "--model.head", "cosine", "--out", str(second)]) == 0
    got = load_file(second / "model.safetensors")
    backbone = [k for k in trained if k.startswith("net.backbone.")]
    assert backbone and all(torch.equal(got[k], trained[k]) for k in backbone)
    # a network's state dict (keys backbone.*, head.*) is read the same way
    net_sd = {k[len("net."):]: v for k, v in trained.items() if k.startswith("net.")}
    torch.save(net_sd, tmp_path / "net.pt")
    assert read_weights(tmp_path / "net.pt").tensors.keys() == wf.tensors.keys()


def test_check_fit_by_hand():
    module = torch.nn.Linear(3, 2)
    check_fit(module, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, "f", "m")
    with pytest.raises(WeightsError, match="key 'bias' holds torch.int64 values in the file"):
        check_fit(module, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2, dtype=torch.long)}, "f", "m")


def test_resume_and_replay_give_the_run_s_matrices_and_check_the_digest(tmp_path, capsys, monkeypatch):
    f = tmp_path / "w.safetensors"
    save_file(convnet_state(), f)
    args = [*RUN, "--weights", str(f), "--epochs", "2"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    want = json.loads((ref / "metrics.json").read_text())["accuracy_matrix"]
    assert replayed_and_resumed(ref, tmp_path, monkeypatch) == (want, want)
    # the file changed: the replay refuses it, and accepts it when told to
    save_file(convnet_state(seed=8), f)
    again = tmp_path / "again"
    code = main(["run", "--config", str(ref / "config.yaml"), "--out", str(again), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.weights_sha256" in err and str(f) in err and not again.exists(), err
    assert main(["run", "--config", str(ref / "config.yaml"), "--out", str(again), "--quiet",
                 "--model.weights-sha256", "null"]) == 0
    assert yaml.safe_load((again / "config.yaml").read_text())["model"]["weights_sha256"] == sha256(f)


def test_without_timm_a_timm_backbone_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)           # import timm raises ImportError
    out = tmp_path / "r"
    assert main([*RUN[:3], "--backbone", "timm:vit_tiny_patch16_224", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "timm cannot be imported" in err and "cilearn[ptm]" in err, err
    assert not out.exists()
