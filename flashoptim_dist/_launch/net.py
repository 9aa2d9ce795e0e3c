"""The network side of a launch: this host's IPv4 interfaces, the address rank 0 advertises
(:func:`choose_master_addr`), free and reserved ports, and waiting for an endpoint."""

from __future__ import annotations

import socket
import time
from collections import Counter
from typing import Callable, Optional, Sequence

from .base import MASTER_IFNAME_VAR, LaunchEnvError


def _interface_addresses() -> list[tuple[str, str]]:
    """``(interface, IPv4 address)`` of this host's interfaces that have one, loopback included.

    Linux: the SIOCGIFADDR ioctl per interface (one primary address each); elsewhere the
    addresses the host name resolves to, under the name ``"?"``.
    """
    out: list[tuple[str, str]] = []
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:  # no IPv4 address on this interface
                    continue
                out.append((name, socket.inet_ntoa(raw[20:24])))
    except (ImportError, OSError, AttributeError):
        pass
    if not out:
        try:
            out = [("?", a) for a in socket.gethostbyname_ex(socket.gethostname())[2]]
        except OSError:
            pass
    return out


def _route_source(dest: str) -> Optional[str]:
    """The local address the kernel would send from to reach ``dest`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((dest, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def _loopback(addr: str) -> bool:
    return addr.startswith("127.")


def choose_master_addr(
    peers: Sequence[Sequence[str]],
    mine: Sequence[tuple[str, str]],
    ifnames: Optional[str] = None,
    route: Callable[[str], Optional[str]] = _route_source,
) -> tuple[str, str]:
    """The address rank 0 advertises, and why; runs on rank 0 under MPI discovery.

    ``peers``: for every other node, the IPv4 addresses of its interfaces; ``mine``: rank 0's
    ``(interface, address)`` pairs; ``ifnames``: ``FLASHOPTIM_MASTER_IFNAME`` (comma list).

    * ``ifnames`` given: the first of those interfaces that has an address.
    * one node (no peers): ``127.0.0.1``.
    * otherwise the source address of rank 0's route to the other nodes (the kernel's choice
      for reaching them, so they can reach it back), by majority over the nodes. A peer
      address that rank 0 holds too (a docker0-style bridge that every node has) says nothing
      about how to reach that node and is skipped, unless the peer holds nothing else (then it
      is this very machine: two "nodes" of one host).

    Not the host name: on Debian-style hosts it often resolves to 127.0.1.1 or 127.0.0.1 on
    its own machine, which the other nodes cannot use. Not the first address of ``hostname -I``
    (DeepSpeed's MPI discovery, deepspeed/comm/comm.py ``mpi_discovery``): that is whichever
    interface was configured first, e.g. a management or container bridge the other nodes may
    not reach.
    """
    if ifnames:
        wanted = [n.strip() for n in ifnames.split(",") if n.strip()]
        for name in wanted:
            for iface, addr in mine:
                if iface == name:
                    return addr, f"interface {name} of rank 0's host ({MASTER_IFNAME_VAR})"
        have = ", ".join(f"{i}={a}" for i, a in mine) or "none"
        raise LaunchEnvError(
            f"{MASTER_IFNAME_VAR}={ifnames!r}: no such interface with an IPv4 address on rank 0's host "
            f"{socket.gethostname()} (it has: {have}); name one of those, or unset it to use the interface "
            "that routes to the other nodes"
        )
    if not peers:
        return "127.0.0.1", "one node: loopback"
    own = {a for _, a in mine}
    votes: Counter = Counter()
    for addrs in peers:
        usable = [a for a in addrs if not _loopback(a)]
        for dest in [a for a in usable if a not in own] or usable:
            src = route(dest)
            if src and not _loopback(src):
                votes[src] += 1
                break
    if votes:
        src, n = votes.most_common(1)[0]
        iface = next((i for i, a in mine if a == src), "?")
        return src, f"interface {iface} of rank 0's host, which routes to {n} of the {len(peers)} other nodes"
    for iface, addr in mine:
        if not _loopback(addr):
            return addr, f"interface {iface} of rank 0's host (no route to the other nodes' addresses was found)"
    raise LaunchEnvError(
        f"rank 0's host {socket.gethostname()} has no non-loopback IPv4 address that the other nodes could "
        "reach; set MASTER_ADDR=<address of rank 0 reachable from every node> (IPv6-only networks too)"
    )


#: Rank 0's listening socket for a port it picked during MPI discovery, handed to the TCP store
#: (``master_listen_fd``) so that nothing can take the port between choosing and using it.
_RESERVED: dict[int, socket.socket] = {}


def _reserve_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 0))
    s.listen(128)
    port = s.getsockname()[1]
    _RESERVED[port] = s
    return port


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_endpoint(host: str, port: int, timeout: float) -> bool:
    """Wait until ``host:port`` accepts a TCP connection; True if it did within ``timeout`` s.

    Returns at once (True) when ``host`` is an address of this machine: the store may be meant
    to start here (torchrun's c10d backend hosts it on the node that matches the endpoint).
    """
    local = {a for _, a in _interface_addresses()} | {"127.0.0.1", "localhost", "::1"}
    try:
        resolved = {ai[4][0] for ai in socket.getaddrinfo(host, None, socket.AF_INET)}
    except OSError:
        resolved = set()
    if (host in local or host == socket.gethostname() or (resolved and resolved <= local)
            or any(_loopback(a) for a in resolved)):
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
