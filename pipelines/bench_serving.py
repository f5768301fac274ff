#!/usr/bin/env python
"""Serving benchmark: HTTP p50/p99 and requests/s, batched vs unbatched, vs in-process. See --help."""
import sys

from fracray.benchmarks.serving import main

if __name__ == "__main__":
    sys.exit(main())
