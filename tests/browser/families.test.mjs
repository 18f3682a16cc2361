// The model families beside plain Llama (Llama 3.x's rotary scaling, SmolLM3's NoPE layers, Qwen2's
// q/k/v biases, Qwen3's q/k norms, Gemma 3's GeGLU, norms and sliding-window layers) in headless
// Chromium on WebGPU: each tiny model made by
// transformers, with PEFT's all-linear adapter, gives transformers' and PEFT's logits (1e-4;
// tests/fixtures/make_fixtures.py, `families`).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { start, root, readJson, readSafetensors, maxAbsDiff } from './helpers.mjs';

const FAMILIES = ['tiny-llama3', 'tiny-smollm3', 'tiny-qwen2', 'tiny-qwen3', 'tiny-gemma3'];
let b;
before(async () => { b = await start(); });
after(async () => { await b.close(); });

test('each family with its all-linear adapter gives transformers\' and PEFT\'s logits on WebGPU', async () => {
  for (const family of FAMILIES) {
    const dir = join(root, 'tests/fixtures/families', family);
    const { ids } = readJson(join(dir, 'expected.json'));
    const out = await b.page.evaluate(async ({ family, ids }) => {
      const { LoraModel } = window.app.webgpuLora;
      const m = await LoraModel.fromPretrained(`/fixtures/families/${family}/`);
      const logits = async () => Array.from((await m.logits(ids)).data);
      const base = await logits();
      await m.loadAdapter(`/fixtures/families/${family}/peft-all-linear/`, 'all');
      await m.setAdapter('all');
      const adapter = await logits();
      m.dispose();
      return { base, adapter, architecture: m.config.architectures[0] };
    }, { family, ids });
    const expected = readSafetensors(join(dir, 'expected.safetensors'));
    const base = maxAbsDiff(out.base, expected.logits.data);
    const adapter = maxAbsDiff(out.adapter, expected.adapter_logits.data);
    assert.ok(base < 1e-4, `${family} (${out.architecture}): base vs transformers ${base}`);
    assert.ok(adapter < 1e-4, `${family}: all-linear adapter vs PEFT ${adapter}`);
  }
  assert.deepEqual(b.errors, []);
});
