"""Benchmarks: scripts that print figures (never timed tests), and the pieces they share."""
