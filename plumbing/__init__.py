"""The plumbing every run needs and no researcher forks, so that the method files read like the method.

It imports none of them. A file per job (config, seeds, models, dist, guards, checkpoints, runlog, trackers,
plan, startup), each saying its job in its first line.
"""
