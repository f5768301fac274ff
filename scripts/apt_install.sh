#!/usr/bin/env bash
# apt_install WHO PACKAGE...: install Debian packages for the test tools (sourced by install_pacs_tools.sh and
# install_review_tools.sh). Needs root (or sudo) and the Debian archive; without them it says so and returns 0:
# the tests that need the tools skip, saying why.
apt_install() {
  local who="$1"; shift
  [ "$#" -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$who: no apt-get here; install $* yourself (the tests that need them skip)" >&2
    return 0
  fi
  echo "Installing $* from Debian's packages ..."
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null \
    || echo "$who: could not install $*; the tests that need them skip" >&2
}
