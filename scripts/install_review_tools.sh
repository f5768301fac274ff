#!/usr/bin/env bash
# What the review application's tests (tests/test_review.py) use from Debian's packages: headless Chromium and
# its WebDriver (chromium, chromium-driver: the pages driven in a real browser) and the PostgreSQL 15 server
# (initdb + pg_ctl: a throwaway cluster for the PostgreSQL feedback store). Needs root (or sudo) and the Debian
# archive; does nothing when they are already installed. Without them those tests skip, saying why.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
source "$(dirname "$0")/apt_install.sh"
apt_install install_review_tools "${need[@]}"
