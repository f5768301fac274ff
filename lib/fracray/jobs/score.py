"""The ``score`` job: every radiograph of an archive (a folder, an s3:// prefix, a DICOMweb
query) through the router -> classifier graph, into resumable Parquet."""

from __future__ import annotations

from typing import Callable

from ..artifacts.index import check_model_index
from ..raycluster import connect
from ..scoring.archive import ScoreConfig, ScoringSummary, score_archive

__all__ = ["ScoreConfig", "ScoringSummary", "run_score", "format_scoring_summary"]


def run_score(config: ScoreConfig, *, log: Callable[[str], None] = print) -> ScoringSummary:
    check_model_index(config.models, config.storage.resolved())  # every bundle, before Ray or any folder
    connect()  # RAY_ADDRESS (set by `ray job submit`), a `ray start` cluster, or a new local Ray
    return score_archive(config, log=log)


def format_scoring_summary(summary: ScoringSummary) -> str:
    rejected = sum(summary.rejected.values())
    return (f"Scored {summary.scored} of {summary.inputs} images ({rejected} rejected"
            + (f": {', '.join(f'{k} {v}' for k, v in summary.rejected.items())}" if rejected else "")
            + f") in {summary.studies} studies; {summary.flagged_studies} studies flagged. "
            + (f"{summary.images_per_second_this_run} images/s. " if summary.images_per_second_this_run else "")
            + f"Results in {summary.output}")
