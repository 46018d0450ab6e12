"""SimpleCIL's prototype head, RanPAC's ridge head and the embedding cache they read (embed once):
the classifier after any sequence of phases is the one of a single phase on all the classes; the
ridge solution is the direct ridge solve of all seen data; lambda is the one the authors' criterion
picks; a frozen backbone embeds each image once per run, and not at all on a second run with the
disk cache; the recipes replay from config.yaml; a ridge head composes with a from-scratch recipe."""
import json

import pytest
import torch
import torch.nn.functional as F

from cilearn import runner
from cilearn.cli import main
from cilearn.embeddings import EmbeddingCache, image_keys
from cilearn.events import Observer
from cilearn.ranpac import RIDGES, choose_ridge, phase_statistics, ridge_features, solve

# the backbone as given (the run's seeded random convnet), nothing trained: a frozen backbone from phase 0
AS_GIVEN = {"epochs": 0, "base_epochs": 0, "progress": "never", "precision": "fp32"}
# a tiny randomly initialised timm ViT at digits' 16 px (5 tokens of 32, one block; nothing downloaded)
VIT = "timm:vit_tiny_patch16_224"
VIT_OPTIONS = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


def backbone(name: str) -> dict:
    """The run options of backbone ``name``: ``convnet`` (cilearn's, digits' default) or ``vit``
    (the tiny timm ViT, skipped where timm is not installed)."""
    if name == "convnet":
        return {}
    pytest.importorskip("timm")
    return {"model": {"backbone": VIT, "weights": "random"}, "components": {VIT: dict(VIT_OPTIONS)}}


BACKBONES = ["convnet", "vit"]


class Watch(Observer):
    """Keeps the run's objects and counts the images the backbone's forward sees."""
    rows = 0

    def on_start(self, run):
        self.run = run
        bb = run.net.backbone
        forward = bb.forward

        def counted(x):
            self.rows += len(x)
            return forward(x)
        bb.forward = counted


def go(quick, name, method="simplecil", base=0, increment=2, observer=None, net="convnet", **over):
    over = {**backbone(net), **over, "components": {**backbone(net).get("components", {}), **over.get("components", {})}}
    cfg = quick(method=method, out=None, train=dict(AS_GIVEN), scenario={"base": base, "increment": increment},
                **over)
    w = observer or Watch()
    return runner.run(cfg, echo=False, observer=w), w


# ---------------------------------------------------------------- SimpleCIL
@pytest.mark.parametrize("net", BACKBONES)
def test_simplecil_is_the_same_classifier_whatever_the_split(quick, net):
    got = {}
    for name, base, inc in (("inc2", 0, 2), ("inc5", 0, 5), ("joint", 10, 2)):
        res, w = go(quick, name, base=base, increment=inc, net=net)
        got[name] = (res.metrics["phases"][-1], w.run.net.head.weight.detach().clone())
    assert [got[n][0]["phase"] for n in got] == [4, 1, 0]                      # 5, 2 and 1 phases
    for name in ("inc5", "joint"):
        assert got[name][0]["acc"] == got["inc2"][0]["acc"]
        assert got[name][0]["per_class_acc"] == got["inc2"][0]["per_class_acc"]
        assert torch.equal(got[name][1], got["inc2"][1])          # the same class means, bit for bit
    # class means of a random network's features on digits, chance 10 (measured: convnet 84.22, tiny ViT 48.22)
    assert got["joint"][0]["acc"] > {"convnet": 70.0, "vit": 30.0}[net]


def test_prototypes_are_the_class_means_of_the_test_view(quick):
    res, w = go(quick, "means")
    run = w.run
    net = run.net.eval()
    with torch.no_grad():
        emb = net.backbone(run.augmenter.test(run.data.train_x))[1]
    means = torch.stack([emb[run.data.train_y == c].mean(0) for c in range(10)])
    assert torch.allclose(net.head.weight, means, atol=1e-5)
    assert net.head.sigma.item() == 1.0                           # PILOT's scale, never trained


# ---------------------------------------------------------------- embed once
def distinct(*xs) -> int:
    return len(set().union(*(image_keys(x) for x in xs)))


def test_a_frozen_backbone_embeds_each_image_once(quick, monkeypatch):
    res, w = go(quick, "once")
    d = w.run.data
    assert w.rows == distinct(d.train_x, d.test_x)       # every training and test image once, in 5 phases
    # without the cache: the prototypes' images once, and every phase's evaluation all seen test images
    monkeypatch.setattr(EmbeddingCache, "usable", lambda self, net: False)
    res2, w2 = go(quick, "every-time")
    seen_tests = sum(int((d.test_y < 2 * (t + 1)).sum()) for t in range(5))
    assert w2.rows == len(d.train_x) + seen_tests > w.rows
    assert res2.metrics["accuracy_matrix"] == res.metrics["accuracy_matrix"]


def test_the_cache_follows_the_backbone(quick):
    """A changed backbone is another key (new_phase: keys computed again): recomputed, not reused."""
    from cilearn.data.augment import Augmenter
    from cilearn.models import build_net
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    net.add_classes(2)
    net.freeze_backbone()
    cache = EmbeddingCache(Augmenter("none", 0, [0.5], [0.25], channels_last=False), 16, None, torch.device("cpu"))
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    a = cache.embed(net, torch.cat([x, x[:3]]))                   # 13 rows, 10 distinct images
    assert cache.computed == 10 and cache.reused == 3 and torch.equal(a[10:], a[:3])
    cache.new_phase()
    b = cache.embed(net, x[5:])
    assert cache.computed == 10 and torch.equal(b, a[5:10])       # the same backbone: looked up
    with torch.no_grad():
        next(net.backbone.parameters()).mul_(2)
    cache.new_phase()
    c = cache.embed(net, x)
    assert cache.computed == 20 and not torch.equal(c, a[:10])    # another backbone: embedded again
    with torch.no_grad():
        assert torch.allclose(c, net.eval()(cache.augmenter.test(x)).embedding)
    next(net.backbone.parameters()).requires_grad_(True)
    assert not cache.usable(net)                                  # a trainable parameter: not frozen


def test_the_disk_cache_serves_a_second_run(quick, tmp_path, capsys):
    store = tmp_path / "emb"
    first, w1 = go(quick, "disk1", data={"dataset": "digits", "embedding_cache": str(store)})
    files = sorted(store.iterdir())
    assert [f.suffix for f in files] == [".safetensors"]          # one backbone key, no temporary file left
    second, w2 = go(quick, "disk2", data={"dataset": "digits", "embedding_cache": str(store)})
    assert w1.rows > 0 and w2.rows == 0                           # nothing embedded again
    assert second.metrics["accuracy_matrix"] == first.metrics["accuracy_matrix"]
    from safetensors import safe_open
    with safe_open(str(files[0]), "pt") as f:                    # parsed, never unpickled; says what it keys
        assert set(f.keys()) == {"keys", "embeddings"} and f.metadata()["format"] == "cilearn-embeddings-1"
    files[0].write_bytes(b"not a safetensors file")
    code = main(["run", "--method", "simplecil", "--increment", "2", "--data.embedding-cache", str(store),
                 "--out", str(tmp_path / "bad"), "--no-progress", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(files[0]) in err and "delete it" in err, err


# ---------------------------------------------------------------- RanPAC
RIDGE = {"dim": 64, "ridge": 0.1}          # the projection (seeded) and lambda fixed


def ridge_run(quick, name, base, increment, net="convnet"):
    return go(quick, name, method="ranpac", base=base, increment=increment, net=net,
              components={"freeze-backbone": {"after": -1}, "ridge": dict(RIDGE)})


@pytest.mark.parametrize("net", BACKBONES)
def test_ridge_is_the_direct_solve_of_all_seen_data_whatever_the_split(quick, net):
    inc2, w2 = ridge_run(quick, "inc2", 0, 2, net)
    joint, wj = ridge_run(quick, "joint", 10, 2, net)
    run = w2.run
    model = run.net.eval()
    head = model.head
    with torch.no_grad():                                         # by hand, float64, all training images at once
        emb = model.backbone(run.augmenter.test(run.data.train_x))[1]
    h = F.relu(emb.double() @ head.projection.double())
    y = F.one_hot(run.data.train_y, 10).double()
    wo = torch.linalg.solve(h.T @ h + RIDGE["ridge"] * torch.eye(RIDGE["dim"], dtype=torch.float64), h.T @ y).T
    assert torch.equal(head.projection, wj.run.net.head.projection)        # seeded by the run's seed alone
    for got in (head.weight, wj.run.net.head.weight):
        assert torch.allclose(got.double(), wo, rtol=1e-4, atol=1e-6 * wo.abs().max().item())
    assert inc2.metrics["phases"][-1]["per_class_acc"] == joint.metrics["phases"][-1]["per_class_acc"]
    assert inc2.metrics["phases"][-1]["acc"] > {"convnet": 80.0, "vit": 60.0}[net]   # measured 89.78, 82.89
    assert [r["ridge_lambda"] for r in inc2.metrics["phases"]] == [0.1] * 5


def test_the_statistics_add_up_over_phases():
    torch.manual_seed(0)
    emb, y = torch.randn(50, 6), torch.randint(0, 4, (50,))
    proj = torch.randn(6, 9)
    g, q = phase_statistics(emb, y, proj, 4)
    g1, q1 = phase_statistics(emb[:20], y[:20], proj, 4)
    g2, q2 = phase_statistics(emb[20:], y[20:], proj, 4)
    h = ridge_features(emb, proj)
    assert g.dtype == torch.float64 and torch.allclose(g, h.T @ h) and torch.allclose(g1 + g2, g)
    assert torch.allclose(q, h.T @ F.one_hot(y, 4).double()) and torch.allclose(q1 + q2, q)
    assert torch.allclose(solve(g, q, 0.5), torch.linalg.solve(g + 0.5 * torch.eye(9, dtype=torch.float64), q).T)


def authors_choice(h, y, perm, num_classes, total_classes):
    """RanPAC.py:138-150 as written: the first 80% of the shuffled rows, one solve per lambda, the
    MSE over the one-hot targets of all the data set's classes, the first argmin."""
    h, y = h[perm], y[perm]
    n = int(len(h) * 0.8)
    onehot = F.one_hot(y, total_classes).double()
    q, g = h[:n].T @ onehot[:n], h[:n].T @ h[:n]
    losses = [F.mse_loss(h[n:] @ torch.linalg.solve(g + lam * torch.eye(len(g), dtype=g.dtype), q), onehot[n:])
              for lam in RIDGES]
    return RIDGES[int(torch.stack(losses).argmin())]


# more images than M (the primal form), fewer (the dual form); noisy classes, so that lambda matters
@pytest.mark.parametrize("n,m,noise", [(60, 40, 2.5), (40, 200, 5.0)])
def test_lambda_is_the_one_the_authors_criterion_picks(n, m, noise):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(3, m, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    h = (centres[y] + noise * torch.randn(n, m, generator=g, dtype=torch.float64)).relu()
    perm = torch.randperm(n, generator=g)
    lam, losses = choose_ridge(h, y, perm, 3)
    assert lam == authors_choice(h, y, perm, 3, total_classes=10)
    assert RIDGES[0] < lam < RIDGES[-1]                          # an inner value of the grid: the case tests something
    assert losses.index(min(losses)) == RIDGES.index(lam)


def test_too_few_images_to_choose_lambda_is_one_line():
    from cilearn.errors import ConfigError
    with pytest.raises(ConfigError, match="components.ridge.ridge"):
        choose_ridge(torch.ones(1, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.long), torch.arange(1), 1)


def test_pilot_scores_are_cosine(quick):
    from cilearn.ranpac import RidgeHead
    torch.manual_seed(0)
    lin, cos = RidgeHead(5, 7, "linear"), RidgeHead(5, 7, "cosine")
    for head in (lin, cos):
        head.add_classes(3)
        head.projection.copy_(torch.randn(5, 7))
    wo = torch.randn(3, 7)
    cos.projection.copy_(lin.projection)
    lin.set_solution(wo)
    cos.set_solution(wo)
    emb = torch.randn(4, 5)
    h = F.relu(emb @ lin.projection)
    assert torch.allclose(lin(emb), h @ wo.T) and torch.allclose(cos(emb), F.normalize(h, dim=1) @ F.normalize(wo, dim=1).T)
    assert lin.weight.requires_grad and not lin.train_weight.requires_grad      # after the solve: W_o trains, if anything
    fresh = RidgeHead(5, 7)
    fresh.add_classes(3)
    assert not fresh.weight.requires_grad and fresh.train_weight.requires_grad
    fresh.load_state_dict(lin.state_dict())
    assert fresh.weight.requires_grad and torch.equal(fresh(emb), lin(emb))   # the solved state restored


# ---------------------------------------------------------------- replay, composition
@pytest.mark.parametrize("method", ["simplecil", "ranpac"])
def test_the_recipes_replay_from_their_config(method, tmp_path, capsys):
    import json
    common = ["--increment", "2", "--no-progress", "--quiet"] + (["--components.ridge.dim", "64"] if method == "ranpac"
                                                                 else [])
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--method", method, *common, "--base-epochs", "2", "--out", str(a)]) == 0, capsys.readouterr().err
    assert main(["run", "--config", str(a / "config.yaml"), "--out", str(b), "--no-progress", "--quiet"]) == 0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["accuracy_matrix"] == mb["accuracy_matrix"]
    import yaml
    conf = yaml.safe_load((a / "config.yaml").read_text())
    assert conf["model"]["head"] == {"simplecil": "prototype", "ranpac": "ridge"}[method]
    assert conf["constraints"] == ["freeze-backbone"]


def test_a_ridge_head_on_icarl(quick):
    """Composition: iCaRL trains its backbone in phase 0, frozen after it (no epochs later), a
    ridge head and herding exemplars on the same cached features, NME beside the ridge's CNN accuracy."""
    cfg = quick(method="icarl", out=None, train={"epochs": 0, "base_epochs": 10, "progress": "never",
                                                  "precision": "fp32", "schedule": "cosine"},
                model={"head": "ridge"}, constraints=["freeze-backbone"], components={"ridge": {"dim": 256}})
    w = Watch()
    m = runner.run(cfg, echo=False, observer=w).metrics
    assert m["memory"]["total_images"] > 0 and m["avg_incremental_acc_nme"] is not None
    assert all(r["ridge_lambda"] in RIDGES for r in m["phases"])
    assert m["last_acc"] > 90.0 and m["avg_incremental_acc"] > 95.0     # measured 97.3 and 98.9 (seed 1993)


def test_each_phase_records_its_seconds_and_the_images_it_embedded(tmp_path):
    """metrics.json's phases: ``embedded_images`` counts each image once per run (a frozen
    backbone embeds a phase's new training and test images, nothing it saw before), and
    ``phase_seconds`` covers at least the training loop."""
    out = tmp_path / "r"
    assert main(["run", "--method", "simplecil", "--dataset", "digits", "--increment", "5", "--precision", "fp32",
                 "--out", str(out), "--no-progress", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    rows = m["phases"]
    assert len(rows) == 2 and all(r["phase_seconds"] >= r["train_seconds"] >= 0 for r in rows)
    # digits: 1797 images, train/test split of every image; both phases together embed each once
    assert sum(r["embedded_images"] for r in rows) == 1797
    assert rows[1]["embedded_images"] > 0


@pytest.mark.parametrize("method", ["simplecil", "ranpac"])
def test_on_a_timm_vit_the_recipes_resume_exactly_and_replay(method, tmp_path, monkeypatch):
    """On the tiny random timm ViT (RanPAC trains it in phase 0, one epoch, then freezes it):
    stopped after phase 0 and resumed, and replayed from config.yaml, the same accuracy matrix."""
    pytest.importorskip("timm")
    from conftest import replayed_and_resumed
    flags = [a for k, v in VIT_OPTIONS.items() for a in (f"--model.{k.replace('_', '-')}", str(v))]
    ref = tmp_path / "ref"
    own = ["--base-epochs", "1", "--components.ridge.dim", "64"] if method == "ranpac" else []
    assert main(["run", "--method", method, "--backbone", VIT, "--weights", "random", *flags, *own, "--base", "4",
                 "--increment", "3", "--train-per-class", "30", "--precision", "fp32", "--out", str(ref),
                 "--no-progress", "--quiet"]) == 0
    want = json.loads((ref / "metrics.json").read_text())["accuracy_matrix"]
    assert len(want) == 3
    assert replayed_and_resumed(ref, tmp_path, monkeypatch) == (want, want)
