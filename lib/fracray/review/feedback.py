"""Reviewers' feedback on a scoring run: one :class:`FeedbackRecord` per verdict.

A verdict is about a whole study (``image_id`` and ``finding`` None), about one finding of one
image (``finding`` is the index into that image row's ``findings`` list), or a missed fracture
the reviewer drew (``verdict == "missed"``, ``box`` in the image's pixels).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt

__all__ = ["VERDICTS", "FeedbackRecord"]

VERDICTS: tuple[str, ...] = ("agree", "disagree", "missed")


@dataclasses.dataclass(frozen=True)
class FeedbackRecord:
    """One reviewer's verdict.

    study_id:   the scoring run's ``study`` of the image rows
    image_id:   the image row's ``uri`` (None for a verdict on the whole study)
    finding:    index into that image's ``findings`` (None for a study or image verdict, and for "missed")
    verdict:    "agree" | "disagree" | "missed"
    box:        (x0, y0, x1, y1) in the image's pixels for "missed", else None
    reviewer:   the reviewer's name
    created_at: when it was recorded (timezone-aware UTC)
    """

    study_id: str
    image_id: str | None
    finding: int | None
    verdict: str
    box: tuple[float, float, float, float] | None
    reviewer: str
    created_at: _dt.datetime

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")
        if not self.study_id:
            raise ValueError("study_id is empty")
        if not str(self.reviewer).strip():
            raise ValueError("reviewer is empty: feedback needs the reviewer's name")
        if self.finding is not None and self.image_id is None:
            raise ValueError("a finding's verdict needs the image_id it belongs to")
        if self.verdict == "missed":
            if self.box is None or self.image_id is None:
                raise ValueError("a missed fracture needs the image_id and the box drawn on it")
            box = tuple(float(v) for v in self.box)
            if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, not {self.box!r}")
            object.__setattr__(self, "box", box)
        elif self.box is not None:
            raise ValueError("only a 'missed' verdict carries a box")

    @property
    def scope(self) -> str:
        """"study", "image", "finding" or "missed": what the verdict is about."""
        if self.verdict == "missed":
            return "missed"
        if self.finding is not None:
            return "finding"
        return "image" if self.image_id is not None else "study"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["box"] = list(self.box) if self.box is not None else None
        d["created_at"] = self.created_at.isoformat()
        return d
