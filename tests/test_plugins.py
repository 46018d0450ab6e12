"""``--plugin FILE.py``: a user's file adds a component that any run can name (examples/ewc_plugin.py,
and a new loss term written in one file), its hooks run in every phase, phase 0 included, and its
state is checkpointed with the rest."""
import json
import math
from pathlib import Path

import pytest
import torch

import cilearn
from cilearn.checkpoint import PHASE_FILE, Checkpointer, Interrupted, load_checkpoint
from cilearn.cli import main

EWC = str(Path(__file__).parent.parent / "examples" / "ewc_plugin.py")


@pytest.fixture(autouse=True)
def forget_plugins():
    """What a test's plugins registered is removed after it (and their files may be imported
    again): a later test in the same process (e.g. tests/test_cli.py's unknown component 'ewc')
    sees only the built-in components."""
    from cilearn.components import REGISTRIES
    from cilearn.methods import METHODS
    from cilearn.plugins import _LOADED
    regs = [*REGISTRIES.values(), METHODS]
    before = [set(r.names()) for r in regs]
    loaded = set(_LOADED)
    yield
    for r, names in zip(regs, before):
        for n in set(r.names()) - names:
            r.unregister(n)
    for path in set(_LOADED) - loaded:
        del _LOADED[path]
ARGS = ["--epochs", "4", "--base", "4", "--increment", "3", "--no-progress", "--quiet"]

# A new loss term in one file: the mean squared logit, weighted; it counts the phases it saw end.
L2_TERM = '''
from dataclasses import dataclass
from cilearn.components import Component, register

@dataclass(frozen=True)
class Options:
    weight: float = 1.0

@register("term", "logit-l2")
class LogitL2(Component):
    Options = Options

    def __init__(self, options, services):
        super().__init__(options, services)
        self.ended = []

    def terms(self, step, out):
        return {"logit_l2": (self.options.weight, (out.logits.float() ** 2).mean())}

    def epoch_end(self, ctx, epoch):
        self.ended.append((ctx.phase.index, epoch))

    def phase_end(self, ctx):
        self.ended.append(ctx.phase.index)

    def state_dict(self):
        return {"ended": list(self.ended)}

    def load_state_dict(self, state):
        self.ended = list(state["ended"])
'''


def run(capsys, out, *flags):
    code = main(["run", *flags, *ARGS, "--out", str(out), "--keep-checkpoint"])
    err = capsys.readouterr().err
    assert code == 0, err
    return json.loads((out / "metrics.json").read_text())


def test_ewc_plugin_runs_with_finetune_and_changes_it(tmp_path, capsys):
    """The README's command at 3 epochs per phase (issue 32's: the plugin's defaults, digits, 2
    classes per phase) on seeds 2 and 3, where the Fisher taken in eval mode and unclamped made
    the penalty diverge: it completes, its numbers are finite and differ from plain finetune's."""
    readme = ["--dataset", "digits", "--epochs", "3", "--base-epochs", "3", "--precision", "fp32",
              "--no-progress", "--quiet"]
    for seed in ("2", "3"):
        def go(name, *flags):
            out = tmp_path / f"{name}{seed}"
            code = main(["run", *flags, *readme, "--seed", seed, "--out", str(out), "--keep-checkpoint"])
            assert code == 0, capsys.readouterr().err
            return json.loads((out / "metrics.json").read_text())
        plain = go("plain", "--method", "finetune")
        ewc = go("ewc", "--plugin", EWC, "--method", "finetune", "--distill", "ewc")
        assert "ewc" not in ewc["phases"][0]["loss"]                      # nothing to keep in phase 0
        assert all(0 < r["loss"]["ewc"] < 1 for r in ewc["phases"][1:])   # the Fisher of phase 0 was computed
        assert all(math.isfinite(a) for row in ewc["accuracy_matrix"] for a in row)
        assert ewc["accuracy_matrix"] != plain["accuracy_matrix"], seed
    cfg = (tmp_path / "ewc3" / "config.yaml").read_text()
    assert f"plugins:\n- {EWC}" in cfg and "  ewc:\n    weight: 5000.0\n" in cfg and "fisher_max: 0.0001" in cfg
    st = load_checkpoint(tmp_path / "ewc3" / PHASE_FILE)["method"]["components"]["ewc"]
    assert set(st) == {"fisher", "anchor"} and all(k.startswith("stages") or "." in k for k in st["fisher"])
    assert max(float(f.max()) for f in st["fisher"].values()) <= 1e-4              # the clamp


def test_ewc_fisher_leaves_batchnorm_statistics_alone(tmp_path, quick):
    """The Fisher is taken in training mode (as in FACIL and PyCIL) but the model's buffers
    (BatchNorm running statistics) are those of the end of training, and its mode is kept."""
    from cilearn.components import REGISTRIES, PhaseContext
    from cilearn.data.scenario import Phase
    from cilearn.plugins import load_plugins
    from cilearn.models import build_net
    load_plugins([EWC])
    ewc_cls = REGISTRIES["term"].get("ewc")

    class Services:
        device = torch.device("cpu")

        def test_view(self, x):
            return x.float() / 255

        def phase_generator(self, phase):
            return torch.Generator().manual_seed(phase.index)
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    net.add_classes(3)
    net.eval()
    before = {n: b.clone() for n, b in net.named_buffers()}
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (40,))
    term = ewc_cls(ewc_cls.Options(), Services())
    term.phase_end(PhaseContext(Phase(0, 0, 3), net, None, x, y, torch.bincount(y), None))
    assert not net.training
    assert all(torch.equal(b, before[n]) for n, b in net.named_buffers())
    assert all(p.grad is None for p in net.parameters())
    f = torch.cat([v.flatten() for v in term.fisher.values()])
    assert f.max() > 0 and f.max() <= 1e-4 and set(term.fisher) == {n for n, _ in net.backbone.named_parameters()}


def test_a_new_loss_term_is_one_file(tmp_path, capsys):
    f = tmp_path / "l2_plugin.py"
    f.write_text(L2_TERM)
    m = run(capsys, tmp_path / "r", "--plugin", str(f), "--method", "icarl", "--distill", "logit-l2",
            "--components.logit-l2.weight", "0.01")
    assert all("logit_l2" in r["loss"] for r in m["phases"])            # every phase, phase 0 included
    st = load_checkpoint(tmp_path / "r" / PHASE_FILE)["method"]["components"]["logit-l2"]
    # each epoch of the main stage (4 epochs), then the phase end, in every phase
    assert st["ended"] == [x for p in range(3) for x in [(p, e) for e in range(4)] + [p]]
    assert "  logit-l2:\n    weight: 0.01\n" in (tmp_path / "r" / "config.yaml").read_text()


def test_plugin_state_resumes_exactly(tmp_path, quick, monkeypatch):
    over = dict(method="finetune", plugins=[EWC], loss={"distill": ["ewc"]},
                scenario={"base": 4, "increment": 3}, train={"epochs": 3, "progress": False})
    ref = cilearn.run(quick(out=str(tmp_path / "a"), **over), echo=False).accuracy_matrix
    real = Checkpointer.save_phase

    def save_phase(self, state):
        real(self, state)
        if state["next_phase"] == 2:
            self.stop_signal = 15
    monkeypatch.setattr(Checkpointer, "save_phase", save_phase)
    with pytest.raises(Interrupted):
        cilearn.run(quick(out=str(tmp_path / "b"), **over), echo=False)
    monkeypatch.setattr(Checkpointer, "save_phase", real)
    assert cilearn.resume(tmp_path / "b", echo=False).accuracy_matrix == ref


def test_bad_plugins_are_one_line_errors(tmp_path, capsys):
    def fails(*flags):
        code = main(["run", *flags, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "x").exists()
        return err
    assert "no such file" in fails("--plugin", str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    err = fails("--plugin", str(bad))
    assert "bad.py" in err and "RuntimeError: boom" in err
    err = fails("--method", "finetune", "--distill", "no-such-term")
    assert "no-such-term" in err and "attention" in err
    txt = tmp_path / "p.txt"
    txt.write_text("")
    assert "expected a Python file" in fails("--plugin", str(txt))
