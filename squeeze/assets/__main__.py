"""`python -m squeeze.assets fetch|list|path`: the offline assets' command line (squeeze.assets.main)."""

import sys

from squeeze.assets import main

sys.exit(main())
