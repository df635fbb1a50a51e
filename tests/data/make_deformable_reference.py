"""Write ``deformable_reference.pt``: outputs of the official Deformable DETR for the tests and chapter 12.

Usage::

    python tests/data/make_deformable_reference.py /path/to/Deformable-DETR [out.pt]

The path is a clone (bare is fine) of https://github.com/fundamentalvision/Deformable-DETR; the official
sources are read from its HEAD and executed on CPU with the run-time patches of
``tests/test_deformable_detr.py`` (pure-PyTorch attention core, imports stripped, proposal encoding
sized ``d_model / 2``). Nothing of the official code is stored, only:

* ``transformer``: the official ``DeformableTransformer`` (3 levels, 2 + 2 layers, d 32), its random
  weights, inputs, and outputs without and with box-refinement heads;
* ``proposals``: ``gen_encoder_output_proposals`` on a random memory over 6 levels (so that both ends
  of the valid range 0.01 < p < 0.99 and the padding mask are hit);
* ``models``: the official ``DeformableDETR`` in its plain, ``with_box_refine`` and ``two_stage``
  forms on a small configuration (``config``; the library's small CNN as backbone, since the official
  backbone is a ResNet-50), eval mode, on a padded batch of two images (32x24 and 28x16): random
  weights (state dicts in float32) and float64 outputs.

Weights are the official initialisation plus N(0, 0.2) noise on everything above the backbone, so
zero-initialised layers (the box heads' last layer) matter too.
"""
import os
import pathlib
import subprocess
import sys
import warnings

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
CONFIG = dict(backbone="small", num_classes=3, hidden_dim=32, nheads=4, enc_layers=2, dec_layers=2,
              dim_feedforward=64, num_queries=10, small_widths=(8, 16, 32), dropout=0.0,
              num_feature_levels=4, enc_n_points=2, dec_n_points=2)
VARIANTS = {"plain": {}, "with_box_refine": {"with_box_refine": True},
            "two_stage": {"with_box_refine": True, "two_stage": True}}


def perturb(module, generator, std=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)


def transformer_case(official):
    kwargs = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                  dropout=0.0, num_feature_levels=3, dec_n_points=2, enc_n_points=3)
    torch.manual_seed(0)
    model = official.DeformableTransformer(return_intermediate_dec=True, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    perturb(model, g)
    heads = torch.nn.ModuleList(torch.nn.Linear(32, 4) for _ in range(2))
    shapes = [(8, 6), (4, 3), (2, 2)]
    srcs = [torch.randn(2, 32, h, w, generator=g) for h, w in shapes]
    pos = [torch.randn(2, 32, h, w, generator=g) for h, w in shapes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    masks[0][1, 6:, :] = True
    masks[0][1, :, 4:] = True
    masks[1][1, 3:, :] = True
    masks[1][1, :, 2:] = True
    query = torch.randn(7, 64, generator=g)
    case = dict(kwargs=kwargs, state_dict=model.state_dict(), heads=heads.state_dict(), srcs=srcs, pos=pos,
                masks=masks, query_embed=query)
    model.double()
    for name, bbox_embed in (("plain", None), ("refine", heads.double())):
        model.decoder.bbox_embed = bbox_embed
        with torch.no_grad():
            hs, init_ref, inter_refs, _, _ = model([s.double() for s in srcs], masks, [p.double() for p in pos],
                                                   query.double())
        case[name] = dict(hs=hs, init_reference=init_ref, inter_references=inter_refs)
    return case


def proposals_case(official):
    """Six levels, widest 56 columns: centres 0.5/56 < 0.01 and (55.5)/56 > 0.99 fall outside the valid
    range, level 5's size 0.05 * 32 = 1.6 too; image 1 is padded to 150 of 224 columns, 12 of 16 rows,
    and a padded notch inside that rectangle holds proposals that only the padding mask makes invalid."""
    shapes = [(4, 56), (2, 28), (1, 14), (1, 7), (1, 4), (1, 2)]
    mask = torch.zeros(2, 16, 224, dtype=torch.bool)
    mask[1, 12:] = True
    mask[1, :, 150:] = True
    mask[1, 8:, 100:] = True
    masks = [F.interpolate(mask[None].float(), size=s).to(torch.bool)[0] for s in shapes]
    g = torch.Generator().manual_seed(2)
    heads = torch.nn.ModuleDict({"enc_output": torch.nn.Linear(8, 8), "enc_output_norm": torch.nn.LayerNorm(8)})
    perturb(heads, g)
    memory = torch.randn(2, sum(h * w for h, w in shapes), 8, generator=g, dtype=torch.float64)
    mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
    spatial_shapes = torch.tensor(shapes)
    state = heads.state_dict()
    heads.double()
    with torch.no_grad():
        out_memory, proposals = official.DeformableTransformer.gen_encoder_output_proposals(
            heads, memory, mask_flat, spatial_shapes)
    return dict(heads=state, memory=memory, mask_flatten=mask_flat, spatial_shapes=spatial_shapes,
                output_memory=out_memory, output_proposals=proposals)


def official_detr(official, options):
    """The official model around the library's small CNN (same parameter names), given the official
    backbone interface: NestedTensor in, dict of NestedTensors out."""
    from detr_tutorial.models.backbone import SmallBackbone

    class NestedSmallBackbone(SmallBackbone):
        def forward(self, tensor_list):
            return {str(i): official.NestedTensor(x, F.interpolate(tensor_list.mask[None].float(),
                                                                   size=x.shape[-2:]).to(torch.bool)[0])
                    for i, x in enumerate(self.extract(tensor_list.tensors))}

    c = CONFIG
    backbone = official.Joiner(NestedSmallBackbone(c["small_widths"], (2, 2, 2), return_interm_layers=True),
                               official.PositionEmbeddingSine(c["hidden_dim"] // 2, normalize=True))
    transformer = official.DeformableTransformer(
        d_model=c["hidden_dim"], nhead=c["nheads"], num_encoder_layers=c["enc_layers"],
        num_decoder_layers=c["dec_layers"], dim_feedforward=c["dim_feedforward"], dropout=c["dropout"],
        return_intermediate_dec=True, num_feature_levels=c["num_feature_levels"],
        dec_n_points=c["dec_n_points"], enc_n_points=c["enc_n_points"],
        two_stage=options.get("two_stage", False), two_stage_num_proposals=c["num_queries"])
    return official.DeformableDETR(backbone, transformer, num_classes=c["num_classes"],
                                   num_queries=c["num_queries"], num_feature_levels=c["num_feature_levels"],
                                   aux_loss=True, **options)


def model_case(official, options, images, seed):
    torch.manual_seed(seed)
    model = official_detr(official, options).eval()
    g = torch.Generator().manual_seed(seed)
    perturb(model.transformer, g)
    for name, module in model.named_children():
        if name not in ("backbone", "transformer"):
            perturb(module, g)
    state = model.state_dict()  # float32; .double() below gives the model new tensors
    model.double()
    samples = official.nested_tensor_from_tensor_list([im.double() for im in images])
    with torch.no_grad():
        out = model(samples)
    return dict(options=options, state_dict=state, outputs=out), samples


def distinct_top_scores(out, k):
    """Two-stage picks the top-k encoder scores: ties there would make the query order fragile."""
    top = out["enc_outputs"]["pred_logits"][..., 0].topk(k + 1, dim=1).values
    return bool(((top[:, :-1] - top[:, 1:]) > 1e-6).all())


def main(repo, out_path):
    os.environ["DEFORMABLE_DETR_REPO"] = str(repo)
    sys.path.insert(0, str(HERE.parent))
    from test_deformable_detr import load_official_detr

    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    official = load_official_detr()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 24, generator=g), torch.rand(3, 28, 16, generator=g)]
    data = dict(commit=commit, repository="https://github.com/fundamentalvision/Deformable-DETR",
                script="tests/data/make_deformable_reference.py", config=CONFIG, models={})
    with warnings.catch_warnings():  # their meshgrid calls warn about the indexing argument
        warnings.simplefilter("ignore")
        data["transformer"] = transformer_case(official)
        data["proposals"] = proposals_case(official)
        for name, options in VARIANTS.items():
            seed = 0
            case, samples = model_case(official, options, images, seed)
            while "two_stage" in options and not distinct_top_scores(case["outputs"], CONFIG["num_queries"]):
                seed += 1
                case, samples = model_case(official, options, images, seed)
            case["seed"] = seed
            data["models"][name] = case
    data["images"], data["mask"] = samples.tensors.float(), samples.mask
    torch.save(data, out_path)
    print(f"wrote {out_path} ({pathlib.Path(out_path).stat().st_size / 1e6:.2f} MB) from commit {commit}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(pathlib.Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else HERE / "deformable_reference.pt")
