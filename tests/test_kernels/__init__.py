"""Kernel tests (a package so test modules can share the float64 oracle)."""
