"""CIM as the official code does it (xfflzl/CIM-CIL; docs/methods/cim.md, issue 32): the meta-batch
(two consecutive train-augmented batches of the shuffled phase training set, every image of the
first one soft-compressed), the artifact augmentation's box on the stored image before the crop
and the flip, phi's coefficients across two phases (the old extractor's frozen, a new extractor
starting from the previous one's, FOSTER's student carrying the old extractor's), and an image
folder stored larger than the network input, compressed before the crop."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cilearn.cli import main
from cilearn.components import PhaseContext, Step, build, component_class
from cilearn.data.augment import Augmenter, Draw
from cilearn.data.scenario import Phase
from cilearn.memory.cim import MetaBatches, Rational, cil_split, cim_outer_loss, meta_batch
from cilearn.memory.codec import blur, own_box_artifacts, soft_compress
from cilearn.models import build_net
from cilearn.services import RunServices
from cilearn.train import Batch

GREY = ((0.0,), (1.0,))            # mean, std: normalised = pixels / 255


def services(quick, aug, seed=0):
    return RunServices(quick(), None, None, aug, torch.device("cpu"), torch.Generator().manual_seed(seed), None)


def compressor(quick, name, aug, options=None):
    return build(component_class("compressor", name), options or {}, services(quick, aug))


def indexed_images(n, side=4):
    """uint8 ``[n, 1, side, side]``: image i is all i (its rows can be told apart after any crop)."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, side, side).contiguous()


# ---------------------------------------------------------------- the meta-batch
def test_meta_batches_are_consecutive_batches_of_one_shuffled_pass_over_new_images_and_exemplars():
    """Official ``trainval_loader`` (models/foster.py:66-68): the phase's new images and the stored
    exemplars in one shuffled set, read ``bs`` at a time; a step takes two consecutive batches
    (inner, then outer), each augmented with the generator given."""
    x, y = indexed_images(10), torch.tensor([2, 2, 2, 3, 3, 3, 0, 0, 1, 1])     # 6 new images, 4 exemplars
    aug = Augmenter("flip", 0, *GREY, channels_last=False)
    calls = []

    def augment(xb, g):
        calls.append(len(xb))
        return aug.train(xb, g)[0]
    batches = MetaBatches(x, y, 4, torch.Generator().manual_seed(5), augment)
    first = meta_batch(batches)
    third, _, _, _ = meta_batch(batches)              # the pass's last, smaller batch, then a new pass
    ids = [(t[:, 0, 0, 0] * 255).round().long() for t in (first[0], first[2], third)]
    assert [len(i) for i in ids] == [4, 4, 2] and calls == [4, 4, 2, 4]
    assert sorted(torch.cat(ids).tolist()) == list(range(10))            # one pass: every image once
    assert all(torch.equal(y[i], yb) for i, yb in zip(ids, (first[1], first[3])))
    seen = torch.cat(ids[:2])
    assert bool((y[seen] < 2).any()) and bool((y[seen] >= 2).any())      # exemplars and new images mixed
    g = torch.Generator().manual_seed(5)                                 # the run's generator decides all
    order = torch.randperm(10, generator=g)
    assert torch.equal(ids[0], order[:4])
    assert torch.equal(first[0], aug.train(x[order[:4]], g)[0])          # augmented with the same generator


def test_every_image_of_the_inner_batch_is_soft_compressed_exemplars_too():
    """Official models/foster.py:165-181: the CAM of each image's label under the CIM forward, and
    ``c * x + (1 - c) * up(down(x))`` for the whole batch; the outer CE on the next batch, real."""
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1).eval()
    net.add_classes(4)
    comp_phi = build(component_class("compressor", "cim"), {}, None).model.ensure(net)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([2, 3, 0, 1, 2, 0])     # new images and exemplars
    vx, vy = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 1])
    seen = {}

    def inner(params, xs, ys):
        seen["x"], seen["y"] = xs.detach(), ys
        return F.cross_entropy(torch.func.functional_call(net, {**fixed, **params}, (xs,)).logits, ys)
    trainable, fixed = cil_split(net)
    with torch.no_grad():
        c, _, _ = comp_phi.cam_and_logits(net, x, y)
    cim_outer_loss(net, comp_phi, trainable, fixed, x, y, vx, vy, 2, 0.1, 0.1, 0.2, inner_loss=inner)
    assert torch.equal(seen["y"], y)
    assert torch.allclose(seen["x"], soft_compress(x, c, 2), atol=1e-6)
    assert not torch.allclose(seen["x"][y < 2], x[y < 2])                # the exemplars are compressed as well


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")     # (the steps are not taken here)
def test_the_cim_step_reads_its_batches_from_the_phase_training_set_with_the_run_augmentation(quick, monkeypatch):
    """``epoch_end`` builds the meta-batches from the phase's training set (new images and the
    stored exemplars) with the run's augmentation and generator."""
    from cilearn.memory import compressors
    aug = Augmenter("flip", 0, *GREY, channels_last=False)
    comp = compressor(quick, "cim", aug, {"batch_size": 3})
    net = build_net("convnet", "linear", 1)
    net.add_classes(4)
    comp.attach(net)
    phase = Phase(1, 2, 4)
    x, y = indexed_images(8, 8), torch.tensor([2, 2, 3, 3, 0, 0, 1, 1])
    ctx = PhaseContext(phase, net, None, x, y, torch.full((4,), 2.0), None)
    comp.phase_start(ctx)
    got = {}

    def fake_steps(net, phi, n, batches, *args, **kw):
        got["n"], got["batch"] = n, batches()
        return 0, None, None
    monkeypatch.setattr(compressors, "meta_steps", fake_steps)
    state = comp.services.gen.get_state()
    comp.epoch_end(ctx, 0)
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    order = torch.randperm(8, generator=g)
    first, second = order[:3], order[3:6]
    assert got["n"] == 1                                                 # max(1, int(0.5 x 2 new classes))
    assert torch.equal(got["batch"][0], aug.train(x[first], g)[0]) and torch.equal(got["batch"][1], y[first])
    assert torch.equal(got["batch"][2], aug.train(x[second], g)[0]) and torch.equal(got["batch"][3], y[second])


# ---------------------------------------------------------------- the artifact augmentation's boxes
def artifact_batch(comp, aug, x, box, drawn):
    """One training step of the new-class images ``x`` augmented by ``drawn``, through the
    compressor's artifact augmentation with probability 1 and ``box`` for every image."""
    comp.boxes_ = box.expand(len(x), 4).clone()
    comp.epochs_done = comp.options.artifact_refresh                     # probability = artifact_prob = 1
    xb, view = aug.apply(x, drawn)
    ctx = PhaseContext(Phase(0, 0, 2), None, None, x, torch.zeros(len(x), dtype=torch.long), torch.ones(2), None)
    step = Step(Batch(xb, ctx.y, torch.arange(len(x)), view, drawn), ctx)
    comp.before_step(step)
    return step.batch


def test_artifact_box_lands_on_the_same_pixels_after_a_flip_and_a_crop(quick):
    """Official utils/data_manager.py:186-193: the stored image is compressed around its box, then
    cropped and flipped. A constructed 8x8 image, box rows and columns 2..5, padded by 2, the 8x8
    window at (1, 3) of the padded image, flipped: output pixel (i, j) is stored pixel (i - 1, 8 - j),
    so the sharp pixels are exactly rows 3..6 and columns 3..6 of the output; the rest is the
    augmented blur."""
    aug = Augmenter("crop-flip", 2, *GREY, channels_last=False)
    comp = compressor(quick, "cam-threshold", aug, {"artifact_prob": 1.0, "artifact_refresh": 1})
    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    box = torch.tensor([[2, 2, 6, 6]])
    drawn = Draw(flip=torch.tensor([True]), corner=torch.tensor([[1, 3]]))
    out = artifact_batch(comp, aug, x, box, drawn)
    sharp, blurred = aug.apply(x, drawn)[0][0, 0], aug.apply(blur(x, 2).round().byte(), drawn)[0][0, 0]
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[3:7, 3:7] = True
    padding = aug.apply(torch.zeros_like(x), drawn)[0][0, 0] == 0        # (the window's rows outside the image)
    padding &= aug.apply(torch.full_like(x, 255), drawn)[0][0, 0] == 0
    got = out.x[0, 0]
    assert torch.equal(got[inside], sharp[inside])
    assert torch.equal(got[~inside], blurred[~inside])
    assert bool((sharp != blurred)[~inside & ~padding].any())           # (the two can be told apart there)
    assert out.view is None                                             # the old model runs on the changed images
    # the earlier order (the stored image's box on the cropped, flipped image) misses those pixels
    late = own_box_artifacts(aug.apply(x, drawn)[0] * 255, box, torch.tensor([True]), 2)[0, 0] / 255
    assert not torch.allclose(late, got)


def test_artifacts_before_a_resized_crop_of_a_larger_stored_image(quick):
    """rrc-flip from 16 px stored images to a 12 px input: the changed rows are the batch's own
    resized crop and flip of the compressed stored image, the unchanged rows as they were."""
    aug = Augmenter("rrc-flip", 0, *GREY, channels_last=False, size=12)
    comp = compressor(quick, "cam-threshold", aug, {"artifact_prob": 1.0, "artifact_refresh": 1})
    torch.manual_seed(1)
    x = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    drawn = aug.draw(x.shape, torch.Generator().manual_seed(2))
    box = torch.tensor([[4, 2, 12, 10]])
    out = artifact_batch(comp, aug, x, box, drawn)
    want = aug.apply(own_box_artifacts(x, box.expand(3, 4), torch.ones(3, dtype=torch.bool), 2), drawn)[0]
    assert out.x.shape == (3, 1, 12, 12) and torch.equal(out.x, want)


# ---------------------------------------------------------------- phi's coefficients across phases
def rationals(extractor):
    return [m for m in extractor.modules() if isinstance(m, Rational)]


def coefficients(extractor):
    return torch.cat([torch.cat([r.p, r.q]) for r in rationals(extractor)]).detach().clone()


def test_phi_across_two_phases_follows_the_official_lineage(quick):
    """Phase 1: the new extractor's rationals start as the old extractor's (utils/inc_net.py:420),
    only they are trained (the old extractor's frozen with it, models/foster.py:51-54, 98); FOSTER's
    student is the old extractor, rationals included (models/foster.py:309), and becomes the
    network (:43-44): phase 2's new extractor starts again from the phase-0 coefficients. DER keeps
    no student: its next extractor starts from phase 1's trained ones."""
    from cilearn.feature_compression import FeatureCompression
    torch.manual_seed(0)
    aug = Augmenter("none", 0, *GREY, channels_last=False)
    comp = compressor(quick, "cim", aug, {"inner_loss": "ce"})
    net = build_net("convnet", "linear", 1, expandable=True)
    net.add_classes(2)
    comp.attach(net)
    x, y = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), torch.tensor([0, 1] * 4)

    def start(phase, x, y):
        ctx = PhaseContext(phase, net, None, x, y, torch.bincount(y, minlength=phase.end).float(), None)
        comp.phase_start(ctx)
        return ctx

    start(Phase(0, 0, 2), x, y)
    ext0 = net.backbone.extractors[0]
    assert [id(p) for p in comp.model.parameters()] == [id(p) for r in rationals(ext0) for p in r.parameters()]
    with torch.no_grad():                                                  # phase 0's training of phi
        for k, r in enumerate(rationals(ext0)):
            r.p.add_(0.01 * (k + 1))
    phi0 = coefficients(ext0)

    old = net.frozen_copy()
    net.grow(Phase(1, 2, 4))
    x1, y1 = torch.cat([x, x]), torch.cat([y, y + 2])
    ctx = start(Phase(1, 2, 4), x1, y1)
    ext1 = net.backbone.extractors[1]
    assert torch.equal(coefficients(ext1), phi0)                           # started from the old extractor's
    assert {id(p) for p in comp.model.parameters()} == {id(p) for r in rationals(ext1) for p in r.parameters()}
    comp.epoch_end(ctx, 0)                                                 # one meta-iteration
    assert comp.steps == 1 and comp.skipped == 0
    assert torch.equal(coefficients(ext0), phi0)                           # the old extractor's: frozen
    phi1 = coefficients(ext1)
    assert not torch.equal(phi1, phi0)                                     # the new extractor's: trained
    assert all(not p.requires_grad for r in rationals(ext0) + rationals(ext1) for p in r.parameters())

    der = build_net("convnet", "linear", 1, expandable=True)                # DER: no student
    comp.attach(der)
    der.load_state_dict(net.state_dict())
    student = FeatureCompression.new_student(None, net, old, 2)           # FOSTER's student
    assert torch.equal(coefficients(student.backbone.extractors[0]), phi0)
    net.load_state_dict(student.state_dict())                              # phase_end: the student is the network
    for model, want in ((net, phi0), (der, phi1)):
        comp.attach(model)
        model.grow(Phase(2, 4, 6))
        comp.model.ensure(model)
        comp.phase_start(PhaseContext(Phase(2, 4, 6), model, None, x1, y1, torch.ones(6), None))
        assert torch.equal(coefficients(model.backbone.extractors[-1]), want)


# ---------------------------------------------------------------- an image folder stored larger than the input
def test_image_folder_stored_larger_than_the_input_is_compressed_before_the_crop(tmp_path):
    """Stored at 16 px (--image-size), the network input 12 px (--input-size): the exemplars are
    coded at the stored 16 px (one image unit = 3 x 16 x 16 bytes) and cropped afterwards, the
    boxes are on the whole stored image, evaluation takes the centre 12 px crop (the saved model
    too)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / "in" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(tmp_path / "in" / split / c / f"{i}.png")
    out = tmp_path / "run"
    assert main(["run", "--method", "icarl", "--compressor", "cam-threshold", "--dataset", "imagefolder",
                 "--data-dir", str(tmp_path / "in"), "--image-size", "16", "--input-size", "12", "--augment", "rrc-flip",
                 "--data.workers", "1", "--increment", "1", "--epochs", "1", "--memory-per-class", "1",
                 "--backbone", "convnet", "--precision", "fp32", "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["memory"]["unit_bytes"] == 3 * 16 * 16
    assert json.loads((out / "model.json").read_text())["input_size"] == 12
    from cilearn.data.datasets import load_dataset
    from cilearn.data.base import DataOptions
    from cilearn.model_io import load_model
    ds = load_dataset("imagefolder", DataOptions(data_dir=str(tmp_path / "in"), image_size=16, workers=1))
    model = load_model(out, device="cpu")
    want = model.net(((ds.test_x[:, :, 2:14, 2:14].float() / 255) - torch.tensor(ds.mean).view(1, 3, 1, 1))
                     / torch.tensor(ds.std).view(1, 3, 1, 1)).logits
    assert torch.allclose(model.logits(ds.test_x), want, atol=1e-5)


def test_an_input_size_below_one_is_one_line_and_writes_nothing(tmp_path, capsys):
    """(An input larger than the stored images is resized to it: tests/test_input_view.py.)"""
    assert main(["run", "--dataset", "digits", "--input-size", "0", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--input-size" in err[0] and "0" in err[0], err
    assert not (tmp_path / "r").exists()
