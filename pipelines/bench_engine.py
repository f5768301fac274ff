#!/usr/bin/env python
"""Model-only CPU inference benchmark: eager PyTorch vs the ONNX Runtime engine, batch 1, one thread. See --help."""
import sys

from fracray.benchmarks.engine import main

if __name__ == "__main__":
    sys.exit(main())
