"""CODA-Prompt (cilearn.coda_prompt): a new slice of components is orthogonal to itself and to the
earlier slices (Gram-Schmidt), even after those have trained; the earlier slices get no gradient in
a later phase and the current one does; the prompt is sum_m cos(q * A_m, K_m) P_m computed by hand;
prefix tuning acts on the chosen blocks only; the orthogonality term is the formula; an end-to-end
run on digits keeps the ViT's tensors bit for bit. Resume and replay: tests/test_resume_every_recipe.py;
torchrun: tests/test_distributed.py. A tiny random timm ViT (no download)."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import cilearn
from cilearn.coda_prompt import CodaViT, component_weights, orthogonal_rows, ortho_penalty
from cilearn.errors import ConfigError
from cilearn.model_io import build_from, read_spec
from conftest import backbone_for, quick_config, replayed_and_resumed
from test_prompts import images, vit


def coda(depth: int = 2, layers: int = 5, pool: int = 6, tasks: int = 3, length: int = 4) -> CodaViT:
    torch.manual_seed(0)
    return CodaViT(vit(depth=depth), pool=pool, length=length, layers=layers, tasks=tasks)


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().flatten(1).double()


# ---------------------------------------------------------------- Gram-Schmidt
def test_a_new_slice_is_orthonormal_and_orthogonal_to_the_earlier_slices():
    bb = coda()
    assert int(bb.opened) == 1 and bb.prompts[0].shape == (2, 2, 4, 32)   # [S blocks, m = 6 // 3, L, D]
    for params in (bb.keys, bb.attention, bb.prompts):
        for j in range(2):
            r = rows(params[0][j])
            assert torch.allclose(r @ r.T, torch.eye(2, dtype=r.dtype), atol=1e-6)
            assert not params[1][j].any() and not params[2][j].any()          # not opened yet: zeros
    with torch.no_grad():                                                  # as if slice 0 had trained: no longer orthogonal
        for params in (bb.keys, bb.attention, bb.prompts):
            params[0].add_(0.3 * torch.randn_like(params[0]))
    bb.open(1, torch.Generator().manual_seed(5))
    assert int(bb.opened) == 2
    for params in (bb.keys, bb.attention, bb.prompts):
        for j in range(2):
            old, new = rows(params[0][j]), rows(params[1][j])
            assert torch.allclose(new @ new.T, torch.eye(2, dtype=new.dtype), atol=1e-6)
            assert (old @ new.T).abs().max() < 1e-6                        # orthogonal to the (trained) earlier slice
        assert [p.requires_grad for p in params] == [False, True, False]
    before = [p.detach().clone() for p in bb.keys]
    bb.open(1, torch.Generator().manual_seed(6))                           # already open (a resumed phase): unchanged
    assert all(torch.equal(a, b) for a, b in zip(before, bb.keys))


def test_gram_schmidt_with_no_room_left_keeps_unit_draws():
    earlier = torch.eye(3)[:2]
    got = orthogonal_rows(earlier, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(got.norm(dim=1), torch.ones(2, dtype=got.dtype))
    assert (got[0, :2].abs() < 1e-9).all()                                 # the one direction left
    assert got[1, :2].abs().max() > 1e-3                                   # then no room: a plain unit draw


# ---------------------------------------------------------------- the weighted prompt
def test_the_prompt_is_the_attention_weighted_sum_computed_by_hand():
    q = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]])                  # [B 2, D 3]
    K = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])                 # [S 1, M 2, D]
    A = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]]])
    got = component_weights(q, K, A)
    for b in range(2):
        for m in range(2):
            want = F.cosine_similarity(q[b] * A[0, m], K[0, m], dim=0)
            assert abs(float(got[b, 0, m]) - float(want)) < 1e-6
    bb = coda(depth=1, pool=4, tasks=2)
    bb.open(1, torch.Generator().manual_seed(1))
    x = images(3)
    qx = bb.query(x)
    keys, attn, prompts = (t.detach() for t in bb.components())           # [1, 4, D], [1, 4, L, D]: both slices
    assert keys.shape == (1, 4, 32) and prompts.shape == (1, 4, 4, 32)
    hand = torch.stack([sum(float(F.cosine_similarity(qx[b] * attn[0, m], keys[0, m], dim=0)) * prompts[0, m]
                            for m in range(4)) for b in range(3)])
    assert torch.allclose(bb.prompt(qx)[:, 0], hand, atol=1e-5)


def test_prefix_tuning_changes_only_the_chosen_blocks_and_splits_keys_and_values():
    bb = coda(depth=2, layers=1)
    assert bb.blocks == (0,)
    v = bb.net.model
    assert "forward" in vars(v.blocks[0].attn) and "forward" not in vars(v.blocks[1].attn)   # block 1: timm's own
    seen = []
    v.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.append(m.__dict__.get("_prefix")))
    v.blocks[1].attn.register_forward_pre_hook(lambda m, a: seen.append(("block 1", m.__dict__.get("_prefix"))))
    x = images(2)
    q = bb.query(x)
    seen.clear()
    bb.give_query(q)
    bb(x)
    prefix, (_, other) = seen
    assert other is None                                                   # block 1: no prefix
    p = bb.prompt(q)[:, 0]                                                 # [B, L 4, D]
    assert prefix.shape == (2, 2, 2, 32)
    assert torch.equal(prefix[:, 0], p[:, :2]) and torch.equal(prefix[:, 1], p[:, 2:])   # first half keys, then values
    assert {n for n, t in bb.named_parameters() if t.requires_grad} == {"keys.0", "attention.0", "prompts.0"}
    with pytest.raises(ConfigError, match="even"):
        cilearn.models.part("adapter", "coda-prompt", length=5)


# ---------------------------------------------------------------- gradients
def test_the_earlier_slices_get_no_gradient_in_a_later_phase_and_the_ortho_term_is_the_formula():
    bb = coda(depth=1, pool=6, tasks=3).train()
    bb.open(1, torch.Generator().manual_seed(1))
    x = images(4)
    bb.give_query(bb.query(x))
    loss = bb(x)[1].pow(2).sum() + bb.ortho()
    loss.backward()
    for params in (bb.keys, bb.attention, bb.prompts):
        assert params[0].grad is None and params[2].grad is None           # earlier and later slices: none
        assert params[1].grad is not None and params[1].grad.abs().sum() > 0
    assert not any(t.grad is not None for t in bb.net.parameters())
    keys, attn, prompts = bb.components()
    want = sum(ortho_penalty(t[0]) for t in (keys, attn, prompts))
    r = keys[0].detach()
    assert abs(float(ortho_penalty(r)) - float(((r @ r.T - torch.eye(4)) ** 2).mean())) < 1e-7
    assert abs(float(bb.ortho().detach()) - float(want.detach())) < 1e-6


# ---------------------------------------------------------------- end to end
def coda_run(tmp, **over):
    d = {"scenario": {"base": 4, "increment": 3}, "data": {"dataset": "digits", "train_per_class": 20, "augment": "none"},
         "train": {"epochs": 2, "progress": False, "precision": "fp32", "schedule": "cosine"},
         **backbone_for("coda-prompt")}
    return quick_config(tmp, method="coda-prompt", out=None, **{**d, **over})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("timm")
    return cilearn.run(coda_run(tmp_path_factory.mktemp("coda"), components={"coda-prompt": {"ortho_weight": 0.1}}),
                       echo=False)


def test_coda_prompt_runs_on_digits_and_never_changes_the_backbone(run):
    m = run.metrics
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3]
    # (no accuracy threshold: the tiny random one-block ViT, as for L2P, docs/methods/prompts.md "Tests")
    assert all(set(r["loss"]) == {"cls", "ortho"} for r in m["phases"])
    spec = read_spec(run.out_dir)
    assert spec.architecture["adapter_options"]["tasks"] == 3               # resolved: 4 + 3 + 3 classes
    torch.manual_seed(spec.seed)
    init = build_from(spec.architecture).state_dict()
    final = load_file(run.out_dir / "model.safetensors")
    own = [k for k in init if k.startswith("backbone.net.")]
    assert own and all(torch.equal(final[f"net.{k}"], init[k]) for k in own)          # the ViT: bit for bit
    assert int(final["net.backbone.opened"]) == 3
    for t in range(3):
        assert not torch.equal(final[f"net.backbone.prompts.{t}"], init[f"backbone.prompts.{t}"]), t
    assert final["net.head.weight"].shape == (10, 32)


def test_coda_prompt_resumes_and_replays_and_its_model_evaluates_to_the_run(run, tmp_path, monkeypatch):
    from cilearn.api import evaluate
    replayed, resumed = replayed_and_resumed(run.out_dir, tmp_path, monkeypatch)
    assert replayed == run.metrics["accuracy_matrix"] and resumed == run.metrics["accuracy_matrix"]
    assert evaluate(run.out_dir, device="cpu")["acc"] == run.metrics["last_acc"]      # model.json rebuilds the slices


def test_coda_prompt_options_are_checked():
    from cilearn.models import part
    with pytest.raises(ConfigError, match="tasks"):
        part("adapter", "coda-prompt", pool=2, tasks=3)
    with pytest.raises(ConfigError, match="tasks"):
        part("adapter", "coda-prompt").adapt(vit())
    with pytest.raises(ConfigError, match="vision transformer"):
        part("adapter", "coda-prompt", tasks=2).adapt(torch.nn.Sequential())
