"""Make ``dino_cdn_reference.pt``: the official DINO ``prepare_for_cdn``, ``dn_post_process`` and denoising loss.

Usage (from the repository root)::

    python tests/data/make_dino_cdn_reference.py [DINO_REPO] [OUT]

``DINO_REPO`` (default: ``$DINO_REPO``) is a clone (a work tree or a bare git directory) of
IDEA-Research/DINO; HEAD is exported to a temporary directory and imported there. The official code is
run unchanged, on CPU: ``Tensor.cuda()`` and ``Tensor.to('cuda')`` return the tensor itself, the
package ``__init__`` files (which import the CUDA deformable-attention op) are skipped, and the other
run-time patches are those of ``make_conditional_dab_vectors.prepare_imports``. ``SetCriterion`` is
taken from ``models/dino/dino.py`` by itself (the rest of that file builds the model).

Stored per batch composition (``CASES``): the settings, the targets, the ``label_enc`` weight, the
seed of the global generator before the call, and the official outputs (``input_query_label``,
``input_query_bbox``, ``attn_mask``, ``dn_meta``). For the ``LOSS_CASES``, seeded per-layer logits and
boxes over ``pad_size + num_queries`` queries, and the official losses of ``SetCriterion`` (training
mode, DINO's matcher costs 2/5/2, focal alpha 0.25, losses labels/boxes/cardinality).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import make_conditional_dab_vectors as base  # noqa: E402  (export and run-time patches of the official code)

NUM_QUERIES, NUM_CLASSES, HIDDEN_DIM, LAYERS = 6, 20, 8, 3
#: name -> (objects per image, dn_number, label_noise_ratio, box_noise_scale)
CASES = {
    "mixed": ((3, 1, 0), 100, 0.5, 1.0),        # an image without objects; 200 // 6 = 33 groups
    "budget_exceeded": ((60, 3), 50, 0.5, 0.4),  # 2·60 > 2·50: 100 // 120 = 0 groups -> 1
    "small_dn_number": ((2, 2), 5, 0.4, 0.4),    # 2·5 < 100 is not divided: 10 groups
    "dn_number_zero": ((2, 1), 0, 0.5, 1.0),     # still one group
    "no_noise": ((2, 1), 100, 0.0, 0.0),         # no random draws at all
    "single_image": ((5,), 100, 0.5, 1.0),       # 20 groups
    "no_objects": ((0, 0), 100, 0.5, 1.0),       # no denoising slots, one group
}
LOSS_CASES = ("mixed", "single_image", "no_objects")


def make_targets(counts: tuple[int, ...], seed: int) -> list[dict]:
    """Boxes with cx, cy in [0.05, 0.95] and w, h in [0.02, 0.6] (some reach past the image edge, so the
    noised corners get clamped) and labels in [0, NUM_CLASSES)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.9 + 0.05
        size = torch.rand(n, 2, generator=g) * 0.58 + 0.02
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.cat([centre, size], 1)})
    return targets


def patch_cuda() -> None:
    """Let the official ``.cuda()`` and ``.to('cuda')`` calls keep tensors on the CPU."""
    to = torch.Tensor.to
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.to = lambda self, *args, **kwargs: self if args[:1] == ("cuda",) else to(self, *args, **kwargs)


def official_criterion(root: Path):
    """DINO's ``SetCriterion`` class, executed by itself with the names it uses."""
    from models.dino import matcher, utils
    from util import box_ops, misc
    src = (root / "models/dino/dino.py").read_text()
    src = src[src.index("class SetCriterion"):src.index("class PostProcess")]
    scope = {"torch": torch, "F": torch.nn.functional, "nn": torch.nn, "box_ops": box_ops,
             "sigmoid_focal_loss": utils.sigmoid_focal_loss, "dice_loss": None,
             **{name: getattr(misc, name) for name in ("accuracy", "get_world_size", "interpolate",
                                                      "is_dist_avail_and_initialized",
                                                      "nested_tensor_from_tensor_list")}}
    exec(compile(src, "official_dino_criterion", "exec"), scope)
    weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    return scope["SetCriterion"](NUM_CLASSES, matcher.HungarianMatcher(2.0, 5.0, 2.0, focal_alpha=0.25),
                                 weight_dict, 0.25, ["labels", "boxes", "cardinality"]).train()


def run(root: Path) -> dict:
    base.prepare_imports(root)
    package = type(sys)("models.dino")
    package.__path__ = [str(root / "models" / "dino")]  # skip models/dino/__init__ (builds the CUDA op)
    sys.modules["models.dino"] = package
    patch_cuda()
    from models.dino.dn_components import dn_post_process, prepare_for_cdn
    criterion = official_criterion(root)
    out = {"settings": {"num_queries": NUM_QUERIES, "num_classes": NUM_CLASSES, "hidden_dim": HIDDEN_DIM,
                        "layers": LAYERS}, "cases": {}}
    for seed, (name, (counts, dn_number, label_noise, box_noise)) in enumerate(CASES.items(), start=100):
        targets = make_targets(counts, seed)
        torch.manual_seed(seed)
        label_enc = torch.nn.Embedding(NUM_CLASSES + 1, HIDDEN_DIM)
        torch.manual_seed(seed)  # the draws start from this state
        with torch.no_grad():
            label, bbox, mask, meta = prepare_for_cdn((targets, dn_number, label_noise, box_noise), True,
                                                      NUM_QUERIES, NUM_CLASSES, HIDDEN_DIM, label_enc)
        case = {"counts": counts, "dn_number": dn_number, "label_noise_ratio": label_noise,
                "box_noise_scale": box_noise, "seed": seed, "targets": targets,
                "label_enc": label_enc.weight.detach().clone(), "input_query_label": label,
                "input_query_bbox": bbox, "attn_mask": mask, "dn_meta": dict(meta)}
        if name in LOSS_CASES:
            case["loss"] = loss_case(criterion, dn_post_process, targets, meta, seed)
        out["cases"][name] = case
    return out


def loss_case(criterion, dn_post_process, targets: list[dict], meta: dict, seed: int) -> dict:
    """Seeded per-layer outputs over pad_size + NUM_QUERIES queries, split by the official
    ``dn_post_process`` and scored by the official criterion."""
    g = torch.Generator().manual_seed(seed + 1000)
    shape = (LAYERS, len(targets), meta["pad_size"] + NUM_QUERIES)
    outputs_class = torch.randn(*shape, NUM_CLASSES, generator=g)
    outputs_coord = torch.randn(*shape, 4, generator=g).sigmoid()
    meta = dict(meta)
    pairs = lambda c, b: [{"pred_logits": x, "pred_boxes": y} for x, y in zip(c[:-1], b[:-1])]  # noqa: E731
    cls, coord = dn_post_process(outputs_class, outputs_coord, meta, True, pairs)
    outputs = {"pred_logits": cls[-1], "pred_boxes": coord[-1], "aux_outputs": pairs(cls, coord), "dn_meta": meta}
    losses = criterion(outputs, targets)
    return {"outputs_class": outputs_class, "outputs_coord": outputs_coord,
            "official": {k: v.detach().clone() for k, v in losses.items() if re.search(r"_dn(_\d+)?$", k)}}


def main(run_official=None, doc: str = __doc__, env: str = "DINO_REPO", out: str = "dino_cdn_reference.pt") -> None:
    """Parse ``[REPO] [OUT]`` (REPO defaults to ``$env``), run ``run_official`` (default :func:`run`) on an
    export of the clone's HEAD from inside it, and write its result with the commit and torch version."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("repo", nargs="?", default=os.environ.get(env))
    parser.add_argument("out", nargs="?", default=str(Path(__file__).with_name(out)))
    args = parser.parse_args()
    if not args.repo:
        parser.error(f"give the clone as an argument or in ${env}")
    repo = os.path.abspath(args.repo)
    root = base.export(repo)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = (run_official or run)(root)
    finally:
        os.chdir(cwd)
        shutil.rmtree(root)
    result["commit"] = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                                      capture_output=True, text=True).stdout.strip()
    result["torch"] = torch.__version__
    tmp = args.out + ".tmp"
    torch.save(result, tmp)
    os.replace(tmp, args.out)  # the old file stays until the new one is complete
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
