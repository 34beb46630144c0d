"""`python -m fastvae` runs the command-line interface."""

import sys

from fastvae.cli import main

sys.exit(main())
