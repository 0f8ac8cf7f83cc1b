"""``python -m gradgraph ...`` runs the command line (see :mod:`gradgraph.cli`)."""
import sys

from .cli import main

sys.exit(main())
