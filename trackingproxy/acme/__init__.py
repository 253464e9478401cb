"""Certificates over ACME: store, schedule, client, challenge responder and issuing service.

The public entry points are ``trackingproxy.acme.settings.AcmeSettings`` and
``trackingproxy.acme.settings.build_acme``; the rest is importable for tests and tools.
"""
