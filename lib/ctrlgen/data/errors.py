"""The data layer's one error type (its own module so the file readers and the records can both raise it)."""
from __future__ import annotations


class DataError(RuntimeError):
    """A dataset that cannot be used as asked (missing, or defective under ``strict``)."""


__all__ = ["DataError"]
