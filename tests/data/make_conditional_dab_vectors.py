"""Make ``conditional_dab_vectors.pt``: outputs of the official Conditional DETR and DAB-DETR code.

Usage (from the repository root)::

    python tests/data/make_conditional_dab_vectors.py CONDITIONAL_DETR_REPO DAB_DETR_REPO [OUT]

Each repository is a clone (a work tree or a bare git directory) of Atten4Vis/ConditionalDETR
or IDEA-Research/DAB-DETR; HEAD is exported to a temporary directory and imported there, in a
child process per repository (both name their packages ``models`` and ``util``). The official
code is run unchanged, on CPU. At import time ``is_main_process`` returns False (no ImageNet
download), stubs stand in for ``timm`` (needed only by DAB-DETR's Swin backbone) and ``termcolor``
(its logger), and the old torch names their version checks ask for (``_LinearWithBias``,
``torch._overrides``) point to today's equivalents.

Weights are not stored: ``fill_`` sets every state-dict entry from a seeded generator, in sorted
key order, so the tests rebuild the same weights in the library's models (whose keys are the
official ones). What is stored: the official commit, the inputs, and the official outputs of

* ``sine_embed``: the reference-point sine embedding of 2-d points (Conditional DETR) and of
  2-d and 4-d points (DAB-DETR);
* ``cond_layer``: one Conditional DETR decoder layer (d 256, 8 heads), as a first layer
  (``ca_qpos_proj`` kept) and as a later one;
* ``dab_decoder``: a 2-layer DAB-DETR decoder with width/height modulation and anchor updates
  (d 64, 4 heads), its outputs and references;
* ``*_r50``: the whole R50 models (official ``main.py`` defaults; DAB-DETR ``-m dab_detr``) on a
  padded batch of two images: their state-dict keys and shapes, parameter counts, and outputs
  (last-layer logits, every layer's boxes, the first 20 queries' auxiliary logits).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

SEED = 20260312
AUX_QUERIES = 20


def fill_(module: torch.nn.Module, seed: int = SEED) -> None:
    """Set every state-dict tensor of ``module`` from a generator seeded with ``seed``, in sorted key order
    (so the values depend on the names alone, not on the order the modules were built in).

    Matrices get N(0, 1/fan_in); 1-d ``weight``s (norms, PReLU) 1 + N(0, 0.1^2); running variances
    U(0.5, 1.5); every other vector N(0, 0.1^2). Tensors shared under two keys get the later value.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in sorted(module.state_dict(keep_vars=True).items()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if key.endswith("running_var"):
                value = torch.rand(t.shape, generator=g) + 0.5
            elif t.dim() > 1:
                value = noise / math.sqrt(t[0].numel())
            elif key.endswith("weight"):
                value = 1 + 0.1 * noise
            else:
                value = 0.1 * noise
            t.copy_(value)


def padded_batch(seed: int = 1, size: tuple[int, int] = (64, 96)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, the second 48 x 70 padded to ``size``: images (2, 3, H, W), mask (2, H, W)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *size, generator=g)
    mask = torch.zeros(2, *size, dtype=torch.bool)
    mask[1, 48:] = True
    mask[1, :, 70:] = True
    images[mask[:, None].expand_as(images)] = 0
    return images, mask


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def layer_inputs(seed: int, d: int, q: int = 5, hw: int = 12) -> dict:
    """Sequence-first inputs of a decoder layer: tgt, query_pos, query_sine_embed (Q, 2, d), memory, pos (HW, 2, d)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, hw, dtype=torch.bool)
    mask[1, hw - 4:] = True
    return dict(tgt=randn(g, q, 2, d), memory=randn(g, hw, 2, d), pos=randn(g, hw, 2, d),
                query_pos=randn(g, q, 2, d), query_sine_embed=randn(g, q, 2, d), memory_key_padding_mask=mask)


def model_outputs(out: dict) -> dict:
    """What is stored of a model's outputs (copies, so no larger storage is saved with a view)."""
    return {"pred_logits": out["pred_logits"].clone(),
            "pred_boxes": torch.stack([a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]),
            "aux_logits": torch.stack([a["pred_logits"][:, :AUX_QUERIES] for a in out["aux_outputs"]])}


def export(repo: str) -> Path:
    """HEAD of ``repo`` in a fresh temporary directory (returned)."""
    dest = Path(tempfile.mkdtemp(prefix="official_"))
    archive = subprocess.run(["git", "-C", repo, "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def prepare_imports(root: Path) -> None:
    """Import the official packages from ``root`` without their package __init__ side effects."""
    sys.path.insert(0, str(root))
    # their torch-version tests pick these old names for torch 2: restore them
    torch.nn.modules.linear._LinearWithBias = torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    sys.modules["torch._overrides"] = torch.overrides
    for name in ("timm", "timm.models", "timm.models.layers", "termcolor"):
        stub = types.ModuleType(name)
        stub.DropPath = stub.to_2tuple = stub.trunc_normal_ = stub.colored = None
        sys.modules[name] = stub
    models = types.ModuleType("models")
    models.__path__ = [str(root / "models")]  # skip models/__init__ (DAB's imports its CUDA variant)
    sys.modules["models"] = models
    import util.misc
    util.misc.is_main_process = lambda: False


def official_args(argv: tuple[str, ...] = ()) -> argparse.Namespace:
    """The defaults of the official ``main.py`` (plus ``argv``), from its ``get_args_parser`` alone
    (importing ``main`` would import the datasets and the training engine)."""
    src = Path("main.py").read_text()
    start = src.index("def get_args_parser")
    end = src.index("\ndef ", start + 1)
    scope = {"argparse": argparse}
    exec(src[start:end], scope)
    return scope["get_args_parser"]().parse_args(list(argv))


def run_conditional(root: Path) -> dict:
    prepare_imports(root)
    from models import conditional_detr, transformer
    out = {}
    g = torch.Generator().manual_seed(2)
    points = torch.rand(7, 2, 2, generator=g)
    points[0, 0] = torch.tensor([0.0, 1.0])
    out["sine_embed"] = {"points_2d": points, "official_2d": transformer.gen_sineembed_for_position(points)}
    layer = transformer.TransformerDecoderLayer(256, 8, 64, dropout=0.0).eval()
    fill_(layer, SEED + 1)
    inputs = layer_inputs(3, 256)
    first = layer(**inputs, is_first=True)
    layer.ca_qpos_proj = None
    later = layer(**inputs, is_first=False)
    out["cond_layer"] = {"inputs": inputs, "official_first": first, "official_later": later}
    args = official_args()
    model = conditional_detr.build(args)[0].eval()
    out["cond_r50"] = r50_case(model, args)
    return out


def run_dab(root: Path) -> dict:
    prepare_imports(root)
    from models.DAB_DETR import DABDETR, transformer
    out = {}
    g = torch.Generator().manual_seed(4)
    boxes = torch.rand(7, 2, 4, generator=g)
    boxes[0, 0] = torch.tensor([0.0, 1.0, 0.5, 1.0])
    xy = boxes[..., :2].clone()
    out["sine_embed"] = {"points_2d": xy, "official_2d": transformer.gen_sineembed_for_position(xy),
                         "points_4d": boxes, "official_4d": transformer.gen_sineembed_for_position(boxes)}
    d = 64
    layer = transformer.TransformerDecoderLayer(d, 4, 96, dropout=0.0, activation="prelu")
    decoder = transformer.TransformerDecoder(layer, 2, torch.nn.LayerNorm(d), return_intermediate=True, d_model=d,
                                             query_dim=4, modulate_hw_attn=True).eval()
    decoder.bbox_embed = transformer.MLP(d, d, 4, 3)
    fill_(decoder, SEED + 2)
    inputs = layer_inputs(5, d)
    anchors = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(6))
    inputs = dict(tgt=torch.zeros_like(inputs["tgt"]), memory=inputs["memory"], pos=inputs["pos"],
                  memory_key_padding_mask=inputs["memory_key_padding_mask"], refpoints_unsigmoid=anchors)
    hs, references = decoder(**inputs)
    out["dab_decoder"] = {"inputs": inputs, "official_hs": hs, "official_references": references}
    args = official_args(("-m", "dab_detr", "--coco_path", "unused"))
    model = DABDETR.build_DABDETR(args)[0].eval()
    out["dab_r50"] = r50_case(model, args)
    return out


def r50_case(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    from util.misc import NestedTensor
    case = {"state_dict_keys": [(k, tuple(v.shape)) for k, v in model.state_dict().items()],
            "param_counts": {"total": sum(p.numel() for p in model.parameters()),
                             "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
            "num_queries": args.num_queries, "seed": SEED}
    fill_(model, SEED)
    images, mask = padded_batch()
    with torch.no_grad():
        case["official"] = model_outputs(model(NestedTensor(images, mask)))
    return case


def child(kind: str, repo: str, out: str) -> None:
    repo = os.path.abspath(repo)
    root = export(repo)
    os.chdir(root)
    try:
        result = (run_conditional if kind == "conditional" else run_dab)(root)
    finally:
        shutil.rmtree(root)
    result["commit"] = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                                      capture_output=True, text=True).stdout.strip()
    result["torch"] = torch.__version__
    torch.save(result, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("conditional_repo")
    parser.add_argument("dab_repo")
    parser.add_argument("out", nargs="?", default=str(Path(__file__).with_name("conditional_dab_vectors.pt")))
    parser.add_argument("--child", choices=["conditional", "dab"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.conditional_repo if args.child == "conditional" else args.dab_repo, args.out)
        return
    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("conditional", "dab"):
            part = os.path.join(tmp, kind + ".pt")
            subprocess.run([sys.executable, os.path.abspath(__file__), args.conditional_repo, args.dab_repo,
                            part, "--child", kind], check=True)
            parts[kind] = torch.load(part, weights_only=False)
        torch.save(parts, os.path.join(tmp, "all.pt"))
        shutil.move(os.path.join(tmp, "all.pt"), args.out)  # the old file stays until the new one is complete
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
