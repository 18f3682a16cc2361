// A lost GPU in headless Chromium on WebGPU: the engine's device destroyed in the middle of a
// training run (as a driver reset would): the run and every later call reject saying so, and
// recover() brings back the base model and every adapter that came from a URL or the
// AdapterStore, active and merged as before, with the logits they had; an adapter that existed
// only in the session is listed as lost. Nothing stored is lost.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { statSync } from 'node:fs';
import { start, root, readJson, maxAbsDiff } from './helpers.mjs';

const { ids } = readJson(join(root, 'tests/fixtures/tiny-llama/expected.json'));
let b;
before(async () => { b = await start(); });
after(async () => { await b.close(); });

test('a GPU lost mid-training: the run and later calls reject saying so; recover() restores the base and the adapters from URLs and the store with their logits', async () => {
  const out = await b.page.evaluate(async (ids) => {
    const { LoraModel, AdapterStore } = window.app.webgpuLora;
    const logits = async (m) => Array.from((await m.logits(ids)).data);
    const failure = (p) => p.then(() => 'resolved', (e) => e.message);
    const m = await LoraModel.fromPretrained('/fixtures/tiny-llama/');
    await m.loadAdapter('/fixtures/peft/qv-r8/', 'qv');
    await m.loadAdapter('/fixtures/peft/all7-r4/', 'all');
    await m.saveAdapter('all', { as: 'recovery-stored', overwrite: true });
    await m.loadAdapter('recovery-stored', 'from-store');
    await m.addWeightedAdapter(['qv', 'all'], [0.5, 0.5], 'mix', 'cat'); // exists only here
    await m.setAdapter('qv');
    const qv = await logits(m);
    await m.mergeAdapter(['qv']);
    await m.setAdapter('from-store');
    const before = { logits: await logits(m), merged: m.mergedAdapters, adapters: m.adapters() };

    const rows = Array.from({ length: 8 }, (_, i) => ({ input_ids: Array.from({ length: 16 }, (_, j) => (i * 7 + j * 3) % 250 + 1) }));
    let lost = null;
    const run = failure(m.train({
      data: rows, dataName: 'ids.jsonl', adapterName: 'run', trainingArgs: { maxSteps: 500, batchSize: 2 },
      onStep: (s) => { if (s.step === 2) lost = m.destroyDevice(); },
    }));
    const training = await run;
    await lost;
    const later = await failure(m.logits(ids));

    const report = await m.recover();
    const after = { logits: await logits(m), merged: m.mergedAdapters, adapters: m.adapters(), active: m.activeAdapter };
    await m.setAdapter('qv');
    await m.unmergeAdapter();
    const qvAgain = await logits(m);
    m.dispose();
    const store = await AdapterStore.open();
    const stored = (await store.list()).map((a) => a.name);
    await store.delete('recovery-stored');
    store.close();
    return { training, later, report, before, after, qv, qvAgain, stored };
  }, ids);
  assert.match(out.training, /^the GPU device was lost \(destroyed: .*\): the model is gone from the GPU; model\.recover\(\) loads it again with its adapters$/);
  assert.equal(out.later, out.training, 'every later call rejects the same way');
  assert.deepEqual(out.report, { restored: ['all', 'from-store', 'qv'], lost: ['mix'], mergedAway: [], fineTunedAway: false });
  assert.deepEqual(out.after.adapters, ['all', 'from-store', 'qv']);
  assert.equal(out.after.active, 'from-store');
  assert.deepEqual(out.after.merged, out.before.merged);
  assert.deepEqual(out.after.logits, out.before.logits, 'the recovered model gives the logits it gave before');
  // an unmerge subtracts what the merge added: f32 rounding of W + dW - dW
  assert.ok(maxAbsDiff(out.qvAgain, out.qv) < 1e-5, `qv, unmerged after the recovery, as before it was merged (${maxAbsDiff(out.qvAgain, out.qv)})`);
  assert.ok(out.stored.includes('recovery-stored'), 'nothing stored is lost');
  assert.deepEqual(b.errors, []);
});

// Starts `run` (a function of the page's model) on a model with two adapters, one from a URL
// and one trained in the session; waits until the page sets window.__ready, then runs `strike`
// (in node) and returns what the page saw: the run's rejection, a later call's, the report of
// recover() and the logits before and after.
async function endTheEngine(run, strike) {
  await b.page.evaluate(() => { window.__ready = false; });
  const earlier = new Set(b.page.workers());
  const session = b.page.evaluate(async ({ ids, run }) => {
    const { LoraModel } = window.app.webgpuLora;
    const logits = async (m) => Array.from((await m.logits(ids)).data);
    const failure = (p) => p.then(() => 'resolved', (e) => e.message);
    const m = await LoraModel.fromPretrained('/fixtures/tiny-llama/');
    await m.loadAdapter('/fixtures/peft/qv-r8/', 'qv');
    await m.setAdapter('qv');
    const before = await logits(m);
    const ended = await failure(new Function('m', `return (${run})(m)`)(m));
    const later = await failure(m.logits(ids));
    const report = await m.recover();
    const after = await logits(m);
    const active = m.activeAdapter;
    m.dispose();
    return { ended, later, report, before, after, active };
  }, { ids, run: run.toString() });
  const deadline = Date.now() + 60_000;
  while (!(await b.page.evaluate(() => window.__ready))) {
    if (Date.now() > deadline) throw new Error('the page never got ready to be struck');
    await new Promise((r) => setTimeout(r, 20));
  }
  // the engine's worker: the one this session started (a killed one may still be listed)
  await strike(b.page.workers().find((w) => !earlier.has(w) && w.url().endsWith('/worker.js')));
  return session;
}

// Run in the engine's worker: its next new GPU buffer (of 4 KiB or more) asks for 1 GiB, which
// SwiftShader refuses as a full GPU does, with Dawn's GPUOutOfMemoryError: the rest of the path
// (wgpu's error, the engine's end, the message) is the real one.
function outOfGpuMemoryNext() {
  const createBuffer = GPUDevice.prototype.createBuffer;
  let armed = true;
  GPUDevice.prototype.createBuffer = function (descriptor) {
    if (!armed || descriptor.size < 4096) return createBuffer.call(this, descriptor);
    armed = false;
    return createBuffer.call(this, { ...descriptor, size: 2 ** 30 });
  };
}

test('a worker killed mid-training: the run and later calls reject saying so; recover() restores the model', async () => {
  const out = await endTheEngine((m) => m.train({
    data: Array.from({ length: 8 }, (_, i) => ({ input_ids: Array.from({ length: 16 }, (_, j) => (i * 7 + j * 3) % 250 + 1) })),
    dataName: 'ids.jsonl', adapterName: 'run', trainingArgs: { maxSteps: 500, batchSize: 2 },
    onStep: (s) => { if (s.step === 2) window.__ready = true; },
  }), (worker) => worker.evaluate(() => self.close()));
  assert.equal(out.ended, "the engine's worker stopped: the browser ended it (it ran out of memory, crashed, or the page closed it); model.recover() starts the engine again and loads the model with its adapters");
  assert.equal(out.later, out.ended, 'every later call rejects the same way');
  assert.deepEqual(out.report, { restored: ['qv'], lost: [], mergedAway: [], fineTunedAway: false }, 'the adapter being trained never reached the page: the failed run said what happened');
  assert.equal(out.active, 'qv');
  assert.deepEqual(out.after, out.before, 'the recovered model gives the logits it gave before');
  assert.deepEqual(b.errors, []);
});

test('the engine out of WebAssembly memory: the call says so with the sizes and what to change; recover() restores the model', async () => {
  const out = await endTheEngine(async (m) => {
    window.__ready = true;
    await new Promise((r) => setTimeout(r, 0));
    while (window.__ready) await new Promise((r) => setTimeout(r, 20)); // until node has filled the memory
    return m.train({ data: 'x'.repeat(64 << 20), dataName: 'big.jsonl', adapterName: 'run' });
  }, async (worker) => {
    // the worker's memory grown to the most the browser gives a wasm32 instance (4 GiB): the
    // engine's next large allocation fails as it would with a model and data of that size
    await worker.evaluate(async () => {
      const wasm = await (await import(new URL('./pkg/webgpu_lora.js', self.location.href))).default();
      for (let pages = 1 << 15; pages > 0; pages >>= 1) {
        try { for (;;) wasm.memory.grow(pages); } catch { /* RangeError: not that many pages left */ }
      }
    });
    await b.page.evaluate(() => { window.__ready = false; });
  });
  assert.match(out.ended, /^the engine ran out of memory while training: it asked for [\d.]+ MB more with [\d.]+ MB in use, and a page's WebAssembly memory ends at 4 GB \(or sooner, where the browser is short of memory\): train on less data at once .*; model\.recover\(\) starts the engine again and loads the model with its adapters$/);
  assert.equal(out.later, out.ended, 'every later call rejects the same way');
  assert.deepEqual(out.report, { restored: ['qv'], lost: [], mergedAway: [], fineTunedAway: false });
  assert.deepEqual(out.after, out.before, 'the recovered model gives the logits it gave before');
  assert.deepEqual(b.errors, []);
});

test('the GPU out of memory mid-training: the run says so, with the weights\' size and what to change; recover() restores the model', async () => {
  const out = await endTheEngine(async (m) => {
    window.__ready = true;
    while (window.__ready) await new Promise((r) => setTimeout(r, 20)); // until node has armed the GPU
    return m.train({
      data: Array.from({ length: 8 }, (_, i) => ({ input_ids: Array.from({ length: 16 }, (_, j) => (i * 5 + j) % 250 + 1) })),
      dataName: 'ids.jsonl', adapterName: 'run', trainingArgs: { maxSteps: 20, batchSize: 8 },
    });
  }, async (worker) => {
    await worker.evaluate(outOfGpuMemoryNext);
    await b.page.evaluate(() => { window.__ready = false; });
  });
  assert.match(out.ended, /^the GPU ran out of memory while training \(the model's weights take [\d.]+ MB of it\): lower batchSize or maxSeqLen \(gradientAccumulationSteps keeps the effective batch size\), or load the base model with a smaller dtype \("q8_0", "q4_1"\), or close other pages that use the GPU; model\.recover\(\) starts the engine again and loads the model with its adapters$/);
  assert.equal(out.later, out.ended, 'every later call rejects the same way');
  assert.deepEqual(out.report, { restored: ['qv'], lost: [], mergedAway: [], fineTunedAway: false });
  assert.deepEqual(out.after, out.before, 'the recovered model gives the logits it gave before');
  // the panic's own report on the console, as every crash's
  b.errors.splice(0, b.errors.length, ...b.errors.filter((e) => !/wgpu error: Out of Memory/.test(e)));
  assert.deepEqual(b.errors, []);
});

test('a training step whose buffers exceed the GPU\'s largest is refused before it starts, with the sizes; the model is unchanged', async () => {
  const out = await b.page.evaluate(async () => {
    const { LoraModel } = window.app.webgpuLora;
    const m = await LoraModel.fromPretrained('/fixtures/tiny-llama/');
    const rows = Array.from({ length: 4100 }, (_, i) => ({ input_ids: Array.from({ length: 128 }, (_, j) => (i + j) % 250 + 1) }));
    const error = await m.train({ data: rows, dataName: 'ids.jsonl', adapterName: 'run', trainingArgs: { batchSize: 4100, maxSeqLen: 128, maxSteps: 1 } })
      .then(() => 'resolved', (e) => e.message);
    const adapters = m.adapters();
    const limits = (await navigator.gpu.requestAdapter()).limits;
    m.dispose();
    return { error, adapters, limit: Math.min(limits.maxBufferSize, limits.maxStorageBufferBindingSize) };
  });
  const bytes = 4 * 4100 * 4 * 128 * 128; // rows x heads x positions x positions x f32
  assert.ok(bytes > out.limit, `the test's step (${bytes} bytes) is over this GPU's limit (${out.limit})`);
  assert.equal(out.error, `a training step of 4100 x 128 tokens needs ${(bytes / 1e6).toFixed(1)} MB (${bytes} bytes) in one GPU buffer for its attention scores (4100 rows x 4 heads x 128 x 128 positions x 4 bytes), more than this GPU's largest buffer, ${(out.limit / 1e6).toFixed(1)} MB (${out.limit} bytes) (WebGPU's maxStorageBufferBindingSize / maxBufferSize): lower the batch size (batchSize, --batch-size; gradientAccumulationSteps, --grad-accum, keeps the effective batch size) or the longest sequence (maxSeqLen, --max-seq-len)`);
  assert.deepEqual(out.adapters, [], 'no adapter was added');
  assert.deepEqual(b.errors, []);
});

test('a GPU lost mid-generation: the stream rejects saying so; recover() restores the adapter and the same text and logits', async () => {
  const out = await b.page.evaluate(async (ids) => {
    const { LoraModel } = window.app.webgpuLora;
    const failure = (p) => p.then(() => 'resolved', (e) => e.message);
    const m = await LoraModel.fromPretrained('/fixtures/tiny-chat/');
    await m.loadAdapter('/fixtures/peft/qv-r8/', 'qv', { allowOtherBase: true });
    await m.setAdapter('qv');
    const sampling = { maxNewTokens: 24, temperature: 1, seed: 7 };
    const text = async () => (await m.generate('Hello robot', sampling).result).text;
    const before = { text: await text(), logits: Array.from((await m.logits(ids)).data) };
    const pieces = [];
    let lost = null;
    const stream = m.generate('Hello robot', sampling);
    const streamed = (async () => {
      for await (const piece of stream) { pieces.push(piece); if (pieces.length === 3) lost = m.destroyDevice(); }
    })();
    const ended = await failure(streamed);
    await lost;
    const report = await m.recover();
    const after = { text: await text(), logits: Array.from((await m.logits(ids)).data) };
    m.dispose();
    return { ended, pieces: pieces.length, report, before, after };
  }, ids);
  assert.match(out.ended, /^the GPU device was lost \(destroyed: .*\): the model is gone from the GPU; model\.recover\(\) loads it again with its adapters$/);
  assert.ok(out.pieces >= 3 && out.pieces < 24, `the stream stopped mid-way (${out.pieces} pieces)`);
  assert.deepEqual(out.report, { restored: ['qv'], lost: [], mergedAway: [], fineTunedAway: false });
  assert.equal(out.after.text, out.before.text, 'the same seeded text after the recovery');
  assert.deepEqual(out.after.logits, out.before.logits);
  assert.deepEqual(b.errors, []);
});

test('the GPU out of memory while loading: the load says so, with the files\' size and a smaller dtype to use', async () => {
  // armed as soon as the worker exists, long before its wasm is compiled and it has a device
  const armed = new Promise((resolve) => b.page.once('worker', (worker) => resolve(worker.evaluate(outOfGpuMemoryNext))));
  const loading = b.page.evaluate(() => window.app.webgpuLora.LoraModel.fromPretrained('/fixtures/tiny-llama/').then((m) => { m.dispose(); return 'loaded'; }, (e) => e.message));
  await armed;
  const bytes = statSync(join(root, 'tests/fixtures/tiny-llama/model.safetensors')).size + statSync(join(root, 'tests/fixtures/tiny-llama/config.json')).size;
  const ended = await loading;
  assert.match(ended, /^the GPU ran out of memory while loading the model \(the model's files hold ([\d.]+) MB\): load the model with a smaller dtype \("f16" halves f32; "q8_0" and "q4_1" keep about a quarter and an eighth of it\) or from a quantized GGUF, or close other pages that use the GPU; model\.recover\(\) starts the engine again and loads the model with its adapters$/);
  assert.ok(Number(ended.match(/hold ([\d.]+) MB/)[1]) >= bytes / 1e6 - 0.05, `the files' size is counted (${bytes} bytes of weights and config at least)`);
  b.errors.splice(0, b.errors.length, ...b.errors.filter((e) => !/wgpu error: Out of Memory/.test(e)));
  assert.deepEqual(b.errors, []);
});
