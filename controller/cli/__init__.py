"""The ``editq`` command line and ``make demo``."""
