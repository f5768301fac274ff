#!/usr/bin/env python
"""Print the ablation table (markdown) for train_all output folders. See --help."""
import sys

from fracray.cli.ablation_table import main

if __name__ == "__main__":
    sys.exit(main())
