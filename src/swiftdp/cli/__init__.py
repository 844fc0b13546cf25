"""The ``swiftdp`` command line: ``swiftdp train`` and ``swiftdp epsilon``.

Entry point :func:`swiftdp.cli.main.main` (the ``swiftdp`` console script).
"""
