// Adapters in IndexedDB (lib/store.js) in a real browser profile: saved adapters survive a normal
// relaunch and a SIGKILL right after the save resolves; a save that hits the storage quota writes
// nothing; rename / import / export / delete / usage; an adapter refuses another base model; the
// base model's files come from the cache on the next visit; two pages of one origin hear each
// other's changes, and racing each other leave complete records only; an evicted model cache is
// fetched again with progress; a training run's checkpoints kept in IndexedDB survive a SIGKILL
// and resume with the uninterrupted run's losses.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { relaunchable, readSafetensors, readJson, root, maxAbsDiff, watchConsole } from './helpers.mjs';

const fixtures = join(root, 'tests', 'fixtures');
const { ids } = readJson(join(fixtures, 'tiny-llama', 'expected.json'));
let session;
let origin;
let errors;

before(async () => {
  session = await relaunchable();
  ({ origin, errors } = session);
});
after(() => session?.close());

/** A browser on the shared profile with the demo page open (the package's API as window.app.webgpuLora). */
async function open() {
  const browser = await session.open();
  await browser.page.evaluate(() => {
    window.load = async (url) => {
      const progress = [];
      const model = await window.app.webgpuLora.LoraModel.fromPretrained(url, { onProgress: (e) => progress.push(e) });
      return { model, downloads: progress.filter((e) => e.stage === 'download') };
    };
    window.logitsOf = async (m, ids) => Array.from((await m.logits(ids)).data);
  });
  return browser;
}

/** A second page of the same origin in the same browser (another tab), the site loaded. */
async function secondPage(browser) {
  const page = await browser.page.context().newPage();
  watchConsole(page, errors);
  await page.goto(`${origin}/`);
  await page.waitForFunction(() => window.app?.ready);
  return page;
}

test('saved adapters survive a relaunch and a SIGKILL; a quota failure writes nothing', async () => {
  // 1. save an adapter, quit normally
  let browser = await open();
  const first = await browser.page.evaluate(async (ids) => {
    const { model: m, downloads } = await window.load('/fixtures/tiny-llama/');
    await m.loadAdapter('/fixtures/peft/qv-r8/', 'qv');
    await m.setAdapter('qv');
    const saved = await m.saveAdapter('qv', { as: 'saved-qv' });
    return { saved, logits: await window.logitsOf(m, ids), cached: downloads.some((e) => e.cached) };
  }, ids);
  assert.equal(first.cached, false, 'the first visit downloads');
  await browser.close();

  // 2. relaunch: the adapter is listed with its metadata and gives identical logits; then save
  //    another and kill the browser the moment the save resolves
  browser = await open();
  const second = await browser.page.evaluate(async (ids) => {
    const { AdapterStore } = window.app.webgpuLora;
    const store = await AdapterStore.open();
    const listed = await store.list();
    store.close();
    const { model: m, downloads } = await window.load('/fixtures/tiny-llama/');
    await m.loadAdapter('saved-qv');
    await m.setAdapter('saved-qv');
    const logits = await window.logitsOf(m, ids);
    await m.loadAdapter('/fixtures/peft/all7-r4/', 'a7');
    await m.saveAdapter('a7', { as: 'killed' });
    return { listed, logits, weightsCached: downloads.filter((e) => e.file === 'model.safetensors').every((e) => e.cached) };
  }, ids);
  await browser.kill();
  assert.equal(second.listed.length, 1);
  const meta = second.listed[0];
  assert.deepEqual([meta.name, meta.r, meta.loraAlpha, meta.baseModel.name, meta.baseModel.shapes.hiddenSize], ['saved-qv', 8, 16, 'tiny-llama', 64]);
  assert.ok(meta.size > 1000 && meta.created > 0 && meta.created <= Date.now(), JSON.stringify(meta));
  assert.deepEqual(second.logits, first.logits, 'identical logits after the relaunch');
  assert.equal(second.weightsCached, true, 'the base weights come from the cache on the next visit');

  // 3. after the SIGKILL: the last save is complete; then a save over the quota writes nothing
  browser = await open();
  const cdp = await browser.page.context().newCDPSession(browser.page);
  const third = await browser.page.evaluate(async (ids) => {
    const { model: m } = await window.load('/fixtures/tiny-llama/');
    await m.loadAdapter('killed');
    await m.setAdapter('killed');
    return { names: (await window.app.webgpuLora.AdapterStore.open().then((s) => s.list())).map((a) => a.name), logits: await window.logitsOf(m, ids) };
  }, ids);
  assert.deepEqual(third.names, ['saved-qv', 'killed']);
  const expected = readSafetensors(join(fixtures, 'peft', 'all7-r4', 'expected_logits.safetensors')).logits.data;
  assert.ok(maxAbsDiff(third.logits, expected) < 1e-4, 'the adapter saved before the kill is complete');

  const { usage } = await browser.page.evaluate(() => navigator.storage.estimate());
  await cdp.send('Storage.overrideQuotaForOrigin', { origin, quotaSize: usage + 2000 });
  const quota = await browser.page.evaluate(async (ids) => {
    const { LoraModel, AdapterStore } = window.app.webgpuLora;
    const { model: m } = await window.load('/fixtures/tiny-llama/');
    await m.loadAdapter('/fixtures/peft/rank-pattern/', 'big');
    const error = await m.saveAdapter('big').then(() => 'saved', (e) => e.message);
    const store = await AdapterStore.open();
    const names = (await store.list()).map((a) => a.name);
    const record = await store.get('big');
    store.close();
    await m.loadAdapter('saved-qv');
    await m.setAdapter('saved-qv');
    return { error, names, record, logits: await window.logitsOf(m, ids) };
  }, ids);
  await cdp.send('Storage.overrideQuotaForOrigin', { origin });
  assert.match(quota.error, /cannot save adapter "big" \([\d.]+ MB\): the browser's storage quota is full .* Nothing was written/);
  assert.deepEqual(quota.names, ['saved-qv', 'killed'], 'no record of the failed save');
  assert.equal(quota.record, null);
  assert.deepEqual(quota.logits, first.logits, 'earlier adapters intact');
  await browser.close();
  assert.deepEqual(errors, []);
});

test('rename, export, import, delete and usage; an adapter refuses another base model unless allowOtherBase', async () => {
  const browser = await open();
  const out = await browser.page.evaluate(async (ids) => {
    const { AdapterStore } = window.app.webgpuLora;
    const fail = (p) => p.then(() => 'resolved', (e) => e.message);
    const store = await AdapterStore.open();
    const usageBefore = await store.usage();
    await store.rename('saved-qv', 'renamed');
    const renameTaken = await fail(store.rename('renamed', 'killed'));
    const renameMissing = await fail(store.rename('nope', 'x'));
    const exported = await store.export('renamed');
    const imported = await store.import(exported);
    const importedNamed = await store.import(Object.values(exported).map((blob, i) => new File([blob], Object.keys(exported)[i])), { name: 'from-files' });
    const duplicate = await fail(store.import(exported, { name: 'renamed' }));
    const corrupt = await fail(store.import({ 'adapter_config.json': exported['adapter_config.json'], 'adapter_model.safetensors': exported['adapter_model.safetensors'].slice(0, 100) }));
    const names = (await store.list()).map((a) => a.name);
    const { model: m } = await window.load('/fixtures/tiny-llama/');
    await m.loadAdapter('renamed');
    await m.loadAdapter(imported.name);
    await m.setAdapter('renamed');
    const a = await window.logitsOf(m, ids);
    await m.setAdapter(imported.name);
    const b = await window.logitsOf(m, ids);
    await store.delete(imported.name);
    await store.delete('from-files');
    const deleteMissing = await fail(store.delete('from-files'));
    const usageAfter = await store.usage();
    // another base: the tiny chat model has another vocabulary
    const { model: other } = await window.load('/fixtures/tiny-chat/');
    const otherBase = await fail(other.loadAdapter('renamed'));
    // the same model under another name: refused, unless {allowOtherBase: true}
    const renamedBase = await window.app.webgpuLora.LoraModel.fromPretrained('/fixtures/tiny-llama/', { name: 'my-tiny' });
    const otherName = await fail(renamedBase.loadAdapter('renamed'));
    await renamedBase.loadAdapter('renamed', undefined, { allowOtherBase: true });
    await renamedBase.setAdapter('renamed');
    const allowed = await window.logitsOf(renamedBase, ids);
    store.close();
    return { usageBefore, usageAfter, renameTaken, renameMissing, imported, importedNamed, duplicate, corrupt, names, a, b, deleteMissing, otherBase, otherName, allowed, final: (await AdapterStore.open().then((s) => s.list())).map((x) => x.name) };
  }, ids);
  await browser.close();
  assert.equal(out.usageBefore.adapters, 2);
  assert.ok(out.usageBefore.bytes > 0 && out.usageBefore.quota > 0);
  assert.match(out.renameTaken, /an adapter named "killed" is already stored/);
  assert.match(out.renameMissing, /no stored adapter named "nope"/);
  assert.deepEqual([out.imported.name, out.importedNamed.name], ['imported-1', 'from-files']);
  assert.match(out.duplicate, /an adapter named "renamed" is already stored/);
  assert.match(out.corrupt, /adapter_model\.safetensors: invalid safetensors/);
  assert.deepEqual(out.names, ['renamed', 'killed', 'imported-1', 'from-files'], 'oldest first; a rename keeps the creation date');
  assert.deepEqual(out.b, out.a, 'an exported and re-imported adapter gives the same logits');
  assert.match(out.deleteMissing, /no stored adapter named "from-files"/);
  assert.equal(out.usageAfter.adapters, 2);
  assert.match(out.otherBase, /adapter "renamed" was made for base model "tiny-llama" but the loaded model is "tiny-chat" \(vocab_size 256 vs 264\)/);
  assert.match(out.otherName, /adapter "renamed" was made for base model "tiny-llama" but the loaded model is "my-tiny" \(another model name\): .*\{allowOtherBase: true\}/);
  const peft = readSafetensors(join(fixtures, 'peft', 'qv-r8', 'expected_logits.safetensors')).logits.data;
  assert.ok(maxAbsDiff(out.allowed, peft) < 1e-4, `allowOtherBase: the adapter runs and gives PEFT's logits (${maxAbsDiff(out.allowed, peft)})`);
  assert.deepEqual(out.final, ['renamed', 'killed']);
  assert.deepEqual(errors, []);
});

test('two pages of one origin: each hears the other\'s saves, renames and deletes and its adapter table follows; the first save asks for persistent storage', async () => {
  const browser = await open();
  const other = await secondPage(browser);
  await other.evaluate(async () => {
    window.heard = [];
    window.otherStore = await window.app.webgpuLora.AdapterStore.open();
    window.otherStore.onChange((c) => window.heard.push(c));
  });
  const before = await other.evaluate(async () => (await window.otherStore.list()).map((a) => a.name));
  const out = await browser.page.evaluate(async () => {
    let asked = 0;
    const persist = navigator.storage.persist.bind(navigator.storage);
    navigator.storage.persist = () => { asked += 1; return persist(); };
    const store = await window.app.webgpuLora.AdapterStore.open();
    const config = JSON.stringify({ peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'], base_model_name_or_path: 'tiny-llama' });
    await store.save({ name: 'tab-a', config, weights: new Uint8Array([1, 2, 3]) });
    await store.save({ name: 'tab-b', config, weights: new Uint8Array([4, 5, 6]) });
    await store.rename('tab-a', 'tab-c');
    await store.delete('tab-b');
    const persisted = await store.persisted();
    store.close();
    return { asked, persisted };
  });
  await other.waitForFunction(() => window.heard.length === 4);
  // the site's own table in the other page, refreshed on the same messages
  await other.waitForSelector('#adapter-table tr[data-name="tab-c"]');
  const seen = await other.evaluate(async () => ({
    heard: window.heard,
    names: (await window.otherStore.list()).map((a) => a.name),
    rows: Array.from(document.querySelectorAll('#adapter-table tr[data-name]'), (r) => r.dataset.name),
    storage: document.getElementById('storage-status').textContent,
  }));
  await other.evaluate(async () => { await window.otherStore.delete('tab-c'); window.otherStore.close(); });
  await browser.close();
  assert.deepEqual(seen.heard, [
    { change: 'save', name: 'tab-a' }, { change: 'save', name: 'tab-b' }, { change: 'rename', name: 'tab-a', to: 'tab-c' }, { change: 'delete', name: 'tab-b' },
  ]);
  assert.deepEqual(seen.names, [...before, 'tab-c']);
  assert.deepEqual(seen.rows, seen.names);
  assert.equal(out.asked, 1, 'persistent storage is asked for once, on the first save');
  assert.equal(out.persisted, false, 'headless Chromium does not grant it');
  assert.match(seen.storage, /^Storage is not persistent: the browser may clear these adapters/);
  assert.deepEqual(errors, []);
});

test('two pages racing on one store (saves of one name, renames, reads and deletes at once) leave complete records only', async () => {
  const browser = await open();
  const other = await secondPage(browser);
  // each writer's record is self-consistent: r 4 with bytes of 1, or r 8 with bytes of 2
  const race = (page, tag) => page.evaluate(async (tag) => {
    const store = await window.app.webgpuLora.AdapterStore.open();
    const [r, fill] = tag === 'a' ? [4, 1] : [8, 2];
    const config = JSON.stringify({ peft_type: 'LORA', r, lora_alpha: 2 * r, target_modules: ['q_proj'], base_model_name_or_path: 'race' });
    const broken = [];
    let read = 0;
    const check = (record, where) => {
      if (!record) return;
      read += 1;
      const whole = record.weights.length + record.config.length === record.size;
      if (!whole || !record.weights.every((b) => b === (record.r === 4 ? 1 : 2))) broken.push(`${where}: r ${record.r}, ${record.weights.length} bytes, size ${record.size}`);
    };
    for (let i = 0; i < 15; i++) {
      const weights = new Uint8Array(2000 + 97 * i).fill(fill);
      const outcomes = await Promise.allSettled([
        store.save({ name: 'race-same', config, weights }, { overwrite: true }),
        store.get('race-same').then((rec) => check(rec, `get ${i}`)),
        store.rename('race-same', `race-${tag}-${i}`),
        store.get(`race-${tag}-${i}`).then((rec) => check(rec, `get renamed ${i}`)),
        store.delete(`race-${tag}-${i}`),
      ]);
      // a refusal is fine ("no stored adapter", "already stored"); anything else is not
      for (const o of outcomes) if (o.status === 'rejected' && !/no stored adapter|already stored/.test(o.reason.message)) broken.push(o.reason.message);
    }
    store.close();
    return { broken, read };
  }, tag);
  const [a, b] = await Promise.all([race(browser.page, 'a'), race(other, 'b')]);
  const final = await browser.page.evaluate(async () => {
    const store = await window.app.webgpuLora.AdapterStore.open();
    const left = (await store.list()).filter((m) => m.name.startsWith('race'));
    const records = await Promise.all(left.map((m) => store.get(m.name)));
    const summary = records.map((rec) => ({ name: rec.name, r: rec.r, bytes: rec.weights.length, fills: [...new Set(rec.weights)], size: rec.size, configLength: rec.config.length }));
    for (const m of left) await store.delete(m.name);
    store.close();
    return summary;
  });
  await browser.close();
  assert.deepEqual([a.broken, b.broken], [[], []], 'every record read during the race was whole');
  assert.ok(a.read > 0 && b.read > 0, `records were read during the race (${a.read}, ${b.read})`);
  for (const rec of final) {
    assert.deepEqual(rec.fills, [rec.r === 4 ? 1 : 2], `${rec.name}: its bytes are its writer's`);
    assert.equal(rec.bytes + rec.configLength, rec.size, `${rec.name}: weights and config of one save`);
  }
  assert.deepEqual(errors, []);
});

test('two pages racing the model: a delete while the other loads the adapter, imports while the other trains; whole adapters and records only', async () => {
  const browser = await open();
  const other = await secondPage(browser);
  const files = async () => {
    const get = async (f) => new Uint8Array(await (await fetch(`/fixtures/peft/qv-r8/${f}`)).arrayBuffer());
    return { 'adapter_config.json': await get('adapter_config.json'), 'adapter_model.safetensors': await get('adapter_model.safetensors') };
  };
  await other.evaluate(async (files) => {
    window.files = await new Function(`return (${files})()`)();
    window.store = await window.app.webgpuLora.AdapterStore.open();
    await window.store.import(window.files, { name: 'race-shared', overwrite: true });
  }, files.toString());
  await browser.page.evaluate(async (ids) => {
    const { model } = await window.load('/fixtures/tiny-llama/');
    window.m = model;
    await model.loadAdapter('/fixtures/peft/qv-r8/', 'reference');
    await model.setAdapter('reference');
    window.reference = await window.logitsOf(model, ids);
  }, ids);

  // 1. one page deletes and imports the adapter again while the other loads it from the store
  const rounds = 12;
  const [loads] = await Promise.all([
    browser.page.evaluate(async ({ ids, rounds }) => {
      const outcomes = [];
      for (let i = 0; i < rounds; i++) {
        try {
          await window.m.loadAdapter('race-shared', `got-${i}`);
          await window.m.setAdapter(`got-${i}`);
          const same = JSON.stringify(await window.logitsOf(window.m, ids)) === JSON.stringify(window.reference);
          outcomes.push(same ? 'loaded whole' : 'loaded other logits');
        } catch (e) {
          outcomes.push(/^no adapter named "race-shared" in the store/.test(e.message) ? 'not there' : e.message);
        }
      }
      return { outcomes, adapters: window.m.adapters() };
    }, { ids, rounds }),
    other.evaluate(async (rounds) => {
      for (let i = 0; i < 4 * rounds; i++) {
        await window.store.delete('race-shared');
        await new Promise((r) => setTimeout(r, i % 3));
        await window.store.import(window.files, { name: 'race-shared' });
      }
    }, rounds),
  ]);
  const loaded = loads.outcomes.map((o, i) => (o === 'loaded whole' ? `got-${i}` : null)).filter(Boolean);
  assert.deepEqual(loads.outcomes.filter((o) => o !== 'loaded whole' && o !== 'not there'), [], 'each load gave the whole adapter or said it was not there');
  assert.ok(loaded.length > 0, `some loads found the adapter (${loads.outcomes})`);
  assert.deepEqual(loads.adapters, ['reference', ...loaded].sort(), 'the model holds the loads that succeeded, and only those');

  // 2. the other page imports and deletes adapters while this one trains, checkpointing into the store
  const [training, imports] = await Promise.all([
    browser.page.evaluate(async () => {
      const store = await window.app.webgpuLora.AdapterStore.open();
      const rows = Array.from({ length: 8 }, (_, i) => ({ input_ids: Array.from({ length: 16 }, (_, j) => (i * 7 + j * 3) % 250 + 1) }));
      const losses = [];
      const saves = [];
      const report = await window.m.train({
        data: rows, dataName: 'ids.jsonl', adapterName: 'trained', trainingArgs: { maxSteps: 24, batchSize: 2, checkpointEvery: 4 },
        onStep: (s) => losses.push(s.loss),
        onCheckpoint: (c) => saves.push(store.saveCheckpoint('race-run', c)),
      });
      await Promise.all(saves);
      const checkpoint = await store.getCheckpoint('race-run');
      // saves asked for without waiting land in order: a slow one (a 64 MB Blob to read) does not
      // land after, and over, a later step's
      const files = (step, weights) => ({ step, 'adapter_config.json': '{}', 'adapter_model.safetensors': weights, 'trainer_state.safetensors': new Uint8Array(4) });
      await Promise.all([store.saveCheckpoint('race-order', files(4, new Blob([new Uint8Array(64 << 20)]))), store.saveCheckpoint('race-order', files(8, new Uint8Array(4)))]);
      const orderKept = (await store.getCheckpoint('race-order')).step;
      await store.deleteCheckpoint('race-order');
      await window.m.saveAdapter('trained', { as: 'race-trained', overwrite: true });
      await store.deleteCheckpoint('race-run');
      store.close();
      return { steps: report.summary.steps, losses: losses.length, checkpointStep: checkpoint?.step, orderKept };
    }),
    other.evaluate(async () => {
      const made = [];
      for (let i = 0; i < 20; i++) {
        const saved = await window.store.import(window.files, { name: `race-import-${i}` });
        made.push(saved.name);
        if (i % 2) await window.store.delete(`race-import-${i - 1}`);
      }
      return made;
    }),
  ]);
  assert.equal(training.steps, 24, 'the training run finished');
  assert.equal(training.losses, 24);
  assert.equal(training.orderKept, 8, 'of two checkpoint saves asked for at once, the later step is kept');
  assert.equal(training.checkpointStep, 20, 'the last checkpoint (every 4 steps, none at the end: the adapter is the result) is whole and the latest');
  const final = await other.evaluate(async () => {
    const left = (await window.store.list()).filter((a) => a.name.startsWith('race-'));
    const fixture = window.files['adapter_model.safetensors'];
    const records = await Promise.all(left.map((a) => window.store.get(a.name)));
    const summary = records.map((rec) => ({
      name: rec.name,
      whole: rec.weights.length + rec.config.length === rec.size,
      fixture: rec.weights.length === fixture.length && rec.weights.every((b, i) => b === fixture[i]),
    }));
    for (const a of left) await window.store.delete(a.name);
    window.store.close();
    return summary;
  });
  await browser.close();
  const imported = final.filter((r) => r.name.startsWith('race-import-')).map((r) => r.name).sort();
  assert.deepEqual(imported, imports.filter((_, i) => i % 2 === 1).sort(), 'every import the other page kept is there, no deleted one');
  for (const rec of final) assert.ok(rec.whole, `${rec.name}: weights and config of one save`);
  for (const rec of final.filter((r) => r.name !== 'race-trained')) assert.ok(rec.fixture, `${rec.name}: the imported bytes`);
  assert.ok(final.some((r) => r.name === 'race-trained'), 'the trained adapter was saved beside the imports');
  assert.deepEqual(errors, []);
});

test('a model cache the browser evicted is fetched again, with progress, and gives the same logits', async () => {
  const browser = await open();
  const out = await browser.page.evaluate(async (ids) => {
    const visit = async () => {
      const { model, downloads } = await window.load('/fixtures/tiny-llama/');
      const logits = await window.logitsOf(model, ids);
      model.dispose();
      const weights = downloads.filter((e) => e.file === 'model.safetensors');
      return { logits, cached: weights.every((e) => e.cached), progress: weights.length, loaded: weights.at(-1)?.fileLoaded, total: weights.at(-1)?.fileTotal };
    };
    const first = await visit(); // cached by the earlier tests' visits, or downloaded now
    const again = await visit();
    // what the browser does to an origin's caches under storage pressure
    const evicted = await caches.keys().then((keys) => Promise.all(keys.map((k) => caches.delete(k))));
    const refetched = await visit();
    return { first, again, evicted: evicted.length, refetched };
  }, ids);
  await browser.close();
  assert.equal(out.again.cached, true, 'the second visit reads the cache');
  assert.ok(out.evicted >= 1, 'a cache was there to evict');
  assert.equal(out.refetched.cached, false, 'after eviction the files are downloaded again');
  assert.ok(out.refetched.progress >= 1 && out.refetched.loaded === out.refetched.total && out.refetched.total > 0, JSON.stringify(out.refetched));
  assert.deepEqual(out.refetched.logits, out.again.logits);
  assert.deepEqual(errors, []);
});

test('training survives a killed browser: checkpoints kept in IndexedDB, resumed after a relaunch, give the uninterrupted run\'s losses; one over the quota leaves the one before', async () => {
  // a fresh adapter on the tiny model, the same seeded job each time
  const job = {
    data: Array.from({ length: 12 }, (_, i) => ({ input_ids: Array.from({ length: 12 }, (_, j) => ((i * 11 + j * 5) % 250) + 1) })),
    dataName: 'ids.jsonl',
    loraConfig: { r: 4, targetModules: ['q_proj', 'v_proj'] },
    trainingArgs: { maxSteps: 60, batchSize: 2, lr: 1e-2, seed: 7, checkpointEvery: 5 },
  };
  let browser = await open();
  await browser.page.evaluate(async (job) => {
    const { LoraModel, AdapterStore } = window.app.webgpuLora;
    const m = await LoraModel.fromPretrained('/fixtures/tiny-llama/');
    const store = await AdapterStore.open();
    window.kept = [];
    let keeping = Promise.resolve();
    // the run goes on in the page; the test kills the browser once step 10's checkpoint is durable
    m.train({
      ...job, adapterName: 'long-run',
      onCheckpoint: (files) => { keeping = keeping.then(() => store.saveCheckpoint('long-run', files, { dataName: job.dataName })).then(() => window.kept.push(files.step)); },
    }).catch(() => {});
  }, job);
  await browser.page.waitForFunction(() => window.kept.includes(10), null, { timeout: 120_000 });
  await browser.kill();

  browser = await open();
  // a checkpoint that does not fit the quota leaves the one before it as it was
  const cdp = await browser.page.context().newCDPSession(browser.page);
  const { usage } = await browser.page.evaluate(() => navigator.storage.estimate());
  await cdp.send('Storage.overrideQuotaForOrigin', { origin, quotaSize: usage + 2000 });
  const full = await browser.page.evaluate(async () => {
    const store = await window.app.webgpuLora.AdapterStore.open();
    const { files } = await store.getCheckpoint('long-run');
    const big = { ...files, step: 1000, 'adapter_model.safetensors': new Uint8Array(1 << 20), 'trainer_state.safetensors': new Uint8Array(1 << 20) };
    const error = await store.saveCheckpoint('long-run', big).then(() => 'kept', (e) => e.message);
    const after = await store.getCheckpoint('long-run');
    store.close();
    return { error, step: after.step, before: files.step, same: after.files['trainer_state.safetensors'].every((b, i) => b === files['trainer_state.safetensors'][i]) };
  });
  await cdp.send('Storage.overrideQuotaForOrigin', { origin });
  assert.match(full.error, /^cannot keep the checkpoint of "long-run" at step 1000: the browser's storage quota is full; the checkpoint before it is kept$/);
  assert.equal(full.step, full.before);
  assert.ok(full.same, 'the previous checkpoint is intact');

  const out = await browser.page.evaluate(async (job) => {
    const { LoraModel, AdapterStore } = window.app.webgpuLora;
    const store = await AdapterStore.open();
    const checkpoint = await store.getCheckpoint('long-run');
    const listed = await store.listCheckpoints();
    const m = await LoraModel.fromPretrained('/fixtures/tiny-llama/');
    const resumed = [];
    await m.train({ ...job, adapterName: 'resumed', resumeFrom: checkpoint.files, onStep: (s) => resumed.push([s.step, s.loss]) });
    const uninterrupted = [];
    await m.train({ ...job, adapterName: 'uninterrupted', onStep: (s) => uninterrupted.push(s.loss) });
    await store.deleteCheckpoint('long-run');
    const after = await store.getCheckpoint('long-run');
    store.close();
    m.dispose();
    return { step: checkpoint.step, job: checkpoint.job, listed, resumed, uninterrupted, after };
  }, job);
  await browser.close();
  assert.ok(out.step >= 10 && out.step % 5 === 0, `the last durable checkpoint: step ${out.step}`);
  assert.deepEqual(out.job, { dataName: 'ids.jsonl' });
  assert.deepEqual(out.listed.map((c) => [c.name, c.step]), [['long-run', out.step]]);
  assert.equal(out.resumed[0][0], out.step + 1, 'the resumed run starts after its checkpoint');
  assert.equal(out.resumed.at(-1)[0], 60);
  for (const [step, loss] of out.resumed) {
    assert.ok(Math.abs(loss - out.uninterrupted[step - 1]) < 1e-5, `step ${step}: resumed ${loss} vs uninterrupted ${out.uninterrupted[step - 1]}`);
  }
  assert.equal(out.after, null);
  assert.deepEqual(errors, []);
});
