"""The image-folder cache (parallel decode into a memory-mapped uint8 file) and host-resident data
(``--data.resident host``: rows fetched per batch), on tiny folders written with Pillow."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cilearn.cli import main
from cilearn.data import image_cache
from cilearn.data import imagefolder as imf
from cilearn.data.base import DataOptions
from cilearn.data.datasets import load_dataset
from cilearn.data.rows import HostRows, choose_resident

RNG = np.random.default_rng(7)


def save(path, arr, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def imagenet_like(root, classes=("n01", "n02", "n03"), n_train=4, n_val=2):
    """ImageNet-subset's train/<wnid>/*.JPEG + val/<wnid>/*.JPEG layout, PNG-coded (lossless) images
    of assorted sizes and modes, so a reference decode is exact."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            for i in range(n):
                h, w = int(RNG.integers(9, 30)), int(RNG.integers(9, 30))
                arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
                save(root / split / c / f"{c}_{i}.JPEG", arr if i % 3 else arr[..., 0], fmt="PNG")


def food_like(root, classes=("apple_pie", "baklava"), n=3):
    """Food-101's images/<class>/<id>.jpg + meta/{train,test,classes}.txt, real JPEGs."""
    lines = {"train": [], "test": []}
    for c in classes:
        for i in range(n):
            save(root / "images" / c / f"{100 + i}.jpg", RNG.integers(0, 256, (20, 14, 3), dtype=np.uint8), "JPEG")
            lines["train" if i < n - 1 else "test"].append(f"{c}/{100 + i}")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    for split, ls in lines.items():
        (root / "meta" / f"{split}.txt").write_text("\n".join(ls) + "\n")
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")


def reference(path, size):
    """An independent decode: RGB, bilinear resize of the short side to ``size``, centre crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        nw, nh = (size, max(size, round(h * size / w))) if w <= h else (max(size, round(w * size / h)), size)
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def load(root, cache, size=12, workers=1):
    return load_dataset("imagefolder", DataOptions(data_dir=str(root), cache_dir=str(cache),
                                                   image_size=size, workers=workers))


def listed(folder):
    return sorted(os.listdir(folder))


def test_cache_equals_direct_decode_and_parallel_equals_serial(tmp_path):
    imagenet_like(tmp_path / "in")
    one = load(tmp_path / "in", tmp_path / "c1", workers=1)
    two = load(tmp_path / "in", tmp_path / "c2", workers=2)
    files = [p for split in ("train", "val") for c in one.class_names
             for p in sorted((tmp_path / "in" / split / c).iterdir())]
    rows = torch.cat([one.train_x, one.test_x])
    assert rows.shape == (len(files), 3, 12, 12)
    for i, p in enumerate(files):                                   # PNG: exact
        assert np.array_equal(rows[i].numpy(), reference(p, 12)), p
    a = open(one.info["cache"], "rb").read()
    assert a == open(two.info["cache"], "rb").read() and len(a) == len(files) * 3 * 12 * 12
    index = json.loads(open(two.info["cache_index"]).read())
    assert index["version"] == imf.CACHE_VERSION and index["order"] == "NCHW"
    assert index["train_labels"] == one.train_y.tolist() and index["test"] == len(one.test_y)
    # Food-101 layout, real JPEGs: the cache holds exactly decode_image's output (JPEG draft mode
    # makes it differ from a full decode by a few levels at most)
    food_like(tmp_path / "food")
    f1, f2 = load(tmp_path / "food", tmp_path / "c1", 8, 1), load(tmp_path / "food", tmp_path / "c2", 8, 2)
    assert torch.equal(f1.train_x, f2.train_x) and torch.equal(f1.test_x, f2.test_x)
    for i, it in enumerate(["apple_pie/100", "apple_pie/101", "baklava/100", "baklava/101"]):
        p = str(tmp_path / "food" / "images" / f"{it}.jpg")
        assert np.array_equal(f1.train_x[i].numpy(), imf.decode_image(p, 8))
        assert np.abs(f1.train_x[i].numpy().astype(int) - reference(p, 8)).mean() < 8


def test_cache_reused_then_rebuilt_in_place(tmp_path, monkeypatch):
    imagenet_like(tmp_path / "in", n_train=2, n_val=1)
    first = load(tmp_path / "in", tmp_path / "c", workers=2)
    stamp = os.stat(first.info["cache"]).st_mtime_ns
    names = listed(tmp_path / "c")
    assert first.info["cache_hit"] is False and len(names) == 2   # .u8 + .json

    def boom(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_cache, "_decode_rows", boom)
    second = load(tmp_path / "in", tmp_path / "c", workers=2)
    assert second.info["cache_hit"] is True and os.stat(second.info["cache"]).st_mtime_ns == stamp
    assert torch.equal(second.train_x, first.train_x) and torch.equal(second.test_y, first.test_y)
    monkeypatch.undo()
    save(tmp_path / "in" / "train" / "n02" / "n02_9.JPEG", RNG.integers(0, 256, (12, 12, 3), dtype=np.uint8), "PNG")
    third = load(tmp_path / "in", tmp_path / "c", workers=2)
    assert third.info["cache_hit"] is False and len(third.train_x) == len(first.train_x) + 1
    assert listed(tmp_path / "c") == names                        # same names, rebuilt in place, no .tmp-*
    assert torch.equal(third.train_x[:2], first.train_x[:2])
    assert np.array_equal(third.train_x[4].numpy(), reference(tmp_path / "in" / "train" / "n02" / "n02_9.JPEG", 12))


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_image_exit_2_no_cache(tmp_path, capsys, workers):
    imagenet_like(tmp_path / "in", n_train=3, n_val=1)
    bad = tmp_path / "in" / "train" / "n02" / "n02_1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(["run", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "in"), "--image-size", "8",
                 "--data.cache-dir", str(tmp_path / "c"), "--data.workers", str(workers), "--increment", "1",
                 "--out", str(tmp_path / "run"), "--no-progress", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(bad) in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert listed(tmp_path / "c") == [] and not (tmp_path / "run").exists()


def test_bad_options_exit_2(tmp_path, capsys):
    imagenet_like(tmp_path / "in", n_train=1, n_val=1)
    common = ["run", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "in"), "--out", str(tmp_path / "r")]
    for flag, value, needle in (("--data.workers", "0", "--data.workers"),
                                ("--data.resident", "disk", "--data.resident")):
        assert main([*common, flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "r")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [
    (["--increment", "2"], "--increment 2"),                      # 3 classes: the phases do not cover them
    (["--increment", "1", "--memory", "2"], "--memory 2"),        # fewer exemplars than classes
    (["--increment", "1", "--loss.nca-margin", "0.3"], "--loss.nca-margin"),   # an option the run does not use
    (["--increment", "1", "--augment", "nosuch"], "nosuch"),
])
def test_a_refused_configuration_writes_no_cache(tmp_path, capsys, flags, needle):
    """Everything that can be checked is checked before an image folder's cache is built: a refused
    configuration leaves neither the default cache (DATA/.cilearn-cache) nor the run directory."""
    imagenet_like(tmp_path / "in", n_train=2, n_val=1)
    code = main(["run", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "in"), "--image-size", "8",
                 "--data.workers", "1", "--out", str(tmp_path / "run"), "--no-progress", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert listed(tmp_path / "in") == ["train", "val"] and not (tmp_path / "run").exists()
    load_dataset("imagefolder", DataOptions(data_dir=str(tmp_path / "in"), image_size=8, workers=1))
    assert ".cilearn-cache" in listed(tmp_path / "in")             # where the run would have written it


def test_host_rows_views_and_fetch():
    base = torch.arange(10 * 2 * 2 * 2, dtype=torch.uint8).view(10, 2, 2, 2)
    extra = torch.full((3, 2, 2, 2), 200, dtype=torch.uint8)
    h = HostRows(base, "cpu")
    mask = torch.tensor([i % 3 == 0 for i in range(10)])
    v = h[mask]                                             # rows 0 3 6 9, nothing read
    assert isinstance(v, HostRows) and v.shape == (4, 2, 2, 2) and len(v) == 4
    both = torch.cat([v, extra])                            # lazy, like training_set's exemplars
    assert isinstance(both, HostRows)
    want = torch.cat([base[mask], extra])
    assert torch.equal(both.materialize(), want)
    idx = torch.tensor([6, 0, 5, 4])
    assert torch.equal(both.fetch(idx), want[idx])
    assert torch.equal(both[2:5].float(), want[2:5].float())   # a Tensor method materialises
    assert torch.equal(torch.flip(both[idx], (3,)), want[idx].flip(3))
    assert torch.equal(torch.cat([both[idx], v]).materialize(), torch.cat([want[idx], base[mask]]))
    assert choose_resident("host", 1, torch.device("cpu")) == "host"
    assert choose_resident("auto", 1, torch.device("cpu")) == "device"
    assert choose_resident("auto", 1 << 60, torch.device("cpu")) == "host"


def test_host_resident_run_equals_device_resident(tmp_path):
    import cilearn
    from cilearn.config import RunConfig

    imagenet_like(tmp_path / "in", classes=("a", "b", "c", "d"), n_train=6, n_val=3)
    metrics = {}
    for mode in ("device", "host"):
        cfg = RunConfig(method="icarl", seed=3, out=str(tmp_path / mode))
        cfg.data.dataset, cfg.data.data_dir, cfg.data.image_size = "imagefolder", str(tmp_path / "in"), 8
        cfg.data.cache_dir, cfg.data.workers, cfg.data.resident = str(tmp_path / "c"), 1, mode
        cfg.scenario.increment, cfg.memory.total = 2, 8
        cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = 2, 8, False
        cilearn.run(cfg, echo=False)
        metrics[mode] = json.loads((tmp_path / mode / "metrics.json").read_text())
        assert f"resident: {mode}" in (tmp_path / mode / "config.yaml").read_text()
        mem = metrics[mode]["memory"]           # exemplars are stored as uint8 images: 1 byte a pixel
        assert mem["total_images"] == 8 and mem["total_bytes"] == 8 * 3 * 8 * 8

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if "second" not in k and "per_s" not in k}
        return [strip(v) for v in d] if isinstance(d, list) else d

    assert strip(metrics["host"]) == strip(metrics["device"])


def test_image_folder_class_names_in_metrics_banner_table_and_report(tmp_path, capsys):
    """The folder's class names, not only ids: ``metrics.json``'s ``class_names`` (incremental id
    order, matching ``class_order``), the scenario lines and the per-phase table of the banner, and
    the report's per-class table."""
    imagenet_like(tmp_path / "in", classes=("cat", "dog", "emu"), n_train=2, n_val=1)
    out = tmp_path / "run"
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "in"), "--image-size", "8",
                 "--data.workers", "1", "--increment", "1", "--epochs", "1", "--backbone", "convnet",
                 "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    log = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    folders = ["cat", "dog", "emu"]
    assert sorted(m["class_order"]) == [0, 1, 2] and m["class_names"] == [folders[c] for c in m["class_order"]]
    for k, name in enumerate(m["class_names"]):
        assert f"phase {k}: 1 class (ids {k}-{k}): {name} ({m['class_order'][k]})" in log
        assert re.search(rf"^\s+{k}\s+{k + 1}\s.*  {name}$", log, re.M), log
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    for k, name in enumerate(m["class_names"]):
        assert f"<tr><td>{k}</td><td>{name}</td><td>{m['class_order'][k]}</td><td>{k}</td>" in page
