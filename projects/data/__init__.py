"""Data: the built-in synthetic data set (placeholder being written)."""
