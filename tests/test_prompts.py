"""Prompts (cilearn.prompts) and L2P (cilearn.l2p): an empty prompt leaves the ViT's forward as it
was; prompt tuning puts the chosen prompts after the class token with its position embedding, as
the official L2P code; prefix tuning extends only the chosen blocks' keys and values (an attention
computed by hand on a 2-token example); key matching chooses the expected prompts, batch-wise too,
and the pull constraint is the formula; L2P runs end to end with the ViT's own tensors unchanged bit
for bit, its queries from the cache, and resumes exactly and replays from config.yaml. Tests build a
tiny random timm ViT (no download) and skip where timm cannot be imported."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import cilearn
from cilearn.errors import ConfigError
from cilearn.model_io import build_from, read_spec
from cilearn.prompts import PromptedViT, PromptPool, prefixed_attention
from conftest import backbone_for, quick_config, replayed_and_resumed


def vit(seed: int = 0, depth: int = 2):
    """A timm ViT of width 32 (2 heads) on 16 px inputs, 8 px patches (4 patches + the class
    token), ``depth`` blocks, random weights, as cilearn's ``timm:`` backbone wraps it."""
    timm = pytest.importorskip("timm")
    from cilearn.models.timm_backbones import TimmNet
    torch.manual_seed(seed)
    return TimmNet(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16,
                                     patch_size=8, depth=depth, embed_dim=32, num_heads=2)).eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- insertion
@pytest.mark.parametrize("insert", ["prompt", "prefix"])
def test_an_empty_prompt_leaves_the_forward_as_it_was(insert):
    x = images()
    plain = vit()(x)[1]
    bb = PromptedViT(vit(), size=3, length=0, top_k=2, insert=insert, blocks=(0, 1), pooling="token").eval()
    got = bb(x)[1]
    assert got.shape == plain.shape
    assert torch.allclose(got, plain, atol=1e-6)
    if insert == "prompt":
        assert torch.equal(got, plain)                      # the very same computation
    assert not any(p.requires_grad for p in bb.net.parameters())


def test_prompt_tuning_puts_the_chosen_prompts_after_the_class_token_with_its_position():
    x = images(3)
    bb = PromptedViT(vit(), size=4, length=2, top_k=2, batchwise=False).eval()
    v = bb.net.model
    q = bb.net(x)[1]                                         # the query: the frozen ViT's pre-logits, no prompt
    idx = bb.pool.similarity(q).topk(2, dim=1).indices      # [B, 2]
    t = v.patch_embed(x)
    t = torch.cat([v.cls_token.expand(len(t), -1, -1), t], 1) + v.pos_embed           # [B, 5, D]
    p = bb.pool.prompts[idx].flatten(1, 2) + v.pos_embed[:, :1]                          # [B, 4, D]
    t = torch.cat([t[:, :1], p, t[:, 1:]], 1)
    for b in v.blocks:
        t = b(t)
    want = v.norm(t)[:, 1:5].mean(1)                        # the prompt tokens' mean (head_type "prompt")
    assert torch.allclose(bb(x)[1], want, atol=1e-5)


def hand_attention(attn, x, prefix):
    """Multi-head attention of tokens ``x`` ``[1, N, D]`` with prefix keys and values ``prefix``
    ``[1, 2, p, D]`` in front of the tokens', written out head by head."""
    H, D = attn.num_heads, x.shape[2]
    hd = D // H
    W, b = attn.qkv.weight, attn.qkv.bias
    qkv = x[0] @ W.T + b                                     # [N, 3D]
    q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
    k = torch.cat([prefix[0, 0], k])                         # [p + N, D]
    v = torch.cat([prefix[0, 1], v])
    heads = []
    for h in range(H):
        s = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(q[:, s] @ k[:, s].T / hd ** 0.5, dim=1)                         # [N, p + N]
        heads.append(a @ v[:, s])
    return (torch.cat(heads, 1) @ attn.proj.weight.T + attn.proj.bias)[None]


def test_prefix_tuning_extends_the_keys_and_values_as_by_hand():
    from timm.layers import Attention
    torch.manual_seed(0)
    attn = Attention(4, num_heads=2, qkv_bias=True).eval()
    x, prefix = torch.randn(1, 2, 4), torch.randn(1, 2, 1, 4)   # 2 tokens, 1 prefix token (key half, value half)
    plain = attn(x)
    attn.forward = prefixed_attention.__get__(attn)
    assert torch.allclose(attn(x), plain, atol=1e-6)         # no prefix set: timm's own forward
    attn._prefix = prefix
    got = attn(x)
    assert got.shape == (1, 2, 4)
    assert torch.allclose(got, hand_attention(attn, x, prefix), atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_prefix_tuning_changes_only_the_chosen_blocks_attention():
    x = images(2)
    plain, bb = vit(), PromptedViT(vit(), size=3, length=2, top_k=1, insert="prefix", blocks=(1,),
                                   pooling="token").eval()
    seen: dict[str, list] = {"plain": [], "prompted": []}
    for name, model in (("plain", plain.model), ("prompted", bb.net.model)):
        for blk in model.blocks:
            blk.attn.qkv.register_forward_hook(lambda m, a, o, name=name: seen[name].append(("qkv", o)))
            blk.attn.register_forward_hook(lambda m, a, o, name=name: seen[name].append(("attn", o)))
    plain(x)
    bb(x)
    (_, qkv0), (_, a0), (_, qkv1), (_, a1) = seen["plain"]
    (_, pqkv0), (_, pa0), (_, pqkv1), (_, pa1) = seen["prompted"][-4:]    # (after the query's plain forward)
    assert torch.equal(pqkv0, qkv0) and torch.allclose(pa0, a0, atol=1e-6)           # block 0: untouched
    assert torch.allclose(pqkv1, qkv1, atol=1e-6)            # block 1: the tokens' own queries, keys, values
    assert not torch.allclose(pa1, a1, atol=1e-3)            # ... attend to the prefix too
    assert bb.pool.prompts.shape == (3, 1, 4, 32)            # [P, blocks, key half then value half (2 L), D]
    with pytest.raises(ConfigError, match="blocks"):
        PromptedViT(vit(), size=3, length=2, top_k=1, insert="prefix", blocks=(2,), pooling="token")


# ---------------------------------------------------------------- key matching
def test_key_matching_chooses_the_most_similar_keys_and_the_pull_is_their_mean_cosine():
    pool = PromptPool(5, (1, 3), 3, top_k=2)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 1], [-1, 0, 0], [1, 1, 0]]))
    q = torch.tensor([[1.0, 0.1, 0], [0, 1, 0.2], [0, 0.1, 1]])
    idx = pool.select(pool.similarity(q))
    assert idx.tolist() == [[0, 4], [1, 4], [2, 1]]
    # batch-wise: the ids chosen most often in the batch (4 twice, then 1 twice: ties to the smaller id)
    assert pool.select(pool.similarity(q), batchwise=True).tolist() == [[1, 4]] * 3
    want = sum(float(F.cosine_similarity(q[b], pool.keys.detach()[j], dim=0)) for b in range(3) for j in idx[b]) / 3
    pull = pool.pull(q, idx)
    assert abs(float(pull.detach()) - want) < 1e-6
    pull.backward()
    assert pool.keys.grad is not None and not pool.keys.grad[3].any()               # the unchosen key: no gradient


# ---------------------------------------------------------------- L2P end to end
def l2p_run(tmp, **over):
    """A digits run of L2P on the tiny ViT of conftest (4 + 3 + 3 classes, 30 images each, 3 epochs,
    unaugmented); ``over`` replaces whole sections."""
    d = {"scenario": {"base": 4, "increment": 3}, "data": {"dataset": "digits", "train_per_class": 30, "augment": "none"},
         "train": {"epochs": 3, "progress": False, "precision": "fp32", "schedule": "cosine"}, **backbone_for("l2p")}
    return quick_config(tmp, method="l2p", out=None, **{**d, **over})


def handed(fn):
    """``fn()`` with every training forward of a ``PromptedViT`` recorded: whether its query was
    handed over (looked up) rather than computed in the forward; (fn's value, the records)."""
    got = []
    real = PromptedViT.forward

    def forward(self, x):
        if self.training:
            got.append(self._query is not None and len(self._query) == len(x))
        return real(self, x)
    PromptedViT.forward = forward
    try:
        return fn(), got
    finally:
        PromptedViT.forward = real


@pytest.fixture(scope="module")
def l2p(tmp_path_factory):
    """One L2P run on the tiny ViT of conftest (unaugmented), recording the training forwards' queries."""
    pytest.importorskip("timm")
    return handed(lambda: cilearn.run(l2p_run(tmp_path_factory.mktemp("l2p")), echo=False))


def test_l2p_trains_prompts_keys_and_head_and_never_the_backbone(l2p):
    res, calls = l2p
    m = res.metrics
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3]
    # (no accuracy threshold: on this random ViT of width 32 and one block, the prompt tokens' outputs
    # hardly depend on the image, so L2P stays near chance; docs/methods/prompts.md, "Tests")
    assert all(set(r["loss"]) == {"cls", "pull"} and r["loss"]["pull"] < 0 for r in m["phases"])
    assert calls and all(calls)                              # unaugmented: every query from the cache
    spec = read_spec(res.out_dir)
    torch.manual_seed(spec.seed)
    init = build_from(spec.architecture).state_dict()        # the network as built (the same seed)
    final = load_file(res.out_dir / "model.safetensors")
    own = [k for k in init if k.startswith("backbone.net.")]
    assert own and all(torch.equal(final[f"net.{k}"], init[k]) for k in own)          # the ViT: bit for bit
    for k in ("backbone.pool.prompts", "backbone.pool.keys"):
        assert not torch.equal(final[f"net.{k}"], init[k]), k
    assert final["net.head.weight"].shape == (10, 32)
    assert spec.architecture["adapter"] == "l2p"


def test_l2p_resumes_exactly_replays_from_its_config_and_its_model_evaluates_to_the_run(l2p, tmp_path, monkeypatch):
    from cilearn.api import evaluate
    res, _ = l2p
    replayed, resumed = replayed_and_resumed(res.out_dir, tmp_path, monkeypatch)
    assert replayed == res.metrics["accuracy_matrix"] and resumed == res.metrics["accuracy_matrix"]
    assert evaluate(res.out_dir, device="cpu")["acc"] == res.metrics["last_acc"]     # model.json rebuilds the prompts


def test_l2p_with_flips_caches_a_query_per_view_before_the_phase_trains(tmp_path):
    pytest.importorskip("timm")
    res, calls = handed(lambda: cilearn.run(l2p_run(
        tmp_path, data={"dataset": "digits", "train_per_class": 20, "augment": "flip"}, scenario={"base": 4, "increment": 6},
        train={"epochs": 1, "progress": False, "precision": "fp32"}), echo=False))
    assert [len(r) for r in res.metrics["accuracy_matrix"]] == [1, 2]
    assert calls and all(calls)              # every training step's query looked up (image, view)


def test_l2p_with_crops_computes_the_query_in_the_training_forward(tmp_path):
    pytest.importorskip("timm")
    res, calls = handed(lambda: cilearn.run(l2p_run(
        tmp_path, data={"dataset": "digits", "train_per_class": 20, "augment": "crop-flip"},
        scenario={"base": 4, "increment": 6}, train={"epochs": 1, "progress": False, "precision": "fp32"}), echo=False))
    assert calls and not any(calls)          # continuous views: no cache, the forward computes each query


def test_l2p_query_net_is_the_frozen_vit_whose_embeddings_the_run_caches():
    from cilearn.embeddings import frozen
    from cilearn.l2p import L2P
    bb = PromptedViT(vit(), size=4, length=2, top_k=2)
    q = L2P.query_net(bb)
    x = images()
    assert frozen(q) and q.backbone is bb.net                # services.embed caches it (cilearn.embeddings)
    with torch.no_grad():
        assert torch.equal(q.eval()(x).embedding, bb.query(x))
    assert {n for n, p in bb.named_parameters() if p.requires_grad} == {"pool.keys", "pool.prompts"}


def test_l2p_options_are_checked():
    from cilearn.models import part
    with pytest.raises(ConfigError, match="top_k"):
        part("adapter", "l2p", pool=3, top_k=4)
    with pytest.raises(ConfigError, match="vision transformer"):
        part("adapter", "l2p").adapt(nn.Sequential())
