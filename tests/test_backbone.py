"""Backbones: ResNet as DETR uses it, the small CPU backbone, masks, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_tutorial.models import Joiner, PositionEmbeddingSine, ResNetBackbone, SmallBackbone, downsample_mask


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return ResNetBackbone("resnet50").eval()


def test_resnet50_layout(r50):
    assert r50.num_channels == [2048] and r50.strides == [32]
    keys = list(r50.state_dict())
    assert keys[0] == "body.conv1.weight"
    assert "body.layer1.0.downsample.1.running_var" in keys and not any("fc." in k for k in keys)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in r50.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in r50.modules()) == 53


def test_resnet50_which_parameters_train(r50):
    for name, p in r50.named_parameters():
        trains = name.startswith(("body.layer2", "body.layer3", "body.layer4"))
        assert p.requires_grad == trains, name
    frozen = ResNetBackbone("resnet18", train_backbone=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_resnet50_shapes_and_masks(r50):
    images = torch.rand(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, 32:, :] = True  # image 1 is 32x48: stride 32 leaves one valid row, both columns
    mask[1, :, 48:] = True
    with torch.no_grad():
        [(x, m)] = r50(images, mask)
    assert x.shape == (2, 2048, 2, 2) and m.shape == (2, 2, 2)
    assert torch.isfinite(x).all()
    assert not m[0].any()
    assert m[1].tolist() == [[False, False], [True, True]]
    torch.testing.assert_close(m, F.interpolate(mask[None].float(), size=(2, 2)).to(torch.bool)[0])


def test_resnet_multiscale_and_dilation():
    torch.manual_seed(0)
    body = ResNetBackbone("resnet18", return_interm_layers=True).eval()
    assert body.strides == [8, 16, 32] and body.num_channels == [128, 256, 512]
    with torch.no_grad():
        levels = body(torch.rand(1, 3, 64, 96))
    assert [tuple(x.shape) for x, _ in levels] == [(1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    dc5 = ResNetBackbone("resnet50", return_interm_layers=True, dilation=True)
    assert dc5.strides == [8, 16, 16] and dc5.num_channels == [512, 1024, 2048]
    with pytest.raises(ValueError, match="dilation"):
        ResNetBackbone("resnet18", dilation=True)
    with pytest.raises(ValueError, match="resnet50"):
        ResNetBackbone("vgg16")


@pytest.mark.parametrize("widths,strides,size,expected", [
    ((8, 16, 32), (2, 2, 2), 64, [(32, 8)]),
    ((8, 16), (2, 1), 32, [(16, 16)]),
    ((8, 8, 16, 32), (2, 2, 2, 2), 64, [(32, 4)]),
])
def test_small_backbone_shapes(widths, strides, size, expected):
    net = SmallBackbone(widths, strides)
    levels = net(torch.rand(2, 3, size, size))
    assert [(x.shape[1], x.shape[-1]) for x, _ in levels] == expected
    assert net.num_channels == [c for c, _ in expected]
    assert net.strides == [size // s for _, s in expected]


def test_small_backbone_multiscale_and_trainable_bn():
    net = SmallBackbone((8, 16, 24, 32), (2, 2, 2, 2), return_interm_layers=True)
    assert net.strides == [4, 8, 16] and net.num_channels == [16, 24, 32]
    images = torch.rand(3, 3, 64, 48)
    mask = torch.zeros(3, 64, 48, dtype=torch.bool)
    mask[2, :, 24:] = True
    levels = net.train()(images, mask)
    assert [tuple(x.shape) for x, _ in levels] == [(3, 16, 16, 12), (3, 24, 8, 6), (3, 32, 4, 3)]
    assert [m[2].sum().item() for _, m in levels] == [16 * 6, 8 * 3, 4 * 1]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 8 and all(p.requires_grad for p in net.parameters())
    assert bns[0].num_batches_tracked.item() == 1  # statistics update in training mode
    sum(x.sum() for x, _ in levels).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_joiner_gives_one_encoding_per_level():
    joined = Joiner(SmallBackbone((8, 16, 32), return_interm_layers=True), PositionEmbeddingSine(4, normalize=True))
    features, pos = joined(torch.rand(2, 3, 32, 32))
    assert len(features) == len(pos) == 3
    for (x, m), p in zip(features, pos):
        assert p.shape == (2, 8, *x.shape[-2:]) and m.shape == (2, *x.shape[-2:])
    assert joined.strides == [2, 4, 8] and joined.num_channels == [8, 16, 32]


def test_downsample_mask_nearest():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :, 6:] = True
    assert downsample_mask(mask, (2, 2)).tolist() == [[[False, False], [False, False]]]
    assert downsample_mask(mask, (4, 4))[0, 0].tolist() == [False, False, False, True]


def test_errors():
    net = SmallBackbone((8,), (2,))
    with pytest.raises(TypeError, match="pad_images"):
        net([torch.rand(3, 8, 8)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="float"):
        net(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="bool"):
        net(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="match images"):
        net(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="strides"):
        SmallBackbone((8, 16), (2, 3))
    with pytest.raises(ValueError, match="equal length"):
        SmallBackbone((8, 16), (2,))
    with pytest.raises(ValueError, match="3 stages"):
        SmallBackbone((8, 16), (2, 2), return_interm_layers=True)
