"""pydicom's own 80-odd real-world test files (they ship inside the installed pydicom) through
decoding, the Ray Data pipeline and score_archive: every file decodes or is rejected with a
named reason, none crashes, none is lost. (The HTTP endpoint: tests/test_serving_hardening.py.)"""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import MUST_DECODE, corpus_dir, corpus_files
from fracray.imaging.decode import ImageRejected, RejectReason, decode_image


# pydicom ships these as broken on purpose: the pixel data cannot be decoded by any handler.
KNOWN_BROKEN = {"JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "MR_truncated.dcm"}

REASONS = {r.value for r in RejectReason}


def _decode(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd files it is testing
        return decode_image(path.read_bytes())


def test_the_corpus_is_there():
    assert len(corpus_files()) >= 78, "pydicom's test files are missing from the installed package"


@pytest.mark.parametrize("syntax,name", sorted(MUST_DECODE.items()))
def test_compressed_syntaxes_pacs_store_decode(syntax, name):
    image = _decode(corpus_dir() / name)
    assert image.source_format == "DICOM" and min(image.pixels.shape) >= 8
    assert np.isfinite(image.as_float()).all() and image.as_float().max() > image.as_float().min(), syntax


def test_every_file_decodes_or_is_rejected_with_a_named_reason():
    outcomes: dict[str, str] = {}
    for path in corpus_files():
        try:
            _decode(path)
            outcomes[path.name] = "ok"
        except ImageRejected as exc:
            assert exc.reason.value in REASONS and exc.detail, path
            outcomes[path.name] = exc.reason.value
        # anything else propagates and fails the test: one bad file must never crash a caller
    assert sum(v == "ok" for v in outcomes.values()) >= 75, outcomes
    for name in KNOWN_BROKEN:
        assert outcomes[name] == "unsupported_dicom", (name, outcomes[name])
    # Raw data sets (no preamble, no "DICM") are read as DICOM: an RT plan is DICOM without pixels.
    assert outcomes["ExplVR_LitEndNoMeta.dcm"] == outcomes["ExplVR_BigEndNoMeta.dcm"] == "unsupported_dicom"


def test_a_raw_data_set_without_preamble_decodes():
    """Some exports write the data set alone (no 128-byte preamble, no file meta)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality, ds.BodyPartExamined = "DX", "WRIST"
    ds.Rows, ds.Columns = 64, 48
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096
    ds.PixelData = pixels.tobytes()
    for little in (True, False):  # implicit VR little endian and explicit VR big endian
        buf = io.BytesIO()
        ds.save_as(buf, implicit_vr=little, little_endian=little, enforce_file_format=False)
        data = buf.getvalue()
        assert data[128:132] != b"DICM"
        image = decode_image(data)
        assert image.source_format == "DICOM" and image.body_part == "wrist" and image.shape == (64, 48)


@pytest.fixture(scope="module")
def corpus_archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pacs") / "archive"
    shutil.copytree(corpus_dir(), root)
    return root


def test_the_corpus_through_the_ray_data_pipeline(ray_local, corpus_archive):
    from fracray.data import adapters
    from fracray.data.pipeline import StreamTally, build_image_dataset, iter_model_batches
    from fracray.imaging.preprocess import PreprocessConfig

    indexed = adapters.index_tree(str(corpus_archive))
    files = len(corpus_files())
    assert indexed.manifest.num_rows + indexed.rejects.num_rows == files  # none lost at indexing
    config = PreprocessConfig(image_size=(64, 64))
    tally = StreamTally()
    n = sum(len(b["image_uri"]) for b in iter_model_batches(build_image_dataset(indexed.manifest, config),
                                                             batch_size=16, tally=tally, preprocess=config))
    assert tally.rows == indexed.manifest.num_rows and tally.ok == n >= 70
    assert tally.ok + sum(tally.rejected.values()) == tally.rows
    assert set(tally.rejected) <= REASONS, tally.rejected


def test_score_archive_on_the_corpus_survives_and_accounts_for_every_file(ray_local, untrained_index,
                                                                          corpus_archive, tmp_path):
    import pyarrow.parquet as pq

    from fracray.scoring.archive import ScoreConfig, score_archive

    output = tmp_path / "scores"
    summary = score_archive(ScoreConfig(input=str(corpus_archive), models=untrained_index, output=str(output),
                                        chunk_size=16, batch_size=8), log=lambda *_: None)
    assert summary.inputs == len(corpus_files())
    assert summary.scored + sum(summary.rejected.values()) == summary.inputs
    rows = pq.read_table(output / "images").to_pylist()
    assert len(rows) == summary.inputs and len({r["image_uri"] for r in rows}) == len(rows)
    by_name = {Path(r["image_uri"]).name: r for r in rows}
    for name in MUST_DECODE.values():  # decoded: scored, or refused as not a limb radiograph (CT/MR)
        assert by_name[name]["status"] in ("ok", "out_of_scope"), (name, by_name[name])
    assert all(r["status"] == "ok" or r["error"] for r in rows)
    # Scored DICOM files keep their SOP Instance UID, so results join back to the archive.
    import pydicom

    for row in rows:
        if row["status"] == "ok":
            header = pydicom.dcmread(row["image_uri"], stop_before_pixels=True, force=True)
            assert row["sop_instance_uid"] == (str(header.get("SOPInstanceUID", "")).strip() or None), row["image_uri"]


@pytest.mark.parametrize("name", ["meta_missing_tsyntax.dcm", "nested_priv_SQ.dcm"])
def test_pixel_data_without_rows_and_columns_is_named_for_what_it_is(name):
    """pydicom's two files with 2 bytes of pixel data and no Image Pixel module used to be refused
    as "0x0 is smaller than 8 px": the image is not small, its Rows and Columns are missing."""
    with pytest.raises(ImageRejected) as caught:
        _decode(corpus_dir() / name)
    assert caught.value.reason == RejectReason.CORRUPT
    assert "no Rows and Columns" in caught.value.detail and "smaller than" not in caught.value.detail
