// The npm package's JS API (lib/index.js) in headless Chromium on WebGPU, against PEFT's own
// logits (tests/fixtures/peft, made by make_fixtures.py with PEFT 0.21.2): the base, every PEFT
// adapter, merged, unloaded, weighted combinations, switching, generation streams, bad input.
import { test, before, after, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { start, readSafetensors, readJson, root, maxAbsDiff } from './helpers.mjs';

const fixtures = join(root, 'tests', 'fixtures');
const TOLERANCE = 1e-4;
const { ids } = readJson(join(fixtures, 'tiny-llama', 'expected.json'));
const base = readSafetensors(join(fixtures, 'tiny-llama', 'expected.safetensors')).logits.data;
const peft = (name, file = 'expected_logits') => readSafetensors(join(fixtures, 'peft', name, `${file}.safetensors`)).logits.data;
let b;

before(async () => {
  b = await start();
  await b.page.evaluate(() => {
    window.logitsOf = async (ids) => {
      const { data, dims } = await window.tiny.logits(Int32Array.from(ids));
      return { data: Array.from(data), dims };
    };
  });
});
after(async () => { await b?.close(); });
// every test starts from a freshly loaded tiny model
beforeEach(async () => {
  await b.page.evaluate(async () => {
    window.tiny?.dispose();
    window.tiny = await window.app.webgpuLora.LoraModel.fromPretrained('/fixtures/tiny-llama/');
  });
});

const close = (actual, expected, what) => {
  assert.equal(actual.length, expected.length, `${what}: length`);
  const diff = maxAbsDiff(actual, expected);
  assert.ok(diff < TOLERANCE, `${what}: max |ours - PEFT| = ${diff}`);
};

test('logits(): the base and every PEFT adapter, merged and unloaded, match PEFT within 1e-4 on WebGPU', async () => {
  const adapters = ['qv-r8', 'all7-r4', 'rank-pattern', 'rslora', 'olora', 'pissa', 'olora-as-lora', 'pissa-as-lora'];
  const merged = new Set(['qv-r8', 'all7-r4', 'rank-pattern', 'rslora']);
  const out = await b.page.evaluate(async ({ ids, adapters, merged }) => {
    const m = window.tiny;
    const r = { base: await window.logitsOf(ids), adapters: {} };
    for (const name of adapters) {
      await m.loadAdapter(`/fixtures/peft/${name}/`, name);
      const loadedInactive = m.activeAdapter;
      await m.setAdapter(name);
      const entry = { loadedInactive, active: m.activeAdapter, logits: (await window.logitsOf(ids)).data, params: await m.trainableParameters() };
      if (merged.includes(name)) {
        entry.report = await m.mergeAdapter([], { safeMerge: true });
        entry.mergedList = m.mergedAdapters;
        entry.merged = (await window.logitsOf(ids)).data;
        await m.unmergeAdapter();
        entry.unmerged = (await window.logitsOf(ids)).data;
      }
      await m.deleteAdapter(name); // undoes an OLoRA/PiSSA shift of the base too
      entry.after = (await window.logitsOf(ids)).data;
      r.adapters[name] = entry;
    }
    await m.loadAdapter('/fixtures/peft/qv-r8/', 'qv');
    await m.setAdapter('qv');
    r.mergeAndUnload = await m.mergeAndUnload({ safeMerge: true });
    r.afterMergeAndUnload = { adapters: m.adapters(), active: m.activeAdapter, logits: (await window.logitsOf(ids)).data };
    return r;
  }, { ids, adapters, merged: [...merged] });

  assert.deepEqual(out.base.dims, [ids.length, 256]);
  close(out.base.data, base, 'base');
  for (const name of adapters) {
    const e = out.adapters[name];
    assert.equal(e.active, name);
    close(e.logits, peft(name), name);
    const counts = readJson(join(fixtures, 'peft', name, 'expected.json'));
    if (counts.trainable_params) assert.deepEqual(e.params, { trainable: counts.trainable_params, all: counts.all_params }, `${name}: parameter counts`);
    if (merged.has(name)) {
      assert.deepEqual(e.report, { merged: [name], skipped: [] });
      assert.deepEqual(e.mergedList, [name]);
      close(e.merged, peft(name, 'expected_merged_logits'), `${name} merged`);
      close(e.unmerged, peft(name), `${name} unmerged`);
    }
    close(e.after, base, `${name} deleted: the base`);
  }
  close(out.afterMergeAndUnload.logits, peft('qv-r8', 'expected_merged_logits'), 'merge_and_unload');
  assert.deepEqual(out.afterMergeAndUnload.adapters, []);
  assert.equal(out.afterMergeAndUnload.active, null);
});

test('switch round trip a -> b -> a -> disable -> enable -> unload, and weighted adapters, match PEFT', async () => {
  const out = await b.page.evaluate(async (ids) => {
    const m = window.tiny;
    const seen = {};
    const files = async (name) => {
      const get = async (f) => (await fetch(`/fixtures/peft/${name}/${f}`)).blob();
      return { 'adapter_config.json': await get('adapter_config.json'), 'adapter_model.safetensors': await get('adapter_model.safetensors') };
    };
    await m.loadAdapter('/fixtures/peft/all7-r4/', 'a');
    await m.loadAdapter(await files('qv-r8'), 'b'); // as Blobs, the way a file picker hands them over
    await m.loadAdapter('/fixtures/peft/rank-pattern/', 'c');
    const steps = [['a', () => m.setAdapter('a')], ['b', () => m.setAdapter('b')], ['a again', () => m.setAdapter('a')],
      ['disabled', () => m.disableAdapter()], ['enabled', () => m.enableAdapter()]];
    for (const [label, step] of steps) {
      await step();
      seen[label] = { active: m.activeAdapter, disabled: m.disabled, logits: (await window.logitsOf(ids)).data };
    }
    await m.addWeightedAdapter(['a'], [0.7], 'linear', 'linear');
    await m.addWeightedAdapter(['a', 'b'], [0.5, 2.0], 'cat', 'cat');
    await m.addWeightedAdapter(['a', 'b'], [0.5, 2.0], 'svd');
    await m.addWeightedAdapter(['a', 'b'], [1.5, -0.5], 'svd-r3', 'svd', { svdRank: 3 });
    const weighted = {};
    for (const name of ['linear', 'cat', 'svd', 'svd-r3']) {
      await m.setAdapter(name);
      weighted[name] = { r: m.adapterConfig(name).r, logits: (await window.logitsOf(ids)).data };
    }
    const adapters = m.adapters();
    await m.unload();
    seen.unloaded = { active: m.activeAdapter, adapters: m.adapters(), logits: (await window.logitsOf(ids)).data };
    return { seen, weighted, adapters };
  }, ids);
  const { seen } = out;
  close(seen.a.logits, peft('all7-r4'), 'a');
  close(seen.b.logits, peft('qv-r8'), 'b');
  close(seen['a again'].logits, peft('all7-r4'), 'a again');
  assert.deepEqual([seen.disabled.active, seen.disabled.disabled], ['a', true]);
  close(seen.disabled.logits, base, 'disabled: the base');
  close(seen.enabled.logits, peft('all7-r4'), 'enabled: a');
  assert.deepEqual(out.adapters, ['a', 'b', 'c', 'cat', 'linear', 'svd', 'svd-r3']);
  assert.deepEqual([seen.unloaded.active, seen.unloaded.adapters], [null, []]);
  close(seen.unloaded.logits, base, 'unloaded: the base');
  const expected = readSafetensors(join(fixtures, 'peft', 'weighted_logits.safetensors'));
  for (const [name, w] of Object.entries(out.weighted)) close(w.logits, expected[name].data, `weighted ${name}`);
  assert.deepEqual([out.weighted.svd.r, out.weighted['svd-r3'].r], [8, 3]);
});

test('exportMerged(): a Hugging Face directory with the adapter merged in, the model unchanged', async () => {
  const out = await b.page.evaluate(async (ids) => {
    const m = window.tiny;
    await m.loadAdapter('/fixtures/peft/qv-r8/', 'qv');
    await m.setAdapter('qv');
    const files = await m.exportMerged();
    const unknown = await m.exportMerged({ adapterName: 'nope' }).then(() => null, (e) => e.message);
    const after = { merged: m.mergedAdapters, active: m.activeAdapter, logits: (await window.logitsOf(ids)).data };
    const reloaded = await window.app.webgpuLora.LoraModel.fromPretrained(files);
    const logits = Array.from((await reloaded.logits(ids)).data);
    reloaded.dispose();
    return { names: Object.keys(files).sort(), config: JSON.parse(await files['config.json'].text()), after, logits, unknown };
  }, ids);
  assert.match(out.unknown ?? '', /no adapter named "nope" to merge/);
  assert.deepEqual(out.names, ['config.json', 'model.safetensors']);
  assert.equal(out.config.hidden_size, 64);
  close(out.logits, peft('qv-r8', 'expected_merged_logits'), 'the exported merged model');
  assert.deepEqual([out.after.merged, out.after.active], [[], 'qv'], 'the model keeps its unmerged adapter');
  close(out.after.logits, peft('qv-r8'), 'the adapter after the export');
});

test('calls made without awaiting each run in the order they were made, a load that fetches its files first included', async () => {
  const out = await b.page.evaluate(async (ids) => {
    const m = window.tiny;
    const logits = (p) => p.then(({ data }) => Array.from(data));
    const [, , adapter, , base, , files, failed, after] = await Promise.all([
      m.loadAdapter('/fixtures/peft/qv-r8/', 'qv'),
      m.setAdapter('qv'),
      logits(m.logits(ids)),
      m.disableAdapter(),
      logits(m.logits(ids)),
      m.enableAdapter(),
      m.exportMerged(), // the default (the active adapter unless disabled) as of its turn
      m.loadAdapter('/fixtures/peft/no-such-adapter/', 'missing').then(() => 'resolved', (e) => e.message),
      logits(m.logits(ids)),
    ]);
    const reloaded = await window.app.webgpuLora.LoraModel.fromPretrained(files);
    const merged = Array.from((await reloaded.logits(ids)).data);
    reloaded.dispose();
    return { adapter, base, merged, failed, after, adapters: m.adapters() };
  }, ids);
  b.expected404.push('/fixtures/peft/no-such-adapter/adapter_config.json');
  close(out.adapter, peft('qv-r8'), 'logits after loadAdapter + setAdapter');
  close(out.base, base, 'logits after disableAdapter');
  close(out.merged, peft('qv-r8', 'expected_merged_logits'), 'exportMerged after enableAdapter');
  assert.match(out.failed, /no-such-adapter\/adapter_config\.json: HTTP 404/);
  close(out.after, peft('qv-r8'), 'logits after a failed load');
  assert.deepEqual(out.adapters, ['qv']);
  assert.deepEqual(b.errors, []);
});

test('generate(): an async iterator of text; messages, stop strings and AbortSignal', async () => {
  const out = await b.page.evaluate(async () => {
    const { LoraModel } = window.app.webgpuLora;
    const m = await LoraModel.fromPretrained('/fixtures/tiny-chat/');
    const run = async (prompt, options) => {
      const pieces = [];
      const stream = m.generate(prompt, options);
      for await (const piece of stream) pieces.push(piece);
      return { pieces, ...(await stream.result) };
    };
    // seeded sampling: the random tiny model's greedy text is one repeated byte
    const sampling = { maxNewTokens: 24, temperature: 1, seed: 7 };
    const full = await run('Hello robot', sampling);
    const messages = await run([{ role: 'user', content: 'Hello robot' }], sampling);
    // a stop string taken from the middle of the unstopped answer
    const stop = [...full.text].slice(8, 10).join('');
    const stopped = await run('Hello robot', { ...sampling, stop: [stop] });
    const controller = new AbortController();
    const pieces = [];
    const stream = m.generate('Hello robot', { maxNewTokens: 24, signal: controller.signal });
    for await (const piece of stream) { pieces.push(piece); if (pieces.length === 3) controller.abort(); }
    const aborted = await stream.result;
    // leaving the loop early stops generation too
    const early = m.generate('Hello robot', { maxNewTokens: 24 });
    for await (const _ of early) break;
    const left = await early.result;
    m.dispose();
    return { full, messages, stop, stopped, aborted, left };
  });
  assert.equal(out.full.pieces.join(''), out.full.text, 'the streamed pieces are the text');
  assert.ok(out.full.tokens.length > 6, `generated ${out.full.tokens.length} tokens`);
  assert.deepEqual(out.messages.promptIds, out.full.promptIds, 'a text prompt is one user message');
  assert.deepEqual(out.messages.tokens, out.full.tokens);
  const cut = out.full.text.indexOf(out.stop);
  assert.ok(cut > 0 && new Set(out.full.text).size > 3, `a varied text and a stop string inside it: ${JSON.stringify(out)}`);
  assert.equal(out.stopped.text, out.full.text.slice(0, cut), `stop ${JSON.stringify(out.stop)}`);
  assert.equal(out.stopped.pieces.join(''), out.stopped.text, 'no part of the stop string is streamed');
  assert.equal(out.stopped.stopReason, 'stopString');
  assert.equal(out.aborted.stopReason, 'cancelled');
  assert.ok(out.aborted.tokens.length < out.full.tokens.length);
  assert.equal(out.left.stopReason, 'cancelled');
});

test('dtype "f16": transformers\' logits of the f16 model (1e-4) in half the memory; PEFT\'s adapter on the f16 base, unmerged and merged into f16 by PEFT', async () => {
  const expected = readSafetensors(join(fixtures, 'tiny-llama-f16', 'expected.safetensors')).logits.data;
  const peftF16 = readSafetensors(join(fixtures, 'tiny-llama-f16', 'expected_qv-r8.safetensors'));
  const out = await b.page.evaluate(async (ids) => {
    const { LoraModel } = window.app.webgpuLora;
    const logits = async (m) => Array.from((await m.logits(Int32Array.from(ids))).data);
    const m16 = await LoraModel.fromPretrained('/fixtures/tiny-llama-f16/', { dtype: 'f16' });
    const m32 = await LoraModel.fromPretrained('/fixtures/tiny-llama-f16/', { dtype: 'f32' });
    const r = { f16: await logits(m16), f32: await logits(m32), bytes16: await m16.getMemoryFootprint(), bytes32: await m32.getMemoryFootprint() };
    await m16.loadAdapter('/fixtures/peft/qv-r8/', 'a');
    await m16.setAdapter('a');
    r.adapter = await logits(m16);
    r.report = await m16.mergeAdapter([], { safeMerge: true });
    r.merged = await logits(m16);
    await m16.unmergeAdapter();
    r.unmerged = await logits(m16);
    await m16.disableAdapter();
    r.disabled = await logits(m16);
    m16.dispose();
    m32.dispose();
    return r;
  }, ids);
  close(out.f16, expected, 'f16 weights');
  close(out.f32, expected, 'the same file in f32');
  const norms = 4 * 64 * (2 * 2 + 1); // RMSNorm weights stay f32: hidden 64, 2 layers
  assert.equal(out.bytes32 - norms, 2 * (out.bytes16 - norms), `matrices in f16 take half the bytes (${out.bytes16} vs ${out.bytes32})`);
  assert.deepEqual(out.report.merged, ['a']);
  assert.ok(maxAbsDiff(out.adapter, out.f16) > 0.05, 'the adapter changes the logits');
  close(out.adapter, peftF16.logits.data, 'the adapter on the f16 base');
  close(out.merged, peftF16.merged_logits.data, 'merged into the f16 base');
  // unmerging subtracts in f16 again: back within f16 rounding of the unmerged adapter and the base
  for (const [what, actual, reference] of [['unmerged vs the adapter', out.unmerged, out.adapter], ['disabled vs base', out.disabled, out.f16]]) {
    const diff = maxAbsDiff(actual, reference);
    assert.ok(diff < 1e-2, `${what}: ${diff} (f16 rounding only)`);
  }
  assert.deepEqual(b.errors, []);
});

test('bad input rejects with a clear message and the model keeps working', async () => {
  b.expected404.push('/fixtures/peft/no-such-adapter/adapter_config.json');
  const out = await b.page.evaluate(async (ids) => {
    const m = window.tiny;
    await m.loadAdapter('/fixtures/peft/qv-r8/', 'good');
    await m.setAdapter('good');
    const before = (await window.logitsOf(ids)).data;
    const fail = (p) => p.then(() => 'resolved', (e) => e.message);
    const get = async (f) => new Uint8Array(await (await fetch(`/fixtures/peft/qv-r8/${f}`)).arrayBuffer());
    const config = new TextDecoder().decode(await get('adapter_config.json'));
    const weights = await get('adapter_model.safetensors');
    // a trainer state of another adapter (rank 4, where the checkpoint's adapter has rank 8)
    let otherState = null;
    const ids2 = '{"input_ids": [1, 2, 3, 4]}\n{"input_ids": [5, 6, 7, 8]}';
    await m.train({ data: ids2, adapterName: 'other', loraConfig: { r: 4 }, trainingArgs: { maxSteps: 2, batchSize: 1, checkpointEvery: 1 }, onCheckpoint: (c) => { otherState = c['trainer_state.safetensors']; } });
    await m.deleteAdapter('other');
    await m.setAdapter('good');
    const errors = {
      missing: await fail(m.loadAdapter('/fixtures/peft/no-such-adapter/', 'x')),
      truncated: await fail(m.loadAdapter({ 'adapter_config.json': config, 'adapter_model.safetensors': weights.slice(0, weights.length - 100) }, 'x')),
      garbage: await fail(m.loadAdapter({ 'adapter_config.json': '{"r": 8, "peft_type": "LORA"', 'adapter_model.safetensors': weights }, 'x')),
      dora: await fail(m.loadAdapter({ 'adapter_config.json': config.replace('"use_dora": false', '"use_dora": true'), 'adapter_model.safetensors': weights }, 'x')),
      unknownStored: await fail(m.loadAdapter('no-such-adapter', 'x')),
      unknownSet: await fail(m.setAdapter('nope')),
      unknownDelete: await fail(m.deleteAdapter('nope')),
      duplicate: await fail(m.loadAdapter('/fixtures/peft/qv-r8/', 'good')),
      badIds: await fail(m.logits([1, 100000])),
      badOptions: await fail(m.train({ data: '{"text": "hi"}', trainingArgs: { learningRat: 1 } })),
      dtype: await fail(window.app.webgpuLora.LoraModel.fromPretrained('/fixtures/tiny-llama/', { dtype: 'bf16' })),
      adapterFormat: await fail(m.exportAdapter('good', { format: 'ggml' })),
      mergedFormat: await fail(m.exportMerged({ format: 'onnx' })),
      outType: await fail(m.exportMerged({ format: 'gguf', outType: 'q3_k' })),
      resumeBoth: await fail(m.train({ data: '{"text": "hi"}', initFrom: 'good', resumeFrom: {} })),
      resumeNoState: await fail(m.train({ data: '{"text": "hi"}', resumeFrom: { 'adapter_config.json': config, 'adapter_model.safetensors': weights } })),
      resumeOtherState: await fail(m.train({ data: ids2, adapterName: 'resumed', resumeFrom: { 'adapter_config.json': config, 'adapter_model.safetensors': weights, 'trainer_state.safetensors': otherState } })),
      resumeBadState: await fail(m.train({ data: '{"input_ids": [1, 2, 3]}', resumeFrom: { 'adapter_config.json': config, 'adapter_model.safetensors': weights, 'trainer_state.safetensors': new Uint8Array([1, 2, 3]) } })),
    };
    return { errors, after: (await window.logitsOf(ids)).data, before, adapters: m.adapters(), active: m.activeAdapter };
  }, ids);
  const e = out.errors;
  assert.match(e.missing, /no-such-adapter\/adapter_config\.json: HTTP 404/);
  assert.match(e.truncated, /adapter_model\.safetensors: invalid safetensors .*truncated/);
  assert.match(e.garbage, /adapter_config\.json: not valid JSON/);
  assert.match(e.dora, /adapter_config\.json: use_dora = true/);
  assert.match(e.unknownStored, /no adapter named "no-such-adapter" in the store/);
  assert.match(e.unknownSet, /no adapter named "nope"; loaded: \["good"\]/);
  assert.match(e.unknownDelete, /no adapter named "nope"/);
  assert.equal(e.duplicate, 'an adapter named "good" is already loaded: delete it first or choose another name');
  assert.match(e.adapterFormat, /exportAdapter: format "ggml" is not "peft" or "gguf"/);
  assert.match(e.mergedFormat, /exportMerged: format "onnx" is not "hf" or "gguf"/);
  assert.ok(e.outType.includes('q3_k'), e.outType);
  assert.equal(e.resumeBoth, 'train: give "initFrom" (an adapter to train further) or "resumeFrom" (a checkpoint to resume), not both');
  assert.equal(e.resumeNoState, 'train: "resumeFrom" is a checkpoint\'s files, as onCheckpoint gets them; it has no "trainer_state.safetensors"');
  assert.match(e.resumeBadState, /^trainer state: not a trainer state file/);
  assert.equal(e.resumeOtherState, "trainer state: moment shapes differ from this adapter's: it belongs to another adapter");
  assert.equal(e.badIds, 'token id 100000 is out of the vocabulary (size 256)');
  assert.match(e.badOptions, /training options: unknown field `learningRat`/);
  assert.equal(e.dtype, 'unknown weight dtype "bf16": use "auto", "f32", "f16" or a type to quantize to (q8_0, q4_0, q4_1, q5_0)');
  assert.deepEqual(out.after, out.before, 'the model is unchanged');
  assert.deepEqual([out.adapters, out.active], [['good'], 'good']);
  assert.deepEqual(b.errors, []);
});

test('exportAdapter(name, {asLora: true}): an OLoRA adapter as a plain LoRA of rank 2r that gives PEFT logits on the unmodified base', async () => {
  const out = await b.page.evaluate(async (ids) => {
    const m = window.tiny;
    await m.loadAdapter('/fixtures/peft/olora/', 'olora');
    const files = await m.exportAdapter('olora', { asLora: true });
    const config = JSON.parse(await files['adapter_config.json'].text());
    await m.deleteAdapter('olora'); // the base is the original again
    await m.loadAdapter(files, 'plain');
    await m.setAdapter('plain');
    const logits = (await window.logitsOf(ids)).data;
    const refused = await m.exportAdapter('plain', { asLora: true }).then(() => 'exported', (e) => e.message);
    return { config, logits, refused };
  }, ids);
  assert.deepEqual([out.config.r, out.config.lora_alpha, out.config.init_lora_weights], [8, 16, true]);
  close(out.logits, peft('olora'), 'olora converted to LoRA');
  assert.match(out.refused, /already a plain LoRA/);
  assert.deepEqual(b.errors, []);
});
