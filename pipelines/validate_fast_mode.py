#!/usr/bin/env python
"""Validate the fast CPU precision (OpenVINO bf16) of trained models against exact, and record it in their bundles. See --help."""
import sys

from fracray.cli.validate_fast_mode import main

if __name__ == "__main__":
    sys.exit(main())
