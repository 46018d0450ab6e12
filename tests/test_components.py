"""Registry-driven checks of the component contract: every kind has components; every registered
component's options reach the run's config (``config.yaml``'s ``components.<name>``) and the
component itself with its declared defaults unless the recipe or the user set them; each short
name and each ``components.<name>.<option>`` sets its option; the engine names no component."""
import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest
import torch

import cilearn
from cilearn.components import KINDS, REGISTRIES, aliases_of, options_dict, parse_options
from cilearn.config import QUICK_EPOCHS, RunConfig, from_dict, merge, resolve, to_dict
from cilearn.errors import ConfigError
from cilearn.methods import METHODS
from cilearn.methods.options import prune
from cilearn.methods.recipe import RunFacts, plan, resolved_config

# a run that has the component: (recipe, where the choice goes)
CHOICE = {
    "backbone": ("finetune", lambda n: {"model": {"backbone": n}}),
    "adapter": ("simplecil", lambda n: {"model": {"adapter": n}}),
    "head": ("icarl", lambda n: {"model": {"head": n}}),
    "classification": ("icarl", lambda n: {"loss": {"cls": n}}),
    "term": ("icarl", lambda n: {"loss": {"distill": [n]}}),
    "replay": ("finetune", lambda n: {"replay": {"source": n}}),
    "head-init": ("icarl", lambda n: {"head_init": [n]}),
    "constraint": ("icarl", lambda n: {"constraints": [n]}),
    "calibration": ("icarl", lambda n: {"calibration": [n]}),
    "stage": ("foster", lambda n: {"stages": [n]}),
    "selection": ("icarl", lambda n: {"memory": {"selection": n}}),
    "exemplar-optimizer": ("icarl", lambda n: {"memory": {"optimizer": n}}),
    "compressor": ("icarl", lambda n: {"memory": {"compressor": n}}),
}
# another valid value of each string option (a new string option needs an entry: the test says so)
OTHER_STRING = {"bn_loss": ["l2", "kl"], "forward": ["separate", "joint"], "resample": ["area", "nearest"],
                "select_on": ["original", "compressed"], "artifacts": ["random-box", "official"],
                "inner_loss": ["ce", "method"], "inner_params": ["all", "backbone"], "bn": ["batch", "running"],
                "step": ["sgd", "adam"], "init": ["scratch", "copy"], "rule": ["joint", "blockwise"],
                "student_bn": ["train", "eval"], "targets": ["seen", "old-bucket"], "distill": ["bce", "kd"],
                "scores": ["linear", "cosine"], "prompt_init": ["uniform", "zero"], "key_init": ["uniform", "zero"],
                "pooling": ["prompt", "token"]}
# an option whose other value is valid only with another option's (the component's own checks)
COMPANION = {("dfgr", "update_bn"): {"forward": "separate"}}
# component names that are also values of run options (the lr schedule "cosine"), not references to the component
RUN_OPTION_VALUES = {"cosine"}
COMPONENTS = [(k, n) for k in KINDS for n in REGISTRIES[k].names()]


def test_every_kind_has_components():
    assert set(REGISTRIES) == set(KINDS)
    assert all(REGISTRIES[k].names() for k in KINDS), [k for k in KINDS if not REGISTRIES[k].names()]


def resolved(kind: str, name: str, extra: dict | None = None):
    """(resolved RunConfig, plan) of a digits run that has component ``name``."""
    method, choice = CHOICE[kind]
    d = merge({"method": method, **choice(name)}, extra or {})
    cfg = from_dict(RunConfig, d)
    recipe = METHODS.get(method)
    epochs_given = cfg.train.epochs is not None
    cfg = resolve(cfg, 10, 8, recipe.training)
    p = plan(cfg, 8, True, RunFacts(cfg, recipe.training.for_dataset("digits"), "digits" in QUICK_EPOCHS, epochs_given))
    resolved_config(cfg, p)
    return cfg, p


def services():
    return types.SimpleNamespace(progress=False, device=torch.device("cpu"), net=None, seed=0, log=None)


@pytest.mark.parametrize("kind,name", COMPONENTS, ids=[f"{k}:{n}" for k, n in COMPONENTS])
def test_declared_defaults_reach_config_and_component(kind, name):
    cfg, p = resolved(kind, name)
    cls = REGISTRIES[kind].get(name)
    assert cls in p.classes
    written = prune(to_dict(cfg), cfg, p)["components"][name]               # what config.yaml holds
    recipe = p.recipe
    set_by_recipe = {**recipe.options.get(kind, {}), **recipe.options.get(name, {})}
    declared = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cls.Options)}
    expected = cls.resolve({**declared, **{k: v for k, v in set_by_recipe.items() if k in declared}},
                           RunFacts(cfg, recipe.training.for_dataset("digits"), True, False))
    assert written == options_dict(parse_options(cls, expected)), name
    part = next(c for c in p.build(services()) if c.name == name)
    assert options_dict(part.options) == written                            # the component runs with them


def other_value(cls, field: dataclasses.Field, current, companion: dict):
    """A valid value of ``field`` other than ``current`` (None where none is found)."""
    tp = typing.get_type_hints(cls.Options)[field.name]
    args = set(typing.get_args(tp)) or {tp}
    if typing.get_origin(tp) is list:     # a list of block indices (components.dualprompt.blocks): one fewer, or shifted
        cands = [current[:-1], current[1:], [i + 1 for i in current]]
    elif str in args:
        cands = OTHER_STRING.get(field.name, [])
        assert cands, f"give tests/test_components.py OTHER_STRING an alternative for string option {field.name}"
    elif bool in args:
        cands = [not current]
    elif int in args:
        cands = [(current or 0) + 1, (current or 1) * 4, 9, 1, 2]
    else:
        cands = [(current or 1.0) / 2, (current or 1.0) * 2, 0.5, 0.25]
    for v in cands:
        if v == current:
            continue
        try:
            parse_options(cls, {**companion, field.name: v})
            return v
        except ConfigError:
            continue
    return None


@pytest.mark.parametrize("kind,name", COMPONENTS, ids=[f"{k}:{n}" for k, n in COMPONENTS])
def test_every_short_name_and_components_entry_sets_its_option(kind, name):
    cls = REGISTRIES[kind].get(name)
    cfg0, p0 = resolved(kind, name)
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    tried = 0
    for alias, field in list(aliases_of(cls).items()) + [(None, f) for f in fields]:
        current = cfg0.components[name][field]
        companion = COMPANION.get((name, field), {})
        v = other_value(cls, fields[field], current, companion)
        assert v is not None, f"{name}.{field}: no other valid value found to try"
        extra = {"components": {name: {**companion, field: v}}} if alias is None else \
            merge(_nested(alias, v), {"components": {name: companion}} if companion else {})
        cfg, _ = resolved(kind, name, extra)
        assert cfg.components[name][field] == v, (name, alias or f"components.{name}.{field}")
        tried += 1
    assert tried == len(aliases_of(cls)) + len(fields)


def _nested(dotted: str, value) -> dict:
    d: dict = {}
    cur = d
    *head, last = dotted.split(".")
    for k in head:
        cur = cur.setdefault(k, {})
    cur[last] = value
    return d


def test_a_short_name_no_component_of_the_run_declares_is_refused():
    resolved("term", "kd", {"loss": {"less_forget_weight": 5.0}})     # its default: changes nothing, accepted
    with pytest.raises(ConfigError, match="less-forget-weight 2.0 is not used by this run.*less-forget"):
        resolved("term", "kd", {"loss": {"less_forget_weight": 2.0}})
    with pytest.raises(ConfigError, match="unknown config key 'loss.no_such'"):
        resolved("term", "kd", {"loss": {"no_such": 1}})
    with pytest.raises(ConfigError, match="components.pod"):
        resolved("term", "kd", {"components": {"pod": {"flat_weight": 1.0}}})


def test_a_recipe_s_own_head_only_is_what_runs():
    """The former train.finetune_head_only (True by default) overrode every recipe's head_only
    without a word; now the recipe's value runs unless the user sets it."""
    from cilearn.methods import Recipe, register_recipe
    from cilearn.methods.baselines import ICARL
    register_recipe(dataclasses.replace(ICARL, name="icarl-ft-all", calibration=("balanced-finetune",),
                                        options={"balanced-finetune": {"head_only": False}}))
    try:                                       # (registered for this test only: other tests walk the recipes)
        assert isinstance(METHODS.get("icarl-ft-all"), Recipe)
        cfg = from_dict(RunConfig, {"method": "icarl-ft-all"})
        cfg = resolve(cfg, 10, 8, METHODS.get("icarl-ft-all").training)
        assert plan(cfg, 8).options["balanced-finetune"]["head_only"] is False
        cfg.aliases = {"train.finetune_head_only": True}
        assert plan(cfg, 8).options["balanced-finetune"]["head_only"] is True
    finally:
        METHODS.unregister("icarl-ft-all")


ENGINE = ("learner.py", "runner.py", "train.py", "prepare.py", "outputs.py", "methods/recipe.py", "methods/options.py",
          "components.py")


def test_the_engine_names_no_component():
    names = {n for k in KINDS for n in REGISTRIES[k].names()} - RUN_OPTION_VALUES
    pkg = Path(cilearn.__file__).parent
    for f in ENGINE:
        text = (pkg / f).read_text()
        code = "\n".join(line.split("#")[0] for line in text.splitlines())      # comments may cite a paper's part
        code = re.sub(r'""".*?"""', "", code, flags=re.S)                          # and docstrings
        found = sorted(n for n in names if re.search(rf"[\"']{re.escape(n)}[\"']", code))
        assert not found, f"{f} names {found}"
