"""DETR3D: the model (shapes, cross-attention, refinement with detach), the assigner, the loss, the NMS-free
decoding, the training recipe and the command line."""
import json
import math

import pytest
import torch
import torchvision

from detr_tutorial.data.multiview import CameraRig, MultiViewDataset, multiview_collate
from detr_tutorial.detr3d_training import (Detr3DCriterion, HungarianAssigner3D, MultiViewConfig, NMSFreeCoder,
                                           build_detr3d_training, evaluate_detr3d, post_center_range, seen_targets)
from detr_tutorial.models import build_detr3d, feature_sampling, normalize_bbox
from detr_tutorial.models.deformable_transformer import inverse_sigmoid
from detr_tutorial.models.detr3d import Detr3DCrossAtten

PC_RANGE = (-45.0, -45.0, -1.0, 45.0, 45.0, 4.0)
TINY = dict(num_classes=3, small_widths=(8, 8, 16), hidden_dim=16, nheads=2, dec_layers=3, dim_feedforward=32,
            num_queries=6, dropout=0.0, num_levels=4, num_cams=4, pc_range=PC_RANGE)


@pytest.fixture(scope="module")
def batch():
    rig = CameraRig(4, (32, 48))
    data = MultiViewDataset(2, rig, min_objects=2, max_objects=3, seed=0)
    return multiview_collate([data[0], data[1]])


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_detr3d(**dict(TINY, **overrides)).eval()


def test_forward_shapes_and_boxes_in_range(batch):
    images, lidar2img, _ = batch
    out = _model()(images, lidar2img)
    assert out["pred_logits"].shape == (2, 6, 3)
    assert out["pred_boxes"].shape == (2, 6, 8)
    assert len(out["aux_outputs"]) == 2 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 6, 8)
    assert len(out["references"]) == 4 and out["references"][0].shape == (2, 6, 3)
    centres = out["pred_boxes"][..., [0, 1, 4]]  # metres, inside pc_range by construction (sigmoid)
    assert (centres >= torch.tensor(PC_RANGE[:3])).all() and (centres <= torch.tensor(PC_RANGE[3:])).all()


def test_each_layer_box_centre_is_its_refined_reference(batch):
    images, lidar2img, _ = batch
    out = _model()(images, lidar2img)
    layers = [*out["aux_outputs"], {"pred_boxes": out["pred_boxes"]}]
    lo, hi = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:])
    for lvl, layer in enumerate(layers):
        refined = out["references"][lvl + 1] * (hi - lo) + lo
        torch.testing.assert_close(layer["pred_boxes"][..., [0, 1, 4]], refined)


def test_refinement_detaches_the_reference_between_layers(batch):
    """Layer 1's boxes depend on reg branch 0 only through the reference point it refined, which the next
    layer receives detached (official ``with_box_refine``): no gradient reaches reg branch 0 from them."""
    images, lidar2img, _ = batch
    model = _model()
    out = model(images, lidar2img)
    out["aux_outputs"][1]["pred_boxes"].sum().backward()
    assert all((p.grad is None or not p.grad.any()) for p in model.reg_branches[0].parameters())
    assert model.reg_branches[1][-1].weight.grad.abs().sum() > 0
    model.zero_grad()
    model(images, lidar2img)["aux_outputs"][0]["pred_boxes"].sum().backward()
    # the first layer's box trains the initial reference points (not detached, as official)
    assert model.reference_points.weight.grad.abs().sum() > 0
    assert model.reg_branches[0][-1].weight.grad.abs().sum() > 0


def test_cross_attention_by_hand(batch):
    """sigmoid weights x visibility mask, summed over cameras, points and levels; output_proj; residual and
    the position encoder on inverse_sigmoid(reference) -- computed here step by step."""
    images, lidar2img, _ = batch
    torch.manual_seed(1)
    feats = [torch.randn(2, 4, 16, h, w) for h, w in ((8, 12), (4, 6))]
    attn = Detr3DCrossAtten(16, num_levels=2, num_cams=4, pc_range=PC_RANGE, num_points=1, dropout=0.0)
    torch.nn.init.normal_(attn.attention_weights.weight)  # zero at init: make the weights differ
    query, query_pos = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    ref = torch.rand(2, 5, 3)
    ref[0, 0] = torch.tensor([0.5, 0.5, 0.5])  # at the ego origin: behind or beside every camera
    out = attn(query, query_pos, feats, ref, lidar2img, (32, 48))
    _, sampled, mask = feature_sampling(feats, ref, PC_RANGE, lidar2img, (32, 48))  # (2,16,5,4,1,2), (2,1,5,4,1,1)
    w = attn.attention_weights(query + query_pos).view(2, 5, 4, 2).sigmoid()  # (B, Q, N, L)
    w = w * mask[:, 0, :, :, 0]  # (B, Q, N, 1)
    fused = torch.einsum("bcqnl,bqnl->bqc", sampled[..., 0, :], w)
    expected = attn.output_proj(fused) + query + attn.position_encoder(inverse_sigmoid(ref))
    torch.testing.assert_close(out, expected)
    assert attn.last_weights.shape == (2, 1, 5, 4, 1, 2)
    invisible = ~mask[:, 0, :, :, 0, 0]
    assert invisible.any() and (attn.last_weights[:, 0, :, :, 0, :][invisible] == 0).all()


def test_assigner_on_a_hand_case():
    # 3 queries, 2 objects: query 2 sits on object 0 with its class, query 0 on object 1; query 1 is far off
    boxes = torch.tensor([[10.0, 5.0, 0.8, 1.9, 4.6, 1.7, 0.3], [-8.0, 2.0, 0.9, 0.7, 0.7, 1.8, -1.0]])
    labels = torch.tensor([0, 2])
    codes = torch.zeros(3, 8)
    codes[2], codes[0] = normalize_bbox(boxes[0]), normalize_bbox(boxes[1])
    codes[1] = normalize_bbox(torch.tensor([30.0, -30.0, 1.0, 2.0, 5.0, 2.0, 0.0]))
    logits = torch.full((3, 3), -3.0)
    logits[2, 0], logits[0, 2] = 3.0, 3.0
    outputs = {"pred_logits": logits[None], "pred_boxes": codes[None]}
    (rows, cols), = HungarianAssigner3D()(outputs, [{"boxes": boxes, "labels": labels}])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}
    # one entry of the cost by hand: 2.0 x focal cost + 0.25 x L1 over the 8 code entries
    p = torch.sigmoid(logits[1, 0])
    focal = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(1 - p + 1e-8)
    l1 = (codes[1] - normalize_bbox(boxes[0])).abs().sum()
    cost = HungarianAssigner3D().cost_matrix(logits, codes, labels, boxes)
    torch.testing.assert_close(cost[1, 0], 2.0 * focal + 0.25 * l1)


def test_criterion_by_hand():
    torch.manual_seed(0)
    boxes = torch.tensor([[10.0, 5.0, 0.8, 1.9, 4.6, 1.7, 0.3], [-8.0, 2.0, 0.9, 0.7, 0.7, 1.8, -1.0]])
    codes = torch.randn(1, 3, 8)
    logits = torch.tensor([[[2.0, -1.0], [-2.0, 0.5], [0.3, 0.1]]])
    target = [{"boxes": boxes, "labels": torch.tensor([1, 0])}]
    criterion = Detr3DCriterion(2, code_weights=[1, 1, 1, 1, 1, 1, 2, 2])
    outputs = {"pred_logits": logits, "pred_boxes": codes}
    (q, g), = criterion.assigner(outputs, target)
    losses = criterion(outputs, target)
    onehot = torch.zeros(1, 3, 2)
    onehot[0, q, target[0]["labels"][g]] = 1
    # sums divided by the number of matched queries (2)
    torch.testing.assert_close(losses["loss_cls"], torchvision.ops.sigmoid_focal_loss(logits, onehot).sum() / 2)
    weights = torch.tensor([1, 1, 1, 1, 1, 1, 2, 2.0])
    l1 = ((codes[0, q] - normalize_bbox(boxes[g])).abs() * weights).sum()
    torch.testing.assert_close(losses["loss_bbox"], l1 / 2)
    assert criterion.weight_dict == {"loss_cls": 2.0, "loss_bbox": 0.25}


def test_criterion_covers_every_layer_and_empty_scenes(batch):
    images, lidar2img, targets = batch
    model, criterion, _ = build_detr3d_training(**TINY)
    out = model(images, lidar2img)
    empty = [{"boxes": torch.zeros(0, 7), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = criterion(out, empty)
    assert set(losses) == set(criterion.weight_dict) == {"loss_cls", "loss_bbox", "loss_cls_0", "loss_bbox_0",
                                                         "loss_cls_1", "loss_bbox_1"}
    assert losses["loss_bbox"] == 0 and losses["loss_cls"] > 0  # every query a negative, divided by max(0, 1)


def test_nms_free_decoding():
    logits = torch.tensor([[[0.0, 2.0], [1.0, -1.0], [3.0, 0.5]]])  # (1, 3 queries, 2 classes)
    boxes = torch.tensor([[1.0, 2.0, 0.5, 2.0, 4.0, 1.5, 0.5], [70.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0],
                          [-3.0, 4.0, 1.0, 0.7, 0.7, 1.8, -2.0]])
    outputs = {"pred_logits": logits, "pred_boxes": normalize_bbox(boxes)[None]}
    result, = NMSFreeCoder(2, post_center_range(PC_RANGE), max_num=4)(outputs)
    # top 4 of the 6 sigmoid scores: (q2,c0) 3.0, (q0,c1) 2.0, (q1,c0) 1.0 -> dropped (x = 70 > 55), (q2,c1) 0.5
    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 0.5])))
    assert result["labels"].tolist() == [0, 1, 1]
    torch.testing.assert_close(result["boxes"], boxes[[2, 0, 2]])
    assert post_center_range(PC_RANGE) == (-55.0, -55.0, -10.0, 55.0, 55.0, 10.0)


def test_one_training_step_lowers_the_loss(batch):
    images, lidar2img, targets = batch
    torch.manual_seed(0)
    model, criterion, _ = build_detr3d_training(**TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss():
        losses = criterion(model(images, lidar2img), targets)
        return sum(v * criterion.weight_dict[k] for k, v in losses.items())

    model.eval()  # BatchNorm in eval mode: the same function before and after the step
    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before


def test_seen_targets_and_evaluation(batch):
    images, lidar2img, targets = batch
    target = {"boxes": torch.ones(3, 7), "labels": torch.tensor([0, 1, 2]),
              "visible_pixels": torch.tensor([[0, 0], [3, 0], [0, 1]])}
    kept = seen_targets(target)
    assert kept["labels"].tolist() == [1, 2] and kept["boxes"].shape == (2, 7)
    model, _, coder = build_detr3d_training(**TINY)
    metrics = evaluate_detr3d(model, [batch], coder, MultiViewDataset.classes)
    assert set(metrics) >= {"mAP", "mATE", "AP_car", "AP_truck", "AP_pedestrian"}
    assert 0 <= metrics["mAP"] <= 1 and all(isinstance(v, float) for v in metrics.values())


def test_bad_inputs(batch):
    images, lidar2img, targets = batch
    model = _model()
    with pytest.raises(ValueError, match="images must have shape"):
        model(images[:, :3], lidar2img[:, :3])
    with pytest.raises(ValueError, match="lidar2img must have shape"):
        model(images, lidar2img[:1])
    singular = lidar2img.clone()
    singular[0, 1, 2] = 0
    singular[0, 1, 3] = 0
    with pytest.raises(ValueError, match="invertible"):
        model(images, singular)
    with pytest.raises(TypeError, match="float"):
        model((images * 255).to(torch.uint8), lidar2img)
    with pytest.raises(ValueError, match="code_size"):
        build_detr3d(**dict(TINY, code_size=9))
    with pytest.raises(ValueError, match="pc_range"):
        build_detr3d(**dict(TINY, pc_range=(0, 0, 0, 1, 1)))
    out = model(images, lidar2img)
    criterion = Detr3DCriterion(3)
    nan_boxes = [dict(t, boxes=torch.full_like(t["boxes"], math.nan)) for t in targets]
    with pytest.raises(ValueError, match="NaN"):
        criterion(out, nan_boxes)
    bad_labels = [dict(t, labels=torch.full_like(t["labels"], 3)) for t in targets]
    with pytest.raises(ValueError, match=r"lie in \[0, 2\]"):
        criterion(out, bad_labels)
    with pytest.raises(ValueError, match="list of 2"):
        criterion(out, targets[:1])
    with pytest.raises(ValueError, match="max_num"):
        NMSFreeCoder(3, post_center_range(PC_RANGE), max_num=0)
    with pytest.raises(ValueError, match="classes"):
        NMSFreeCoder(2, post_center_range(PC_RANGE))(out)
    with pytest.raises(TypeError, match="MultiViewConfig"):
        from detr_tutorial.detr3d_training import multiview_loaders
        multiview_loaders({"num_train": 2}, 2)
    with pytest.raises(ValueError, match="split"):
        MultiViewConfig().dataset("test")


def test_cli_trains_the_tiny_preset(tmp_path):
    from detr_tutorial.train import main
    out = tmp_path / "run"
    assert main(["--model", "detr3d", "--preset", "detr3d_tiny", "--out", str(out), "--threads", "1",
                 "--no-progress", "--device", "cpu"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1] and all(0 <= m["mAP"] <= 1 for m in metrics)
    assert {"loss_cls", "loss_bbox", "loss_cls_0"} <= set(metrics[0])
    command = json.loads((out / "commands.jsonl").read_text().splitlines()[-1])
    assert command["status"] == "finished" and command["preset"]["data"]["num_cams"] == 4
