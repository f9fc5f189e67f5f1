"""Bridges to other probabilistic-programming libraries."""
