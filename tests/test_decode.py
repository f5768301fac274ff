"""Decoding every supported input, and a clear reject for every bad one."""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import dicom_bytes
from fracray.imaging.decode import ImageRejected, RejectReason, decode_image
from fracray.imaging.preprocess import PreprocessConfig, preprocess_bytes


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(h=64, w=48) -> np.ndarray:
    return (np.linspace(0, 255, w, dtype=np.float32)[None].repeat(h, 0)).astype(np.uint8)


@pytest.mark.parametrize("mode,fmt", [
    ("L", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG"),
    ("L", "JPEG"), ("RGB", "JPEG"), ("CMYK", "JPEG"), ("CMYK", "TIFF"),
])
def test_modes_decode_to_one_luminance_channel(mode, fmt):
    img = Image.fromarray(_gradient()).convert(mode)
    decoded = decode_image(_encode(img, fmt))
    assert decoded.pixels.ndim == 2 and decoded.pixels.shape == (64, 48)
    assert (decoded.width, decoded.height) == (48, 64)
    assert decoded.source_format == fmt
    assert decoded.pixels.dtype == np.uint8
    if mode not in ("1", "P"):  # 1-bit and palette quantise the ramp
        ref = np.asarray(img.convert("L"), np.float32)
        assert np.abs(decoded.pixels.astype(np.float32) - ref).mean() < 6


def test_16_bit_png_is_rescaled_not_clipped():
    ramp = np.linspace(0, 65535, 256, dtype=np.float64).round().astype(np.uint16)[None].repeat(8, 0)
    data = _encode(Image.fromarray(ramp), "PNG")
    decoded = decode_image(data)
    assert decoded.bit_depth == 16 and decoded.pixels.dtype == np.float32
    assert decoded.pixels.min() == 0.0 and decoded.pixels.max() == pytest.approx(1.0)
    # Linear and strictly increasing: no values were clipped together.
    assert np.all(np.diff(decoded.pixels[0]) > 0)
    np.testing.assert_allclose(decoded.pixels[0], ramp[0] / 65535.0, atol=1e-6)


def test_12_bit_values_in_16_bit_png_keep_their_resolution():
    values = np.arange(0, 4096, 16, dtype=np.uint16)[None].repeat(8, 0)
    decoded = decode_image(_encode(Image.fromarray(values), "PNG"))
    assert len(np.unique(decoded.pixels)) == values.shape[1]


def test_jpeg_draft_decodes_large_images_smaller_but_reports_their_true_size():
    big = Image.fromarray(np.tile(_gradient(64, 64), (32, 24)))  # 2048 x 1536
    data = _encode(big, "JPEG", quality=90)
    decoded = decode_image(data, draft_size=(200, 200))
    assert (decoded.width, decoded.height) == (1536, 2048)
    assert max(decoded.pixels.shape) < 2048 and min(decoded.pixels.shape) >= 200


def test_dicom_monochrome2_full_range_and_body_part():
    pixels = np.linspace(100, 4000, 64, dtype=np.float64).round().astype(np.uint16).reshape(8, 8)
    decoded = decode_image(dicom_bytes(pixels, body_part="WRIST"))
    assert decoded.source_format == "DICOM" and decoded.body_part == "wrist"
    assert decoded.pixels.min() == 0.0 and decoded.pixels.max() == pytest.approx(1.0)
    np.testing.assert_allclose(decoded.pixels, (pixels - 100.0) / 3900.0, atol=1e-6)


def test_dicom_monochrome1_is_inverted():
    pixels = np.linspace(0, 4095, 64).round().astype(np.uint16).reshape(8, 8)
    mono2 = decode_image(dicom_bytes(pixels)).pixels
    mono1 = decode_image(dicom_bytes(pixels, photometric="MONOCHROME1")).pixels
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_window_and_modality_lut():
    pixels = np.array([[0, 1000, 2000, 3000]], np.uint16).repeat(8, 0)
    pixels = np.pad(pixels, ((0, 0), (0, 4)), mode="edge")
    # Modality LUT: value = 2 * stored - 1000 -> [-1000, 1000, 3000, 5000]; window 1000 +/- 1000.
    decoded = decode_image(dicom_bytes(pixels, rescale=(2, -1000), window=(1000, 2000)))
    row = decoded.pixels[0]
    assert row[0] == 0.0 and row[2] == 1.0 and row[3] == 1.0  # outside the window: clipped, as the standard says
    assert row[1] == pytest.approx(((1000 - 999.5) / 1999 + 0.5), abs=1e-6)


def test_dicom_voi_lut_sequence():
    pixels = np.array([[0, 1, 2, 3] * 2] * 8, np.uint16)
    decoded = decode_image(dicom_bytes(pixels, voi_lut=[0, 51, 102, 255]))
    np.testing.assert_allclose(decoded.pixels[0, :4], np.array([0, 51, 102, 255]) / 255.0, atol=1e-6)


def test_dicom_without_pixels_is_rejected_as_unsupported():
    with pytest.raises(ImageRejected) as exc:
        decode_image(dicom_bytes(np.zeros((8, 8), np.uint16), with_pixels=False))
    assert exc.value.reason is RejectReason.UNSUPPORTED_DICOM and "no pixel data" in exc.value.detail


def test_dicom_with_a_transfer_syntax_we_cannot_decode_is_rejected_with_advice():
    from pydicom.uid import JPEG2000Lossless
    data = dicom_bytes(np.zeros((8, 8), np.uint16), transfer_syntax=JPEG2000Lossless)
    with pytest.raises(ImageRejected) as exc:
        decode_image(data)
    assert exc.value.reason is RejectReason.UNSUPPORTED_DICOM
    assert "JPEG 2000" in exc.value.detail or "pixel handler" in exc.value.detail


@pytest.mark.parametrize("data,reason", [
    (b"", RejectReason.EMPTY_FILE),
    (b"this is a radiology report, not an image\n" * 10, RejectReason.NOT_AN_IMAGE),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, RejectReason.CORRUPT),
])
def test_bad_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as exc:
        decode_image(data)
    assert exc.value.reason is reason
    assert exc.value.detail


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected_not_half_decoded(fmt):
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)), fmt)
    with pytest.raises(ImageRejected) as exc:
        decode_image(data[: len(data) * 2 // 3])
    assert exc.value.reason in (RejectReason.TRUNCATED, RejectReason.CORRUPT)
    if fmt == "JPEG":
        assert exc.value.reason is RejectReason.TRUNCATED


def test_decompression_bomb_is_refused_before_decoding():
    # A 20000 x 20000 PNG of zeros is ~400 MP of pixels in a few hundred KB.
    big = Image.new("L", (20000, 20000))
    data = _encode(big, "PNG", compress_level=9)
    assert len(data) < 2_000_000
    with pytest.raises(ImageRejected) as exc:
        decode_image(data, max_pixels=100_000_000)
    assert exc.value.reason is RejectReason.DECOMPRESSION_BOMB
    assert "max_pixels" in exc.value.detail


def test_preprocess_bytes_gives_model_input_of_the_configured_shape():
    data = _encode(Image.fromarray(_gradient(300, 200)).convert("RGB"), "JPEG")
    for size, channels in (((224, 224), 3), ((299, 299), 3), ((128, 96), 1)):
        x, decoded = preprocess_bytes(data, PreprocessConfig(image_size=size, channels=channels))
        assert x.shape == (channels, *size) and x.dtype == np.float32
        assert np.isfinite(x).all()
