"""Subcommands of `bench`, one module each (each defines `command`, a click command)."""
