"""``python -m danet``: the danet command (danet.cli)."""

import sys

from danet.cli import main

sys.exit(main())
