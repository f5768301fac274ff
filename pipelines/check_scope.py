#!/usr/bin/env python
"""Measure the out-of-scope check (photos, CT/MR/US, chest films, blank images vs. radiographs). See --help."""
import sys

from fracray.cli.check_scope import main

if __name__ == "__main__":
    sys.exit(main())
