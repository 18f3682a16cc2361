"""The peer baseline of bench/adapters.rs: the same adapter files (written by our save_adapter) and
the same verbs in PEFT on the same base directory; prints one JSON line of medians in ms. That PEFT
loads these files at all also checks that adapters we save load in PEFT.

    python bench/peft_baseline.py MODEL_DIR ADAPTERS_DIR [REPEATS]
"""

import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

model_dir, adapters_dir = sys.argv[1], sys.argv[2]
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 7
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def timed(fn, n=repeats, setup=None):
    out = []
    for _ in range(n):
        state = setup() if setup else None
        t = time.perf_counter()
        fn(state)
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


results = {}
for name in ["qv", "all_linear"]:
    path = os.path.join(adapters_dir, name)
    fresh = lambda: copy.deepcopy(base)
    load_ms = timed(lambda b: PeftModel.from_pretrained(b, path, adapter_name="x"), setup=fresh)
    model = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name="x")
    model.load_adapter(path, adapter_name="y")
    flip = [False]

    def switch(_):
        flip[0] = not flip[0]
        model.set_adapter("x" if flip[0] else "y")

    set_ms = timed(switch, n=repeats * 10)

    def disable(_):
        with model.disable_adapter():
            pass

    disable_ms = timed(disable, n=repeats * 10)
    with tempfile.TemporaryDirectory() as tmp:
        save_ms = timed(lambda _: model.save_pretrained(tmp, selected_adapters=["x"]))
    merge_ms = timed(lambda m: m.merge_and_unload(), n=min(repeats, 3),
                     setup=lambda: PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name="x"))
    unload_ms = timed(lambda m: m.unload(), n=min(repeats, 3),
                      setup=lambda: PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name="x"))
    results[name] = {"load_ms": load_ms, "set_adapter_ms": set_ms, "disable_enable_ms": disable_ms,
                     "unload_ms": unload_ms, "merge_and_unload_ms": merge_ms, "save_ms": save_ms}

# PEFT on the files we saved: its logits beside ours (logits.safetensors, same ids)
from safetensors.torch import load_file

ids = torch.tensor([[1, 504, 3458, 314, 260, 2489, 282, 4649]])
for name in ["qv", "all_linear", "olora_as_lora"]:
    path = os.path.join(adapters_dir, name)
    if not os.path.exists(os.path.join(path, "logits.safetensors")):
        continue
    model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        logits = model(ids).logits[0]
    ours = load_file(os.path.join(path, "logits.safetensors"))["logits"]
    results.setdefault(name, {})["peft_vs_ours_max_abs"] = (logits - ours).abs().max().item()

import peft
print(json.dumps({"engine": f"PEFT {peft.__version__} / torch {torch.__version__} (CPU)", "adapters": results}))
