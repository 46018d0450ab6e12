"""Mixed precision: which precision ``--precision auto`` picks, the ``CILEARN_PRECISION`` pin the
suite runs under (tests/conftest.py), and the bf16 path itself (it runs and gives numbers close to
fp32's). The rest of the suite asserts accuracies at fp32 only."""
import pytest
import torch

import cilearn
from cilearn.errors import ConfigError
from cilearn.prepare import PRECISION_ENV, cpu_has_fast_bf16, resolve_precision

CPU = torch.device("cpu")


def test_cpu_flags_that_make_bf16_fast():
    assert cpu_has_fast_bf16("flags : fpu sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni")
    assert cpu_has_fast_bf16("flags : avx2 amx_bf16 amx_tile")
    assert not cpu_has_fast_bf16("flags : fpu sse2 avx avx2 fma")                 # AVX2 only: ~10x slower
    assert not cpu_has_fast_bf16("flags : avx512f avx512_bf16x")                   # whole flags only


def test_auto_picks_bf16_only_where_it_is_fast(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV)
    import cilearn.prepare as runner
    monkeypatch.setattr(runner, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(runner, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", CPU) is None                                 # None: fp32
    assert resolve_precision("bf16", CPU) is torch.bfloat16 and resolve_precision("fp32", CPU) is None


def test_environment_pins_auto_only(monkeypatch, tmp_path, capsys):
    import cilearn.prepare as runner
    monkeypatch.setattr(runner, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert resolve_precision("auto", CPU) is torch.bfloat16
    assert resolve_precision("fp32", CPU) is None                                 # an explicit choice wins
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(ConfigError, match=PRECISION_ENV):
        resolve_precision("auto", CPU)
    from cilearn.cli import main
    assert main(["run", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert PRECISION_ENV in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_suite_runs_auto_as_fp32(quick):
    """What every accuracy threshold of the suite relies on (set in tests/conftest.py)."""
    res = cilearn.run(quick(train__epochs=1, out=None), echo=False)
    assert res.config.train.precision == "auto"
    import yaml
    assert yaml.safe_load((res.out_dir / "config.yaml").read_text())["meta"]["precision"] == "fp32"


def test_bf16_runs_and_is_close_to_fp32(quick, tmp_path):
    """The same digits run in bf16 autocast and fp32: both learn, and the average incremental
    accuracies agree within 3 points (measured 0.01 to 0.3 apart for icarl, lwf, finetune, lucir on
    an AVX512-BF16 CPU). bf16 is slow on AVX2-only CPUs, so the run is small."""
    out = {}
    for prec in ("bf16", "fp32"):
        res = cilearn.run(quick(train__precision=prec, out=str(tmp_path / prec)), echo=False)
        import yaml
        assert yaml.safe_load((res.out_dir / "config.yaml").read_text())["meta"]["precision"] == prec
        m = res.metrics
        assert m["accuracy_matrix"][0][0] > 90.0 and m["avg_incremental_acc_nme"] > 80.0, (prec, m["accuracy_matrix"])
        out[prec] = m["avg_incremental_acc"]
    assert abs(out["bf16"] - out["fp32"]) <= 3.0, out
