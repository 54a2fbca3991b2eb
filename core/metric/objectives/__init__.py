"""Objectives and miners, one module each (or a few in `builtin`): every module here is imported
by core.metric.registry on first use, and registers what it defines with register_objective /
register_miner. Modules here stay free of torch at import time (pages read the specs); a factory
imports its torch code when a run builds its loss."""
