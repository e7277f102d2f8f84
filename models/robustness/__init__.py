"""Evaluation of trained networks: noise, corruptions, minimal perturbations, fixed-epsilon attacks."""
