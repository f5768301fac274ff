"""score_archive: every input exactly once, resumable after a real kill, local and S3."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import joining_session_ray, REPO
from fracray.data.synthetic import render_radiograph
from fracray.inference.predictor import FracturePredictor
from fracray.scoring.archive import ScoreConfig, read_image_results, score_archive
from fracray.storage import StorageOptions
from conftest import dicom_bytes, synthetic_jpeg


def _make_archive(root: Path, studies: int = 6, per_study: int = 3, seed: int = 0) -> dict[str, str]:
    """A PACS-export-like tree: study folders of JPEG/PNG/extensionless DICOM, plus bad files.
    Returns {file name: expected status} for the odd ones."""
    rng = np.random.default_rng(seed)
    for s in range(studies):
        folder = root / f"patient{s:03d}" / f"study{s}"
        folder.mkdir(parents=True)
        for i in range(per_study):
            part = "wrist" if s % 2 else "humerus"
            if i == 0 and s % 3 == 0:
                pixels = render_radiograph(rng, part, 300, 260, fracture=False).pixels
                (folder / f"IM{i:04d}").write_bytes(dicom_bytes(pixels.astype(np.uint16) * 16))
            elif i == 1:
                buf = io.BytesIO()
                Image.fromarray(render_radiograph(rng, part, 500, 300, fracture=True).pixels).save(buf, "PNG")
                (folder / f"img{i}.png").write_bytes(buf.getvalue())
            else:
                (folder / f"img{i}.jpg").write_bytes(synthetic_jpeg(rng, part))
    bad = root / "patient000" / "study0"
    (bad / "cut.jpg").write_bytes(synthetic_jpeg(rng)[:1500])
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.txt").write_text("report to follow")
    (bad / "._img1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    return {"cut.jpg": "truncated", "empty.png": "empty_file", "notes.txt": "unrecognised_path",
            "._img1.png": "stray_file"}


def _check_exactly_once(output: str, archive: Path, options=None):
    images = read_image_results(output, options)
    uris = images["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)), "an image appears twice"
    on_disk = {str(p) for p in archive.rglob("*") if p.is_file()}
    assert set(uris) == on_disk, "an input is missing from the output"
    return images


def test_tree_archive_every_input_once_with_reasons(ray_local, untrained_index, tmp_path):
    archive = tmp_path / "archive"
    odd = _make_archive(archive)
    output = str(tmp_path / "scores")
    summary = score_archive(ScoreConfig(input=str(archive), models=untrained_index, output=output, chunk_size=5,
                                        batch_size=4), log=lambda *_: None)
    images = _check_exactly_once(output, archive)
    by_name = {Path(r["image_uri"]).name: r for r in images.to_pylist()}
    for name, status in odd.items():
        assert by_name[name]["status"] == status and by_name[name]["error"], name
    ok = [r for r in images.to_pylist() if r["status"] == "ok"]
    assert len(ok) == 18 and summary.scored == 18 and summary.inputs == 22
    assert summary.rejected == {"empty_file": 1, "stray_file": 1, "truncated": 1, "unrecognised_path": 1}
    # The same numbers as the predictor called directly (one predictor for every path).
    predictor = FracturePredictor(untrained_index)
    direct = predictor.predict_bytes([Path(r["image_uri"]).read_bytes() for r in ok],
                                     names=[r["image_uri"] for r in ok])
    for row, expected in zip(ok, direct):
        assert row["fracture_probability"] == pytest.approx(expected["fracture_probability"], abs=1e-6)
        assert row["body_part"] == expected["body_part"] and row["label"] == expected["label"]
        assert row["classifier"] == expected["classifier"] and row["router"] == expected["router"]
        assert row["engine"] == expected["engine"] == "onnxruntime-float32"
    assert all(r["engine"] is None for r in images.to_pylist() if r["status"] != "ok")
    # Study level: mean probability over the study's scored images.
    studies = pq.read_table(Path(output) / "studies.parquet").to_pylist()
    assert len(studies) == 6
    for study in studies:
        members = [r for r in ok if r["study_id"] == study["study_id"]]
        assert study["scored"] == len(members)
        assert study["fracture_probability"] == pytest.approx(np.mean([r["fracture_probability"] for r in members]))
        assert study["label"] == int(study["fracture_probability"] >= study["threshold"])
    # A second run with the same output finds everything done and changes nothing.
    again = score_archive(ScoreConfig(input=str(archive), models=untrained_index, output=output, chunk_size=5,
                                      batch_size=4), log=lambda *_: None)
    assert again.scored_this_run == 0 and again.resumed and again.scored == 18


def test_other_settings_on_an_existing_output_are_refused(ray_local, untrained_index, tmp_path):
    archive = tmp_path / "archive"
    _make_archive(archive, studies=2)
    output = str(tmp_path / "scores")
    score_archive(ScoreConfig(input=str(archive), models=untrained_index, output=output), log=lambda *_: None)
    with pytest.raises(ValueError, match="other settings"):
        score_archive(ScoreConfig(input=str(archive), models=untrained_index, output=output, chunk_size=7),
                      log=lambda *_: None)


def test_mura_layout_body_part_from_layout_and_operating_point(ray_local, untrained_index, mura_root, tmp_path):
    output = str(tmp_path / "scores")
    summary = score_archive(ScoreConfig(input=str(mura_root), models=untrained_index, output=output,
                                        body_part_from_layout=True, operating_point="sensitivity>=0.90"),
                            log=lambda *_: None)
    images = read_image_results(output).to_pylist()
    ok = [r for r in images if r["status"] == "ok"]
    assert ok and summary.layout == "mura"
    for row in ok:
        if row["layout_body_part"] in ("wrist", "humerus"):  # trusted: no router call
            assert row["body_part"] == row["layout_body_part"] and row["body_part_probability"] is None
        assert row["threshold"] == 0.3 and row["known_label"] in (0, 1)
    # A point the models lack is refused before anything is indexed or written.
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match="operating_point 'no_such_point' for the '.*' model: Unknown operating point"):
        score_archive(ScoreConfig(input=str(mura_root), models=untrained_index, output=str(refused),
                                  operating_point="no_such_point"), log=lambda *_: None)
    assert not refused.exists()


def test_s3_archive_to_s3_output(ray_local, untrained_index, s3_bucket, tmp_path):
    client, bucket, endpoint = s3_bucket
    archive = tmp_path / "archive"
    _make_archive(archive, studies=3)
    for path in archive.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"pacs/{path.relative_to(archive).as_posix()}", Body=path.read_bytes())
    options = StorageOptions(endpoint_url=endpoint)
    output = f"s3://{bucket}/scores/run1"
    summary = score_archive(ScoreConfig(input=f"s3://{bucket}/pacs", models=untrained_index, output=output,
                                        chunk_size=4, storage=options), log=lambda *_: None)
    assert summary.inputs == 13 and summary.scored == 9
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="scores/run1/")["Contents"]}
    assert {"scores/run1/studies.parquet", "scores/run1/summary.json", "scores/run1/images/part-rejects.parquet",
            "scores/run1/images/part-000000.parquet"} <= keys
    images = read_image_results(output, options)
    assert images.num_rows == 13 and len(set(images["image_uri"].to_pylist())) == 13
    assert all(u.startswith(f"s3://{bucket}/pacs/") for u in images["image_uri"].to_pylist())


def test_findings_column_matches_the_predictor_and_survives_resume(ray_local, localizing_single_index, tmp_path):
    """Findings (boxes in each image's pixels) as a typed list column: the predictor's own,
    [] kept apart from null (rejects), through Ray Data -> Parquet, a resume and an old part."""
    from fracray.imaging.regions import FINDINGS_TYPE, findings_from_rows

    archive = tmp_path / "archive" / "study0"
    archive.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(400, 320), (300, 700), (520, 260), (350, 350)]):
        # Film grain: a flat background would give the untrained map exact ties between cells,
        # which thread counts (1 per Ray actor here, 2 in this process) may break either way.
        pixels = render_radiograph(rng, "wrist", h, w, fracture=True).pixels.astype(np.float32)
        pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(archive / f"img{i}.png")
    (archive / "cut.jpg").write_bytes(synthetic_jpeg(rng)[:1500])
    output = tmp_path / "scores"
    config = ScoreConfig(input=str(tmp_path / "archive"), models=localizing_single_index, output=str(output),
                         chunk_size=2, batch_size=2)
    score_archive(config, log=lambda *_: None)
    images = read_image_results(str(output))
    assert images.schema.field("findings").type == FINDINGS_TYPE
    rows = {Path(r["image_uri"]).name: r for r in images.to_pylist()}
    assert rows["cut.jpg"]["status"] == "truncated" and rows["cut.jpg"]["findings"] is None
    ok = sorted(n for n, r in rows.items() if r["status"] == "ok")
    direct = FracturePredictor(localizing_single_index).predict_bytes([(archive / n).read_bytes() for n in ok])
    for name, expected in zip(ok, direct):
        row = rows[name]
        assert findings_from_rows(row["findings"]) == expected["findings"] and expected["findings"]
        assert (row["width"], row["height"]) == (expected["image"]["width"], expected["image"]["height"])
        for f in row["findings"]:
            assert 0 <= f["x0"] < f["x1"] <= row["width"] and 0 <= f["y0"] < f["y1"] <= row["height"]
    # Resume: a lost chunk is redone with the same findings; a part written before the
    # findings column existed reads back with nulls there.
    parts = sorted((output / "images").glob("part-0*.parquet"))
    lost = pq.read_table(parts[0])
    parts[0].unlink()
    again = score_archive(config, log=lambda *_: None)
    assert again.resumed and again.scored_this_run == lost.num_rows
    # the same rows; only scored_at (when the part was written) moves on
    redone = pq.read_table(parts[0]).drop_columns(["scored_at"])
    assert redone.to_pylist() == lost.drop_columns(["scored_at"]).to_pylist()
    old = pq.read_table(parts[-1])
    pq.write_table(old.drop_columns(["findings", "width", "height"]), parts[-1])
    mixed = read_image_results(str(output))
    assert mixed.num_rows == images.num_rows and mixed.schema.field("findings").type == FINDINGS_TYPE
    by_uri = dict(zip(mixed["image_uri"].to_pylist(), mixed["findings"].to_pylist()))
    assert all(by_uri[u] is None for u in old["image_uri"].to_pylist())
    assert mixed.schema == images.schema


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_gaps(ray_local, untrained_index, tmp_path):
    """SIGKILL the score_archive process once it has written a chunk; rerun; check exactly-once."""
    archive = tmp_path / "archive"
    _make_archive(archive, studies=30, per_study=4)  # 124 inputs, 30 chunks of 4
    output = tmp_path / "scores"
    parts = output / "images"
    env = joining_session_ray(ray_local)
    command = [sys.executable, str(REPO / "pipelines" / "score_archive.py"), "--input", str(archive),
               "--models", untrained_index, "--output", str(output), "--chunk-size", "4", "--batch-size", "4"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(parts.glob("part-0*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "score_archive ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    first = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-0*.parquet")}
    assert 2 <= len(first) < 30, f"{len(first)} chunks were done at the kill"
    assert not (output / "summary.json").exists()

    summary = score_archive(ScoreConfig(input=str(archive), models=untrained_index, output=str(output),
                                        chunk_size=4, batch_size=4), log=lambda *_: None)
    assert summary.resumed and summary.scored_this_run < 120
    images = _check_exactly_once(str(output), archive)
    assert images.num_rows == 124 and summary.scored == 120
    for name, mtime in first.items():  # finished chunks were kept, not redone
        assert (parts / name).stat().st_mtime_ns == mtime
    assert not list(output.rglob("*.partial-*")), "a partial write was left behind"


def test_cli_help_and_bad_input(tmp_path):
    help_text = subprocess.run([sys.executable, str(REPO / "pipelines" / "score_archive.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--input" in help_text and "resume" in help_text.lower()
    bad = subprocess.run([sys.executable, str(REPO / "pipelines" / "score_archive.py"), "--input", str(tmp_path),
                          "--models", str(tmp_path / "nope"), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr and "model_index.json" in bad.stderr


def test_chunk_size_is_used_as_given_and_only_the_default_adapts(ray_local, untrained_index, tmp_path):
    """--chunk-size 20 on 22 inputs: parts of 20 (it used to be cut to 8 below ~4,096 images);
    without it, small archives still get small parts (8 here) so that every actor has work."""
    import json

    archive = tmp_path / "archive"
    _make_archive(archive)                                    # 22 inputs, 18 of them images
    for size, expected in ((20, 20), (None, 8)):
        output = tmp_path / f"scores-{size}"
        score_archive(ScoreConfig(input=str(archive), models=untrained_index, output=str(output), chunk_size=size,
                                  batch_size=4), log=lambda *_: None)
        run = json.loads((output / "_work" / "run.json").read_text())
        assert run["effective_chunk_size"] == expected and run["chunks"] == -(-run["images"] // expected)
        _check_exactly_once(str(output), archive)
    with pytest.raises(ValueError, match="chunk_size"):
        ScoreConfig(input="x", models="y", output="z", chunk_size=0)
