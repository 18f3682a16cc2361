// Training in the browser: the tiny chat model (tests/fixtures/tiny-chat, with a tokenizer and
// chat template) fine-tuned on WebGPU through the worker, on chat data from data/robot; the
// adapter it returns loads in the native CLI and gives the browser's logits.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { start, root, readSafetensors } from './helpers.mjs';

let b;
before(async () => { b = await start(); });
after(async () => { await b.close(); });

test('a LoRA adapter trains on WebGPU and matches the native CLI', async () => {
  const data = readFileSync(join(root, 'data/robot/train.jsonl'), 'utf8').split('\n').slice(0, 12).join('\n');
  const ids = [257, 84, 82, 68, 81, 198, 39, 72, 258];
  const result = await b.page.evaluate(async ({ data, ids }) => {
    const client = window.app.client;
    await client.load('/fixtures/tiny-chat/');
    const events = [];
    const options = { r: 4, loraAlpha: 8, loraDropout: 0, targetModules: ['all-linear'], lr: 1e-2, maxSteps: 4, batchSize: 2, evalEvery: 2, valSplit: 0.25, seed: 1 };
    const out = await client.train('robot.jsonl', data, null, options, (e) => events.push(e));
    const logits = Array.from(await client.logits(ids));
    const bad = await client.train('robot.jsonl', '{"messages": [{"role": "wizard", "content": "x"}]}', null, { adapterName: 'bad' }).then(() => 'ok', (e) => e.message);
    const after = Array.from(await client.logits(ids));
    return { events, report: out.report, config: out.adapterConfig, weights: Array.from(out.adapterWeights), logits, bad, after };
  }, { data, ids });

  const steps = result.events.filter((e) => e.event === 'step');
  const evals = result.events.filter((e) => e.event === 'eval');
  assert.equal(steps.length, 4);
  assert.ok(steps.every((s) => Number.isFinite(s.metrics.loss) && s.metrics.tokens_per_s > 0), JSON.stringify(steps));
  assert.deepEqual(evals.map((e) => e.step), [0, 2, 4]);
  assert.equal(result.report.summary.steps, 4);
  assert.equal(result.report.summary.end, 'completed');
  assert.match(result.bad, /robot\.jsonl:1: message 0 has role "wizard"/);
  assert.deepEqual(result.after, result.logits, 'a refused job changes nothing');
  console.log(`browser training (tiny-chat, WebGPU): ${steps.map((s) => s.metrics.tokens_per_s.toFixed(0)).join(', ')} tokens/s`);

  // native parity: the browser's adapter, loaded by the CLI, gives the browser's logits
  const dir = mkdtempSync(join(tmpdir(), 'webgpu-lora-browser-adapter-'));
  try {
    writeFileSync(join(dir, 'adapter_config.json'), result.config);
    writeFileSync(join(dir, 'adapter_model.safetensors'), Buffer.from(result.weights));
    const out = join(dir, 'logits.safetensors');
    const target = process.env.CARGO_TARGET_DIR ?? join(process.env.HOME, '.cache/webgpu-lora/target');
    execFileSync(join(target, 'release/webgpu-lora'), ['logits', '--model', join(root, 'tests/fixtures/tiny-chat'), '--adapter', dir, '--ids', ids.join(','), '--out', out]);
    const native = readSafetensors(out).logits.data;
    let max = 0;
    for (let i = 0; i < native.length; i++) max = Math.max(max, Math.abs(native[i] - result.logits[i]));
    assert.ok(max < 1e-4, `max |browser - native| = ${max}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  assert.deepEqual(b.errors, []);
});
