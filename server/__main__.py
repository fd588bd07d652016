"""`python -m bitmoji.server` = `bitmoji-serve`."""

import sys

from bitmoji.server.cli import main

sys.exit(main())
