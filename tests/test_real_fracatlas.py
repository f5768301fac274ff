"""All of the real FracAtlas copy in ../shared/data, through the Ray Data pipeline.

Skipped, saying why, where ../shared/data is absent. Nothing the product ships
depends on it."""

import collections

import numpy as np
import pytest

from fracray.data import adapters
from fracray.data.pipeline import StreamTally, build_image_dataset, iter_model_batches
from fracray.imaging.decode import decode_image
from fracray.imaging.preprocess import PreprocessConfig

pytestmark = pytest.mark.shared_data


def test_every_real_fracatlas_image_is_accounted_for(shared_fracatlas, ray_local):
    manifest = adapters.index_fracatlas(str(shared_fracatlas)).manifest
    config = PreprocessConfig()
    tally = StreamTally()
    seen = collections.Counter()
    for batch in iter_model_batches(build_image_dataset(manifest, config), batch_size=256, tally=tally,
                                    preprocess=config):
        assert batch["image"].shape[1:] == (3, 224, 224)
        assert np.isfinite(batch["image"]).all()
        seen.update(batch["image_uri"].tolist())
    assert tally.rows == manifest.num_rows == 3736
    # The release's truncated non-fractured JPEGs (58 of its 59 are here) are rejected with the reason.
    assert tally.rejected == {"truncated": 58}
    assert tally.ok == 3736 - 58 == len(seen)
    truncated = sorted(u.rsplit("/", 1)[1] for u, r, _ in tally.reject_examples)
    assert truncated[0] >= "IMG0004028.jpg" and truncated[-1] <= "IMG0004347.jpg"
    assert all("/Non_fractured/" in u for u, _, _ in tally.reject_examples)


def test_full_resolution_sample_decodes_at_its_true_size(shared_fracatlas_fullres):
    images = sorted((shared_fracatlas_fullres / "FracAtlas" / "images").rglob("*.jpg"))
    assert len(images) == 24
    sizes = collections.Counter()
    for path in images:
        decoded = decode_image(path.read_bytes())
        sizes[(decoded.width, decoded.height)] += 1
        assert decoded.pixels.shape == (decoded.height, decoded.width)
    assert set(sizes) <= {(2304, 2880), (1760, 2140), (2880, 2304), (2140, 1760)}
