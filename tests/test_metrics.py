"""Metric definitions on hand-made outputs and accuracy matrices."""
import pytest
import torch

from cilearn.evaluate import average_incremental_accuracy, evaluate_phase, forgetting, kd_target_stats, nme_predict


def test_forgetting_by_hand():
    m = [[90.0], [70.0, 80.0], [60.0, 75.0, 95.0]]
    # task 0: max(90, 70) - 60 = 30; task 1: max(80) - 75 = 5 -> mean 17.5
    assert forgetting(m) == pytest.approx(17.5)
    assert forgetting([[50.0]]) == 0.0


def test_forgetting_uses_best_earlier_not_first():
    m = [[50.0], [80.0, 90.0], [40.0, 90.0, 70.0]]
    # task 0: max(50, 80) - 40 = 40; task 1: 90 - 90 = 0
    assert forgetting(m) == pytest.approx(20.0)


def test_average_incremental_accuracy():
    assert average_incremental_accuracy([100.0, 80.0, 60.0]) == pytest.approx(80.0)


def test_evaluate_phase_by_hand():
    # 2 tasks: ids {0,1} old, {2,3} new. 6 test samples.
    y = torch.tensor([0, 1, 1, 2, 3, 3])
    logits = torch.full((6, 4), -5.0)
    pred = [0, 2, 1, 2, 3, 1]                     # correct: 0, 2, 3, 4 -> 4/6
    logits[torch.arange(6), torch.tensor(pred)] = 5.0
    emb = torch.eye(4)[torch.tensor([0, 1, 1, 2, 3, 3])]   # NME perfect with identity prototypes
    ev = evaluate_phase(logits, emb, y, [(0, 2), (2, 4)], torch.eye(4))
    assert ev.acc == pytest.approx(100 * 4 / 6)
    assert ev.acc_old == pytest.approx(100 * 2 / 3)       # samples 0,1,2: correct 0 and 2
    assert ev.acc_new == pytest.approx(100 * 2 / 3)       # samples 3,4,5: correct 3 and 4
    assert ev.task_acc == pytest.approx([100 * 2 / 3, 100 * 2 / 3])
    assert ev.acc_nme == pytest.approx(100.0)
    assert ev.top5 is None                               # only 4 classes
    # among old logits only (columns 0, 1): sample 1 predicted 2 -> now argmax over {0,1}: both -5
    # ties resolve to 0 -> wrong (y=1); samples 0 and 2 right -> 2/3
    assert ev.acc_old_among_old == pytest.approx(100 * 2 / 3)
    # among new logits only (columns 2, 3): samples 3, 4 right; sample 5 (row max on class 1) ties
    # at -5 over {2, 3} -> 2, wrong (y=3) -> 2/3
    assert ev.acc_new_among_new == pytest.approx(100 * 2 / 3)


def test_top5_and_first_phase_has_no_old():
    y = torch.arange(5)
    logits = torch.zeros(5, 5)
    logits[:, 0] = 1
    ev = evaluate_phase(logits, torch.randn(5, 3), y, [(0, 5)], None)
    assert ev.acc_old is None and ev.acc_nme is None
    assert ev.top5 == pytest.approx(100.0) and ev.acc == pytest.approx(20.0)


def test_nme_nearest_normalised_mean():
    protos = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    emb = torch.tensor([[10.0, 1.0], [0.1, 0.5]])
    assert nme_predict(emb, protos).tolist() == [0, 1]


def test_kd_target_stats_by_hand():
    # 3 images, 2 old classes, T = 2: logits / T = [0, 0], [ln 3, 0], [0, ln 3]
    ln3 = torch.log(torch.tensor(3.0))
    logits = torch.tensor([[0.0, 0.0], [2 * ln3, 0.0], [0.0, 2 * ln3]])
    st = kd_target_stats(logits, T=2.0)
    h = lambda p: -(p * torch.log(torch.tensor(p)) + (1 - p) * torch.log(torch.tensor(1 - p)))  # noqa: E731
    expected = (h(0.5) + 2 * h(0.75)) / 3 / torch.log(torch.tensor(2.0))   # p = 1/2, 3/4, 3/4
    assert st["kd_target_entropy"] == pytest.approx(float(expected), rel=1e-5)
    assert st["kd_target_top_share"] == pytest.approx(2 / 3)   # argmax 0, 0 (tie), 1
    one_hot = kd_target_stats(torch.tensor([[50.0, 0.0, 0.0]] * 4), T=2.0)
    assert one_hot["kd_target_entropy"] < 1e-6 and one_hot["kd_target_top_share"] == 1.0
