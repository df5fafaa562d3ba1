"""pacslab composition root: the command line and the wiring of every service."""

__version__ = "0.1.0"
