"""Filling computed tables: the stages and their order, workers, jobs, the heartbeat, devices."""
