"""Package version (its own module so internals can import it without cycles)."""

__version__ = "0.1.0"
