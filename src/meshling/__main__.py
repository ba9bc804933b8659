"""`python -m meshling`: the same as the `meshling` command."""

import sys

from meshling.cli import main

sys.exit(main())
