"""Herding, the other selection rules and the budget accounting."""
import torch

from cilearn.memory import Budget, Memory
from cilearn.memory.selection import closest_to_mean, herding, random_selection


def test_herding_greedy_mean_matching_by_hand():
    # Unit vectors at angles; their mean points along +x. Herding first takes the sample closest
    # to the mean direction, then the one that brings the running mean back towards it.
    ang = torch.tensor([0.0, 0.5, -0.45, 1.2, -1.3])
    f = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    order = herding(f, 5).tolist()
    mu = f.mean(0)
    # recompute the greedy choice by hand, step by step
    chosen, running = [], torch.zeros(2)
    for k in range(1, 6):
        best = min((i for i in range(5) if i not in chosen),
                   key=lambda i: ((mu - (running + f[i]) / k) ** 2).sum().item())
        chosen.append(best)
        running += f[best]
    assert order == chosen
    assert order[0] == 0                      # angle 0 is closest to the mean direction
    assert order[1] == 2                      # -0.45 pulls the running mean back best (by hand above)
    assert sorted(order) == [0, 1, 2, 3, 4]   # a permutation: no sample twice


def test_herding_picks_balanced_pair():
    # mean of {+1, -1, +0.9, +0.8} in 1-D (after normalisation all are +-1): a balanced choice
    f = torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.3], [1.0, 0.0]])
    order = herding(f, 2).tolist()
    assert order[0] == 3 or abs(f[order[0], 1] - f[:, 1].mean()) < 0.06
    assert len(set(order)) == 2


def test_closest_and_random():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    assert closest_to_mean(f, 1).tolist() == [2]
    g = torch.Generator().manual_seed(0)
    r = random_selection(f, 2, g)
    assert len(set(r.tolist())) == 2 and all(0 <= i < 3 for i in r.tolist())


def test_budget_share():
    assert Budget(total=200).share(4) == 50
    assert Budget(total=200).share(3) == 66
    assert Budget(per_class=20).share(7) == 20


def _fill(memory, seen_from, seen_to, n=30):
    x = torch.arange(n * (seen_to - seen_from), dtype=torch.uint8).view(-1, 1, 1, 1).repeat(1, 1, 2, 2)
    y = torch.arange(seen_from, seen_to).repeat_interleave(n)
    feats = torch.randn(len(y), 4, generator=torch.Generator().manual_seed(seen_from))
    memory.update(x, y, range(seen_from, seen_to), feats, seen_to)
    return x, y


def test_memory_fixed_total_never_exceeded_and_shrinks_by_priority():
    m = Memory(Budget(total=20))
    _fill(m, 0, 2)
    assert len(m) == 20 and all(len(v) == 10 for v in m.exemplars.values())
    before = {c: v.clone() for c, v in m.exemplars.items()}
    _fill(m, 2, 5)
    assert len(m) <= 20
    assert all(len(v) == 4 for v in m.exemplars.values())   # 20 // 5
    for c in (0, 1):   # shrinking keeps the head of the selection order
        assert torch.equal(m.exemplars[c], before[c][:4])
    assert m.nbytes == len(m) * 1 * 2 * 2


def test_memory_per_class_grows():
    m = Memory(Budget(per_class=3))
    _fill(m, 0, 2)
    _fill(m, 2, 4)
    assert len(m) == 12 and all(len(v) == 3 for v in m.exemplars.values())
    x, y = m.data()
    assert x.shape == (12, 1, 2, 2) and sorted(set(y.tolist())) == [0, 1, 2, 3]


def test_memory_keeps_labels_consistent():
    m = Memory(Budget(total=10))
    x, y = _fill(m, 0, 2, n=5)
    for c, ex in m.exemplars.items():   # every stored image belongs to its class
        pool = x[y == c]
        for img in ex:
            assert any(torch.equal(img, p) for p in pool)
