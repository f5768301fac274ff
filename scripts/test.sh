#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then runs pytest.
# Extra arguments go to pytest (e.g. -m "not slow", -k s3, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's tools install while pip fills .venv (one apt script at a time: apt's lock):
# dcmtk + Orthanc for the DICOM tests, Chromium + PostgreSQL for the review app's (they skip without).
(bash scripts/install_pacs_tools.sh || true; bash scripts/install_review_tools.sh || true) &
tools=$!
bash scripts/bootstrap.sh
wait "$tools"
# Two workers: the suite waits on processes starting (Ray, Serve replicas, PACS servers) as much as it
# computes, so a second worker fills the idle core. Each worker has its own Ray and Serve; a module
# stays on one worker (tests/conftest.py). FRACRAY_TEST_WORKERS=0 runs it in one process.
workers=${FRACRAY_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "$workers" --dist loadgroup --no-loadscope-reorder "$@"
