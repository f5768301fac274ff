#!/usr/bin/env python
"""A DICOM node: classify the studies a PACS sends by C-STORE, results back into the PACS. See --help."""
import sys

from fracray.cli.listen import main

if __name__ == "__main__":
    sys.exit(main())
