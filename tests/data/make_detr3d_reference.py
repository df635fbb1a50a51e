"""Write ``detr3d_reference.pt``: outputs of the official DETR3D geometry for the tests.

Usage::

    python tests/data/make_detr3d_reference.py /path/to/detr3d [out.pt]

The path is a clone (bare is fine) of https://github.com/WangYueFt/detr3d. Its modules import mmcv,
mmdet and mmdet3d, which do not install here, but the functions compared are plain PyTorch: the two
source files are exported from HEAD to a temporary directory, the functions ``feature_sampling``
(``projects/mmdet3d_plugin/models/utils/detr3d_transformer.py``) and ``normalize_bbox`` /
``denormalize_bbox`` (``projects/mmdet3d_plugin/core/bbox/util.py``) are cut out with ``ast`` and
executed alone with ``torch``, ``numpy`` and ``F`` in their namespace. Nothing of the official code is
stored, only fixed inputs and the official outputs:

* ``sampling``: three ``feature_sampling`` cases, each with its inputs (``mlvl_feats``,
  ``reference_points``, ``pc_range``, ``lidar2img``, ``image_size``) and outputs (``ref3d``,
  ``sampled``, ``mask``): ``rig`` (the library's default camera ring, two ego poses, three levels,
  float32), ``rig_float64`` (the same in float64) and ``nuscenes`` (six 1600x900 cameras with a
  nuScenes-like focal length and DETR3D's ``pc_range``, two levels);
* ``boxes``: boxes with and without velocity, their official codes and the official decoding of them.
"""
from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FILES = {"projects/mmdet3d_plugin/models/utils/detr3d_transformer.py": ["feature_sampling"],
         "projects/mmdet3d_plugin/core/bbox/util.py": ["normalize_bbox", "denormalize_bbox"]}
DETR3D_PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]  # the official configs' point_cloud_range


def official_functions(repo: str) -> types.SimpleNamespace:
    """The official functions of ``FILES``, executed alone from an export of ``repo``'s HEAD."""
    namespace = {"torch": torch, "np": np, "F": F}
    with tempfile.TemporaryDirectory(prefix="detr3d_official_") as tmp:
        archive = subprocess.run(["git", "-C", repo, "archive", "HEAD", *FILES], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        for path, names in FILES.items():
            tree = ast.parse(Path(tmp, path).read_text())
            nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
            if sorted(n.name for n in nodes) != sorted(names):
                raise RuntimeError(f"{path} at HEAD of {repo} lacks one of {names}")
            exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)
    return types.SimpleNamespace(**{name: namespace[name] for names in FILES.values() for name in names})


def official_sampling(fns: types.SimpleNamespace, case: dict) -> dict:
    """The official ``feature_sampling`` on ``case``: ``lidar2img`` and the image shape go through
    ``img_metas`` as in MMDetection3D (numpy arrays, ``img_shape`` per camera as (H, W, 3))."""
    n_cams = case["lidar2img"].shape[1]
    img_metas = [{"lidar2img": list(m.numpy()), "img_shape": [(*case["image_size"], 3)] * n_cams}
                 for m in case["lidar2img"]]
    ref3d, sampled, mask = fns.feature_sampling(case["mlvl_feats"], case["reference_points"], case["pc_range"],
                                                img_metas)
    return {"ref3d": ref3d, "sampled": sampled, "mask": mask}


def ring(n_cams: int, image_size: tuple[int, int], hfov_deg: float, ego_yaw: float, ego_xy=(0.0, 0.0)) -> torch.Tensor:
    """``(N, 4, 4)`` float32 lidar2img of a level camera ring 1.6 m high, the ego turned by ``ego_yaw``."""
    h, w = image_size
    f = (w / 2) / math.tan(math.radians(hfov_deg) / 2)
    K = np.eye(4)
    K[:3, :3] = [[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]]
    mats = []
    for i in range(n_cams):
        yaw = ego_yaw + 2 * math.pi * i / n_cams
        fwd, right = np.array([math.cos(yaw), math.sin(yaw), 0.0]), np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        cam2ego = np.eye(4)
        cam2ego[:3, :3] = np.stack([right, np.cross(fwd, right), fwd], 1)
        cam2ego[:3, 3] = [ego_xy[0] + math.cos(yaw), ego_xy[1] + math.sin(yaw), 1.6]
        mats.append(K @ np.linalg.inv(cam2ego))
    return torch.tensor(np.stack(mats), dtype=torch.float32)


def sampling_cases() -> dict:
    """Fixed inputs; reference points include the cube's corners (0 and 1 exactly) and, with a 360-degree
    ring, points behind some cameras and outside others' images."""
    from detr_tutorial.data import MultiViewDataset

    g = torch.Generator().manual_seed(0)
    data = MultiViewDataset(1)
    rig_l2i = data.rig.lidar2img
    pose = torch.tensor([[math.cos(0.3), -math.sin(0.3), 0, 2.0], [math.sin(0.3), math.cos(0.3), 0, -1.0],
                         [0, 0, 1, 0], [0, 0, 0, 1]])
    corners = torch.tensor([[a, b, c] for a in (0.0, 1.0) for b in (0.0, 1.0) for c in (0.0, 1.0)])
    rig = {"mlvl_feats": [torch.randn(2, 6, 4, h, w, generator=g) for h, w in ((16, 28), (8, 14), (4, 7))],
           "reference_points": torch.cat([torch.rand(2, 56, 3, generator=g), corners.expand(2, 8, 3)], 1),
           "pc_range": list(data.pc_range), "lidar2img": torch.stack([rig_l2i, rig_l2i @ torch.linalg.inv(pose)]),
           "image_size": list(data.rig.image_size)}
    rig_float64 = {**rig, "mlvl_feats": [f.double() for f in rig["mlvl_feats"]],
                   "reference_points": rig["reference_points"].double()}
    nuscenes = {"mlvl_feats": [torch.randn(1, 6, 4, h, w, generator=g) for h, w in ((15, 25), (8, 13))],
                "reference_points": torch.rand(1, 100, 3, generator=g), "pc_range": DETR3D_PC_RANGE,
                "lidar2img": ring(6, (900, 1600), 2 * math.degrees(math.atan(800 / 1266)), 0.0)[None],
                "image_size": [900, 1600]}
    return {"rig": rig, "rig_float64": rig_float64, "nuscenes": nuscenes}


def box_cases() -> dict:
    g = torch.Generator().manual_seed(1)
    n = 12
    centres = torch.randn(n, 3, generator=g) * 20
    sizes = torch.rand(n, 3, generator=g) * 8 + 0.3
    yaw = (torch.rand(n, 1, generator=g) * 2 - 1) * math.pi
    velocity = torch.randn(n, 2, generator=g) * 5
    return {"boxes7": torch.cat([centres, sizes, yaw], 1), "boxes9": torch.cat([centres, sizes, yaw, velocity], 1)}


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    repo = os.path.abspath(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) == 3 else str(Path(__file__).with_name("detr3d_reference.pt"))
    fns = official_functions(repo)
    sampling = {}
    for name, case in sampling_cases().items():
        sampling[name] = {"inputs": case, "official": official_sampling(fns, case)}
    boxes = {}
    for name, b in box_cases().items():
        codes = fns.normalize_bbox(b, None)
        boxes[name] = {"boxes": b, "codes": codes, "decoded": fns.denormalize_bbox(codes, None)}
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    torch.save({"commit": commit, "torch": torch.__version__, "sampling": sampling, "boxes": boxes}, out + ".tmp")
    os.replace(out + ".tmp", out)  # the old file stays until the new one is complete
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB) from detr3d {commit}")


if __name__ == "__main__":
    main()
