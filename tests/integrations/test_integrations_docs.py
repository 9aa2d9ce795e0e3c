"""The examples of docs/integrations.md run as written, on 2 CPU ranks, so the doc cannot rot.

* accelerate, hf-trainer, lightning: each executed as ``__main__`` in its own 2-rank gloo process
  group and working directory, with Accelerate's FSDP-on-CPU adaptation
  (tests/integration_helpers.py); each must train and write its checkpoint;
* deepspeed: launched by the deepspeed launcher (``DS_ACCELERATOR=cpu``), then the same
  teardown the CPU launcher needs (notes: without it ~1 run in 4 aborts at exit);
* own-trainer: the command, with the tests' tiny-run overrides appended;
* torchtitan-command and torchtitan-config: run by tests/integrations/test_integrations_torchtitan.py (the
  command is parsed by torchtitan's ConfigManager there).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import run_distributed
from doc_examples import ROOT, example, examples
from launch_helpers import TINY, clean_env, run, summary
from optional_deps import require_module

pytestmark = pytest.mark.slow

EXPECTED = {"torchtitan-command", "torchtitan-config", "accelerate", "hf-trainer", "lightning", "deepspeed",
            "own-trainer"}


def test_every_framework_has_an_example_and_the_readme_links_it():
    assert set(examples()) == EXPECTED
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "docs/integrations.md" in f.read()


def _run_python_example(rank, world, tmp, name):
    import runpy

    from integration_helpers import accelerate_fsdp_on_cpu

    accelerate_fsdp_on_cpu()
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    os.chdir(d)  # the ranks share the working directory, as on a shared filesystem
    # one script file per rank: with one shared file, a rank that opened it for writing (which
    # truncates it) while the other was reading it could run an empty or cut script — that
    # rank then skipped the example's collectives, and the other hung in them until the 240 s
    # timeout (seen as a rare failure of these tests on a loaded machine)
    path = os.path.join(d, f"{name.replace('-', '_')}_rank{rank}.py")
    with open(path, "w") as f:
        f.write(example(name))
    runpy.run_path(path, run_name="__main__")
    return sorted(os.listdir(d))


@pytest.mark.parametrize("name", ["accelerate", "hf-trainer", "lightning"])
def test_accelerate_trainer_and_lightning_examples_run(tmp_path, name):
    require_module("accelerate", "accelerate==1.15.0")
    require_module("transformers", "transformers==5.23.0")
    require_module("lightning", "lightning==2.6.6")
    # one process group per example: a hang or a failure names its framework (and, through
    # dist_utils, every rank's stack)
    # (collectives may wait 240 s: on a loaded 2-core machine one rank can finish its example's
    # last save well after the other has reached the harness's final barrier)
    r0, _ = run_distributed(_run_python_example, 2, str(tmp_path), name, timeout=420, pg_timeout_s=240)
    if name == "hf-trainer":
        hf = sorted(os.listdir(tmp_path / "hf-trainer" / "out_hf"))
        assert "checkpoint-2" in hf and "checkpoint-4" in hf, hf
    else:
        assert f"ckpt_{name}" in r0, r0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_example_runs(tmp_path):
    require_module("deepspeed", "deepspeed==0.19.8")
    script = tmp_path / "train_ds.py"
    script.write_text(example("deepspeed"))
    wrapper = tmp_path / "run_example.py"
    wrapper.write_text(
        "import runpy, sys\nimport torch.distributed as dist\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "dist.barrier()\ndist.destroy_process_group()\n")
    env = clean_env(DS_ACCELERATOR="cpu", LOCAL_SIZE="2", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(wrapper)]
    log = tmp_path / "ds.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    assert rc == 0, log.read_text()[-5000:]
    assert (tmp_path / "ckpt_ds").is_dir() and any((tmp_path / "ckpt_ds").iterdir())


def test_own_trainer_example_runs(tmp_path):
    words = shlex.split(example("own-trainer"))
    assert words[:2] == ["flashoptim-dist", "train"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flashoptim_dist.cli", *words[1:], *TINY, f"train.out_dir={out}", "train.steps=2",
           "train.ckpt_every=0"]
    run(cmd, cwd=Path(ROOT), env=clean_env())
    s = summary(out)
    assert s["world_size"] == 2 and s["final_step"] == 2
