"""Which options of the run configuration a run uses, and their effective values.

The config says what ran: ``resolve_options`` fills every option the run uses that was left to
the recipe (the head, the classification loss, the weights of the recipe's terms, ...) with the
value that runs, and ``config.yaml`` keeps only the options the run uses (``used``). An option
that the run does not use but the user set (a value other than its default) is a ConfigError
naming it and what it applies to (``check_unused``): ``--method icarl --loss.nca-margin 0.3``.

``CONDITIONAL`` lists the options used only by some runs, each with what decides it; every other
option is used by every run. A recipe lists the options its own code reads in ``options_used``.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from ..config import RunConfig
from ..errors import ConfigError
from ..memory.mnemonics import DEFAULTS as MNEMONICS_DEFAULTS

if TYPE_CHECKING:
    from .base import Method


def _terms(c: RunConfig, m: type["Method"]) -> set[str]:
    return set(m.terms) | set(c.loss.distill)


def _replay(c: RunConfig, m: type["Method"]) -> str:
    return c.replay.source or m.replay_source or "none"


def _recipe(key: str) -> Callable[[RunConfig, type["Method"]], bool]:
    return lambda c, m: key in m.options_used


def _uses_memory(c: RunConfig, m: type["Method"]) -> bool:
    return m.uses_memory or c.memory.total is not None or c.memory.per_class is not None


def _uses_temperature(c: RunConfig, m: type["Method"]) -> bool:
    return m.distill is not None or "dual-teacher" in _terms(c, m) or _replay(c, m) != "none" \
        or "loss.temperature" in m.options_used


# option (dotted, or a section prefix ending in ".") -> (used by this run?, what it applies to)
CONDITIONAL: dict[str, tuple[Callable[[RunConfig, type["Method"]], bool], str]] = {
    "model.proxies": (lambda c, m: (c.model.head or m.head) == "lsc", "the lsc head"),
    "model.scale": (lambda c, m: (c.model.head or m.head) in ("cosine", "lsc"), "the cosine and lsc heads"),
    "loss.nca_margin": (lambda c, m: (c.loss.cls or m.cls_loss) == "nca", "the nca classification loss"),
    "loss.la_beta": (lambda c, m: (c.loss.cls or m.cls_loss) == "la-ce", "the la-ce classification loss"),
    "loss.kd_weight": (lambda c, m: m.distill is not None, "recipes with logit distillation"),
    "loss.temperature": (_uses_temperature, "distillation (KD, dual-teacher, replay, FOSTER's compression)"),
    "loss.attention_weight": (lambda c, m: "attention" in _terms(c, m), "--distill attention"),
    "loss.dual_teacher_weight": (lambda c, m: "dual-teacher" in _terms(c, m), "--distill dual-teacher"),
    "loss.dual_teacher_init": (lambda c, m: "dual-teacher" in _terms(c, m), "--distill dual-teacher"),
    "loss.dual_teacher_epochs": (lambda c, m: "dual-teacher" in _terms(c, m), "--distill dual-teacher"),
    "loss.less_forget_weight": (lambda c, m: "less-forget" in _terms(c, m), "the less-forget term (LUCIR)"),
    "loss.margin": (lambda c, m: "margin-ranking" in _terms(c, m), "the margin-ranking term (LUCIR)"),
    "loss.margin_k": (lambda c, m: "margin-ranking" in _terms(c, m), "the margin-ranking term (LUCIR)"),
    "loss.margin_weight": (lambda c, m: "margin-ranking" in _terms(c, m), "the margin-ranking term (LUCIR)"),
    "loss.pod_spatial_weight": (lambda c, m: "pod" in _terms(c, m), "the pod term (PODNet)"),
    "loss.pod_flat_weight": (lambda c, m: "pod" in _terms(c, m), "the pod term (PODNet)"),
    "loss.aux_weight": (lambda c, m: m.expandable, "DER's and FOSTER's recipes"),
    "loss.bkd_beta": (_recipe("loss.bkd_beta"), "FOSTER's recipes"),
    "train.compression_epochs": (_recipe("train.compression_epochs"), "FOSTER's recipes"),
    "train.compression_lr": (_recipe("train.compression_lr"), "FOSTER's recipes"),
    "train.finetune_epochs": (lambda c, m: "balanced-finetune" in (c.calibration or ()), "--calibration balanced-finetune"),
    "train.finetune_lr": (lambda c, m: "balanced-finetune" in (c.calibration or ()), "--calibration balanced-finetune"),
    "train.finetune_head_only": (lambda c, m: "balanced-finetune" in (c.calibration or ()),
                                 "--calibration balanced-finetune"),
    "replay.": (lambda c, m: _replay(c, m) != "none", "a replay source (--replay dfgr)"),
    "memory.mnemonics.": (lambda c, m: (c.memory.optimizer or m.memory_optimizer) != "none",
                          "an exemplar optimizer (--memory.optimizer)"),
    "memory.compression.": (lambda c, m: (c.memory.compressor or m.memory_compressor) != "none",
                            "an exemplar compressor (--compressor)"),
    "memory.selection": (_uses_memory, "runs with exemplars"),
    "report.save_attention": (lambda c, m: "attention" in _terms(c, m), "--distill attention"),
    "report.save_samples": (lambda c, m: _replay(c, m) != "none", "a replay source (--replay dfgr)"),
    "data.data_dir": (lambda c, m: c.data.dataset != "digits", "data sets read from files (not digits)"),
    "data.image_size": (lambda c, m: c.data.dataset == "imagefolder", "image folders"),
    "data.train_list": (lambda c, m: c.data.dataset == "imagefolder", "image folders"),
    "data.test_list": (lambda c, m: c.data.dataset == "imagefolder", "image folders"),
    "data.cache_dir": (lambda c, m: c.data.dataset == "imagefolder", "image folders"),
    "data.workers": (lambda c, m: c.data.dataset == "imagefolder", "image folders"),
}
ALWAYS = {"replay.source"}   # the choice itself
# shorthands of a component's options (``components.<name>`` holds them in config.yaml)
ALIASES = {"loss.attention_weight", "loss.dual_teacher_weight", "loss.dual_teacher_init", "loss.dual_teacher_epochs",
           "loss.less_forget_weight", "loss.margin", "loss.margin_k", "loss.margin_weight", "loss.pod_spatial_weight",
           "loss.pod_flat_weight", "memory.compression.artifact_prob",
           *(f"replay.{f.name}" for f in dataclasses.fields(RunConfig().replay) if f.name != "source")}


def cheap_extra_stages(method_cls: type["Method"], replay_steps: int, iterations: int) -> dict[str, dict]:
    """Config sections that make a recipe's extra stages cheap, each only where the recipe has the
    stage (a run refuses options it does not use): the generator's steps, the exemplar optimizer's
    and the compressor's iterations. For quick runs (tests, benchmarks/behaviour_matrices.py)."""
    m, d = method_cls, {}
    if m.replay_source:
        d["replay"] = {"steps": replay_steps}
    mem = {**({"mnemonics": {"iterations": iterations}} if m.memory_optimizer != "none" else {}),
           **({"compression": {"iterations": iterations}} if m.memory_compressor != "none" else {})}
    if mem:
        d["memory"] = mem
    return d


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_leaves(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def _rule(key: str):
    if key in ALWAYS:
        return None
    if key in CONDITIONAL:
        return CONDITIONAL[key]
    return next((r for p, r in CONDITIONAL.items() if p.endswith(".") and key.startswith(p)), None)


def used(cfg: RunConfig, method_cls: type["Method"], key: str) -> bool:
    r = _rule(key)
    return r is None or r[0](cfg, method_cls)


def check_unused(cfg: RunConfig, method_cls: type["Method"]) -> None:
    """A ConfigError for the first option the user set (not its default) that this run does not use."""
    defaults = _leaves(RunConfig())
    for key, value in _leaves(cfg).items():
        r = _rule(key)
        if r is not None and value != defaults[key] and not r[0](cfg, method_cls):
            raise ConfigError(f"--{key.replace('_', '-')} {value!r} is not used by this run (--method {cfg.method}); "
                              f"it applies to {r[1]}")


def prune(d: dict, cfg: RunConfig, method_cls: type["Method"], prefix: str = "") -> dict:
    """``to_dict(cfg)`` without the options the run does not use (what ``config.yaml`` holds)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("components",) and not key.startswith("meta"):
            sub = prune(v, cfg, method_cls, key + ".")
            if sub:                  # a section none of whose options the run uses is left out
                out[k] = sub
        elif used(cfg, method_cls, key) and key not in ALIASES:
            out[k] = v
    return out


def resolve_options(cfg: RunConfig, method_cls: type["Method"], dataset_augment: str) -> None:
    """Fill, in place, the options the run uses that were left to the recipe or to another option
    with the values that run (what the code would compute from the null)."""
    m, t, lc = method_cls, cfg.train, cfg.loss
    cfg.model.head = cfg.model.head or m.head
    if cfg.model.last_relu is None:
        cfg.model.last_relu = m.last_relu
    if cfg.model.scale is None:
        cfg.model.scale = m.head_scale
    cfg.data.augment = cfg.data.augment or dataset_augment
    lc.cls = lc.cls or m.cls_loss
    if lc.kd_weight is None and not m.adaptive_kd_weight:
        lc.kd_weight = m.kd_weight
    if lc.aux_weight is None:
        lc.aux_weight = 1.0                             # DER's lambda_a, FOSTER's feature enhancement
    heads = m.head_component_names(cfg)
    t.weight_clip, t.freeze_old_head = "weight-clip" in heads, "freeze-old-rows" in heads
    if t.compression_epochs is None:
        t.compression_epochs = t.epochs
    if t.compression_lr is None:
        t.compression_lr = t.lr
    cfg.replay.source = _replay(cfg, m)
    dt = cfg.components.get("dual-teacher")
    if dt is not None and dt.get("epochs") is None:
        dt["epochs"] = t.epochs                         # the new-class teacher trains the phase's epochs
    mn = cfg.memory.mnemonics
    d = MNEMONICS_DEFAULTS.get(cfg.memory.optimizer)
    if d is not None:
        mn.epochs = d["epochs"] if mn.epochs is None else mn.epochs
        mn.lr = d["lr"] if mn.lr is None else mn.lr
        mn.step = d["step"] if mn.step is None else mn.step
    if cfg.memory.compression.inner_lr is None and cfg.memory.compressor == "cim":
        cfg.memory.compression.inner_lr = t.lr          # CIM's inner step at the CIL model's lr
