"""Objectives and miners added to the lab, one module each: every module here is imported by
core.metric.registry on first use and registers what it defines (register_objective beside its
loss's nn.Module, register_miner beside its miner). The built-in ones register in their own
modules: core/metric/losses/ and core/metric/miners.py."""
