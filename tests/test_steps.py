"""The banner's count of optimisation steps (``cilearn.steps``) against the optimizer steps a run
takes, and its hints."""
import re

import pytest
import torch

import cilearn
from cilearn.config import resolve
from cilearn.prepare import describe_training, prepare
from cilearn.steps import count_steps


@pytest.mark.parametrize("method, stages", [("finetune", {"main"}), ("lucir", {"main", "balanced-finetune"}),
                                            ("foster", {"main", "feature-compression"})])
def test_the_banner_counts_the_steps_the_run_takes(quick, monkeypatch, method, stages):
    """digits, 20 images a class, 2 epochs, B0-Inc2: every SGD step of every stage is counted."""
    taken = []
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (taken.append(1), step(self, *a, **k))[1])
    cfg = quick(method=method, data__train_per_class=20, train__epochs=2)
    res = cilearn.run(cfg, echo=False)
    line = next(ln for ln in (res.out_dir / "log.txt").read_text().splitlines() if "optimisation steps" in ln)
    said = int(re.search(r"optimisation steps: (?:about )?([\d,]+)", line).group(1).replace(",", ""))
    assert said == len(taken) > 0, line
    assert set(re.findall(r"([a-z-]+) [\d,]+(?:,|\))", line)) == stages, line
    assert ("about" in line) == (method != "finetune")         # exemplars kept: their number is estimated


def test_count_by_hand_and_the_hints(quick):
    """B0-Inc2 on digits' 10 classes, 30 images a class, batch 16, 5 epochs in phase 0 and 3 later,
    --memory 40: phase 0 trains on 60 images (4 batches), phase i > 0 on 60 new images plus
    min(30, 40 // 2i) kept of each of the 2i old classes: 100, 100, 96, 100 images, 7, 7, 6, 7 batches."""
    cfg, ds, m = prepare(quick(method="icarl", data__train_per_class=30, memory={"total": 40},
                               train={"epochs": 3, "base_epochs": 5, "batch_size": 16, "progress": False}))
    counts = [30] * 10
    assert count_steps(cfg, m, counts).stages == {"main": 5 * 4 + 3 * (7 + 7 + 6 + 7)}
    assert "hint" not in describe_training(cfg, m, counts)
    long = describe_training(cfg, m, [30_000] * 10)     # 60,000 new images a phase: 3,750 batches, 3,753 later
    assert f"about {5 * 3750 + 3 * 4 * 3753:,} (main" in long and "hint: a long run" in long
    # the recipe's reference schedule (CIFAR's 200 / 170 epochs) on 45 images a class: says so
    ref = quick(method="icarl", data={"dataset": "cifar100"})
    ref.train.epochs = ref.train.base_epochs = None
    ref = resolve(ref, 100, 32, m.recipe.training)
    ref.scenario.class_order = list(range(100))
    text = describe_training(ref, m, [45] * 100)
    assert "200 and 170 epochs are icarl's reference schedule" in text and "45 per class" in text
