"""Pieces of :mod:`flashoptim_dist.launch_env`, which re-exports every public name (import from there).

``base`` (LaunchEnv, LaunchEnvError, variable names and parsing), ``slurm`` (host lists,
tasks per node, in-step test), ``net`` (interfaces, rank 0's address, free and reserved ports,
waiting for an endpoint), ``mpi`` (the mpi4py discovery collective), ``rendezvous`` (the
timeout, rank 0's store and the join check) and ``hsdp`` (the replica x shard mesh shape).
Only the standard library is imported at import time (torch inside the functions that make a
store), so that ``launch_env.py`` still runs as a plain file.
"""
