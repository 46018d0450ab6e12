"""The CPU threads of a run (cilearn.threads): the wait policy set before torch loads, the count
resolved, recorded and applied."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cilearn.cli import main
from cilearn.errors import ConfigError
from cilearn.threads import THREADS_ENV, default_threads, resolve_threads


def test_threads_resolution(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads("auto") == default_threads() >= 1
    assert resolve_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")                 # torchrun's per-process setting is followed
    assert resolve_threads("auto") == 2
    monkeypatch.setenv(THREADS_ENV, "1")                       # and cilearn's own pin before it
    assert resolve_threads("auto") == 1 and resolve_threads(4) == 4
    for bad in (0, -1, "two"):
        with pytest.raises(ConfigError, match="threads"):
            resolve_threads(bad)
    monkeypatch.setenv(THREADS_ENV, "none")
    with pytest.raises(ConfigError, match=THREADS_ENV):
        resolve_threads("auto")


def test_openmp_threads_sleep_when_waiting_unless_told_otherwise():
    code = "import os, cilearn; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "ACTIVE"


def test_a_run_records_and_uses_its_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        out = tmp_path / "r"
        assert main(["run", "--threads", "1", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
        assert torch.get_num_threads() == 1
        assert "  threads: 1\n" in (out / "config.yaml").read_text()
        assert json.loads((out / "metrics.json").read_text())["threads"] == 1
        assert main(["run", "--threads", "0", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
        assert "--threads must be a positive number" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    finally:
        torch.set_num_threads(before)
