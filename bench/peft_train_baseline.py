"""The peer baseline of bench/training.rs: the same LoRA SFT steps in PEFT (r=8, alpha 16, no
dropout, AdamW lr 2e-4, batches of 4 x 128 random tokens, every token trained on) on the same
base directory (or GGUF, dequantized to f32 by transformers); one warm-up step, then timed steps.
With `full`, transformers' full fine-tuning instead: every weight, torch's AdamW. Prints one JSON line.

    python bench/peft_train_baseline.py MODEL_DIR|FILE.gguf qv|all-linear|full [STEPS]
"""

import json
import os
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

model_dir, targets = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
torch.manual_seed(0)
gguf = {}
if model_dir.endswith(".gguf"):
    model_dir, gguf = os.path.dirname(os.path.abspath(model_dir)), {"gguf_file": os.path.basename(model_dir)}
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **gguf)
if targets == "full":
    model = base.train()
else:
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "v_proj"] if targets == "qv" else "all-linear")
    model = get_peft_model(base, config).train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
vocab = model.config.vocab_size
times = []
for step in range(steps + 1):
    ids = torch.randint(0, vocab, (4, 128))
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
import peft
import transformers
if targets == "full":
    trainable = sum(p.numel() for p in model.parameters())
    engine = f"transformers {transformers.__version__} / torch {torch.__version__} (CPU, {torch.get_num_threads()} threads)"
else:
    trainable, _ = model.get_nb_trainable_parameters()
    engine = f"PEFT {peft.__version__} / torch {torch.__version__} (CPU, {torch.get_num_threads()} threads)"
print(json.dumps({
    "engine": engine,
    "training": targets, "trainable_params": trainable, "batch": "4 x 128",
    "tokens_per_s": steps * 4 * 128 / sum(times[1:]),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "steps": steps,
}))
