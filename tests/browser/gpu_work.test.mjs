// What the engine asks of the GPU, counted (bench/page/gpu-counts.js: dispatches and queue
// submissions in the engine's worker), on the tiny chat model: a decoded token and a training step
// go out in a couple of submissions, not one per 32 kernels, and the fused kernels keep the
// dispatches at or below today's counts. Counts, not timings: they hold on any machine.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { MOUNTS } from '../../scripts/serve.mjs';
import { start, root } from './helpers.mjs';

let b;
before(async () => { b = await start({ mounts: [['/bench/', join(root, 'bench', 'page')], ...MOUNTS] }); });
after(async () => { await b?.close(); });

test('a decoded token and a training step: few submissions, and no more dispatches per layer than today', async () => {
  const r = await b.page.evaluate(async () => {
    const { loadCounted, counted, trainingRows } = await import('/bench/gpu-counts.js');
    const m = await loadCounted('/fixtures/tiny-chat/');
    const generate = (maxNewTokens) => counted(async () => {
      const stream = m.generate([{ role: 'user', content: 'Hi' }], { maxNewTokens, stop: [] });
      for await (const _ of stream);
      return (await stream.result).tokens.length;
    });
    await generate(2); // compiles the shaders
    const [one, many] = [await generate(1), await generate(6)];
    const rows = trainingRows();
    let runs = 0;
    const train = (maxSteps) => counted(() => m.train({
      data: rows, dataName: 'ids.jsonl', adapterName: `run-${(runs += 1)}`,
      loraConfig: { r: 8, loraDropout: 0.05, targetModules: ['q_proj', 'v_proj'] },
      trainingArgs: { maxSteps, batchSize: 2, shuffle: false },
    }));
    await train(1);
    const [step1, step3] = [await train(1), await train(3)];
    const layers = m.config.num_hidden_layers;
    m.dispose();
    return { one, many, step1, step3, layers };
  });
  const tokens = r.many.out - r.one.out;
  assert.ok(tokens >= 3, `${tokens} decoded tokens to count`);
  const perToken = (k) => (r.many[k] - r.one[k]) / tokens;
  const perStep = (k) => (r.step3[k] - r.step1[k]) / 2;
  console.log(`per decoded token: ${perToken('dispatches')} dispatches, ${perToken('submits')} submits; per step: ${perStep('dispatches')} dispatches, ${perStep('submits')} submits (${r.layers} layers)`);
  // one submission per token (its read-back), not one per 32 dispatches (65 per token before)
  assert.ok(perToken('submits') <= 2, `${perToken('submits')} submissions per decoded token`);
  assert.ok(perStep('submits') <= 10, `${perStep('submits')} submissions per training step`);
  // today's counts on this 2-layer model, head and optimizer included (a training step took 545
  // dispatches before the fused kernels; BENCHMARKS.md, GPU work): a change that adds kernels
  // fails here, one that removes some lowers these
  assert.ok(perToken('dispatches') <= 46, `${perToken('dispatches')} dispatches per decoded token`);
  assert.ok(perStep('dispatches') <= 313, `${perStep('dispatches')} dispatches per training step`);
  assert.deepEqual(b.errors, []);
});
