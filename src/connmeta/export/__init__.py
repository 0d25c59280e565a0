"""Exporters: subscribers of the store like any watcher, never in its write path."""
