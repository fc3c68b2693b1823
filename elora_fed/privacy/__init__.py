"""Differential privacy and secure aggregation for what clients release."""
