"""Benchmarks: speed and memory figures measured against this machine's own limits (not tests)."""
