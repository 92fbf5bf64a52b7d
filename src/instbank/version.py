"""The package version, in one place: the manifest records it, pyproject reads it."""

__version__ = "0.1.0"
