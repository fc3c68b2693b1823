"""Sketches: each client's base outputs and JL-projected gradients at theta*."""
