"""Simulated V1, oracle statistics, representational similarity and the predictive model."""
