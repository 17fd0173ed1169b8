"""`python -m cli`: the `char-rnn` command."""

import sys

from cli import main

sys.exit(main())
