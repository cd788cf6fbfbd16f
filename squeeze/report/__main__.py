import sys

from squeeze.report.cli import main

sys.exit(main())
