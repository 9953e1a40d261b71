"""``python -m modelfusion``: the CLI, as ``torchrun -m modelfusion merge ...`` starts it."""

import sys

from .cli import main

sys.exit(main())
