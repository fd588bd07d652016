import sys

from bitmoji.trainer.cli import main

sys.exit(main())
