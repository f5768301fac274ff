#!/usr/bin/env python
"""Preprocessing benchmark: bare decode vs full path vs naive baseline vs Ray Data. See --help."""
import sys

from fracray.benchmarks.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
