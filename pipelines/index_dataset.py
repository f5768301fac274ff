#!/usr/bin/env python
"""Index a radiograph collection (MURA, FracAtlas, class folders, manifest) into one manifest. See --help."""
import sys

from fracray.cli.index_dataset import main

if __name__ == "__main__":
    sys.exit(main())
