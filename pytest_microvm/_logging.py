"""The package's loggers, with the one handler a library adds: a NullHandler.

The application (pytest, the ``microvm`` command, a script) decides what shows; without
this, Python's last-resort handler would print our warnings to stderr where nothing is
configured. Here rather than in ``pytest_microvm/__init__.py``, which stays free of the
logging import for the code paths that never log (``microvm --help``).
"""

from __future__ import annotations

import logging

logging.getLogger("pytest_microvm").addHandler(logging.NullHandler())


def logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` for a module of this package (``__name__``)."""
    return logging.getLogger(name)
