"""Backbones: images and padding masks -> feature maps and downsampled masks.

Every backbone here has the same interface, so DETR and Deformable DETR take
either:

* ``forward(images (B, 3, H, W), mask (B, H, W) bool or None)`` returns a list
  with one ``(features (B, C_l, H_l, W_l), mask (B, H_l, W_l) bool)`` pair per
  returned level, finest first;
* ``strides`` and ``num_channels`` list each level's downsampling factor and
  channel count.

``ResNetBackbone`` is the torchvision ResNet that DETR uses (frozen
BatchNorm, stem and layer1 frozen, official key names ``body.conv1`` ...).
``SmallBackbone`` is a few conv-BN-ReLU stages with *trainable* BatchNorm: the
book trains it from scratch on small images on a CPU. ``Joiner`` pairs a
backbone with a positional encoding, as the official code does (and gives the
state-dict prefix ``backbone.0.``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from .position_encoding import check_padding_mask

__all__ = ["BackboneBase", "ResNetBackbone", "SmallBackbone", "Joiner", "build_backbone", "downsample_mask",
           "check_images_and_mask"]


def check_images_and_mask(images: Tensor, mask: Optional[Tensor], in_channels: int = 3) -> Tensor:
    """Validate a batch and return its padding mask (all False when ``mask`` is None).

    images: (B, in_channels, H, W) float; mask: (B, H, W) bool, True = padding.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a (B, {in_channels}, H, W) tensor, got {type(images).__name__}; "
                        "pad a list of images with detr_tutorial.data.pad_images")
    if images.dim() != 4 or images.shape[1] != in_channels:
        raise ValueError(f"images must have shape (B, {in_channels}, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor, got {images.dtype}")
    if mask is None:
        b, _, h, w = images.shape
        return torch.zeros((b, h, w), dtype=torch.bool, device=images.device)
    check_padding_mask(mask)
    if mask.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"mask must have shape (B, H, W) = {(images.shape[0], *images.shape[2:])} "
                         f"to match images {tuple(images.shape)}, got {tuple(mask.shape)}")
    return mask


def downsample_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """(B, H, W) bool -> (B, h, w) bool by nearest-neighbour sampling, as official DETR."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class BackboneBase(nn.Module):
    """Validation and mask handling shared by all backbones.

    Subclasses set ``strides``, ``num_channels`` and ``in_channels`` and
    implement ``extract(images) -> list of (B, C_l, H_l, W_l)``.
    """

    strides: list[int]
    num_channels: list[int]
    in_channels: int = 3

    def extract(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> list[tuple[Tensor, Tensor]]:
        """images (B, 3, H, W), mask (B, H, W) -> [(features (B, C_l, H_l, W_l), mask (B, H_l, W_l))]."""
        mask = check_images_and_mask(images, mask, self.in_channels)
        return [(x, downsample_mask(mask, x.shape[-2:])) for x in self.extract(images)]


class ResNetBackbone(BackboneBase):
    """A torchvision ResNet with ``FrozenBatchNorm2d``, as in DETR.

    Args:
        name: "resnet18", "resnet34", "resnet50" or "resnet101".
        train_backbone: if False every parameter is frozen; if True (DETR's
            default, ``lr_backbone > 0``) layer2-layer4 train while the stem and
            layer1 stay frozen.
        return_interm_layers: return layer2, layer3 and layer4 (strides 8, 16,
            32), as Deformable DETR needs; otherwise only layer4 (stride 32).
        dilation: replace the stride of layer4 by dilation (DETR-DC5, stride 16);
            ResNet-50/101 only.
        weights: torchvision weights to start from, e.g. "IMAGENET1K_V1"
            (downloaded by torchvision). None = random initialisation; frozen
            BatchNorm then holds the identity (mean 0, var 1), which only makes
            sense when pretrained statistics are loaded.
    """

    CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}

    def __init__(self, name: str = "resnet50", train_backbone: bool = True,
                 return_interm_layers: bool = False, dilation: bool = False,
                 weights: Optional[str] = None) -> None:
        super().__init__()
        if name not in self.CHANNELS:
            raise ValueError(f"name must be one of {sorted(self.CHANNELS)}, got {name!r}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation needs bottleneck blocks (resnet50/resnet101), not {name}")
        resnet = getattr(torchvision.models, name)(
            weights=weights, replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d)
        for pname, p in resnet.named_parameters():
            trainable = train_backbone and pname.startswith(("layer2", "layer3", "layer4"))
            p.requires_grad_(trainable)
        last = self.CHANNELS[name]
        if return_interm_layers:
            layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            self.strides = [8, 16, 16 if dilation else 32]
            self.num_channels = [last // 4, last // 2, last]
        else:
            layers = {"layer4": "0"}
            self.strides = [16 if dilation else 32]
            self.num_channels = [last]
        self.body = IntermediateLayerGetter(resnet, return_layers=layers)

    def extract(self, images: Tensor) -> list[Tensor]:
        return list(self.body(images).values())


class SmallBackbone(BackboneBase):
    """A small CNN for CPU training from scratch, with trainable BatchNorm.

    Stage ``i`` is ``conv3x3(stride strides[i]) -> BN -> ReLU -> conv3x3 -> BN -> ReLU``
    with ``widths[i]`` channels, so the output stride is the product of
    ``strides``.

    Args:
        widths: channels of each stage.
        strides: stride (1 or 2) of each stage's first convolution.
        return_interm_layers: return the last three stages (multi-scale, as
            ``ResNetBackbone``'s layer2-4); otherwise only the last one.
        in_channels: channels of the input images.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), strides: Sequence[int] = (2, 2, 2),
                 return_interm_layers: bool = False, in_channels: int = 3) -> None:
        super().__init__()
        widths, strides = list(widths), list(strides)
        if len(widths) == 0 or len(widths) != len(strides):
            raise ValueError(f"widths and strides must be non-empty and of equal length, "
                             f"got {widths} and {strides}")
        if any(s not in (1, 2) for s in strides):
            raise ValueError(f"strides must be 1 or 2 per stage, got {strides}")
        if any(not isinstance(c, int) or c < 1 for c in widths):
            raise ValueError(f"widths must be positive ints, got {widths}")
        num_levels = 3 if return_interm_layers else 1
        if len(widths) < num_levels:
            raise ValueError(f"return_interm_layers needs at least 3 stages, got {len(widths)}")
        self.in_channels = in_channels
        stages, c_in = [], in_channels
        for c, s in zip(widths, strides):
            stages.append(nn.Sequential(_conv_bn_relu(c_in, c, s), _conv_bn_relu(c, c, 1)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        cumulative = [math.prod(strides[: i + 1]) for i in range(len(strides))]
        self.returned = list(range(len(widths) - num_levels, len(widths)))
        self.strides = [cumulative[i] for i in self.returned]
        self.num_channels = [widths[i] for i in self.returned]

    def extract(self, images: Tensor) -> list[Tensor]:
        out, x = [], images
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.returned:
                out.append(x)
        return out


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Joiner(nn.Sequential):
    """``Joiner(backbone, position_embedding)``: features, masks and their encodings.

    An ``nn.Sequential`` so that parameters are named ``0.body...`` (backbone)
    and ``1....`` (learned encoding), as in official checkpoints.
    """

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor,
                mask: Optional[Tensor] = None) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
        """-> ``(features, pos)``: the backbone's list of (features, mask) and one
        positional encoding (B, d_pos, H_l, W_l) per level, in the features' dtype."""
        features = self[0](images, mask)
        pos = [self[1](m).to(x.dtype) for x, m in features]
        return features, pos


def build_backbone(backbone: Union[str, nn.Module], train_backbone: bool = True,
                   return_interm_layers: bool = False, dilation: bool = False,
                   weights: Optional[str] = None, small_widths: Sequence[int] = (32, 64, 128),
                   small_strides: Sequence[int] = (2, 2, 2)) -> nn.Module:
    """A backbone from its name ("small", "resnet18", "resnet50", ...), or ``backbone`` itself when
    it is already a module with ``num_channels`` and ``strides``.

    ``return_interm_layers`` asks for the last three stages (strides 8, 16, 32 for a ResNet) instead
    of the last one; ``train_backbone``, ``dilation`` and ``weights`` apply to ResNets,
    ``small_widths`` and ``small_strides`` to ``SmallBackbone``.
    """
    if isinstance(backbone, str):
        if backbone == "small":
            return SmallBackbone(small_widths, small_strides, return_interm_layers=return_interm_layers)
        if backbone in ResNetBackbone.CHANNELS:
            return ResNetBackbone(backbone, train_backbone=train_backbone, return_interm_layers=return_interm_layers,
                                  dilation=dilation, weights=weights)
        raise ValueError(f"backbone must be 'small', one of {sorted(ResNetBackbone.CHANNELS)} "
                         f"or a backbone module, got {backbone!r}")
    if not isinstance(backbone, nn.Module) or not hasattr(backbone, "num_channels"):
        raise TypeError("backbone must be a name or a module with num_channels and strides, "
                        f"got {type(backbone).__name__}")
    return backbone
