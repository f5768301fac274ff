"""The scoring and serving benchmarks at toy sizes: every row they print is measured, on the
engine it names (numbers are not asserted: timings do not belong in tests)."""

import json
import math
import os

import pytest


@pytest.mark.slow
def test_bench_scoring_compares_score_archive_with_the_eager_loop(ray_local):
    from fracray.benchmarks import scoring

    result = scoring.run(model="efficientnet_lite0", images=24, image_size=(256, 208), log=lambda *_: None)
    assert result["baseline_engine"] == "torch-float32"
    assert result["default_engine"] == "onnxruntime-float32"
    assert result["score_archive_engines"] == ["onnxruntime-float32"]  # the actors ran the default engine
    for key in ("plain_loop_images_per_s", "plain_loop_batched_images_per_s", "plain_loop_engine_images_per_s",
                "score_archive_images_per_s"):
        assert result[key] > 0 and math.isfinite(result[key]), key
    table = scoring.format_table(result)
    assert "| plain loop, 1 image per call (baseline) | torch-float32 |" in table
    assert "target >= 3.0" in table and "target >= 2.5" in table


@pytest.mark.slow
def test_bench_serving_compares_the_engine_service_with_eager(ray_local):
    from fracray.benchmarks import serving

    result = serving.run(model="efficientnet_lite0", clients=(1, 2), requests_per_client=2, image_size=(256, 208),
                         batch_size=4, min_requests=3, in_process_requests=8, log=lambda *_: None)
    assert result["in_process"]["engine"] == "torch-float32"
    assert result["in_process_engine"]["engine"] == "onnxruntime-float32"
    engines = {label: {row["engine"] for row in rows} for label, rows in result["http"].items()}
    # engine="torch" reached the eager service's replicas; the others ran the default engine.
    assert engines == {"eager_batched": {"torch-float32"}, "unbatched": {"onnxruntime-float32"},
                       "batched": {"onnxruntime-float32"}, "fused": {"onnxruntime-float32"}}
    assert {row["layout"] for row in result["http"]["fused"]} == {"fused"}  # the layout reached the app
    assert all(row["errors"] == 0 for rows in result["http"].values() for row in rows)
    # --min-requests and --requests-per-client reach each row: max(2 x clients, 3) requests.
    assert [row["requests"] for row in result["http"]["batched"]] == [3, 4]
    table = serving.format_table(result)
    assert "as before the engine" in table and "target >= 2" in table and "fused layout" in table


def test_bench_engine_times_eager_exact_and_fast_side_by_side(tmp_path):
    from fracray.benchmarks import engine

    result = engine.run(models=["efficientnet_lite0"], sizes=[64], runs=2, warmup=1, cache_dir=str(tmp_path),
                        log=lambda *_: None)
    engines = [row["engine"] for row in result["rows"]]
    assert engines[:2] == ["eager torch", "onnxruntime exact"] and engines[2].startswith("openvino fast (")
    assert engines[3] == "openvino fast (int8)"  # the quantised graph, as validate-fast-mode makes it
    assert all(row["ms_median"] > 0 and math.isfinite(row["gflops"]) for row in result["rows"])
    assert result["rows"][0]["speedup_vs_eager"] == 1.0 and result["openvino"]
    table = engine.format_table(result)
    assert "openvino fast" in table and "matmul peak" in table
    without = engine.run(models=["efficientnet_lite0"], sizes=[64], runs=1, warmup=0, cache_dir=str(tmp_path),
                         fast=False, log=lambda *_: None)  # --no-fast
    assert [row["engine"] for row in without["rows"]] == ["eager torch", "onnxruntime exact"]


def test_bench_engine_threading_measures_one_thread_per_cpu_against_oversubscription(tmp_path, capsys):
    from fracray.benchmarks import engine

    # --threading SECONDS reaches the run: the table in its output and the rows in its JSON.
    assert engine.main(["--sizes", "64", "--runs", "1", "--warmup", "0", "--no-fast", "--threading", "0.5",
                        "--cache-dir", str(tmp_path), "--json", str(tmp_path / "with.json")]) == 0
    out = capsys.readouterr().out
    assert "Threading: efficientnet_lite0 at 64" in out and "oversubscribed" in out
    rows = json.loads((tmp_path / "with.json").read_text())["threading"]
    cpus = os.cpu_count()
    assert [(r["processes"], r["threads_per_process"]) for r in rows] == [(cpus, 1), (cpus, cpus), (1, cpus)]
    assert rows[0]["vs_engine"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
    # 0 (the default) leaves it out.
    assert engine.main(["--sizes", "64", "--runs", "1", "--warmup", "0", "--no-fast",
                        "--cache-dir", str(tmp_path), "--json", str(tmp_path / "without.json")]) == 0
    assert "Threading:" not in capsys.readouterr().out
    assert json.loads((tmp_path / "without.json").read_text())["threading"] is None


def test_bench_engine_refuses_an_unknown_model_with_the_registered_ones(capsys):
    from fracray.benchmarks import engine

    with pytest.raises(SystemExit) as exc:
        engine.main(["--models", "efficientnet_lite0,nope"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown models ['nope']; registered: [" in err and "efficientnet_lite0" in err
