"""``python -m swiftdp.cli``: the same as the ``swiftdp`` command."""

import sys

from swiftdp.cli.main import main

sys.exit(main())
