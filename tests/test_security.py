"""Inputs from others never run code: CIFAR pickles, checkpoints, YAML configs, image caches and
image files are parsed; anything else is refused with one line naming the file, exit code 2, and
nothing half-written."""
from __future__ import annotations

import builtins
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from cilearn.checkpoint import PHASE_FILE, load_checkpoint, save_checkpoint
from cilearn.cli import main
from cilearn.data import safe_pickle
from test_datasets import cifar_batch, dump, write_cifar10


def cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


class Payload:
    """Pickles as a call of ``fn(*args)``: what a hostile file would hold."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def hostile_payloads(marker):
    """Three ways a pickle can run code that creates ``marker``: a shell command, a builtin, and an
    object array whose element is such a call (numpy's reconstruction with dtype 'O')."""
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
        "object-array": np.array([Payload(builtins.open, str(marker), "w")], dtype=object),
    }


# ------------------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("kind", ["os.system", "builtins.open", "object-array"])
@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta"])
def test_hostile_cifar_pickle_is_refused_before_it_runs(tmp_path, capsys, kind, where):
    d, _ = write_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    batch = cifar_batch(3, 10)
    batch[b"data"] = hostile_payloads(marker)[kind]   # in place of the images, or of the meta file
    dump(d / where, batch if where != "batches.meta" else {b"label_names": batch[b"data"]})
    out = tmp_path / "run"
    code, err = cli(capsys, "run", "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--out", out, "--quiet")
    assert not marker.exists()                      # the payload never ran
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(d / where) in err and "refused without running it" in err
    assert {"os.system": "system", "builtins.open": "open", "object-array": "numpy.dtype('O8')"}[kind] in err
    assert not out.exists()                         # nothing written


def python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch as Python 2's cPickle (protocol 2) writes it, opcode by opcode: str keys as
    byte strings, the array through ``numpy.core.multiarray._reconstruct`` and ``numpy.dtype``
    with a Python 2 str payload (the layout of the official ``cifar-10-batches-py`` files)."""
    def s(b: bytes) -> bytes:                       # SHORT_BINSTRING / BINSTRING (py2 str)
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"M" + struct.pack("<H", v)
    arr = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
           + b"(" + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86"
           + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
           + b"(" + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xff" + b"J\xff\xff\xff\xff" + i(0) + b"tb"
           + b"\x89" + s(data.tobytes()) + b"tb")
    lab = b"](" + b"".join(i(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 1 of 5") + s(b"labels") + lab
            + s(b"data") + arr + s(b"filenames") + b"](" + s(b"a.png") * len(labels) + b"eu.")


def test_python2_release_pickle_and_python3_repickles_load(tmp_path):
    rng = np.random.default_rng(0)
    data, labels = rng.integers(0, 256, (3, 3072), dtype=np.uint8), [1, 0, 9]
    got = safe_pickle.load(python2_cifar_pickle(data, labels))
    assert got[b"labels"] == labels and got[b"batch_label"] == b"training batch 1 of 5"
    assert got[b"data"].dtype == np.uint8 and np.array_equal(got[b"data"], data)
    obj = {b"data": data, b"labels": labels, b"filenames": [b"x"] * 3, "str key": np.float32(1.5),
           b"coarse": np.array(labels, dtype=np.int64)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        back = safe_pickle.load(pickle.dumps(obj, protocol=protocol))
        assert np.array_equal(back[b"data"], data) and back[b"labels"] == labels and back["str key"] == 1.5
        assert back[b"coarse"].dtype == np.int64
    # the whole loader on the Python 2 files
    from cilearn.data import datasets as ds
    from cilearn.data.base import DataOptions
    d, _ = write_cifar10(tmp_path)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(python2_cifar_pickle(data, labels))
    out = ds.load_dataset("cifar10", DataOptions(data_dir=str(tmp_path)))
    assert out.train_x.shape == (15, 3, 32, 32) and out.test_y.tolist() == labels


# -------------------------------------------------------------------------------- checkpoints

@pytest.fixture
def unfinished_run(tmp_path, capsys):
    """A finished 2-phase digits run with metrics.json removed: resumable from its phase checkpoint."""
    out = tmp_path / "r"
    assert cli(capsys, "run", "--base", "8", "--epochs", "1", "--precision", "fp32", "--out", out,
               "--no-progress", "--quiet", "--keep-checkpoint")[0] == 0
    (out / "metrics.json").unlink()
    state = torch.load(io.BytesIO((out / PHASE_FILE).read_bytes()[48:]), weights_only=True)
    state["next_phase"] = 1
    save_checkpoint(out / PHASE_FILE, state)
    return out, state


@pytest.mark.parametrize("kind", ["os.system", "builtins.open"])
def test_hostile_checkpoint_with_valid_checksum_is_refused(unfinished_run, tmp_path, capsys, kind):
    out, state = unfinished_run
    marker = tmp_path / "pwned"
    save_checkpoint(out / PHASE_FILE, {**state, "rows": [hostile_payloads(marker)[kind]]})  # header + SHA-256 valid
    code, err = cli(capsys, "run", "--resume", out)
    assert not marker.exists()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(out / PHASE_FILE) in err and "refused without running it" in err
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("change, expect", [
    (lambda st: st.pop("num_classes"), "key 'num_classes' is missing"),
    (lambda st: st.update(next_phase="1"), "key 'next_phase' is a str"),
    (lambda st: st["rng"].pop("gen"), "key 'rng.gen' is missing"),
    (lambda st: st.update(kind="epoch"), "its kind is 'epoch'"),
    (lambda st: st["net"].update({k: torch.zeros(3) for k in list(st["net"])[:1]}), "does not fit this run"),
    (lambda st: st.update(memory={"exemplars": {0: "not a tensor"}}), "does not fit this run"),
])
def test_checkpoint_with_wrong_structure_is_one_line(unfinished_run, capsys, change, expect):
    out, state = unfinished_run
    change(state)
    save_checkpoint(out / PHASE_FILE, state)
    code, err = cli(capsys, "run", "--resume", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(out / PHASE_FILE) in err and expect in err
    assert not (out / "metrics.json").exists()


def test_load_checkpoint_refuses_foreign_globals(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "c.pt"
    save_checkpoint(f, {"a": Payload(os.system, f"touch {marker}")})
    with pytest.raises(Exception, match="refused without running it"):
        load_checkpoint(f)
    assert not marker.exists()


# ------------------------------------------------------------------------------ YAML, images

def test_yaml_config_tags_do_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'method: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, err = cli(capsys, "run", "--config", cfg, "--out", tmp_path / "r")
    assert not marker.exists() and code == 2 and len(err.strip().splitlines()) == 1 and str(cfg) in err
    assert not (tmp_path / "r").exists()


def test_image_over_the_decompression_bomb_limit_is_refused(tmp_path, monkeypatch):
    """Pillow's pixel limit (lowered here so that a small image exceeds it) is an error naming
    the file, for images up to twice the limit too (Pillow only warns there)."""
    from PIL import Image

    from cilearn.data import imagefolder as imf
    from cilearn.errors import DataError
    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)      # 900 pixels: between 1x and 2x the limit
    with pytest.raises(DataError, match="big.png.*decompression bomb"):
        imf.decode_image(str(p), 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)      # over 2x: Pillow's own error
    with pytest.raises(DataError, match="big.png.*decompression bomb"):
        imf.decode_image(str(p), 8)


def test_image_cache_index_labels_are_not_trusted(tmp_path):
    """The cache index's labels are never used: the listing's labels are (a tampered index with a
    valid key cannot put out-of-range labels into a run)."""
    import json

    from PIL import Image

    from cilearn.data import datasets as ds
    from cilearn.data.base import DataOptions
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "in" / split / c).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "in" / split / c / f"{k}.png")
    opts = DataOptions(data_dir=str(tmp_path / "in"), image_size=8, cache_dir=str(tmp_path / "cache"), workers=1)
    first = ds.load_dataset("imagefolder", opts)
    index_path = first.info["cache_index"]
    index = json.loads(open(index_path).read())
    index["train_labels"] = [7] * len(index["train_labels"])
    open(index_path, "w").write(json.dumps(index))
    again = ds.load_dataset("imagefolder", opts)
    assert again.info["cache_hit"] and again.train_y.tolist() == first.train_y.tolist() == [0, 0, 1, 1]
