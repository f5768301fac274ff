#!/usr/bin/env python
"""Score an archive of radiographs (router -> per-bone classifiers) into Parquet, resumably. See --help."""
import sys

from fracray.cli.score_archive import main

if __name__ == "__main__":
    sys.exit(main())
