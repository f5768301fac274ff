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
source "$(dirname "$0")/apt_install.sh"
apt_install install_pacs_tools "${need[@]}"
