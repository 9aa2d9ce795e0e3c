"""``flashoptim-dist compare``: the Flash optimizer against its torch baseline, same data and seed.

Runs :func:`~.trainer.run_training` twice in one process group: first ``optim.name`` (e.g.
FlashAdamW on bf16 params), then its baseline (``compare.baseline``, default the torch
optimizer of the same family, e.g. AdamW on fp32 params with bf16 compute). Each run writes to
``<out>/<optimizer>/`` (its own metrics, checkpoints and summary; a repeated compare resumes or
skips finished runs). Rank 0 then writes:

* ``<out>/compare.png``: training loss per step, validation loss per evaluation, and memory per
  rank (params / grads / optimizer state, stacked) for both optimizers;
* ``<out>/compare.md`` and ``compare.json``: final train and validation loss, their difference,
  tokens/s, bytes/param and peak memory per rank.

``<out>`` is ``compare.out_dir`` or ``<train.out_dir>/compare``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch.distributed as dist

from .config import Config, validate
from .optimizers import baseline_of, is_flash
from .trainer import in_process_group, read_metrics, run_training

__all__ = ["run_compare", "main_compare", "plot_compare", "compare_table"]


def compare_table(results: list[dict]) -> str:
    """Markdown table of the runs plus a line on the validation-loss difference."""
    lines = [
        "| optimizer | steps | final train loss | final val loss | tokens/s | bytes/param | peak MiB per rank |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rows = r["rows"]
        n = sum(max(x["local_params"], 0) for x in rows) or 1
        bpp = sum(x["param_bytes"] + x["grad_bytes"] + x["optim_bytes"] for x in rows) / n
        peaks = ", ".join(f"{x['peak_bytes'] / 2**20:.0f}" for x in rows)
        val = "n/a" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
        lines.append(
            f"| {r['optimizer']} | {r['final_step']} | {r['final_loss']:.4f} | {val} | {r['tokens_per_s']:,.0f} | "
            f"{bpp:.2f} | {peaks} |"
        )
    if len(results) == 2 and all(r["final_val_loss"] is not None for r in results):
        a, b = results[0]["final_val_loss"], results[1]["final_val_loss"]
        lines.append("")
        lines.append(
            f"validation loss: {results[0]['optimizer']} {a:.4f} vs {results[1]['optimizer']} {b:.4f}: "
            f"difference {a - b:+.4f} ({100 * (a - b) / b:+.2f}% of the baseline)"
        )
    return "\n".join(lines)


def plot_compare(results: list[dict], metrics: list[list[dict]], path: Path) -> Path:
    """Write the three-panel comparison PNG to ``path`` (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("compare writes a PNG with matplotlib: `pip install matplotlib`") from e

    fig, (ax_loss, ax_val, ax_mem) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for i, (res, recs) in enumerate(zip(results, metrics)):
        tr = [r for r in recs if r.get("kind") == "train"]
        ev = [r for r in recs if r.get("kind") == "eval"]
        ax_loss.plot([r["step"] for r in tr], [r["loss"] for r in tr], color=colors[i], label=res["optimizer"], lw=1.2)
        ax_val.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color=colors[i], label=res["optimizer"])
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss (nats/token)")
    ax_val.set(title="validation loss", xlabel="step", ylabel="loss (nats/token)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()

    width = 0.8 / max(1, len(results))
    parts = [("param_bytes", "params", 1.0), ("grad_bytes", "grads", 0.65), ("optim_bytes", "optimizer state", 0.35)]
    for i, res in enumerate(results):
        rows = res["rows"]
        xs = [r["rank"] + (i - (len(results) - 1) / 2) * width for r in rows]
        bottom = [0.0] * len(rows)
        for key, label, alpha in parts:
            vals = [r[key] / 2**20 for r in rows]
            ax_mem.bar(xs, vals, width * 0.95, bottom=bottom, color=colors[i], alpha=alpha,
                       label=f"{res['optimizer']}: {label}", edgecolor="black", linewidth=0.4)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax_mem.set(title="memory per rank (params / grads / optimizer state)", xlabel="rank", ylabel="MiB")
    ax_mem.set_xticks(sorted({r["rank"] for r in results[0]["rows"]}))
    ax_mem.legend(fontsize=7, loc="upper center")
    ax_mem.grid(alpha=0.3, axis="y")
    fig.suptitle(" vs ".join(f"{r['optimizer']} ({r['engine']} x {r['world_size']})" for r in results))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_compare(cfg: Config) -> dict:
    """Run both optimizers (inside an initialised process group) and write the PNG and table."""
    out = Path(cfg.compare.out_dir or Path(cfg.train.out_dir) / "compare")
    names = [cfg.optim.name, cfg.compare.baseline or baseline_of(cfg.optim.name)]
    if names[0] == names[1]:
        raise ValueError(
            f"optim.name={names[0]!r} is already a torch baseline; set optim.name to a Flash optimizer "
            "or compare.baseline to another optimizer"
        )
    results, metrics = [], []
    for name in names:
        sub = copy.deepcopy(cfg)
        sub.optim.name = name
        if not is_flash(name):
            sub.optim.gradient_release = False
        sub.train.out_dir = str(out / name)
        sub.compare.baseline = None
        validate(sub)
        results.append(run_training(sub))
        metrics.append(read_metrics(out / name / "metrics.jsonl"))
    report = {"runs": results}
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        table = compare_table(results)
        png = plot_compare(results, metrics, out / "compare.png")
        (out / "compare.md").write_text(table + "\n")
        (out / "compare.json").write_text(json.dumps(report, indent=1))
        print(f"\n[flashoptim-dist] compare\n{table}\n\nwrote {png}", flush=True)
        report["png"] = str(png)
    return report


def main_compare(cfg: Config) -> dict:
    """Start the process group, run :func:`run_compare`, end cleanly."""
    return in_process_group(run_compare, cfg)
