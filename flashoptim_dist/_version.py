"""The package version (a leaf: read by the root package, setup.cfg and checkpoint metadata)."""

__version__ = "0.1.0"
