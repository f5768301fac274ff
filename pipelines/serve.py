#!/usr/bin/env python
"""Serve the router -> classifier graph over HTTP on this machine, in one command. See --help."""
import sys

from fracray.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
