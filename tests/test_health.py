"""The warnings a run records when it is not learning (cilearn.health): accuracy at chance level,
a training stage whose loss grew by orders of magnitude, a component that skipped its steps;
printed under the phase's row, in log.txt and in metrics.json's ``warnings``, the run going on."""
import warnings

import torch

import cilearn
from cilearn.checkpoint import EPOCH_FILE, Checkpointer, load_checkpoint
from cilearn.health import Checks, phase_warnings

BALANCED = torch.arange(4).repeat_interleave(25)          # 4 classes x 25 test images


def kinds(ws):
    return [w["kind"] for w in ws]


def check(acc, predicted, labels, row=None, rows=(), **checks):
    """The warnings of a phase with ``row`` after ``rows``."""
    return phase_warnings(acc, predicted, labels, [*rows, {"phase": len(rows), **(row or {})}], Checks(**checks))


def test_one_class_predicted_is_chance_level():
    ws = check(25.0, torch.zeros(100, dtype=torch.long), BALANCED, rows=[{"phase": 0}, {"phase": 1}])
    assert kinds(ws) == ["chance"]
    assert (ws[0]["phase"], ws[0]["acc"], ws[0]["chance"], ws[0]["top_predicted_share"]) == (2, 25.0, 25.0, 100.0)
    assert "phase 2: accuracy 25.00 is at chance level" in ws[0]["message"]


def test_chance_is_the_most_frequent_class_share_and_a_margin():
    labels = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(40, dtype=torch.long)])   # 60 / 40
    pred = labels.clone()
    assert kinds(check(66.0, pred, labels)) == ["chance"]          # <= 1.1 x 60
    assert check(66.1, pred, labels) == []
    assert check(37.0, BALANCED, BALANCED, chance_factor=1.5) != []
    assert check(37.0, BALANCED, BALANCED) == []                   # 4 classes: 25 x 1.1
    one = torch.zeros(10, dtype=torch.long)                        # a single class seen: nothing to guess
    assert check(100.0, one, one) == []


def test_a_stage_whose_loss_grew_a_hundredfold():
    losses = {"phase 1": [1.3, 1217.0], "phase 1 compression": [2.0, 199.0], "phase 1 balanced-ft": [0.0, 5.0]}
    ws = check(90.0, BALANCED, BALANCED, {"stage_losses": losses}, rows=[{"phase": 0}])
    assert kinds(ws) == ["loss-growth"]
    assert (ws[0]["stage"], ws[0]["reference"], ws[0]["last"], ws[0]["compared_with"]) == \
        ("phase 1", 1.3, 1217.0, "its first epoch")


def test_a_main_stage_that_started_exploded_is_compared_with_phase_0():
    """A loss that explodes within a phase's first epoch: the main stage's last epoch against the
    first epoch of phase 0 (the untrained model's loss); other stages only against their own."""
    first = {"phase": 0, "stage_losses": {"phase 0": [4.8, 1.3]}}
    ws = check(90.0, BALANCED, BALANCED, {"stage_losses": {"phase 1": [7861.0, 7531.0],
                                                          "phase 1 compression": [1.0, 0.5]}}, rows=[first])
    assert [(w["stage"], w["reference"], w["compared_with"]) for w in ws] == \
        [("phase 1", 4.8, "the first epoch of phase 0")]
    assert check(90.0, BALANCED, BALANCED, {"stage_losses": {"phase 1": [30.0, 470.0]}}, rows=[first]) == []
    assert check(90.0, BALANCED, BALANCED, {"stage_losses": {"phase 1 x": [7861.0, 7531.0]}}, rows=[first]) == []


def test_a_positive_skipped_count_is_a_warning_with_its_steps():
    row = {"meta_skipped": 6, "meta_steps": 8, "other_skipped": 0,
           "compressor": {"box_skipped": 2}, "exemplar_optimizer": {}}
    ws = check(90.0, BALANCED, BALANCED, row, rows=[{"phase": 0}, {"phase": 1}, {"phase": 2}])
    assert [(w["kind"], w["name"], w["skipped"], w["steps"]) for w in ws] == \
        [("skipped", "meta", 6, 8), ("skipped", "box", 2, None)]
    assert "meta skipped 6 of 8 steps" in ws[0]["message"]


def test_the_checkpointer_keeps_each_stages_first_and_last_epoch_loss(tmp_path):
    """Also in the epoch checkpoint (a run resumed inside a stage still compares with its first
    epoch), and forgotten at the phase's end."""
    ck = Checkpointer(tmp_path, 1, torch.Generator())
    for epoch, loss in enumerate([2.0, 5.0, 300.0]):
        ck.end_epoch("phase 0", epoch, 3, {"loss": loss})
    ck.end_epoch("phase 0 balanced-ft", 1, 2, {"loss": 1.0})    # its first epoch not seen here: not compared
    assert ck.losses == {"phase 0": [2.0, 300.0]}
    ck.save_fit(torch.nn.Linear(1, 1), {"desc": "phase 0"})
    assert load_checkpoint(tmp_path / EPOCH_FILE)["losses"] == {"phase 0": [2.0, 300.0]}
    ck.save_phase({})
    assert ck.losses == {}


def test_a_run_predicting_one_class_warns_every_phase_and_goes_on(quick, monkeypatch):
    """The runner's plumbing: the CNN head made to predict class 0 for every test image."""
    from cilearn.services import RunServices
    real = RunServices.predict

    def one_class(*args, **kw):
        logits, emb = real(*args, **kw)
        return torch.zeros_like(logits), emb
    monkeypatch.setattr(RunServices, "predict", one_class)
    res = cilearn.run(quick(method="finetune", train={"epochs": 1, "progress": False}, data={"dataset": "digits",
                                                                                          "train_per_class": 20}),
                      echo=False)
    ws = res.metrics["warnings"]
    assert [(w["phase"], w["kind"]) for w in ws] == [(p, "chance") for p in range(5)]
    assert all(w["top_predicted_share"] == 100.0 for w in ws)
    assert "warnings" not in res.metrics["phases"][0]
    assert all(r["stage_losses"]["phase %d" % r["phase"]][0] > 0 for r in res.metrics["phases"])
    log = (res.out_dir / "log.txt").read_text()
    assert log.count("  warning: phase ") == 5 and "average incremental accuracy" in log


def test_skipped_component_steps_are_warnings_not_library_warnings(quick, monkeypatch):
    """Every step of the mask model's meta-iterations skipped (as a non-finite loss does): each
    phase says so in metrics.json, and no raw PyTorch scheduler warning is printed."""
    import cilearn.memory.cim as cim
    monkeypatch.setattr(cim, "phi_step", lambda *a: False)
    cfg = quick(method="foster-cim", train={"epochs": 1, "progress": False}, scenario={"base": 2, "increment": 4},
                data={"dataset": "digits", "train_per_class": 20})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = cilearn.run(cfg, echo=False).metrics
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    skips = [w for w in m["warnings"] if w["kind"] == "skipped"]
    assert [(w["phase"], w["skipped"], w["steps"]) for w in skips] == [(0, 1, 1), (1, 2, 2), (2, 2, 2)]
    assert [r["cim_meta_skipped"] for r in m["phases"]] == [1, 2, 2]


def test_a_run_that_learns_records_no_warning(quick):
    m = cilearn.run(quick(train={"epochs": 6, "progress": False, "precision": "fp32"}), echo=False).metrics
    assert min(r["acc"] for r in m["phases"]) > 60 and m["warnings"] == []
