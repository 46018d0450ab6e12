"""Property-based tests over random scenarios (hypothesis)."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cilearn
from cilearn.config import RunConfig, from_dict
from cilearn.data.scenario import Scenario
from cilearn.evaluate import evaluate_phase, forgetting
from cilearn.memory import Budget, Memory


@st.composite
def scenarios(draw):
    k = draw(st.integers(2, 30))
    inc = draw(st.integers(1, k))
    # valid bases: 0 (first phase = inc) when inc divides k, or any b > 0 with (k - b) % inc == 0
    bases = ([0] if k % inc == 0 else []) + [k - inc * m for m in range(0, k // inc + 1) if k - inc * m > 0]
    return k, draw(st.sampled_from(bases)), inc


@given(scenarios(), st.integers(1, 400), st.booleans(), st.integers(0, 2**31 - 1))
@settings(max_examples=150, deadline=None)
def test_memory_budget_never_exceeded_and_every_class_kept(scn, budget, per_class, seed):
    k, base, inc = scn
    b = Budget(per_class=max(1, budget // 10)) if per_class else Budget(total=max(budget, k))
    mem = Memory(b)                                   # herding
    g = torch.Generator().manual_seed(seed)
    s = Scenario.make(k, base, inc, list(range(k)))
    assert s.phases[-1].end == k and all(p.num_new > 0 for p in s.phases)
    for p in s.phases:
        n = int(torch.randint(1, 12, (), generator=g))
        y = torch.arange(p.start, p.end).repeat_interleave(n)
        x = torch.randint(0, 255, (len(y), 1, 2, 2), dtype=torch.uint8, generator=g)
        mem.update(x, y, p.classes, torch.randn(len(y), 3, generator=g), p.seen, g)
        if b.total is not None:
            assert len(mem) <= b.total
        else:
            assert all(len(v) <= b.per_class for v in mem.exemplars.values())
        assert set(mem.exemplars) == set(range(p.seen))
        assert all(len(v) >= 1 for v in mem.exemplars.values())   # budget >= classes: each keeps one


@given(st.integers(1, 6), st.integers(2, 5), st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_accuracy_matrix_shape_and_range(tasks, inc, seed):
    g = torch.Generator().manual_seed(seed)
    matrix = []
    for t in range(tasks):
        seen = (t + 1) * inc
        y = torch.randint(0, seen, (50,), generator=g)
        ev = evaluate_phase(torch.randn(50, seen, generator=g), torch.randn(50, 4, generator=g), y,
                            [(i * inc, (i + 1) * inc) for i in range(t + 1)], None)
        assert len(ev.task_acc) == t + 1
        vals = [ev.acc, ev.acc_new] + [v for v in ev.task_acc if v is not None]
        vals += [ev.acc_old] if ev.acc_old is not None else []
        assert all(0.0 <= v <= 100.0 for v in vals)
        assert ev.acc <= ev.acc_task <= 100.0          # task-aware: a right overall argmax is right within its task
        assert all(a <= b for a, b in zip(ev.task_acc, ev.task_acc_task) if a is not None)
        matrix.append([v if v is not None else 0.0 for v in ev.task_acc])
    assert -100.0 <= forgetting(matrix) <= 100.0


@given(st.sampled_from([(0, 2), (0, 5), (4, 3), (2, 4), (6, 1)]), st.integers(10, 60), st.integers(0, 99))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_real_runs_respect_budget_and_ranges(tmp_path_factory, scn, memory, seed):
    base, inc = scn
    out = tmp_path_factory.mktemp("run")
    cfg = from_dict(RunConfig, {"method": "icarl", "seed": seed, "out": str(out / "r"),
                                "scenario": {"base": base, "increment": inc}, "memory": {"total": memory},
                                "train": {"epochs": 1, "progress": False, "checkpoint_every": 0}})
    m = cilearn.run(cfg, echo=False).metrics
    phases = 1 + (10 - (base or inc)) // inc
    assert [len(r) for r in m["accuracy_matrix"]] == list(range(1, phases + 1))
    assert m["memory"]["total_images"] <= memory
    for r in m["phases"]:
        for key in ("acc", "acc_nme", "acc_old", "acc_new", "top5"):
            assert r[key] is None or 0.0 <= r[key] <= 100.0
