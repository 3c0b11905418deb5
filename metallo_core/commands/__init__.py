"""Subcommands of the `metallo` console script, one module each."""
