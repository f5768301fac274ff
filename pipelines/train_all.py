#!/usr/bin/env python
"""The main job: index -> Ray Data preprocessing (-> training, as it lands). No arguments: embedded default. See --help."""
import sys

from fracray.cli.train_all import main

if __name__ == "__main__":
    sys.exit(main())
