"""The error every report module raises for a bad input: what is missing, partial or wrong."""

from __future__ import annotations


class ReportInputError(ValueError):
    """An input folder or file is missing, partial or inconsistent; the message says what."""
