"""``python -m sam_optax``: the ``sam-optax`` command."""

import sys

from sam_optax.program.cli import main

sys.exit(main())
