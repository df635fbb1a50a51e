"""A tiny painter's-algorithm rasteriser for the multi-camera world (numpy only).

Convex polygons (box faces, shadows) are moved from the ego frame into a camera's frame, clipped against
a near plane, projected, and filled with one flat colour each; far objects are drawn first so near ones
cover them. The ground and the sky come from one ray cast per pixel (:func:`ground_image`), computed
once per camera. Pixel ``(row i, column j)`` covers ``[j, j + 1) x [i, i + 1)``; it is filled when its
centre ``(j + 0.5, i + 0.5)`` lies inside the projected polygon.
"""
from __future__ import annotations

import numpy as np

__all__ = ["Camera", "fill_polygon", "ground_image"]

NEAR = 0.1  # metres: polygons are clipped to depth >= NEAR before projection
SKY_TOP, SKY_HORIZON = np.array([0.45, 0.62, 0.85]), np.array([0.80, 0.86, 0.92])
GROUND_DARK, GROUND_LIGHT = np.array([0.36, 0.38, 0.34]), np.array([0.46, 0.48, 0.43])


class Camera:
    """A pinhole camera: ``K (3, 3)``, ``cam2ego (4, 4)`` (its pose in the ego frame) and the image
    ``(H, W)``. ``ego2cam`` and ``lidar2img = [[K, 0], [0, 1]] @ ego2cam`` are derived from them."""

    def __init__(self, K: np.ndarray, cam2ego: np.ndarray, image_size: tuple[int, int]) -> None:
        self.K, self.cam2ego, self.image_size = K, cam2ego, image_size
        self.ego2cam = np.linalg.inv(cam2ego)
        viewpad = np.eye(4)
        viewpad[:3, :3] = K
        self.lidar2img = viewpad @ self.ego2cam

    @property
    def centre(self) -> np.ndarray:
        return self.cam2ego[:3, 3]

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """``(..., 3)`` ego-frame points -> the same points in this camera's frame."""
        return points @ self.ego2cam[:3, :3].T + self.ego2cam[:3, 3]

    def may_see(self, points: np.ndarray) -> np.ndarray:
        """``(..., P, 3)`` camera-frame point sets -> ``(...)`` bool: False when a set's convex hull surely
        misses the image (wholly behind the near plane, or wholly beyond one image side), a cheap cull
        before rasterising. Points behind the near plane are projected as if at depth NEAR: the clipped
        hull's vertices lie on the same side of an image edge whenever these projections all do."""
        depth = points[..., 2]
        uv = points[..., :2] @ self.K[:2, :2].T / np.maximum(depth, NEAR)[..., None] + self.K[:2, 2]
        h, w = self.image_size
        beyond = ((uv[..., 0] <= 0).all(-1) | (uv[..., 0] >= w).all(-1) | (uv[..., 1] <= 0).all(-1)
                  | (uv[..., 1] >= h).all(-1))
        return (depth >= NEAR).any(-1) & ~beyond

    def project_polygon(self, points: np.ndarray) -> np.ndarray:
        """``(P, 3)`` camera-frame polygon -> ``(P', 2)`` pixel polygon after clipping to depth >= NEAR
        (``P' = 0`` when it lies wholly behind the near plane)."""
        points = _clip_near(points)
        if len(points) < 3:
            return np.zeros((0, 2))
        uvw = points @ self.K.T
        return uvw[:, :2] / uvw[:, 2:3]


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clipping of a ``(P, 3)`` camera-frame polygon against ``z >= NEAR``."""
    inside = poly[:, 2] >= NEAR
    if inside.all():
        return poly
    out = []
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        if inside[i]:
            out.append(a)
        if inside[i] != inside[(i + 1) % len(poly)]:
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out).reshape(-1, 3)


def fill_polygon(image: np.ndarray, ids: np.ndarray, poly: np.ndarray, color: np.ndarray, obj_id: int) -> None:
    """Paint the convex pixel polygon ``poly (P, 2)`` into ``image (H, W, 3)`` with ``color`` and write
    ``obj_id`` into the id buffer ``ids (H, W)`` (in place)."""
    if len(poly) < 3:
        return
    h, w = ids.shape
    x0, y0 = np.floor(poly.min(0) - 0.5).astype(int)
    x1, y1 = np.ceil(poly.max(0) - 0.5).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
    if x0 > x1 or y0 > y1:
        return
    xs = np.arange(x0, x1 + 1) + 0.5
    ys = (np.arange(y0, y1 + 1) + 0.5)[:, None]
    a, b = poly, np.concatenate([poly[1:], poly[:1]])
    # cross product of each edge with the vector to the pixel centre: all one sign inside a convex polygon
    cross = ((b[:, 0] - a[:, 0])[:, None, None] * (ys - a[:, 1, None, None])
             - (b[:, 1] - a[:, 1])[:, None, None] * (xs - a[:, 0, None, None]))
    inside = (cross >= 0).all(0) | (cross <= 0).all(0)
    image[y0:y1 + 1, x0:x1 + 1][inside] = color
    ids[y0:y1 + 1, x0:x1 + 1][inside] = obj_id


def ground_image(camera: Camera, tile: float = 4.0, fog: float = 80.0) -> np.ndarray:
    """The empty world seen by ``camera``: ``(H, W, 3)`` float in [0, 1]. Ground ``z = 0`` in a
    checkerboard of ``tile``-metre squares fading into the horizon colour with distance (scale ``fog``
    metres), sky above the horizon."""
    h, w = camera.image_size
    v, u = np.mgrid[0:h, 0:w] + 0.5
    rays_cam = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(camera.K).T  # (H, W, 3)
    rays = rays_cam @ camera.cam2ego[:3, :3].T  # directions in the ego frame
    down = rays[..., 2] < -1e-6
    t = np.where(down, -camera.centre[2] / np.where(down, rays[..., 2], -1.0), 0.0)
    hit = camera.centre + t[..., None] * rays
    checker = ((np.floor(hit[..., 0] / tile) + np.floor(hit[..., 1] / tile)) % 2)[..., None]
    ground = GROUND_DARK + checker * (GROUND_LIGHT - GROUND_DARK)
    haze = 1 - np.exp(-np.hypot(hit[..., 0], hit[..., 1]) / fog)[..., None]
    ground = ground * (1 - haze) + SKY_HORIZON * haze
    elevation = np.clip(rays[..., 2] / np.linalg.norm(rays, axis=-1), 0, 1)[..., None]
    sky = SKY_HORIZON + np.sqrt(elevation) * (SKY_TOP - SKY_HORIZON)
    return np.where(down[..., None], ground, sky)
