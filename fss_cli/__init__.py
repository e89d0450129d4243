"""The ``fss`` command line."""
