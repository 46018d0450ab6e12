"""L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022): adapter component
``l2p``. Facts and numbers from the PyTorch port of the official code, JH-LEE-KR/l2p-pytorch
(``configs/cifar100_l2p.py``, ``prompt.py``, ``vision_transformer.py``, ``engine.py``), checked
against LAMDA-PILOT's ``exps/l2p.json`` and ``models/l2p.py``; file:line references are to those.

* The pre-trained ViT is frozen (``--freeze`` blocks, patch_embed, cls_token, norm, pos_embed,
  cifar100_l2p.py:97); a pool of 10 prompts of length 5 with learnable keys, 5 chosen per image
  (:79-81), keys and prompts U(-1, 1) (prompt.py:23-25, 32-34), prompt tuning
  (``cilearn.prompts.PromptedViT``, ``insert="prompt"``).
* The query is the frozen ViT's pre-logits ([CLS]) feature of the image without prompts
  (``embedding_key="cls"``, :89; engine.py:49-52). With the frozen ViT and an unaugmented training
  view it is computed once per image (``services.embed`` on the frozen ViT: the run's embedding
  cache, shared by the phases and by the on-disk cache); with flips, once per image and view
  (``services.views``); with continuous augmentation, on each batch in the forward. A training step
  is then at most the two forwards L2P needs.
* Batch-wise selection in training (``batchwise_prompt``, :88): every image of the batch takes the
  5 prompts chosen most often in it. At evaluation each image takes its own (cilearn's choice: the
  official code selects batch-wise at test time too, so a prediction there depends on the other
  images of its batch).
* The embedding is the mean of the prompt tokens' outputs after the final norm
  (``head_type="prompt"``, :96; vision_transformer.py:496-498), read by the run's linear head.
* The pull constraint: ``- 0.1 * sum_{b, j} cos(q_b, key_{idx[b, j]}) / B`` added to the loss
  (``pull_constraint_coeff``, :91-92; engine.py:67-68), the term ``pull`` (weight 0.1, value
  ``- reduce_sim``).

The recipe (``--method l2p``, ``cilearn.methods.pretrained``) adds the masking of the old classes'
logits in training (``train_mask``, :74; engine.py:59-64): the ``ce-local`` classification loss,
which without exemplars is that mask. docs/methods/prompts.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .components import Component, option, register
from .errors import ConfigError
from .models.heads import LinearHead
from .models.net import IncrementalNet
from .prompts import INITS, PromptedViT


@dataclass(frozen=True)
class L2POptions:
    pool: int = option(10, alias="model.pool_size")      # M: --size 10 (cifar100_l2p.py:79; exps/l2p.json:34)
    length: int = option(5, alias="model.prompt_length")  # L_p: --length 5 (:80)
    top_k: int = option(5, alias="model.top_k")          # N: --top_k 5 (:81)
    batchwise: bool = True           # batch-wise selection in training (:88); per image at evaluation
    pull_weight: float = 0.1         # lambda of the surrogate loss: --pull_constraint_coeff 0.1 (:92)
    prompt_init: str = "uniform"     # prompts U(-1, 1): --initializer uniform (:82; prompt.py:23-25)
    key_init: str = "uniform"        # keys U(-1, 1): --prompt_key_init uniform (:84; prompt.py:32-34)
    pooling: str = "prompt"          # --head_type prompt (:96): the prompt tokens' mean; token: the ViT's own

    def __post_init__(self):
        if self.pool < 1 or self.length < 1 or not 1 <= self.top_k <= self.pool:
            raise ConfigError(f"components.l2p: pool and length must be >= 1 and top_k in [1, pool], got "
                              f"{self.pool}, {self.length}, {self.top_k}")
        if self.prompt_init not in INITS or self.key_init not in INITS or self.pooling not in ("prompt", "token"):
            raise ConfigError(f"components.l2p: prompt_init and key_init must be one of {', '.join(INITS)} and pooling "
                              f"prompt or token, got {self.prompt_init}, {self.key_init}, {self.pooling}")
        if self.pull_weight < 0:
            raise ConfigError(f"components.l2p.pull_weight must be >= 0, got {self.pull_weight}")


@register("adapter", "l2p")
class L2P(Component):
    """L2P's prompt pool in a frozen ViT (module docstring): ``adapt`` builds the ``PromptedViT``;
    in each phase the queries of the training images are cached where the view allows
    (``phase_start``), handed to each step's forward (``before_step``), and the pull term read from
    the forward's selection (``terms``)."""
    Options = L2POptions
    needs_vit: ClassVar[bool] = True
    per_phase = ("queries",)

    def __init__(self, options, services):
        super().__init__(options, services)
        self.queries: torch.Tensor | None = None       # [V, N, D]: the query of training image i in view v

    def adapt(self, backbone: nn.Module) -> nn.Module:
        o = self.options
        return PromptedViT(backbone, o.pool, o.length, o.top_k, insert="prompt", pooling=o.pooling,
                           batchwise=o.batchwise, init=o.prompt_init, key_init=o.key_init, who=self.name)

    @staticmethod
    def query_net(bb: PromptedViT) -> IncrementalNet:
        """The frozen ViT alone as a network whose backbone is frozen (``embeddings.frozen``), so that
        ``services.embed`` caches its embeddings: the queries."""
        p = next(bb.net.parameters())
        net = IncrementalNet(bb.net, LinearHead(bb.out_dim).to(p.device))
        net.freeze_backbone()
        return net

    def phase_start(self, ctx):
        bb = ctx.model.backbone
        views = self.services.augmenter.num_views
        if views == 1:
            self.queries = self.services.embed(self.query_net(bb), ctx.x)[None]                # [1, N, D]
        elif views is not None:
            self.queries = self.services.views(ctx.x, lambda xb: (bb.query(xb).float(),))[0]   # [V, N, D]

    def before_step(self, step):
        if self.queries is not None and step.batch.view is not None:
            step.ctx.model.backbone.give_query(self.queries[step.batch.view, step.batch.idx])

    def terms(self, step, out):
        bb = step.ctx.model.backbone
        if bb.selection is None:
            return {}
        q, idx = bb.selection
        return {"pull": (self.options.pull_weight, -bb.pool.pull(q, idx))}
