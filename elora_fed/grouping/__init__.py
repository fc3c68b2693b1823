"""Clustering clients into groups from the affinity matrix."""
