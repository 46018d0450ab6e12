"""Backbones, heads and the incremental net."""
import pytest
import torch

from cilearn.components import REGISTRIES
from cilearn.errors import ConfigError
from cilearn.models import build_net, part
from cilearn.models.heads import LinearHead


@pytest.mark.parametrize("name,size,dim,stages", [("resnet32", 32, 64, 3), ("convnet", 8, 128, 3),
                                                  ("resnet18-32", 32, 512, 4), ("resnet18", 64, 512, 4)])
def test_backbone_shapes(name, size, dim, stages):
    assert name in REGISTRIES["backbone"]
    bb = part("backbone", name).create(3)
    maps, emb = bb(torch.randn(2, 3, size, size))
    assert emb.shape == (2, dim) and bb.out_dim == dim and len(maps) == stages
    assert maps[-1].shape[1] == dim


def test_resnet32_has_the_paper_size():
    n = sum(p.numel() for p in part("backbone", "resnet32").create(3).parameters())
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
    # each head component declares only the options its module takes (lsc: proxies and scale;
    # cosine: scale; linear: none), and they reach the module it creates
    lsc = part("head", "lsc", proxies=4, scale=2.0).create(8)
    assert lsc.proxies == 4 and lsc.sigma.item() == 2.0
    assert part("head", "cosine", scale=2.0).create(8).sigma.item() == 2.0
    with pytest.raises(ConfigError, match="components.cosine.proxies"):
        part("head", "cosine", proxies=4)
    with pytest.raises(ConfigError, match="components.linear.scale"):
        part("head", "linear", scale=2.0)
