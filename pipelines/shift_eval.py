#!/usr/bin/env python
"""AUROC of a model index on shifted copies of labelled images (see fracray.cli.shift_eval)."""

import sys

from fracray.cli.shift_eval import main

if __name__ == "__main__":
    sys.exit(main())
