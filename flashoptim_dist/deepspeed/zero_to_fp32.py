"""fp32 weights from a DeepSpeed ZeRO checkpoint written with a Flash optimizer, ρ included.

DeepSpeed's ``zero_to_fp32`` concatenates each rank's saved flat partitions
(``single_partition_of_fp32_groups`` for ZeRO-1/2, ``fp32_flat_groups`` for ZeRO-3). In
bf16-master mode those partitions are the bare bf16 weights; the rest of the fp32 master is the
Flash optimizer's ρ, saved in the client optimizer's state dict of the same checkpoint. This
module merges every rank's partition with its ρ (``numerics.merge_master``: the bf16 bit split, or
the linear form of state format ≤ 2) and then lets DeepSpeed's own reconstruction cut the merged fp32 partitions into
parameters, so padding, alignment and ZeRO-3 interleaving are handled exactly as DeepSpeed does.

Usage::

    from flashoptim_dist.deepspeed import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint("checkpoints/")   # {fqn: fp32 tensor}

or ``python -m flashoptim_dist.deepspeed.zero_to_fp32 CHECKPOINT_DIR OUTPUT_FILE [--tag TAG]``.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

import torch

from flashoptim_dist.numerics import merge_master

__all__ = [
    "get_fp32_state_dict_from_zero_checkpoint",
    "convert_zero_checkpoint_to_fp32_state_dict",
    "merged_flat_groups",
]


def _ds_z2f():
    try:
        from deepspeed.utils import zero_to_fp32 as z2f
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading DeepSpeed checkpoints needs deepspeed installed") from e
    needed = ("get_model_state_files", "get_optim_files", "parse_model_states",
              "_get_fp32_state_dict_from_zero2_checkpoint", "_get_fp32_state_dict_from_zero3_checkpoint",
              "to_torch_tensor")
    missing = [n for n in needed if not hasattr(z2f, n)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"deepspeed.utils.zero_to_fp32 of DeepSpeed {deepspeed.__version__} lacks {missing}; "
            "flashoptim_dist.deepspeed.zero_to_fp32 was written against DeepSpeed 0.19.8"
        )
    return z2f


def _resolve_tag(checkpoint_dir: str, tag: Optional[str]) -> str:
    if tag is not None:
        return tag
    latest = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(latest):
        raise ValueError(f"no tag given and no 'latest' file in {checkpoint_dir}")
    with open(latest) as f:
        return f.read().strip()


def _client_state_dict(osd: dict, stage: int):
    """The client (Flash) optimizer's state dict inside a ZeRO stage's saved optimizer state."""
    return osd.get("base_optimizer_state") if stage <= 2 else osd.get("optimizer_state_dict")


def _client_state_per_flat(osd: dict, stage: int) -> List[Optional[dict]]:
    """The client (Flash) optimizer's per-tensor state, in the order of the saved flat groups."""
    client = _client_state_dict(osd, stage)
    if not isinstance(client, dict) or "state" not in client:
        raise ValueError(
            "the checkpoint's optimizer state is not a plain per-tensor state dict (elastic checkpoint?); "
            "cannot find ρ"
        )
    # torch numbers tensors in param-group order; each ZeRO group (1/2) or sub-group (3) is one tensor,
    # and ZeRO-3 appends sub-groups to their groups in sub-group order.
    ids = [pid for g in client["param_groups"] for pid in g["params"]]
    return [client["state"].get(pid) for pid in ids]


def merged_flat_groups(optim_state_dict: dict) -> List[torch.Tensor]:
    """One rank's saved flat partitions merged with ρ into fp32 (bare upcast where no ρ is kept)."""
    osd = optim_state_dict["optimizer_state_dict"]
    stage = int(osd["zero_stage"])
    flats = osd["single_partition_of_fp32_groups"] if stage <= 2 else osd["fp32_flat_groups"]
    states = _client_state_per_flat(osd, stage)
    client = _client_state_dict(osd, stage)
    # ρ of bf16 partitions in the linear form before state format version 3 (numerics module doc)
    linear = int((client.get("flashoptim") or {}).get("format_version", 2)) <= 2
    if len(states) != len(flats):
        raise ValueError(f"checkpoint has {len(flats)} flat partitions but {len(states)} optimizer tensors")
    out = []
    for flat, st in zip(flats, states):
        rho = None if st is None else st.get("rho")
        if rho is None or flat.dtype == torch.float32:
            out.append(flat.float())
            continue
        # ZeRO-1/2 saves the partition without its tail padding; ρ covers the full partition.
        out.append(merge_master(flat.reshape(-1), rho.reshape(-1)[: flat.numel()], linear).view(flat.shape))
    return out


def get_fp32_state_dict_from_zero_checkpoint(
    checkpoint_dir: str, tag: Optional[str] = None, exclude_frozen_parameters: bool = False
) -> Dict[str, torch.Tensor]:
    """``{fqn: fp32 tensor}`` from a ZeRO-1/2/3 checkpoint, reconstructed as θ' + ρ correction."""
    z2f = _ds_z2f()
    ds_dir = os.path.join(checkpoint_dir, _resolve_tag(checkpoint_dir, tag))
    if not os.path.isdir(ds_dir):
        raise FileNotFoundError(f"checkpoint directory {ds_dir!r} does not exist")
    model_states = z2f.parse_model_states(z2f.get_model_state_files(ds_dir))
    optim_files = z2f.get_optim_files(ds_dir)
    flat_groups, paddings, stage, world = [], None, None, None
    for f in optim_files:
        sd = torch.load(f, map_location="cpu", weights_only=False)
        osd = sd["optimizer_state_dict"]
        stage = int(osd["zero_stage"])
        world = osd["partition_count"]
        paddings = osd.get("param_alignment_paddings", paddings)
        flat_groups.append(merged_flat_groups(sd))
        del sd
    if isinstance(world, list):
        world = max(world)
    if world != len(optim_files):
        raise ValueError(f"expected {world} *_optim_states.pt files in {ds_dir}, found {len(optim_files)}")
    if stage <= 2:
        sd = z2f._get_fp32_state_dict_from_zero2_checkpoint(
            world, flat_groups, model_states, exclude_frozen_parameters, paddings)
    else:
        sd = z2f._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, model_states, exclude_frozen_parameters)
    return z2f.to_torch_tensor(sd)


def convert_zero_checkpoint_to_fp32_state_dict(
    checkpoint_dir: str, output_file: str, tag: Optional[str] = None, exclude_frozen_parameters: bool = False
) -> str:
    """Write the ρ-reconstructed fp32 state dict to ``output_file`` (``.safetensors`` or torch.save)."""
    sd = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag, exclude_frozen_parameters)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if output_file.endswith(".safetensors"):
        from safetensors.torch import save_file

        # tied weights share storage; safetensors wants each tensor once
        seen, out = {}, {}
        for k, v in sd.items():
            out[k] = v.clone() if v.data_ptr() in seen else v
            seen[v.data_ptr()] = k
        save_file(out, output_file)
    else:
        torch.save(sd, output_file)
    return output_file


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint_dir")
    ap.add_argument("output_file", help="*.safetensors or a torch.save file")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--exclude_frozen_parameters", action="store_true")
    a = ap.parse_args(argv)
    out = convert_zero_checkpoint_to_fp32_state_dict(a.checkpoint_dir, a.output_file, a.tag,
                                                     a.exclude_frozen_parameters)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
