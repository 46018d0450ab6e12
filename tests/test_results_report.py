"""Multi-seed summaries, the comparison table, the HTML report (and its rendering in headless
Chromium), `cilearn list --configs` and `--tensorboard`: numbers checked against values computed
by hand from hand-made run directories, then one small real run of each command."""
import base64
import csv
import io
import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from cilearn.cli import main
from cilearn.evaluate import class_forgetting, confusion_matrix, per_class_accuracy
from cilearn.report import SECTIONS, html_report
from cilearn.report import write_seed_summary
from cilearn.results import default_seeds, load_group, parse_seeds
from cilearn.tblog import epoch_step


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def hand_metrics(accs, last_acc=None, forgetting=10.0, nme=None, bytes_=12800, wall=100.0):
    """A metrics.json of a B0-Inc2 run: ``len(accs)`` phases of 2 classes, phase i's accuracy ``accs[i]``,
    old = acc - 10, new = acc + 5, train 10 s x (i + 1), 20 exemplars a class, ``bytes_`` in memory."""
    T = len(accs)
    phases = []
    for i, a in enumerate(accs):
        k = 2 * (i + 1)
        phases.append({"phase": i, "classes_seen": k, "acc": a, "acc_nme": None if nme is None else nme[i],
                       "acc_old": None if i == 0 else a - 10, "acc_new": a + 5, "acc_old_among_old": None if i == 0 else 80.0,
                       "acc_new_among_new": 95.0, "top5": None, "train_seconds": 10.0 * (i + 1),
                       "finetune_seconds": 1.0, "train_images_per_s": 500.0, "loss": {}, "exemplar_optimizer": {},
                       "params": 1_000_000, "per_class_acc": [100.0 - 10 * (i - c // 2) for c in range(k)]})
    return {"avg_incremental_acc": sum(accs) / T, "last_acc": accs[-1] if last_acc is None else last_acc,
            "forgetting": forgetting, "avg_incremental_acc_nme": None if nme is None else sum(nme) / T,
            "last_acc_nme": None if nme is None else nme[-1],
            "accuracy_matrix": [[a] * (i + 1) for i, a in enumerate(accs)],
            "accuracy_matrix_nme": None, "phases": phases,
            "memory": {"per_class": 20, "total_images": 2 * T * 20, "total_bytes": bytes_,
                       "class_images": [20] * (2 * T), "class_bytes": [bytes_ // (2 * T)] * (2 * T)},
            "wall_seconds": wall, "confusion": [[5 if r == c else 1 for c in range(2 * T)] for r in range(2 * T)],
            "class_order": list(range(2 * T))[::-1]}


def write_run(d, metrics, method="icarl", seed=1993, dataset="digits", increment=2):
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "config.yaml").write_text(yaml.safe_dump({"method": method, "seed": seed, "data": {"dataset": dataset},
                                                   "scenario": {"base": 0, "increment": increment}}))
    return d


def seed_dir(root, method, per_seed):
    """``root/seed-<s>/`` runs; ``per_seed``: {seed: metrics}."""
    for s, m in per_seed.items():
        write_run(root / f"seed-{s}", m, method, s)
    return root


# ---------------------------------------------------------------- per-class metrics
def test_per_class_accuracy_confusion_and_class_forgetting_by_hand():
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    assert per_class_accuracy(pred, y, 4) == [50.0, pytest.approx(200 / 3), 100.0, None]   # class 3: no image
    assert confusion_matrix(pred, y, 3) == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    # class 0: best before the last phase 90, last 40 -> 50; class 1: 80 -> 70 = 10; class 2: 60 -> 65 = -5;
    # class 3 is the last phase's: None
    rows = [[90.0, 80.0], [70.0, 60.0, 60.0], [40.0, 70.0, 65.0, 99.0]]
    assert class_forgetting(rows) == [50.0, 10.0, -5.0, None]


# ---------------------------------------------------------------- seeds
def test_parse_seeds_and_num_seeds():
    assert parse_seeds("1993, 1,2") == [1993, 1, 2]
    for bad in ("1,a", "", "1.5", "1,1"):
        with pytest.raises(Exception, match="--seeds"):
            parse_seeds(bad)
    assert default_seeds(1993, 3) == [1993, 1, 2]
    assert default_seeds(2, 3) == [2, 1, 3]
    with pytest.raises(Exception, match="--num-seeds"):
        default_seeds(1993, 0)


def test_mean_and_sample_std_over_seeds_by_hand(tmp_path):
    d = seed_dir(tmp_path / "icarl", "icarl", {
        1993: hand_metrics([100.0, 20.0], last_acc=40.0, forgetting=30.0, bytes_=1000, nme=[100.0, 90.0]),
        1: hand_metrics([100.0, 40.0], last_acc=50.0, forgetting=20.0, bytes_=1000, nme=[100.0, 80.0]),
        2: hand_metrics([100.0, 60.0], last_acc=66.0, forgetting=10.0, bytes_=1000, nme=[100.0, 70.0])})
    assert [r.seed for r in load_group(d).runs] == [1, 2, 1993]        # no summary yet: by seed
    g = write_seed_summary(d, [1993, 1, 2])
    assert [r.seed for r in g.runs] == [1993, 1, 2]
    s = json.loads((d / "summary.json").read_text())
    assert s["seeds"] == [1993, 1, 2] and (d / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = s["metrics"]
    # avg inc. acc per seed: 60, 70, 80 -> mean 70, sample std 10
    assert m["avg_incremental_acc"]["values"] == [60.0, 70.0, 80.0]
    assert m["avg_incremental_acc"]["mean"] == pytest.approx(70.0) and m["avg_incremental_acc"]["std"] == pytest.approx(10.0)
    # last 40, 50, 66: mean 52, std sqrt((144 + 4 + 196) / 2)
    assert m["last_acc"]["mean"] == pytest.approx(52.0) and m["last_acc"]["std"] == pytest.approx(math.sqrt(172))
    assert m["forgetting"]["mean"] == pytest.approx(20.0) and m["forgetting"]["std"] == pytest.approx(10.0)
    assert m["avg_incremental_acc_nme"]["mean"] == pytest.approx(90.0) and m["avg_incremental_acc_nme"]["std"] == pytest.approx(5.0)
    assert m["memory_bytes"] == {"mean": 1000.0, "std": 0.0, "values": [1000.0] * 3}
    assert m["train_seconds"]["mean"] == pytest.approx(30.0)              # 10 + 20 per run
    assert m["old_last"]["values"] == [10.0, 30.0, 50.0] and m["top5_last"]["mean"] is None   # not recorded
    # the curve: phase 1 accuracies 20, 40, 60 -> mean 40, std 20
    assert s["curves"]["acc"]["mean"] == [100.0, 40.0] and s["curves"]["acc"]["std"] == [0.0, pytest.approx(20.0)]
    md = (d / "summary.md").read_text()
    assert "| avg inc. acc | 70.00 ± 10.00 | 60.00 | 70.00 | 80.00 |" in md
    assert "| last acc | 52.00 ± 13.11 |" in md and "| top-5 (last phase) | - |" in md
    assert "| memory (bytes) | 1000 ± 0 |" in md


# ---------------------------------------------------------------- compare
def test_compare_table_on_hand_made_run_dirs(tmp_path, capsys):
    lwf = write_run(tmp_path / "lwf-run", hand_metrics([100.0, 10.0], forgetting=90.0, bytes_=0), "lwf")
    icarl = seed_dir(tmp_path / "icarl-seeds", "icarl", {1993: hand_metrics([100.0, 50.0], nme=[100.0, 80.0]),
                                                        1: hand_metrics([100.0, 70.0], nme=[100.0, 60.0])})
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", lwf, icarl, "--out", out)
    assert code == 0, err
    md = (out / "compare.md").read_text().splitlines()
    assert md[0].startswith("| method | runs | avg inc. acc | avg inc. acc NME | last acc | forgetting |")
    assert md[2] == "| lwf | 1 | 55.00 | - | 10.00 | 90.00 | 0.00 | 15.00 | 30.0 | 100.0 | 0 |"
    # icarl: avg 75 and 85 -> 80 ± 7.07; NME 90 and 80 -> 85 ± 7.07; last 50, 70 -> 60 ± 14.14
    assert md[3].startswith("| icarl | 2 | 80.00 ± 7.07 | 85.00 ± 7.07 | 60.00 ± 14.14 | 10.00 ± 0.00 |")
    assert md[3].endswith("| 12800 ± 0 |")
    assert "| icarl | 2 | 80.00 ± 7.07" in stdout
    rows = {r["label"]: r for r in csv.DictReader(io.StringIO((out / "compare.csv").read_text()))}
    assert float(rows["icarl"]["avg_incremental_acc_mean"]) == pytest.approx(80.0)
    assert float(rows["icarl"]["avg_incremental_acc_std"]) == pytest.approx(math.sqrt(50))
    assert rows["lwf"]["avg_incremental_acc_std"] == "" and rows["lwf"]["avg_incremental_acc_nme_mean"] == ""
    assert float(rows["lwf"]["memory_bytes_mean"]) == 0 and rows["icarl"]["runs"] == "2"
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # the same method twice: rows named by directory; --labels names them
    lwf2 = write_run(tmp_path / "lwf-other", hand_metrics([100.0, 30.0]), "lwf")
    code, stdout, _ = run_cli(capsys, "compare", lwf, lwf2, "--out", tmp_path / "c2")
    assert code == 0 and "| lwf (lwf-run) | 1 |" in stdout and "| lwf (lwf-other) | 1 |" in stdout
    code, stdout, _ = run_cli(capsys, "compare", lwf, lwf2, "--labels", "a,b", "--out", tmp_path / "c3")
    assert code == 0 and "| a | 1 | 55.00 |" in stdout and "| b | 1 | 65.00 |" in stdout


def test_compare_refuses_other_data_sets_and_notes_other_protocols(tmp_path, capsys):
    a = write_run(tmp_path / "a", hand_metrics([100.0, 50.0]))
    fm = write_run(tmp_path / "fm", hand_metrics([100.0, 60.0]), dataset="fashion-mnist")
    inc = write_run(tmp_path / "inc", hand_metrics([100.0, 70.0]), increment=1)
    code, _, err = run_cli(capsys, "compare", a, fm, "--out", tmp_path / "c1")
    assert code == 2 and "different data sets" in err and "fashion-mnist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c1").exists()
    code, _, err = run_cli(capsys, "compare", a, fm, "--allow-mixed", "--out", tmp_path / "c2")
    assert code == 0 and "warning: data set differs: digits" in err
    assert "Note: data set differs: digits" in (tmp_path / "c2" / "compare.md").read_text()
    code, _, err = run_cli(capsys, "compare", a, inc, "--out", tmp_path / "c3")     # same data, other scenario
    assert code == 0 and "warning: increment differs: 2" in err and "1 (" in err
    assert "Note: increment differs" in (tmp_path / "c3" / "compare.md").read_text()
    code, _, err = run_cli(capsys, "compare", a, a, "--out", tmp_path / "c4")
    assert code == 0 and "warning" not in err
    # the comparison directory is read back: by compare (its rows) and by report (rows elsewhere: absolute paths)
    code, stdout, err = run_cli(capsys, "compare", tmp_path / "c3", "--out", tmp_path / "c5")
    assert code == 0 and stdout.count("| icarl (") == 2, stdout
    code, _, err = run_cli(capsys, "report", tmp_path / "c3")
    page = (tmp_path / "c3" / "report.html").read_text()
    assert code == 0 and 'data-section="comparison"' in page and 'id="run1-summary"' in page
    assert "Note: increment differs" in page
    # several directories without --html: report.html in their common parent
    code, stdout, err = run_cli(capsys, "report", a, inc)
    assert code == 0 and (tmp_path / "report.html").is_file() and str(tmp_path / "report.html") in stdout


def _bad_cases(tmp_path):
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("method: icarl\n")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "metrics.json").write_text('{"avg_incremental_acc": 5,')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text('{"accuracy": 5}')
    return {
        "unknown dir": (["compare", tmp_path / "nope"], "nope: no such run directory"),
        "no metrics.json": (["compare", tmp_path / "unfinished"], "no metrics.json"),
        "corrupt json": (["compare", tmp_path / "corrupt"], "corrupt/metrics.json: not valid JSON"),
        "wrong keys": (["report", tmp_path / "other"], "other/metrics.json: not a cilearn metrics file"),
        "report unknown dir": (["report", tmp_path / "nope"], "nope: no such run directory"),
        "seeds not integers": (["run", "--seeds", "1993,x", "--out", tmp_path / "s"], "--seeds expects"),
        "seed and seeds": (["run", "--seeds", "1,2", "--seed", "3", "--out", tmp_path / "s"], "--seed and --seeds"),
        "num-seeds zero": (["run", "--num-seeds", "0", "--out", tmp_path / "s"], "--num-seeds must be"),
        "compare nothing": (["compare"], "needs run directories"),
        "compare both": (["compare", tmp_path / "x", "--methods", "lwf"], "not both"),
        "unknown method": (["compare", "--methods", "lwf,nosuch", "--out", tmp_path / "s"], "nosuch"),
        "run flag with dirs": (["compare", tmp_path / "x", "--epochs", "2"], "--epochs is a run flag"),
    }


BAD_CASES = ["unknown dir", "no metrics.json", "corrupt json", "wrong keys", "report unknown dir", "seeds not integers",
             "seed and seeds", "num-seeds zero", "compare nothing", "compare both", "unknown method",
             "run flag with dirs"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_exit_2(case, tmp_path, capsys):
    args, expected = _bad_cases(tmp_path)[case]
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (out, err)
    assert err.startswith("cilearn: error:") and len(err.strip().splitlines()) == 1 and expected in err, err
    assert "Traceback" not in err and not (tmp_path / "s").exists()


# ---------------------------------------------------------------- HTML report
def _tiny_png(path, colour=(200, 30, 30)):
    from PIL import Image
    Image.new("RGB", (12, 8), colour).save(path)


def _sections(page):
    """{data-section: that section's HTML} of the first run."""
    out = {}
    for s in SECTIONS:
        m = re.search(rf'<section id="run0-{s.key}" data-section="{s.key}">(.*?)</section>', page, re.S)
        assert m, f"section {s.key} missing"
        out[s.key] = m.group(1)
    return out


def test_html_report_has_every_section_and_an_img_per_plot(tmp_path, capsys):
    d = write_run(tmp_path / "run", hand_metrics([100.0, 70.0, 50.0], nme=[100.0, 80.0, 70.0]))
    _tiny_png(d / "attention-phase1.png")
    _tiny_png(d / "tsne-phase0.png")
    _tiny_png(d / "tsne-phase2.png")
    code, stdout, err = run_cli(capsys, "report", d)
    assert code == 0, err
    page = (d / "report.html").read_text()
    assert "<title>cilearn report: icarl on digits</title>" in page
    sec = _sections(page)
    imgs = {k: len(re.findall(r"<img ", v)) for k, v in sec.items()}
    assert imgs == {"config": 0, "summary": 0, "accuracy": 1, "matrix": 1, "forgetting": 1, "classes": 0, "old-new": 1,
                    "confusion": 1, "memory": 1, "timings": 1, "pictures": 3}
    # per class (no class_names in these metrics: the labels stand in): class 0 (label 5) learned in phase 0
    # at 100, 80 after phase 2: forgetting 20; class 5 (label 0), learned last, has none
    assert "<tr><td>0</td><td>5</td><td>5</td><td>0</td><td>100.00</td><td>80.00</td><td>20.00</td></tr>" in sec["classes"]
    assert "<tr><td>5</td><td>0</td><td>0</td><td>2</td><td>100.00</td><td>100.00</td><td>-</td></tr>" in sec["classes"]
    assert "method: icarl" in sec["config"] and "<td>avg inc. acc</td><td>73.33</td>" in sec["summary"]
    assert sec["pictures"].index("tsne-phase0.png") < sec["pictures"].index("tsne-phase2.png")
    # every image is an inlined PNG that decodes; nothing is fetched from elsewhere
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) == 10
    from PIL import Image
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not re.search(r"(src|href)=\"(?!data:|#)", page) and "<link" not in page and "@import" not in page
    assert "default-src 'none'" in page
    # an old run without per-class data still gets every section, with a note instead of the plot
    old = hand_metrics([100.0, 60.0])
    for r in old["phases"]:
        del r["per_class_acc"]
    del old["confusion"], old["memory"]["class_images"]
    o = write_run(tmp_path / "old", old)
    sec = _sections(html_report([o], tmp_path / "old.html").read_text())
    assert "<img" not in sec["forgetting"] + sec["confusion"] + sec["memory"] and "not available" in sec["confusion"]
    # several directories: a comparison section first, then one section per run
    page = html_report([d, o], tmp_path / "both.html").read_text()
    assert 'data-section="comparison"' in page and 'id="run1-timings"' in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _render(html_path, tmp_path):
    """Headless Chromium, no network: the DOM after the page's scripts ran."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--disable-background-networking", "--disable-extensions",
                           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=10000", "--dump-dom", html_path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium); "
                                             ".ci/run installs it")
def test_report_renders_in_headless_chromium(tmp_path):
    d = write_run(tmp_path / "run", hand_metrics([100.0, 70.0, 50.0]))
    _tiny_png(d / "samples-phase1.png")
    path = html_report([d], tmp_path / "report.html")
    dom = _render(path, tmp_path)
    assert "<title>cilearn report: icarl on digits</title>" in dom
    n = len(re.findall(r"<img ", path.read_text()))
    assert n == 8 and f'data-images="{n}/{n}"' in dom        # every image decoded
    # the check can fail: a corrupt image is reported as not decoded
    page = path.read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAA", 1))
    assert f'data-images="{n - 1}/{n}"' in _render(broken, tmp_path)


# ---------------------------------------------------------------- list --configs
def test_list_configs_shows_the_papers_numbers(capsys):
    code, out, _ = run_cli(capsys, "list", "--configs")
    assert code == 0
    block = out.split("configs/icarl-cifar100-b0-inc10.yaml", 1)[1].split("\n\n")[0].splitlines()
    assert block[1].strip() == "icarl, cifar100 B0-Inc10, 2000 exemplars"
    assert block[2].strip() == ("paper: 64.1 average incremental accuracy (NME) "
                                "[Rebuffi et al., CVPR 2017, as quoted in METHODS.md]")
    assert "paper: 64.83 (CNN) / 64.48 (NME) average incremental accuracy (5 steps)" in out
    assert "paper: not known here" in out and "run one with: cilearn run --config FILE" in out
    code, md, _ = run_cli(capsys, "list", "--configs", "--markdown")
    assert code == 0 and md.startswith("| method | protocol | paper's number | command |")
    assert ("| `podnet` | cifar100 B50-Inc10, 20 exemplars per class | 64.83 (CNN) / 64.48 (NME) average incremental "
            "accuracy (5 steps) (Douillard et al., ECCV 2020, Table 1) | "
            "`cilearn run --config configs/podnet-cifar100-b50-inc10.yaml --data-dir DIR` |") in md
    assert "| `foster` | ImageNet-subset B0-Inc10, 2000 exemplars | 76.55," in md


# ---------------------------------------------------------------- tensorboard
def test_tensorboard_steps():
    assert epoch_step("phase 0", 0, 2, 30, 30) == ("train", 3)
    assert epoch_step("phase 2", 2, 0, 10, 30) == ("train", 41)              # 30 base + 10 of phase 1 + 1
    assert epoch_step("phase 2 balanced-ft", 2, 4, 20, 30) == ("balanced-ft", 25)


def test_tensorboard_missing_package_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # import fails as if not installed
    code, _, err = run_cli(capsys, "run", "--tensorboard", "--epochs", "1", "--out", tmp_path / "r", "--no-progress")
    assert code == 2 and "pip install tensorboard" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- real runs (digits, 1 epoch)
def test_seeds_run_writes_per_class_metrics_summary_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, err = run_cli(capsys, "run", "--method", "icarl", "--num-seeds", "2", "--epochs", "1",
                                "--tensorboard", "--out", out, "--no-progress")
    assert code == 0, err
    runs = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (1993, 1)]
    s = json.loads((out / "summary.json").read_text())
    assert s["seeds"] == [1993, 1] and "2 seeds: average incremental accuracy" in stdout
    avg = [m["avg_incremental_acc"] for m in runs]
    assert s["metrics"]["avg_incremental_acc"]["mean"] == pytest.approx(sum(avg) / 2)
    assert s["metrics"]["avg_incremental_acc"]["std"] == pytest.approx(abs(avg[0] - avg[1]) / math.sqrt(2))
    m = runs[0]
    assert [len(r["per_class_acc"]) for r in m["phases"]] == [2, 4, 6, 8, 10]
    conf = torch.tensor(m["confusion"])
    assert conf.shape == (10, 10) and int(conf.sum()) == 450                 # every test image once
    assert 100.0 * float(conf.diag().sum()) / 450 == pytest.approx(m["last_acc"])
    rows = conf.sum(1).clamp_min(1)
    assert (100.0 * conf.diag() / rows).tolist() == pytest.approx(m["phases"][-1]["per_class_acc"])
    assert sum(m["memory"]["class_images"]) == m["memory"]["total_images"] == 200
    assert sum(m["memory"]["class_bytes"]) == m["memory"]["total_bytes"]
    assert sorted(m["class_order"]) == list(range(10)) and "confusion" not in m["phases"][-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out / "seed-1993" / "tensorboard"))
    ea.Reload()
    assert [e.value for e in ea.Scalars("phase/acc")] == pytest.approx([r["acc"] for r in m["phases"]])
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4, 5]    # one epoch per phase
    # the seed directory's report: every section of both runs and the comparison
    page = html_report([out], tmp_path / "r.html").read_text()
    assert all(f'id="run{i}-{sec.key}"' in page for i in (0, 1) for sec in SECTIONS)


def test_compare_methods_runs_and_tabulates(tmp_path, capsys):
    out = tmp_path / "c"
    code, stdout, err = run_cli(capsys, "compare", "--methods", "finetune,lwf", "--epochs", "1", "--out", out,
                                "--no-progress", "--quiet")
    assert code == 0, err
    md = (out / "compare.md").read_text()
    for method in ("finetune", "lwf"):
        m = json.loads((out / method / "metrics.json").read_text())
        assert m["phases"] and f"| {method} | 1 | {m['avg_incremental_acc']:.2f} |" in md
    assert (out / "compare.png").stat().st_size > 0
    assert json.loads((out / "compare.json").read_text())["rows"] == [{"label": "finetune", "path": "finetune"},
                                                                      {"label": "lwf", "path": "lwf"}]
    code, _, err = run_cli(capsys, "compare", "--methods", "finetune,lwf", "--epochs", "1", "--out", out)
    assert code == 2 and "already holds a run" in err                      # nothing is overwritten
    code, stdout, err = run_cli(capsys, "report", out)                     # cilearn report reads what compare wrote
    page = (out / "report.html").read_text()
    assert code == 0 and 'data-section="comparison"' in page
    assert "<title>cilearn report: finetune, lwf on digits" in page
    assert all(f'id="run{i}-{sec.key}"' in page for i in (0, 1) for sec in SECTIONS)
