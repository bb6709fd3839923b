"""``python -m mlsml`` runs the command line (see :mod:`mlsml.cli`)."""

import sys

from .cli import main

sys.exit(main())
