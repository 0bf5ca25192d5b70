"""Runners for the paper's experiments, built on the library's public API."""
