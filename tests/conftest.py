import os
import tempfile

import pytest

# Every run of the suite, in this process and in the subprocesses it starts (CLI, torchrun), is fp32
# where it says --precision auto: accuracy thresholds must hold on every CPU, and auto picks bf16 on
# CPUs with AVX512-BF16/AMX (numbers differ) and fp32 elsewhere. The bf16 path has its own tests
# (tests/test_precision.py), which ask for bf16 explicitly or unset this.
os.environ["CILEARN_PRECISION"] = "fp32"

# Under pytest-xdist (the README's test command runs one worker per CPU) each worker and the runs it
# starts compute on one thread: workers x threads stays at the CPU count, and a child process and the
# in-process run it is compared with use the same count (float sums depend on it; cilearn.threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("CILEARN_THREADS", "1")
    import torch
    torch.set_num_threads(1)

from cilearn.config import RunConfig, from_dict, resolve
from cilearn.methods import METHODS


def quick_config(tmp_path, **over) -> RunConfig:
    """A small digits run: the embedded data set, few epochs, no progress bars. The lr anneals to 0
    (cosine) whatever the recipe's schedule, so that 6 epochs end on a converged model: the tests
    check what components do, not the recipes' training defaults (tests/test_schedules.py does)."""
    d = {"method": "icarl", "out": str(tmp_path / "run"),
         "data": {"dataset": "digits"}, "scenario": {"base": 0, "increment": 2},
         "train": {"epochs": 6, "progress": False, "schedule": "cosine"}}
    for k, v in over.items():
        sect, _, key = k.partition("__")
        if key:
            d.setdefault(sect, {})[key] = v
        else:
            d[sect] = v
    if d.get("out", "") is None:   # out=None: a fresh directory of its own (not runs/ under the working
        d["out"] = tempfile.mkdtemp(prefix="run-", dir=tmp_path)   # directory, where two runs started in the same second collide)
    cfg = from_dict(RunConfig, d)
    if cfg.data.dataset == "digits":   # resolved as cilearn.run resolves it (10 classes, 8x8): tests build
        cfg = resolve(cfg, 10, 8, METHODS.get(cfg.method).training)   # a Context from it directly too
    return cfg


# a tiny random timm ViT (one block of width 32 on 16 px inputs: the digits resized and repeated to
# 3 channels), for the recipes whose adapter needs a vision transformer (APER's, EASE)
TINY_VIT = {"backbone": "timm:vit_tiny_patch16_224", "weights": "random", "img_size": 16, "patch_size": 8, "depth": 1,
            "embed_dim": 32, "num_heads": 2}

# DualPrompt's prompts go in blocks 0-4 (G-prompt 0-1, E-prompts 2-4): a ViT of 5 blocks
VIT_OVER = {"dualprompt": {"depth": 5}}


def backbone_for(method: str) -> dict:
    """``{"model": TINY_VIT}`` for a recipe whose adapter needs a vision transformer (the test is
    skipped where timm cannot be imported), else ``{}`` (the data set's own backbone)."""
    from cilearn.components import REGISTRIES
    adapter = METHODS.get(method).adapter
    if adapter is None or not REGISTRIES["adapter"].get(adapter).needs_vit:
        return {}
    pytest.importorskip("timm")
    return {"model": {**TINY_VIT, **VIT_OVER.get(adapter, {})}}


def replayed_and_resumed(ref, tmp_path, monkeypatch) -> tuple[list, list]:
    """The accuracy matrices of the finished run ``ref`` (a run directory) replayed from its
    config.yaml, and of the same configuration stopped right after phase 0's checkpoint (SIGTERM)
    and resumed."""
    import json

    import yaml

    import cilearn
    from cilearn.checkpoint import Checkpointer, Interrupted
    from cilearn.cli import main
    from cilearn.prepare import config_from_dict

    replay = tmp_path / "replayed"
    assert main(["run", "--config", str(ref / "config.yaml"), "--out", str(replay), "--quiet"]) == 0
    real = Checkpointer.save_phase

    def save_phase(self, state):
        real(self, state)
        if state["next_phase"] == 1:
            self.stop_signal = 15
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "save_phase", save_phase)
        with pytest.raises(Interrupted):
            cilearn.run(config_from_dict(yaml.safe_load((ref / "config.yaml").read_text()) | {"out": str(stopped)}),
                        echo=False)
    return (json.loads((replay / "metrics.json").read_text())["accuracy_matrix"],
            cilearn.resume(stopped, echo=False).metrics["accuracy_matrix"])


@pytest.fixture
def quick(tmp_path):
    return lambda **over: quick_config(tmp_path, **over)


@pytest.fixture(autouse=True)
def _recipes_unchanged():
    """A test that registers a recipe removes it again: the README's tables, the docs' schedule table
    and the registry walks of later tests see the shipped recipes only."""
    before = METHODS.names()
    yield
    assert METHODS.names() == before, f"a test left recipes registered: {set(METHODS.names()) - set(before)}"


# The files that take longest (torchrun, real data, signals, every recipe end to end) are handed to
# the xdist workers first, so that no worker is left alone with one of them at the end.
FIRST = ("test_distributed.py", "test_real_data.py", "test_reliability.py", "test_methods.py", "test_mnemonics.py",
         "test_resume_every_recipe.py", "test_podnet.py", "test_compress.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))     # stable: the rest keep their order
