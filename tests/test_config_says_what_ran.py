"""A run's config.yaml says what ran: every option the run uses with the value that ran (no null
standing for "the recipe's default"), nothing the run does not use; an option the run does not use
but the user set is refused (cilearn.methods.options)."""
import pytest
import yaml

from cilearn.cli import main

TRAINING = ("model", "loss", "train", "memory", "replay")


def run(tmp_path, capsys, name, *flags):
    out = tmp_path / name
    code = main(["run", *flags, "--epochs", "1", "--base", "4", "--increment", "3", "--out", str(out),
                 "--no-progress", "--quiet"])
    assert code == 0, capsys.readouterr().err
    return yaml.safe_load((out / "config.yaml").read_text())


def nulls(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from nulls(v, f"{prefix}{k}.")
        elif v is None:
            yield f"{prefix}{k}"


@pytest.mark.parametrize("method", ["icarl", "lucir-bsce", "podnet", "foster"])
def test_no_training_option_is_null(method, tmp_path, capsys):
    cfg = run(tmp_path, capsys, method, "--method", method)
    left = [k for k in nulls({s: cfg[s] for s in TRAINING if s in cfg})]
    assert left == ["memory.per_class"]          # the budget is given as a total: no per-class budget
    assert cfg["model"]["head"] and cfg["loss"]["cls"] and cfg["data"]["augment"]


def test_only_the_options_the_run_uses(tmp_path, capsys):
    icarl = run(tmp_path, capsys, "icarl", "--method", "icarl")
    assert icarl["replay"] == {"source": "none"} and set(icarl["memory"]) >= {"selection", "optimizer", "compressor"}
    assert set(icarl["components"]) == {"convnet", "linear", "ce", "kd", "herding"}     # the run's components, no other
    assert icarl["components"]["kd"] == {"weight": 1.0, "temperature": 2.0}
    assert not {"less_forget_weight", "nca_margin", "kd_weight", "temperature"} & set(icarl["loss"])  # short names: never written
    assert "proxies" not in icarl["model"] and "scale" not in icarl["model"] and "data_dir" not in icarl["data"]
    podnet = run(tmp_path, capsys, "podnet", "--method", "podnet")
    assert podnet["components"]["nca"] == {"weight": 1.0, "margin": 0.6}
    assert podnet["components"]["pod"] == {"spatial_weight": 3.0, "flat_weight": 1.0}
    assert podnet["components"]["imprint"] == {"first_phase": 1} and podnet["constraints"] == ["freeze-old-rows"]
    assert podnet["components"]["lsc"] == {"proxies": 10, "scale": 1.0}
    assert podnet["components"]["balanced-finetune"]["lr"] == 0.05
    lwm = run(tmp_path, capsys, "lwm", "--method", "lwm")
    assert lwm["components"]["attention"] == {"weight": 1.0, "student_bn": "eval"} and lwm["loss"] == {"cls": "ce-local", "distill": []}
    assert "selection" not in lwm["memory"]


@pytest.mark.parametrize("flags,option,applies", [
    (["--method", "icarl", "--loss.nca-margin", "0.3"], "--loss.nca-margin 0.3", "classification component nca"),
    (["--method", "lwf", "--memory.selection", "random"], "--memory.selection 'random'", "runs with exemplars"),
    (["--method", "icarl", "--replay.steps", "10"], "--replay.steps 10", "replay component dfgr"),
    (["--method", "icarl", "--train.finetune-epochs", "3"], "--train.finetune-epochs 3", "calibration component balanced-finetune"),
    (["--method", "finetune", "--loss.less-forget-weight", "2"], "--loss.less-forget-weight 2", "term component less-forget"),
    (["--method", "icarl", "--components.pod.flat-weight", "2"], "components.pod", "not a component of this run"),
    (["--method", "icarl", "--data-dir", "/tmp"], "--data.data-dir '/tmp'", "the data sets cifar10, cifar100, cub200, fashion-mnist, imagefolder, imagenet-a"),
])
def test_an_option_the_run_does_not_use_is_refused(flags, option, applies, tmp_path, capsys):
    code = main(["run", *flags, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and option in err and applies in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_the_documented_replay_works_as_written(tmp_path, capsys, monkeypatch):
    """`cilearn run --config RUN/config.yaml` (docs/running.md) replays the run: a new run
    directory (config.yaml holds no out), the same accuracy matrices."""
    import json
    first = tmp_path / "first"
    assert main(["run", "--method", "lucir", "--epochs", "1", "--base", "4", "--increment", "3", "--out", str(first),
                 "--precision", "fp32", "--no-progress", "--quiet"]) == 0
    conf = yaml.safe_load((first / "config.yaml").read_text())
    assert "out" not in conf and conf["meta"]["run_dir"] == str(first)
    monkeypatch.chdir(tmp_path)                   # the replay writes under runs/ of the working directory
    assert main(["run", "--config", str(first / "config.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    (again,) = (tmp_path / "runs").iterdir()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (first, again))
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["accuracy_matrix_nme"] == b["accuracy_matrix_nme"]
    assert yaml.safe_load((again / "config.yaml").read_text())["components"] == conf["components"]
