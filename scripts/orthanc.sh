#!/usr/bin/env bash
# A private Orthanc PACS (with DICOMweb) on 127.0.0.1, storing in its own folder.
#   bash scripts/orthanc.sh start DIR [HTTP_PORT] [DICOM_PORT]   # prints the DICOMweb URL when it answers
#   bash scripts/orthanc.sh stop DIR
# Install it first with scripts/install_pacs_tools.sh (Debian's orthanc + orthanc-dicomweb).
# HTTP is open (no login) but only to this machine (RemoteAccessAllowed false): for tests and demos.
set -euo pipefail
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n 2,6p "$0" >&2; exit 2; }
case "$cmd" in
  start)
    http=${3:-8042}; dicom=${4:-4242}
    command -v Orthanc >/dev/null || { echo "Orthanc is not installed: bash scripts/install_pacs_tools.sh" >&2; exit 3; }
    plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
    [ -e "$plugin" ] || { echo "Orthanc's DICOMweb plug-in is missing: apt-get install orthanc-dicomweb" >&2; exit 3; }
    mkdir -p "$dir/db"
    cat > "$dir/orthanc.json" <<JSON
{
  "Name": "fracray-orthanc",
  "StorageDirectory": "$dir/db",
  "IndexDirectory": "$dir/db",
  "HttpPort": $http,
  "DicomPort": $dicom,
  "DicomAet": "ORTHANC",
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "OverwriteInstances": true,
  "DicomCheckCalledAet": false,
  "DicomModalities": {},
  "UnknownSopClassAccepted": true,
  "Plugins": ["$plugin"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "StudiesMetadata": "Full"}
}
JSON
    Orthanc "$dir/orthanc.json" > "$dir/orthanc.log" 2>&1 &
    echo $! > "$dir/orthanc.pid"
    for _ in $(seq 1 100); do
      if curl -sf "http://127.0.0.1:$http/system" >/dev/null 2>&1; then
        echo "http://127.0.0.1:$http/dicom-web"; exit 0
      fi
      kill -0 "$(cat "$dir/orthanc.pid")" 2>/dev/null || { echo "Orthanc exited; see $dir/orthanc.log" >&2; tail -5 "$dir/orthanc.log" >&2; exit 1; }
      sleep 0.2
    done
    echo "Orthanc did not answer on port $http; see $dir/orthanc.log" >&2; exit 1 ;;
  stop)
    [ -f "$dir/orthanc.pid" ] || exit 0
    pid=$(cat "$dir/orthanc.pid"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true; rm -f "$dir/orthanc.pid" ;;
  *) sed -n 2,6p "$0" >&2; exit 2 ;;
esac
