"""Logs: the access log, its buffered writer, the JSON log observer."""
