"""A simulated cohort's sizes and seed, apart from the simulator so the command line reads them without
importing it (``neureg --help`` stays fast)."""

#: simulate_cohort's keyword arguments and their defaults (``neureg simulate``'s options).
COHORT_DEFAULTS = dict(
    n_mice=2, n_days=1, scans_per_day=2, n_units=1000, n_images=1100, n_oracle=100, n_repeats=10, seed=0
)
