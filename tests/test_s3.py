"""Object storage for real: moto's S3 server on 127.0.0.1, data uploaded with boto3,
the indexer and the Ray Data pipeline reading s3:// URIs."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, upload_tree
from fracray import storage
from fracray.data import adapters
from fracray.data.manifest import read_manifest
from fracray.data.pipeline import StreamConfig, StreamTally, build_image_dataset, iter_model_batches
from fracray.imaging.preprocess import PreprocessConfig
from fracray.storage import StorageOptions


def test_storage_round_trip_and_listing(s3_bucket):
    client, bucket, endpoint = s3_bucket
    options = StorageOptions(endpoint_url=endpoint)
    storage.write_bytes(f"s3://{bucket}/a/b/c.bin", b"hello", options)
    storage.write_bytes(f"s3://{bucket}/a/d.bin", b"world", options)
    assert storage.read_bytes(f"s3://{bucket}/a/b/c.bin", options) == b"hello"
    assert storage.read_prefix(f"s3://{bucket}/a/d.bin", 3, options) == (b"wor", 5)
    assert storage.list_files(f"s3://{bucket}/a", options) == [f"s3://{bucket}/a/b/c.bin", f"s3://{bucket}/a/d.bin"]
    assert storage.exists(f"s3://{bucket}/a/d.bin", options)
    assert not storage.exists(f"s3://{bucket}/a/nope.bin", options)
    # Written through our layer, visible to boto3: it is the real server.
    assert client.get_object(Bucket=bucket, Key="a/b/c.bin")["Body"].read() == b"hello"
    with pytest.raises(storage.StorageError, match="Not found"):
        storage.read_bytes(f"s3://{bucket}/missing", options)


def test_endpoint_from_the_standard_environment(s3_bucket, monkeypatch):
    client, bucket, endpoint = s3_bucket
    client.put_object(Bucket=bucket, Key="x.txt", Body=b"42")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert storage.read_bytes(f"s3://{bucket}/x.txt") == b"42"


def test_index_and_stream_fracatlas_from_s3(s3_bucket, fracatlas_root, ray_local):
    client, bucket, endpoint = s3_bucket
    n = upload_tree(client, fracatlas_root, bucket, "datasets")
    assert n > 60
    options = StorageOptions(endpoint_url=endpoint)
    result = adapters.index_fracatlas(f"s3://{bucket}/datasets", options)
    local = adapters.index_fracatlas(str(fracatlas_root))
    assert result.manifest.num_rows == local.manifest.num_rows == 60
    assert all(u.startswith(f"s3://{bucket}/datasets/FracAtlas/images/") for u in result.manifest["image_uri"].to_pylist())
    assert result.manifest["split"].to_pylist() == local.manifest["split"].to_pylist()

    config = PreprocessConfig(image_size=(128, 128))
    tally = StreamTally()
    ok = 0
    for batch in iter_model_batches(build_image_dataset(result.manifest, config, storage_options=options,
                                                        stream=StreamConfig(batch_size=8)),
                                    batch_size=8, tally=tally, preprocess=config):
        ok += len(batch["image"])
    assert tally.rows == 60 and ok == 58
    assert tally.rejected == {"truncated": 2}


def test_index_command_against_s3(s3_bucket, mura_root):
    client, bucket, endpoint = s3_bucket
    upload_tree(client, mura_root, bucket, "mura")
    out = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "index_dataset.py"), "--dataset", "mura",
         "--data", f"s3://{bucket}/mura", "--output", f"s3://{bucket}/index", "--endpoint-url", endpoint,
         "--verify"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "1 files rejected: 1 stray_file" in out.stdout
    options = StorageOptions(endpoint_url=endpoint)
    manifest = read_manifest(f"s3://{bucket}/index/manifest.parquet", options)
    assert manifest.num_rows == adapters.index_mura(str(mura_root)).manifest.num_rows
    assert all(w and h for w, h in zip(manifest["width"].to_pylist(), manifest["height"].to_pylist()))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="index/")["Contents"]}
    assert keys == {f"index/{n}" for n in ("manifest.parquet", "rejects.parquet", "summary.json",
                                          "contact_sheet.png", "image_sizes.png")}
    summary = json.loads(client.get_object(Bucket=bucket, Key="index/summary.json")["Body"].read())
    assert summary["images"] == manifest.num_rows and summary["rejects"] == {"stray_file": 1}
    png = client.get_object(Bucket=bucket, Key="index/contact_sheet.png")["Body"].read()
    assert png.startswith(b"\x89PNG")


def test_wrong_bucket_is_a_clear_error(s3_server):
    out = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "index_dataset.py"), "--dataset", "fracatlas",
         "--data", "s3://no-such-bucket-here/x", "--output", "/tmp/never", "--endpoint-url", s3_server],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "error:" in out.stderr and "FracAtlas/dataset.csv" in out.stderr
