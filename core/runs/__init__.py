"""Runs as jobs: the lifecycle of a run's row (the one writer of its status), creating and
starting them, where they run (a local process or a Ray job), and the worker that executes one."""

from core.runs import lifecycle  # noqa: F401,E402  (its load events make every row read with its liveness)
