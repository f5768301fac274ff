#!/usr/bin/env python
"""Training-throughput benchmark: Ray Data -> model step vs the model step alone. See --help."""
import sys

from fracray.benchmarks.training import main

if __name__ == "__main__":
    sys.exit(main())
