"""The peer baseline of `cargo bench --bench training -- --method dpo`: TRL's DPOTrainer with PEFT
(a new LoRA adapter, r=8, alpha 16, no dropout, the reference being the base with the adapter
disabled, sigmoid loss, beta 0.1) on the same base directory, AdamW lr 2e-4; batches of 4 pairs of
random tokens, each sequence 128 long (half prompt, half completion), laid out as TRL's collator
lays them out and passed to the trainer's own compute_loss; one warm-up step, then timed steps.
Prints one JSON line (pairs/s, tokens/s counting both sequences of a pair, peak RSS).

    python bench/trl_dpo_baseline.py MODEL_DIR qv|all-linear [STEPS]
"""

import json
import os
import resource
import sys
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

model_dir, targets = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
pairs, seq = 4, 128
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"] if targets == "qv" else "all-linear")
with tempfile.TemporaryDirectory() as tmp:
    args = DPOConfig(output_dir=tmp, beta=0.1, per_device_train_batch_size=pairs, learning_rate=2e-4, report_to=[], use_cpu=True, bf16=False)
    # the trainer needs a dataset to start; the timed batches are made below
    seed_data = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(model=base, peft_config=lora, args=args, train_dataset=seed_data, processing_class=tok)
model = trainer.model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
vocab = model.config.vocab_size
half = seq // 2
completion = torch.cat([torch.zeros(2 * pairs, half, dtype=torch.long), torch.ones(2 * pairs, seq - half, dtype=torch.long)], 1)
times = []
for step in range(steps + 1):
    prompt = torch.randint(0, vocab, (pairs, half))
    ids = torch.cat([torch.cat([prompt, torch.randint(0, vocab, (pairs, seq - half))], 1),
                     torch.cat([prompt, torch.randint(0, vocab, (pairs, seq - half))], 1)])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    t = time.perf_counter()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
import peft
import trl
print(json.dumps({
    "engine": f"TRL {trl.__version__} + PEFT {peft.__version__} / torch {torch.__version__} (CPU, {torch.get_num_threads()} threads)",
    "training": targets, "method": "dpo", "batch": f"{pairs} x {seq}",
    "pairs_per_s": steps * pairs / sum(times[1:]), "tokens_per_s": steps * pairs * 2 * seq / sum(times[1:]),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "steps": steps,
}))
