"""``python -m swiftdp.bench``: the ``swiftdp bench`` command without the main CLI."""

import sys

from swiftdp.bench.cli import main

sys.exit(main())
