"""FOSTER reports what the reference code reports (issue 32): in each phase >= 1 the evaluated
network is the boosted one (two extractors), the compressed student's accuracy is recorded beside
it, and the next phase starts from the student (its old model and first extractor)."""
import torch

from cilearn import runner
from cilearn.events import Observer
from cilearn.feature_compression import FeatureCompression


def test_the_boosted_network_is_evaluated_and_the_student_starts_the_next_phase(quick, monkeypatch):
    students: dict[int, dict] = {}
    real = FeatureCompression.after_training

    def after_training(self, ctx):
        fr = real(self, ctx)
        students[ctx.phase.index] = {k: v.clone() for k, v in self.student.backbone.extractors[0].state_dict().items()}
        return fr
    monkeypatch.setattr(FeatureCompression, "after_training", after_training)
    seen: dict[int, tuple] = {}

    class Watch(Observer):
        def on_start(self, run):
            self.net = run.net

        def on_phase(self, row):        # after the phase's evaluation, before the student replaces the network
            ex = self.net.backbone.extractors
            seen[row["phase"]] = (len(ex), {k: v.clone() for k, v in ex[0].state_dict().items()}, row)

    cfg = quick(method="foster", train__epochs=2, train__precision="fp32")
    m = runner.run(cfg, echo=False, observer=Watch()).metrics
    assert [seen[i][0] for i in range(5)] == [1, 2, 2, 2, 2]          # phase >= 1: the boosted network is evaluated
    assert m["phases"][-1]["params"] > m["phases"][0]["params"] * 1.9   # (two extractors' parameters)
    for t in range(1, 4):                                               # phase t+1's old extractor is phase t's student
        assert all(torch.equal(seen[t + 1][1][k], students[t][k]) for k in students[t]), t
    rows = m["phases"]
    assert rows[0]["student_acc"] is None and all(isinstance(r["student_acc"], float) for r in rows[1:])
    expected = sum([rows[0]["acc"]] + [r["student_acc"] for r in rows[1:]]) / len(rows)
    assert abs(m["avg_incremental_acc_student"] - expected) < 1e-9
    assert any(r["student_acc"] != r["acc"] for r in rows[1:])         # two networks, two accuracies
