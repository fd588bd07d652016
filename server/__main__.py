"""`python -m server` = `bitmoji-serve`."""

import sys

from server.main import main

sys.exit(main())
