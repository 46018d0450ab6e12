"""Loss terms against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from cilearn.losses import binary_cross_entropy, cross_entropy, kd_bce, kd_kl


def test_cross_entropy_by_hand():
    z = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([1, 2])
    # sample 0: -log(e^2 / (e^1 + e^2 + e^0)); sample 1: -log(1/3)
    l0 = -math.log(math.exp(2) / (math.exp(1) + math.exp(2) + 1))
    l1 = math.log(3)
    assert cross_entropy(z, y).item() == pytest.approx((l0 + l1) / 2, abs=1e-6)


def test_bce_by_hand():
    z = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([1])
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # class 0 target 0: -log(1 - s(0)); class 1 target 1: -log(s(2)); summed over classes
    expect = -math.log(1 - s(0)) - math.log(s(2))
    assert binary_cross_entropy(z, y).item() == pytest.approx(expect, abs=1e-6)


def test_kd_kl_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2.0, 0.0]])
    T = 2.0
    # p = softmax([1, 0]), q = softmax([0, 0]) = [.5, .5]
    p1 = math.exp(1) / (math.exp(1) + 1)
    p = [p1, 1 - p1]
    expect = sum(pi * math.log(pi / 0.5) for pi in p)
    assert kd_kl(s, t, T).item() == pytest.approx(expect, abs=1e-6)


def test_kd_kl_zero_when_equal_and_positive_otherwise():
    z = torch.randn(4, 5)
    assert kd_kl(z, z.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(z, z + torch.randn(4, 5), 2.0).item() > 0


def test_kd_kl_temperature_softens():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[4.0, 0.0]])
    assert kd_kl(s, t, 4.0).item() < kd_kl(s, t, 1.0).item()


def test_kd_bce_by_hand():
    s = torch.tensor([[0.0]])
    t = torch.tensor([[0.0]])
    # target sigmoid(0) = .5, prediction .5: -(.5 log .5 + .5 log .5) = log 2 per class
    assert kd_bce(s, t).item() == pytest.approx(math.log(2), abs=1e-6)
    s2, t2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert kd_bce(s2, t2).item() == pytest.approx(2 * math.log(2), abs=1e-6)   # sum over classes, mean over batch


def test_local_cross_entropy_by_hand():
    """CE over the classes with training samples: classes 1, 2 here: -log(e^3 / (e^2 + e^3))."""
    from cilearn.losses import local_cross_entropy
    z = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    loss = local_cross_entropy(z, torch.tensor([2]), torch.tensor([0.0, 5.0, 5.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    loss.backward()
    assert z.grad[0, 0] == 0 and torch.isfinite(z.grad).all()     # the absent class gets no push
    assert local_cross_entropy(z, torch.tensor([2]), torch.ones(3)).item() == pytest.approx(
        cross_entropy(z, torch.tensor([2])).item())                # every class present: plain CE
