"""Sparse-path ops: pure-torch references (any device); GPU kernels are checked against them."""
