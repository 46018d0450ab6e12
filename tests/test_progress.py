"""Progress output (cilearn.progress): bars only on a terminal unless forced; elsewhere the phase
table and one line per finished training stage, with no carriage-return refreshes."""
import re
import subprocess
import sys

import pytest
import yaml

from cilearn.cli import main

SMALL = ["--train-per-class", "20", "--epochs", "1", "--increment", "5", "--precision", "fp32"]
STAGE = re.compile(r"^  phase (\d): (\d+) epochs? in \d+\.\d s, last epoch's loss \d+\.\d{4}$", re.M)


def test_output_to_a_file_has_no_carriage_return_and_one_line_per_stage(tmp_path):
    """``cilearn run > run.log 2>&1``: what a batch scheduler's output file gets."""
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "cilearn", "run", "--epochs", "2", "--precision", "fp32",
                            "--train-per-class", "50", "--increment", "5", "--out", str(tmp_path / "r")],
                           stdout=f, stderr=f)
    text = log.read_text()
    assert p.returncode == 0, text
    assert "\r" not in text
    assert [(m[0], m[1]) for m in STAGE.findall(text)] == [("0", "2"), ("1", "2")], text
    assert text.index("phase classes") < text.index("  phase 0: 2 epochs")
    assert STAGE.findall((tmp_path / "r" / "log.txt").read_text()) == STAGE.findall(text)


def run(capsys, tmp_path, name, *flags):
    code = main(["run", *SMALL, *flags, "--out", str(tmp_path / name)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err, (tmp_path / name / "log.txt").read_text()


@pytest.mark.parametrize("terminal, flags, bars, lines", [
    (True, [], True, False),                     # a terminal: the bar shows each stage
    (True, ["--no-progress"], False, True),
    (True, ["--progress", "never"], False, True),
    (False, [], False, True),                    # a file or a pipe
    (False, ["--progress", "always"], True, True),
    (False, ["--quiet"], False, False),
])
def test_progress_modes(tmp_path, capsys, monkeypatch, terminal, flags, bars, lines):
    monkeypatch.setattr("cilearn.progress._is_terminal", lambda stream: terminal)
    out, err, logged = run(capsys, tmp_path, "r", *flags)
    assert ("\r" in err) == bars                # tqdm's refreshes
    assert len(STAGE.findall(out)) == (2 if lines else 0)
    assert len(STAGE.findall(logged)) == 2     # log.txt always has them
    assert "\r" not in out


def test_progress_option_and_older_configs(tmp_path, capsys):
    def saved(name):
        return yaml.safe_load((tmp_path / name / "config.yaml").read_text())["train"]["progress"]
    run(capsys, tmp_path, "a", "--quiet")
    assert saved("a") == "auto"
    run(capsys, tmp_path, "b", "--quiet", "--train.progress", "always")
    assert saved("b") == "always"
    for old, mode in ((True, "auto"), (False, "never")):   # config.yaml of runs made before the modes
        f = tmp_path / f"old-{old}.yaml"
        f.write_text(yaml.safe_dump({"train": {"progress": old}}))
        run(capsys, tmp_path, f"c{old}", "--quiet", "--config", str(f))
        assert saved(f"c{old}") == mode

    def fails(*flags):
        code = main(["run", *flags, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists(), err
        return err
    assert "auto, always, never" in fails("--train.progress", "sometimes")
    assert "--progress" in fails("--progress", "sometimes")
    assert "not allowed with" in fails("--progress", "always", "--no-progress")
