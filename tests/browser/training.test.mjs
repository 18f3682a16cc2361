// Training in the browser: PEFT's 20-step trajectory (tests/fixtures/train) on WebGPU through the
// package's train(), with cancel and checkpoints; the tiny chat model (tests/fixtures/tiny-chat,
// with a tokenizer and chat template) fine-tuned on chat data from data/robot; the adapter it
// exports loads in the native CLI and gives the browser's logits, and an adapter the CLI trains,
// imported into the browser's store, gives the CLI's logits; DPO on WebGPU against TRL's first step
// and the CLI's run; full fine-tuning on WebGPU against the CLI's run.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { start, root, readSafetensors, readSafetensorsBytes, readJson, maxAbsDiff } from './helpers.mjs';

const target = process.env.CARGO_TARGET_DIR ?? join(process.env.HOME, '.cache/webgpu-lora/target');
const cli = join(target, 'release/webgpu-lora');
let b;
before(async () => { b = await start(); });

/** Runs the native CLI's `train` with `args` (and `--log` in `dir`); its events as logged. */
function cliTrain(args, dir) {
  const log = join(dir, 'log.jsonl');
  execFileSync(cli, ['train', ...args, '--log', log], { stdio: 'ignore' });
  return readFileSync(log, 'utf8').split('\n').filter((l) => l).map((l) => JSON.parse(l));
}

/** Every tensor of the safetensors file `file` equals the browser's (`bytes`) within 1e-4 of its largest |value|. */
function assertSameTensors(bytes, file) {
  const browser = readSafetensorsBytes(Buffer.from(bytes));
  const native = readSafetensors(file);
  assert.deepEqual(Object.keys(browser).sort(), Object.keys(native).sort());
  for (const [name, t] of Object.entries(native)) {
    const scale = Math.max(...t.data.map(Math.abs));
    assert.ok(maxAbsDiff(browser[name].data, t.data) <= 1e-4 * scale, `${name}: max |browser - native| = ${maxAbsDiff(browser[name].data, t.data)}`);
  }
}
after(async () => { await b.close(); });

test('PEFT\'s trajectory on WebGPU: its losses, gradient norms and final tensors; signal cancels after the step; a checkpoint the CLI resumes ends with PEFT\'s adapter', async () => {
  const t = readJson(join(root, 'tests/fixtures/train/trajectory.json'));
  // the trajectory's batches as already tokenized rows, in order, right padding (eos 2) taken off
  const rows = t.steps.flat().flatMap((micro) => micro.ids.map((ids, i) => {
    let n = ids.length;
    while (ids[n - 1] === 2) n -= 1;
    return { input_ids: ids.slice(0, n), labels: micro.labels[i].slice(0, n) };
  }));
  const c = t.config;
  const trainingArgs = {
    shuffle: false, batchSize: 2, gradAccum: 2, maxSteps: 20, lr: c.lr, adamBeta1: c.betas[0], adamBeta2: c.betas[1],
    adamEpsilon: c.eps, weightDecay: c.weight_decay, schedule: 'cosine', warmupSteps: c.warmup, maxGradNorm: c.max_grad_norm,
  };
  const result = await b.page.evaluate(async ({ rows, trainingArgs }) => {
    const { LoraModel } = window.app.webgpuLora;
    const m = await LoraModel.fromPretrained('/fixtures/tiny-llama/');
    const job = { data: rows, dataName: 'ids.jsonl', initFrom: '/fixtures/peft/all7-r4/' };
    const steps = [];
    const checkpoints = [];
    const report = await m.train({
      ...job, adapterName: 'peft-run', trainingArgs: { ...trainingArgs, checkpointEvery: 10 },
      onStep: (s) => steps.push([s.loss, s.gradNorm]),
      onCheckpoint: (files) => checkpoints.push({ ...files, files, weights: Array.from(files['adapter_model.safetensors']), state: Array.from(files['trainer_state.safetensors']) }),
    });
    const final = Array.from(new Uint8Array(await (await m.exportAdapter('peft-run'))['adapter_model.safetensors'].arrayBuffer()));
    // the step-10 checkpoint resumed in the page, as after a closed tab: steps 11-20 again
    const resumedSteps = [];
    await m.train({ data: rows, dataName: 'ids.jsonl', adapterName: 'resumed', trainingArgs, resumeFrom: checkpoints[0].files, onStep: (s) => resumedSteps.push([s.step, s.loss]) });
    const resumed = Array.from(new Uint8Array(await (await m.exportAdapter('resumed'))['adapter_model.safetensors'].arrayBuffer()));
    const stop = new AbortController();
    const cancelledSteps = [];
    const cancelled = await m.train({
      ...job, adapterName: 'cancelled', trainingArgs, signal: stop.signal,
      onStep: (s) => { cancelledSteps.push(s.loss); if (s.step === 3) stop.abort(); },
    });
    // a cancel sent while a run waits its turn behind another is kept until it starts
    // (aborted at the run ahead's second step: its data was prepared and its message sent by then)
    const later = new AbortController();
    const busy = m.train({ ...job, adapterName: 'busy', trainingArgs: { ...trainingArgs, maxSteps: 4 }, onStep: (s) => s.step === 2 && later.abort() });
    const queued = m.train({ ...job, adapterName: 'queued', trainingArgs, signal: later.signal }).then(() => 'trained', (e) => e.message);
    const busySteps = (await busy).summary.steps;
    const queuedOutcome = await queued;
    const adapters = m.adapters();
    m.dispose();
    checkpoints.forEach((c) => delete c.files); // the arrays below carry them out of the page
    return { steps, report, final, checkpoints, cancelled: cancelled.summary, cancelledSteps, adapters, busySteps, queuedOutcome, resumedSteps, resumed };
  }, { rows, trainingArgs });
  // resumed from step 10's checkpoint: steps 11-20 with the uninterrupted run's losses, and its adapter
  assert.deepEqual(result.resumedSteps.map(([step]) => step), Array.from({ length: 10 }, (_, i) => i + 11));
  result.resumedSteps.forEach(([step, loss]) => assert.ok(Math.abs(loss - result.steps[step - 1][0]) < 1e-5, `resumed step ${step}: ${loss} vs ${result.steps[step - 1][0]}`));
  const [resumed, uninterrupted] = [readSafetensorsBytes(Buffer.from(result.resumed)), readSafetensorsBytes(Buffer.from(result.final))];
  for (const [name, tensor] of Object.entries(uninterrupted)) {
    assert.ok(maxAbsDiff(resumed[name].data, tensor.data) < 1e-5, `${name}: the resumed run's final adapter`);
  }
  assert.equal(result.busySteps, 4, 'the run ahead is not the one cancelled');
  assert.match(result.queuedOutcome, /^training was cancelled before it started: nothing was trained$/);
  assert.ok(!result.adapters.includes('queued'), result.adapters.join(', '));

  assert.equal(result.steps.length, 20);
  result.steps.forEach(([loss, norm], i) => {
    assert.ok(Math.abs(loss - t.losses[i]) < 1e-4, `step ${i + 1}: loss ${loss} vs PEFT ${t.losses[i]}`);
    assert.ok(Math.abs(norm - t.grad_norms[i]) < 1e-4 * t.grad_norms[i], `step ${i + 1}: gradient norm ${norm} vs PEFT ${t.grad_norms[i]}`);
  });
  assert.equal(result.report.summary.end, 'completed');
  const ours = readSafetensorsBytes(Buffer.from(result.final));
  const peft = readSafetensors(join(root, 'tests/fixtures/train/final.safetensors'));
  assert.equal(Object.keys(ours).length, Object.keys(peft).length);
  for (const [name, tensor] of Object.entries(peft)) {
    const diff = maxAbsDiff(ours[`base_model.model.${name}`].data, tensor.data);
    assert.ok(diff < 1e-4, `${name}: max |ours - PEFT| = ${diff} after the trajectory`);
  }
  // aborted at step 3: the run stops after the step in progress when the cancel reaches the worker
  // (step 3 or a later one, as events cross threads), each step done reported with PEFT's loss
  assert.equal(result.cancelled.end, 'cancelled');
  assert.ok(result.cancelled.steps >= 3 && result.cancelled.steps < 20, `cancelled after step ${result.cancelled.steps}`);
  assert.equal(result.cancelledSteps.length, result.cancelled.steps);
  result.cancelledSteps.forEach((loss, i) => assert.ok(Math.abs(loss - t.losses[i]) < 1e-4, `cancelled run, step ${i + 1}`));
  assert.deepEqual(result.adapters.sort(), ['busy', 'cancelled', 'peft-run', 'resumed'], 'the cancelled run keeps its adapter; the run cancelled before it started has none');

  // onCheckpoint at step 10 hands out complete files: the CLI resumes from step 10's and ends with PEFT's adapter
  assert.deepEqual(result.checkpoints.map((f) => f.step), [10]);
  const dir = mkdtempSync(join(tmpdir(), 'webgpu-lora-browser-checkpoint-'));
  try {
    const checkpoint = join(dir, 'checkpoint-10');
    mkdirSync(checkpoint);
    writeFileSync(join(checkpoint, 'adapter_config.json'), result.checkpoints[0]['adapter_config.json']);
    writeFileSync(join(checkpoint, 'adapter_model.safetensors'), Buffer.from(result.checkpoints[0].weights));
    writeFileSync(join(checkpoint, 'trainer_state.safetensors'), Buffer.from(result.checkpoints[0].state));
    writeFileSync(join(dir, 'ids.jsonl'), rows.map((r) => JSON.stringify(r)).join('\n'));
    const flags = ['--no-shuffle', '--batch-size', '2', '--grad-accum', '2', '--max-steps', '20', '--lr', `${c.lr}`, '--weight-decay', `${c.weight_decay}`,
      '--warmup', `${c.warmup}`, '--schedule', 'cosine', '--max-grad-norm', `${c.max_grad_norm}`, '--backend', 'cpu'];
    execFileSync(cli, ['train', '--model', join(root, 'tests/fixtures/tiny-llama'), '--data', join(dir, 'ids.jsonl'), '--resume', checkpoint,
      '--out', join(dir, 'resumed'), ...flags], { stdio: 'ignore' });
    const resumed = readSafetensors(join(dir, 'resumed', 'adapter_model.safetensors'));
    for (const [name, tensor] of Object.entries(peft)) {
      const diff = maxAbsDiff(resumed[`base_model.model.${name}`].data, tensor.data);
      assert.ok(diff < 1e-4, `${name}: max |resumed from the browser's checkpoint - PEFT| = ${diff}`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  assert.deepEqual(b.errors, []);
});

test('a LoRA adapter trains on WebGPU and matches the native CLI; one the CLI trains imports into the browser', async () => {
  const data = readFileSync(join(root, 'data/robot/train.jsonl'), 'utf8').split('\n').slice(0, 12).join('\n');
  const ids = [257, 84, 82, 68, 81, 198, 39, 72, 258];
  const result = await b.page.evaluate(async ({ data, ids }) => {
    const { LoraModel, AdapterStore } = window.app.webgpuLora;
    const m = await LoraModel.fromPretrained('/fixtures/tiny-chat/');
    const events = [];
    const job = {
      data, dataName: 'robot.jsonl',
      loraConfig: { r: 4, loraAlpha: 8, loraDropout: 0, targetModules: ['all-linear'] },
      trainingArgs: { learningRate: 1e-2, maxSteps: 4, batchSize: 2, evalEvery: 2, valSplit: 0.25, seed: 1 },
    };
    const report = await m.train({
      ...job, adapterName: 'robot',
      onStep: (metrics) => events.push({ event: 'step', metrics }),
      onEval: (e) => events.push(e),
    });
    const state = { adapters: m.adapters(), active: m.activeAdapter, params: await m.trainableParameters() };
    const logits = Array.from((await m.logits(ids)).data);
    const files = await m.exportAdapter('robot');
    const bad = await m.train({ data: '{"messages": [{"role": "wizard", "content": "x"}]}', dataName: 'robot.jsonl', adapterName: 'bad' }).then(() => 'ok', (e) => e.message);
    const after = Array.from((await m.logits(ids)).data);
    // the training summary is stored with the adapter
    const saved = await m.saveAdapter('robot', { as: 'robot-trained' });
    const store = await AdapterStore.open();
    const listed = (await store.list()).find((a) => a.name === 'robot-trained');
    await store.delete('robot-trained');
    store.close();
    // the same job with gradient checkpointing: the same steps
    const checkpointed = [];
    await m.train({ ...job, adapterName: 'robot-checkpointed', trainingArgs: { ...job.trainingArgs, gradientCheckpointing: true },
      onStep: (metrics) => checkpointed.push(metrics.loss) });
    // continuing a PEFT adapter (by URL): a learning rate too small to move an f32 value gives it back
    const continued = { data, dataName: 'robot.jsonl', initFrom: '/fixtures/peft/all7-r4/', trainingArgs: { learningRate: 1e-12, maxSteps: 1, batchSize: 2 } };
    await m.train({ ...continued, adapterName: 'continued' });
    const continuedWeights = Array.from(new Uint8Array(await (await m.exportAdapter('continued'))['adapter_model.safetensors'].arrayBuffer()));
    const contradicted = await m.train({ ...continued, adapterName: 'contradicted', loraConfig: { r: 2 } }).then(() => 'ok', (e) => e.message);
    m.dispose();
    return {
      events, report, state, saved, listed, logits, bad, after, checkpointed, continuedWeights, contradicted,
      config: await files['adapter_config.json'].text(),
      weights: Array.from(new Uint8Array(await files['adapter_model.safetensors'].arrayBuffer())),
    };
  }, { data, ids });

  const steps = result.events.filter((e) => e.event === 'step');
  const evals = result.events.filter((e) => e.event === 'eval');
  assert.equal(steps.length, 4);
  assert.ok(steps.every((s) => Number.isFinite(s.metrics.loss) && s.metrics.tokensPerS > 0), JSON.stringify(steps));
  assert.deepEqual(evals.map((e) => e.step), [0, 2, 4]);
  assert.ok(evals[2].valLoss < evals[0].valLoss - 0.05, `the validation loss falls: ${evals.map((e) => e.valLoss)}`);
  assert.equal(result.report.summary.steps, 4);
  assert.equal(result.report.summary.end, 'completed');
  assert.deepEqual([result.state.adapters, result.state.active], [['robot'], 'robot'], 'the trained adapter is loaded and active');
  // r (in + out) summed over the 7 linears of 2 layers: q 64->64, k,v 64->32, o 64->64, gate,up 64->128, down 128->64
  assert.equal(result.state.params.trainable, 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192));
  assert.deepEqual(result.listed.trainingSummary, result.report.summary);
  assert.deepEqual([result.listed.r, result.listed.baseModel.name, result.saved.name], [4, 'tiny-chat', 'robot-trained']);
  assert.match(result.bad, /robot\.jsonl:1: message 0 has role "wizard"/);
  assert.deepEqual(result.after, result.logits, 'a refused job changes nothing');
  const continued = readSafetensorsBytes(Buffer.from(result.continuedWeights));
  const source = readSafetensors(join(root, 'tests/fixtures/peft/all7-r4/adapter_model.safetensors'));
  assert.deepEqual(Object.keys(continued).sort(), Object.keys(source).sort());
  for (const [name, t] of Object.entries(source)) assert.ok(maxAbsDiff(continued[name].data, t.data) < 1e-9, `${name} moved`);
  assert.match(result.contradicted, /continues this adapter but asks for r 2 \(the adapter's is 4\)/);
  const losses = steps.map((s) => s.metrics.loss);
  assert.ok(losses.every((l, i) => Math.abs(l - result.checkpointed[i]) < 1e-4), `checkpointed ${result.checkpointed} vs ${losses}`);
  console.log(`browser training (tiny-chat, WebGPU): ${steps.map((s) => s.metrics.tokensPerS.toFixed(0)).join(', ')} tokens/s`);

  // native parity: the browser's adapter, loaded by the CLI, gives the browser's logits
  const dir = mkdtempSync(join(tmpdir(), 'webgpu-lora-browser-adapter-'));
  try {
    writeFileSync(join(dir, 'adapter_config.json'), result.config);
    writeFileSync(join(dir, 'adapter_model.safetensors'), Buffer.from(result.weights));
    const out = join(dir, 'logits.safetensors');
    execFileSync(cli, ['logits', '--model', join(root, 'tests/fixtures/tiny-chat'), '--adapter', dir, '--ids', ids.join(','), '--out', out]);
    const native = readSafetensors(out).logits.data;
    assert.ok(maxAbsDiff(native, result.logits) < 1e-4, `max |browser - native| = ${maxAbsDiff(native, result.logits)}`);

    // and the other way: an adapter the CLI trains, imported into the browser's store, gives the CLI's logits
    const cliAdapter = join(dir, 'cli-adapter');
    writeFileSync(join(dir, 'data.jsonl'), data);
    execFileSync(cli, ['train', '--model', join(root, 'tests/fixtures/tiny-chat'), '--data', join(dir, 'data.jsonl'), '--out', cliAdapter,
      '--targets', 'all-linear', '--r', '4', '--lr', '1e-2', '--max-steps', '2', '--batch-size', '2', '--seed', '3'], { stdio: 'ignore' });
    execFileSync(cli, ['logits', '--model', join(root, 'tests/fixtures/tiny-chat'), '--adapter', cliAdapter, '--ids', ids.join(','), '--out', out]);
    const cliLogits = readSafetensors(out).logits.data;
    const files = { config: readFileSync(join(cliAdapter, 'adapter_config.json'), 'utf8'), weights: Array.from(readFileSync(join(cliAdapter, 'adapter_model.safetensors'))) };
    const browserLogits = await b.page.evaluate(async ({ files, ids }) => {
      const { LoraModel, AdapterStore } = window.app.webgpuLora;
      const store = await AdapterStore.open();
      await store.import({ 'adapter_config.json': files.config, 'adapter_model.safetensors': Uint8Array.from(files.weights) }, { name: 'from-cli' });
      const m = await LoraModel.fromPretrained('/fixtures/tiny-chat/');
      await m.loadAdapter('from-cli');
      await m.setAdapter('from-cli');
      const logits = Array.from((await m.logits(ids)).data);
      await store.delete('from-cli');
      store.close();
      m.dispose();
      return logits;
    }, { files, ids });
    assert.ok(maxAbsDiff(cliLogits, browserLogits) < 1e-4, `max |browser - CLI| = ${maxAbsDiff(cliLogits, browserLogits)}`);
    assert.ok(maxAbsDiff(cliLogits, native) > 1e-3, 'the CLI adapter is another adapter');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  assert.deepEqual(b.errors, []);
});

test('DPO on WebGPU: the first step is TRL\'s, and three steps give the native CLI\'s losses, rewards and adapter', async () => {
  const pairs = readFileSync(join(root, 'tests/fixtures/dpo/pairs.jsonl'), 'utf8');
  const trl = readJson(join(root, 'tests/fixtures/dpo/expected.json'));
  const args = { beta: 0.1, lr: 1e-2, steps: 3, batch: 3, seed: 1 };
  const result = await b.page.evaluate(async ({ pairs, args }) => {
    const { LoraModel } = window.app.webgpuLora;
    const m = await LoraModel.fromPretrained('/fixtures/tiny-chat/');
    const steps = [];
    await m.train({
      data: pairs, dataName: 'pairs.jsonl', adapterName: 'dpo', initFrom: '/fixtures/dpo/adapter/',
      trainingArgs: { method: 'dpo', beta: args.beta, learningRate: args.lr, maxSteps: args.steps, batchSize: args.batch, seed: args.seed },
      onStep: (metrics) => steps.push(metrics),
    });
    const files = await m.exportAdapter('dpo');
    m.dispose();
    return { steps, weights: Array.from(new Uint8Array(await files['adapter_model.safetensors'].arrayBuffer())) };
  }, { pairs, args });
  const close = (a, b) => Math.abs(a - b) <= 1e-4 * Math.max(Math.abs(b), 1e-2);
  // the first step starts from TRL's adapter: TRL's loss and rewards (tests/fixtures/dpo)
  const first = result.steps[0];
  assert.ok(close(first.loss, trl.loss) && close(first.rewards.margins, trl.metrics['rewards/margins']), JSON.stringify(first));
  const dir = mkdtempSync(join(tmpdir(), 'webgpu-lora-dpo-'));
  try {
    const native = cliTrain(['--method', 'dpo', '--beta', String(args.beta), '--model', join(root, 'tests/fixtures/tiny-chat'),
      '--data', join(root, 'tests/fixtures/dpo/pairs.jsonl'), '--init-from', join(root, 'tests/fixtures/dpo/adapter'),
      '--lr', String(args.lr), '--max-steps', String(args.steps), '--batch-size', String(args.batch), '--seed', String(args.seed),
      '--out', join(dir, 'adapter')], dir).filter((e) => e.event === 'step').map((e) => e.metrics);
    assert.equal(native.length, args.steps);
    for (const [i, ours] of result.steps.entries()) {
      for (const [what, a, b] of [['loss', ours.loss, native[i].loss], ['margin', ours.rewards.margins, native[i].rewards.margins],
        ['chosen', ours.rewards.chosen, native[i].rewards.chosen], ['accuracy', ours.rewards.accuracies, native[i].rewards.accuracies]]) {
        assert.ok(close(a, b), `step ${i + 1} ${what}: browser ${a}, native ${b}`);
      }
    }
    assertSameTensors(result.weights, join(dir, 'adapter', 'adapter_model.safetensors'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  assert.deepEqual(b.errors, []);
});

test('full fine-tuning on WebGPU: the memory estimate first, then the native CLI\'s losses and weights; the model directory loads back', async () => {
  const data = readFileSync(join(root, 'data/robot/train.jsonl'), 'utf8').split('\n').slice(0, 12).join('\n');
  const args = { lr: 1e-3, steps: 3, batch: 2, seed: 1 };
  const ids = [257, 84, 82, 68, 81, 198, 39, 72, 258];
  const result = await b.page.evaluate(async ({ data, args, ids }) => {
    const { LoraModel } = window.app.webgpuLora;
    const m = await LoraModel.fromPretrained('/fixtures/tiny-chat/');
    const steps = [];
    let memory = null;
    const report = await m.train({
      data, dataName: 'robot.jsonl',
      trainingArgs: { method: 'full', learningRate: args.lr, maxSteps: args.steps, batchSize: args.batch, seed: args.seed },
      onStep: (metrics) => steps.push(metrics), onMemory: (e) => { memory = e; },
    });
    const logits = Array.from((await m.logits(ids)).data);
    const refused = await m.train({ data, dataName: 'robot.jsonl', loraConfig: { r: 16 }, trainingArgs: { method: 'full', maxSteps: 1 } })
      .then(() => 'trained', (e) => e.message);
    m.dispose();
    // the model directory it hands back loads as a model, with the trained logits
    const reloaded = await LoraModel.fromPretrained(report.modelFiles);
    const reloadedLogits = Array.from((await reloaded.logits(ids)).data);
    reloaded.dispose();
    const weights = Array.from(new Uint8Array(await report.modelFiles['model.safetensors'].arrayBuffer()));
    return { steps, memory, names: Object.keys(report.modelFiles), logits, reloadedLogits, refused, weights };
  }, { data, args, ids });
  assert.ok(result.memory.parameters > 0 && result.memory.bytes > 16 * result.memory.parameters, JSON.stringify(result.memory));
  assert.ok(['model.safetensors', 'config.json', 'tokenizer.json'].every((n) => result.names.includes(n)), result.names.join());
  assert.ok(maxAbsDiff(result.logits, result.reloadedLogits) < 1e-5, 'the files hold the trained weights');
  assert.match(result.refused, /full fine-tuning trains every weight, so the LoRA options do not apply, and r 16 set/);
  const dir = mkdtempSync(join(tmpdir(), 'webgpu-lora-full-'));
  try {
    writeFileSync(join(dir, 'robot.jsonl'), data);
    const native = cliTrain(['--method', 'full', '--model', join(root, 'tests/fixtures/tiny-chat'), '--data', join(dir, 'robot.jsonl'),
      '--lr', String(args.lr), '--max-steps', String(args.steps), '--batch-size', String(args.batch), '--seed', String(args.seed),
      '--out', join(dir, 'model')], dir);
    assert.equal(native[0].event, 'memory');
    const nativeSteps = native.filter((e) => e.event === 'step').map((e) => e.metrics);
    assert.equal(nativeSteps.length, args.steps);
    for (const [i, ours] of result.steps.entries()) {
      assert.ok(Math.abs(ours.loss - nativeSteps[i].loss) <= 1e-4 * nativeSteps[i].loss, `step ${i + 1}: loss ${ours.loss} in the browser, ${nativeSteps[i].loss} native`);
    }
    assertSameTensors(result.weights, join(dir, 'model', 'model.safetensors'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  assert.deepEqual(b.errors, []);
});

test('a callback that throws stops training, train() rejects with that error, and the model stays usable', async () => {
  const data = readFileSync(join(root, 'data/robot/train.jsonl'), 'utf8').split('\n').slice(0, 12).join('\n');
  const result = await b.page.evaluate(async (data) => {
    const { LoraModel } = window.app.webgpuLora;
    const m = await LoraModel.fromPretrained('/fixtures/tiny-chat/');
    let steps = 0;
    const error = await m.train({
      data, dataName: 'robot.jsonl', adapterName: 'thrower', loraConfig: { r: 2 }, trainingArgs: { maxSteps: 6, batchSize: 2 },
      onStep: () => { steps += 1; if (steps === 2) throw new RangeError('stop at step 2'); },
    }).then(() => null, (e) => ({ name: e.name, message: e.message }));
    const logits = (await m.logits([1, 2, 3])).data.length;
    const adapters = m.adapters();
    const vocab = m.config.vocab_size;
    m.dispose();
    return { error, steps, logits, adapters, vocab };
  }, data);
  assert.deepEqual(result.error, { name: 'RangeError', message: 'stop at step 2' });
  assert.equal(result.steps, 2, 'no step is reported after the callback threw');
  assert.equal(result.logits, 3 * result.vocab, 'the model still runs');
  assert.deepEqual(result.adapters, ['thrower'], 'the adapter trained so far is kept, as with a cancel');
  assert.deepEqual(b.errors, []);
});
