"""DualPrompt (Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-Free Continual
Learning", ECCV 2022): adapter component ``dualprompt``. Facts and numbers from the PyTorch port of
the official code, JH-LEE-KR/dualprompt-pytorch (``configs/cifar100_dualprompt.py``, ``prompt.py``,
``vision_transformer.py``, ``engine.py``, ``main.py``), compared with LAMDA-PILOT
(``exps/dualprompt.json``, ``models/dualprompt.py``); file:line references are to the port.

* The pre-trained ViT is frozen (``--freeze``, cifar100_dualprompt.py:110). Two prompt sets, both by
  prefix tuning (``cilearn.prompts.DualPromptViT``): the G-prompt, length 5 in blocks 0 and 1
  (:79-81), shared by every task; the E-prompts, a pool of 10 of length 5 in blocks 2, 3 and 4
  (:85-86, 90-91), each with a learnable key, one chosen per image (``top_k`` 1, :92). Prompts and
  keys U(-1, 1) (:93-95; prompt.py:44, 60; vision_transformer.py:433-435).
* Training in phase t takes E-prompt t for every image (``use_prompt_mask``, :96;
  vision_transformer.py:530-538) and pulls its key towards the queries: ``- 1.0 * sum_b cos(q_b,
  key_t) / B`` (``pull_constraint_coeff`` 1.0, :104; engine.py:67-68; prompt.py:137-139), the term
  ``pull``. Evaluation takes the E-prompt whose key is nearest the query (key matching).
* E-prompt t starts as a copy of E-prompt t - 1 (``shared_prompt_pool``, :98; engine.py:184-201);
  the keys are not copied (``shared_prompt_key`` false, :99).
* The query is the frozen ViT's [CLS] feature of the image without prompts (``embedding_key="cls"``,
  :101; engine.py:49-52), cached as L2P's (``cilearn.l2p``); the embedding the head reads is the
  prompted ViT's [CLS] feature (``head_type="token"``, :109; vision_transformer.py:581-583).

The recipe (``--method dualprompt``, ``cilearn.methods.pretrained``) adds the masking of the old
classes' logits in training (``train_mask``, :74; engine.py:59-64): the ``ce-local`` loss.
docs/methods/prompts.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .components import option, register
from .errors import ConfigError
from .l2p import L2P
from .prompts import INITS, DualPromptViT


@dataclass(frozen=True)
class DualPromptOptions:
    pool: int = option(10, alias="model.pool_size")      # E-prompts: --size 10 (cifar100_dualprompt.py:90)
    length: int = option(5, alias="model.prompt_length")  # E-prompt length: --length 5 (:91; 20 on ImageNet-R)
    top_k: int = option(1, alias="model.top_k")          # E-prompts per image: --top_k 1 (:92)
    blocks: list[int] = option(factory=lambda: [2, 3, 4])  # E-prompt blocks: --e_prompt_layer_idx 2 3 4 (:85)
    g_length: int = 5                    # G-prompt length: --g_prompt_length 5 (:79)
    g_blocks: list[int] = option(factory=lambda: [0, 1])   # G-prompt blocks: --g_prompt_layer_idx 0 1 (:80)
    task_prompts: bool = True            # training takes the phase's E-prompt: --use_prompt_mask (:96)
    shared_init: bool = True             # E-prompt t starts as E-prompt t - 1: --shared_prompt_pool (:98)
    batchwise: bool = True               # key matching in training, past the pool's end: --batchwise_prompt (:100)
    pull_weight: float = 1.0             # --pull_constraint_coeff 1.0 (:104; PILOT exps/dualprompt.json: 0.1)
    prompt_init: str = "uniform"         # U(-1, 1): main.py:67 passes --prompt_key_init uniform (:95)
    key_init: str = "uniform"            # --prompt_key_init uniform (:95; prompt.py:58-60)

    def __post_init__(self):
        if self.pool < 1 or self.length < 1 or not 1 <= self.top_k <= self.pool or self.g_length < 0:
            raise ConfigError(f"components.dualprompt: pool and length must be >= 1, top_k in [1, pool] and "
                              f"g_length >= 0, got {self.pool}, {self.length}, {self.top_k}, {self.g_length}")
        if not self.blocks or len(set(self.blocks)) < len(self.blocks) or len(set(self.g_blocks)) < len(self.g_blocks):
            raise ConfigError(f"components.dualprompt: blocks must be distinct and at least one, g_blocks distinct, "
                              f"got {list(self.blocks)}, {list(self.g_blocks)}")
        if self.prompt_init not in INITS or self.key_init not in INITS:
            raise ConfigError(f"components.dualprompt: prompt_init and key_init must be one of {', '.join(INITS)}, got "
                              f"{self.prompt_init}, {self.key_init}")
        if self.pull_weight < 0:
            raise ConfigError(f"components.dualprompt.pull_weight must be >= 0, got {self.pull_weight}")


@register("adapter", "dualprompt")
class DualPrompt(L2P):
    """DualPrompt's G- and E-prompts in a frozen ViT (module docstring): ``adapt`` builds the
    ``DualPromptViT``; each phase sets the E-prompts its training forwards take and starts them as
    a copy of the previous phase's (``phase_start``); the queries (cached where the view allows) and
    the pull term as L2P's."""
    Options = DualPromptOptions

    def adapt(self, backbone: nn.Module) -> nn.Module:
        o = self.options
        return DualPromptViT(backbone, o.pool, o.length, o.top_k, tuple(o.blocks), o.g_length, tuple(o.g_blocks),
                             batchwise=o.batchwise, init=o.prompt_init, key_init=o.key_init, who=self.name)

    def phase_start(self, ctx):
        bb, o, t = ctx.model.backbone, self.options, ctx.phase.index
        bb.task = t if o.task_prompts else None
        k = o.top_k
        if o.shared_init and t > 0 and (t + 1) * k <= o.pool:     # (a resumed phase then loads its own)
            with torch.no_grad():
                bb.pool.prompts[t * k:(t + 1) * k] = bb.pool.prompts[(t - 1) * k:t * k]
        super().phase_start(ctx)
