"""Upkeep of a running pipeline: accounts, scan sets, status, store verification and garbage collection."""
