"""trackingproxy: an HTTPS reverse proxy with built-in ACME for SparkPost tracking domains."""

__version__ = "0.1.0"
