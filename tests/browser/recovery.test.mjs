// A lost GPU in headless Chromium on WebGPU: the engine's device destroyed in the middle of a
// training run (as a driver reset would): the run and every later call reject saying so, and
// recover() brings back the base model and every adapter that came from a URL or the
// AdapterStore, active and merged as before, with the logits they had; an adapter that existed
// only in the session is listed as lost. Nothing stored is lost.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
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
  assert.deepEqual(out.report, { restored: ['all', 'from-store', 'qv'], lost: ['mix'], mergedAway: [] });
  assert.deepEqual(out.after.adapters, ['all', 'from-store', 'qv']);
  assert.equal(out.after.active, 'from-store');
  assert.deepEqual(out.after.merged, out.before.merged);
  assert.deepEqual(out.after.logits, out.before.logits, 'the recovered model gives the logits it gave before');
  // an unmerge subtracts what the merge added: f32 rounding of W + dW - dW
  assert.ok(maxAbsDiff(out.qvAgain, out.qv) < 1e-5, `qv, unmerged after the recovery, as before it was merged (${maxAbsDiff(out.qvAgain, out.qv)})`);
  assert.ok(out.stored.includes('recovery-stored'), 'nothing stored is lost');
  assert.deepEqual(b.errors, []);
});
