#!/usr/bin/env python
"""A trained bundle -> the shipped model folder with its card (see fracray.cli.ship_model)."""
import sys

from fracray.cli.ship_model import main

if __name__ == "__main__":
    sys.exit(main())
