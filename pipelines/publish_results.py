#!/usr/bin/env python
"""Store a score_archive run's results (DICOM SR + overlays) back into the PACS. See --help."""
import sys

from fracray.cli.publish_results import main

if __name__ == "__main__":
    sys.exit(main())
