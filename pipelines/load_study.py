#!/usr/bin/env python
"""Radiographs -> a demo DX/CR DICOM study, stored into a test PACS (Orthanc) by STOW-RS. See --help."""
import sys

from fracray.cli.load_study import main

if __name__ == "__main__":
    sys.exit(main())
