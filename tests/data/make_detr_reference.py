"""Write tests/data/detr_reference.pt: outputs of the official DETR code on fixed inputs.

    python tests/data/make_detr_reference.py --detr-repo /path/to/detr

``--detr-repo`` is a clone of facebookresearch/detr (a work tree, or a bare
clone whose HEAD is read with ``git show``). Its ``util/box_ops.py`` and
``models/transformer.py`` are executed as modules (they import only torch and
torchvision); nothing of them is stored. The file holds plain dicts of tensors:

* ``generalized_box_iou``: float64 (x0, y0, x1, y1) ``boxes1`` (N, 4),
  ``boxes2`` (M, 4) -- hand-picked pairs (identical, nested, touching, disjoint,
  a zero-area box) and random boxes -- with the official ``giou`` (N, M) and
  ``iou`` (N, M) from ``util/box_ops.py``.
* ``transformer_pre_norm``: the official ``Transformer`` with
  ``normalize_before=True`` and ``return_intermediate_dec=True`` (d 32,
  4 heads, 2 + 2 layers, FFN 64, dropout 0), every parameter moved away from
  its initial value (so the LayerNorms differ from one another): ``kwargs``,
  ``state_dict`` (official key names), inputs ``src (B, d, H, W)``, ``mask
  (B, H, W)`` with padding, ``query_embed (Q, d)``, ``pos_embed (B, d, H, W)``
  and outputs ``hs (layers, B, Q, d)``, ``memory (B, d, H, W)``.
"""
from __future__ import annotations

import argparse
import subprocess
import types
from pathlib import Path

import torch

OUT = Path(__file__).with_name("detr_reference.pt")


def source(repo: Path, path: str) -> str:
    if (repo / path).is_file():
        return (repo / path).read_text()
    return subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{path}"], check=True,
                          capture_output=True, text=True).stdout


def commit(repo: Path) -> str:
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "(commit unknown: not a git clone)"


def module(repo: Path, path: str) -> types.ModuleType:
    mod = types.ModuleType(path)
    exec(compile(source(repo, path), path, "exec"), mod.__dict__)
    return mod


def giou_case(box_ops: types.ModuleType) -> dict:
    hand = torch.tensor([[0.0, 0.0, 1.0, 1.0],    # unit square
                         [0.0, 0.0, 4.0, 4.0],    # contains the next one
                         [1.0, 1.0, 3.0, 3.0],
                         [1.0, 0.0, 2.0, 1.0],    # touches the unit square
                         [2.0, 2.0, 3.0, 3.0],    # diagonal, disjoint
                         [0.5, 0.5, 0.5, 0.5]],   # zero area
                        dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(10, 2, generator=g, dtype=torch.float64) * 10
    wh = torch.rand(10, 2, generator=g, dtype=torch.float64) * 5 + 0.1
    rand = torch.cat([xy, xy + wh], 1)
    boxes1, boxes2 = torch.cat([hand, rand[:4]]), torch.cat([hand[:5], rand[4:]])  # zero-area box only on one side
    iou, _ = box_ops.box_iou(boxes1, boxes2)
    return {"boxes1": boxes1, "boxes2": boxes2, "giou": box_ops.generalized_box_iou(boxes1, boxes2), "iou": iou}


def transformer_case(transformer: types.ModuleType) -> dict:
    kwargs = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                  dropout=0.0, normalize_before=True, return_intermediate_dec=True)
    torch.manual_seed(0)
    model = transformer.Transformer(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    bs, d, h, w, q = 2, 32, 5, 6, 7
    src, pos_embed = torch.randn(bs, d, h, w), torch.randn(bs, d, h, w)
    query_embed = torch.randn(q, d)
    mask = torch.zeros(bs, h, w, dtype=torch.bool)
    mask[1, 3:, :] = True  # image 1 is padded at the bottom and right
    mask[1, :, 4:] = True
    with torch.no_grad():
        hs, memory = model(src, mask, query_embed, pos_embed)
    return {"kwargs": kwargs, "state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "src": src,
            "mask": mask, "query_embed": query_embed, "pos_embed": pos_embed, "hs": hs, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detr-repo", type=Path, required=True, help="clone of facebookresearch/detr")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = {
        "generalized_box_iou": giou_case(module(args.detr_repo, "util/box_ops.py")),
        "transformer_pre_norm": transformer_case(module(args.detr_repo, "models/transformer.py")),
        "note": f"facebookresearch/detr {commit(args.detr_repo)}, torch {torch.__version__}, CPU",
    }
    torch.save(data, args.out)
    print(f"wrote {args.out}: {data['note']}")


if __name__ == "__main__":
    main()
