"""Make ``dn_detr_reference.pt``: outputs of the official DN-DAB-DETR (IDEA-Research/DN-DETR, single scale).

Usage (from the repository root)::

    python tests/data/make_dn_detr_reference.py [DN_DETR_REPO] [OUT]

``DN_DETR_REPO`` (default: ``$DN_DETR_REPO``) is a clone (work tree or bare git directory); HEAD is
exported to a temporary directory and run unchanged on CPU with the run-time patches of
``make_dino_cdn_reference`` (``.cuda()`` kept on the CPU) and ``make_conditional_dab_vectors``.

Weights are not stored: ``fill_`` of ``make_conditional_dab_vectors`` sets them from a seed, in sorted
key order, so the tests rebuild them in the library's model. Stored: the state-dict keys and shapes and
parameter counts of the R50 model built by ``main.py -m dn_dab_detr --use_dn`` (defaults: scalar 5,
label noise 0.2, box noise 0.4), its eval-mode outputs on the padded batch of two images
(``official``, the layout ``check_r50`` of ``tests/test_conditional_detr.py`` reads), and its
training-mode outputs with denoising (targets ``TARGET_COUNTS``, global seed ``TRAIN_SEED``): the matching
outputs, the denoising slots' outputs, and the official denoising losses (``compute_dn_loss``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import make_conditional_dab_vectors as base  # noqa: E402
import make_dino_cdn_reference as cdn  # noqa: E402

TARGET_COUNTS, TRAIN_SEED = (3, 1), 7


def run(root: Path) -> dict:
    base.prepare_imports(root)
    cdn.patch_cuda()
    from models.DN_DAB_DETR import DABDETR, dn_components
    from util.misc import NestedTensor
    args = base.official_args(("-m", "dn_dab_detr", "--use_dn", "--coco_path", "unused"))
    model = DABDETR.build_DABDETR(args)[0]
    out = {"state_dict_keys": [(k, tuple(v.shape)) for k, v in model.state_dict().items()],
           "param_counts": {"total": sum(p.numel() for p in model.parameters()),
                            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
           "seed": base.SEED,
           "num_queries": args.num_queries, "num_classes": model.num_classes,
           "dn": {"scalar": args.scalar, "label_noise_scale": args.label_noise_scale,
                  "box_noise_scale": args.box_noise_scale}}
    base.fill_(model, base.SEED)
    images, mask = base.padded_batch()
    with torch.no_grad():
        out["official"] = base.model_outputs(model.eval()(NestedTensor(images, mask), dn_args=args.num_patterns)[0])
    targets = cdn.make_targets(TARGET_COUNTS, TRAIN_SEED)
    for t in targets:
        t["labels"] = t["labels"] * 4  # spread over COCO's 91 ids
    torch.manual_seed(TRAIN_SEED)
    with torch.no_grad():
        train_out, mask_dict = model.train()(NestedTensor(images, mask), dn_args=(
            targets, args.scalar, args.label_noise_scale, args.box_noise_scale, args.num_patterns))
        losses = dn_components.compute_dn_loss(mask_dict, True, len(train_out["aux_outputs"]), args.focal_alpha)
    known_class, known_coord = mask_dict["output_known_lbs_bboxes"]
    out["train"] = {"targets": targets, "outputs": base.model_outputs(train_out), "pad_size": mask_dict["pad_size"],
                    "known_logits": known_class[-1].clone(), "known_boxes": known_coord.clone(),
                    "official_losses": {k: v.clone() for k, v in losses.items()}}
    return out


def main() -> None:
    cdn.main(run, __doc__, "DN_DETR_REPO", "dn_detr_reference.pt")


if __name__ == "__main__":
    main()
