"""binloop: an ML data engine for smart waste-sorting bins."""

__version__ = "0.1.0"
