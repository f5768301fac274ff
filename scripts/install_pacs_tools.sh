#!/usr/bin/env bash
# The DICOM tools the hospital-integration tests and README commands use, from Debian's packages:
# dcmtk (dsrdump, dcmdump, storescu, echoscu: checks and sends DICOM), dicom3tools (David Clunie's
# dciodvfy: checks every object fracray writes against the IOD) and Orthanc with its DICOMweb plug-in.
# Needs root (or sudo) and the Debian archive; does nothing when they are already installed.
set -euo pipefail
need=()
command -v dsrdump >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_pacs_tools: no apt-get here; install ${need[*]} yourself (the tests that need them skip)" >&2
  exit 0
fi
echo "Installing ${need[*]} from Debian's packages ..."
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null \
  || echo "install_pacs_tools: could not install ${need[*]}; the tests that need them skip" >&2
