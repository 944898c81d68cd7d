"""``python -m benchmarks`` (what ``make bench`` runs); ``python -m benchmarks --help`` for options."""

import sys

from benchmarks.report import main

sys.exit(main())
