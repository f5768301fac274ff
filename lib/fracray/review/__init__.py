"""The review application: a scoring run's worklist, study view and reviewers' feedback in a
browser (``fracray review RUN``), and its monitoring (``fracray monitor RUN``).

worklist.py   queries over a ``score_archive`` output where it lies (DuckDB / pyarrow datasets)
feedback.py   FeedbackRecord and the feedback stores (SQLite by default, PostgreSQL given a URL)
truth.py      what the feedback says of an image and a study (export and concordance share it)
export.py     feedback -> a labelled manifest that ``train_all`` reads
app.py        the ASGI application (FastAPI) and its Ray Serve builder
monitoring.py the monitoring report (by day, body part, equipment; drift against validation)
monitoring_plots.py  its PNGs and report.json
concordance.py       reviewers' feedback -> study-level sensitivity / specificity with intervals
"""
