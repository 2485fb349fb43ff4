"""`python -m sparsebert` runs the `sparsebert` command."""

import sys

from sparsebert.cli import main

sys.exit(main())
