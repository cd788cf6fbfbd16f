"""`python -m squeeze.plan <what python train.py -m takes> [--json]`: the cells a sweep would run, what its directory
already holds of them and which start from the stored baseline, without running anything (squeeze/run/plan.py)."""

import sys

from squeeze.run.plan import main

if __name__ == "__main__":
    sys.exit(main())
