"""Every shipped reference config parses, names registered components, and carries a header."""
from pathlib import Path

import pytest

from cilearn.config import from_dict, load_yaml, RunConfig
from cilearn.data.datasets import DATASETS
from cilearn.components import REGISTRIES
from cilearn.methods import METHODS
from cilearn.methods.options import check_unused
from cilearn.methods.recipe import plan

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    cfg = from_dict(RunConfig, load_yaml(str(path)))
    assert cfg.method in METHODS and cfg.data.dataset in DATASETS
    assert all(n in REGISTRIES["term"] for n in cfg.loss.distill) and cfg.replay.source in (None, "none", *REGISTRIES["replay"].names())
    assert path.read_text().startswith("#")   # the protocol and the reference number in a header


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_resolves_strictly(path):
    """Every option of a shipped config is used by its run (the short names of component options
    included): what ``cilearn run --config`` checks before anything is read or written."""
    cfg = from_dict(RunConfig, load_yaml(str(path)))
    size = cfg.data.image_size or (32 if cfg.data.dataset.startswith("cifar") else 224)
    p = plan(cfg, size, strict=True)
    check_unused(cfg, p)
    assert p.classes
