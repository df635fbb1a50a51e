"""A procedural multi-camera world for 3-D detection (DETR3D's input, CPU-sized).

The ego frame is the LiDAR frame of nuScenes / MMDetection3D: x forward, y left, z up, metres, the
ground at ``z = 0``. A ring of ``num_cams`` cameras sits on the ego vehicle's roof, looking outwards at
equal angles; each one's horizontal field of view exceeds the angle between neighbours by ``overlap_deg``,
so objects near a seam show in two cameras. Every scene holds boxes of three classes with class-typical
sizes, random yaw, centres 3-40 m away, shaded flat under a fixed sun with a lighter front face (so the
heading is visible) and a shadow under them; occluded or distant ones may be seen by no camera.

Every scene is a pure function of ``(seed, index)``. An item is ``(images, lidar2img, target)``:

* ``images``    (N, 3, H, W) float32 in [0, 1]
* ``lidar2img`` (N, 4, 4)    float32, ``[[K, 0], [0, 1]] @ ego2cam`` per camera
* ``target["boxes"]`` (n, 7) float32 ``(x, y, z, w, l, h, yaw)`` in the ego frame, ``z`` the box centre;
  ``target["labels"]`` (n,) int64; ``target["visible_pixels"]`` (n, N) int64, the pixels of each
  object that each camera shows after occlusion.
"""
from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..models.detr3d_geometry import box_corners
from .raster import Camera, fill_polygon, ground_image

__all__ = ["MULTIVIEW_CLASSES", "CameraRig", "MultiViewDataset", "multiview_collate"]

MULTIVIEW_CLASSES = ("car", "truck", "pedestrian")
# Class-typical (w, l, h) in metres and base colours.
CLASS_SIZES = np.array([[1.9, 4.6, 1.7], [2.5, 8.0, 3.2], [0.7, 0.7, 1.8]])
CLASS_COLORS = np.array([[0.15, 0.30, 0.80], [0.85, 0.55, 0.10], [0.80, 0.12, 0.15]])
SHADOW = np.array([0.18, 0.19, 0.17])
SUN = np.array([0.4, 0.3, 0.87]) / np.linalg.norm([0.4, 0.3, 0.87])
# Faces as corner indices (see box_corners: bit 2 = back, bit 1 = right, bit 0 = bottom), listed
# with their outward normals in the box's local frame (x along the heading, y to the left).
FACES = np.array([[0, 2, 3, 1], [4, 5, 7, 6], [0, 1, 5, 4], [2, 6, 7, 3], [0, 4, 6, 2], [1, 3, 7, 5]])
FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)


class CameraRig:
    """``num_cams`` cameras at ``height`` metres, ``radius`` metres from the ego origin, camera 0 facing
    forward and the others counter-clockwise (to the left) in equal steps, pitched down by ``pitch_deg``.

    Attributes: ``cameras`` (list of :class:`~detr_tutorial.data.raster.Camera`), ``yaws`` (radians),
    ``lidar2img`` ``(N, 4, 4)`` float32 tensor, ``intrinsics`` ``(N, 3, 3)``, ``cam2ego`` ``(N, 4, 4)``.
    """

    def __init__(self, num_cams: int = 6, image_size: tuple[int, int] = (64, 112), overlap_deg: float = 20.0,
                 height: float = 1.6, radius: float = 1.0, pitch_deg: float = 5.0) -> None:
        if not isinstance(num_cams, int) or num_cams < 4:
            raise ValueError(f"num_cams must be an int >= 4, got {num_cams!r}")
        if len(image_size) != 2 or min(image_size) < 8:
            raise ValueError(f"image_size must be (H, W) with both >= 8, got {image_size!r}")
        hfov = 360.0 / num_cams + overlap_deg
        if not (0 < overlap_deg and hfov < 170):
            raise ValueError(f"overlap_deg must be > 0 and the field of view below 170 degrees, got {overlap_deg!r}")
        self.num_cams, self.image_size, self.hfov_deg = num_cams, (int(image_size[0]), int(image_size[1])), hfov
        h, w = self.image_size
        f = (w / 2) / math.tan(math.radians(hfov) / 2)
        K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
        self.yaws = [2 * math.pi * i / num_cams for i in range(num_cams)]
        pitch = math.radians(pitch_deg)
        self.cameras = []
        for yaw in self.yaws:
            forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), -math.sin(pitch)])
            right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
            down = np.cross(forward, right)
            cam2ego = np.eye(4)
            cam2ego[:3, :3] = np.stack([right, down, forward], 1)  # columns: camera axes in the ego frame
            cam2ego[:3, 3] = [radius * math.cos(yaw), radius * math.sin(yaw), height]
            self.cameras.append(Camera(K, cam2ego, self.image_size))
        self.intrinsics = torch.from_numpy(np.stack([c.K for c in self.cameras])).float()
        self.cam2ego = torch.from_numpy(np.stack([c.cam2ego for c in self.cameras])).float()
        self.lidar2img = torch.from_numpy(np.stack([c.lidar2img for c in self.cameras])).float()

    @cached_property
    def backgrounds(self) -> list[np.ndarray]:
        """The empty world seen by each camera, ``(H, W, 3)`` each (computed on first use)."""
        return [ground_image(c) for c in self.cameras]

    def __repr__(self) -> str:
        return f"CameraRig(num_cams={self.num_cams}, image_size={self.image_size}, hfov_deg={self.hfov_deg:.1f})"


class MultiViewDataset(Dataset):
    """Scenes of ``min_objects..max_objects`` boxes seen by a :class:`CameraRig`.

    Args:
        num_scenes: length of the data set.
        rig: the cameras (a default ``CameraRig()`` when None).
        min_objects, max_objects: boxes per scene (inclusive); fewer when no free spot is found.
        distance: (min, max) distance of a box centre from the ego origin in metres.
        size_jitter: relative spread of the sizes around the class-typical ones.
        seed: the split's seed; use different seeds for train and validation.
    """

    classes = MULTIVIEW_CLASSES

    def __init__(self, num_scenes: int = 1000, rig: CameraRig | None = None, min_objects: int = 2,
                 max_objects: int = 8, distance: tuple[float, float] = (3.0, 40.0), size_jitter: float = 0.1,
                 seed: int = 0) -> None:
        if not isinstance(num_scenes, int) or num_scenes < 0:
            raise ValueError(f"num_scenes must be a non-negative int, got {num_scenes!r}")
        if not (isinstance(min_objects, int) and isinstance(max_objects, int) and 0 <= min_objects <= max_objects):
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects!r} and {max_objects!r}")
        if not 0 < distance[0] < distance[1]:
            raise ValueError(f"distance must be (min, max) with 0 < min < max, got {distance!r}")
        if not 0 <= size_jitter < 0.5:
            raise ValueError(f"size_jitter must be in [0, 0.5), got {size_jitter!r}")
        self.num_scenes, self.rig = num_scenes, rig if rig is not None else CameraRig()
        self.min_objects, self.max_objects = min_objects, max_objects
        self.distance, self.size_jitter, self.seed = (float(distance[0]), float(distance[1])), size_jitter, seed

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def pc_range(self) -> tuple[float, ...]:
        """A DETR3D ``pc_range`` holding every box: the distance range plus a margin, z from -1 to 4 m."""
        r = self.distance[1] + 5.0
        return (-r, -r, -1.0, r, r, 4.0)

    def __len__(self) -> int:
        return self.num_scenes

    def sample_boxes(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(n, 7)`` and labels ``(n,)`` of one scene; footprints do not overlap (bounding circles
        apart) and stay 2 m clear of the ego origin."""
        boxes, labels = [], []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            for _attempt in range(20):
                label = int(rng.choice(3, p=[0.5, 0.2, 0.3]))
                w, l, h = CLASS_SIZES[label] * (1 + self.size_jitter * rng.uniform(-1, 1, size=3))
                dist, azimuth = rng.uniform(*self.distance), rng.uniform(-math.pi, math.pi)
                x, y, yaw = dist * math.cos(azimuth), dist * math.sin(azimuth), rng.uniform(-math.pi, math.pi)
                radius = math.hypot(w, l) / 2
                if dist - radius < 2.0:
                    continue
                if all(math.hypot(x - b[0], y - b[1]) > radius + math.hypot(b[3], b[4]) / 2 for b in boxes):
                    boxes.append([x, y, h / 2, w, l, h, yaw])
                    labels.append(label)
                    break
        return np.array(boxes, dtype=np.float64).reshape(-1, 7), np.array(labels, dtype=np.int64)

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Scene ``index``: ``(images (N, H, W, 3) float32, boxes (n, 7), labels (n,), visible_pixels (n, N))``."""
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"index {index} out of range for a data set of {self.num_scenes} scenes")
        rng = np.random.default_rng((self.seed, index))
        boxes, labels = self.sample_boxes(rng)
        images, visible = self.render_boxes(boxes, labels, rng)
        return images, boxes.astype(np.float32), labels, visible

    def render_boxes(self, boxes: np.ndarray, labels: np.ndarray,
                     rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Draw boxes ``(n, 7)`` of classes ``labels (n,)`` in every camera: ``(images (N, H, W, 3)
        float32, visible_pixels (n, N))``. ``rng`` draws a colour tint per box and the scene's brightness
        (neither when None)."""
        boxes, labels = np.asarray(boxes, dtype=np.float64).reshape(-1, 7), np.asarray(labels, dtype=np.int64)
        tint = rng.uniform(-0.08, 0.08, size=(len(boxes), 3)) if rng is not None else np.zeros((len(boxes), 3))
        brightness = rng.uniform(0.85, 1.15) if rng is not None else 1.0
        corners = box_corners(torch.from_numpy(boxes)).numpy()  # (n, 8, 3)
        rot = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], -1)  # heading (cos, sin)
        normals = np.zeros((len(boxes), 6, 3))
        normals[..., 0] = rot[:, None, 0] * FACE_NORMALS[:, 0] - rot[:, None, 1] * FACE_NORMALS[:, 1]
        normals[..., 1] = rot[:, None, 1] * FACE_NORMALS[:, 0] + rot[:, None, 0] * FACE_NORMALS[:, 1]
        normals[..., 2] = FACE_NORMALS[:, 2]
        base = np.clip(CLASS_COLORS[labels] + tint, 0, 1)  # (n, 3)
        shade = 0.35 + 0.65 * np.clip(normals @ SUN, 0, None)  # (n, 6) flat (Lambert) shading
        colors = base[:, None, :] * shade[..., None]
        colors[:, 0] = colors[:, 0] * 0.5 + 0.5  # the front face is lighter: the heading shows
        face_centres = corners[:, FACES].mean(2)  # (n, 6, 3)
        h, w = self.rig.image_size
        images = np.empty((self.rig.num_cams, h, w, 3), dtype=np.float32)
        visible = np.zeros((len(boxes), self.rig.num_cams), dtype=np.int64)
        for c, cam in enumerate(self.rig.cameras):
            image, ids = self.rig.backgrounds[c] * brightness, np.full((h, w), -1)
            in_cam = cam.to_camera(corners)  # (n, 8, 3)
            shadows = cam.to_camera(corners[:, [1, 3, 7, 5]] * [1, 1, 0] + [0, 0, 0.01])  # footprints
            seen = np.flatnonzero(cam.may_see(in_cam))
            for k in seen:  # shadows lie on the ground, below every box
                fill_polygon(image, ids, cam.project_polygon(shadows[k]), SHADOW, -1)
            facing = ((cam.centre - face_centres) * normals).sum(-1) > 0  # (n, 6): back faces culled
            # painter's order: the box whose footprint's nearest point is farthest goes first
            for k in sorted(seen, key=lambda k: -_footprint_distance(boxes[k], cam.centre)):
                for f in np.flatnonzero(facing[k]):
                    fill_polygon(image, ids, cam.project_polygon(in_cam[k, FACES[f]]), colors[k, f], k)
            images[c] = np.clip(image, 0, 1)
            visible[:, c] = np.bincount(ids[ids >= 0], minlength=len(boxes))
        return images, visible

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Returns ``(images (N, 3, H, W), lidar2img (N, 4, 4), target)``."""
        images, boxes, labels, visible = self.render(index)
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                  "visible_pixels": torch.from_numpy(visible), "scene_id": torch.tensor(index)}
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # numpy: torch's strided copy was the slowest step
        return torch.from_numpy(images), self.rig.lidar2img.clone(), target

    def __repr__(self) -> str:
        return (f"MultiViewDataset(num_scenes={self.num_scenes}, {self.rig!r}, "
                f"objects={self.min_objects}..{self.max_objects}, seed={self.seed})")


def _footprint_distance(box: np.ndarray, point: np.ndarray) -> float:
    """Ground-plane distance from ``point`` to the nearest point of ``box``'s footprint."""
    dx, dy = point[0] - box[0], point[1] - box[1]
    c, s = math.cos(box[6]), math.sin(box[6])
    along, across = c * dx + s * dy, -s * dx + c * dy
    return math.hypot(max(abs(along) - box[4] / 2, 0), max(abs(across) - box[3] / 2, 0))


def multiview_collate(batch: list) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Stack a list of items into ``(images (B, N, 3, H, W), lidar2img (B, N, 4, 4), targets)``."""
    images, lidar2img, targets = zip(*batch)
    return torch.stack(images), torch.stack(lidar2img), list(targets)
