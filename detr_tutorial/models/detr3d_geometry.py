"""Geometry of DETR3D: the 3-D box code, box corners, camera projection and ``feature_sampling``.

Frames follow the LiDAR frame of nuScenes / MMDetection3D: the ego frame has x forward, y left, z up,
in metres. A camera frame has x right, y down, z forward (depth). A camera's ``lidar2img`` is the
4x4 matrix ``[[K, 0], [0, 1]] @ ego2cam``: applied to a homogeneous ego point ``(x, y, z, 1)`` it
gives ``(u * d, v * d, d, 1)`` with ``(u, v)`` the pixel position (pixel ``i`` covers ``[i, i + 1)``)
and ``d`` the depth in front of the camera.

A 3-D box is ``(x, y, z, w, l, h, yaw[, vx, vy])``: centre (the gravity centre, as DETR3D's targets),
width across the heading, length along it, height, and the heading angle counter-clockwise from the
x axis. DETR3D regresses the code ``(cx, cy, log w, log l, cz, log h, sin yaw, cos yaw[, vx, vy])``
(``normalize_bbox`` of the official ``projects/mmdet3d_plugin/core/bbox/util.py``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["box_corners", "check_lidar2img", "denormalize_bbox", "feature_sampling", "normalize_bbox",
           "project_points"]

DEPTH_EPS = 1e-5  # the official depth threshold: a point is in front of a camera when its depth > 1e-5


def _check_finite(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")


def _check_boxes(name: str, boxes: Tensor, sizes: tuple[int, ...]) -> None:
    _check_finite(name, boxes)
    if boxes.dim() < 1 or boxes.shape[-1] not in sizes:
        raise ValueError(f"{name} must have a last dimension in {sizes}, got shape {tuple(boxes.shape)}")


def normalize_bbox(boxes: Tensor) -> Tensor:
    """``(..., 7 | 9)`` boxes ``(x, y, z, w, l, h, yaw[, vx, vy])`` -> ``(..., 8 | 10)`` codes
    ``(cx, cy, log w, log l, cz, log h, sin yaw, cos yaw[, vx, vy])``."""
    _check_boxes("boxes", boxes, (7, 9))
    if (boxes[..., 3:6] <= 0).any():
        raise ValueError("boxes must have positive sizes (w, l, h) in columns 3:6")
    x, y, z, size, rot = boxes[..., 0:1], boxes[..., 1:2], boxes[..., 2:3], boxes[..., 3:6].log(), boxes[..., 6:7]
    return torch.cat((x, y, size[..., 0:2], z, size[..., 2:3], rot.sin(), rot.cos(), boxes[..., 7:]), dim=-1)


def denormalize_bbox(codes: Tensor) -> Tensor:
    """The inverse of :func:`normalize_bbox`: ``(..., 8 | 10)`` codes -> ``(..., 7 | 9)`` boxes, the yaw
    recovered with ``atan2(sin, cos)`` in (-pi, pi] and the sizes with ``exp``."""
    _check_boxes("codes", codes, (8, 10))
    rot = torch.atan2(codes[..., 6:7], codes[..., 7:8])
    size = torch.cat((codes[..., 2:4], codes[..., 5:6]), dim=-1).exp()
    return torch.cat((codes[..., 0:2], codes[..., 4:5], size, rot, codes[..., 8:]), dim=-1)


def box_corners(boxes: Tensor) -> Tensor:
    """The 8 corners ``(..., 8, 3)`` of boxes ``(..., >= 7)`` in the boxes' frame.

    Corner ``k`` has local offsets ``(±l/2, ±w/2, ±h/2)`` (along the heading, across it, up) with signs
    from the bits of ``k``: bit 2 -> length (``k < 4`` is the front, +l/2), bit 1 -> width (+w/2 when
    clear), bit 0 -> height (+h/2 when clear). So corners 0-3 form the front face and even ``k`` the top.
    """
    _check_boxes("boxes", boxes, tuple(range(7, 11)))
    bits = torch.arange(8, device=boxes.device)
    signs = torch.stack([1 - 2 * ((bits >> 2) & 1), 1 - 2 * ((bits >> 1) & 1), 1 - 2 * (bits & 1)], -1)
    half = torch.stack([boxes[..., 4], boxes[..., 3], boxes[..., 5]], -1)[..., None, :] / 2  # (..., 1, 3)
    local = signs.to(boxes.dtype) * half  # (..., 8, 3)
    cos, sin = boxes[..., 6].cos()[..., None], boxes[..., 6].sin()[..., None]
    x = cos * local[..., 0] - sin * local[..., 1]
    y = sin * local[..., 0] + cos * local[..., 1]
    return torch.stack([x, y, local[..., 2]], -1) + boxes[..., None, 0:3]


def check_lidar2img(lidar2img: Tensor, name: str = "lidar2img", rcond: float = 1e-7) -> None:
    """Raise unless ``lidar2img`` is a finite ``(..., 4, 4)`` stack of invertible matrices (a camera
    matrix ``K @ [R | t]`` padded to 4x4 always is; ``rcond`` bounds the ratio of the smallest to the
    largest singular value)."""
    _check_finite(name, lidar2img)
    if lidar2img.dim() < 2 or lidar2img.shape[-2:] != (4, 4):
        raise ValueError(f"{name} must have shape (..., 4, 4), got {tuple(lidar2img.shape)}")
    sv = torch.linalg.svdvals(lidar2img.detach().double().cpu())
    bad = sv[..., -1] <= rcond * sv[..., 0]
    if bad.any():
        raise ValueError(f"{name} must hold invertible 4x4 matrices; matrices {bad.nonzero().tolist()} are singular")


def project_points(points: Tensor, lidar2img: Tensor) -> tuple[Tensor, Tensor]:
    """Project ego-frame points into cameras.

    Args:
        points: ``(..., P, 3)`` points in the ego frame (metres).
        lidar2img: ``(..., N, 4, 4)`` camera matrices; leading dimensions broadcast with ``points``'.

    Returns:
        ``uv (..., N, P, 2)`` pixel positions (the depth clamped to ``DEPTH_EPS`` before dividing, as
        the official code does) and ``depth (..., N, P)``; a point is in front of camera ``n`` when
        ``depth > DEPTH_EPS``.
    """
    _check_finite("points", points)
    if points.dim() < 2 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (..., P, 3), got {tuple(points.shape)}")
    check_lidar2img(lidar2img)
    return _project(points, lidar2img)


def _project(points: Tensor, lidar2img: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`project_points` without the input checks."""
    homo = torch.cat([points, torch.ones_like(points[..., :1])], -1)  # (..., P, 4)
    cam = (lidar2img[..., None, :, :] @ homo[..., None, :, :, None]).squeeze(-1)  # (..., N, P, 4)
    depth = cam[..., 2]
    uv = cam[..., 0:2] / torch.maximum(cam[..., 2:3], torch.full_like(cam[..., 2:3], DEPTH_EPS))
    return uv, depth


def _check_sampling_inputs(mlvl_feats, reference_points, pc_range, lidar2img, image_size) -> None:
    if not isinstance(mlvl_feats, (list, tuple)) or not mlvl_feats:
        raise TypeError("mlvl_feats must be a non-empty list of (B, N, C, H, W) tensors")
    first = mlvl_feats[0]
    for lvl, feat in enumerate(mlvl_feats):
        _check_finite(f"mlvl_feats[{lvl}]", feat)
        if feat.dim() != 5 or feat.shape[:3] != first.shape[:3]:
            raise ValueError(f"mlvl_feats[{lvl}] must have shape (B, N, C, H, W) with the (B, N, C) of level 0 "
                             f"{tuple(first.shape[:3])}, got {tuple(feat.shape)}")
    B, N = first.shape[:2]
    _check_finite("reference_points", reference_points)
    if reference_points.dim() != 3 or reference_points.shape[0] != B or reference_points.shape[2] != 3:
        raise ValueError(f"reference_points must have shape (B={B}, Q, 3), got {tuple(reference_points.shape)}")
    if ((reference_points < 0) | (reference_points > 1)).any():
        raise ValueError("reference_points must be normalised to [0, 1] (sigmoid outputs); got values in "
                         f"[{reference_points.min().item():.3g}, {reference_points.max().item():.3g}]")
    if len(pc_range) != 6 or not all(pc_range[i + 3] > pc_range[i] for i in range(3)):
        raise ValueError(f"pc_range must be 6 numbers (x_min, y_min, z_min, x_max, y_max, z_max) with max > min, "
                         f"got {pc_range!r}")
    check_lidar2img(lidar2img)
    if lidar2img.shape != (B, N, 4, 4):
        raise ValueError(f"lidar2img must have shape (B={B}, N={N}, 4, 4), got {tuple(lidar2img.shape)}")
    if len(image_size) != 2 or not all(s > 0 for s in image_size):
        raise ValueError(f"image_size must be (H, W) with positive entries, got {image_size!r}")


def feature_sampling(mlvl_feats: Sequence[Tensor], reference_points: Tensor, pc_range: Sequence[float],
                     lidar2img: Tensor, image_size: tuple[int, int],
                     validate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Sample every camera's features at the projection of each query's 3-D reference point.

    The computation of the official ``feature_sampling`` (``detr3d_transformer.py``): denormalise the
    points with ``pc_range``, project them with each camera's ``lidar2img``, divide by the depth
    (clamped at 1e-5), normalise by the image size to grid_sample's [-1, 1], keep the points in front
    of the camera and strictly inside the image, and sample every level bilinearly (zeros outside).

    Args:
        mlvl_feats: L tensors ``(B, N, C, H_l, W_l)``, every level covering the whole image.
        reference_points: ``(B, Q, 3)`` in [0, 1] (x, y, z normalised by ``pc_range``).
        pc_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` in metres.
        lidar2img: ``(B, N, 4, 4)``.
        image_size: ``(H, W)`` in pixels of the images the features come from (the official code reads
            it from the first camera of the first sample).
        validate: check the inputs (shapes, finite values, points in [0, 1], invertible ``lidar2img``).
            A model that checked its inputs once per forward pass passes False in every layer: the
            checks scan every feature map and cost more than the sampling on a CPU.

    Returns:
        ``ref3d (B, Q, 3)`` (a copy of ``reference_points``), ``sampled (B, C, Q, N, 1, L)`` and the
        boolean visibility ``mask (B, 1, Q, N, 1, 1)``.
    """
    if validate:
        _check_sampling_inputs(mlvl_feats, reference_points, pc_range, lidar2img, image_size)
    B, N, C = mlvl_feats[0].shape[:3]
    Q = reference_points.shape[1]
    lo = reference_points.new_tensor(pc_range[:3])
    points = reference_points * (reference_points.new_tensor(pc_range[3:]) - lo) + lo
    uv, depth = _project(points, lidar2img.to(points.dtype))  # (B, N, Q, 2), (B, N, Q)
    grid = (uv / uv.new_tensor([image_size[1], image_size[0]]) - 0.5) * 2
    mask = (depth > DEPTH_EPS) & (grid > -1).all(-1) & (grid < 1).all(-1)  # (B, N, Q)
    grid = grid.reshape(B * N, Q, 1, 2)
    sampled = [F.grid_sample(feat.flatten(0, 1), grid.to(feat.dtype), align_corners=False).view(B, N, C, Q)
               for feat in mlvl_feats]  # grid_sample's default (bilinear, zeros) as in the official call
    sampled = torch.stack(sampled, -1).permute(0, 2, 3, 1, 4)  # (B, C, Q, N, L)
    return reference_points.clone(), sampled[..., None, :], mask.permute(0, 2, 1)[:, None, :, :, None, None]
