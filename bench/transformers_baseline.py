"""The peer baseline of bench/generation.rs: transformers on the same converted model directory
(or the same GGUF, which transformers dequantizes to f32), the same prompt (chat-templated where
the model has a template), greedy decoding of a fixed number of tokens; prints one JSON line.

    python bench/transformers_baseline.py MODEL_DIR|FILE.gguf [NEW_TOKENS] [REPEATS]
"""

import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, gguf = sys.argv[1], {}
if model_dir.endswith(".gguf"):
    model_dir, gguf = os.path.dirname(os.path.abspath(model_dir)), {"gguf_file": os.path.basename(model_dir)}
new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 64
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

start = time.perf_counter()
tok = AutoTokenizer.from_pretrained(model_dir, **gguf)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **gguf).eval()
load_s = time.perf_counter() - start
question = "What is the capital of France?"
if tok.chat_template:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
else:
    ids = torch.tensor([tok(question).input_ids])

prefill, decode = [], []
with torch.inference_mode():
    model(ids)  # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill.append(ids.shape[1] / (time.perf_counter() - t))
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode.append(new_tokens / (time.perf_counter() - t))

print(json.dumps({
    "engine": f"transformers {__import__('transformers').__version__} / torch {torch.__version__} (CPU, {torch.get_num_threads()} threads)",
    "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "repeats": repeats, "load_s": load_s,
    "prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
}))
