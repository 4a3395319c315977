"""``python -m siamese_analog_plugin``: the command line."""

import sys

from .cli import main

sys.exit(main())
