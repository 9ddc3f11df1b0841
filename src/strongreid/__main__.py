"""`python -m strongreid` (and `torchrun -m strongreid`) run the command-line interface."""

import sys

from strongreid.cli import main

sys.exit(main())
