"""The benchmark harness: trackingproxy against nginx and Caddy on loopback (`make bench`).

Not part of the installed package; run it from the repository root as `python -m bench.run`.
"""
