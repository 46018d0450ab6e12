"""A recipe written as data (docs/extending.md): the nearest-class-mean recipe trains the backbone in
phase 0, freezes it after, keeps no exemplar and classifies by the class means of the training
images from phase 0 on. No method class: a Recipe naming components."""
import pytest
import torch

import cilearn
from cilearn.config import Schedule, TrainingDefaults
from cilearn.methods import METHODS, Recipe, register_recipe


@pytest.fixture
def ncm_recipe():
    """The recipe of docs/extending.md, registered for the test only (the registry walks of other
    tests, the README's tables and the docs' schedule table see the shipped recipes)."""
    # exactly the recipe of docs/extending.md
    register_recipe(Recipe(
        "ncm", TrainingDefaults(Schedule("nearest class means: phase 0 trains, later phases add means",
                                         epochs=0, base_epochs=30)),
        "linear", "ce",
        constraints=("freeze-backbone",),   # the backbone frozen after phase 0 (its option ``after``: 0)
        nme=True))                          # NME from the class means of the training images, no exemplars
    yield
    METHODS.unregister("ncm")


def test_the_docs_show_this_recipe():
    from pathlib import Path
    text = (Path(__file__).parent.parent / "docs" / "extending.md").read_text()
    assert 'constraints=("freeze-backbone",)' in text and "nme=True))" in text and '"ncm", TrainingDefaults(' in text


def test_nearest_class_mean_recipe_as_data(quick, tmp_path, ncm_recipe):
    backbone = {}

    class Watch(cilearn.events.Observer):      # the backbone's tensors after each phase
        def on_start(self, run):
            self.net = run.net

        def on_phase(self, row):
            backbone[row["phase"]] = {k: v.clone() for k, v in self.net.backbone.state_dict().items()}

    cfg = quick(method="ncm", train={"epochs": 0, "base_epochs": 6, "progress": "never", "precision": "fp32",
                                     "schedule": "cosine"})
    from cilearn import runner
    res = runner.run(cfg, echo=False, observer=Watch())
    m = res.metrics
    assert m["memory"]["total_images"] == 0                       # no exemplar
    nme = m["accuracy_matrix_nme"]
    assert nme is not None and [len(r) for r in nme] == [1, 2, 3, 4, 5]     # NME in every phase
    assert m["phases"][0]["acc_nme"] > 90.0                       # two digit classes from their means
    assert m["avg_incremental_acc_nme"] > 60.0                    # class means of a frozen phase-0 backbone
    assert all(torch.equal(backbone[0][k], backbone[4][k]) for k in backbone[0])   # frozen after phase 0
    import yaml
    conf = yaml.safe_load((res.out_dir / "config.yaml").read_text())
    assert conf["constraints"] == ["freeze-backbone"] and conf["components"]["freeze-backbone"] == {"after": 0}
    assert conf["eval"]["nme"] is True


def test_the_frozen_backbone_does_not_change_after_phase_0(quick):
    from cilearn.components import PhaseContext, build, component_class
    from cilearn.data.scenario import Phase
    from cilearn.models import build_net
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    freeze = build(component_class("constraint", "freeze-backbone"), {}, None)
    assert freeze.first_phase() == 1
    net.add_classes(2)
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    freeze.phase_start(PhaseContext(Phase(1, 2, 4), net, None, torch.zeros(0), torch.zeros(0), torch.zeros(4), None))
    net.train()
    assert not net.backbone.training and all(not p.requires_grad for p in net.backbone.parameters())
    net(torch.randn(8, 1, 8, 8))                                  # a training-mode forward: BatchNorm statistics kept
    after = net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
