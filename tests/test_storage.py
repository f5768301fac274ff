"""The storage layer on local paths, file:// URIs and an fsspec-only scheme (S3 is in test_s3.py)."""

import pytest

from fracray import storage


def test_local_round_trip_listing_and_prefix(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "b" / "x.bin"), b"0123456789")
    storage.write_bytes(str(tmp_path / "a" / "y.bin"), b"y")
    assert storage.read_bytes(str(tmp_path / "a" / "b" / "x.bin")) == b"0123456789"
    assert storage.read_prefix(str(tmp_path / "a" / "b" / "x.bin"), 4) == (b"0123", 10)
    assert storage.list_files(str(tmp_path / "a")) == [str(tmp_path / "a" / "b" / "x.bin"), str(tmp_path / "a" / "y.bin")]
    assert storage.exists(str(tmp_path / "a" / "y.bin")) and not storage.exists(str(tmp_path / "nope"))
    assert storage.relative_to(str(tmp_path / "a" / "b" / "x.bin"), str(tmp_path / "a")) == "b/x.bin"


def test_file_uri(tmp_path):
    (tmp_path / "f.txt").write_bytes(b"hi")
    assert storage.read_bytes(f"file://{tmp_path}/f.txt") == b"hi"


def test_fsspec_scheme_through_the_same_layer():
    storage.write_bytes("memory://bucket/dir/one.bin", b"1")
    storage.write_bytes("memory://bucket/dir/two.bin", b"22")
    assert storage.read_bytes("memory://bucket/dir/two.bin") == b"22"
    assert storage.list_files("memory://bucket/dir") == ["memory://bucket/dir/one.bin", "memory://bucket/dir/two.bin"]
    assert storage.join("memory://bucket/dir/", "sub", "x") == "memory://bucket/dir/sub/x"


def test_errors_say_what_and_where(tmp_path):
    with pytest.raises(storage.StorageError, match="Not found"):
        storage.read_bytes(str(tmp_path / "missing.png"))
    with pytest.raises(storage.StorageError, match="non-empty URI"):
        storage.read_bytes("")
    with pytest.raises(storage.StorageError, match="No filesystem for scheme 'nosuchfs'"):
        storage.read_bytes("nosuchfs://x/y")


def test_endpoint_option_and_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    opts = storage.StorageOptions().resolved()
    assert opts.endpoint_url == "http://127.0.0.1:9" and opts.region == "eu-west-1"
    explicit = storage.StorageOptions(endpoint_url="http://127.0.0.1:10").resolved()
    assert explicit.endpoint_url == "http://127.0.0.1:10"
