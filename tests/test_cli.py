"""The command-line entry points, run as a user runs them."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import joining_session_ray, REPO

SCRIPTS = sorted(p.name for p in (REPO / "pipelines").glob("*.py"))


def _run(*args, timeout=600, cwd=REPO, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, **kw)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_has_help(script):
    out = _run(REPO / "pipelines" / script, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and len(out.stdout) > 300


FRACRAY = str(REPO / ".venv" / "bin" / "fracray")
# `fracray <command>` -> the pipelines/ script that runs the same main (what `ray job submit` runs).
SAME_AS_SCRIPT = {"index": "index_dataset.py", "train": "train_all.py", "evaluate": "evaluate.py",
                  "score": "score_archive.py", "serve": "serve.py", "publish": "publish_results.py",
                  "load-study": "load_study.py", "listen": "listen.py",
                  "check-scope": "check_scope.py", "ablation-table": "ablation_table.py",
                  "validate-fast-mode": "validate_fast_mode.py", "shift-eval": "shift_eval.py",
                  "ship-model": "ship_model.py", "review": "review.py", "monitor": "monitor.py",
                  "bench preprocess": "bench_preprocess.py", "bench training": "bench_training.py",
                  "bench scoring": "bench_scoring.py", "bench serving": "bench_serving.py",
                  "bench engine": "bench_engine.py", "bench review": "bench_review.py"}


def _fracray(*args, timeout=600, **kw):
    return subprocess.run([FRACRAY, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          **kw)


def test_fracray_command_lists_every_job_and_refuses_unknown_ones():
    from fracray.cli.main import BENCHMARKS, COMMANDS

    assert set(SAME_AS_SCRIPT) == {c for c in COMMANDS if c != "bench"} | {f"bench {b}" for b in BENCHMARKS}
    assert set(SAME_AS_SCRIPT.values()) == set(SCRIPTS)  # every pipelines/ script has its sub-command
    out = _fracray("--help")
    assert out.returncode == 0 and all(name in out.stdout for name in COMMANDS), out.stdout
    assert all(name in _fracray("bench", "--help").stdout for name in BENCHMARKS)
    bad = _fracray("trian")
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr and "train" in bad.stderr


@pytest.mark.parametrize("command", sorted(SAME_AS_SCRIPT))
def test_fracray_subcommand_takes_the_same_options_as_its_script(command):
    mine = _fracray(*command.split(), "--help")
    script = _run(REPO / "pipelines" / SAME_AS_SCRIPT[command], "--help")
    assert mine.returncode == 0 == script.returncode, mine.stderr + script.stderr
    assert f"usage: fracray {command}" in " ".join(mine.stdout.split())
    # Same help text once the program name is the same.
    prog = SAME_AS_SCRIPT[command]
    assert " ".join(mine.stdout.replace(f"fracray {command}", prog).split()) == " ".join(script.stdout.split())


def test_fracray_index_is_the_index_job(fracatlas_root, tmp_path):
    out = _fracray("index", "--dataset", "fracatlas", "--data", fracatlas_root, "--output", tmp_path / "idx",
                   "--no-pictures")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "idx" / "summary.json").read_text())
    assert summary["images"] == 60 and pq.read_table(tmp_path / "idx" / "manifest.parquet").num_rows == 60
    assert not (tmp_path / "idx" / "contact_sheet.png").exists()  # --no-pictures reached the job


def test_index_fracatlas_writes_manifest_rejects_and_pictures(fracatlas_root, tmp_path):
    out = _run(REPO / "pipelines" / "index_dataset.py", "--dataset", "fracatlas", "--data", fracatlas_root,
               "--output", tmp_path / "idx", "--verify")
    assert out.returncode == 0, out.stderr
    assert "split  body part" in out.stdout and "all" in out.stdout
    assert "2 truncated" in out.stdout
    manifest = pq.read_table(tmp_path / "idx" / "manifest.parquet")
    rejects = pq.read_table(tmp_path / "idx" / "rejects.parquet").to_pylist()
    assert manifest.num_rows == 60
    assert [r["reason"] for r in rejects] == ["truncated", "truncated"]
    summary = json.loads((tmp_path / "idx" / "summary.json").read_text())
    assert summary["images"] == 60 and summary["rejects"] == {"truncated": 2}
    for name, min_size in (("contact_sheet.png", (400, 400)), ("image_sizes.png", (600, 300))):
        with Image.open(tmp_path / "idx" / name) as img:
            assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
            # Not a blank canvas: the sheet shows radiographs.
            assert len(img.convert("L").getcolors(1 << 16) or []) > 50


def test_index_bad_layout_is_a_clear_error_and_exit_code(tmp_path):
    out = _run(REPO / "pipelines" / "index_dataset.py", "--dataset", "mura", "--data", tmp_path,
               "--output", tmp_path / "out")
    assert out.returncode == 2
    assert "error:" in out.stderr and "MURA-v1.1" in out.stderr and "Traceback" not in out.stderr


def test_index_rejects_unknown_layout_name(tmp_path):
    out = _run(REPO / "pipelines" / "index_dataset.py", "--dataset", "chexpert", "--data", tmp_path,
               "--output", tmp_path)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_train_all_data_stage_and_its_console_quiet_and_verbose(tmp_path):
    """The README's main command's data stage, with a smaller synthetic set: index + Ray Data
    preprocessing. A relative --output, as in the README: Ray workers run in other directories.
    By default Ray's own INFO lines and workers' output stay in the session's log files;
    --verbose brings them to the console (the same run otherwise)."""
    args = ["--synthetic-patients-per-part", "2", "--body-parts", "wrist,hand", "--batch-size", "16",
            "--skip-training"]
    quiet = _run(REPO / "pipelines" / "train_all.py", "--output", "run", *args, cwd=tmp_path,
                 env={k: v for k, v in os.environ.items() if k != "FRACRAY_VERBOSE"})
    loud = _run(REPO / "pipelines" / "train_all.py", "--output", tmp_path / "loud", *args, "--verbose")
    assert quiet.returncode == 0 == loud.returncode, quiet.stderr[-2000:] + loud.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "data_stage.json").read_text())
    stream = report["stream"]
    assert stream["rows"] == stream["ok"] + sum(stream["rejected"].values()) > 0
    assert report["model_input_shape"] == [3, 224, 224]
    assert "Every image accounted for" in quiet.stdout and stream["ok"] == stream["rows"]
    assert (tmp_path / "run" / "index" / "contact_sheet.png").exists()
    manifest = pq.read_table(tmp_path / "run" / "index" / "manifest.parquet")
    assert all(u.startswith(str(tmp_path)) for u in manifest["image_uri"].to_pylist())
    assert set(manifest["body_part"].to_pylist()) == {"wrist", "hand"}  # --body-parts reached the data
    quiet_console, loud_console = quiet.stdout + quiet.stderr, loud.stdout + loud.stderr
    assert "Every image accounted for" in loud_console
    assert "Ray's own logs:" in quiet_console and "--verbose shows them" in quiet_console
    ray_info = ("INFO worker.py", "streaming_executor", "Execution plan of Dataset")
    assert not [line for line in quiet_console.splitlines() if any(m in line for m in ray_info)], quiet_console
    assert any(m in loud_console for m in ray_info), loud_console[-3000:]


def test_train_all_reads_a_yaml_config(tmp_path, fracatlas_root, ray_local):
    config = tmp_path / "job.yaml"
    config.write_text(f"dataset: fracatlas\ndata: {fracatlas_root}\nimage-size: 128\nbatch_size: 8\n"
                      f"output: {tmp_path / 'run'}\nskip_training: true\n")
    # On the session's Ray, as on a cluster (the data-stage test above runs it on a Ray of its own).
    env = joining_session_ray(ray_local)
    out = _run(REPO / "pipelines" / "train_all.py", "--config", config, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "data_stage.json").read_text())
    assert report["model_input_shape"] == [3, 128, 128]
    assert report["stream"] == {"rows": 60, "ok": 58, "rejected": {"truncated": 2}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    out = _run(REPO / "pipelines" / "train_all.py", "--config", bad)
    assert out.returncode == 2 and "unknown keys" in out.stderr


def test_benchmark_prints_side_by_side_ratios(tmp_path, fracatlas_root):
    out = _run(REPO / "pipelines" / "bench_preprocess.py", "--data", f"synthetic={fracatlas_root / 'FracAtlas' / 'images'}",
               "--min-seconds", "0.2", "--ray-seconds", "1", "--json", tmp_path / "bench.json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| b/a |" in out.stdout and "d/(b x cores)" in out.stdout and "Machine:" in out.stdout
    result = json.loads((tmp_path / "bench.json").read_text())[0]
    assert result["images"] == 58  # the 2 truncated files are rejected, not timed
    assert result["bare_decode"] > 0 and result["full_path"] > 0 and result["ray_pipeline"] > 0
    assert result["ratios"]["b/a"] == pytest.approx(result["full_path"] / result["bare_decode"])
