"""Review benchmark: the review app's queries on a large scoring output, beside pandas.

It writes a synthetic scoring output in the schema ``score_archive`` writes
(``scoring.archive.IMAGE_RESULT_SCHEMA``: part files of ``--rows-per-part`` rows, 256 as
``fracray score`` cuts large archives, plus ``studies.parquet`` and ``summary.json``), 1,000,000
image rows by default, then measures, each method in a fresh Python process (so its peak RSS is
its own, and nothing is cached between methods):

- ``worklist``: ``review.worklist.open_run`` (one DuckDB pass over the part files, a table of
  studies) and its first page (50 studies, flagged first, then by probability), then a filtered
  page (one body part, a month of study dates, flagged only);
- ``monitoring``: ``review.monitoring.monitoring_report`` (one pyarrow.dataset pass, every grouping
  and the drift statistic);
- ``pandas``: what a script does without them: ``pd.read_parquet`` of the whole images/ folder,
  the studies by ``groupby`` (the mean probability and threshold per study, MURA's rule), sorted
  for the same first page, then the same filtered page from the frame in memory.

Each method runs ``--repeats`` times, interleaved; the table gives the median and the spread
(min-max), and the ratios pandas / review app.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..artifacts.shipped import shipped_model_index
from ..scoring.archive import IMAGE_RESULT_SCHEMA, STUDY_RESULT_SCHEMA
from .preprocess import machine_description

__all__ = ["write_synthetic_run", "run", "format_table", "main", "METHODS"]

METHODS = ("worklist", "monitoring", "pandas")
BODY_PARTS = ("hand", "leg", "hip", "shoulder", "wrist", "elbow", "forearm")
EQUIPMENT = (("ACME Medical", "DR-100"), ("ACME Medical", "DR-200"), ("Radiant", "CR Plus"), ("Northlight", "DX-9"))
FIRST_DAY = _dt.date(2026, 1, 1)
DAYS = 365
# The filtered page: one body part, one month of study dates, flagged studies only.
FILTER = {"body_part": "wrist", "date_from": "2026-03-01", "date_to": "2026-03-31", "label": "flagged"}
_CLASSIFIER = "fracture_all:efficientnet_lite0@2026-12-04T23:02:55+00:00"


def _probabilities(rng: np.random.Generator, n: int) -> np.ndarray:
    """Like the shipped model on FracAtlas: most images near 0, a fifth spread high."""
    fractured = rng.random(n) < 0.2
    return np.where(fractured, rng.beta(2.0, 1.5, n), rng.beta(0.6, 12.0, n)).clip(1e-4, 1 - 1e-4)


def _findings(rng: np.random.Generator, flagged: np.ndarray, valid: np.ndarray) -> pa.Array:
    counts = np.where(flagged, rng.integers(1, 3, flagged.size), 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    total = int(offsets[-1])
    x0, y0 = rng.integers(0, 1500, total), rng.integers(0, 1800, total)
    w, h = rng.integers(40, 300, total), rng.integers(40, 300, total)
    struct_type = IMAGE_RESULT_SCHEMA.field("findings").type.value_type
    fields = {"x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h, "score": rng.uniform(0.3, 0.99, total),
              "peak_x": x0 + w // 2, "peak_y": y0 + h // 2}
    values = pa.StructArray.from_arrays([pa.array(fields[f.name]).cast(f.type) for f in struct_type],
                                        fields=list(struct_type))
    mask = pa.array(~valid)
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask).cast(IMAGE_RESULT_SCHEMA.field("findings").type)


def _chunk(rng: np.random.Generator, start: int, n: int, chunk_id: int, models_threshold: float) -> pa.Table:
    idx = np.arange(start, start + n)
    study = idx // 3                      # 3 images a study
    day = (study * 7919) % DAYS           # a study's images share its date
    status = np.full(n, "ok", dtype=object)
    r = rng.random(n)
    status[r < 0.004] = "truncated"
    status[(r >= 0.004) & (r < 0.008)] = "decode_error"
    status[(r >= 0.008) & (r < 0.013)] = "out_of_scope"
    ok = status == "ok"
    p = _probabilities(rng, n)
    label = np.where(ok, (p >= models_threshold).astype(np.int8), -1).astype(np.int8)
    part = np.asarray(BODY_PARTS, dtype=object)[study % len(BODY_PARTS)]
    maker = study % len(EQUIPMENT)
    columns: dict[str, Any] = {
        "image_uri": pa.array([f"/archive/2026/patient{s:07d}/study1/image{i % 3}.dcm" for s, i in zip(study, idx)]),
        "study_id": pa.array([f"patient{s:07d}/study1" for s in study]),
        "status": pa.array(status, pa.string()),
        "error": pa.array(np.where(ok, None, "synthetic reject").tolist(), pa.string()),
        "body_part": pa.array(np.where(ok, part, None).tolist(), pa.string()),
        "body_part_probability": pa.array(np.where(ok, rng.uniform(0.6, 1.0, n), np.nan), from_pandas=True),
        "fracture_probability": pa.array(np.where(ok, p, np.nan), from_pandas=True),
        "label": pa.array(label),
        "threshold": pa.array(np.where(ok, models_threshold, np.nan), from_pandas=True),
        "classifier": pa.array(np.where(ok, _CLASSIFIER, None).tolist(), pa.string()),
        "router": pa.nulls(n, pa.string()),
        "engine": pa.array(np.where(ok, "onnxruntime-float32", None).tolist(), pa.string()),
        "width": pa.array(np.full(n, 1600, np.int32)), "height": pa.array(np.full(n, 2000, np.int32)),
        "sop_instance_uid": pa.array([f"1.2.826.0.1.3680043.10.1.{i}" for i in idx]),
        "study_date": pa.array([FIRST_DAY + _dt.timedelta(days=int(d)) for d in day], pa.date32()),
        "manufacturer": pa.array([EQUIPMENT[m][0] for m in maker]),
        "manufacturer_model": pa.array([EQUIPMENT[m][1] for m in maker]),
        "findings": _findings(rng, label == 1, ok),
        "layout_body_part": pa.nulls(n, pa.string()),
        "known_label": pa.array(np.full(n, -1, np.int8)),
        "chunk_id": pa.array(np.full(n, chunk_id, np.int64)),
    }
    return pa.table([columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
                     for f in IMAGE_RESULT_SCHEMA], schema=IMAGE_RESULT_SCHEMA)


def _studies(output: str) -> pa.Table:
    images = pq.read_table(os.path.join(output, "images"),
                           columns=["study_id", "status", "body_part", "fracture_probability", "threshold", "label"])
    ok = images.filter(pc.equal(images["status"], "ok"))
    counts = images.group_by("study_id").aggregate([([], "count_all")])
    agg = ok.group_by("study_id", use_threads=False).aggregate([
        ("fracture_probability", "mean"), ("fracture_probability", "max"), ("threshold", "mean"), ("body_part", "first"), ([], "count_all"), ("label", "sum")])
    agg = agg.join(counts.rename_columns(["study_id", "images"]), "study_id").sort_by("study_id")
    mean, thr = agg["fracture_probability_mean"], agg["threshold_mean"]
    return pa.table({
        "study_id": agg["study_id"], "images": agg["images"], "scored": agg["count_all"],
        "body_part": agg["body_part_first"], "fracture_probability": mean,
        "max_image_probability": agg["fracture_probability_max"], "threshold": thr,
        "label": pc.cast(pc.greater_equal(mean, thr), pa.int8()), "abnormal_images": agg["label_sum"].cast(pa.int64()),
        "known_label": pa.array(np.full(agg.num_rows, -1, np.int8)),
    }).cast(STUDY_RESULT_SCHEMA)


def write_synthetic_run(output: str, rows: int = 1_000_000, rows_per_part: int = 256, seed: int = 0,
                        models: str | None = None) -> dict[str, Any]:
    """A scoring output of ``rows`` image rows under ``output`` (part files, studies.parquet,
    summary.json naming ``models``, default the shipped model index). Returns its summary."""
    rng = np.random.default_rng(seed)
    models = models or shipped_model_index() or ""
    threshold = 0.229384
    folder = os.path.join(output, "images")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.join(output, "_work"), exist_ok=True)
    started = time.perf_counter()
    block = max(rows_per_part, (131_072 // rows_per_part) * rows_per_part)  # generate in blocks, write per chunk
    chunk = 0
    for start in range(0, rows, block):
        table = _chunk(rng, start, min(block, rows - start), 0, threshold)
        for offset in range(0, table.num_rows, rows_per_part):
            part = table.slice(offset, rows_per_part)
            part = part.set_column(part.schema.get_field_index("chunk_id"), "chunk_id",
                                   pa.array(np.full(part.num_rows, chunk, np.int64)))
            pq.write_table(part, os.path.join(folder, f"part-{chunk:06d}.parquet"))
            chunk += 1
    pq.write_table(_chunk(rng, 0, 0, -1, threshold), os.path.join(folder, "part-rejects.parquet"))
    studies = _studies(output)
    pq.write_table(studies, os.path.join(output, "studies.parquet"))
    statuses = pc.value_counts(pq.read_table(folder, columns=["status"])["status"]).to_pylist()
    counts = {d["values"]: d["counts"] for d in statuses}
    summary = {"input": "synthetic", "models": models, "output": output, "layout": "tree", "inputs": rows,
               "scored": counts.get("ok", 0), "rejected": {k: v for k, v in counts.items() if k != "ok"},
               "studies": studies.num_rows, "flagged_images": None,
               "flagged_studies": int(pc.sum(studies["label"]).as_py()), "scored_this_run": rows,
               "seconds_this_run": 0.0, "images_per_second_this_run": None, "resumed": False, "duplicates_dropped": 0,
               "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output, "_work", "run.json"), "w") as f:
        json.dump({"format": "fracray-score-run/1", "input": "synthetic", "models": models, "images": rows,
                   "chunks": chunk, "effective_chunk_size": rows_per_part}, f)
    return summary | {"parts": chunk, "seconds_to_write": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- the methods (one process each)

# Each method runs as its own ``python -c`` program that imports only what it uses, so its peak
# RSS is the method's (``import_rss_mb``: the same process right after its imports).
_CHILD = """
import json, sys, time
def rss():  # this process's peak resident set (VmHWM: reset by exec, unlike getrusage's ru_maxrss)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0
{imports}
run_dir, FILTER = sys.argv[1], json.loads(sys.argv[2])
out = {{"import_rss_mb": rss()}}
{body}
out["peak_rss_mb"] = rss()
print(json.dumps(out, default=str))
"""

_METHODS = {
    "worklist": ("from fracray.review.worklist import WorklistQuery, open_run", """
start = time.perf_counter()
opened = open_run(run_dir)
first = opened.worklist(WorklistQuery())
out["first_page_s"] = time.perf_counter() - start
mid = time.perf_counter()
filtered = opened.worklist(WorklistQuery(**FILTER))
out["filtered_page_s"] = time.perf_counter() - mid
out.update(first_rows=len(first["studies"]), filtered_total=filtered["total"],
           top=[s["study_id"] for s in first["studies"][:3]])
"""),
    "monitoring": ("from fracray.review.monitoring import monitoring_report", """
start = time.perf_counter()
report = monitoring_report(run_dir)
out["report_s"] = time.perf_counter() - start
out.update(groups={k: len(g.groups) for k, g in report.groupings.items()}, drift=report.drift["status"],
           images=report.overall.images)
"""),
    # What a script does without the review app: the whole images/ folder into pandas, the
    # studies by groupby (MURA's rule: mean probability, mean threshold), sorted.
    "pandas": ("import os\nimport pandas as pd", """
start = time.perf_counter()
frame = pd.read_parquet(os.path.join(run_dir, "images"))
ok = frame[frame["status"] == "ok"]
studies = ok.groupby("study_id").agg(probability=("fracture_probability", "mean"), threshold=("threshold", "mean"),
                                     body_part=("body_part", "first"), study_date=("study_date", "min"))
studies["flagged"] = studies["probability"] >= studies["threshold"]
first = studies.sort_values(["flagged", "probability"], ascending=False).head(50)
out["first_page_s"] = time.perf_counter() - start
mid = time.perf_counter()
dates = pd.to_datetime(studies["study_date"])
mask = ((studies["body_part"] == FILTER["body_part"]) & studies["flagged"]
        & (dates >= pd.Timestamp(FILTER["date_from"])) & (dates <= pd.Timestamp(FILTER["date_to"])))
filtered = studies[mask].sort_values("probability", ascending=False)
page = filtered.head(50)
out["filtered_page_s"] = time.perf_counter() - mid
out.update(first_rows=len(first), filtered_total=int(len(filtered)), top=list(first.index[:3]))
"""),
}


def _measure(method: str, run_dir: str) -> dict[str, Any]:
    started = time.perf_counter()
    imports, body = _METHODS[method]
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(imports=imports, body=body), run_dir,
                           json.dumps(FILTER)], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip()[-500:], "process_s": wall}
    return json.loads(lines[-1]) | {"process_s": wall}


def run(*, rows: int = 1_000_000, rows_per_part: int = 256, repeats: int = 3, workdir: str | None = None,
        log=print) -> dict[str, Any]:
    workdir = workdir or tempfile.mkdtemp(prefix="fracray-bench-review-")
    run_dir = os.path.join(workdir, "run")
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        log(f"Writing a {rows:,}-row scoring output in {run_dir} ({rows_per_part} rows per part file) ...")
        written = write_synthetic_run(run_dir, rows=rows, rows_per_part=rows_per_part)
        log(f"  {written['parts']} part files, {written['studies']:,} studies, {written['seconds_to_write']} s")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(run_dir) for f in fs)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for r in range(repeats):
        for method in METHODS:  # interleaved, so drift of the machine's load spreads over all
            out = _measure(method, run_dir)
            results[method].append(out)
            log(f"  repeat {r + 1} {method}: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()
                                                          if k.endswith("_s") or k == "peak_rss_mb")
                + (f" ERROR {out['error']}" if "error" in out else ""))
    return {"rows": rows, "rows_per_part": rows_per_part, "bytes_on_disk": size, "repeats": repeats,
            "machine": machine_description(), "filter": FILTER, "results": results,
            "date": _dt.date.today().isoformat()}


def _spread(values: list[float]) -> tuple[float, float, float] | None:
    values = [v for v in values if v is not None]
    return (statistics.median(values), min(values), max(values)) if values else None


def format_table(result: dict[str, Any]) -> str:
    res = result["results"]

    def cell(method: str, key: str, unit: str = "s") -> str:
        s = _spread([r.get(key) for r in res[method] if "error" not in r])
        if s is None:
            return "-"
        if unit == "s" and s[2] < 1.0:  # sub-second: in milliseconds
            return f"{1000 * s[0]:.0f} ms ({1000 * s[1]:.0f}-{1000 * s[2]:.0f})"
        return f"{s[0]:.2f} {unit} ({s[1]:.2f}-{s[2]:.2f})" if unit == "s" else f"{s[0]:.0f} {unit} ({s[1]:.0f}-{s[2]:.0f})"

    def ratio(key: str) -> str:
        a = _spread([r.get(key) for r in res["pandas"] if "error" not in r])
        b = _spread([r.get(key) for r in res["worklist"] if "error" not in r])
        return "-" if not a or not b or not b[0] else f"{a[0] / b[0]:.1f}x"

    lines = [f"{result['rows']:,} image rows in part files of {result['rows_per_part']} "
             f"({result['bytes_on_disk'] / 2**20:.0f} MiB); {result['machine']}; median (min-max) of "
             f"{result['repeats']} runs, each method in its own process",
             "",
             "| measure | review app | pandas (read all, groupby, sort) | pandas / review app |",
             "|---|---|---|---|",
             f"| first worklist page (open + top 50 studies) | {cell('worklist', 'first_page_s')} | "
             f"{cell('pandas', 'first_page_s')} | {ratio('first_page_s')} |",
             f"| filtered page (body part + month + flagged), run open | {cell('worklist', 'filtered_page_s')} | "
             f"{cell('pandas', 'filtered_page_s')} | {ratio('filtered_page_s')} |",
             f"| peak RSS of the process | {cell('worklist', 'peak_rss_mb', 'MiB')} | "
             f"{cell('pandas', 'peak_rss_mb', 'MiB')} | {ratio('peak_rss_mb')} |",
             f"| RSS right after the imports | {cell('worklist', 'import_rss_mb', 'MiB')} | "
             f"{cell('pandas', 'import_rss_mb', 'MiB')} | |",
             f"| monitoring report (all groupings, drift) | {cell('monitoring', 'report_s')}, peak RSS "
             f"{cell('monitoring', 'peak_rss_mb', 'MiB')} | | |"]
    errors = {m: r["error"] for m in res for r in res[m] if "error" in r}
    for method, error in errors.items():
        lines.append(f"\n{method} failed: {error}")
    same = {tuple(r.get("top", [])) for m in ("worklist", "pandas") for r in res[m] if "error" not in r}
    if len(same) > 1:
        lines.append("\nnote: the review app's and pandas's first pages differ at the top: " + str(sorted(same)))
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = "bench_review.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="The review app's first worklist page, a filtered page and the monitoring report on "
                               "a generated scoring output (1,000,000 rows by default), with each process's peak "
                               "memory, beside reading the whole Parquet with pandas; repeated, with the spread.")
    parser.add_argument("--rows", type=int, default=1_000_000, help="image rows to generate (default: %(default)s)")
    parser.add_argument("--rows-per-part", type=int, default=256,
                        help="rows per part file (default: %(default)s, as fracray score cuts a large archive)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="where the output is generated (reused if already there)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rows_per_part < 1 or args.repeats < 1:
        parser.error("--rows, --rows-per-part and --repeats must be >= 1")
    result = run(rows=args.rows, rows_per_part=args.rows_per_part, repeats=args.repeats, workdir=args.workdir)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0

