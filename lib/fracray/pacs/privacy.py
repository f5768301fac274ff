"""What may be logged of a study: a key that does not link to the patient, and exception
messages with the study's UIDs and header values taken out. The listener and publish_results
log through these, so a log file never carries patient data."""

from __future__ import annotations

import hashlib
import re

__all__ = ["study_key", "scrub"]

_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def study_key(study_uid: str) -> str:
    """The name a study goes by in the spool and the logs: not its UID (which links to the patient)."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:16]


def scrub(text: str, datasets) -> str:
    """``text`` (an exception's message) with every UID and every header value of ``datasets``
    that it quotes replaced, so that it can be logged."""
    values = set()
    for ds in datasets:
        for elem in ds:
            if elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "DA", "DT", "TM", "AS", "UI", "CS", "IS", "DS") \
                    and elem.value not in (None, ""):
                for value in (elem.value if elem.VM > 1 else [elem.value]):
                    if len(str(value).strip()) >= 3:
                        values.add(str(value).strip())
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "<redacted>")
    text = _UID.sub("<uid>", text)
    return text if len(text) <= 300 else text[:300] + "..."
