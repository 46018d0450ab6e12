"""DualPrompt (cilearn.dualprompt, cilearn.prompts.DualPromptViT): the G-prompt extends only its
blocks' attention and the E-prompt only its own (an attention computed by hand in every block); a
training forward takes the phase's E-prompt whatever the keys say, evaluation the one whose key is
nearest the query; only the chosen E-prompt and key get a gradient. End to end on digits: the ViT's
tensors never change, each phase trains its own E-prompt and key and leaves the earlier ones as they
were, a phase's E-prompt starts as the previous one's, the model evaluates to the run, the run
replays from config.yaml and resumes; at a larger lr phase 0 learns its classes. Resume inside a
phase and torchrun: the registry-driven tests (test_resume_every_recipe.py, test_distributed.py).
A tiny random timm ViT (no download); skipped where timm cannot be imported."""
import pytest
import torch
import yaml
from safetensors.torch import load_file

import cilearn
from cilearn.errors import ConfigError
from cilearn.model_io import build_from, read_spec
from cilearn.prompts import DualPromptViT
from conftest import backbone_for, quick_config, replayed_and_resumed
from test_prompts import hand_attention, images, vit


def dual(depth: int = 4, **over) -> DualPromptViT:
    """G-prompt (length 1) in block 0, a pool of 3 E-prompts (length 2) with keys in block 2."""
    kw = {"size": 3, "length": 2, "top_k": 1, "blocks": (2,), "g_length": 1, "g_blocks": (0,), **over}
    return DualPromptViT(vit(depth=depth), **kw)


def attention_io(bb: DualPromptViT, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block's attention in the prompted forward of ``x``."""
    seen, hooks = [], [blk.attn.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
                       for blk in bb.net.model.blocks]
    try:
        bb(x)
    finally:
        for h in hooks:
            h.remove()
    return seen[-len(bb.net.model.blocks):]          # (after the query's plain forward)


def test_g_prompt_and_e_prompt_extend_only_their_own_blocks_attention():
    bb = dual().eval()
    x = images(1)
    e = int(bb.pool.similarity(bb.query(x)).argmax())        # the E-prompt key matching chooses
    io = attention_io(bb, x)
    blocks = bb.net.model.blocks
    for b, (inp, out) in enumerate(io):
        attn = blocks[b].attn
        if b == 0:      # the G-prompt: [2, Lg, D] -> [1, 2, Lg, D]
            want = hand_attention(attn, inp, bb.g_prompt[0][None])
        elif b == 2:    # E-prompt e, its key half then its value half
            want = hand_attention(attn, inp, bb.pool.prompts[e, 0].unflatten(0, (2, 2))[None])
        else:           # timm's own attention
            want = type(attn).forward(attn, inp)
        assert torch.allclose(out, want, atol=1e-5), b
    plain = [(i, type(blocks[b].attn).forward(blocks[b].attn, i)) for b, (i, _) in enumerate(io)]
    assert not torch.allclose(io[0][1], plain[0][1], atol=1e-3) and not torch.allclose(io[2][1], plain[2][1], atol=1e-3)
    assert bb(x)[1].shape == (1, 32)                         # the [CLS] feature


def test_training_takes_the_phase_e_prompt_and_only_it_and_its_key_get_a_gradient():
    bb = dual().train()
    x = images(4)
    q = bb.query(x)
    with torch.no_grad():
        bb.pool.keys[0] = q.mean(0) * 5                      # key matching would choose E-prompt 0 ...
    bb.task = 1
    _, f = bb(x)
    q_, idx = bb.selection
    assert idx.tolist() == [[1]] * 4                         # ... training takes the phase's (task 1)
    (f.square().sum() - bb.pool.pull(q_, idx)).backward()
    gp, gk = bb.pool.prompts.grad, bb.pool.keys.grad
    assert gp[1].abs().sum() > 0 and not gp[0].any() and not gp[2].any()
    assert gk[1].abs().sum() > 0 and not gk[0].any() and not gk[2].any()
    assert bb.g_prompt.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in bb.net.parameters())       # the ViT: frozen
    bb.task = 3                                              # past the pool's end (3 E-prompts): key matching,
    bb(x)                                                    # batch-wise in training
    assert bb.selection[1].tolist() == [[0]] * 4


def test_evaluation_takes_the_e_prompt_whose_key_is_nearest_the_query():
    bb = dual(size=4).eval()
    x = images(3)
    q = bb.query(x)                                          # [3, D]
    with torch.no_grad():           # key j: image (j - 1)'s query; key 0 opposed to all of them
        bb.pool.keys[0] = -q.mean(0)
        bb.pool.keys[1:] = q
    bb.task = 0                     # (training only)
    assert bb.choose(q).tolist() == [[1], [2], [3]]
    want = []
    for i in range(3):              # each image with its own E-prompt set by hand as the only choice
        one = dual(size=4).eval()
        one.load_state_dict(bb.state_dict())
        with torch.no_grad():
            one.pool.keys.zero_()
            one.pool.keys[i + 1] = 1.0
        one.give_query(torch.ones(1, 32))
        want.append(one(x[i:i + 1])[1])
    assert torch.allclose(bb(x)[1], torch.cat(want), atol=1e-5)


def test_prompt_blocks_are_checked():
    with pytest.raises(ConfigError, match="g_blocks"):
        dual(g_blocks=(2,))                                  # a block of both sets
    with pytest.raises(ConfigError, match="blocks must be indices"):
        dual(depth=2)                                        # E-prompt block 2 of a 2-block ViT
    from cilearn.models import part
    with pytest.raises(ConfigError, match="top_k"):
        part("adapter", "dualprompt", pool=3, top_k=4)


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """DualPrompt on digits (4 + 3 + 3 classes, 30 images each, 3 epochs, unaugmented) on the tiny
    ViT of conftest (5 blocks), the E-prompts and keys recorded at every phase's start."""
    pytest.importorskip("timm")
    from cilearn.dualprompt import DualPrompt
    tmp = tmp_path_factory.mktemp("dualprompt")
    cfg = quick_config(tmp, method="dualprompt", out=None, scenario={"base": 4, "increment": 3},
                       data={"dataset": "digits", "train_per_class": 30, "augment": "none"},
                       train={"epochs": 3, "progress": False, "precision": "fp32"}, **backbone_for("dualprompt"))
    starts = []
    real = DualPrompt.phase_start

    def phase_start(self, ctx):
        bb = ctx.model.backbone
        before = (bb.pool.prompts.detach().clone(), bb.pool.keys.detach().clone())     # the previous phase's end
        real(self, ctx)
        starts.append((bb.task, before, (bb.pool.prompts.detach().clone(), bb.pool.keys.detach().clone())))
    DualPrompt.phase_start = phase_start
    try:
        return cilearn.run(cfg, echo=False), starts
    finally:
        DualPrompt.phase_start = real


def test_dualprompt_trains_one_e_prompt_per_phase_and_never_the_backbone(run):
    from cilearn.api import evaluate
    res, starts = run
    m = res.metrics
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3]
    assert all(set(r["loss"]) == {"cls", "pull"} for r in m["phases"])
    final = load_file(res.out_dir / "model.safetensors")
    ends = [s[1] for s in starts[1:]] + [(final["net.backbone.pool.prompts"], final["net.backbone.pool.keys"])]
    for t, ((task, (pb, kb), (p0, k0)), (p1, k1)) in enumerate(zip(starts, ends)):
        assert task == t
        if t > 0:                                            # starts as the previous phase's E-prompt (not its key)
            assert torch.equal(p0[t], pb[t - 1]) and not torch.equal(p0[t], pb[t]) and torch.equal(k0, kb)
        assert not torch.equal(p1[t], p0[t]) and not torch.equal(k1[t], k0[t])    # phase t trains E-prompt t, key t
        others = [j for j in range(10) if j != t]
        assert torch.equal(p1[others], p0[others]) and torch.equal(k1[others], k0[others])
    spec = read_spec(res.out_dir)
    torch.manual_seed(spec.seed)
    init = build_from(spec.architecture).state_dict()        # the network as built (the same seed)
    own = [k for k in init if k.startswith("backbone.net.")]
    assert own and all(torch.equal(final[f"net.{k}"], init[k]) for k in own)          # the ViT: bit for bit
    assert not torch.equal(final["net.backbone.g_prompt"], init["backbone.g_prompt"])
    assert spec.architecture["adapter"] == "dualprompt"
    assert evaluate(res.out_dir, device="cpu")["acc"] == m["last_acc"]     # model.json rebuilds the prompts


def test_dualprompt_replays_from_its_config_and_resumes_at_a_phase_boundary(run, tmp_path, monkeypatch):
    res, _ = run
    replayed, resumed = replayed_and_resumed(res.out_dir, tmp_path, monkeypatch)
    assert replayed == res.metrics["accuracy_matrix"] and resumed == res.metrics["accuracy_matrix"]
    assert yaml.safe_load((res.out_dir / "config.yaml").read_text())["components"]["dualprompt"]["blocks"] == [2, 3, 4]


def test_dualprompt_learns_its_classes_at_a_larger_lr(tmp_path):
    """At its own lr (Adam 0.0028) a few epochs on digits barely move the head (tests/test_methods.py,
    NO_FLOOR); at 0.03 phase 0 learns its two classes on the random ViT (measured: 95.5)."""
    pytest.importorskip("timm")
    cfg = quick_config(tmp_path, method="dualprompt", scenario={"base": 2, "increment": 8},
                       train={"epochs": 6, "progress": False, "schedule": "cosine", "lr": 0.03, "base_lr": 0.03},
                       **backbone_for("dualprompt"))
    assert cilearn.run(cfg, echo=False).metrics["accuracy_matrix"][0][0] > 75.0
