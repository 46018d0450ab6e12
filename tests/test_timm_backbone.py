"""``--backbone timm:NAME`` on tiny randomly initialised timm models (nothing downloaded): the
embedding is timm's pre-logits features, a weights file saved from a timm model reloads bit for
bit, the input view follows the model's pretrained config (checked by hand), a run resumes and
replays exactly, and the model's own pre-trained weights come from the local cache or give one line.

Needs timm (the ``ptm`` extra) and a torchvision that imports beside the installed torch."""
import hashlib
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

timm = pytest.importorskip("timm")

from cilearn.cli import main  # noqa: E402
from cilearn.model_io import load_model  # noqa: E402
from cilearn.models import part  # noqa: E402
from cilearn.models.weights import load_weights  # noqa: E402
from conftest import replayed_and_resumed  # noqa: E402

VIT = "vit_tiny_patch16_224"
TINY = dict(img_size=16, patch_size=8, depth=1, embed_dim=32, num_heads=2)   # 5 tokens of 32, one block
TINY_FLAGS = [a for k, v in TINY.items() for a in (f"--model.{k.replace('_', '-')}", str(v))]
# digits (8x8, 1 channel, resized to 16 and repeated to 3 channels), 4 + 3 + 3 classes
RUN = ["run", "--method", "finetune", "--backbone", f"timm:{VIT}", *TINY_FLAGS, "--base", "4", "--increment", "3",
       "--train-per-class", "20", "--precision", "fp32", "--no-progress", "--quiet"]


def timm_model(name: str, seed: int = 3, **kwargs) -> torch.nn.Module:
    """A timm model with its classifier (10 classes), seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name,kwargs,side", [(VIT, TINY, 16), ("test_resnet", {}, 64)])
def test_the_embedding_is_the_timm_model_s_pre_logits_features(name, kwargs, side, tmp_path):
    ref = timm_model(name, **kwargs)
    f = tmp_path / "w.safetensors"
    save_file(ref.state_dict(), f)                    # with its classifier, which the backbone has not
    factory = part("backbone", f"timm:{name}", **kwargs)
    backbone = factory.create(3).eval()
    assert not any(k.startswith(("head.", "fc.")) for k in backbone.model.state_dict())
    load_weights(factory, backbone, f)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        maps, emb = backbone(x)
        feats = ref.forward_features(x)
        want = ref.forward_head(feats, pre_logits=True)
    assert emb.shape == (2, backbone.out_dim) and torch.equal(emb, want)
    if name == "test_resnet":                         # a convolutional model: its last feature map
        assert len(maps) == 1 and maps[0].shape == (2, 96, 2, 2) and torch.equal(maps[0], feats)
    else:                                             # tokens: no feature map
        assert maps == []


def test_a_weights_file_saved_from_a_timm_model_reloads_bit_identically(tmp_path, capsys):
    ref = timm_model(VIT, **TINY)
    sd = ref.state_dict()
    f = tmp_path / "w.safetensors"
    save_file(sd, f)
    torch.save(sd, tmp_path / "w.pt")
    for weights in (f, tmp_path / "w.pt"):
        out = tmp_path / weights.suffix[1:]
        assert main([*RUN, "--weights", str(weights), "--epochs", "0", "--out", str(out)]) == 0
        got = load_file(out / "model.safetensors")
        mine = {k[len("net.backbone.model."):]: v for k, v in got.items() if k.startswith("net.backbone.model.")}
        assert mine.keys() == sd.keys() - {"head.weight", "head.bias"}
        assert all(torch.equal(v, sd[k]) for k, v in mine.items())
        conf = yaml.safe_load((out / "config.yaml").read_text())
        assert conf["model"]["weights_sha256"] == sha256(weights)
    # a file of another shape of the model (two blocks): one line naming the first offending key
    save_file(timm_model(VIT, **{**TINY, "depth": 2}).state_dict(), tmp_path / "deep.safetensors")
    out = tmp_path / "deep"
    assert main([*RUN, "--weights", str(tmp_path / "deep.safetensors"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "key 'blocks.1." in err and "extra key" in err, err
    assert str(tmp_path / "deep.safetensors") in err and not out.exists()


def test_the_input_view_follows_the_pretrained_config_and_its_overrides(tmp_path, capsys):
    x = torch.tensor([[0, 51], [102, 255]], dtype=torch.uint8).repeat(4, 4).view(1, 1, 8, 8)   # a digits-sized image
    # the model's: its side (img_size here), bicubic, mean = std = 0.5 (timm's pretrained_cfg of vit_tiny)
    cfg = timm.models.get_pretrained_cfg(VIT)
    assert (cfg.interpolation, cfg.mean, cfg.std) == ("bicubic", (0.5,) * 3, (0.5,) * 3)
    out = tmp_path / "model"
    assert main([*RUN, "--weights", "random", "--epochs", "0", "--out", str(out)]) == 0
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (data["input_size"], data["interpolation"], data["normalize"]) == (16, "bicubic", "0.5,0.5,0.5/0.5,0.5,0.5")
    view = load_model(out, device="cpu").augmenter
    flat = torch.full((1, 1, 8, 8), 51, dtype=torch.uint8)              # a constant image stays constant
    assert torch.allclose(view.test(flat), torch.full((1, 3, 16, 16), (51 / 255 - 0.5) / 0.5))
    # overridden: nearest (each pixel a 2x2 block), ImageNet's mean/std, per channel
    out = tmp_path / "overridden"
    assert main([*RUN, "--weights", "random", "--epochs", "0", "--data.interpolation", "nearest",
                 "--normalize", "imagenet", "--out", str(out)]) == 0
    got = load_model(out, device="cpu").augmenter.test(x)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    block = x[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1).float() / 255        # [16, 16]
    assert got.shape == (1, 3, 16, 16)
    assert torch.allclose(got[0], (block - mean.view(3, 1, 1)) / std.view(3, 1, 1), atol=1e-6)
    # --input-size: the side, the model's img_size untouched (a ViT built for 16 px refuses 24)
    code = main([*RUN, "--weights", "random", "--epochs", "0", "--input-size", "24", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "takes 16 px inputs only" in err, err


def test_a_run_resumes_exactly_and_replays_from_config_yaml(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert main([*RUN, "--weights", "random", "--epochs", "6", "--batch-size", "16", "--lr", "0.01",
                 "--out", str(ref)]) == 0
    metrics = json.loads((ref / "metrics.json").read_text())
    want = metrics["accuracy_matrix"]
    assert max(row[-1] for row in want if row) > 40         # it learned (chance: 25 to 33 on the new classes)
    conf = yaml.safe_load((ref / "config.yaml").read_text())
    assert conf["components"][f"timm:{VIT}"] == TINY and conf["model"]["weights"] == "random"
    assert "weights_sha256" not in conf["model"] and metrics["weights_sha256"] is None
    assert replayed_and_resumed(ref, tmp_path, monkeypatch) == (want, want)


def hf_cache(root, repo: str, state: dict) -> "Path":  # noqa: F821
    """A Hugging Face cache under ``root`` holding ``repo``'s model.safetensors (as
    ``timm.create_model(..., pretrained=True)`` leaves it)."""
    commit = "0" * 40
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    save_file(state, snap / "model.safetensors")
    return snap / "model.safetensors"


def test_pretrained_weights_come_from_the_local_cache_or_give_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = ["run", "--method", "simplecil", "--backbone", "timm:test_vit", "--base", "4", "--increment", "3",
            "--train-per-class", "5", "--test-per-class", "5", "--precision", "fp32", "--no-progress", "--quiet"]
    out = tmp_path / "missing"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists(), err
    assert "timm:test_vit" in err and "timm/test_vit.r160_in1k" in err and "docs/methods/pretrained.md" in err, err
    # the weights in the cache (the model's default tag, timm/test_vit.r160_in1k): read from there
    f = hf_cache(cache, "timm/test_vit.r160_in1k", timm.create_model("test_vit", pretrained=False).state_dict())
    out = tmp_path / "cached"
    assert main([*args, "--out", str(out)]) == 0
    conf = yaml.safe_load((out / "config.yaml").read_text())
    assert conf["model"]["weights"] == "pretrained" and conf["model"]["weights_sha256"] == sha256(f)
    assert conf["meta"]["weights_file"] == str(f.resolve()) and conf["data"]["input_size"] == 160
    # a cached file timm would convert while loading (here: keys of another layout): one line that says so
    state = {k.replace("blocks.", "layers."): v for k, v in timm.create_model("test_vit").state_dict().items()}
    save_file(state, f)
    assert main([*args, "--out", str(tmp_path / "converted")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'blocks.0.norm1.weight' of the backbone timm:test_vit is missing" in err
    assert "another layout" in err and "--weights FILE" in err, err


def test_a_name_timm_does_not_know_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*RUN[:4], "timm:vit_tiny_patch16_2240", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "timm has no model 'vit_tiny_patch16_2240'" in err, err
    assert "similar names" in err and not out.exists()
