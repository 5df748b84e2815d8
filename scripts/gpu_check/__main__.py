"""``python -m scripts.gpu_check``: see the package docstring."""

import sys

from scripts.gpu_check.cli import main

sys.exit(main())
