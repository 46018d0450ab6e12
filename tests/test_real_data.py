"""A short iCaRL run on the real Fashion-MNIST files (Debian's dataset-fashion-mnist, which
.ci/run installs); skipped where the files are absent."""
from pathlib import Path

import pytest

import cilearn

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_icarl_on_fashion_mnist(quick):
    cfg = quick(method="icarl", data={"dataset": "fashion-mnist", "train_per_class": 150},
                model={"backbone": "convnet"}, scenario={"base": 0, "increment": 5},
                train={"epochs": 4, "batch_size": 64, "progress": False}, memory={"total": 100})
    m = cilearn.run(cfg, echo=False).metrics
    assert len(m["phases"]) == 2 and m["phases"][1]["classes_seen"] == 10
    # the 5 hardest classes (coat, pullover, sneaker, shirt, T-shirt) after 4 epochs on 750
    # images: far above chance (20%)
    assert m["phases"][0]["acc"] > 60.0
    # after the second phase the old classes are still recognised well above chance (10%) by the
    # nearest-mean-of-exemplars classifier (the CNN head is biased to the new classes: not asserted)
    assert m["accuracy_matrix_nme"][1][0] > 30.0 and m["phases"][1]["acc_nme"] > 40.0
    assert m["memory"]["total_images"] == 100 and m["memory"]["total_bytes"] == 100 * 28 * 28


@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_cim_stores_more_exemplars_than_whole_images_on_fashion_mnist(quick):
    """On 28 x 28 images the CAM box leaves room: at 2 image units per class, CIM keeps more
    exemplars than the 2 whole images, each within its class's 2 * 784 bytes. (Small: a CIM run
    trains the network with phi's rational activations, ~4x a ReLU network's time on a CPU.)"""
    cfg = quick(method="icarl", data={"dataset": "fashion-mnist", "train_per_class": 40},
                model={"backbone": "convnet"}, scenario={"base": 0, "increment": 5},
                train={"epochs": 2, "batch_size": 64, "progress": False},
                memory={"per_class": 2, "compressor": "cim", "compression": {"iterations": 3}})
    mem = cilearn.run(cfg, echo=False).metrics["memory"]
    assert all(b <= 2 * 784 for b in mem["class_bytes"])
    assert sum(mem["class_images"]) > 20 and min(mem["class_images"]) >= 2
