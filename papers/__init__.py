"""Reproductions of the classic papers' tables (see papers/README.md)."""
