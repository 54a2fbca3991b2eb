"""Training a run's encoder: its config, the loop, the batch sampler, augmentation, and the
per-image mining tally with its files."""
