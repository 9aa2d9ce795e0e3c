"""Turn a DeepSpeed ZeRO checkpoint written with FlashAdamW/FlashAdam into a plain one — the files
DeepSpeed writes for its own Adam — so DeepSpeed's tools work on it, universal checkpoints first.

A Flash checkpoint's ZeRO files hold, per flat partition, the bf16 weights and the optimizer's
ρ, int8/uint8 codes and bf16 scales. DeepSpeed's ``ds_to_universal`` (and any tool that reads
ZeRO optimizer files) expects fp32 partitions and fp32 ``exp_avg``/``exp_avg_sq``. This module
writes a copy of the checkpoint in which

* the partitions (``single_partition_of_fp32_groups`` for ZeRO-1/2, ``fp32_flat_groups`` for
  ZeRO-3) are the fp32 masters θ' + ρ correction (``numerics.merge_master``, as
  :mod:`.zero_to_fp32` exports them),
* the client optimizer's state per partition is ``{"step", "exp_avg", "exp_avg_sq"}`` in fp32,
  dequantized with the groups the optimizer used (rebuilt from DeepSpeed's own fragment
  metadata by :func:`flashoptim_dist.deepspeed.read_zero_checkpoint`),

and everything else (model states, ``latest``, the other keys of each file) is copied as is.
Then::

    python -m flashoptim_dist.deepspeed.plain_checkpoint CKPT_DIR PLAIN_DIR [--tag TAG]
    python -m deepspeed.checkpoint.ds_to_universal --input_folder PLAIN_DIR/TAG \\
        --output_folder UNIVERSAL_DIR --inject_missing_state

gives a universal checkpoint that DeepSpeed loads (``checkpoint.load_universal``) at another
world size or topology with its own Adam. Loading a universal checkpoint back into a Flash
optimizer is not supported; to move a Flash run between world sizes or engines keep the 8-bit
state: ``flashoptim-dist ckpt convert`` (:mod:`flashoptim_dist.checkpoint`) reshards it.

Memory: one rank's file at a time plus its fp32 copy (≈ 14 bytes per partition element).
Only the Adam family has this format; SGD and Lion checkpoints are refused.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
from typing import Optional

import torch

from .. import numerics as nx
from .. import layout as lay
from ..reference import FAMILIES
from .zero_checkpoint import read_zero_checkpoint

__all__ = ["convert_to_plain_checkpoint"]


def _dequantized(local: torch.Tensor, layout, st: dict, name: str, kind: str, group_size: int) -> torch.Tensor:
    """fp32 moment over the whole partition (0 in padding), from codes + scales or fp32 state."""
    values = st[name]
    if values.dtype == torch.float32:  # quantize=False: the moment is stored in fp32
        return values.reshape(-1).clone()
    out = torch.zeros(local.numel(), dtype=torch.float32)
    fn = nx.dequantize_signed if kind == "signed" else nx.dequantize_sqrt
    scales = st[name + "_scales"]
    for run in lay.segment_runs(layout):
        if run.segment.key is None:  # padding of the flat partition
            continue
        out[run.local] = fn(values[run.local], scales[run.scales], group_size, run.phase)
    return out


def convert_to_plain_checkpoint(checkpoint_dir: str, output_dir: str, tag: Optional[str] = None,
                                overwrite: bool = False) -> str:
    """Write a plain-Adam copy of DeepSpeed checkpoint ``checkpoint_dir`` (tag ``tag`` or the
    ``latest`` one) under ``output_dir/<tag>``; returns that directory."""
    ck = read_zero_checkpoint(checkpoint_dir, tag)
    if ck["fmeta"]["family"] != "adam":
        raise ValueError(
            f"{ck['dir']}: written by a {ck['cls_name']} ({ck['fmeta']['family']} family); DeepSpeed's plain and "
            "universal checkpoint formats hold Adam moments (exp_avg, exp_avg_sq) only. Reshard it with "
            "`flashoptim-dist ckpt convert` instead."
        )
    src = ck["dir"]
    tag_name = os.path.basename(os.path.normpath(src))
    dst = os.path.join(output_dir, tag_name)
    if os.path.abspath(dst) == os.path.abspath(src):
        raise ValueError("output_dir must differ from the checkpoint directory (the checkpoint is not modified)")
    if os.path.exists(dst):
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(dst)
    os.makedirs(dst)
    optim_files = set(ck["optim_files"])
    for f in sorted(glob.glob(os.path.join(src, "*"))):
        if f not in optim_files and os.path.isfile(f):
            shutil.copy2(f, os.path.join(dst, os.path.basename(f)))
    latest = os.path.join(os.fspath(checkpoint_dir), "latest")
    if os.path.isfile(latest):
        with open(os.path.join(output_dir, "latest"), "w") as fh:
            fh.write(tag_name)
    stage, cfg = ck["stage"], ck["config"]
    states = [(name, kind) for name, kind in FAMILIES["adam"]]
    flat_key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    client_key = "optimizer_state_dict" if stage == 3 else "base_optimizer_state"
    for f, (_, tensors) in zip(ck["optim_files"], ck["ranks"]):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        osd = sd["optimizer_state_dict"]
        client = osd[client_key]
        flats = osd[flat_key]
        new_state, new_flats = {}, []
        for i, ((local, segs, _, st), flat) in enumerate(zip(tensors, flats)):
            layout = lay.state_layout_for(local, segs, cfg)
            # full partitions: in bf16-master mode ZeRO-1/2 save theirs without the tail padding,
            # but the fragment addresses (and DeepSpeed's fp32 mode) count it
            master = nx.merge_master(local.reshape(-1), st.get("rho")) if "rho" in st else local.reshape(-1).float()
            new_flats.append(master.clone() if flat.dim() == 1 else master.view(flat.shape).clone())
            entry = {"step": torch.tensor(float(st.get("step", 0)))}
            for name, kind in states:
                entry[name] = _dequantized(local, layout, st, name, kind, cfg.group_size)
            new_state[i] = entry
        osd[flat_key] = new_flats
        client["state"] = new_state
        client.pop("flashoptim", None)
        torch.save(sd, os.path.join(dst, os.path.basename(f)))
        del sd
    return dst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint_dir")
    ap.add_argument("output_dir")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    out = convert_to_plain_checkpoint(a.checkpoint_dir, a.output_dir, a.tag, a.overwrite)
    print(f"wrote {out}; for a universal checkpoint: python -m deepspeed.checkpoint.ds_to_universal "
          f"--input_folder {out} --output_folder <dir> --inject_missing_state")


if __name__ == "__main__":
    main()
