"""How classifying a spooled study can fail, and so what the spool does with it
(``fracray.pacs.spool``): dropped, retried with back-off, or dead-lettered at once. Messages
are written to be logged: hosts and statuses, no patient data."""

from __future__ import annotations

__all__ = ["StudyRefused", "TransientFailure", "PermanentFailure"]


class StudyRefused(Exception):
    """The study cannot be classified (the service refused every image): logged and dropped."""


class TransientFailure(Exception):
    """A failure worth retrying (service or PACS down, overloaded, misconfigured)."""


class PermanentFailure(Exception):
    """A failure that trying again cannot mend (the results cannot be built from these images,
    or the PACS refuses them): the study is dead-lettered at once."""
