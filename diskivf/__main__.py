"""``python -m diskivf`` runs the command line."""

import sys

from diskivf.cli import main

sys.exit(main())
