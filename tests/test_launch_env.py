"""flashoptim_dist.launch_env: every launcher's variables map to the same rank description."""

from __future__ import annotations

import pytest

from flashoptim_dist.launch_env import LaunchEnvError, apply_to_environ, detect, expand_hostlist


def test_torchrun():
    le = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                 "MASTER_ADDR": "node1", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"})
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size, le.node_rank) == ("torchrun", 3, 8, 1, 2, 1)
    assert (le.master_addr, le.master_port) == ("node1", 29400)


def test_deepspeed_launcher():
    le = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (le.launcher, le.rank, le.local_world_size, le.node_rank) == ("deepspeed", 1, 2, 0)


def test_open_mpi_single_node_defaults_to_loopback():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    le = detect(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == ("openmpi", 1, 2, 1, "127.0.0.1", 29500)
    le = detect({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4000"})
    assert (le.master_addr, le.master_port) == ("10.1.2.3", 4000)


def test_open_mpi_multi_node_requires_explicit_master_addr():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    with pytest.raises(LaunchEnvError, match=r"MASTER_ADDR is not set; pass it explicitly, e.g. `mpirun -x MASTER_ADDR="):
        detect(env)
    assert detect({**env, "MASTER_ADDR": "node1"}).node_rank == 0


def test_mpich():
    le = detect({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1", "MASTER_ADDR": "h0"})
    assert (le.launcher, le.rank, le.world_size, le.node_rank) == ("mpich", 2, 4, 2)


def test_slurm_step():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
           "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_JOB_ID": "123456"}
    le = detect(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size, le.node_rank) == ("slurm", 5, 8, 1, 2, 2)
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


def test_apply_to_environ_exports_env_vars_and_remembers_the_launcher():
    src = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    env = dict(src)
    apply_to_environ(detect(env), env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("1", "2", "1", "127.0.0.1", "29500")
    assert detect(env).launcher == "openmpi"
    single = {}
    le = apply_to_environ(detect(single), single)
    assert le.master_port > 0 and single["MASTER_PORT"] == str(le.master_port)
