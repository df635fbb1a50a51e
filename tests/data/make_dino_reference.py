"""Make ``dino_reference.pt``: keys, parameter count and eval-mode outputs of the official DINO-4scale R50.

Usage (from the repository root)::

    python tests/data/make_dino_reference.py [DINO_REPO] [OUT]

``DINO_REPO`` (default: ``$DINO_REPO``) is a clone (work tree or bare git directory) of IDEA-Research/DINO;
HEAD is exported to a temporary directory and the model is built there by its own ``build_dino`` from
``config/DINO/DINO_4scale.py`` (read with its ``SLConfig``; needs addict and yapf), on CPU: the run-time
patches of ``make_dino_cdn_reference`` (``.cuda()`` kept on the CPU, package ``__init__`` files skipped)
and the CUDA op ``MultiScaleDeformableAttention`` replaced by the repository's own
``ms_deform_attn_core_pytorch``.

Weights are not stored (the R50 model has 47 M parameters): ``fill_`` of ``make_conditional_dab_vectors``
sets them from a seed in sorted key order, so the tests rebuild them in the library's model. Stored: the
state-dict keys and shapes, the parameter counts, and the outputs in eval mode on ``dino_batch`` (DINO
selects 900 proposals, so the four levels must hold at least 900 pixels): the last layer's logits, every
layer's boxes, the first ``AUX_QUERIES`` logits of the earlier layers, and the ``interm_outputs`` (logits of
the first ``AUX_QUERIES`` proposals, all boxes); and training-mode outputs with denoising (``train_case``).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import make_conditional_dab_vectors as base  # noqa: E402
import make_dino_cdn_reference as cdn  # noqa: E402

IMAGE_SIZE = (256, 320)  # 32·40 + 16·20 + 8·10 + 4·5 = 1700 encoder pixels >= 900
VALID = (224, 288)  # the second image's size inside the padding
TARGET_COUNTS, TRAIN_SEED = (3, 1), 7


def dino_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of ``IMAGE_SIZE``, the second ``VALID`` and padded: images (2, 3, H, W), mask (2, H, W).

    The model runs in float64: the 900 selected proposals include pairs whose scores differ by ~1e-6, and
    float32 rounding would swap them (a different anchor for a slot's learned content query) between
    implementations and thread counts. Padded pixels all get the same proposal score (their memory is
    zeroed), so when the selection includes some, which of them fills which slot is up to ``topk``'s
    tie-breaking; little padding keeps them out of the selection, and ``run`` checks that it does."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *IMAGE_SIZE, generator=g)
    mask = torch.zeros(2, *IMAGE_SIZE, dtype=torch.bool)
    mask[1, VALID[0]:] = True
    mask[1, :, VALID[1]:] = True
    images[mask[:, None].expand_as(images)] = 0
    return images, mask


def patch_deformable_op(root: Path) -> None:
    """Import the official ``MSDeformAttnFunction`` with a stub for the compiled op, and make its ``apply``
    call the repository's pure-PyTorch ``ms_deform_attn_core_pytorch``."""
    sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
    for name in ("models.dino", "models.dino.ops", "models.dino.ops.functions"):
        package = types.ModuleType(name)  # skip the package __init__ files
        package.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = package
    from models.dino.ops.functions import ms_deform_attn_func as func
    sys.modules["models.dino.ops.functions"].MSDeformAttnFunction = func.MSDeformAttnFunction
    core = func.ms_deform_attn_core_pytorch
    func.MSDeformAttnFunction.apply = staticmethod(
        lambda value, shapes, start, locations, weights, im2col_step: core(value, shapes, locations, weights))


def official_model(root: Path):
    base.prepare_imports(root)
    cdn.patch_cuda()
    patch_deformable_op(root)
    from models.dino.dino import build_dino
    from util.slconfig import SLConfig
    cfg = SLConfig.fromfile(str(root / "config/DINO/DINO_4scale.py"))
    args = types.SimpleNamespace(**cfg._cfg_dict.to_dict(), device="cpu", backbone_dir=None)
    return build_dino(args)[0]


def run(root: Path) -> dict:
    model = official_model(root)
    out = {"state_dict_keys": [(k, tuple(v.shape)) for k, v in model.state_dict().items()],
           "param_counts": {"total": sum(p.numel() for p in model.parameters()),
                            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
           "seed": base.SEED, "image_size": IMAGE_SIZE, "aux_queries": base.AUX_QUERIES,
           "num_queries": model.num_queries, "num_classes": model.num_classes}
    base.fill_(model, base.SEED)
    images, mask = dino_batch()
    from util.misc import NestedTensor
    with torch.no_grad():
        result = model.double().eval()(NestedTensor(images.double(), mask))
    result = {k: ({kk: vv.float() for kk, vv in v.items()} if isinstance(v, dict) else
                  [{kk: vv.float() for kk, vv in a.items()} for a in v] if isinstance(v, list) else
                  v if v is None else v.float()) for k, v in result.items()}
    out["official"] = base.model_outputs(result)
    out["official"]["interm_logits"] = result["interm_outputs"]["pred_logits"][:, :base.AUX_QUERIES].clone()
    out["official"]["interm_boxes"] = result["interm_outputs"]["pred_boxes"].clone()
    out["official"]["interm_proposals"] = result["interm_outputs_for_matching_pre"]["pred_boxes"].clone()
    out["output_keys"] = sorted(result)
    out["train"] = train_case(model, images, mask)
    padded = (out["official"]["interm_proposals"] == 1).all(-1).sum().item()
    if padded:
        raise RuntimeError(f"{padded} padded pixels among the selected proposals: their order is arbitrary")
    return out


def train_case(model, images: torch.Tensor, mask: torch.Tensor) -> dict:
    """Training mode (dropout is 0) with targets ``TARGET_COUNTS``, denoising noise from the global generator
    seeded with ``TRAIN_SEED``: the first ``AUX_QUERIES`` matching logits, the last layer's boxes, and the
    denoising slots' last-layer logits and boxes."""
    from util.misc import NestedTensor
    targets = cdn.make_targets(TARGET_COUNTS, TRAIN_SEED)
    for t in targets:
        t["labels"] = t["labels"] * 4  # spread over COCO's 91 ids
    model.label_enc.float()  # the official prepare_for_cdn copies its rows into float32 zeros
    torch.manual_seed(TRAIN_SEED)
    with torch.no_grad():
        result = model.train()(NestedTensor(images.double(), mask), targets)
    meta = result["dn_meta"]
    known = meta["output_known_lbs_bboxes"]
    return {"targets": targets, "pad_size": meta["pad_size"], "num_dn_group": meta["num_dn_group"],
            "pred_logits": result["pred_logits"][:, :base.AUX_QUERIES].float(),
            "pred_boxes": result["pred_boxes"].float(),
            "known_logits": known["pred_logits"].float(), "known_boxes": known["pred_boxes"].float()}


def main() -> None:
    cdn.main(run, __doc__, "DINO_REPO", "dino_reference.pt")


if __name__ == "__main__":
    main()
