"""End-to-end runs of every registered method (registry-driven), and the expected ordering of
the baselines on digits."""
import pytest

import cilearn
from cilearn.methods import METHODS


# The cosine / LSC heads' scale is learnt from 1 at lr 0.1: on digits (about 3 steps per epoch) 6
# epochs leave the logits flat, and with BSCE's prior on flat logits the new classes lose (lucir-bsce:
# 23% on the last phase's new classes at 6 epochs, 80% at 10); PODNet needs 15 (NCA) and 20 (BSCE).
# FOSTER's compression stage distils a fresh single-extractor student in as many epochs as the
# boosting: at 6 epochs (~25 steps on digits) it is under-trained (last phase's new classes 48%).
EPOCHS = {"podnet": 15, "podnet-bsce": 20, "lucir-bsce": 10, "foster": 10}
# Known weakness, reported in benchmarks/RESULTS.md: podnet-bsce leans towards the old classes on
# digits (last phase: old 91%, new 38%). The exemplar-free methods whose classification loss leaves
# the old logits alone (lwf, lwm, dfgr, dfgr-dtid: CE over the new classes; lwf-mc: sigmoid BCE) lean the same way:
# nothing calibrates old against new logits (last phase's new classes at 6 epochs: lwf 44%,
# lwf-mc 21%, lwm 10%, dfgr-dtid 24%); that they learnt the new classes is checked among the new logits.
NEW_MIN = {"podnet-bsce": 30.0, "lwf": 30.0, "lwf-mc": 10.0, "lwm": 5.0, "dfgr": 30.0, "dfgr-dtid": 10.0}
# Extra-stage costs kept small in the smoke test (DF-GR's generator: 500 steps by default).
OVER = {"dfgr": {"replay__steps": 20}, "dfgr-dtid": {"replay__steps": 20}}


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_end_to_end(method, quick):
    # extra-stage costs kept small: an exemplar optimizer (Mnemonics) solves a bilevel problem per
    # phase (3 pixel steps here); DF-GR trains a generator (20 steps here)
    opt = {"memory__mnemonics": {"iterations": 3}} if METHODS.get(method).memory_optimizer != "none" else {}
    if METHODS.get(method).memory_compressor != "none":          # CIM's bilevel steps (20 by default)
        opt["memory__compression"] = {"iterations": 3}
    res = cilearn.run(quick(method=method, train__epochs=EPOCHS.get(method, 6), **OVER.get(method, {}), **opt),
                      echo=False)
    m = res.metrics
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3, 4, 5]
    assert all(0.0 <= a <= 100.0 for row in m["accuracy_matrix"] for a in row)
    assert m["accuracy_matrix"][0][0] > 90.0            # two digit classes are learnt in phase 0
    assert m["phases"][-1]["acc_new"] > NEW_MIN.get(method, 50.0)   # and the last phase's classes too
    assert m["phases"][-1]["acc_new_among_new"] > 70.0                 # (2 classes: chance is 50)
    cls = METHODS.get(method)
    assert (m["avg_incremental_acc_nme"] is not None) == cls.uses_memory
    assert (m["memory"]["total_images"] > 0) == cls.uses_memory
    assert (res.out_dir / "metrics.json").exists()


def test_baseline_ordering_on_digits(quick):
    """Same epochs for all: joint >= icarl > lwf, and icarl >= finetune + 20 points."""
    acc = {m: cilearn.run(quick(method=m, out=None, train__epochs=10), echo=False).avg_incremental_acc
           for m in ("joint", "icarl", "lwf", "finetune")}
    assert acc["joint"] >= acc["icarl"] > acc["lwf"], acc
    assert acc["icarl"] >= acc["finetune"] + 20, acc


def test_joint_trains_on_all_seen_and_finetune_forgets(quick):
    fin = cilearn.run(quick(method="finetune"), echo=False).metrics
    # finetune forgets old tasks almost completely after the last phase
    assert fin["accuracy_matrix"][-1][0] < 20.0 and fin["forgetting"] > 60.0


def test_same_seed_same_numbers(quick, tmp_path):
    a = cilearn.run(quick(method="icarl", out=str(tmp_path / "a")), echo=False).accuracy_matrix
    b = cilearn.run(quick(method="icarl", out=str(tmp_path / "b")), echo=False).accuracy_matrix
    assert a == b
