"""bench/quality.py's tables (issue 13) and the metrics reader they share with the trainer:
docs/QUALITY.md's numbers come from ``--summarize``, so it must read what the trainer writes,
including a file whose last line a killed run cut short (a run stopped at the device's limit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flashoptim_dist.train.trainer import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _write_run(folder: Path, evals: dict, cut: bool = False) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"kind": "train", "step": 1, "loss": 5.0})]
    lines += [json.dumps({"kind": "eval", "step": s, "val_loss": v}) for s, v in evals.items()]
    text = "\n".join(lines) + "\n"
    if cut:
        text += '{"kind": "eval", "step": 999, "val_lo'  # the write a kill interrupted
    (folder / "metrics.jsonl").write_text(text)


def test_read_metrics_skips_a_cut_line_and_a_missing_file(tmp_path):
    _write_run(tmp_path / "r", {125: 1.5, 250: 1.0}, cut=True)
    recs = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r.get("step") for r in recs] == [1, 125, 250]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_summarize_reports_every_run_the_spread_and_the_mean_gap(tmp_path):
    _write_run(tmp_path / "adamw_AdamW_b0.999_s0", {125: 1.50, 250: 1.00})
    _write_run(tmp_path / "adamw_AdamW_b0.999_s1", {125: 1.40, 250: 1.02})
    _write_run(tmp_path / "adamw_FlashAdamW_b0.999_s0", {125: 1.47, 250: 1.04}, cut=True)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--summarize", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| run")}
    assert rows["adamw_FlashAdamW_b0.999_s0"] == ["1.4700", "1.0400"]  # the cut line is not a step
    assert rows["AdamW seed spread (max − min)"] == ["0.1000", "0.0200"]
    assert rows["FlashAdamW − AdamW (means)"] == ["+0.0200", "+0.0300"]
