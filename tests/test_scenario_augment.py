"""Class order, phases, relabelling and the batched augmentation."""
import numpy as np
import pytest
import torch

from cilearn.data.augment import Augmenter, random_crop
from cilearn.data.scenario import Scenario, class_order


def test_class_order_matches_field_convention():
    assert class_order(100, 1993) == np.random.RandomState(1993).permutation(100).tolist()
    assert sorted(class_order(10, 0)) == list(range(10))


def test_phases_b50_inc10():
    s = Scenario.make(100, 50, 10, list(range(100)))
    assert [(p.start, p.end) for p in s.phases] == [(0, 50)] + [(50 + 10 * i, 60 + 10 * i) for i in range(5)]
    s0 = Scenario.make(10, 0, 2, list(range(10)))
    assert len(s0.phases) == 5 and s0.phases[-1].num_old == 8


def test_relabel_maps_order_to_incremental_ids():
    s = Scenario.make(4, 0, 2, [2, 0, 3, 1])
    assert s.relabel(torch.tensor([2, 0, 3, 1, 2])).tolist() == [0, 1, 2, 3, 0]


def test_random_crop_windows_of_padded_image():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = random_crop(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x[0], (1, 1, 1, 1))
    windows = {tuple(padded[:, i:i + 4, j:j + 4].flatten().tolist()) for i in range(3) for j in range(3)}
    got = {tuple(o.flatten().tolist()) for o in out}
    assert got <= windows and len(got) > 3      # only valid windows, and several of them


def test_augmenter_normalises_and_flip_views():
    aug = Augmenter("flip", 0, (0.5,), (0.25,), channels_last=False)
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert aug.test(x).flatten().tolist() == pytest.approx([-2.0, 2.0])
    assert aug.view(x, 1).flatten().tolist() == pytest.approx([2.0, -2.0])
    xb = x.repeat(100, 1, 1, 1)
    out, view = aug.train(xb, torch.Generator().manual_seed(0))
    flipped = out[:, 0, 0, 0] > 0
    assert torch.equal(flipped, view.bool()) and 20 < int(view.sum()) < 80
    assert aug.num_views == 2 and Augmenter("crop-flip", 4, (0,), (1,)).num_views is None


def test_augmentation_is_seeded():
    aug = Augmenter("crop-flip", 2, (0.5,), (0.5,))
    x = torch.randint(0, 255, (8, 1, 6, 6), dtype=torch.uint8)
    a, _ = aug.train(x, torch.Generator().manual_seed(3))
    b, _ = aug.train(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_rrc_keeps_shape_and_range():
    aug = Augmenter("rrc-flip", 0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), channels_last=False)
    x = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    out, view = aug.train(x, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16) and view is None
    assert out.min() >= 0 and out.max() <= 1.0


def test_rrc_scale_sets_the_smallest_crop():
    """``rrc_scale``: the crop's area is drawn in (rrc_scale, 1) of the image's (before the clamp of
    a side to the image): PILOT's and RanPAC's 0.05 gives smaller crops than torchvision's 0.08,
    and 0.9 only large ones."""
    def areas(scale):
        aug = Augmenter("rrc-flip", 0, (0.0,), (1.0,), rrc_scale=scale)
        theta = aug.draw((4000, 1, 16, 16), torch.Generator().manual_seed(0)).theta
        return theta[:, 0, 0] * theta[:, 1, 1]             # width x height, fractions of the image's
    small, default, large = areas(0.05), areas(0.08), areas(0.9)
    assert small.min() < 0.08 and small.min() >= 0.05 - 1e-6
    assert default.min() >= 0.08 - 1e-6 and large.min() >= 0.9 * 0.75 and large.mean() > 0.85
    assert small.max() <= 1 and large.max() <= 1


def test_rrc_scale_is_refused_where_the_run_does_not_crop_so(tmp_path, capsys):
    from cilearn.cli import main
    out = tmp_path / "run"
    assert main(["run", "--data.rrc-scale", "0.05", "--out", str(out), "--quiet"]) == 2     # digits: no augmentation
    err = capsys.readouterr().err
    assert "--data.rrc-scale 0.05 is not used" in err and "rrc-flip" in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["run", "--data.rrc-scale", "1.5", "--out", str(out), "--quiet"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
