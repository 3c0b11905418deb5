"""Operational tooling: storage bootstrap and the local development stack (not shipped in the wheel)."""
