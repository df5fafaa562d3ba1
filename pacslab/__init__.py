"""pacslab composition root: the command line and the wiring of every service."""

from core import __version__

__all__ = ["__version__"]
