"""The ``vault-edge`` command line."""
