"""``fracray monitor``: the monitoring report of a scoring run (``fracray score --output RUN``): by
day, body part and equipment the distribution of P(fracture), the positive rate, rejects and
out-of-scope rate, drift against the model's own validation distribution (PSI; warn 0.1, alarm
0.2) and the concordance with reviewers' feedback. Prints a summary; with --output writes PNGs
and report.json for jobs."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import sys
from typing import Any

from .. import storage
from ..review import feedback as feedback_store
from ..review.feedback import FeedbackRecord
from ..review.monitoring import MonitoringError, MonitoringReport, monitoring_report
from ..review.monitoring_plots import write_report
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["get_args_parser", "main", "read_feedback_file"]

ALARM_EXIT = 3  # --fail-on-alarm: the exit status when a drift alarm fired
_FILE_SUFFIXES = (".json", ".jsonl", ".csv")


def get_args_parser(prog: str = "monitor.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("``: ", 1)[1],
        epilog="Example: monitor.py runs/scores-2025 --output runs/scores-2025/monitoring --fail-on-alarm")
    parser.add_argument("run", help="the scoring output (folder or s3:// prefix that `fracray score --output` wrote)")
    parser.add_argument("--output", default=None, help="folder for report.json and the PNGs (local or s3://)")
    parser.add_argument("--feedback", default=None,
                        help="reviewers' feedback: the review app's store (a SQLite path or postgresql:// URL), or a "
                             ".json / .jsonl / .csv file of FeedbackRecords (study_id, image_id, finding, verdict, box, "
                             "reviewer, created_at). Default: the review app's default store of RUN where it exists")
    parser.add_argument("--no-feedback", action="store_true", help="leave concordance out even where a store exists")
    parser.add_argument("--validation", default=None,
                        help="the validation distribution to measure drift against (default: "
                             "validation_distribution.json beside the run's model index)")
    parser.add_argument("--fail-on-alarm", action="store_true",
                        help=f"exit with status {ALARM_EXIT} when a drift alarm fires (for scheduled jobs)")
    parser.add_argument("--json", action="store_true", help="print report.json instead of the summary")
    add_storage_arguments(parser)
    return parser


def _record(row: dict[str, Any], where: str) -> FeedbackRecord:
    def empty(value) -> bool:
        return value is None or (isinstance(value, str) and not value.strip())

    box = row.get("box")
    if isinstance(box, str):
        box = None if empty(box) else json.loads(box if box.strip().startswith("[") else f"[{box}]")
    created = row.get("created_at")
    if empty(created):
        raise ValueError(f"{where}: created_at is missing")
    if isinstance(created, str):
        created = _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    if created.tzinfo is None:
        created = created.replace(tzinfo=_dt.timezone.utc)
    finding = row.get("finding")
    return FeedbackRecord(study_id=str(row.get("study_id") or ""),
                          image_id=None if empty(row.get("image_id")) else str(row["image_id"]),
                          finding=None if empty(finding) else int(finding), verdict=str(row.get("verdict") or ""),
                          box=None if box is None else tuple(float(v) for v in box),
                          reviewer=str(row.get("reviewer") or ""), created_at=created)


def read_feedback_file(uri: str, options=None) -> list[FeedbackRecord]:
    """FeedbackRecords from a JSON list, JSON lines or CSV file (one record per row/object)."""
    text = storage.read_bytes(uri, options).decode("utf-8")
    if uri.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
    elif uri.endswith(".jsonl"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
        rows = rows.get("feedback", rows) if isinstance(rows, dict) else rows
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(_record(row, f"{uri} record {i + 1}"))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{uri} record {i + 1}: {exc}") from None
    return records


def _feedback(args: argparse.Namespace, options) -> list[FeedbackRecord] | None:
    if args.no_feedback:
        return None
    target = args.feedback
    if target and target.lower().endswith(_FILE_SUFFIXES):
        return read_feedback_file(target, options)
    if target is None:
        if storage.is_remote(args.run) or not storage.exists(feedback_store.default_store_path(args.run)):
            return None  # no review yet: the report leaves concordance out
    return feedback_store.read_feedback(target, args.run)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_text(report: MonitoringReport) -> str:
    o = report.overall
    lines = [f"Monitoring {report.run} (model index {report.models or '?'})",
             f"  images {o.images}, scored {o.scored}, positive rate {_pct(o.positive_rate)}, rejected "
             f"{_pct(o.reject_rate)}, out of scope {_pct(o.out_of_scope_rate)}"]
    d = report.drift
    if d["available"]:
        lines.append(f"  drift (PSI vs {d['reference']}; warn {d['warn']}, alarm {d['alarm']}, min {d['min_images']} "
                     f"images): run {o.psi if o.psi is not None else '-'} ({o.psi_level}); status {d['status'].upper()}")
    else:
        lines.append(f"  drift: unavailable ({d['reference']})")
    for flag in d.get("flags", []):
        lines.append(f"  {'ALARM' if flag['level'] == 'alarm' else 'warn'}: {flag['grouping']}={flag['group']} PSI "
                     f"{flag['psi']:.3f} over {flag['images']} images ({flag['reference']})")
    for name, grouping in report.groupings.items():
        if not grouping.available:
            lines.append(f"  by {name}: unavailable. {grouping.note}")
            continue
        lines.append(f"  by {name} ({grouping.source}): {len(grouping.groups)} groups")
        for g in grouping.groups[:12]:
            psi = "-" if g.psi is None else f"{g.psi:.3f}"
            lines.append(f"    {g.key[:40]:40s} images {g.images:8d}  positive {_pct(g.positive_rate):>6s}  "
                         f"rejected {_pct(g.reject_rate):>6s}  out of scope {_pct(g.out_of_scope_rate):>6s}  "
                         f"PSI {psi} ({g.psi_level})")
        if len(grouping.groups) > 12:
            lines.append(f"    ... {len(grouping.groups) - 12} more in report.json")
    c = report.concordance
    if c is not None:
        def rate(name: str) -> str:
            r = c[name]
            return "-" if r["value"] is None else \
                f"{r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['successes']}/{r['n']})"
        lines += [f"  concordance ({c['decided_studies']} decided of {c['reviewed_studies']} reviewed studies; "
                  f"TP {c['tp']} FP {c['fp']} TN {c['tn']} FN {c['fn']}):",
                  f"    sensitivity {rate('sensitivity')}, specificity {rate('specificity')}",
                  f"    {c['note']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = "monitor.py") -> int:
    args = get_args_parser(prog).parse_args(argv)
    options = storage_options_from_args(args)
    try:
        report = monitoring_report(args.run, _feedback(args, options), validation=args.validation,
                                   storage_options=options)
        written = write_report(report, args.output, options) if args.output else {}
    except (MonitoringError, FileNotFoundError, ValueError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else summary_text(report))
    if written:
        print(f"Wrote {', '.join(written.values())}", file=sys.stderr)
    return ALARM_EXIT if args.fail_on_alarm and report.alarms else 0
