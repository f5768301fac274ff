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
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_review_tools: no apt-get here; install ${need[*]} yourself (the tests that need them skip)" >&2
  exit 0
fi
echo "Installing ${need[*]} from Debian's packages ..."
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null \
  || echo "install_review_tools: could not install ${need[*]}; the tests that need them skip" >&2
