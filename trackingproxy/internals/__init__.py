"""Every use of Twisted's and pyOpenSSL's private internals, behind one module each
(`twisted_private`, `pyopenssl_private`): what they reach into, for which releases (setup.cfg
bounds both), and a ``missing()`` check that tests/test_internals.py runs so that a release
whose internals differ fails there first, naming what changed."""
