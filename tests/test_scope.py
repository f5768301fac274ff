"""Out-of-scope inputs (imaging.scope): photos, CT/MR/US, chest films, blank images, noise and
graphics are refused with a reason; real and synthetic limb radiographs are not. Real files:
scikit-image's sample photos, pydicom's test corpus, FracAtlas (when present)."""

from __future__ import annotations

import io
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fracray.evaluation.scope_check import _dicom
from fracray.data.synthetic import render_radiograph
from fracray.imaging.decode import decode_image
from fracray.imaging.scope import ScopeConfig, ScopeVerdict, assess_scope, scope_features


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _skimage(name: str) -> bytes:
    import skimage.data

    return (Path(skimage.data.__file__).parent / name).read_bytes()


def _pydicom(name: str) -> bytes:
    import pydicom

    return (Path(pydicom.__file__).parent / "data" / "test_files" / name).read_bytes()


@pytest.fixture(scope="module")
def radiograph() -> np.ndarray:
    return render_radiograph(np.random.default_rng(11), "wrist", 454, 373, fracture=True).pixels


def _verdict(data: bytes, config: ScopeConfig = ScopeConfig()) -> ScopeVerdict:
    return assess_scope(decode_image(data), config)


# ----------------------------------------------------------------------------- every reason, on a real input

def test_colour_photo_from_scikit_image():
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"):
        decoded = decode_image(_skimage(name))
        assert decoded.colourfulness > 30, name
        v = assess_scope(decoded)
        assert (v.in_scope, v.reason) == (False, "colour_photo"), name
        assert "colour" in v.detail


def test_dicom_modalities_from_pydicom_corpus():
    for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MR"), ("examples_rgb_color.dcm", "US")):
        decoded = decode_image(_pydicom(name))
        assert decoded.modality == modality
        v = assess_scope(decoded)
        assert (v.in_scope, v.reason) == (False, f"dicom_modality:{modality}"), name
        assert modality in v.detail


def test_dicom_body_part_chest(radiograph):
    v = _verdict(_dicom(radiograph.astype(np.uint16) * 16, body_part="CHEST"))
    assert (v.in_scope, v.reason) == (False, "dicom_body_part:chest")
    # A limb, an unknown part and no body part at all are in scope; so are CR and DX.
    for part in ("WRIST", "HAND", "KNEE", "SOMETHING ODD", None):
        assert _verdict(_dicom(radiograph.astype(np.uint16) * 16, body_part=part)).in_scope, part
    assert _verdict(_dicom(radiograph.astype(np.uint16) * 16, modality="CR")).in_scope
    # pydicom's CR files are of the cervical spine.
    v = _verdict(_pydicom("dicomdirtests/77654033/CR1/6154"))
    assert v.reason == "dicom_body_part:cspine"


def test_blank_images():
    for value in (0, 128, 255):
        for data in (_png(np.full((300, 240), value, np.uint8)), _jpeg(np.full((300, 240), value, np.uint8))):
            v = _verdict(data)
            assert (v.in_scope, v.reason) == (False, "blank"), value
    # A grey image with a couple of levels of noise is still blank.
    noisy = np.clip(128 + np.random.default_rng(0).normal(0, 2, (300, 300)), 0, 255).astype(np.uint8)
    assert _verdict(_png(noisy)).reason == "blank"


def test_low_dynamic_range(radiograph):
    # A radiograph squeezed into 8% of the range (a near-uniform capture).
    squeezed = (100 + radiograph.astype(np.float32) * 0.08).astype(np.uint8)
    v = _verdict(_png(squeezed))
    assert (v.in_scope, v.reason) == (False, "low_dynamic_range")
    # pydicom's secondary capture of a near-uniform frame.
    assert _verdict(_pydicom("SC_jpeg_no_color_transform_2.dcm")).reason == "low_dynamic_range"


def test_few_grey_levels_graphics_and_masks():
    for data in (_skimage("phantom.png"), _skimage("horse.png"), _skimage("chessboard_GRAY.png")):
        assert _verdict(data).reason == "few_grey_levels"
    # pydicom's 512 x 512 OT capture of a drawing.
    assert _verdict(_pydicom("image_dfl.dcm")).reason == "few_grey_levels"


def test_random_noise():
    rng = np.random.default_rng(1)
    for pixels in (rng.integers(0, 256, (384, 320), dtype=np.uint8),
                   np.clip(128 + rng.normal(0, 40, (400, 300)), 0, 255).astype(np.uint8)):
        for data in (_png(pixels), _jpeg(pixels)):
            assert _verdict(data).reason == "noise"


# ----------------------------------------------------------------------------- radiographs stay in scope

def test_synthetic_radiographs_stay_in_scope():
    from fracray.data.synthetic import BODY_PART_BONES

    rng = np.random.default_rng(5)
    for i, part in enumerate(sorted(BODY_PART_BONES)):
        pixels = render_radiograph(rng, part, 512 if i % 2 else 300, 400, fracture=bool(i % 2),
                                   hardware=i % 3 == 0).pixels
        rgb = np.repeat(pixels[..., None], 3, -1)
        for data in (_jpeg(pixels), _jpeg(rgb), _png(rgb),
                     _dicom(pixels.astype(np.uint16) * 16, body_part=part.upper())):
            v = _verdict(data)
            assert v == ScopeVerdict(True), (part, v)


def test_large_synthetic_radiograph_stays_in_scope():
    pixels = render_radiograph(np.random.default_rng(2), "hip", 2880, 2304, fracture=False).pixels
    assert _verdict(_jpeg(pixels)).in_scope
    assert _verdict(_dicom(4095 - pixels.astype(np.uint16) * 16, modality="CR", photometric="MONOCHROME1")).in_scope


def test_real_fracatlas_images_stay_in_scope(shared_fracatlas):
    images = sorted((shared_fracatlas / "FracAtlas" / "images").glob("*/*.jpg"))
    assert images, f"no FracAtlas images under {shared_fracatlas}"
    sample = images[:: max(1, len(images) // 40)]
    from fracray.imaging.decode import ImageRejected

    checked = 0
    for path in sample:
        try:
            decoded = decode_image(path.read_bytes())
        except ImageRejected:  # the truncated files of the release: a decoder reject, not a scope question
            continue
        assert decoded.colourfulness == 0.0, path.name  # RGB files, grey content
        v = assess_scope(decoded)
        assert v.in_scope, (path.name, v)
        checked += 1
    assert checked >= 30


# ----------------------------------------------------------------------------- each setting moves the verdict

def test_max_colourfulness_threshold(radiograph):
    photo = decode_image(_skimage("astronaut.png"))
    assert assess_scope(photo).reason == "colour_photo"
    assert assess_scope(photo, ScopeConfig(max_colourfulness=photo.colourfulness + 1)).reason != "colour_photo"
    grey_rgb = decode_image(_jpeg(np.repeat(radiograph[..., None], 3, -1)))
    assert grey_rgb.colourfulness == pytest.approx(0.0, abs=0.5)
    assert assess_scope(grey_rgb).in_scope
    assert assess_scope(grey_rgb, ScopeConfig(max_colourfulness=-1.0)).reason == "colour_photo"


def test_blank_max_std_threshold(radiograph):
    decoded = decode_image(_png(radiograph))
    std = scope_features(decoded)["std"]
    assert assess_scope(decoded, ScopeConfig(blank_max_std=std * 0.9)).in_scope
    assert assess_scope(decoded, ScopeConfig(blank_max_std=std * 1.1)).reason == "blank"
    flat = decode_image(_png(np.full((100, 100), 90, np.uint8)))
    assert assess_scope(flat, ScopeConfig(blank_max_std=-1.0)).reason != "blank"


def test_min_dynamic_range_threshold(radiograph):
    decoded = decode_image(_png(radiograph))
    spread = scope_features(decoded)["dynamic_range"]
    assert assess_scope(decoded, ScopeConfig(min_dynamic_range=spread - 0.01)).in_scope
    assert assess_scope(decoded, ScopeConfig(min_dynamic_range=spread + 0.01)).reason == "low_dynamic_range"
    squeezed = decode_image(_png((100 + radiograph.astype(np.float32) * 0.08).astype(np.uint8)))
    assert assess_scope(squeezed, ScopeConfig(min_dynamic_range=0.0)).reason != "low_dynamic_range"


def test_min_grey_levels_threshold(radiograph):
    decoded = decode_image(_png(radiograph))
    levels = scope_features(decoded)["grey_levels"]
    assert assess_scope(decoded, ScopeConfig(min_grey_levels=levels)).in_scope
    assert assess_scope(decoded, ScopeConfig(min_grey_levels=levels + 1)).reason == "few_grey_levels"
    chess = decode_image(_skimage("chessboard_GRAY.png"))  # 8 levels, 1.63 bits
    assert assess_scope(chess).reason == "few_grey_levels"
    assert assess_scope(chess, ScopeConfig(min_grey_levels=8)).reason != "few_grey_levels"


def test_min_entropy_bits_threshold(radiograph):
    decoded = decode_image(_png(radiograph))
    bits = scope_features(decoded)["entropy_bits"]
    assert assess_scope(decoded, ScopeConfig(min_entropy_bits=bits - 0.05)).in_scope
    assert assess_scope(decoded, ScopeConfig(min_entropy_bits=bits + 0.05)).reason == "few_grey_levels"
    horse = decode_image(_skimage("horse.png"))  # 128 levels (anti-aliased edges) but 1.15 bits
    assert scope_features(horse)["grey_levels"] >= 32
    assert assess_scope(horse, ScopeConfig(min_entropy_bits=1.0)).reason != "few_grey_levels"


def test_min_neighbour_correlation_threshold(radiograph):
    decoded = decode_image(_png(radiograph))
    corr = scope_features(decoded)["neighbour_correlation"]
    assert corr > 0.9
    assert assess_scope(decoded, ScopeConfig(min_neighbour_correlation=corr - 0.01)).in_scope
    assert assess_scope(decoded, ScopeConfig(min_neighbour_correlation=corr + 0.01)).reason == "noise"
    noise = decode_image(_png(np.random.default_rng(3).integers(0, 256, (300, 300), dtype=np.uint8)))
    assert assess_scope(noise, ScopeConfig(min_neighbour_correlation=-1.0)).in_scope


def test_modality_and_body_part_settings(radiograph):
    ct = decode_image(_pydicom("CT_small.dcm"))
    assert assess_scope(ct, ScopeConfig(accepted_modalities=frozenset({"DX", "CT"}))).in_scope
    assert assess_scope(ct, ScopeConfig(undecided_modalities=frozenset({"ct"}))).in_scope  # case-insensitive
    dx = decode_image(_dicom(radiograph.astype(np.uint16) * 16, body_part="WRIST"))
    assert assess_scope(dx, ScopeConfig(accepted_modalities=frozenset({"CR"}))).reason == "dicom_modality:DX"
    assert assess_scope(dx, ScopeConfig(excluded_body_parts=frozenset({"WRIST"}))).reason == "dicom_body_part:wrist"
    chest = decode_image(_dicom(radiograph.astype(np.uint16) * 16, body_part="CHEST"))
    assert assess_scope(chest, ScopeConfig(excluded_body_parts=frozenset())).in_scope
    spaced = decode_image(_dicom(radiograph.astype(np.uint16) * 16, body_part="WHOLE BODY"))
    assert assess_scope(spaced).reason == "dicom_body_part:whole_body"


def test_config_round_trip_and_validation():
    config = ScopeConfig(max_colourfulness=20.0, accepted_modalities=frozenset({"cr", "dx"}))
    assert config.accepted_modalities == frozenset({"CR", "DX"})
    assert ScopeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown scope settings"):
        ScopeConfig.from_dict({"max_colorfulness": 3})
    with pytest.raises(ValueError, match="analysis_side"):
        ScopeConfig(analysis_side=4)


def test_colourfulness_is_measured_before_the_luma_conversion():
    photo = _skimage("coffee.png")
    rgb = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))
    for data in (photo, _jpeg(rgb)):  # PNG (Pillow path) and JPEG (decoded straight to luma, 1/8 colour pass)
        decoded = decode_image(data)
        assert decoded.pixels.ndim == 2 and decoded.colourfulness > 30
    assert decode_image(_jpeg(rgb), draft_size=(64, 64)).colourfulness > 30
    assert decode_image(_pydicom("examples_rgb_color.dcm")).colourfulness > 30  # DICOM RGB


# ----------------------------------------------------------------------------- wired into the predictor and the service

@pytest.fixture(scope="module")
def predictor(untrained_index):
    from fracray.inference.predictor import FracturePredictor

    return FracturePredictor(untrained_index, device="cpu")


def test_predictor_refuses_a_photo_and_scores_the_radiograph(predictor, radiograph):
    payloads = [_skimage("astronaut.png"), _jpeg(radiograph), _pydicom("CT_small.dcm"), b""]
    assert predictor.check_scope is True  # the default
    results = predictor.predict_bytes(payloads)
    assert [r["status"] for r in results] == ["out_of_scope", "ok", "out_of_scope", "empty_file"]
    assert results[0]["error"].startswith("colour_photo: ") and "fracture_probability" not in results[0]
    assert results[2]["error"].startswith("dicom_modality:CT: ") and "fracture_probability" not in results[2]
    assert 0.0 <= results[1]["fracture_probability"] <= 1.0
    # The switch (FracturePredictor(..., check_scope=False)): with the check off the photo is scored.
    predictor.check_scope = False
    try:
        assert predictor.predict_bytes(payloads[:1])[0]["status"] == "ok"
    finally:
        predictor.check_scope = True


def test_predictor_check_scope_keyword(untrained_index):
    import inspect

    from fracray.inference.predictor import FracturePredictor

    assert inspect.signature(FracturePredictor).parameters["check_scope"].default is True


def test_ray_data_rows_carry_out_of_scope_as_a_reject(predictor, radiograph, tmp_path):
    """The batch path (score_archive, evaluate): one row per input, out_of_scope as its status."""
    import pyarrow as pa

    (tmp_path / "photo.png").write_bytes(_skimage("chelsea.png"))
    (tmp_path / "wrist.jpg").write_bytes(_jpeg(radiograph))
    batch = pa.table({"image_uri": [str(tmp_path / "photo.png"), str(tmp_path / "wrist.jpg")]})
    columns = predictor(batch)
    assert list(columns["status"]) == ["out_of_scope", "ok"]
    assert columns["error"][0].startswith("colour_photo: ")
    assert np.isnan(columns["fracture_probability"][0]) and columns["label"][0] == -1


def test_http_ingress_answers_422_out_of_scope(radiograph):
    """The ingress's decode step (the same method the HTTP endpoints call), without a cluster."""
    from fracray.imaging.preprocess import PreprocessConfig
    from fracray.serving.args import ServeArgs
    from fracray.serving.errors import HTTP_STATUS_FOR_REJECT
    from fracray.serving.errors import Rejected as _Rejected
    from fracray.serving.ingress import Ingress

    assert HTTP_STATUS_FOR_REJECT["out_of_scope"] == 422
    decode = Ingress.func_or_class._decode  # the method, on the two attributes it reads
    state = types.SimpleNamespace(args=ServeArgs(), decode_config=PreprocessConfig())
    with pytest.raises(_Rejected) as caught:
        decode(state, "photo.png", _skimage("astronaut.png"))
    assert (caught.value.status, caught.value.reason) == (422, "out_of_scope")
    assert caught.value.detail.startswith("colour_photo: ")
    assert decode(state, "wrist.jpg", _jpeg(radiograph)).width == radiograph.shape[1]
    state.args = state.args.model_copy(update={"check_scope": False})
    assert decode(state, "photo.png", _skimage("astronaut.png")).source_format == "PNG"
