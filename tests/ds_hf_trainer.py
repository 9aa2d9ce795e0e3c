"""register() under a real framework caller: Hugging Face Trainer (-> Accelerate -> deepspeed.initialize).

Launched by tests/deepspeed/test_deepspeed.py as ``deepspeed --num_gpus 2 tests/ds_hf_trainer.py --out R.json
--workdir DIR`` with DS_ACCELERATOR=cpu. The DeepSpeed config (configs/ds_hf_zero3.json) names
``"optimizer": {"type": "FlashAdamW"}`` with HF's "auto" values; neither Trainer nor Accelerate
know the name, only the register() hook does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import flashoptim_dist.deepspeed as fds  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=16, vocab=97):
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, vocab, (n, seq), generator=g)
        self.items = [{"input_ids": row, "labels": row.clone()} for row in base]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    a, _ = ap.parse_known_args()
    rec = {}
    try:
        fds.register()
        from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

        args = TrainingArguments(
            output_dir=os.path.join(a.workdir, "hf_out"),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=6,
            learning_rate=1e-2,
            weight_decay=0.01,
            max_grad_norm=1.0,
            bf16=True,
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            deepspeed=os.path.join(ROOT, "configs", "ds_test_hf_zero3.json"),
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=67, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        trainer = Trainer(model=model, args=args, train_dataset=Tokens())
        trainer.train()
        engine = trainer.model_wrapped
        flats = fds.flat_partitions(engine)
        from flashoptim_dist.layout import get_shard_spec

        import torch.distributed as dist

        rec = {
            "world": dist.get_world_size(),
            "engine": type(engine).__name__,
            "zero_optimizer": type(engine.optimizer).__name__,
            "basic_optimizer": type(engine.basic_optimizer).__name__,
            "flat_dtypes": sorted({str(f.dtype) for f in flats}),
            "specs": all(get_shard_spec(f) is not None for f in flats) and len(flats) > 0,
            "has_rho": all("rho" in engine.basic_optimizer.state[f] for f in flats),
            "bf16_master": bool(engine._config.bfloat16_config.bf16_master_weights_and_grads),
            "lr": engine.basic_optimizer.param_groups[0]["lr"],
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        }
    except Exception:
        rec["error"] = traceback.format_exc()
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1, default=str)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
