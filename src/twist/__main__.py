"""``python -m twist`` (and ``torchrun ... -m twist``) runs the command line."""

import sys

from twist.cli import main

sys.exit(main())
