"""The input view (``--input-size``, ``--data.resize``, ``--data.interpolation``, ``--normalize``,
cilearn.data.augment): resize, centre crop, channel repeat and normalisation checked by hand on
tiny images; a run records the view in config.yaml and model.json; bad values are one line.
(The view a timm backbone's pretrained config gives: tests/test_timm_backbone.py.)"""
import json

import pytest
import torch
import yaml

from cilearn.cli import main
from cilearn.data.augment import Augmenter, resize_pixels
from cilearn.model_io import load_model

RUN = ["run", "--method", "finetune", "--backbone", "convnet", "--base", "4", "--increment", "3",
       "--train-per-class", "5", "--test-per-class", "5", "--epochs", "0", "--precision", "fp32", "--no-progress",
       "--quiet"]
X = torch.tensor([[0, 51], [102, 255]], dtype=torch.uint8).view(1, 1, 2, 2)


def blocks(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each pixel of ``x [..., H, W]`` as a ``k x k`` block (nearest upscaling by ``k``)."""
    return x.repeat_interleave(k, -2).repeat_interleave(k, -1)


def test_resize_then_centre_crop_then_repeat_and_normalise_by_hand():
    aug = Augmenter("none", 0, (0.5,), (0.25,), channels_last=False, size=2, resize=4, interpolation="nearest",
                    channels=3)
    assert aug.resized_side(2, 2) == (4, 4) and aug.out_size(2, 2) == (2, 2)
    assert torch.equal(aug.resized(X), blocks(X, 2))
    want = (X.float() / 255 - 0.5) / 0.25                   # the centre 2x2 of the 4x4 blocks is X itself
    assert torch.allclose(aug.test(X), want.expand(1, 3, 2, 2))
    # an input side larger than the images, no --data.resize: resized to it
    up = Augmenter("none", 0, (0.0,), (1.0,), channels_last=False, size=6, interpolation="nearest")
    assert torch.allclose(up.test(X), blocks(X, 3).float() / 255)
    # bilinear and bicubic keep a constant image constant, rounded to whole pixels
    flat = torch.full((1, 1, 3, 3), 77, dtype=torch.uint8)
    for mode in ("bilinear", "bicubic"):
        assert torch.equal(resize_pixels(flat, (7, 7), mode), torch.full((1, 1, 7, 7), 77, dtype=torch.uint8))
    # without a resize or a repeat the view is the images' own
    same = Augmenter("none", 0, (0.5,), (0.25,), channels_last=False)
    assert torch.equal(same.resized(X), X) and torch.allclose(same.test(X), want)


def test_crop_flip_crops_the_resized_images():
    aug = Augmenter("crop-flip", 0, (0.0,), (1.0,), channels_last=False, size=2, resize=4, interpolation="nearest")
    big = blocks(X, 2).float() / 255                            # [1, 1, 4, 4]
    windows = [big[..., i:i + 2, j:j + 2] for i in range(3) for j in range(3)]
    windows += [w.flip(-1) for w in windows]
    gen = torch.Generator().manual_seed(0)
    out, _ = aug.train(X.repeat(16, 1, 1, 1), gen)
    assert out.shape == (16, 1, 2, 2)
    assert all(any(torch.allclose(o, w[0]) for w in windows) for o in out)
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1           # random windows, not one


def test_a_run_records_its_view_and_its_model_uses_it(tmp_path):
    out = tmp_path / "r"
    assert main([*RUN, "--input-size", "16", "--data.interpolation", "nearest", "--normalize", "0.25/0.5",
                 "--out", str(out)]) == 0
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (data["input_size"], data["interpolation"], data["normalize"], data["resize"]) == (16, "nearest",
                                                                                              "0.25/0.5", None)
    spec = json.loads((out / "model.json").read_text())
    assert (spec["input_size"], spec["interpolation"], spec["mean"], spec["std"]) == (16, "nearest", [0.25], [0.5])
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    got = load_model(out, device="cpu").augmenter.test(x)
    assert torch.allclose(got, (blocks(x, 2).float() / 255 - 0.25) / 0.5)
    # the defaults of cilearn's own backbones: the data set's statistics, bilinear, the images' side
    plain = tmp_path / "plain"
    assert main([*RUN, "--out", str(plain)]) == 0
    data = yaml.safe_load((plain / "config.yaml").read_text())["data"]
    assert (data["input_size"], data["interpolation"], data["normalize"]) == (None, "bilinear", "dataset")


@pytest.mark.parametrize("flags,says", [
    (["--normalize", "imagenet"], "--normalize imagenet: 3 values per statistic, the network takes 1-channel"),
    (["--normalize", "0.5/0"], "--normalize must be one of dataset, imagenet, model, none or per-channel values"),
    (["--normalize", "model"], "--normalize model: this backbone has no pre-trained input configuration"),
    (["--data.interpolation", "lanczos"], "--data.interpolation must be one of bilinear, bicubic, nearest"),
    (["--input-size", "12", "--data.resize", "10"], "--input-size 12 must be at most --data.resize 10"),
    (["--input-size", "0"], "input-size"),
])
def test_a_bad_view_is_one_line(flags, says, tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*RUN, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and not out.exists(), err
