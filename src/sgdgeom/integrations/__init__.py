"""Integrations with other training frameworks (each behind its own extra)."""
