"""Experiments a lab plans: the paper (``neureg plan paper``), the demo, and the simulated cohort they use."""
