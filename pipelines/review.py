#!/usr/bin/env python
"""Review a scoring run in the browser (worklist, study view, feedback); --export writes the feedback manifest. See --help."""
import sys

from fracray.cli.review import main

if __name__ == "__main__":
    sys.exit(main())
