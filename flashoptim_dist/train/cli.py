"""Command line of the trainer.

    flashoptim-dist train   [--config FILE] [section.key=value ...]
    flashoptim-dist compare [--config FILE] [section.key=value ...]
    python -m flashoptim_dist.train [train|compare] [--config FILE] [section.key=value ...]

Without ``--config`` the built-in defaults are used, which are the CPU demo (a tiny GPT on
FSDP2 with FlashAdamW, byte-level standard-library corpus). ``--help-config`` lists every key;
``--print-config`` shows the resolved config and exits.

Launching: run the command under torchrun, the deepspeed launcher, ``srun`` or ``mpirun`` (see
``launch/``); :mod:`flashoptim_dist.launch_env` reads any of them. Run without a launcher, the
command starts ``dist.nproc_per_node`` local ranks itself through torchrun (``auto``: one per GPU,
or 2 on a CPU-only machine; 1 for ``engine.name=single``).

Exit codes: 0 success, 2 configuration error (the message names the key, value and fix),
1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from .. import launch_env
from .config import ConfigError, config_to_dict, describe_config, load_config

__all__ = ["main", "train_main", "compare_main", "build_parser", "resolve_nproc"]

COMMANDS = ("train", "compare")
_NO_RELAUNCH = "FLASHOPTIM_DIST_NO_RELAUNCH"


def build_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of ``train`` or ``compare``."""
    p = argparse.ArgumentParser(
        prog=f"flashoptim-dist {command}",
        description=(
            "Train a model with a Flash optimizer under single/DDP/FSDP2/FSDP1/ZeRO."
            if command == "train"
            else "Train with the Flash optimizer and with its torch baseline on the same data and seed; "
            "write a PNG (loss curves, validation loss, memory per rank) and a table."
        ),
        epilog="Overrides: section.key=value, e.g. optim.lr=3e-4 train.steps=50 engine.name=ddp. "
        "See --help-config for every key.",
    )
    p.add_argument("--config", "-c",
                   help="YAML or JSON config file (e.g. configs/cpu_demo.yaml); default: the CPU demo")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key with its type, default and meaning")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def resolve_nproc(cfg) -> int:
    """Ranks to start locally when no launcher is around (dist.nproc_per_node, 'auto' resolved)."""
    n = cfg.dist.nproc_per_node
    if cfg.engine.name == "single":
        return 1
    if n != "auto":
        return int(n)
    try:
        import torch

        if torch.cuda.is_available() and cfg.train.device != "cpu":
            return max(1, torch.cuda.device_count())
    except ImportError:  # pragma: no cover
        pass
    return 2


def _is_rank0() -> bool:
    try:
        return launch_env.detect().rank == 0
    except launch_env.LaunchEnvError:
        return True


def _relaunch(command: str, argv: list[str], nproc: int) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "flashoptim_dist.train", command, *argv,
    ]
    print(f"[flashoptim-dist] no launcher detected: starting {nproc} local ranks with torchrun "
          f"(dist.nproc_per_node={nproc}; set it to 1 to run in this process)", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def _run(command: str, argv: list[str]) -> int:
    args = build_parser(command).parse_args(argv)
    if args.help_config:
        print(describe_config())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if _is_rank0():
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return 0
    try:
        le = launch_env.detect()
    except launch_env.LaunchEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if le.launcher == "none" and not os.environ.get(_NO_RELAUNCH):
        nproc = resolve_nproc(cfg)
        if nproc > 1:
            _relaunch(command, argv, nproc)
    from .engines import EngineError

    try:
        if command == "train":
            from .trainer import main_train

            main_train(cfg)
        else:
            from .compare import main_compare

            main_compare(cfg)
    except (EngineError, launch_env.LaunchEnvError, ImportError, FileNotFoundError) as e:
        # Problems of the setup, with messages that name the fix; anything else keeps its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def train_main(argv: Optional[list[str]] = None) -> int:
    """``flashoptim-dist train``."""
    return _run("train", list(sys.argv[1:] if argv is None else argv))


def compare_main(argv: Optional[list[str]] = None) -> int:
    """``flashoptim-dist compare``."""
    return _run("compare", list(sys.argv[1:] if argv is None else argv))


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m flashoptim_dist.train [train|compare] ...``; the subcommand defaults to train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return _run(argv[0], argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return _run("train", argv)
