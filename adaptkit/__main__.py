"""``python -m adaptkit`` (and ``accelerate launch -m adaptkit``) run the CLI."""

import sys

from adaptkit.cli import main

sys.exit(main())
