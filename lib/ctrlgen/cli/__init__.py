"""Command-line interface (``ctrlgen``)."""
