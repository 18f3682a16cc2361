// Quantized bases in headless Chromium on WebGPU: GGUF files loaded as they ship (by URL and as a
// Blob), their logits against transformers loading each GGUF itself and PEFT's with an adapter
// (tests/fixtures/quant, made by make_fixtures.py); quantizing on load (dtype "q8_0" etc.) against
// gguf-py's rounding; an adapter trained on WebGPU over a Q4_0 base, saved to IndexedDB and
// reloaded after a relaunch with identical logits; merging into a quantized base requantizes as
// gguf-py does, and the GGUF exports (merged model, LoRA adapter) are the files gguf-py writes;
// hub ids resolved under env.remoteHost (a local server with the hub's URL layout).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { relaunchable, readSafetensors, readJson, root, maxAbsDiff } from './helpers.mjs';
import { MOUNTS } from '../../scripts/serve.mjs';

const fixtures = join(root, 'tests', 'fixtures');
const { ids, types } = readJson(join(fixtures, 'quant', 'expected.json'));
const expected = readSafetensors(join(fixtures, 'quant', 'expected.safetensors'));
const TOLERANCE = 1e-4;
let session;
let errors;
const open = () => session.open();

/** Runs `check(browser)` on a fresh launch, then asserts no console error appeared, and closes it. */
async function inBrowser(check) {
  const browser = await open();
  try {
    await check(browser);
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
  }
}

before(async () => {
  // two repositories with the hub's URL layout, ORG/NAME/resolve/REVISION/FILE
  const hub = [
    ['/hub/test-org/tiny-llama/resolve/main/', join(fixtures, 'tiny-llama')],
    ['/hub/test-org/tiny-quant/resolve/v1/', join(fixtures, 'quant')],
  ];
  session = await relaunchable({ mounts: [...hub, ...MOUNTS] });
  errors = session.errors;
});
after(() => session?.close());

const close = (actual, reference, what) => {
  assert.equal(actual.length, reference.length, `${what}: length`);
  const diff = maxAbsDiff(actual, reference);
  assert.ok(diff < TOLERANCE, `${what}: max |ours - reference| = ${diff}`);
};

test('GGUFs load as they ship (URL and Blob): transformers\' logits, PEFT\'s with an adapter, in less memory; dtype "q8_0" etc. quantize on load', () => inBrowser(async (browser) => {
  const out = await browser.page.evaluate(async ({ ids, types }) => {
    const { LoraModel } = window.app.webgpuLora;
    const logits = async (m) => Array.from((await m.logits(Int32Array.from(ids))).data);
    const f32 = await LoraModel.fromPretrained('/fixtures/tiny-llama/');
    const r = { f32Bytes: await f32.getMemoryFootprint(), gguf: {}, onLoad: {} };
    f32.dispose();
    for (const type of types) {
      // one with a query, as hub download links have
      const url = `/fixtures/quant/tiny-${type.toLowerCase()}.gguf` + (type === 'Q4_1' ? '?download=true' : '');
      const progress = [];
      const m = await LoraModel.fromPretrained(url, { onProgress: (e) => progress.push(e) });
      const entry = { base: await logits(m), bytes: await m.getMemoryFootprint(), name: m.baseModel.name };
      entry.downloaded = progress.filter((e) => e.stage === 'download').pop()?.total;
      await m.loadAdapter('/fixtures/peft/qv-r8/', 'a');
      await m.setAdapter('a');
      entry.adapter = await logits(m);
      m.dispose();
      const q = await LoraModel.fromPretrained('/fixtures/tiny-llama/', { dtype: type.toLowerCase() });
      r.onLoad[type] = { logits: await logits(q), bytes: await q.getMemoryFootprint() };
      q.dispose();
      r.gguf[type] = entry;
    }
    // a GGUF given as a File (a file picker's), not a URL
    const blob = await (await fetch('/fixtures/quant/tiny-q4_0.gguf')).blob();
    const fromFile = await LoraModel.fromPretrained(new File([blob], 'tiny-q4_0.gguf'));
    r.file = { logits: await logits(fromFile), name: fromFile.baseModel.name };
    fromFile.dispose();
    r.bad = await LoraModel.fromPretrained('/fixtures/tiny-llama/', { dtype: 'q4_k' }).then(() => 'loaded', (e) => e.message);
    return r;
  }, { ids, types });
  for (const type of types) {
    const e = out.gguf[type];
    close(e.base, expected[`${type}.logits`].data, `${type} GGUF`);
    close(e.adapter, expected[`${type}.qv-r8.logits`].data, `${type} GGUF + qv-r8`);
    assert.ok(e.bytes * 3 < out.f32Bytes, `${type}: ${e.bytes} bytes on the GPU vs ${out.f32Bytes} in f32`);
    assert.equal(e.downloaded, statSync(join(fixtures, 'quant', `tiny-${type.toLowerCase()}.gguf`)).size, 'one download: the GGUF file');
    assert.equal(e.name, `tiny-${type.toLowerCase()}`.replace(/-q\d.*$/, ''), 'the quantization is not part of the base model\'s name');
    close(out.onLoad[type].logits, expected[`load_in_${type}.logits`].data, `tiny-llama with dtype ${type}`);
    assert.ok(out.onLoad[type].bytes < out.f32Bytes);
  }
  close(out.file.logits, expected['Q4_0.logits'].data, 'a GGUF File');
  assert.match(out.bad, /unknown weight dtype "q4_k".*q8_0, q4_0, q4_1, q5_0/);
}));

test('an adapter trained on WebGPU over a Q4_0 GGUF base, saved to IndexedDB, gives identical logits after a relaunch; the base is untouched', async () => {
  const data = Array.from({ length: 8 }, (_, i) => JSON.stringify({ text: `beep boop ${i}: I am a robot. ` + 'bzzt '.repeat(i % 3) })).join('\n');
  const browser = await open();
  const first = await browser.page.evaluate(async ({ data, ids }) => {
    const { LoraModel } = window.app.webgpuLora;
    const m = await LoraModel.fromPretrained('/fixtures/quant/tiny-q4_0.gguf');
    const logits = async () => Array.from((await m.logits(Int32Array.from(ids))).data);
    const base = await logits();
    const bytes = await m.getMemoryFootprint();
    const report = await m.train({
      data, dataName: 'robot.jsonl', adapterName: 'q4-robot',
      loraConfig: { r: 4, loraAlpha: 8, loraDropout: 0, targetModules: ['q_proj', 'v_proj'] },
      trainingArgs: { learningRate: 1e-2, maxSteps: 3, batchSize: 2, seed: 1 },
    });
    const trained = await logits();
    await m.saveAdapter('q4-robot');
    await m.disableAdapter();
    const disabled = await logits();
    const r = { base, trained, disabled, bytes, afterBytes: await m.getMemoryFootprint(), losses: report.summary };
    m.dispose();
    return r;
  }, { data, ids });
  await browser.close();
  assert.equal(first.losses.steps, 3);
  assert.ok(maxAbsDiff(first.trained, first.base) > 1e-3, 'training changed the adapter');
  assert.deepEqual(first.disabled, first.base, 'the quantized base is bit-identical after training');
  close(first.base, expected['Q4_0.logits'].data, 'Q4_0 GGUF before training');

  await inBrowser(async (browser) => {
    const second = await browser.page.evaluate(async (ids) => {
      const { LoraModel, AdapterStore } = window.app.webgpuLora;
      const m = await LoraModel.fromPretrained('/fixtures/quant/tiny-q4_0.gguf');
      await m.loadAdapter('q4-robot');
      await m.setAdapter('q4-robot');
      const logits = Array.from((await m.logits(Int32Array.from(ids))).data);
      m.dispose();
      const store = await AdapterStore.open();
      await store.delete('q4-robot');
      store.close();
      return logits;
    }, ids);
    assert.deepEqual(second, first.trained, 'identical logits after the relaunch');
  });
});

test('on a Q4_0 GGUF base: merging requantizes as gguf-py does and unmerging restores the base; GGUF exports load back and match gguf-py\'s files', () => inBrowser(async (browser) => {
  const out = await browser.page.evaluate(async (ids) => {
    const { LoraModel } = window.app.webgpuLora;
    const logits = async (m) => Array.from((await m.logits(Int32Array.from(ids))).data);
    const m = await LoraModel.fromPretrained('/fixtures/quant/tiny-q4_0.gguf');
    const base = await logits(m);
    await m.loadAdapter('/fixtures/peft/qv-r8/', 'a');
    await m.setAdapter('a');
    const adapterGguf = Array.from(new Uint8Array(await (await m.exportAdapter('a', { format: 'gguf' }))['adapter.gguf'].arrayBuffer()));
    const mergedFile = (await m.exportMerged({ format: 'gguf' }))['model.gguf'];
    await m.mergeAdapter(['a']);
    const merged = await logits(m);
    await m.unmergeAdapter();
    await m.disableAdapter();
    const unmerged = await logits(m);
    m.dispose();
    const reloaded = await LoraModel.fromPretrained(new File([mergedFile], 'merged.gguf'));
    const r = { base, merged, unmerged, adapterGguf, reloaded: await logits(reloaded) };
    reloaded.dispose();
    return r;
  }, ids);
  close(out.merged, expected['Q4_0.qv-r8.merged.logits'].data, 'merged into Q4_0');
  assert.deepEqual(out.unmerged, out.base, 'unmerged: the loaded blocks are back');
  close(out.reloaded, expected['Q4_0.qv-r8.merged.logits'].data, 'the merged GGUF, loaded back');
  assert.ok(Buffer.from(out.adapterGguf).equals(readFileSync(join(fixtures, 'quant', 'adapter-qv-r8.gguf'))), 'the GGUF LoRA is gguf-py\'s file');
}));

test('a Hugging Face base quantized on load exports a GGUF that loads back as the same model; one without tokenizer.json is refused', () => inBrowser(async (browser) => {
  const out = await browser.page.evaluate(async () => {
    const { LoraModel } = window.app.webgpuLora;
    const ids = Int32Array.from([1, 5, 77, 200, 33, 258, 12]);
    const logits = async (m) => Array.from((await m.logits(ids)).data);
    const m = await LoraModel.fromPretrained('/fixtures/tiny-chat/', { dtype: 'q8_0' });
    const gguf = (await m.exportMerged({ format: 'gguf' }))['model.gguf'];
    const r = { base: await logits(m) };
    m.dispose();
    const reloaded = await LoraModel.fromPretrained(new File([gguf], 'tiny-chat.gguf'));
    r.reloaded = await logits(reloaded);
    reloaded.dispose();
    const untokenized = await LoraModel.fromPretrained('/fixtures/tiny-llama/');
    r.refused = await untokenized.exportMerged({ format: 'gguf' }).then(() => null, (e) => e.message);
    untokenized.dispose();
    return r;
  });
  close(out.reloaded, out.base, 'the exported GGUF (Q8_0 blocks as loaded), loaded back');
  assert.match(out.refused, /loaded without tokenizer\.json/);
}));

test('hub ids resolve under env.remoteHost as transformers.js resolves them: a directory, and a GGUF file at a revision', () => inBrowser(async (browser) => {
  const out = await browser.page.evaluate(async ({ ids, origin }) => {
    const { LoraModel, env } = window.app.webgpuLora;
    const defaultHost = env.remoteHost;
    env.remoteHost = `${origin}/hub/`;
    try {
      const logits = async (m) => Array.from((await m.logits(Int32Array.from(ids))).data);
      const files = [];
      const dir = await LoraModel.fromPretrained('test-org/tiny-llama', { onProgress: (e) => e.stage === 'download' && files.push(e.file) });
      const gguf = await LoraModel.fromPretrained('test-org/tiny-quant', { revision: 'v1', file: 'tiny-q8_0.gguf' });
      const r = { defaultHost, dir: await logits(dir), dirName: dir.baseModel.name, gguf: await logits(gguf), ggufName: gguf.baseModel.name };
      r.files = [...new Set(files)];
      dir.dispose();
      gguf.dispose();
      return r;
    } finally {
      env.remoteHost = defaultHost;
    }
  }, { ids, origin: session.origin });
  assert.equal(out.defaultHost, 'https://huggingface.co/');
  close(out.dir, readSafetensors(join(fixtures, 'tiny-llama', 'expected.safetensors')).logits.data, 'hub id of a directory');
  close(out.gguf, expected['Q8_0.logits'].data, 'hub id + revision + GGUF file');
  assert.deepEqual([out.dirName, out.ggufName], ['test-org/tiny-llama', 'test-org/tiny-quant']);
  assert.ok(out.files.includes('config.json') && out.files.includes('model.safetensors'), out.files.join(', '));
}));
