"""Exporters of `Lifecycle.stats()`; each behind its own extra."""
