#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then runs pytest.
# Extra arguments go to pytest (e.g. -m "not slow", -k s3, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/install_pacs_tools.sh || true  # dcmtk + Orthanc for the DICOM tests (they skip without)
bash scripts/install_review_tools.sh || true  # Chromium + PostgreSQL for the review app's tests (skip without)
exec .venv/bin/python -m pytest "$@"
