"""The box detector (models.detection), the detection literature's metrics (AP30/AP50, FROC with
an IoU hit, area ratio), boxes that follow every augmentation, the fused and calibrated
P(fracture), and training precision (bf16 on CPUs that have it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fracray.imaging.preprocess import AugmentConfig, PreprocessConfig, augment_params, geometry, preprocess_base
from fracray.imaging.regions import (Finding, area_ratio, average_precision, finding_hits, froc, input_boxes,
                                     match_findings, rasterize_regions)
from fracray.metrics.fusion import fit_fusion, fracture_ece, fused_probability
from fracray.models.detection import (DENSE_CHANNELS, STRIDE, decode_dense, detection_loss, detection_targets,
                                      flip_dense_back)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- targets, flip, decode

def test_targets_give_every_box_a_cell_and_overlaps_the_smaller_box():
    boxes = torch.tensor([[10.0, 10.0, 13.0, 12.0],      # thinner than a cell: still gets its centre cell
                          [0.0, 0.0, 64.0, 64.0],        # large
                          [40.0, 40.0, 56.0, 56.0],      # inside the large one: its cells go to it
                          [0.0, 0.0, 0.0, 0.0]])         # padding
    assigned, positive = detection_targets(boxes, 8, 8)
    assert positive.shape == (64,) and assigned.shape == (64, 4)
    cell = (11 // STRIDE) * 8 + 11 // STRIDE
    assert positive[cell] and assigned[cell].tolist() == [10.0, 10.0, 13.0, 12.0]
    inner = (48 // STRIDE) * 8 + 48 // STRIDE
    assert positive[inner] and assigned[inner].tolist() == [40.0, 40.0, 56.0, 56.0]
    # Centre sampling: the large box's far corner is not a positive.
    assert not positive[0]
    empty_assigned, empty = detection_targets(torch.zeros(2, 4), 8, 8)
    assert not empty.any()


def _dense_for(boxes: list[list[float]], h: int = 8, w: int = 8) -> torch.Tensor:
    """A dense output that encodes ``boxes`` exactly at their centre cells."""
    dense = torch.full((DENSE_CHANNELS, h, w), -8.0)
    for (x0, y0, x1, y1), score in boxes:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        i, j = int(cy // STRIDE), int(cx // STRIDE)
        px, py = (j + 0.5) * STRIDE, (i + 0.5) * STRIDE
        dense[0, i, j] = score
        dense[5, i, j] = 8.0
        dense[1:5, i, j] = torch.log(torch.tensor([px - x0, py - y0, x1 - px, y1 - py]) / STRIDE)
    return dense


def test_decode_recovers_boxes_best_first_and_nms_drops_duplicates():
    dense = _dense_for([([4.0, 4.0, 28.0, 20.0], 3.0), ([36.0, 36.0, 60.0, 52.0], 1.0)])
    boxes, scores = decode_dense(dense)
    assert boxes.shape == (2, 4) and scores[0] > scores[1]
    assert boxes[0].tolist() == pytest.approx([4.0, 4.0, 28.0, 20.0], abs=1e-4)
    # A duplicate of the first box one cell over is suppressed by NMS.
    dense[0, 1, 2], dense[5, 1, 2] = 2.5, 8.0
    dense[1:5, 1, 2] = torch.log(torch.tensor([20.0 - 4, 12.0 - 4, 28 - 20.0, 20 - 12.0]) / STRIDE)
    boxes2, _ = decode_dense(dense)
    assert len(boxes2) == 2


def test_flip_back_mirrors_the_decoded_boxes():
    dense = _dense_for([([4.0, 8.0, 20.0, 30.0], 2.0)])
    mirrored = _dense_for([([64 - 20.0, 8.0, 64 - 4.0, 30.0], 2.0)])  # the answer for the mirror image
    boxes, _ = decode_dense(flip_dense_back(mirrored[None])[0])
    assert boxes[0].tolist() == pytest.approx([4.0, 8.0, 20.0, 30.0], abs=1e-4)
    assert torch.equal(flip_dense_back(flip_dense_back(dense[None])), dense[None])


def test_detector_learns_a_drawn_box(one_thread):
    """The whole model (EfficientNet-Lite0 + pyramid + FCOS head) with the product's loss puts a
    box on a drawn fracture-like line of a fixed image, and nothing much on a blank one."""
    from fracray.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained=True, localization=True, localization_head="detector")
    x = torch.zeros(2, 3, 128, 128)
    x[0, :, 60:64, 30:80] = 2.0          # the "fracture" of image 0
    truth = torch.tensor([[28.0, 56.0, 82.0, 68.0]])
    boxes = torch.zeros(2, 8, 4)
    boxes[0, :1] = truth
    known = torch.tensor([True, True])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    first = None
    for _ in range(40):
        _, dense = model(x, with_map=True)
        loss = detection_loss(dense, boxes, known)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first / 3
    model.eval()
    _, dense = model.infer(x, tta_flip=True)
    found, scores = decode_dense(dense[0])
    from torchvision.ops import box_iou

    assert len(found) and float(box_iou(found[:1], truth)[0, 0]) >= 0.5
    blank_boxes, blank_scores = decode_dense(dense[1])
    assert not len(blank_scores) or float(blank_scores.max()) < float(scores[0])


# ----------------------------------------------------------------------------- metrics

def test_iou_not_a_peak_decides_a_hit():
    truth = (10, 10, 20, 20)
    huge = Finding((0, 0, 40, 30), 0.9, (15, 15))                 # peak inside, box 12x the fracture
    assert not finding_hits(huge, truth)                           # IoU 100/1200: a miss
    assert finding_hits(Finding((11, 11, 21, 21), 0.9, (0, 0)), truth)     # IoU 81/119
    assert not finding_hits(Finding((15, 15, 25, 25), 0.9, (20, 20)), truth)  # IoU 25/175 < 0.3


def test_ap_and_froc_on_a_hand_made_case():
    t1, t2 = (0, 0, 10, 10), (50, 50, 60, 60)
    image_a = ([Finding((0, 0, 10, 10), 0.9, (5, 5)),        # t1 exactly
                Finding((25, 25, 35, 35), 0.6, (30, 30)),    # a false positive
                Finding((52, 52, 62, 62), 0.4, (57, 57)),    # t2 at IoU 64/136 = 0.47: a hit at 0.3, not 0.5
                Finding((1, 1, 10, 10), 0.3, (6, 6))],       # t1 again: one match per fracture, so a FP
               [t1, t2])
    image_b = ([Finding((0, 0, 9, 9), 0.7, (4, 4))], [])     # no fracture: a false positive
    assert [tp for _, tp in match_findings(image_a[0], image_a[1])] == [True, False, True, False]
    curve = froc([image_a, image_b])
    assert curve["lesions"] == 2 and curve["images"] == 2 and curve["min_iou"] == 0.3
    assert curve["sensitivity"] == [0.5, 0.5, 0.5, 1.0, 1.0]
    assert curve["fp_per_image"] == [0.0, 0.5, 1.0, 1.0, 1.5]
    # AP30: ranks 0.9 (TP), 0.7 (FP), 0.6 (FP), 0.4 (TP), 0.3 (FP): precision 1 to recall 0.5, then 0.5.
    assert average_precision([image_a, image_b], min_iou=0.3) == pytest.approx((51 * 1.0 + 50 * 0.5) / 101)
    # AP50: t2 is never found; recall stops at 0.5.
    assert average_precision([image_a, image_b], min_iou=0.5) == pytest.approx(51 / 101)
    assert average_precision([([], [])]) is None
    assert average_precision([([], [t1])]) == 0.0
    # The area ratio of each fractured image's top finding to its fracture.
    assert area_ratio([image_a]) == pytest.approx(1.0)
    assert area_ratio([([Finding((0, 0, 40, 30), 0.9, (15, 15))], [(10, 10, 20, 20)])]) == pytest.approx(12.0)


# ----------------------------------------------------------------------------- boxes follow the image

@pytest.mark.parametrize("params", [
    None,
    {"flip": True, "angle_deg": 0.0, "scale": 1.0, "translate_frac": (0.0, 0.0)},
    {"flip": False, "angle_deg": 0.0, "scale": 1.0, "translate_frac": (0.0, 0.0), "rot90": 1, "vflip": False},
    {"flip": True, "angle_deg": 12.0, "scale": 0.7, "translate_frac": (0.05, -0.03), "rot90": 3, "vflip": True},
])
def test_boxes_follow_letterbox_flips_turns_and_affine(params):
    config = PreprocessConfig(image_size=(96, 96))
    yolo = [{"x_center": 0.3, "y_center": 0.25, "width": 0.2, "height": 0.1}]
    shape = (150, 100)  # tall: letterboxed left and right
    boxes = input_boxes(yolo, shape, config, params)
    mask = geometry(rasterize_regions(shape, boxes=yolo), config, params) >= 0.5
    ys, xs = np.nonzero(mask)
    assert boxes.shape == (1, 4)
    assert boxes[0].tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=2.0)


def test_robust_augmentation_changes_what_archives_change_and_plain_draws_are_unchanged():
    plain = augment_params(np.random.default_rng(0), AugmentConfig())
    assert set(plain) == {"flip", "angle_deg", "scale", "translate_frac"}
    draws = [augment_params(np.random.default_rng(s), AugmentConfig.robust()) for s in range(200)]
    assert any(d["rot90"] for d in draws) and any(d["invert"] for d in draws) and any(d["canvas"] for d in draws)
    assert any(d["jpeg_quality"] for d in draws) and any(d["downscale"] for d in draws)
    from fracray.imaging.decode import decode_image
    import cv2

    image = np.zeros((64, 64), np.uint8)
    image[20:40, 10:50] = 200
    decoded = decode_image(cv2.imencode(".png", image)[1].tobytes())
    config = PreprocessConfig(image_size=(64, 64), normalization="none")
    base = preprocess_base(decoded, config)
    still = {"flip": False, "angle_deg": 0.0, "scale": 1.0, "translate_frac": (0.0, 0.0), "rot90": 0, "vflip": False,
             "canvas": False, "invert": True, "gamma": 1.0, "contrast": 1.0, "jpeg_quality": None, "downscale": None,
             "text_seed": 0}
    inverted = preprocess_base(decoded, config, still)
    assert np.allclose(inverted, 1.0 - base, atol=1e-6)
    turned = preprocess_base(decoded, config, still | {"invert": False, "rot90": 1})
    assert np.allclose(turned, np.rot90(base), atol=1e-6)
    texted = preprocess_base(decoded, config, still | {"invert": False, "canvas": True})
    assert (texted != base).any() and texted.min() >= 0.0 and texted.max() <= 1.0


# ----------------------------------------------------------------------------- P(fracture)

def test_fracture_ece_sees_what_the_top_label_figure_hides():
    """Images given 0.7 that are fractured a third of the time, and images given 0.3 that are
    fractured two-thirds of the time: P(fracture) is off by 0.37 everywhere, while the top-label
    view (confidence 0.7 in both bins, correct 1/3 and... ) is measured on the same images."""
    rng = np.random.default_rng(0)
    p = np.r_[np.full(300, 0.7), np.full(300, 0.3)]
    y = np.r_[rng.random(300) < 1 / 3, rng.random(300) < 2 / 3].astype(int)
    result = fracture_ece(y, p)
    assert result["ece"] == pytest.approx(0.37, abs=0.05) and result["n"] == 600
    assert sum(b["n"] for b in result["reliability"]) == 600
    calibrated = fracture_ece((rng.random(5000) < np.linspace(0, 1, 5000)).astype(int), np.linspace(0, 1, 5000))
    assert calibrated["ece"] < 0.03


def test_fusion_learns_from_both_signals_and_is_applied_the_same_way():
    rng = np.random.default_rng(1)
    y = rng.random(400) < 0.4
    cls = np.where(y, 0.8, -0.8) + rng.normal(0, 1.2, 400)           # a noisy classifier logit
    top = np.clip(np.where(y, 0.6, 0.2) + rng.normal(0, 0.15, 400), 0.001, 0.999)  # the detector's top score
    logits = np.stack([np.zeros(400), cls], axis=1)
    fusion = fit_fusion(logits, top, y.astype(int))
    assert fusion["features"] == ["classifier_logit", "top_box_logit"] and all(w > 0 for w in fusion["weights"])
    p = fused_probability(fusion, logits, top)
    from fracray.metrics.classification import binary_metrics

    assert binary_metrics(y, p, 0.5)["auroc"] > binary_metrics(y, 1 / (1 + np.exp(-cls)), 0.5)["auroc"]
    assert fit_fusion(logits[:5], top[:5], np.zeros(5)) is None      # one class: nothing to fit


# ----------------------------------------------------------------------------- training precision

def test_precision_is_decided_from_the_cpu_and_the_request(monkeypatch):
    from fracray.training import precision as P

    for flag, expected in (("1", "bf16"), ("0", "float32")):
        monkeypatch.setenv("FRACRAY_CPU_BF16", flag)
        P.cpu_has_native_bf16.cache_clear()
        assert P.resolve_training_precision("auto", "cpu") == expected
    P.cpu_has_native_bf16.cache_clear()
    assert P.resolve_training_precision("auto", "cuda") == "float16"
    assert P.resolve_training_precision("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="CUDA"):
        P.resolve_training_precision("float16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        P.resolve_training_precision("fp8", "cpu")


def test_bf16_training_tracks_float32(one_thread):
    """The same model, data and seed trained 12 steps at float32 and at bf16 autocast (channels_last):
    the loss curves stay within 0.1 of each other at every step, both fall, and the bf16 run's
    forward pass really ran in bf16. Tolerance stated: |loss_bf16 - loss_fp32| <= 0.1 per step,
    validation AUROC within 0.1."""
    from fracray.metrics.classification import binary_metrics
    from fracray.models.registry import create_model
    from fracray.training.step import TrainStep, place_model

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 8)
    x = torch.randn(16, 3, 64, 64, generator=g) * 0.5
    x[y == 1, :, 24:40, 24:40] += 1.5                                 # the positive class has a bright square
    curves, aurocs, dtypes = {}, {}, {}
    for precision in ("float32", "bf16"):
        torch.manual_seed(0)
        model = place_model(create_model("efficientnet_lite0", pretrained=True), torch.device("cpu"))
        step = TrainStep(model.train(), torch.optim.Adam(model.parameters(), lr=3e-4), device=torch.device("cpu"),
                         precision=precision)
        seen = []
        handle = model.head.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].dtype))
        xl = x.contiguous(memory_format=torch.channels_last)
        curves[precision] = [float(step(xl, y)) for _ in range(12)]
        handle.remove()
        dtypes[precision] = seen[0]
        model.eval()
        with torch.no_grad():
            aurocs[precision] = binary_metrics(y.numpy(), model(x).softmax(-1)[:, 1].numpy(), 0.5)["auroc"]
        assert all(p.dtype == torch.float32 for p in model.parameters())    # master weights stay float32
    assert dtypes == {"float32": torch.float32, "bf16": torch.bfloat16}
    assert max(abs(a - b) for a, b in zip(curves["float32"], curves["bf16"])) <= 0.1
    assert curves["bf16"][-1] < curves["bf16"][0] and curves["float32"][-1] < curves["float32"][0]
    assert abs(aurocs["float32"] - aurocs["bf16"]) <= 0.1
