"""Thin entry points: the `umt` command line and `python -m launch.train`."""
