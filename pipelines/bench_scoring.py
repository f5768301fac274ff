#!/usr/bin/env python
"""Bulk-scoring benchmark: score_archive vs a plain single-process loop, same files and predictor. See --help."""
import sys

from fracray.benchmarks.scoring import main

if __name__ == "__main__":
    sys.exit(main())
