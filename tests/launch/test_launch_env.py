"""flashoptim_dist.launch_env: every launcher's variables map to the same rank description."""

from __future__ import annotations

import pytest

from flashoptim_dist import launch_env
from flashoptim_dist.launch_env import (
    LaunchEnvError, apply_to_environ, choose_master_addr, detect, expand_hostlist, hsdp_mesh_shape, rendezvous_timeout,
)


@pytest.fixture
def no_mpi4py(monkeypatch):
    """As on a machine without mpi4py: no MPI discovery."""
    monkeypatch.setattr(launch_env, "_mpi4py_available", lambda: False)


@pytest.fixture
def with_mpi4py(monkeypatch):
    monkeypatch.setattr(launch_env, "_mpi4py_available", lambda: True)


def test_torchrun():
    le = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                 "MASTER_ADDR": "node1", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"})
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size, le.node_rank) == (
        "torchrun", 3, 8, 1, 2, 1)
    assert (le.master_addr, le.master_port) == ("node1", 29400)


def test_deepspeed_launcher():
    le = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (le.launcher, le.rank, le.local_world_size, le.node_rank) == ("deepspeed", 1, 2, 0)


def test_open_mpi_single_node_defaults_to_loopback(no_mpi4py):
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    le = detect(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == (
        "openmpi", 1, 2, 1, "127.0.0.1", 29500)
    le = detect({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4000"})
    assert (le.master_addr, le.master_port) == ("10.1.2.3", 4000)


def test_open_mpi_multi_node_without_mpi4py_requires_master_addr(no_mpi4py):
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    with pytest.raises(LaunchEnvError,
                       match=r"MASTER_ADDR is not set; pass it explicitly, e.g. `mpirun -x MASTER_ADDR=.*"
                             r"or `pip install mpi4py` and let rank 0 broadcast them"):
        detect(env)
    assert detect({**env, "MASTER_ADDR": "node1"}).node_rank == 0


def test_open_mpi_with_mpi4py_leaves_the_rendezvous_to_resolve(with_mpi4py):
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    le = detect(env)  # multi-node without MASTER_ADDR is no longer an error
    assert le.needs_mpi_discovery and (le.master_addr, le.master_port) == ("", 0)
    with pytest.raises(LaunchEnvError, match=r"call launch_env.resolve\(\) on every rank"):
        apply_to_environ(le, {})
    # explicit values win, each on its own: with both there is nothing to discover
    le = detect({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})
    assert not le.needs_mpi_discovery and (le.master_addr, le.master_port) == ("10.0.0.1", 4000)
    le = detect({**env, "MASTER_ADDR": "10.0.0.1"})
    assert le.needs_mpi_discovery and (le.master_addr, le.master_port) == ("10.0.0.1", 0)


def test_open_mpi_node_rank_is_the_node_index():
    # OMPI_COMM_WORLD_NODE_RANK is this process's rank among the processes on its node (across
    # jobs), not the node's index: rank 10 of 8-per-node is on node 1 whatever it says.
    le = detect({"OMPI_COMM_WORLD_RANK": "10", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                 "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "OMPI_COMM_WORLD_NODE_RANK": "2", "MASTER_ADDR": "n0",
                 "MASTER_PORT": "1"})
    assert le.node_rank == 1


def test_mpich():
    le = detect({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1", "MASTER_ADDR": "h0"})
    assert (le.launcher, le.rank, le.world_size, le.node_rank) == ("mpich", 2, 4, 2)


def test_mpich_multi_node_without_mpi4py_names_hydras_flag(no_mpi4py):
    # Hydra (MPICH's mpiexec) has no `-x`: the hint must be its own -genv (found under a real
    # mpiexec.hydra with two emulated hosts, 2026-12-03: the message told MPICH users `mpirun -x`)
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    with pytest.raises(LaunchEnvError) as e:
        detect(env)
    assert "`mpiexec -genv MASTER_ADDR <address of rank 0's node> -genv MASTER_PORT 29500 ...`" in str(e.value)
    assert "-x MASTER_ADDR" not in str(e.value)
    assert detect({**env, "MASTER_ADDR": "10.0.0.1"}).master_port == 29500


class _FakeMPI:
    """mpi4py.MPI of a library that started as a singleton: a world of one process."""

    def __init__(self, library):
        self._library = library
        self.COMM_WORLD = self

    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0

    def Get_library_version(self):
        return self._library

    def Is_finalized(self):
        return False


@pytest.mark.parametrize("launcher_env, library, mpicc", [
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022\n", "mpicc.mpich"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, "MPICH Version:\t4.0.2\nMPICH Release date: ...\n", "mpicc.openmpi"),
], ids=["openmpi-mpi4py-under-hydra", "mpich-mpi4py-under-openmpi"])
def test_mpi4py_of_the_other_mpi_names_a_rebuild_that_works(monkeypatch, with_mpi4py, launcher_env, library, mpicc):
    """mpi4py built against Open MPI under MPICH's mpiexec (and the reverse), as run for real on
    2026-12-03: each process sees a world of 1. The fix must name the other MPI's compiler wrapper
    (plain `mpicc` on PATH is Open MPI's on Debian with both installed) and --no-cache-dir (pip
    >= 23.1 reuses its cached wheel, built against the wrong MPI, even with --no-binary)."""
    import sys
    import types

    fake = types.ModuleType("mpi4py")
    fake.MPI = _FakeMPI(library)
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake.MPI)
    with pytest.raises(LaunchEnvError) as e:
        launch_env.resolve(launcher_env)
    text = str(e.value)
    assert "ranks disagree on the world size" in text and "says rank 0 of 1" in text
    assert f"MPICC=<the mpicc of the MPI that launched the job, e.g. {mpicc} on Debian/Ubuntu>" in text, text
    assert "pip install --force-reinstall --no-binary=mpi4py --no-cache-dir mpi4py" in text, text
    assert "\t" not in text  # MPICH's version line has a tab


def test_slurm_step():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
           "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_JOB_ID": "123456"}
    le = detect(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size, le.node_rank) == (
        "slurm", 5, 8, 1, 2, 2)
    assert le.master_addr == "gpu007" and le.master_port == 12000 + 123456 % 20000
    assert detect({**env, "MASTER_ADDR": "x", "MASTER_PORT": "1234"}).master_port == 1234


def test_slurm_batch_script_is_not_a_step():
    # Inside the batch script (no srun) SLURM_NTASKS may be 8 but only one process runs.
    le = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"})
    assert (le.launcher, le.world_size) == ("none", 1)


def test_torch_variables_win_over_slurm_and_mpi():
    # torchrun inside an srun task, or inside mpirun: torchrun's own ranks are the real ones.
    le = detect({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "TORCHELASTIC_RUN_ID": "r",
                 "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "OMPI_COMM_WORLD_RANK": "0",
                 "OMPI_COMM_WORLD_SIZE": "1"})
    assert (le.launcher, le.rank, le.world_size) == ("torchrun", 1, 4)


def test_no_launcher_is_one_process():
    le = detect({})
    assert (le.launcher, le.rank, le.world_size, le.master_port) == ("none", 0, 1, 0)


def test_bad_values_raise_named_errors():
    with pytest.raises(LaunchEnvError, match="RANK='x' is not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchEnvError, match="rank 4 is outside world size 4"):
        detect({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a"})
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR is not"):
        detect({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(LaunchEnvError, match="MASTER_PORT=70000 is out of range"):
        detect({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "70000"})


def test_hostlist_expansion():
    assert expand_hostlist("node1") == ["node1"]
    assert expand_hostlist("gpu[01-03,07],login") == ["gpu01", "gpu02", "gpu03", "gpu07", "login"]
    assert expand_hostlist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    assert expand_hostlist("a[9-11]") == ["a9", "a10", "a11"]
    with pytest.raises(LaunchEnvError, match="unmatched"):
        expand_hostlist("gpu[01-03")
    with pytest.raises(LaunchEnvError, match="malformed range"):
        expand_hostlist("gpu[3-1]")


def test_apply_to_environ_exports_env_vars_and_remembers_the_launcher(no_mpi4py):
    src = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    env = dict(src)
    apply_to_environ(detect(env), env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (
        "1", "2", "1", "127.0.0.1", "29500")
    assert detect(env).launcher == "openmpi"
    single = {}
    le = apply_to_environ(detect(single), single)
    assert le.master_port > 0 and single["MASTER_PORT"] == str(le.master_port)


def _route_table(table):
    return lambda dest: table.get(dest)


def test_master_addr_is_the_interface_that_routes_to_the_other_nodes():
    mine = [("lo", "127.0.0.1"), ("docker0", "172.17.0.1"), ("eth0", "10.1.0.5"), ("ib0", "10.2.0.5")]
    # Every node has the same docker bridge address: it says nothing about reaching that node.
    peers = [["127.0.0.1", "172.17.0.1", "10.2.0.6"], ["127.0.0.1", "172.17.0.1", "10.2.0.7"]]
    route = _route_table({"172.17.0.1": "172.17.0.1", "10.2.0.6": "10.2.0.5", "10.2.0.7": "10.2.0.5"})
    addr, why = choose_master_addr(peers, mine, route=route)
    assert addr == "10.2.0.5" and "ib0" in why and "2 of the 2 other nodes" in why
    # by majority when nodes disagree
    route = _route_table({"10.2.0.6": "10.1.0.5", "10.2.0.7": "10.2.0.5", "10.2.0.8": "10.2.0.5"})
    addr, _ = choose_master_addr([["10.2.0.6"], ["10.2.0.7"], ["10.2.0.8"]], mine, route=route)
    assert addr == "10.2.0.5"


def test_master_addr_on_two_nodes_of_one_machine_and_one_node():
    mine = [("lo", "127.0.0.1"), ("eth0", "192.0.2.2")]
    # a "node" holding only rank 0's own addresses is this machine: its address still routes
    addr, why = choose_master_addr([["127.0.0.1", "192.0.2.2"]], mine, route=_route_table({"192.0.2.2": "192.0.2.2"}))
    assert addr == "192.0.2.2" and "eth0" in why
    assert choose_master_addr([], mine) == ("127.0.0.1", "one node: loopback")
    # no route found: the first non-loopback address, said so
    addr, why = choose_master_addr([["10.9.9.9"]], mine, route=_route_table({}))
    assert addr == "192.0.2.2" and "no route" in why
    with pytest.raises(LaunchEnvError, match="no non-loopback IPv4 address.*set MASTER_ADDR"):
        choose_master_addr([["10.9.9.9"]], [("lo", "127.0.0.1")], route=_route_table({}))


def test_master_ifname_override():
    mine = [("lo", "127.0.0.1"), ("eth0", "10.1.0.5"), ("ib0", "10.2.0.5")]
    route = _route_table({"10.1.0.6": "10.1.0.5"})
    assert choose_master_addr([["10.1.0.6"]], mine, ifnames="ib1,ib0", route=route)[0] == "10.2.0.5"
    with pytest.raises(LaunchEnvError,
                       match=r"FLASHOPTIM_MASTER_IFNAME='hsn0'.*it has: lo=127.0.0.1, eth0=10.1.0.5, ib0=10.2.0.5"):
        choose_master_addr([["10.1.0.6"]], mine, ifnames="hsn0", route=route)


def test_hsdp_mesh_shape_from_nodes():
    assert hsdp_mesh_shape("nodes", [0, 0, 1, 1]) == (2, 2)
    assert hsdp_mesh_shape("nodes", [0, 1]) == (2, 1)
    assert hsdp_mesh_shape("nodes", [0, 0, 0]) == (1, 3)
    assert hsdp_mesh_shape(2, [0, 0, 0, 1, 1, 1]) == (2, 3)
    with pytest.raises(LaunchEnvError,
                       match=r"the 2 nodes run \[2, 1\] ranks: 2 nodes do not divide the 3 ranks evenly.*"
                             r"NPROC_PER_NODE.*--ntasks-per-node.*engine.replicas to a divisor of 3 \(1, 3\)"):
        hsdp_mesh_shape("nodes", [0, 0, 1])
    with pytest.raises(LaunchEnvError, match=r"consecutive, but rank 1 runs on node 1.*--distribution=block"):
        hsdp_mesh_shape("nodes", [0, 1, 0, 1])
    with pytest.raises(LaunchEnvError, match=r"engine.replicas=3 does not divide the 4 ranks: use one of 1, 2, 4"):
        hsdp_mesh_shape(3, [0, 0, 1, 1])


def test_rendezvous_timeout_setting():
    assert rendezvous_timeout({}) == 600.0 and rendezvous_timeout({"FLASHOPTIM_RDZV_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(LaunchEnvError, match=f"FLASHOPTIM_RDZV_TIMEOUT='{bad}' is invalid"):
            rendezvous_timeout({"FLASHOPTIM_RDZV_TIMEOUT": bad})
