"""The released splits of the pre-trained-model benchmarks (cilearn.data.released): tiny fakes of
each released layout (train/<class>/ + test/<class>/ under the folder name the reference code
reads) give the classes, counts, labels and class order of the reference code
(torchvision ImageFolder's sorted folders; PILOT's seeded permutation, VTAB's folder order), and
every bad input is one line, exit 2, nothing written."""
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from cilearn.cli import main
from cilearn.config import RunConfig, from_dict
from cilearn.data import imagefolder as imf
from cilearn.data.base import DataOptions
from cilearn.data.datasets import DATASETS, is_image_folder, load_dataset
from cilearn.data.released import DEFAULT_IMAGE_SIZE, RELEASES
from cilearn.data.scenario import class_order
from cilearn.methods import METHODS

RNG = np.random.default_rng(7)
BY_NAME = {r.name: r for r in RELEASES}
# class folders as each release names them (ImageNet wnids, CUB's numbered species, ObjectNet's
# names, OmniBenchmark's numbers, VTAB's classes); given unsorted: the loader sorts them
FOLDERS = {
    "imagenet-r": ["n01694178", "n01443537", "n01484850"],
    "imagenet-a": ["n01498041", "n01531178", "n01440764"],
    "cub200": ["002.Laysan_Albatross", "001.Black_footed_Albatross", "003.Sooty_Albatross"],
    "objectnet": ["alarm_clock", "backpack", "air_freshener"],
    "omnibenchmark": ["4", "10", "303"],        # ImageFolder's order is the strings': "10" < "303" < "4"
    "vtab": ["resisc45_airplane", "dtd_banded", "pets_beagle"],
}
N_TRAIN, N_TEST = 3, 2


def fake_release(parent, name, classes=None, n_train=N_TRAIN, n_test=N_TEST, fmt="PNG"):
    """``parent/<the reference's folder>/{train,test}/<class>/*``: small images of assorted sizes;
    returns the extracted folder."""
    root = parent / BY_NAME[name].folders[0]
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes or FOLDERS[name]:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(RNG.integers(9, 20)), int(RNG.integers(9, 20))
                Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / split / c / f"{c}_{i}.{fmt.lower()}", format=fmt)
    return root


def opts(data_dir, cache, size=8):
    return DataOptions(data_dir=str(data_dir), image_size=size, cache_dir=str(cache), workers=1, progress=False)


def one_line_exit_2(capsys, args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.removeprefix("cilearn: error: ")


def test_every_release_is_registered_as_an_image_folder():
    assert sorted(BY_NAME) == ["cub200", "imagenet-a", "imagenet-r", "objectnet", "omnibenchmark", "vtab"]
    for name in BY_NAME:
        assert name in DATASETS and is_image_folder(name)
        assert DATASETS.get(name).reads == ("data_dir", "image_size", "cache_dir", "workers")
    assert not is_image_folder("cifar100")
    # the recipes' ImageNet schedule on them, as on imagefolder
    der = METHODS.get("der").training
    assert der.for_dataset("imagenet-r") is der.imagenet and der.for_dataset("cifar100") is der.small
    from cilearn.methods.recipe import plan        # and the recipes' image-folder options (LUCIR's less-forget weight)
    def less_forget(dataset):
        return plan(from_dict(RunConfig, {"method": "lucir", "data": {"dataset": dataset}}), 224).options["less-forget"]
    assert less_forget("cub200")["weight"] == 10.0 == 2 * less_forget("cifar100")["weight"]
    assert [r.classes for r in RELEASES] == [200, 200, 200, 200, 300, 50] and DEFAULT_IMAGE_SIZE == 256


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_released_layout_classes_counts_labels(name, tmp_path):
    root = fake_release(tmp_path / "data", name)
    ds = load_dataset(name, opts(tmp_path / "data", tmp_path / "c"))       # the folder above the release
    names = sorted(FOLDERS[name])
    assert ds.name == name and ds.num_classes == 3 and ds.class_names == names
    assert ds.train_x.shape == (3 * N_TRAIN, 3, 8, 8) and ds.test_x.shape == (3 * N_TEST, 3, 8, 8)
    assert ds.train_y.tolist() == [k for k in range(3) for _ in range(N_TRAIN)]
    assert ds.test_y.tolist() == [k for k in range(3) for _ in range(N_TEST)]
    # row i is the i-th image of its class folder, decoded as every image folder is
    for split, x, n in (("train", ds.train_x, N_TRAIN), ("test", ds.test_x, N_TEST)):
        for k, c in enumerate(names):
            files = sorted((root / split / c).iterdir())
            assert np.array_equal(x[k * n + n - 1].numpy(), imf.decode_image(str(files[-1]), 8))
    assert ds.info["layout"] == "folders" and ds.info["test_dir"] == str(root / "test")
    # the extracted folder itself is accepted too, and its cache is the one already built
    again = load_dataset(name, opts(root, tmp_path / "c"))
    assert again.info["cache_hit"] is True and again.class_names == names


def test_omnibenchmark_numbered_folders_in_imagefolders_order(tmp_path):
    """torchvision's ImageFolder sorts class folders as strings; so does cilearn (label 0 is "10")."""
    fake_release(tmp_path, "omnibenchmark", n_train=1, n_test=1)
    ds = load_dataset("omnibenchmark", opts(tmp_path, tmp_path / "c"))
    assert ds.class_names == ["10", "303", "4"]


def test_vtab_under_pilots_folder_name_and_the_plain_one(tmp_path):
    """PILOT reads data/vtab-cil/vtab/, RevisitingCIL and RanPAC data/vtab/: both are found."""
    fake_release(tmp_path / "a", "vtab", n_train=1, n_test=1)
    assert (tmp_path / "a" / "vtab-cil" / "vtab" / "train").is_dir()
    assert load_dataset("vtab", opts(tmp_path / "a", tmp_path / "c")).num_classes == 3
    (tmp_path / "b").mkdir()
    os.rename(tmp_path / "a" / "vtab-cil" / "vtab", tmp_path / "b" / "vtab")
    assert load_dataset("vtab", opts(tmp_path / "b", tmp_path / "c")).num_classes == 3


def test_pilots_seeded_order_is_cilearns():
    """PILOT's data_manager: np.random.seed(seed); np.random.permutation(n): the first classes of
    the orders its logs print for seed 1993 (RevisitingCIL logs/simplecil/*: CIFAR-100, the 200-class
    sets, OmniBenchmark) are cilearn's class_order."""
    assert class_order(100, 1993)[:8] == [68, 56, 78, 8, 23, 84, 90, 65]
    assert class_order(200, 1993)[:8] == [168, 136, 51, 9, 183, 101, 171, 99]
    assert class_order(300, 1993)[:8] == [169, 221, 146, 296, 92, 229, 49, 70]
    np.random.seed(1993)
    assert class_order(200, 1993) == np.random.permutation(200).tolist()


@pytest.mark.parametrize("name, given, expected", [
    ("imagenet-r", None, class_order(3, 1993)),       # seeded, as PILOT with shuffle: true
    ("vtab", None, [0, 1, 2]),                        # the folders' order, as the reference's shuffle: false
    ("vtab", [2, 0, 1], [2, 0, 1]),                   # --scenario.class-order wins
])
def test_the_runs_class_order(name, given, expected, tmp_path):
    from cilearn.prepare import prepare
    fake_release(tmp_path, name, n_train=2, n_test=1)
    cfg = from_dict(RunConfig, {"method": "finetune", "data": {"dataset": name, "data_dir": str(tmp_path),
                                                                 "image_size": 8, "cache_dir": str(tmp_path / "c"),
                                                                 "workers": 1},
                                "scenario": {"increment": 1, "class_order": given}, "train": {"progress": False}})
    assert expected != [0, 1, 2] or name == "vtab"
    assert prepare(cfg)[0].scenario.class_order == expected


def test_a_run_on_a_release_records_its_data_set_and_order(tmp_path, capsys):
    fake_release(tmp_path / "data", "vtab", n_train=4, n_test=2, fmt="JPEG")
    out = tmp_path / "run"
    code = main(["run", "--method", "finetune", "--dataset", "vtab", "--data-dir", str(tmp_path / "data"),
                 "--image-size", "8", "--data.workers", "1", "--increment", "1", "--epochs", "1",
                 "--out", str(out), "--no-progress", "--quiet"])
    assert code == 0, capsys.readouterr().err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["dataset"] == "vtab" and cfg["data"]["image_size"] == 8
    assert cfg["scenario"]["class_order"] == [0, 1, 2] and "train_list" not in cfg["data"]
    metrics = yaml.safe_load((out / "metrics.json").read_text())
    assert metrics["class_names"] == sorted(FOLDERS["vtab"]) and len(metrics["phases"]) == 3
    # the run's model evaluates on its data set again (the cache the run built)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0, capsys.readouterr().err
    # an option the data set does not read is refused
    err = one_line_exit_2(capsys, ["run", "--dataset", "vtab", "--data-dir", tmp_path / "data",
                                   "--train-list", "x.txt", "--out", tmp_path / "r2"])
    assert "train-list" in err and "imagefolder" in err and not (tmp_path / "r2").exists()


def _no_train(root):
    os.rename(root / "train", root / "training")
    return "no train/ folder"


def _no_test(root):
    os.rename(root / "test", root / "val")       # a val/ folder is not the released test split
    return f"found {root / 'train'} but not {root / 'test'}"


def _empty_class(root):
    for f in (root / "test" / "n01484850").iterdir():
        f.unlink()
    return f"class folder {root / 'test' / 'n01484850'} has no images"


def _train_only_class(root):
    (root / "train" / "n09999999").mkdir()
    (root / "train" / "n01443537" / "n01443537_0.png").rename(root / "train" / "n09999999" / "a.png")
    return "missing n09999999"


def _undecodable(root):
    bad = root / "train" / "n01484850" / "n01484850_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return f"cannot decode image {bad}"


@pytest.mark.parametrize("damage", [_no_train, _no_test, _empty_class, _train_only_class, _undecodable],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_release_one_line_exit_2_nothing_written(damage, tmp_path, capsys):
    root = fake_release(tmp_path / "data", "imagenet-r", n_train=2, n_test=1)
    needle = damage(root)
    err = one_line_exit_2(capsys, ["run", "--dataset", "imagenet-r", "--data-dir", tmp_path / "data",
                                   "--image-size", "8", "--data.workers", "1", "--increment", "1", "--epochs", "1",
                                   "--data.cache-dir", tmp_path / "c", "--out", tmp_path / "run",
                                   "--no-progress", "--quiet"])
    assert needle in err and err.startswith(("imagenet-r:", "imagefolder:")), err
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "c").exists() or os.listdir(tmp_path / "c") == []      # no cache, no .tmp-* left


def test_missing_data_dir_names_the_release(tmp_path, capsys):
    err = one_line_exit_2(capsys, ["run", "--dataset", "cub200", "--out", tmp_path / "r"])
    assert err.startswith("cub200: --data-dir is required") and "CUB-200-2011" in err
    err = one_line_exit_2(capsys, ["run", "--dataset", "objectnet", "--data-dir", tmp_path / "nope",
                                   "--out", tmp_path / "r"])
    assert f"data directory {tmp_path / 'nope'} not found" in err and "objectnet" in err
    assert not (tmp_path / "r").exists()
