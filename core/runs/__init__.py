"""Runs as jobs: the lifecycle of a run's row (the one writer of its status), creating and
starting them, where they run (a local process or a Ray job), and the worker that executes one."""
