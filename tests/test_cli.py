"""The CLI: outputs of a run, `cilearn list`, and every bad input -> one line, exit 2, nothing written."""
import gzip
import json
import pickle
import struct
import subprocess
import sys

import pytest
import yaml

from cilearn.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_default_run_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "r"
    code, stdout, _ = run_cli(capsys, "run", "--out", str(out), "--no-progress", "--epochs", "4")
    assert code == 0
    for f in ("config.yaml", "metrics.json", "metrics.csv", "accuracy.png", "log.txt"):
        assert (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    for key in ("avg_incremental_acc", "last_acc", "forgetting", "avg_incremental_acc_nme", "last_acc_nme",
                "accuracy_matrix", "phases", "memory", "wall_seconds"):
        assert key in m
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3, 4, 5]
    p = m["phases"][2]
    for key in ("phase", "classes_seen", "acc", "acc_nme", "acc_old", "acc_new", "top5", "train_seconds",
                "train_images_per_s"):
        assert key in p
    assert p["classes_seen"] == 6 and m["phases"][0]["acc_old"] is None
    assert m["memory"]["total_images"] <= 200 and m["memory"]["total_bytes"] == m["memory"]["total_images"] * 64
    assert m["avg_incremental_acc"] == pytest.approx(sum(r["acc"] for r in m["phases"]) / 5)
    assert m["warnings"] == []                  # a run that learns: no phase at chance, no loss blow-up (cilearn.health)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "icarl" and cfg["seed"] == 1993 and cfg["meta"]["cilearn_version"]
    assert sorted(cfg["scenario"]["class_order"]) == list(range(10))
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 6
    assert "phase" in stdout and "average incremental accuracy" in stdout
    # the saved config runs again as given (meta is ignored on load)
    code, _, _ = run_cli(capsys, "run", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "r2"),
                         "--epochs", "1", "--no-progress", "--quiet")
    assert code == 0


def test_list(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "icarl" in out and "fashion-mnist" in out and "resnet32" in out


def test_flags_and_dotted_overrides_reach_the_config(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "run", "--method", "lwf", "--base", "4", "--increment", "3", "--epochs", "1",
                           "--train.momentum", "0.5", "--memory.selection=random", "--memory", "40", "--seed", "7",
                           "--scenario.class-order", "9,8,7,6,5,4,3,2,1,0", "--train.weight-decay", "1e-3",
                           "--out", str(out), "--no-progress", "--quiet")
    assert code == 0, err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["momentum"] == 0.5 and cfg["memory"]["selection"] == "random" and cfg["seed"] == 7
    assert cfg["method"] == "lwf" and cfg["scenario"]["base"] == 4
    assert cfg["scenario"]["class_order"] == list(range(9, -1, -1))   # a comma list becomes a list option
    assert cfg["train"]["weight_decay"] == 1e-3                          # YAML 1.1 would read a string
    assert len(json.loads((out / "metrics.json").read_text())["phases"]) == 3


def _fmnist_dir(tmp_path, truncate=False):
    d = tmp_path / "fm"
    d.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        img = struct.pack(">IIII", 0x803, n, 28, 28) + bytes(n * 784)
        lab = struct.pack(">II", 0x801, n) + bytes(i % 10 for i in range(n))
        if truncate and prefix == "train":
            img = img[:-100]
        (d / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(img))
        (d / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lab))
    return d


BAD = {
    "unknown method": (["--method", "nope"], "method 'nope'"),
    "unknown data set": (["--dataset", "nope"], "data set 'nope'"),
    "unknown backbone": (["--backbone", "nope"], "backbone component 'nope'"),
    "base too large": (["--base", "12"], "--base 12"),
    "phases do not cover": (["--base", "3", "--increment", "2"], "do not cover"),
    "memory below classes": (["--memory", "5"], "--memory 5"),
    "both budgets": (["--memory", "50", "--memory-per-class", "5"], "exclusive"),
    "negative epochs": (["--epochs", "-1"], "--epochs"),
    "negative lr": (["--lr", "-0.1"], "--lr"),
    "zero increment": (["--increment", "0"], "--increment"),
    "negative train-per-class": (["--train-per-class", "-3"], "--train-per-class"),
    "zero test-per-class": (["--test-per-class", "0"], "--test-per-class"),
    "unknown dotted key": (["--train.nope", "1"], "train.nope"),
    "wrong type": (["--train.momentum", "abc"], "train.momentum"),
    "not an int": (["--epochs", "ten"], "--epochs"),
    "unknown flag": (["--bogus"], "--bogus"),
    "bad precision": (["--precision", "fp8"], "--precision"),
    "bad augment": (["--augment", "zoom"], "augment"),
    "bad selection": (["--selection", "best"], "selection component 'best'"),
    "missing data dir": (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "/nonexistent/fm"),
    "cifar without data dir": (["--dataset", "cifar100"], "data-dir"),
    "loss for a bce recipe": (["--method", "lwf-mc", "--loss", "bsce"], "--loss bsce does not apply"),
    "nan learning rate": (["--lr", "nan"], "--lr must be a positive number, got nan"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_written(name, tmp_path, capsys):
    args, needle = BAD[name]
    out = tmp_path / "r"
    code, stdout, err = run_cli(capsys, "run", *args, "--out", str(out), "--no-progress", "--epochs", "1") \
        if "--epochs" not in args else run_cli(capsys, "run", *args, "--out", str(out), "--no-progress")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cilearn: error:"), err
    assert needle in lines[0]
    assert not out.exists()


def test_corrupt_data_files(tmp_path, capsys):
    d = _fmnist_dir(tmp_path, truncate=True)
    code, _, err = run_cli(capsys, "run", "--dataset", "fashion-mnist", "--data-dir", str(d), "--out",
                           str(tmp_path / "r"), "--no-progress")
    assert code == 2 and "train-images-idx3-ubyte.gz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_wrong_pickle_layout(tmp_path, capsys):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (d / name).write_bytes(pickle.dumps({"something": 1}))
    code, _, err = run_cli(capsys, "run", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out",
                           str(tmp_path / "r"), "--no-progress")
    assert code == 2 and "cifar-10-batches-py" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_empty_class_folder(tmp_path, capsys):
    from PIL import Image
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            if not (split == "train" and c == "b"):
                Image.new("RGB", (8, 8)).save(tmp_path / "img" / split / c / "x.png")
    code, _, err = run_cli(capsys, "run", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "img"),
                           "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 2 and "train/b" in err and len(err.strip().splitlines()) == 1


def test_unknown_config_key_in_file(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("method: icarl\ntrain:\n  epochz: 3\n")
    code, _, err = run_cli(capsys, "run", "--config", str(f), "--out", str(tmp_path / "r"))
    assert code == 2 and "train.epochz" in err and not (tmp_path / "r").exists()
    f.write_text("train: [1, 2]\n")
    code, _, err = run_cli(capsys, "run", "--config", str(f), "--out", str(tmp_path / "r"))
    assert code == 2 and "train" in err
    code, _, err = run_cli(capsys, "run", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err


@pytest.mark.parametrize("content, says", [
    (bytes(range(256)) * 4, "is not YAML text"),                   # a binary file given by mistake
    (b"a: 1\n\x00\x01\x02", "is not YAML text"),                   # valid UTF-8 but not text
    (b"- method: icarl\n- method: lucir\n", "mapping of options at its top level, got a list"),
    (b"icarl\n", "mapping of options at its top level, got a str"),
])
def test_config_file_that_is_not_a_yaml_mapping(tmp_path, capsys, content, says):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    code, _, err = run_cli(capsys, "run", "--config", str(f), "--out", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"config file {f} " in err and says in err and not (tmp_path / "r").exists()


def test_out_dir_holding_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(capsys, "run", "--out", str(out), "--epochs", "1", "--no-progress", "--quiet")[0] == 0
    before = (out / "metrics.json").read_text()
    code, _, err = run_cli(capsys, "run", "--out", str(out), "--epochs", "1", "--no-progress")
    assert code == 2 and str(out) in err and (out / "metrics.json").read_text() == before


def test_console_script_subprocess_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "cilearn", "run", "--base", "99", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_image_folder_with_mixed_sizes_and_modes_is_normalised(tmp_path, capsys):
    """Image folders hold images of any size and mode (real ImageNet does): each is converted to
    RGB and resized once, so a run works; the cached array is uniform."""
    from PIL import Image
    root = tmp_path / "img"
    specs = [("L", (10, 14)), ("RGBA", (20, 9)), ("P", (16, 16)), ("RGB", (33, 21)), ("CMYK", (12, 12))]
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i, (mode, size) in enumerate(specs):
                Image.new(mode, size, color=i * 40 if mode in ("L", "P") else None).save(
                    root / split / c / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    from cilearn.data.base import DataOptions
    from cilearn.data.datasets import load_dataset
    ds = load_dataset("imagefolder", DataOptions(data_dir=str(root), image_size=8))
    assert ds.train_x.shape == (10, 3, 8, 8) and ds.test_x.shape == (10, 3, 8, 8)
    code, _, err = run_cli(capsys, "run", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "8",
                           "--base", "0", "--increment", "1", "--epochs", "1", "--backbone", "convnet",
                           "--out", str(tmp_path / "r"), "--no-progress", "--quiet")
    assert code == 0, err


def test_list_file_label_out_of_range(tmp_path, capsys):
    from PIL import Image
    (tmp_path / "im").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "im" / f"{i}.png")
    args = ["run", "--dataset", "imagefolder", "--data-dir", str(tmp_path), "--train-list",
            str(tmp_path / "train.txt"), "--test-list", str(tmp_path / "test.txt"), "--out", str(tmp_path / "r")]
    (tmp_path / "train.txt").write_text("im/0.png 0\nim/1.png 1\n")
    (tmp_path / "test.txt").write_text("im/3.png 7\n")          # a test label the training split lacks
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "label 7 out of range" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "train.txt").write_text("im/0.png 0\nim/1.png 1\nim/2.png 7\n")   # labels 2..6 missing
    (tmp_path / "test.txt").write_text("im/3.png 0\n")
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "train.txt" in err and "missing 2, 3" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_run_help_shows_defaults_and_where_every_option_is(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "[seed; default: 1993]" in out and "[train.epochs; default: the recipe's]" in out
    assert "cilearn list --options [--method M]" in out


def test_list_options_lists_every_option_with_its_default(capsys):
    from cilearn.config import RunConfig
    from cilearn.methods.recipe import plan
    assert main(["list", "--options", "--method", "podnet"]) == 0
    out = capsys.readouterr().out
    assert "--train.momentum" in out and "--data.train-per-class" in out and "--eval.nme" in out
    p = plan(RunConfig(method="podnet"), None, strict=False)
    for c in p.classes:                       # every option of the run's components, with the recipe's value
        for k, v in p.options[c.name].items():
            line = next(ln for ln in out.splitlines() if f"--components.{c.name}.{k}".replace("_", "-") in ln)
            assert f" {str(v).lower() if isinstance(v, bool) else 'null' if v is None else v} " in line + " ", line
    assert "[--loss.pod-spatial-weight]" in out and "lambda_c" in out        # short names and the declared help
    assert main(["list", "--options"]) == 0
    every = capsys.readouterr().out
    assert "--components.cim.inner-ratio [--components.cim-meta.inner-ratio]" in every


def test_list_names_every_kind_of_component(capsys):
    from cilearn.components import KINDS, REGISTRIES
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        line = next(ln for ln in out.splitlines() if ln.startswith(f"{kind} ("))
        assert all(n in line for n in REGISTRIES[kind].names()), line


def test_an_unknown_component_names_the_choices_and_the_plugin_option(tmp_path, capsys):
    code = main(["run", "--distill", "ewc", "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--distill" in err and "'ewc'" in err and "attention, aux-ce" in err and "--plugin FILE.py" in err
    assert not (tmp_path / "r").exists()
