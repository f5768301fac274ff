#!/usr/bin/env python
"""The monitoring report of a scoring run: PNGs + report.json (see fracray.cli.monitor)."""

import sys

from fracray.cli.monitor import main

if __name__ == "__main__":
    sys.exit(main())
