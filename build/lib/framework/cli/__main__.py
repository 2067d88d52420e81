"""`python -m framework.cli`: the same as the `mesh` command."""

import sys

from framework.cli.main import main

sys.exit(main())
