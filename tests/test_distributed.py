"""Runs under torchrun (gloo, CPU): the rank-aware helpers of ``cilearn.distributed`` in two spawned
processes, and whole runs with ``torchrun --nproc_per_node=2`` against the single-process run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cilearn import distributed
from cilearn.checkpoint import EPOCH_FILE, CheckpointError, load_checkpoint

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available in this PyTorch build", allow_module_level=True)

# 5 phases of 2 digits classes, 12 epochs each, the lr annealed to 0 (cosine) so that each phase ends
# converged and the CNN accuracy is stable (iCaRL's own schedule keeps lr 0.1 at these epochs)
RUN = ["--increment", "2", "--epochs", "12", "--train.schedule", "cosine", "--no-progress", "--quiet"]


def test_shard_span_covers_the_batch_once_in_order():
    for n in (1, 5, 127, 128):
        for world in (1, 2, 3, 8):
            if n < world:
                continue
            spans = [distributed.shard_span(n, r, world) for r in range(world)]
            rows = [i for s in spans for i in range(n)[s]]
            assert rows == list(range(n))                       # contiguous, disjoint, complete
            sizes = [s.stop - s.start for s in spans]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert distributed.shard_span(10) == slice(0, 10)           # one process: everything


def test_single_process_helpers_are_identities():
    x = torch.arange(12.0).view(6, 2)
    assert distributed.gather_rows(lambda t: (t * 2,), x)[0].equal(x * 2)
    assert distributed.on_main(lambda: 7) == 7 and distributed.main_first(lambda: 8) == 8
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.digest([x]) == distributed.digest([x.clone()]) != distributed.digest([x + 1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_fit(perturb: bool) -> dict:
    """A BatchNorm-free model, crop-flip augmentation, 2 epochs of 100 images in batches of 32 (an
    uneven last batch of 4). ``perturb``: start from other weights (fit must begin from rank 0's)."""
    from cilearn.data.augment import Augmenter
    from cilearn.train import FitSettings, fit
    torch.manual_seed(0)
    data = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 3, (100,))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    if perturb:
        torch.nn.init.zeros_(net[1].weight)

    def loss(b):
        v = torch.nn.functional.cross_entropy(net(b.x), b.y)
        return v, {"ce": v.detach()}

    fr = fit(net, data, labels, loss, FitSettings(epochs=2, lr=0.1, batch_size=32, progress=False),
             Augmenter("crop-flip", 2, [0.5], [0.25], channels_last=False), torch.Generator().manual_seed(5))
    return {"fit_weight": net[1].weight.detach().clone(), "fit_loss": fr.loss, "images": fr.images}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """Runs in each spawned process: every helper, results written to ``out/rank<r>.pt``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from cilearn import distributed as d
    from cilearn.errors import ConfigError
    d.init()
    res = {"world": d.world_size(), "rank": d.rank(), "backend": d.backend()}
    # gather_rows: 7 rows over 2 ranks, each rank computes its part only
    x = torch.arange(7.0)[:, None].repeat(1, 3)
    res["gathered"] = d.gather_rows(lambda t: (t * 10, torch.full((len(t),), d.rank())), x)
    # on_main / main_first / any_rank / broadcasts
    res["on_main"] = d.on_main(lambda: f"from rank {d.rank()}")
    try:
        d.on_main(lambda: (_ for _ in ()).throw(ConfigError("--x is wrong")))
    except ConfigError as e:
        res["on_main_error"] = str(e)
    try:
        d.main_first(lambda: (_ for _ in ()).throw(ConfigError("rank 1 failed")) if d.rank() == 1 else 1)
    except ConfigError as e:
        res["main_first_error"] = str(e)
    res["any"] = d.any_rank(d.rank() == 1)
    res["tensors"] = d.broadcast_tensors({3: torch.full((2, 2), d.rank(), dtype=torch.uint8)} if d.rank() == 0 else {},
                                         torch.device("cpu"))
    res.update(_tiny_fit(perturb=d.rank() == 1))
    torch.save(res, Path(out) / f"rank{rank}.pt")
    d.shutdown()
    d.exit_process(0)       # as the CLI ends a torchrun rank (no interpreter finalization: see its docstring)


def test_helpers_and_fit_in_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["world"], r0["rank"], r1["rank"], r0["backend"]) == (2, 0, 1, "gloo")
    for r in (r0, r1):
        g, who = r["gathered"]
        assert g.equal(torch.arange(7.0)[:, None].repeat(1, 3) * 10)
        assert who.tolist() == [0, 0, 0, 0, 1, 1, 1]            # rank 0 computed rows 0-3, rank 1 rows 4-6
        assert r["on_main"] == "from rank 0"
        assert r["on_main_error"] == "--x is wrong"             # raised on every rank
        assert r["main_first_error"] == "rank 1 failed"
        assert r["any"] is True
        assert r["tensors"][3].tolist() == [[0, 0], [0, 0]] and r["tensors"][3].dtype == torch.uint8
        assert r["images"] == 200                               # global images, not per rank
    assert r0["fit_weight"].equal(r1["fit_weight"])             # identical weights on both ranks
    assert r0["fit_loss"] == r1["fit_loss"]                     # the global loss, reduced

    # the same fit in one process: the same weights up to float rounding (the gradient's sum order)
    one = _tiny_fit(perturb=False)
    assert torch.allclose(one["fit_weight"], r0["fit_weight"], atol=1e-5)
    assert one["fit_loss"]["ce"] == pytest.approx(r0["fit_loss"]["ce"], rel=1e-5)
    assert one["images"] == 200


# ---------------------------------------------------------------- whole runs under torchrun
def env() -> dict:
    src = str(Path(distributed.__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            "-m", "cilearn", "run", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same digits run in one process and with torchrun --nproc_per_node=2."""
    d = tmp_path_factory.mktemp("ddp")
    one = subprocess.run([sys.executable, "-m", "cilearn", "run", *RUN, "--out", str(d / "one")], env=env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    t0 = time.time()
    two = subprocess.run(torchrun(*RUN, "--out", str(d / "two")), env=env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    return d, two, time.time() - t0


def test_torchrun_two_processes_matches_one_process(runs):
    d, two, seconds = runs
    one_m = json.loads((d / "one" / "metrics.json").read_text())
    two_m = json.loads((d / "two" / "metrics.json").read_text())
    # outputs written once, by rank 0: one of each file, nothing rank-suffixed
    assert sorted(p.name for p in (d / "two").iterdir()) == sorted(p.name for p in (d / "one").iterdir())
    log = (d / "two" / "log.txt").read_text()
    assert log.count("average incremental accuracy") == 1 and "distributed: 2 processes (gloo)" in log
    assert two_m["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert "distributed" not in one_m
    # the exemplar memory: what each rank selected itself (from the gathered embeddings) and what it
    # holds after rank 0's broadcast, identical on both ranks in every phase; the model too
    for row in two_m["phases"]:
        ranks = row["ranks"]
        assert len(set(ranks["memory_own"])) == 1, ranks
        assert len(set(ranks["memory"])) == 1 and len(set(ranks["model"])) == 1, ranks
        assert ranks["memory"] == ranks["memory_own"]
    assert two_m["memory"]["total_images"] == one_m["memory"]["total_images"] == 200
    # accuracy: BatchNorm statistics are per rank (64 images) instead of 128, the only difference
    a, b = one_m["accuracy_matrix"], two_m["accuracy_matrix"]
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    assert sum(diffs) / len(diffs) <= 1.0, (a, b)               # mean over the matrix's 15 entries
    assert abs(one_m["avg_incremental_acc"] - two_m["avg_incremental_acc"]) <= 1.0
    assert abs(one_m["last_acc"] - two_m["last_acc"]) <= 1.0


def test_refusals_under_torchrun_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """What does not run distributed yet is refused before anything is written (checked without
    launching processes: WORLD_SIZE is what torchrun sets)."""
    from cilearn.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "init", lambda: None)       # no rendezvous: refused before any collective
    for args, option in ((["--method", "dfgr"], "replay component dfgr (method dfgr)"),
                         (["--replay", "dfgr"], "replay component dfgr (method icarl)"),
                         (["--seeds", "1,2"], "--seeds"), (["--device", "cuda:1"], None)):
        out = tmp_path / "r"
        code = main(["run", *args, "--out", str(out), "--quiet", "--no-progress"])
        err = capsys.readouterr().err
        if option is None and not torch.cuda.is_available():
            assert code == 2 and "no CUDA device" in err
            continue
        assert code == 2 and err.count("\n") == 1 and option in err and "torchrun" in err, err
        assert not out.exists()


def test_interrupted_torchrun_run_resumes_under_torchrun(runs, tmp_path):
    """SIGTERM to torchrun (as a scheduler's preemption): every rank stops at the same step, rank 0
    checkpoints; ``torchrun ... cilearn run --resume`` then finishes with the uninterrupted run's matrix."""
    d, _, _ = runs
    ref = json.loads((d / "two" / "metrics.json").read_text())["accuracy_matrix"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(*RUN, "--checkpoint-every", "1", "--out", str(out)), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while True:
        assert proc.poll() is None and time.time() - t0 < 200, "the run never reached phase 1"
        try:
            if (out / EPOCH_FILE).exists() and load_checkpoint(out / EPOCH_FILE)["phase"] == 1:
                break
        except CheckpointError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (out / "metrics.json").exists()
    assert "resume with: cilearn run --resume" in err
    res = subprocess.run(torchrun("--resume", str(out), "--no-progress", "--quiet"), env=env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["accuracy_matrix"] == ref
    assert "resumed" in (out / "log.txt").read_text()


def test_torchrun_image_folder_cache_built_once_and_host_rows(tmp_path):
    """Two processes on a tiny image folder: rank 0 builds the cache (2 decoding workers), rank 1
    reads it; the run with the images on the host (rows fetched per batch from the memory map)
    gives the device-resident run's accuracy matrix exactly, with identical memories on both ranks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("a", "b", "c", "d"):
            (tmp_path / "in" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "in" / split / c / f"{i}.png")
    common = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "in"), "--image-size", "8",
              "--data.cache-dir", str(tmp_path / "cache"), "--data.workers", "2", "--increment", "2",
              "--epochs", "2", "--batch-size", "8", "--memory", "8", "--no-progress", "--quiet"]
    metrics = {}
    for mode in ("host", "device"):
        res = subprocess.run(torchrun(*common, "--data.resident", mode, "--out", str(tmp_path / mode)), env=env(),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        metrics[mode] = json.loads((tmp_path / mode / "metrics.json").read_text())
        assert f"resident: {mode}" in (tmp_path / mode / "config.yaml").read_text()
        for row in metrics[mode]["phases"]:
            assert len(set(row["ranks"]["memory"])) == 1 and len(set(row["ranks"]["model"])) == 1
    assert len(os.listdir(tmp_path / "cache")) == 2          # one .u8 + one .json, no .tmp-*
    assert metrics["host"]["accuracy_matrix"] == metrics["device"]["accuracy_matrix"]


def one_and_two(run: list[str], tmp_path) -> tuple[dict, dict]:
    """The metrics of ``cilearn run *run`` in one process (``tmp_path/one``) and under torchrun with
    two (``tmp_path/two``)."""
    one = subprocess.run([sys.executable, "-m", "cilearn", "run", *run, "--out", str(tmp_path / "one")], env=env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(torchrun(*run, "--out", str(tmp_path / "two")), env=env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    return tuple(json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))


def test_torchrun_ranpac_statistics_sum_to_the_one_process_solution(tmp_path):
    """RanPAC under torchrun: each rank sums the Gram matrix and the class sums of its part of each
    phase's images, all-reduced in float64; lambda is chosen on every rank from the gathered
    embeddings. The ridge solution and the accuracies are those of one process (the sums' order
    differs: float rounding only)."""
    from safetensors.torch import load_file
    run = ["--method", "ranpac", "--increment", "2", "--epochs", "0", "--base-epochs", "0", "--precision", "fp32",
           "--components.freeze-backbone.after", "-1", "--components.ridge.dim", "64", "--no-progress", "--quiet"]
    try:        # on a tiny random timm ViT where timm is installed (the CI's), else on digits' convnet
        import timm  # noqa: F401
    except Exception:  # noqa: BLE001  (not installed, or its torchvision does not import)
        pass
    else:
        run += ["--backbone", "timm:vit_tiny_patch16_224", "--weights", "random", "--model.img-size", "16",
                "--model.patch-size", "8", "--model.depth", "1", "--model.embed-dim", "32", "--model.num-heads", "2"]
    m1, m2 = one_and_two(run, tmp_path)
    w1, w2 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert torch.equal(w1["net.head.projection"], w2["net.head.projection"])
    # float64 sums in another order, the solution stored in float32: equal up to its last bit (equal when measured)
    assert torch.allclose(w1["net.head.weight"], w2["net.head.weight"], rtol=1e-6, atol=0)
    assert [r["ridge_lambda"] for r in m1["phases"]] == [r["ridge_lambda"] for r in m2["phases"]]
    assert m1["accuracy_matrix"] == m2["accuracy_matrix"]
    for row in m2["phases"]:
        assert len(set(row["ranks"]["model"])) == 1


# (aper-finetune on the convnet also matched, within 3 points, when measured; left out of the suite for its time)
NO_DROPOUT = {"ease": ["--components.ease.dropout", "0"], "aper-adapter": ["--components.adaptformer.dropout", "0"]}


@pytest.mark.parametrize("method", ["ease", "aper-adapter", "simplecil", "l2p", "coda-prompt", "dualprompt"])
def test_torchrun_pretrained_recipes_match_one_process(method, tmp_path):
    """EASE's adapter sets, APER's first-phase adapter and SimpleCIL (no training: prototypes from
    the embeddings gathered from the ranks), on a tiny random timm ViT, under torchrun: every trained parameter
    reaches the loss (the prototype head trains none), the ranks hold one model, and the
    accuracies are the single process's: exactly on the ViT (no BatchNorm) with the adapters'
    dropout off (its masks are drawn per rank, as DDP does: with it on the runs differ by a few
    images); within a few points on the convnet (BatchNorm statistics per rank, as for every
    method) where timm is absent. L2P: its batch-wise prompt choice counts over the global batch.
    CODA-Prompt: each phase's slice drawn from the phase's generator, the same on every rank. DualPrompt:
    the phase's E-prompt in training."""
    from conftest import backbone_for
    vit = backbone_for(method).get("model", {})
    epochs = [] if method == "simplecil" else ["--base-epochs", "3", "--epochs", "3"]     # (simplecil: none to train)
    run = ["--method", method, "--base", "4", "--increment", "3", *epochs, "--train-per-class", "40",
           *NO_DROPOUT.get(method, []), "--precision", "fp32", "--no-progress", "--quiet",
           *[a for k, v in vit.items() for a in (f"--model.{k.replace('_', '-')}", str(v))]]
    m1, m2 = one_and_two(run, tmp_path)
    assert all(len(set(r["ranks"]["model"])) == 1 for r in m2["phases"])
    diffs = [abs(x - y) for ra, rb in zip(m1["accuracy_matrix"], m2["accuracy_matrix"]) for x, y in zip(ra, rb)]
    assert max(diffs) <= (0.0 if vit else 3.0), (m1["accuracy_matrix"], m2["accuracy_matrix"])
