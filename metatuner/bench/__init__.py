"""Benchmarking: the methods x tasks x seeds grid and its report (table and plots)."""
