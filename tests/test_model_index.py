"""Model index paths: bundles are stored relative to the index and resolved against the index's
own location (a folder or an s3:// prefix), never the working directory; old cwd-relative
indexes still read; commands refuse an index naming a missing bundle before Ray starts."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import _free_port, joining_session_ray, REPO, upload_tree
from fracray.artifacts.index import ModelIndex, check_model_index, read_model_index, write_model_index
from fracray.storage import StorageOptions


def _copy_bundles(untrained_index: str, models: Path) -> dict[str, Path]:
    """The untrained router and classifiers, copied under ``models`` (as train_all lays them out)."""
    source = Path(untrained_index).parent
    out = {}
    for name in ("router", "fracture_humerus", "fracture_wrist"):
        shutil.copytree(source / name, models / name)
        out[name] = models / name
    return out


def _archive(root: Path, n: int = 4) -> None:
    from fracray.data.synthetic import render_radiograph

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"patient{i}" / "study1"
        folder.mkdir(parents=True)
        buf = io.BytesIO()
        Image.fromarray(render_radiograph(rng, "wrist" if i % 2 else "humerus", 320, 256, fracture=False).pixels
                        ).save(buf, "JPEG")
        (folder / "image1.jpg").write_bytes(buf.getvalue())


def _train_all_like_index(cwd: Path, untrained_index: str) -> Path:
    """What train_all --output runs/latest writes when run in ``cwd``: bundles under
    runs/latest/models, the index written with the cwd-relative bundle URIs it was handed."""
    _copy_bundles(untrained_index, cwd / "runs" / "latest" / "models")
    here = os.getcwd()
    os.chdir(cwd)
    try:
        write_model_index("runs/latest/model_index.json",
                          ModelIndex(router="runs/latest/models/router",
                                     classifiers={"humerus": "runs/latest/models/fracture_humerus",
                                                  "wrist": "runs/latest/models/fracture_wrist"}, dataset="untrained"))
    finally:
        os.chdir(here)
    return cwd / "runs" / "latest"


def test_index_stores_bundles_relative_to_itself(tmp_path, untrained_index, monkeypatch):
    outside = Path(untrained_index).parent / "fracture_wrist"  # not under the index's folder: stays absolute
    run = _train_all_like_index(tmp_path / "train", untrained_index)
    raw = json.loads((run / "model_index.json").read_text())
    assert raw["router"] == "models/router"
    assert raw["classifiers"] == {"humerus": "models/fracture_humerus", "wrist": "models/fracture_wrist"}
    write_model_index(str(tmp_path / "other" / "model_index.json"),
                      ModelIndex(router=None, classifiers={"wrist": str(outside)}))
    assert json.loads((tmp_path / "other" / "model_index.json").read_text())["classifiers"]["wrist"] == str(outside)

    moved = tmp_path / "elsewhere" / "r1"
    shutil.move(str(run), moved)
    monkeypatch.chdir(tmp_path)
    index = read_model_index(str(moved))  # the folder, from an unrelated working directory
    assert index.router == str(moved / "models" / "router")
    assert index.classifiers == {"humerus": str(moved / "models" / "fracture_humerus"),
                                 "wrist": str(moved / "models" / "fracture_wrist")}
    assert check_model_index(str(moved / "model_index.json")).classifiers == index.classifiers


def _touch_bundle(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "bundle.json").write_text("{}")
    return path


def test_old_cwd_relative_index_still_reads_where_unambiguous(tmp_path, monkeypatch):
    """An index from before the fix: {"router": "runs/r/models/router"}, relative to where train_all ran."""
    work = tmp_path / "work"
    bundle = _touch_bundle(work / "runs" / "r" / "models" / "router")
    index_file = work / "runs" / "r" / "model_index.json"
    index_file.write_text(json.dumps({"router": "runs/r/models/router", "classifiers": {"all": "runs/r/models/router"},
                                      "format": "fracray-model-index/1"}))
    monkeypatch.chdir(work)  # the directory it was written in: the path as stored
    assert read_model_index(str(index_file)).router == str(bundle)
    monkeypatch.chdir(tmp_path)  # anywhere else: the leading folders that repeat the index's own are dropped
    assert read_model_index(str(index_file)).router == str(bundle)
    # Both readings exist: the index-relative one wins.
    preferred = _touch_bundle(work / "runs" / "r" / "runs" / "r" / "models" / "router")
    monkeypatch.chdir(work)
    assert read_model_index(str(index_file)).router == str(preferred)


def test_score_archive_on_a_moved_run_folder_from_another_directory(tmp_path, untrained_index, ray_local):
    run = _train_all_like_index(tmp_path / "train", untrained_index)
    moved = tmp_path / "copied" / "r1"
    shutil.copytree(run, moved)
    shutil.rmtree(tmp_path / "train")  # the original is gone: only the copy is left
    _archive(tmp_path / "archive")
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    env = joining_session_ray(ray_local)
    out = subprocess.run([sys.executable, str(REPO / "pipelines" / "score_archive.py"), "--input",
                          str(tmp_path / "archive"), "--models", str(moved / "model_index.json"), "--output",
                          str(tmp_path / "scores")], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Ray: joining the cluster at" in out.stderr
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["inputs"] == 4 and summary["scored"] + sum(summary["rejected"].values()) == 4
    assert not list(cwd.iterdir()), "nothing is written to the working directory"


@pytest.mark.parametrize("command", ["score_archive", "evaluate", "serve"])
def test_index_naming_a_missing_bundle_fails_at_once_without_ray(tmp_path, untrained_index, command):
    run = tmp_path / "run"
    run.mkdir()
    index_file = run / "model_index.json"
    # A real router elsewhere, and a classifier folder that was never copied.
    write_model_index(str(index_file), ModelIndex(router=read_model_index(untrained_index).router,
                                                  classifiers={"wrist": str(run / "models" / "fracture_wrist")}))
    output = tmp_path / "out"
    args = {"score_archive": ["--input", str(tmp_path), "--output", str(output)],
            "evaluate": ["--dataset", "mura", "--data", str(tmp_path), "--output", str(output)],
            "serve": ["--port", str(_free_port())]}[command]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(REPO / "pipelines" / f"{command}.py"), "--models", str(index_file),
                          *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert time.monotonic() - started < 60
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert str(index_file) in lines[0] and str(run / "models" / "fracture_wrist") in lines[0]
    assert "wrist classifier" in lines[0]
    assert "Ray:" not in out.stderr and "Traceback" not in out.stderr  # Ray never started
    assert not output.exists(), "no _work/ or output folder is left behind"


def test_run_folder_copied_to_s3_reads_with_bundles_under_the_prefix(s3_bucket, untrained_index):
    client, bucket, endpoint = s3_bucket
    options = StorageOptions(endpoint_url=endpoint)
    upload_tree(client, Path(untrained_index).parent, bucket, "runs/r1")
    prefix = f"s3://{bucket}/runs/r1"
    index = read_model_index(prefix, options)
    assert index.router == f"{prefix}/router"
    assert index.classifiers == {"humerus": f"{prefix}/fracture_humerus", "wrist": f"{prefix}/fracture_wrist"}
    assert check_model_index(f"{prefix}/model_index.json", options).router == f"{prefix}/router"
    client.delete_object(Bucket=bucket, Key="runs/r1/fracture_wrist/bundle.json")
    with pytest.raises(FileNotFoundError, match=f"wrist classifier bundle {prefix}/fracture_wrist"):
        check_model_index(prefix, options)


def test_index_reads_in_a_process_whose_working_directory_is_gone(tmp_path, untrained_index):
    """Ray reuses worker processes whose working directory (an earlier job's runtime env) was
    deleted: reading an index there must not need os.getcwd() (found by the two-node test)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    code = ("import os, shutil, sys\n"
            "from fracray.artifacts.index import read_model_index\n"
            "os.chdir(sys.argv[1]); shutil.rmtree(sys.argv[1])\n"
            "print(sorted(read_model_index(sys.argv[2]).classifiers))")
    done = subprocess.run([sys.executable, "-c", code, str(gone), untrained_index], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "humerus" in done.stdout


@pytest.mark.parametrize("value", ["1e-400", "nan", "inf", "-0.1", "1.5"])
def test_one_threshold_rule_for_every_path(untrained_index, value):
    """serving, score_archive and evaluate resolve an operating point through the bundle's one
    rule: a number that is not a representable value in [0, 1] is refused, never another threshold."""
    from fracray.artifacts.describe import resolve_threshold
    from fracray.artifacts.bundle import read_bundle_meta

    meta = read_bundle_meta(read_model_index(untrained_index).classifiers["wrist"])
    with pytest.raises(ValueError):
        resolve_threshold(meta, value)
    assert resolve_threshold(meta, "0") == 0.0 and resolve_threshold(meta, "1e-300") == 1e-300
    assert resolve_threshold(meta, 0.25) == 0.25 and resolve_threshold(meta, None) == meta.threshold
