"""The HSDP mesh shape (replicas x shards) from where every rank runs."""

from __future__ import annotations

from typing import Sequence, Union

from .base import LaunchEnvError


def hsdp_mesh_shape(replicas: Union[int, str], nodes: Sequence[int]) -> tuple[int, int]:
    """``(replicas, shards)`` of an HSDP device mesh over ranks whose node indices are ``nodes``.

    ``nodes[r]``: the node rank of rank ``r`` (all-gathered). ``replicas``: an integer dividing
    the world size, or ``"nodes"``: one replica per node, sharded within it (all-reduce across
    nodes, reduce-scatter / all-gather inside a node). The mesh makes consecutive ranks one
    replica, so ``"nodes"`` needs every node to run the same number of ranks, numbered node by
    node.
    """
    world = len(nodes)
    if replicas == "nodes":
        order = sorted(set(nodes))
        counts = [nodes.count(n) for n in order]
        if len(set(counts)) != 1:
            raise LaunchEnvError(
                f"engine.replicas=nodes needs the same number of ranks on every node, but the {len(counts)} nodes "
                f"run {counts} ranks: {len(counts)} nodes do not divide the {world} ranks evenly. Start as many ranks "
                "on each node (torchrun: the same NPROC_PER_NODE everywhere; srun: --ntasks-per-node; mpirun: "
                "equal slots per host or --map-by ppr:N:node; MPICH's mpiexec: -ppn N), or set engine.replicas to a "
                f"divisor of {world} ({_divisors(world)})"
            )
        per_node = counts[0]
        for r, node in enumerate(nodes):
            if order.index(node) != r // per_node:
                raise LaunchEnvError(
                    f"engine.replicas=nodes needs each node's ranks to be consecutive, but rank {r} runs on node "
                    f"{node}: place ranks node by node (srun --distribution=block, mpirun --map-by slot, MPICH's "
                    "mpiexec -ppn N), or set engine.replicas to an integer"
                )
        return len(order), per_node
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1 or world % replicas:
        raise LaunchEnvError(
            f"engine.replicas={replicas} does not divide the {world} ranks: use one of {_divisors(world)}, "
            "or 'nodes' (one replica per node)"
        )
    return replicas, world // replicas


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
