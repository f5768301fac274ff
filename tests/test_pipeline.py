"""The Ray Data streaming pipeline on a real local Ray: every input accounted for."""

import collections
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import REPO
from fracray.data import adapters
from fracray.data.manifest import make_manifest
from fracray.data.pipeline import (OK, StreamConfig, StreamTally, balance_positives, build_image_dataset,
                                   iter_model_batches, preprocess_batch)
from fracray.imaging.preprocess import AugmentConfig, PreprocessConfig, finalize


@pytest.fixture
def messy_folder(tmp_path) -> tuple[Path, dict[str, str]]:
    """Good images plus every kind of bad input, with the reason each must get."""
    rng = np.random.default_rng(0)
    expected = {}
    for i in range(12):
        p = tmp_path / f"good{i}.png"
        Image.fromarray(rng.integers(0, 255, (64 + i, 80), dtype=np.uint8)).save(p)
        expected[str(p)] = OK
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 300), dtype=np.uint8)).save(jpeg, "JPEG")
    bad = {
        "empty.png": (b"", "empty_file"),
        "report.jpg": (b"Impression: no acute fracture.\n" * 20, "not_an_image"),
        "cut.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated"),
    }
    bomb = io.BytesIO()
    Image.new("L", (12000, 12000)).save(bomb, "PNG", compress_level=9)
    bad["bomb.png"] = (bomb.getvalue(), "decompression_bomb")
    for name, (data, reason) in bad.items():
        (tmp_path / name).write_bytes(data)
        expected[str(tmp_path / name)] = reason
    expected[str(tmp_path / "vanished.png")] = "read_error"  # listed, but not on disk
    return tmp_path, expected


def test_preprocess_batch_without_ray_accounts_for_every_row(messy_folder):
    _, expected = messy_folder
    manifest = make_manifest({"image_uri": u, "dataset": "test"} for u in expected)
    out = preprocess_batch(manifest, preprocess=PreprocessConfig(image_size=(64, 64), max_pixels=50_000_000))
    got = dict(zip(out["image_uri"], out["status"]))
    assert got == expected
    assert out["image"].shape == (len(expected), 1, 64, 64)
    for uri, status, err in zip(out["image_uri"], out["status"], out["error"]):
        assert (status == OK) == (err == ""), (uri, status, err)


def test_float16_transport_is_the_float32_image_rounded_to_nearest_and_needs_no_torch(messy_folder):
    """The stream ships float16 (half the bytes): exactly the float32 batch rounded as NumPy
    rounds (OpenCV's SIMD conversion), without importing torch into a data worker."""
    _, expected = messy_folder
    manifest = make_manifest({"image_uri": u, "dataset": "test"} for u in expected)
    config = PreprocessConfig(image_size=(64, 64), max_pixels=50_000_000)
    half = preprocess_batch(manifest, preprocess=config, output_dtype="float16")
    full = preprocess_batch(manifest, preprocess=config, output_dtype="float32")
    assert half["image"].dtype == np.float16 and full["image"].dtype == np.float32
    assert (full["image"] != 0).any()
    np.testing.assert_array_equal(half["image"], full["image"].astype(np.float16))
    worker = subprocess.run([sys.executable, "-c", "import sys; from fracray.data.pipeline import preprocess_batch; "
                             "from fracray.data.manifest import make_manifest; "
                             "from fracray.imaging.preprocess import PreprocessConfig; "
                             f"preprocess_batch(make_manifest([{{'image_uri': {next(iter(expected))!r}, "
                             "'dataset': 'test'}]), preprocess=PreprocessConfig(image_size=(64, 64)), "
                             "output_dtype='float16'); print('torch' in sys.modules)"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert worker.returncode == 0 and worker.stdout.strip() == "False", worker.stderr[-2000:]


def test_ray_pipeline_accounts_for_every_input(ray_local, messy_folder):
    _, expected = messy_folder
    manifest = make_manifest({"image_uri": u, "dataset": "test", "image_label": i % 2}
                             for i, u in enumerate(expected))
    config = PreprocessConfig(image_size=(64, 64), max_pixels=50_000_000)
    ds = build_image_dataset(manifest, config, stream=StreamConfig(batch_size=4, rows_per_block=4))
    tally = StreamTally()
    seen = collections.Counter()
    for batch in iter_model_batches(ds, batch_size=5, tally=tally, preprocess=config):
        assert batch["image"].shape[1:] == (3, 64, 64) and batch["image"].dtype == np.float32
        assert np.isfinite(batch["image"]).all()
        seen.update(batch["image_uri"].tolist())
    assert tally.rows == len(expected)
    assert tally.ok == 12 and sum(tally.rejected.values()) == len(expected) - 12
    assert {u: r for u, r, _ in tally.reject_examples} == {u: r for u, r in expected.items() if r != OK}
    assert all(n == 1 for n in seen.values()) and len(seen) == 12


def test_ray_pipeline_matches_the_single_image_path(ray_local, mura_root):
    """Batches from Ray equal preprocessing each file directly (float16 transport aside)."""
    from fracray.imaging.preprocess import preprocess_bytes

    manifest = adapters.index_mura(str(mura_root)).manifest.slice(0, 10)
    config = PreprocessConfig(image_size=(96, 96))
    rows = {}
    for batch in iter_model_batches(build_image_dataset(manifest, config), batch_size=4, preprocess=config):
        rows.update(zip(batch["image_uri"], batch["image"]))
    assert len(rows) == 10
    for uri, image in rows.items():
        direct, _ = preprocess_bytes(Path(uri).read_bytes(), config)
        np.testing.assert_allclose(image, direct, atol=0.01)  # 8-bit source: float16 is well within a grey level


def test_augmentation_is_deterministic_per_seed_and_differs_across_seeds(ray_local, mura_root):
    manifest = adapters.index_mura(str(mura_root)).manifest.slice(0, 6)
    config = PreprocessConfig(image_size=(64, 64))

    def run(seed):
        stream = StreamConfig(batch_size=6, augment=AugmentConfig(max_rotation_deg=20), seed=seed)
        batch = next(iter_model_batches(build_image_dataset(manifest, config, stream=stream), batch_size=6))
        order = np.argsort(batch["image_uri"])
        return batch["image"][order].astype(np.float32)

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3


def test_balance_positives_adds_augmented_copies_only_of_positives():
    manifest = make_manifest([{"image_uri": f"n{i}", "dataset": "t", "image_label": 0} for i in range(10)]
                             + [{"image_uri": f"p{i}", "dataset": "t", "image_label": 1} for i in range(3)])
    balanced = balance_positives(manifest, seed=0)
    labels = collections.Counter(balanced["image_label"].to_pylist())
    assert labels == {0: 10, 1: 10}
    rows = balanced.to_pylist()
    assert all(r["augment_copy"] == 0 for r in rows if r["image_label"] == 0)
    originals = [r for r in rows if r["image_label"] == 1 and r["augment_copy"] == 0]
    copies = [r for r in rows if r["augment_copy"] > 0]
    assert len(originals) == 3 and len(copies) == 7
    # Copies spread evenly: each positive is copied 2 or 3 times, never the same copy number twice.
    per_image = collections.defaultdict(list)
    for r in copies:
        per_image[r["image_uri"]].append(r["augment_copy"])
    assert sorted(len(v) for v in per_image.values()) == [2, 2, 3]
    assert all(len(set(v)) == len(v) for v in per_image.values())


def test_augmented_copies_differ_from_their_original(mura_root):
    manifest = adapters.index_mura(str(mura_root)).manifest
    positives = manifest.filter(pa.compute.equal(manifest["image_label"], 1)).slice(0, 1)
    two = pa.concat_tables([positives, positives]).append_column("augment_copy", pa.array([0, 1], pa.int16()))
    out = preprocess_batch(two, preprocess=PreprocessConfig(image_size=(64, 64)))
    assert list(out["status"]) == [OK, OK]
    assert np.abs(out["image"][0] - out["image"][1]).mean() > 1e-3


def test_stream_config_validation():
    with pytest.raises(ValueError):
        StreamConfig(batch_size=0)
    with pytest.raises(ValueError, match="output_dtype"):
        StreamConfig(output_dtype="int8")


def test_empty_manifest_is_a_clear_error(ray_local):
    with pytest.raises(ValueError, match="no rows"):
        build_image_dataset(make_manifest([]), PreprocessConfig())


def test_finalize_on_torch_matches_numpy():
    import torch

    config = PreprocessConfig(image_size=(8, 8))
    base = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float16)
    np.testing.assert_allclose(finalize(torch.from_numpy(base), config).numpy(), finalize(base, config), atol=1e-6)
