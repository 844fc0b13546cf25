"""Launching test ranks: the ``torchrun`` next to this Python, and a free local port."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
