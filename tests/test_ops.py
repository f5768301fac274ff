"""Preprocessing operations checked against results computed by hand."""

import math

import numpy as np
import pytest

from fracray.imaging import ops
from fracray.imaging.preprocess import AugmentConfig, PreprocessConfig, augment_params, finalize

# A vertical step: columns 0-1 are 0, columns 2-4 are 1.
STEP = np.array([[0, 0, 1, 1, 1]] * 5, np.float32)


def test_sobel_on_a_vertical_step_matches_hand_computation():
    # At (2, 1): Gx = (-1*0 + 1*1) + 2*(-1*0 + 1*1) + (-1*0 + 1*1) = 4; Gy = 0 -> |G| = 4.
    # At (2, 2): Gx = (-1*0 + 1*1) * (1 + 2 + 1) = 4. Away from the step (col 0 with replicated border, col 4) 0.
    out = ops.sobel(STEP)
    np.testing.assert_allclose(out[2], [0, 4, 4, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out, np.tile([0, 4, 4, 0, 0], (5, 1)), atol=1e-6)


def test_prewitt_on_a_vertical_step_matches_hand_computation():
    # Prewitt weights the three rows equally: Gx = 3 at both columns beside the step.
    np.testing.assert_allclose(ops.prewitt(STEP), np.tile([0, 3, 3, 0, 0], (5, 1)), atol=1e-6)


def test_roberts_cross_matches_hand_computation():
    img = np.array([[1, 2], [3, 5]], np.float32)
    # d1 = I(0,0) - I(1,1) = 1 - 5 = -4; d2 = I(0,1) - I(1,0) = 2 - 3 = -1 -> sqrt(17).
    out = ops.roberts(img)
    assert out[0, 0] == pytest.approx(math.sqrt(17))
    # Bottom-right pixel replicates its border: all four samples equal -> 0.
    assert out[1, 1] == pytest.approx(0.0)
    # (0, 1): d1 = I(0,1) - I(1,2->1) = 2 - 5 = -3; d2 = I(0,2->1) - I(1,1) = 2 - 5 = -3 -> sqrt(18).
    assert out[0, 1] == pytest.approx(math.sqrt(18))


def test_sobel_on_diagonal_gradient():
    # I(y, x) = x + 2y: Gx = 8 * 1, Gy = 8 * 2 in the interior -> sqrt(64 + 256).
    y, x = np.mgrid[0:6, 0:6].astype(np.float32)
    out = ops.sobel(x + 2 * y)
    assert out[2, 2] == pytest.approx(math.sqrt(8 ** 2 + 16 ** 2))


def test_laplacian_of_a_single_bright_pixel():
    img = np.zeros((5, 5), np.float32)
    img[2, 2] = 1.0
    lap = ops.laplacian(img)
    assert lap[2, 2] == pytest.approx(-4.0)
    for y, x in ((1, 2), (3, 2), (2, 1), (2, 3)):
        assert lap[y, x] == pytest.approx(1.0)
    assert lap[0, 0] == pytest.approx(0.0)


@pytest.mark.parametrize("factor", [1.5, 3.0])
def test_laplacian_sharpening_with_the_papers_factors(factor):
    img = np.full((5, 5), 0.5, np.float32)
    img[2, 2] = 0.6
    out = ops.laplacian_sharpen(img, factor)
    # Centre: 0.6 - factor * (4*0.5 - 4*0.6) = 0.6 + 0.4 * factor; neighbours: 0.5 - factor * 0.1.
    assert out[2, 2] == pytest.approx(min(1.0, 0.6 + 0.4 * factor), abs=1e-6)
    assert out[1, 2] == pytest.approx(0.5 - 0.1 * factor, abs=1e-6)
    assert out[0, 0] == pytest.approx(0.5)
    assert out.min() >= 0 and out.max() <= 1


def test_canny_finds_the_edge_of_a_square_and_nothing_on_flat_areas():
    img = np.zeros((40, 40), np.float32)
    img[10:30, 10:30] = 1.0
    edges = ops.canny(img, 0.1, 0.3)
    assert set(np.unique(edges)) <= {0.0, 1.0}
    assert edges[20, 9:12].any() and edges[20, 28:31].any()
    assert edges[20, 15:25].sum() == 0 and edges[0:5, 0:5].sum() == 0
    with pytest.raises(ValueError, match="low <= high"):
        ops.canny(img, 0.5, 0.1)


@pytest.mark.parametrize("kind,maximum", [("sobel", 4 * math.sqrt(2)), ("prewitt", 3 * math.sqrt(2)),
                                          ("roberts", math.sqrt(2))])
def test_edge_maps_are_scaled_by_the_operators_maximum(kind, maximum):
    raw = getattr(ops, kind)(STEP)
    np.testing.assert_allclose(ops.edge_map(STEP, kind), raw / maximum, rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown edge filter"):
        ops.edge_map(STEP, "kirsch")


def test_per_image_standardisation():
    img = np.array([[0, 1], [2, 3]], np.float32)
    out = ops.per_image_standardize(img)
    np.testing.assert_allclose(out, (img - 1.5) / np.std(img), rtol=1e-6)
    flat = ops.per_image_standardize(np.full((4, 4), 7.0, np.float32))
    assert np.all(flat == 0)  # std floor 1/sqrt(N) avoids division by zero


def test_imagenet_normalisation_per_channel():
    config = PreprocessConfig(image_size=(2, 2))
    base = np.full((2, 2), 0.5, np.float32)
    out = finalize(base, config)
    assert out.shape == (3, 2, 2)
    for c in range(3):
        assert out[c, 0, 0] == pytest.approx((0.5 - config.mean[c]) / config.std[c], rel=1e-6)


def test_resize_keeps_aspect_and_pads_centrally():
    img = np.ones((100, 50), np.float32)
    out = ops.resize(img, (64, 64))
    assert out.shape == (64, 64)
    # 100x50 -> 64x32, padded 16 px each side.
    assert np.all(out[:, 16:48] == 1.0) and np.all(out[:, :16] == 0) and np.all(out[:, 48:] == 0)
    stretched = ops.resize(img, (64, 64), keep_aspect=False)
    assert np.all(stretched == 1.0)


def test_resize_is_area_averaging_when_shrinking():
    checker = np.indices((64, 64)).sum(0) % 2  # 1-px checkerboard: aliasing would show it
    out = ops.resize(checker.astype(np.float32), (16, 16), keep_aspect=False)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_hflip_and_affine():
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(ops.hflip(img), img[:, ::-1])
    np.testing.assert_allclose(ops.affine(img, angle_deg=0, scale=1), img)
    # 180 degrees about the centre equals flipping both axes.
    np.testing.assert_allclose(ops.affine(img, angle_deg=180), img[::-1, ::-1], atol=1e-4)
    # Scale 0.5 about the centre leaves the centre pixel of an odd image where it was.
    odd = np.zeros((5, 5), np.float32)
    odd[2, 2] = 1
    assert ops.affine(odd, scale=0.5)[2, 2] > 0
    with pytest.raises(ValueError, match="scale must be > 0"):
        ops.affine(img, scale=0)


def test_augment_params_are_reproducible_and_bounded():
    config = AugmentConfig(hflip_prob=0.5, max_rotation_deg=10, scale_range=(0.9, 1.1))
    a = [augment_params(np.random.default_rng(5), config) for _ in range(2)]
    assert a[0] == a[1]
    draws = [augment_params(np.random.default_rng(i), config) for i in range(200)]
    assert all(-10 <= d["angle_deg"] <= 10 and 0.9 <= d["scale"] <= 1.1 for d in draws)
    assert 60 < sum(d["flip"] for d in draws) < 140
    with pytest.raises(ValueError):
        AugmentConfig(hflip_prob=2)


def test_preprocess_config_round_trips_and_rejects_bad_values():
    config = PreprocessConfig(image_size=(299, 299), normalization="per_image", enhancement="laplacian_sharpen",
                              sharpen_factor=3.0)
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown preprocessing keys"):
        PreprocessConfig.from_dict({"image_size": (224, 224), "colour": True})
    with pytest.raises(ValueError, match="normalization"):
        PreprocessConfig(normalization="zscore")
    with pytest.raises(ValueError, match="Unknown enhancement"):
        PreprocessConfig(enhancement="unsharp")
