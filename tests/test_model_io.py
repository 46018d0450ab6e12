"""A finished run's model (model.safetensors + model.json): it loads through cilearn.api and gives
the run's last phase, `cilearn eval` / `cilearn predict`, the resume checkpoint deleted unless
--keep-checkpoint, --test-per-class, the task-aware accuracy, and bad model files -> one line."""
import hashlib
import io
import json
import shutil

import pytest
import torch
from PIL import Image

from cilearn.api import evaluate, load_model, predict_files
from cilearn.checkpoint import EPOCH_FILE, PHASE_FILE
from cilearn.cli import main
from cilearn.data.datasets import load_dataset, subsample_per_class
from cilearn.evaluate import evaluate_phase, task_aware_predict
from cilearn.memory.cim import install_rationals
from cilearn.model_io import MODEL_FILE, SPEC_FILE, ModelSpec, build_from, save_model
from cilearn.outputs import summarize


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A digits iCaRL run (fp32), evaluated on 20 test images per class."""
    out = tmp_path_factory.mktemp("model") / "run"
    assert main(["run", "--out", str(out), "--epochs", "2", "--test-per-class", "20", "--precision", "fp32",
                 "--no-progress", "--quiet"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_task_aware_accuracy_by_hand():
    # tasks: ids 0-1 and 2-3; one test image per class
    logits = torch.tensor([[1., 0., 5., 0.],     # y=0: overall argmax 2 (wrong); within task 0: 0 (right)
                           [2., 1., 0., 0.],     # y=1: 0 (wrong); within task 0: 0 (wrong)
                           [9., 0., 3., 1.],     # y=2: 0 (wrong); within task 1: 2 (right)
                           [0., 0., 1., 2.]])    # y=3: 3 (right); within task 1: 3 (right)
    y = torch.tensor([0, 1, 2, 3])
    bounds = [(0, 2), (2, 4)]
    assert task_aware_predict(logits, y, bounds).tolist() == [0, 0, 2, 3]
    ev = evaluate_phase(logits, torch.zeros(4, 3), y, bounds, None)
    assert ev.acc == 25.0 and ev.task_acc == [0.0, 50.0]
    assert ev.acc_task == 75.0 and ev.task_acc_task == [50.0, 100.0]
    first = evaluate_phase(logits[:2, :2], torch.zeros(2, 3), y[:2], bounds[:1], None)   # one task: the same as acc
    assert first.acc_task == first.acc == 50.0
    m = summarize([first, ev], [{"classes_seen": 2}, {"classes_seen": 4}], None, 1.0)
    assert m["accuracy_matrix_task"] == [[50.0], [50.0, 100.0]]
    assert m["avg_incremental_acc_task"] == 62.5 and m["last_acc_task"] == 75.0


def test_finished_run_keeps_the_model_not_the_checkpoint(finished, tmp_path, capsys):
    out, m = finished
    assert (out / MODEL_FILE).stat().st_size > 0 and (out / SPEC_FILE).stat().st_size > 0
    assert not (out / PHASE_FILE).exists() and not (out / EPOCH_FILE).exists()
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["class_order"] == m["class_order"] and spec["num_classes"] == 10 and spec["prototypes"]
    assert spec["tasks"] == [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10]] and spec["image_shape"] == [1, 8, 8]
    # the phase table and metrics.csv have the task-aware column
    assert all(r["acc_task"] >= r["acc"] for r in m["phases"]) and m["phases"][0]["acc_task"] == m["phases"][0]["acc"]
    assert "acc_task" in (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert " task " in (out / "log.txt").read_text()
    # --keep-checkpoint keeps it (and says so in config.yaml)
    kept = tmp_path / "kept"
    assert cli(capsys, "run", "--out", kept, "--epochs", "1", "--increment", "5", "--test-per-class", "5",
               "--keep-checkpoint", "--no-progress", "--quiet")[0] == 0
    assert (kept / PHASE_FILE).exists() and (kept / MODEL_FILE).exists()
    assert "keep_checkpoint: true" in (kept / "config.yaml").read_text()


def test_test_per_class_is_a_seeded_subset(finished):
    out, m = finished
    assert "test_per_class: 20" in (out / "config.yaml").read_text()
    assert sum(map(sum, m["confusion"])) == 10 * 20                   # the last phase saw 20 images per class
    ds = load_dataset("digits")
    x, y = subsample_per_class(ds.test_x, ds.test_y, 20, 1993)        # the run's seed
    ev = load_model(out, "cpu").evaluate(x, y)
    assert ev.acc == m["last_acc"]
    assert torch.bincount(y).tolist() == [20] * 10
    assert not torch.equal(subsample_per_class(ds.test_x, ds.test_y, 20, 1)[0], x)   # another seed, another subset


def test_saved_model_gives_the_runs_last_phase(finished, capsys):
    out, m = finished
    r = evaluate(out, device="cpu")
    assert (r["acc"], r["acc_task"], r["acc_nme"], r["top5"]) == (m["last_acc"], m["last_acc_task"],
                                                                  m["last_acc_nme"], m["phases"][-1]["top5"])
    assert r["task_acc"] == m["accuracy_matrix"][-1] and r["images"] == 200
    code, stdout, _ = cli(capsys, "eval", out, "--device", "cpu")
    assert code == 0 and f"acc {m['last_acc']:.2f}" in stdout and f"NME {m['last_acc_nme']:.2f}" in stdout
    code, stdout, _ = cli(capsys, "eval", out, "--test-per-class", "3", "--json")
    assert code == 0 and json.loads(stdout)["images"] == 30


def test_predict_images_and_files(finished, tmp_path, capsys):
    out, _ = finished
    model = load_model(out, "cpu")
    ds = load_dataset("digits")
    x = ds.test_x[:6]
    labels = model.predict(x)
    assert labels.tolist() == [model.spec.class_order[i] for i in model.logits(x).argmax(1).tolist()]
    assert torch.equal(model.predict(x.float() / 255), labels)                        # floats in [0, 1]
    assert (model.predict(x, nme=True) == ds.test_y[:6]).sum() >= 4                   # NME: > 90% in this run
    paths = []
    for i in range(6):                                                                # 8x8 grey PNGs
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(x[i, 0].numpy()).save(paths[-1])
    assert [k for k, _ in predict_files(out, paths, "cpu")] == labels.tolist()
    code, stdout, _ = cli(capsys, "predict", out, *paths, "--device", "cpu")
    assert code == 0 and [ln.split("\t")[1] for ln in stdout.splitlines()] == [str(k) for k in labels.tolist()]
    with pytest.raises(Exception, match=r"this model takes \[N, 1, 8, 8\]"):
        model.predict(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def _rehash(run):
    spec = json.loads((run / SPEC_FILE).read_text())
    spec["weights_sha256"] = hashlib.sha256((run / MODEL_FILE).read_bytes()).hexdigest()
    (run / SPEC_FILE).write_text(json.dumps(spec))


def _pickle(run):
    buf = io.BytesIO()
    torch.save({"net.x": torch.zeros(1)}, buf)
    (run / MODEL_FILE).write_bytes(buf.getvalue())
    _rehash(run)


def _drop_a_weight(run):
    from safetensors.torch import load_file, save_file
    t = load_file(run / MODEL_FILE)
    t.pop(sorted(k for k in t if k.startswith("net.backbone"))[0])
    save_file(t, run / MODEL_FILE)
    _rehash(run)


@pytest.mark.parametrize("damage, expect", [
    (lambda r: (r / MODEL_FILE).write_bytes((r / MODEL_FILE).read_bytes()[:-7] + b"\x00" * 7), "SHA-256 mismatch"),
    (_pickle, "is not a safetensors file"),
    (_drop_a_weight, "does not fit its model.json"),
    (lambda r: (r / SPEC_FILE).write_text("{not json"), "cannot be read as JSON"),
    (lambda r: (r / SPEC_FILE).write_text('{"format": "other"}'), "is not a cilearn model description"),
    (lambda r: (r / SPEC_FILE).write_text((r / SPEC_FILE).read_text().replace('"seed"', '"sed"')), "key 'seed'"),
    (lambda r: (r / MODEL_FILE).unlink(), "cannot read"),
    (lambda r: (r / SPEC_FILE).unlink(), "the run finished before cilearn saved models"),
    (lambda r: [(r / f).unlink() for f in (SPEC_FILE, "metrics.json")], "the run is not finished"),
])
def test_bad_model_files_are_one_line(finished, tmp_path, capsys, damage, expect):
    run = tmp_path / "copy"
    shutil.copytree(finished[0], run)
    damage(run)
    code, _, err = cli(capsys, "eval", run)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expect in err and str(run) in err


def test_every_net_variant_round_trips(tmp_path):
    """Expandable (two extractors, one frozen), a logit correction (BiC), CIM's rationals, a
    proxies head on a ResNet without its last ReLU: the rebuilt net's logits are the saved net's."""
    for arch, steps in (({"backbone": "convnet", "backbone_options": {}, "head": "cosine", "in_channels": 1,
                          "expandable": True, "head_options": {"scale": 2.0}}, ("expand", "bias", "rationals")),
                        ({"backbone": "resnet32", "backbone_options": {"last_relu": False}, "head": "lsc",
                          "in_channels": 1, "expandable": False, "head_options": {"proxies": 3, "scale": 1.0}}, ())):
        torch.manual_seed(0)
        net = build_from(arch)
        net.add_classes(3)
        if "expand" in steps:
            net.expand()
            net.add_classes(2)
        if "bias" in steps:
            net.enable_logit_bias()
            net.logit_bias.set(3, 5, 0.5, -1.0)
        if "rationals" in steps:
            install_rationals(net.backbone)
        spec = ModelSpec(architecture=arch, image_shape=[1, 8, 8], mean=[0.3], std=[0.4], class_order=[4, 0, 3, 1, 2],
                         class_names=list("abcde"), tasks=[[0, 3], [3, 5]], dataset="digits", seed=0, precision="fp32",
                         channels_last=False, eval_batch_size=4)
        out = tmp_path / str(len(steps))
        out.mkdir()
        save_model(out, net, spec, None)
        model = load_model(out, "cpu")
        x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
        want = net.eval()(((x.float() / 255 - 0.3) / 0.4)).logits
        assert torch.allclose(model.logits(x), want, atol=1e-5)
        assert model.predict(x).tolist() == [[4, 0, 3, 1, 2][i] for i in want.argmax(1).tolist()]
