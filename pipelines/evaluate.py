#!/usr/bin/env python
"""Evaluate trained models (router -> per-bone classifiers) on a labelled dataset. See --help."""
import sys

from fracray.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
