"""A class-folder archive of DICOM files, through indexing (headers) and the Ray pipeline."""

import numpy as np
import pytest

from fracray.data import adapters
from fracray.data.pipeline import StreamTally, build_image_dataset, iter_model_batches
from fracray.data.probe import probe_manifest
from fracray.imaging.preprocess import PreprocessConfig
from conftest import dicom_bytes


@pytest.fixture
def dicom_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i, (cls, part) in enumerate([("fractured", "WRIST"), ("normal", "HAND"), ("normal", None)]):
        pixels = rng.integers(0, 4095, (64, 48)).astype(np.uint16)
        path = tmp_path / "train" / cls / f"img{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dicom_bytes(pixels, body_part=part, photometric="MONOCHROME1" if i == 1 else "MONOCHROME2"))
    (tmp_path / "train" / "normal" / "notes.dcm").write_bytes(b"not dicom at all" * 20)
    return tmp_path


def test_dicom_folder_index_probe_and_stream(dicom_folder, ray_local):
    manifest = adapters.index_folder(str(dicom_folder)).manifest
    assert manifest.num_rows == 4
    probed, rejects = probe_manifest(manifest)
    parts = dict(zip([u.rsplit("/", 1)[1] for u in probed["image_uri"].to_pylist()], probed["body_part"].to_pylist()))
    assert parts == {"img0.dcm": "wrist", "img1.dcm": "hand", "img2.dcm": "unknown", "notes.dcm": "unknown"}
    assert {(w, h) for w, h in zip(probed["width"].to_pylist(), probed["height"].to_pylist()) if w} == {(48, 64)}
    assert [r[1] for r in rejects] == ["not_an_image"]

    config = PreprocessConfig(image_size=(32, 32))
    tally = StreamTally()
    found = {}
    for batch in iter_model_batches(build_image_dataset(probed, config), batch_size=4, tally=tally, preprocess=config):
        found.update(zip(batch["image_uri"], batch["dicom_body_part"]))
    assert tally.ok == 3 and tally.rows == 4 and tally.rejected == {"not_an_image": 1}
    assert sorted(found.values()) == ["", "hand", "wrist"]
