#!/usr/bin/env python
"""Review benchmark: worklist pages and the monitoring report on a 1M-row scoring output vs pandas. See --help."""
import sys

from fracray.benchmarks.review import main

if __name__ == "__main__":
    sys.exit(main())
