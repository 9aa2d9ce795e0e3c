"""``flashoptim-dist ckpt ...`` commands: inspect, export, convert.

Wire into a parent parser with :func:`add_subparsers` (each sub-command sets ``func`` to its
handler, which returns an exit status), or run standalone::

    python -m flashoptim_dist.checkpoint.cli inspect PATH [--verify] [--tensors] [--json]
    python -m flashoptim_dist.checkpoint.cli export PATH OUT [--dtype fp32|bf16] [--max-shard-size 5GB]
    python -m flashoptim_dist.checkpoint.cli convert DS_CKPT_DIR OUT --model-factory module:function
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ..utils import fmt_bytes

__all__ = ["add_subparsers", "main", "cmd_inspect", "cmd_export", "cmd_convert"]


def cmd_inspect(args) -> int:
    from . import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(args.path, verify=args.verify)
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    if args.json:
        if not args.tensors:
            info = {k: v for k, v in info.items() if k != "tensors"}
        print(json.dumps(info, indent=1, default=str))
        return 0 if info.get("verified", True) else 1
    print(f"checkpoint: {info['path']}")
    if info["kind"] == "torch" and info.get("flash_state"):
        fl = info["flash_state"]
        print("kind: standard DCP checkpoint (torch get_state_dict + dcp.save) holding Flash optimizer state; load it "
              "the same way: get_state_dict(model, opt) as template, dcp.load, set_state_dict")
        print(f"flash state: {fl['params']} parameters, family {fl['family']}, states {fl['state_names']}, "
              f"rho {fl['rho_dtype']}, scales layout {fl['scales_layout']}")
    elif info["kind"] == "torch":
        print("kind: plain DCP checkpoint (torch.optim); load it with "
              "flashoptim_dist.checkpoint.load(..., convert=True)")
    else:
        print(f"format version: {info['format_version']}  (flashoptim_dist {info.get('flashoptim_dist_version')}, "
              f"torch {info.get('torch_version')})")
        print(f"written by: world size: {info['world_size']}, engine: {info['engine']}, step: {info['step']}")
        opt = info.get("optimizer")
        if opt:
            cfg = opt["config"]
            print(f"optimizer: {opt['class']} (family {opt['family']}), states {opt['state_names']}")
            print("numeric config: "
                  + ", ".join(f"{k}={cfg[k]}" for k in ("group_size", "quantize", "master_weight_bits")))
            for i, g in enumerate(opt["param_groups"]):
                print(f"  param group {i}: " + ", ".join(f"{k}={v}" for k, v in g.items() if not k.startswith("_")))
        else:
            print("optimizer: none (model only)")
    print(f"parameters: {info['numel']:,}")
    print(f"bytes on disk: {info['bytes']:,} ({fmt_bytes(info['bytes'])}), bytes/param: {info['bytes_per_param']:.4f}")
    tb = info["tensor_bytes"]
    n = max(info["numel"], 1)
    print("  by kind: " + ", ".join(f"{k} {v / n:.4f} B/param" for k, v in sorted(tb.items())))
    if "verified" in info:
        print("verified: ok" if info["verified"] else "verified: FAILED")
        for e in info.get("errors", []):
            print(f"  {e}")
    if args.tensors:
        print(f"{'key':60s} {'shape':>18s} {'dtype':>9s} {'chunks':>6s} {'bytes':>12s}")
        for t in info["tensors"]:
            if t["kind"] == "object":
                print(f"{t['key']:60s} {'(object)':>18s}")
                continue
            print(f"{t['key']:60s} {str(t['shape']):>18s} {t['dtype']:>9s} {t['chunks']:>6d} {t['bytes']:>12,d}")
    return 0 if info.get("verified", True) else 1


def _dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise SystemExit(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def cmd_export(args) -> int:
    from . import CheckpointError, export_checkpoint

    strip = args.strip_prefix

    def name_map(fqn: str) -> str:
        return fqn[len(strip):] if strip and fqn.startswith(strip) else fqn

    try:
        out = export_checkpoint(args.path, args.out, dtype=_dtype(args.dtype), max_shard_size=args.max_shard_size,
                                name_map=name_map if strip else None, include_buffers=not args.no_buffers,
                                verify="none" if args.no_verify else "checksum")
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    print(f"wrote {len(out['files'])} file(s), {out['tensors']} tensors, {fmt_bytes(out['total_size'])} to {args.out}")
    return 0


def cmd_convert(args) -> int:
    from . import CheckpointError
    from ._convert import convert_deepspeed_checkpoint

    try:
        out = convert_deepspeed_checkpoint(args.path, args.out, tag=args.tag, overwrite=args.overwrite)
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    print(f"converted DeepSpeed ZeRO-{out['stage']} checkpoint ({out['world_size']} ranks, {out['numel']:,} params) "
          f"to {args.out}: {fmt_bytes(out['bytes'])}, {out['bytes_per_param']:.3f} bytes/param")
    return 0


def add_subparsers(subparsers) -> None:
    """Add ``inspect``, ``export`` and ``convert`` to an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser("inspect", help="describe a checkpoint: config, world size, bytes per param, tensors")
    p.add_argument("path")
    p.add_argument("--verify", action="store_true", help="check every file's size and CRC-32")
    p.add_argument("--tensors", action="store_true", help="list every stored tensor")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("export", help="write fp32/bf16 safetensors (Hugging Face layout) from a checkpoint")
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--dtype", default="fp32", help="fp32 (masters θ'+ρ, default) or bf16")
    p.add_argument("--max-shard-size", default="5GB", help="split into files of at most this size (default 5GB)")
    p.add_argument("--strip-prefix", default="", help="remove this prefix from tensor names (e.g. 'model.')")
    p.add_argument("--no-buffers", action="store_true", help="export parameters only")
    p.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of the checkpoint")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("convert", help="convert a DeepSpeed ZeRO checkpoint written with a Flash optimizer")
    p.add_argument("path", help="DeepSpeed checkpoint directory (the one holding 'latest' or the tag directory)")
    p.add_argument("out", help="output flashoptim_dist checkpoint directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="flashoptim-dist ckpt", description=__doc__.splitlines()[0])
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
