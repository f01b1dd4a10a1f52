"""Shared test helpers (tiny random models)."""
