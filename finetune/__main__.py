"""`python -m finetune` runs the command-line tool."""

import sys

from finetune.cli import main

sys.exit(main())
