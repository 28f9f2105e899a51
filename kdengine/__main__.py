"""``python -m kdengine`` runs the command-line interface (the same as the ``kdengine`` script)."""
import sys

from .cli import main

sys.exit(main())
