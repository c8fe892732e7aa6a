"""``python -m prune.analysis RECIPE.yaml``: see :mod:`prune.analysis.run`."""

import sys

from prune.analysis.run import main

sys.exit(main())
