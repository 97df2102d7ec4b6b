"""`python -m llmtrain` is the `llmtrain` command."""

import sys

from llmtrain.cli import main

sys.exit(main())
