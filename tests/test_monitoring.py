"""The monitoring report (fracray.review.monitoring, `fracray monitor`): drift against the model's
validation distribution, rates by group, concordance with reviewers, on scoring outputs written
with pyarrow in the schema score_archive writes. No Ray, no model: a few seconds."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from fracray.artifacts.index import validation_distribution_file
from fracray.cli.monitor import ALARM_EXIT, main as monitor_main
from fracray.metrics import drift
from fracray.metrics.classification import wilson_interval
from fracray.review.feedback import FeedbackRecord
from fracray.review.monitoring import MonitoringError, monitoring_report
from fracray.scoring.archive import IMAGE_RESULT_SCHEMA, STUDY_RESULT_SCHEMA

SHIPPED_INDEX = REPO / "models" / "fracatlas" / "model_index.json"
NEW_COLUMNS = ("study_date", "manufacturer", "manufacturer_model", "scored_at")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(Path(validation_distribution_file(str(SHIPPED_INDEX))).read_text())


def from_reference(reference: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """P(fracture) drawn from the validation distribution itself: a PSI bin by its validation
    share, then uniform inside it."""
    edges, counts = np.asarray(reference["psi_edges"]), np.asarray(reference["overall"]["psi_counts"], float)
    bins = rng.choice(len(counts), size=n, p=counts / counts.sum())
    return rng.uniform(edges[bins], edges[bins + 1])


def write_run(root: Path, probs, *, status=None, body_part=None, dates=None, maker=None, model=None,
              drop=(), parts: int = 3, models: str | None = str(SHIPPED_INDEX), threshold: float = 0.23) -> Path:
    """A scoring output, one image per study (study i = image i), in ``parts`` part files."""
    n = len(probs)
    status = list(status) if status is not None else ["ok"] * n
    probs = [None if s != "ok" else float(p) for p, s in zip(probs, status)]
    labels = [-1 if p is None else int(p >= threshold) for p in probs]
    columns = {
        "image_uri": [f"/archive/s{i:05d}/image0.dcm" for i in range(n)],
        "study_id": [f"s{i:05d}" for i in range(n)], "status": status,
        "error": [None if s == "ok" else "reason" for s in status],
        "body_part": list(body_part) if body_part is not None else ["all"] * n,
        "fracture_probability": probs, "label": labels,
        "threshold": [None if p is None else threshold for p in probs],
        "study_date": list(dates) if dates is not None else [None] * n,
        "manufacturer": list(maker) if maker is not None else [None] * n,
        "manufacturer_model": list(model) if model is not None else [None] * n,
        "scored_at": [dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc)] * n,
        "known_label": [-1] * n,
    }
    fields = [f for f in IMAGE_RESULT_SCHEMA if f.name not in drop]
    table = pa.table({f.name: pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
                      for f in fields}, schema=pa.schema(fields))
    run = root / "run"
    (run / "images").mkdir(parents=True)
    for k, idx in enumerate(np.array_split(np.arange(n), parts)):
        pq.write_table(table.take(pa.array(idx, pa.int64())), run / "images" / f"part-{k:06d}.parquet")
    studies = pa.table({"study_id": columns["study_id"], "images": [1] * n, "scored": [int(s == "ok") for s in status],
                        "body_part": columns["body_part"], "fracture_probability": probs, "max_image_probability": probs,
                        "threshold": columns["threshold"], "label": labels, "abnormal_images": [max(v, 0) for v in labels],
                        "known_label": [-1] * n}).cast(STUDY_RESULT_SCHEMA)
    pq.write_table(studies, run / "studies.parquet")
    (run / "summary.json").write_text(json.dumps({"models": models, "inputs": n}))
    return run


def record(study: str, verdict: str, *, image: str | None = None, finding: int | None = None, box=None,
           reviewer: str = "dr a", minute: int = 0) -> FeedbackRecord:
    return FeedbackRecord(study, image, finding, verdict, box, reviewer,
                          dt.datetime(2026, 12, 2, 9, minute, tzinfo=dt.timezone.utc))


# ---------------------------------------------------------------- the statistic


def test_psi_and_wilson_by_hand():
    # sum (a - e) ln(a / e), every count + 0.5: e = 50.5 / 101 each, a = 25.5 / 101 and 75.5 / 101
    e, a1, a2 = 0.5, 25.5 / 101, 75.5 / 101
    assert drift.psi([50, 50], [25, 75]) == pytest.approx((a1 - e) * math.log(a1 / e) + (a2 - e) * math.log(a2 / e))
    assert drift.psi([50, 50], [25, 75]) == pytest.approx(0.2687, abs=1e-4)
    assert drift.psi([100, 0], [0, 100]) == pytest.approx(2 * (100 / 101) * math.log(100.5 / 0.5), rel=1e-6)
    assert drift.psi([10, 10], [7, 7]) == 0.0
    assert drift.psi([10, 10], [0, 0]) is None
    assert drift.drift_level(0.25, 500) == "alarm" and drift.drift_level(0.15, 500) == "warn"
    assert drift.drift_level(0.05, 500) == "ok" and drift.drift_level(0.9, 199) == "insufficient"
    assert drift.drift_level(0.9, 250, noise_floor=0.11) == "insufficient"  # a small reference: chance alone
    assert drift.psi_noise_floor(10, 200, 428) == pytest.approx(9 * (1 / 200 + 1 / 428))
    low, high = wilson_interval(8, 10)  # p = 0.8, z = 1.96
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) is None


def test_shipped_model_has_its_validation_distribution(reference):
    assert drift.check_validation_distribution(reference) is reference
    assert reference["overall"]["n"] == 428  # FracAtlas valid, the 428 decodable images
    assert sum(reference["overall"]["psi_counts"]) == 428 == sum(reference["overall"]["histogram_counts"])
    assert len(reference["psi_edges"]) == drift.PSI_BINS + 1
    assert max(reference["overall"]["psi_counts"]) - min(reference["overall"]["psi_counts"]) <= 2  # deciles
    assert {"hand", "leg", "hip", "shoulder"} <= set(reference["per_body_part"])
    assert reference["source"]["split"] == "valid" and reference["source"]["dataset"] == "fracatlas"


def test_validation_distribution_from_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.beta(0.5, 3, 1000)
    doc = drift.validation_distribution(probs, ["hand"] * 400 + ["leg"] * 600, source={"split": "valid"})
    assert doc["overall"]["psi_counts"] == [100] * 10
    assert doc["per_body_part"]["hand"]["n"] == 400 and sum(doc["per_body_part"]["leg"]["psi_counts"]) == 600
    with pytest.raises(ValueError, match="not a fracray-validation-distribution"):
        drift.check_validation_distribution({"format": "something else"})


def test_evaluate_writes_the_validation_distribution_of_its_predictions():
    from fracray.jobs.evaluate import EvaluateConfig, evaluation_distribution

    preds = {"image_uri": ["a", "b", "c", "d"], "status": ["ok", "ok", "truncated", "ok"],
             "fracture_probability": [0.1, 0.9, None, 0.5], "true_body_part": ["hand", "leg", "leg", "hand"],
             "engine": ["onnxruntime-float32"] * 3 + [""]}
    doc = evaluation_distribution(preds, EvaluateConfig(models="m/model_index.json", dataset="fracatlas", data="d"))
    assert doc["overall"]["n"] == 3 and doc["source"]["scored"] == 3 and doc["source"]["split"] == "valid"
    assert {k: v["n"] for k, v in doc["per_body_part"].items()} == {"hand": 2, "leg": 1}


# ---------------------------------------------------------------- drift in a run


def test_no_drift_on_the_validation_distribution(tmp_path, reference):
    rng = np.random.default_rng(1)
    report = monitoring_report(str(write_run(tmp_path, from_reference(reference, 3000, rng))))
    assert report.drift["available"] and report.drift["reference"].endswith("validation_distribution.json")
    assert report.overall.scored == 3000 and report.overall.psi < drift.PSI_WARN
    assert report.overall.psi_level == "ok" and report.drift["status"] == "ok" and report.alarms == []


def test_known_drift_raises_the_alarm_for_its_day_only(tmp_path, reference):
    rng = np.random.default_rng(2)
    same = from_reference(reference, 1000, rng)
    shifted = np.clip(from_reference(reference, 1000, rng) + 0.25, 0, 0.999)  # a scanner that reads high
    few = from_reference(reference, 60, rng) + 0.5
    dates = [dt.date(2026, 11, 1)] * 1000 + [dt.date(2026, 11, 2)] * 1000 + [dt.date(2026, 11, 3)] * 60
    report = monitoring_report(str(write_run(tmp_path, np.r_[same, shifted, np.clip(few, 0, 0.999)], dates=dates)))
    day = {g.key: g for g in report.groupings["day"].groups}
    assert report.groupings["day"].source.startswith("study_date")
    assert day["2026-11-01"].psi_level == "ok"
    assert day["2026-11-02"].psi >= drift.PSI_ALARM and day["2026-11-02"].psi_level == "alarm"
    assert day["2026-11-03"].psi_level == "insufficient"  # 60 images: no verdict, however far off
    assert {("day", "2026-11-02")} <= {(a["grouping"], a["group"]) for a in report.alarms}
    assert ("day", "2026-11-01") not in {(a["grouping"], a["group"]) for a in report.alarms}
    assert report.drift["status"] == "alarm"
    assert json.loads(report.to_json())["alarms"]


def test_rates_by_body_part_and_equipment(tmp_path, reference):
    rng = np.random.default_rng(3)
    n = 400
    status = ["ok"] * n
    for i in range(0, 40):
        status[i] = "truncated"          # hand: 40 rejects
    for i in range(40, 60):
        status[i] = "out_of_scope"       # hand: 20 out of scope
    part = ["hand"] * 200 + ["leg"] * 200
    maker = ["ACME"] * 100 + [None] * 100 + ["Radiant"] * 200
    model = ["DR-1"] * 100 + [None] * 100 + [None] * 200
    probs = from_reference(reference, n, rng)
    report = monitoring_report(str(write_run(tmp_path, probs, status=status, body_part=part, maker=maker,
                                             model=model)))
    parts = {g.key: g for g in report.groupings["body_part"].groups}
    hand, leg = parts["hand"], parts["leg"]
    assert (hand.images, hand.scored, hand.rejected, hand.out_of_scope) == (200, 140, 40, 20)
    assert hand.reject_rate == pytest.approx(0.2) and hand.out_of_scope_rate == pytest.approx(0.1)
    assert hand.rejects_by_reason == {"truncated": 40}
    assert leg.reject_rate == 0 and leg.out_of_scope_rate == 0
    ok = np.asarray(status) == "ok"
    expected_positive = int(np.sum(probs[200:] >= 0.23))
    assert leg.positive == expected_positive and leg.positive_rate == pytest.approx(expected_positive / 200)
    assert hand.psi_reference == "validation: hand"  # its own body part's validation counts (135 images)
    assert sum(hand.histogram) == 140 and sum(report.overall.histogram) == int(ok.sum())
    equipment = {g.key: g.images for g in report.groupings["equipment"].groups}
    assert equipment == {"ACME / DR-1": 100, "unknown": 100, "Radiant / ?": 200}
    assert report.overall.out_of_scope == 20 and report.overall.rejected == 40


def test_missing_columns_make_groupings_unavailable_not_errors(tmp_path, reference):
    run = write_run(tmp_path, from_reference(reference, 300, np.random.default_rng(4)), drop=NEW_COLUMNS)
    report = monitoring_report(str(run))
    assert not report.groupings["equipment"].available
    assert "no manufacturer" in report.groupings["equipment"].note
    day = report.groupings["day"]
    assert day.available and day.source.startswith("scoring date") and "no DICOM StudyDate" in day.note
    assert [g.key for g in day.groups] == [dt.datetime.now(dt.timezone.utc).date().isoformat()]  # the files' time
    assert any("StudyDate" in note for note in report.notes)
    # Columns present but empty (a JPEG archive): equipment unavailable too, days by scored_at
    report = monitoring_report(str(write_run(tmp_path / "jpeg", [0.1] * 10)))
    assert not report.groupings["equipment"].available and "no image of the run" in report.groupings["equipment"].note
    assert [g.key for g in report.groupings["day"].groups] == ["2026-12-01"]


def test_without_a_validation_distribution_drift_is_unavailable(tmp_path):
    report = monitoring_report(str(write_run(tmp_path, [0.1, 0.9] * 150, models=str(tmp_path / "elsewhere.json"))))
    assert not report.drift["available"] and report.drift["status"] == "unavailable"
    assert report.overall.psi is None and report.overall.psi_level == "unavailable"
    assert report.overall.scored == 300 and report.alarms == []


def test_corrupt_or_missing_run_gives_a_clear_error(tmp_path, reference):
    run = write_run(tmp_path, from_reference(reference, 90, np.random.default_rng(5)))
    (run / "images" / "part-000001.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(MonitoringError, match="part-000001.parquet|damaged"):
        monitoring_report(str(run))
    (run / "images" / "part-000000.parquet").write_bytes(b"garbage")
    with pytest.raises(MonitoringError, match="part-000000.parquet is not a readable Parquet file"):
        monitoring_report(str(run))
    with pytest.raises(MonitoringError, match="not a scoring output"):
        monitoring_report(str(tmp_path / "nothing"))


# ---------------------------------------------------------------- concordance


def test_concordance_counts_and_intervals(tmp_path):
    # s0, s1, s4 flagged (p >= 0.23); s2, s3, s5 not.
    run = write_run(tmp_path, [0.9, 0.8, 0.05, 0.1, 0.7, 0.02, 0.5], parts=1)
    feedback = [
        record("s00000", "agree"),                                   # flagged, agreed: TP
        record("s00001", "disagree"),                                # flagged, disagreed: FP
        record("s00002", "agree"),                                   # negative, agreed: TN
        record("s00003", "missed", image="/archive/s00003/image0.dcm", box=(1, 1, 5, 5)),  # negative, missed: FN
        record("s00004", "missed", image="/archive/s00004/image0.dcm", box=(1, 1, 5, 5)),  # flagged + missed: TP
        record("s00005", "disagree", minute=1), record("s00005", "agree", reviewer="dr b", minute=2),  # latest: TN
        record("s00006", "disagree", image="/archive/s00006/image0.dcm", finding=0),  # a wrong box only: undecided
        record("s99999", "agree"),                                   # not in this run
    ]
    c = monitoring_report(str(run), feedback).concordance
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (2, 1, 2, 1)
    assert c["reviewed_studies"] == 8 and c["decided_studies"] == 6
    assert c["undecided_studies"] == 1 and c["not_in_run"] == 1 and c["conflicting_studies"] == 1
    assert c["sensitivity"]["value"] == pytest.approx(2 / 3) and c["sensitivity"]["n"] == 3
    assert c["sensitivity"]["ci95"] == pytest.approx(list(wilson_interval(2, 3)))
    assert c["specificity"]["value"] == pytest.approx(2 / 3)
    assert c["ppv"]["value"] == pytest.approx(2 / 3) and c["npv"]["value"] == pytest.approx(2 / 3)
    assert c["findings"] == {"reviewed": 1, "agreed": 0, "precision": {"value": 0.0, "successes": 0, "n": 1,
                                                                        "ci95": [0.0, pytest.approx(0.7935, abs=1e-4)]},
                             "missed_boxes": 2}
    assert "verification bias" in c["note"]


def test_concordance_image_and_finding_verdicts(tmp_path):
    run = write_run(tmp_path, [0.9, 0.05, 0.6], parts=1)
    feedback = [record("s00000", "agree", image="/archive/s00000/image0.dcm", finding=0),  # agreed box: fractured
                record("s00001", "disagree", image="/archive/s00001/image0.dcm"),  # unflagged image is fractured
                record("s00002", "agree", image="/archive/s00002/image0.dcm")]  # flagged image agreed
    c = monitoring_report(str(run), feedback).concordance
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (2, 0, 0, 1)
    assert c["specificity"]["value"] is None and c["specificity"]["ci95"] is None


# ---------------------------------------------------------------- the command


def test_monitor_command_writes_pngs_and_json(tmp_path, reference, capsys):
    rng = np.random.default_rng(6)
    probs = np.r_[from_reference(reference, 300, rng), np.clip(from_reference(reference, 300, rng) + 0.3, 0, 0.99)]
    dates = [dt.date(2026, 11, 1)] * 300 + [dt.date(2026, 11, 2)] * 300
    run = write_run(tmp_path, probs, dates=dates, maker=["ACME"] * 600, model=["DR-1"] * 300 + ["DR-2"] * 300)
    feedback = tmp_path / "feedback.json"
    feedback.write_text(json.dumps([record("s00000", "agree").to_dict(), record("s00001", "disagree").to_dict()]))
    out = tmp_path / "monitoring"
    assert monitor_main([str(run), "--output", str(out), "--feedback", str(feedback)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"report.json", "distribution.png", "day.png", "body_part.png", "equipment.png",
                     "concordance.png"}
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "fracray-monitoring-report/1"
    assert {(a["grouping"], a["group"]) for a in report["alarms"]} >= {("day", "2026-11-02"),
                                                                      ("equipment", "ACME / DR-2")}
    assert report["concordance"]["reviewed_studies"] == 2
    printed = capsys.readouterr().out
    assert "ALARM: day=2026-11-02" in printed and "status ALARM" in printed
    assert monitor_main([str(run), "--fail-on-alarm", "--no-feedback"]) == ALARM_EXIT
    capsys.readouterr()
    csv_file = tmp_path / "feedback.csv"
    csv_file.write_text("study_id,image_id,finding,verdict,box,reviewer,created_at\n"
                        "s00000,,,agree,,dr a,2026-12-02T09:00:00Z\n"
                        "s00001,/archive/s00001/image0.dcm,,missed,\"1,2,30,40\",dr a,2026-12-02T09:01:00+00:00\n")
    assert monitor_main([str(run), "--json", "--feedback", str(csv_file)]) == 0
    assert json.loads(capsys.readouterr().out)["concordance"]["findings"]["missed_boxes"] == 1
    assert monitor_main([str(tmp_path / "nothing")]) == 2
    assert "not a scoring output" in capsys.readouterr().err


def test_review_benchmark_runs_every_method_on_a_generated_run(tmp_path):
    from fracray.benchmarks.review import format_table, run

    result = run(rows=3000, rows_per_part=256, repeats=1, workdir=str(tmp_path), log=lambda line: None)
    assert pq.read_table(tmp_path / "run" / "images").num_rows == 3000
    assert len(list((tmp_path / "run" / "images").glob("part-0*.parquet"))) == 12
    for method in ("worklist", "monitoring", "pandas"):
        assert "error" not in result["results"][method][0], result["results"][method][0]
    worklist, pandas = result["results"]["worklist"][0], result["results"]["pandas"][0]
    assert worklist["first_rows"] == pandas["first_rows"] == 50 and worklist["top"] == pandas["top"]
    assert worklist["filtered_total"] == pandas["filtered_total"] > 0
    assert result["results"]["monitoring"][0]["images"] == 3000
    table = format_table(result)
    assert "| first worklist page" in table and "failed" not in table and "differ" not in table


def test_monitor_reads_the_review_apps_store_whatever_the_runs_spelling(tmp_path, capsys, monkeypatch):
    """The review app stores feedback under the run's absolute URI; `fracray monitor scores/` (a
    relative path, a trailing slash) reads the same rows from the default SQLite store beside it."""
    from fracray.review.feedback import default_store_path, open_store

    run = write_run(tmp_path, [0.9, 0.05, 0.6], parts=1)
    store = open_store(None, str(run))  # as the app opens it: the default store beside the run
    store.add(record("s00000", "agree"))
    store.add(record("s00001", "disagree"))
    store.close()
    assert default_store_path(str(run))
    monkeypatch.chdir(run.parent)
    assert monitor_main([run.name + "/", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["concordance"]["reviewed_studies"] == 2
