"""Small helpers that do not belong to one structure."""
