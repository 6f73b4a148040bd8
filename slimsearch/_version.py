"""The version of slimsearch (one place; the package and the run records read it)."""

__version__ = "0.1.0"
