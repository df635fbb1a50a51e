"""PostProcess (DETR, softmax) and PostProcessTopK (Deformable DETR, sigmoid top-k)."""
import pytest
import torch

from detr_tutorial.postprocess import PostProcess, PostProcessTopK, scale_boxes


def _outputs(b=2, q=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(b, q, c, generator=g), "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.5 + 0.1}


def test_scale_boxes_by_hand():
    boxes = torch.tensor([[[0.5, 0.25, 0.2, 0.1]]])  # cx, cy, w, h
    sizes = torch.tensor([[100, 200]])  # H, W
    expected = torch.tensor([[[80.0, 20.0, 120.0, 30.0]]])  # x in units of W=200, y of H=100
    torch.testing.assert_close(scale_boxes(boxes, sizes), expected)


def test_postprocess_matches_hand_computation():
    out = _outputs()
    sizes = torch.tensor([[48, 64], [32, 80]])
    results = PostProcess(num_classes=3)(out, sizes)
    assert len(results) == 2
    for i, res in enumerate(results):
        for q in range(5):
            prob = torch.exp(out["pred_logits"][i, q]) / torch.exp(out["pred_logits"][i, q]).sum()
            assert res["labels"][q].item() == int(prob[:-1].argmax())
            torch.testing.assert_close(res["scores"][q], prob[:-1].max())
            cx, cy, w, h = out["pred_boxes"][i, q].tolist()
            H, W = sizes[i].tolist()
            expected = torch.tensor([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H])
            torch.testing.assert_close(res["boxes"][q], expected)


def test_postprocess_never_returns_no_object_label():
    out = _outputs(c=3)
    out["pred_logits"][..., -1] = 50.0  # "no object" dominates
    res = PostProcess(num_classes=2)(out, torch.tensor([[10, 10], [10, 10]]))
    assert all(int(r["labels"].max()) < 2 for r in res)
    assert all(float(r["scores"].max()) < 1e-6 for r in res)


def test_topk_matches_hand_computation():
    out = _outputs(b=2, q=6, c=3)
    sizes = torch.tensor([[40, 60], [50, 50]])
    results = PostProcessTopK(num_classes=3, k=5)(out, sizes)
    for i, res in enumerate(results):
        pairs = sorted(((torch.sigmoid(out["pred_logits"][i, q, c]).item(), q, c)
                        for q in range(6) for c in range(3)), reverse=True)[:5]
        assert res["labels"].tolist() == [c for _, _, c in pairs]
        torch.testing.assert_close(res["scores"], torch.tensor([s for s, _, _ in pairs]))
        full = scale_boxes(out["pred_boxes"][i:i + 1], sizes[i:i + 1])[0]
        torch.testing.assert_close(res["boxes"], full[[q for _, q, _ in pairs]])


def test_topk_keeps_all_pairs_when_fewer_than_k():
    res = PostProcessTopK(num_classes=3)(_outputs(b=1, q=4, c=3), torch.tensor([[8, 8]]))
    assert res[0]["scores"].shape == (12,) and res[0]["boxes"].shape == (12, 4)
    assert torch.all(res[0]["scores"][:-1] >= res[0]["scores"][1:])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess(num_classes=3)(_outputs(b=2), torch.tensor([[8, 8]]))
    with pytest.raises(TypeError, match="pred_logits"):
        PostProcess(num_classes=2)({"pred_boxes": torch.rand(1, 2, 4)}, torch.tensor([[8, 8]]))
    with pytest.raises(ValueError, match="pred_boxes"):
        PostProcess(num_classes=2)({"pred_logits": torch.rand(1, 2, 3), "pred_boxes": torch.rand(1, 2, 5)},
                                   torch.tensor([[8, 8]]))
    with pytest.raises(ValueError, match="k must"):
        PostProcessTopK(num_classes=3, k=0)


def test_each_post_processor_rejects_the_other_convention():
    sizes = torch.tensor([[8, 8], [8, 8]])
    # Focal logits (K = 3 columns) read by PostProcess would lose class 2 as "no object".
    with pytest.raises(ValueError, match="expects 4 for num_classes=3.*sigmoid/focal convention"):
        PostProcess(num_classes=3)(_outputs(c=3), sizes)
    # Softmax logits (K + 1 = 4 columns) read by PostProcessTopK would report "no object" as a class.
    with pytest.raises(ValueError, match="expects 3 for num_classes=3.*softmax convention"):
        PostProcessTopK(num_classes=3)(_outputs(c=4), sizes)
    with pytest.raises(ValueError, match="num_classes"):
        PostProcess(num_classes=0)
    with pytest.raises(TypeError):
        PostProcessTopK(k=10)


@pytest.mark.parametrize("key, value", [("pred_logits", float("nan")), ("pred_logits", float("inf")),
                                        ("pred_boxes", float("nan"))])
def test_non_finite_outputs_are_rejected(key, value):
    sizes = torch.tensor([[8, 8], [8, 8]])
    for post, c in ((PostProcess(num_classes=3), 4), (PostProcessTopK(num_classes=3), 3)):
        out = _outputs(c=c)
        out[key][1, 2, 0] = value
        with pytest.raises(ValueError, match=rf"outputs\['{key}'\] has NaN or inf entries \(first at index \(1, 2, 0"):
            post(out, sizes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs_give_float32_detections(dtype):
    sizes = torch.tensor([[1000, 1333], [800, 1066]])  # float16 spacing at 1333 px is 1 px; bfloat16's is 8
    for post, c in ((PostProcess(num_classes=3), 4), (PostProcessTopK(num_classes=3, k=5), 3)):
        half = {k: v.to(dtype) for k, v in _outputs(c=c).items()}
        expected = post({k: v.float() for k, v in half.items()}, sizes)
        for res, ref in zip(post(half, sizes), expected):
            assert res["scores"].dtype == res["boxes"].dtype == torch.float32
            for key in ("scores", "labels", "boxes"):
                torch.testing.assert_close(res[key], ref[key], rtol=0, atol=0)
