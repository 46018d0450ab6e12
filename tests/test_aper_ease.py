"""Adapters (cilearn.adapters), APER and EASE (cilearn.ease): the adapters at initialisation are
what the official initialisation gives (AdaptFormer and SSF at std 0 leave the features unchanged
bit for bit; SSF and VPT give the hand-computed forward of the official placement); EASE's
synthesised prototypes and its subspace-weighted scores equal the formulas computed by hand; the
recipes run end to end (frozen parameters unchanged bit for bit, trained ones changed), resume
exactly and replay from config.yaml. Tests on vision transformers build a tiny random timm ViT (no
download) and skip where timm cannot be imported."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import cilearn
from cilearn.adapters import Branches
from cilearn.api import evaluate
from cilearn.checkpoint import Checkpointer
from cilearn.ease import Subspaces, SubspaceHead, synthesize
from cilearn.errors import ConfigError
from cilearn.model_io import build_from, read_spec
from cilearn.models import part
from conftest import TINY_VIT, backbone_for, quick_config

D = 192                      # vit_tiny's width


def tiny_vit(seed: int = 0, depth: int = 2):
    """A timm ViT-Tiny (width 192, 3 heads) on 16 px inputs, 8 px patches, ``depth`` blocks, random
    weights, as cilearn's ``timm:`` backbone wraps it."""
    timm = pytest.importorskip("timm")
    from cilearn.models.timm_backbones import TimmNet
    torch.manual_seed(seed)
    return TimmNet(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16,
                                     patch_size=8, depth=depth)).eval()


def hand_forward(vit, x, point=lambda where, i, t: t, mid=None, prompts=None, deep=True):
    """The class token of ``vit`` computed step by step from its modules' own ``forward`` (eval mode;
    no hook runs): ``point(where, block, t)`` changes the tensor at each of SSF's places, ``mid(block,
    t)`` is added to a block's output from its state after the attention (AdaptFormer's place),
    ``prompts`` ``[L, n, D]`` are appended after the tokens as VPT does (deep: before every block,
    dropped after it)."""
    t = point("patch", -1, vit.patch_embed.forward(x))
    t = torch.cat([vit.cls_token.expand(len(t), -1, -1), t], 1) + vit.pos_embed
    last = len(vit.blocks) - 1
    for i, b in enumerate(vit.blocks):
        if prompts is not None and (deep or i == 0):
            t = torch.cat([t, prompts[i if deep else 0].expand(len(t), -1, -1)], 1)
        a, mlp = b.attn, b.mlp
        h = point("norm1", i, b.norm1.forward(t))
        n, c = h.shape[1], h.shape[2]
        qkv = point("qkv", i, a.qkv.forward(h)).reshape(len(h), n, 3, a.num_heads, c // a.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        att = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
        t = t + point("proj", i, a.proj.forward((att @ v).transpose(1, 2).reshape(len(h), n, c)))
        m = t
        h = point("norm2", i, b.norm2.forward(t))
        t = t + point("fc2", i, mlp.fc2.forward(mlp.act(point("fc1", i, mlp.fc1.forward(h)))))
        if mid is not None:
            t = t + mid(i, m)
        if prompts is not None and (deep or i == last):
            t = t[:, : t.shape[1] - prompts.shape[1]]
    return point("norm", -1, vit.norm.forward(t))[:, 0]


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the adapters at initialisation
def test_adaptformer_starts_as_the_backbone_and_adds_its_bottleneck_in_parallel_to_the_mlp():
    x = images()
    plain = tiny_vit()(x)[1]
    bb = part("adapter", "adaptformer").adapt(tiny_vit()).eval()
    assert torch.equal(bb(x)[1], plain)                     # up-projection zero: the features unchanged, bit for bit
    sets = bb.model.adaptformer.sets
    assert len(sets) == 1 and len(sets[0]) == 2
    bound = 1 / math.sqrt(D)                                # kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), +)
    for b in sets[0]:
        assert b.down.weight.shape == (64, D) and b.down.weight.abs().max() <= bound and b.down.weight.std() > bound / 3
        assert not b.up.weight.any() and not b.up.bias.any() and not b.down.bias.any() and b.scale == 0.1
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all(".adaptformer." in n for n in trainable)            # the ViT's own: frozen
    with torch.no_grad():                                   # away from initialisation: the official placement
        for b in sets[0]:
            b.up.weight.normal_(0, 0.1)
            b.up.bias.normal_(0, 0.1)
    want = hand_forward(bb.model, x, mid=lambda i, m: 0.1 * sets[0][i].up(F.relu(sets[0][i].down(m))))
    assert torch.allclose(bb(x)[1], want, atol=1e-5) and not torch.allclose(want, plain, atol=1e-3)


def test_ssf_scales_and_shifts_every_official_place_and_is_the_identity_at_std_0():
    x = images()
    plain = tiny_vit()(x)[1]
    assert torch.equal(part("adapter", "ssf", init_std=0.0).adapt(tiny_vit()).eval()(x)[1], plain)
    torch.manual_seed(3)
    bb = part("adapter", "ssf").adapt(tiny_vit()).eval()
    pairs = bb.model.ssf.pairs
    assert len(pairs) == 1 + 6 * 2 + 1                      # patch embedding, 6 per block, final norm
    scale = torch.cat([p.scale for p in pairs]).detach()
    shift = torch.cat([p.shift for p in pairs]).detach()
    assert abs(scale.mean() - 1) < 0.005 and abs(shift.mean()) < 0.005             # N(1, 0.02), N(0, 0.02)
    assert 0.015 < scale.std() < 0.025 and 0.015 < shift.std() < 0.025
    where = ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")

    def point(name, i, t):
        k = 0 if name == "patch" else len(pairs) - 1 if name == "norm" else 1 + 6 * i + where.index(name)
        return t * pairs[k].scale + pairs[k].shift
    assert torch.allclose(bb(x)[1], hand_forward(bb.model, x, point), atol=1e-5)
    assert {n for n, p in bb.named_parameters() if p.requires_grad} == {n for n, _ in bb.model.ssf.named_parameters(
        prefix="model.ssf")}


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_appends_zero_prompts_where_the_official_code_does(deep):
    x = images()
    bb = part("adapter", "vpt", deep=deep).adapt(tiny_vit()).eval()
    tokens = bb.model.vpt.tokens
    assert tokens.shape == ((2 if deep else 1), 5, D) and not tokens.any()          # zeros (vpt.py)
    assert torch.allclose(bb(x)[1], hand_forward(bb.model, x, prompts=tokens, deep=deep), atol=1e-5)
    with torch.no_grad():
        tokens.normal_()
    assert torch.allclose(bb(x)[1], hand_forward(bb.model, x, prompts=tokens, deep=deep), atol=1e-5)
    assert [n for n, p in bb.named_parameters() if p.requires_grad] == ["model.vpt.tokens"]


def test_the_pretrained_branch_is_a_frozen_copy_beside_the_adapted_backbone():
    x = images()
    plain = tiny_vit()(x)[1]
    bb = part("adapter", "adaptformer", pretrained_branch=True).adapt(tiny_vit())
    assert isinstance(bb, Branches) and bb.out_dim == 2 * D and bb.trained_dim == D
    assert torch.equal(bb.eval()(x)[1], torch.cat([plain, plain], 1))
    assert not any(p.requires_grad for p in bb.frozen.parameters())
    assert not hasattr(bb.frozen.model, "adaptformer")               # the copy was taken before the adapters
    bb.train()
    assert not bb.frozen.training and not bb(x)[1][:, :D].any()      # training: the frozen branch is not computed


def test_an_adapter_needs_a_vision_transformer():
    with pytest.raises(ConfigError, match="--adapter ssf: the backbone .* is not a vision transformer"):
        part("adapter", "ssf").adapt(part("backbone", "convnet").create(1))


@pytest.mark.parametrize("flags,says", [
    (["--method", "aper-adapter"], "--adapter adaptformer: the backbone (ConvNet) is not a vision transformer"),
    (["--method", "l2p"], "--adapter l2p: the backbone (ConvNet) is not a vision transformer"),
    (["--method", "coda-prompt"], "--adapter coda-prompt: the backbone (ConvNet) is not a vision transformer"),
    (["--method", "dualprompt"], "--adapter dualprompt: the backbone (ConvNet) is not a vision transformer"),
    (["--method", "der", "--adapter", "finetune"], "--adapter finetune: an expandable network"),
    (["--method", "icarl", "--adapter", "lora"], "--adapter: unknown adapter component 'lora'; expected one of: "
                                                  "adaptformer, coda-prompt, dualprompt, ease, finetune, l2p, ssf, vpt"),
    (["--method", "aper-finetune", "--model.bottleneck", "8"], "--model.bottleneck 8 is not used by this run"),
])
def test_a_run_that_cannot_have_its_adapter_stops_with_one_line_and_writes_no_config(flags, says, tmp_path, capsys):
    from cilearn.cli import main
    out = tmp_path / "run"
    assert main(["run", *flags, "--dataset", "digits", "--out", str(out), "--no-progress", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (out / "config.yaml").exists()


def test_copies_of_an_adapted_backbone_run_their_own_adapters():
    """Hooks are bound to modules inside the backbone: a deep copy (the old model, a teacher) calls
    its own adapters."""
    x = images()
    bb = part("adapter", "adaptformer").adapt(tiny_vit()).eval()
    before = bb(x)[1]
    twin = copy.deepcopy(bb)
    with torch.no_grad():
        twin.model.adaptformer.sets[0][0].up.weight.fill_(0.1)
    assert not torch.equal(twin(x)[1], before) and torch.equal(bb(x)[1], before)


# ---------------------------------------------------------------- EASE
def test_ease_subspaces_grow_by_one_adapter_set_per_phase_and_load_into_a_fresh_backbone():
    from cilearn.data.scenario import Scenario
    x = images()
    phases = Scenario.make(6, 2, 2, list(range(6))).phases
    bb = part("adapter", "ease").adapt(tiny_vit())
    assert isinstance(bb, Subspaces) and bb.out_dim == D and bb.grow(phases[0]) == 0
    assert bb.grow(phases[1]) == D and bb.out_dim == 2 * D and bb.grow(phases[1]) == 0
    sets = bb.adapters.sets
    assert [any(p.requires_grad for p in s.parameters()) for s in sets] == [False, True]   # the newest trains
    with torch.no_grad():
        sets[0][0].up.weight.normal_(0, 0.1)
    emb = bb.eval()(x)[1]
    plain = tiny_vit()(x)[1]
    assert torch.equal(emb[:, D:], plain) and not torch.allclose(emb[:, :D], plain, atol=1e-3)
    assert not bb.train()(x)[1][:, :D].any()                          # training: only the newest set runs
    fresh = part("adapter", "ease").adapt(tiny_vit(seed=5))
    fresh.load_state_dict(bb.state_dict())
    assert len(fresh.adapters.sets) == 2 and torch.equal(fresh.eval()(x)[1], emb)


def hand_synthesis(w: list[list[float]], task: list[int], d: int) -> list[list[float]]:
    """EASE's solve_sim_reset written out with Python floats: for each old task i and subspace
    j > i, old rows in j = sum_k softmax_k(cos(old row in i, row k in i)) * (row k in j) over the
    classes k of tasks >= j."""
    w = [row[:] for row in w]
    last = len(w[0]) // d - 1

    def blk(row, j):
        return row[j * d:(j + 1) * d]

    def cos(a, b):
        return sum(p * q for p, q in zip(a, b)) / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))
    for i in range(last):
        for j in range(i + 1, last + 1):
            later = [k for k, t in enumerate(task) if t >= j]
            for c in [k for k, t in enumerate(task) if t == i]:
                e = [math.exp(cos(blk(w[c], i), blk(w[k], i))) for k in later]
                s = [v / sum(e) for v in e]
                new = [sum(s[n] * blk(w[k], j)[m] for n, k in enumerate(later)) for m in range(d)]
                w[c][j * d:(j + 1) * d] = new
    return w


def test_ease_synthesised_prototypes_are_the_formula_computed_by_hand():
    g = torch.Generator().manual_seed(0)
    task = [0, 0, 1, 1, 2, 2, 2]                              # three phases, 2 + 2 + 3 classes, 3 subspaces of width 3
    w = torch.randn(7, 9, generator=g, dtype=torch.float64)
    got = w.clone()
    synthesize(got, torch.tensor(task), 3)
    want = torch.tensor(hand_synthesis(w.tolist(), task, 3), dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.equal(got[:, :3], w[:, :3]) and torch.equal(got[2:, 3:6], w[2:, 3:6]) and torch.equal(got[4:], w[4:])
    only_new = w.clone()
    synthesize(only_new, torch.tensor(task), 3, recompute=False)         # solve_similarity: the newest subspace only
    assert torch.equal(only_new[:, :6], w[:, :6]) and torch.allclose(only_new[:, 6:], want[:, 6:], atol=1e-12)


def test_ease_scores_weight_each_class_s_own_subspace_1_and_the_others_alpha_over_t():
    head = SubspaceHead(2, alpha=0.1)
    for n in (2, 1, 2):
        head.add_classes(n)
    head.widen(4)
    assert head.task.tolist() == [0, 0, 1, 2, 2] and head.weight.shape == (5, 6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(5, 6, generator=g))
        head.sigma.fill_(2.0)
    x = torch.randn(3, 6, generator=g)
    want = torch.zeros(3, 5)
    for b in range(3):
        for c in range(5):
            for j in range(3):
                xs, ws = x[b, 2 * j:2 * j + 2], head.weight.detach()[c, 2 * j:2 * j + 2]
                r = 1.0 if j == head.task[c] else 0.1 / 2                   # alpha / T, T = 2
                want[b, c] += r * float(xs @ ws / (xs.norm() * ws.norm()))
    assert torch.allclose(head(x), 2.0 * want, atol=1e-6)
    head.reweight = False                                                    # use_reweight false: the whole cosine
    assert torch.allclose(head(x), 2.0 * F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T, atol=1e-6)


# ---------------------------------------------------------------- end to end
def test_aper_finetune_keeps_the_pretrained_branch_bit_for_bit_and_trains_the_other(quick, tmp_path):
    """aper-finetune on the convnet (no transformer needed): phase 0 fine-tunes a copy of the
    backbone beside the frozen one; the model file holds both; the saved model evaluates to the
    run's accuracy."""
    res = cilearn.run(quick(method="aper-finetune", scenario={"base": 4, "increment": 3},
                            data={"dataset": "digits", "train_per_class": 50},
                            train={"progress": False, "precision": "fp32"}), echo=False)
    m = res.metrics
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3]
    assert m["accuracy_matrix"][0][0] > 90 and m["last_acc"] > 60                # chance: 10
    assert set(m["phases"][0]["loss"]) == {"proxy"}                          # the adapted branch's own classifier
    w = load_file(res.out_dir / "model.safetensors")
    torch.manual_seed(res.config.seed)                                        # the run's initial backbone
    init = part("backbone", "convnet").create(1).state_dict()
    for k, v in init.items():
        assert torch.equal(w[f"net.backbone.frozen.{k}"], v), k              # frozen: bit for bit
    assert any(not torch.equal(w[f"net.backbone.trained.{k}"], v) for k, v in init.items() if v.is_floating_point())
    cfg = yaml.safe_load((res.out_dir / "config.yaml").read_text())
    assert cfg["model"]["adapter"] == "finetune" and cfg["components"]["finetune"] == {"pretrained_branch": True}
    assert cfg["loss"]["cls"] == "none"


# ---------------------------------------------------------------- end to end on a tiny random ViT
# digits, 4 + 3 + 3 classes, 50 training images per class; the recipes' own schedules (digits: 30 epochs
# where they train); the tiny ViT of conftest (width 32, one block), its weights seeded by the run's seed
RUNS = ("aper-adapter", "aper-ssf", "aper-vpt", "ease")


def vit_run(tmp, method: str, **over):
    return quick_config(tmp, method=method, out=None, scenario={"base": 4, "increment": 3},
                        data={"dataset": "digits", "train_per_class": 50},
                        train={"progress": False, "precision": "fp32"}, **{**backbone_for(method), **over})


@pytest.fixture(scope="module")
def vit_runs(tmp_path_factory):
    """Each recipe once on the tiny ViT: (metrics, run directory, the network's state at each phase's end)."""
    pytest.importorskip("timm")
    out = {}
    for method in RUNS:
        states = []
        real = Checkpointer.save_phase

        def save_phase(self, state, states=states, real=real):
            states.append({k: v.clone() for k, v in state["net"].items()})
            real(self, state)
        Checkpointer.save_phase = save_phase
        try:
            res = cilearn.run(vit_run(tmp_path_factory.mktemp(method), method), echo=False)
        finally:
            Checkpointer.save_phase = real
        out[method] = (res.metrics, res.out_dir, states)
    return out


def initial_state(run_dir) -> dict[str, torch.Tensor]:
    """The run's network as it was built, before any training (the same seed, the same draws)."""
    spec = read_spec(run_dir)
    torch.manual_seed(spec.seed)
    return build_from(spec.architecture).state_dict()


ADAPTED = {"aper-adapter": ".adaptformer.", "aper-ssf": ".ssf.", "aper-vpt": ".vpt."}


@pytest.mark.parametrize("method", ADAPTED)
def test_aper_trains_the_adapter_in_phase_0_alone_and_keeps_the_backbone_bit_for_bit(method, vit_runs):
    m, run_dir, states = vit_runs[method]
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3]
    assert m["accuracy_matrix"][0][0] > 45                   # 4 classes, chance 25 (measured 62.6-63.1)
    assert set(m["phases"][0]["loss"]) == {"proxy"} and all(not r["loss"] for r in m["phases"][1:])
    init, final = initial_state(run_dir), states[-1]
    adapter = [k for k in init if ADAPTED[method] in k]
    assert adapter and all(k.startswith("backbone.trained.model.") for k in adapter)
    for k, v in init.items():
        if k.startswith("backbone.") and k not in adapter:   # both branches' own tensors: bit for bit
            assert torch.equal(final[k], v), k
    assert any(not torch.equal(final[k], init[k]) for k in adapter)            # the adapter trained
    assert all(torch.equal(states[0][k], final[k]) for k in adapter)           # in phase 0 only
    # the classifier: each class's row is the mean of its [pre-trained, adapted] embeddings
    assert final["head.weight"].shape == (10, 2 * 32) and torch.equal(states[0]["head.weight"], final["head.weight"][:4])


def test_ease_trains_one_adapter_set_per_phase_and_freezes_the_earlier_ones(vit_runs):
    m, run_dir, states = vit_runs["ease"]
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3] and m["accuracy_matrix"][0][0] > 45
    assert all(set(r["loss"]) == {"proxy"} for r in m["phases"])              # every phase trains its set
    init = initial_state(run_dir)                                              # one set, as built
    own = [k for k in init if k.startswith("backbone.net.")]
    for phase, st in enumerate(states):
        assert sorted({int(k.split(".")[3]) for k in st if k.startswith("backbone.adapters.sets.")}) == \
            list(range(phase + 1))
        assert all(torch.equal(st[k], init[k]) for k in own)                   # the ViT: bit for bit
        new = [k for k in st if k.startswith(f"backbone.adapters.sets.{phase}.") and ".up." in k]
        assert any(st[k].any() for k in new)                                   # the phase's set trained (up from 0)
        for earlier in range(phase):                                           # the earlier sets: frozen
            old = [k for k in st if k.startswith(f"backbone.adapters.sets.{earlier}.")]
            assert all(torch.equal(st[k], states[earlier][k]) for k in old)
    head = states[-1]
    assert head["head.weight"].shape == (10, 3 * 32) and head["head.task"].tolist() == [0] * 4 + [1] * 3 + [2] * 3
    # the old classes' prototypes in the later subspaces are the synthesised ones, the rest class means
    w = head["head.weight"].clone()
    synthesize(w, head["head.task"], 32)
    assert torch.equal(w, head["head.weight"])


@pytest.mark.parametrize("method", RUNS)
def test_the_recipes_replay_from_config_and_their_model_evaluates_to_the_run(method, vit_runs, tmp_path):
    """(Resumed exactly, after a phase and inside one: tests/test_resume_every_recipe.py on the same ViT.)"""
    from cilearn.cli import main
    m, run_dir, _ = vit_runs[method]
    assert main(["run", "--config", str(run_dir / "config.yaml"), "--out", str(tmp_path / "replay"), "--quiet"]) == 0
    assert json.loads((tmp_path / "replay" / "metrics.json").read_text())["accuracy_matrix"] == m["accuracy_matrix"]
    assert evaluate(run_dir, device="cpu")["acc"] == m["last_acc"]             # model.json rebuilds the adapted net


def test_ranpac_with_adaptformer_trains_the_adapter_in_phase_0_then_solves_on_its_embedding(tmp_path):
    pytest.importorskip("timm")
    cfg = vit_run(tmp_path, "ranpac", components={"ridge": {"dim": 64}}, model={**TINY_VIT, "adapter": "adaptformer"})
    res = cilearn.run(cfg, echo=False)
    m = res.metrics
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3] and m["accuracy_matrix"][0][0] > 45
    assert set(m["phases"][0]["loss"]) == {"cls"}            # the ridge head's cosine classifier, no proxy
    init, final = initial_state(res.out_dir), load_file(res.out_dir / "model.safetensors")
    for k, v in init.items():
        if k.startswith("backbone.model.") and ".adaptformer." not in k:
            assert torch.equal(final[f"net.{k}"], v), k
    assert any(final[f"net.{k}"].any() for k in init if ".adaptformer." in k and ".up." in k)
    assert read_spec(res.out_dir).architecture["adapter"] == "adaptformer"
