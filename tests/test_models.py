"""Backbones, heads and the incremental net."""
import pytest
import torch

from cilearn.models.backbones import BACKBONES
from cilearn.models.heads import LinearHead
from cilearn.models import build_net


@pytest.mark.parametrize("name,size,dim,stages", [("resnet32", 32, 64, 3), ("convnet", 8, 128, 3),
                                                  ("resnet18-32", 32, 512, 4), ("resnet18", 64, 512, 4)])
def test_backbone_shapes(name, size, dim, stages):
    bb = BACKBONES.get(name)(3)
    maps, emb = bb(torch.randn(2, 3, size, size))
    assert emb.shape == (2, dim) and bb.out_dim == dim and len(maps) == stages
    assert maps[-1].shape[1] == dim


def test_resnet32_has_the_paper_size():
    n = sum(p.numel() for p in BACKBONES.get("resnet32")(3).parameters())
    assert 0.45e6 < n < 0.48e6      # ResNet-32 has ~0.46M parameters (He et al. 2016, Table 6)


def test_head_grows_and_keeps_old_weights():
    h = LinearHead(4)
    h.add_classes(2)
    w = h.weight.detach().clone()
    h.add_classes(3)
    assert h.num_classes == 5 and torch.equal(h.weight[:2], w)


def test_frozen_copy_is_independent_and_gradient_free():
    net = build_net("convnet", "linear", 1)
    net.add_classes(3)
    t = net.frozen_copy()
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    with torch.no_grad():
        net.head.weight.add_(1.0)
    assert not torch.equal(t.head.weight, net.head.weight)
    out = net(torch.randn(2, 1, 8, 8))
    assert out.logits.shape == (2, 3) and out.embedding.shape == (2, 128)


def test_head_options_are_what_each_head_takes():
    from cilearn.models.heads import head_options
    assert head_options("lsc", proxies=4, sigma=2.0) == {"proxies": 4, "sigma": 2.0}
    assert head_options("cosine", proxies=4, sigma=2.0) == {"sigma": 2.0}
    assert head_options("linear", proxies=4, sigma=2.0) == {}
