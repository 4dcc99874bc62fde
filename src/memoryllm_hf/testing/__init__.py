"""Test helpers: a local Hub-compatible server for offline Hub workflows."""

from .local_hub import LocalHub

__all__ = ["LocalHub"]
