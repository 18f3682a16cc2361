// The playground end to end through its UI, clicks and typing only: load the tiny chat model,
// watch the live parameter count, train a few steps on WebGPU on the sample dataset with the loss
// chart filling in, the adapter saved; reload the page, find it, use it, compare base and adapter
// answers, disable and enable, export, import PEFT files, rename, delete, merge (merged = adapter
// within 1e-3), download the merged model, a narrow window. Fails on any console error;
// screenshots in test-results/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { start, root, limit, watchConsole } from './helpers.mjs';

let b;
before(async () => { b = await start(); });
after(async () => { await b?.close(); });

async function loadTiny(page) {
  await page.fill('#model-url', '/fixtures/tiny-chat/');
  await page.click('#load-button');
  await page.waitForFunction(() => document.querySelector('#load-status').textContent.startsWith('Loaded'), null, { timeout: limit(60_000) });
}

test('playground: train, save, reload, use, compare, disable, continue, cancel, export, import, rename, delete, merge, download', async () => {
  const { page } = b;
  await page.waitForFunction(() => window.app?.ready);
  await loadTiny(page);
  // r (in + out) over q (64->64) and v (64->32) of 2 layers, then all 7 linears
  await page.waitForFunction(() => document.querySelector('#param-count').textContent.includes('trainable params: 3,584'));
  await page.selectOption('#lora-targets', 'all-linear');
  await page.waitForFunction(() => document.querySelector('#param-count').textContent.includes('trainable params: 16,384'));

  await page.click('#sample-button');
  await page.waitForFunction(() => document.querySelector('#data-status').textContent.includes('200 examples + 30 for validation'));
  assert.match(await page.textContent('#data-preview'), /"messages"/);
  for (const [id, value] of [['#train-lr', '0.05'], ['#train-steps', '4'], ['#train-batch', '2'], ['#train-eval', '2'], ['#train-seq', '128'], ['#train-name', 'ui-robot'], ['#lora-dropout', '0']]) {
    await page.fill(id, value);
  }
  await page.click('#train-button');
  await page.waitForFunction(() => /^(Done|Training failed)/.test(document.querySelector('#train-status').textContent), null, { timeout: limit(300_000) });
  assert.match(await page.textContent('#train-status'), /^Done: 4 steps, \d+ tokens, best validation loss [\d.]+\. Saved as "ui-robot" and active\./);
  // 4 training points and 3 evaluations (before the first step, at 2 and at 4)
  assert.equal(await page.evaluate(() => window.app.chart.points), 7);
  await b.screenshot('site-trained');
  await page.waitForSelector('#adapter-table tr[data-name="ui-robot"].active');

  // a new visit: the adapter is in IndexedDB
  await page.reload();
  await page.waitForFunction(() => window.app?.ready);
  const row = page.locator('#adapter-table tr[data-name="ui-robot"]');
  // name, base, r, targets, size (16,384 f32 parameters = 65.5 kB, plus the header and config), date, final loss
  const cells = await row.locator('td').allTextContents();
  assert.deepEqual(cells.slice(0, 4), ['ui-robot', 'tiny-chat', '8', 'all-linear']);
  assert.match(cells[4], /^(6[6-9]|7\d) kB$/);
  assert.match(cells[6], /^\d+\.\d{3}$/);
  await loadTiny(page);
  await row.locator('button[data-action="use"]').click();
  await page.waitForSelector('#adapter-table tr[data-name="ui-robot"].active');
  assert.match(await page.textContent('#adapters-status'), /"ui-robot" is active/);

  await page.click('#chat-panel summary');
  await page.fill('#max-new-tokens', '12');
  await page.click('#compare-button');
  await page.waitForSelector('.compare[data-done="true"]', { timeout: limit(120_000) });
  const [base, adapted] = [await page.textContent('#compare-base'), await page.textContent('#compare-adapter')];
  assert.ok(base.length > 0 && adapted.length > 0);
  assert.notEqual(adapted, base, 'the adapter changes the answer');
  await b.screenshot('site-compare');

  await page.click('#disable-button');
  await page.waitForFunction(() => document.querySelector('#adapters-status').textContent.startsWith('Adapters disabled'));
  assert.equal(await page.evaluate(() => window.app.model.disabled), true);
  await page.click('#enable-button');
  await page.waitForFunction(() => /"ui-robot" is active again/.test(document.querySelector('#adapters-status').textContent));

  // the active adapter trained further, with gradient checkpointing, into a new one of its settings
  await page.check('#lora-continue');
  assert.equal(await page.isDisabled('#lora-r'), true, 'the adapter brings its own settings');
  await page.check('#train-checkpointing');
  await page.click('#sample-button');
  await page.waitForFunction(() => document.querySelector('#data-status').textContent.includes('200 examples'));
  for (const [id, value] of [['#train-steps', '2'], ['#train-batch', '2'], ['#train-seq', '128'], ['#train-name', 'ui-robot-more']]) {
    await page.fill(id, value);
  }
  await page.click('#train-button');
  await page.waitForFunction(() => /^(Done|Training failed)/.test(document.querySelector('#train-status').textContent), null, { timeout: limit(300_000) });
  assert.match(await page.textContent('#train-status'), /^Done: 2 steps, \d+ tokens, best validation loss [\d.]+\. Saved as "ui-robot-more" and active\./);
  const more = await page.evaluate(async () => (await window.app.store.list()).find((a) => a.name === 'ui-robot-more'));
  assert.deepEqual([more.r, more.targetModules], [8, 'all-linear']);
  await page.uncheck('#lora-continue');
  await page.uncheck('#train-checkpointing');
  await page.locator('#adapter-table tr[data-name="ui-robot-more"] button[data-action="delete"]').click();
  await page.waitForFunction(() => !document.querySelector('#adapter-table tr[data-name="ui-robot-more"]'));

  // Cancel: a long run stops after the step in progress; what it trained so far is saved
  for (const [id, value] of [['#train-steps', '500'], ['#train-eval', '1000'], ['#train-name', 'ui-cancelled']]) await page.fill(id, value);
  await page.click('#train-button');
  await page.waitForFunction(() => /^step [1-9]/.test(document.querySelector('#train-status').textContent), null, { timeout: limit(300_000) });
  await page.click('#cancel-button');
  await page.waitForFunction(() => /^(Stopped|Done|Training failed)/.test(document.querySelector('#train-status').textContent), null, { timeout: limit(300_000) });
  const [, stoppedAt] = (await page.textContent('#train-status')).match(/^Stopped \(cancelled\): (\d+) steps, .* Saved as "ui-cancelled" and active\.$/) ?? [];
  assert.ok(Number(stoppedAt) >= 1 && Number(stoppedAt) < 500, await page.textContent('#train-status'));
  assert.equal(await page.isDisabled('#cancel-button'), true);
  await page.locator('#adapter-table tr[data-name="ui-cancelled"] button[data-action="delete"]').click();
  await page.waitForFunction(() => !document.querySelector('#adapter-table tr[data-name="ui-cancelled"]'));
  await row.locator('button[data-action="use"]').click();
  await page.waitForSelector('#adapter-table tr[data-name="ui-robot"].active');

  // the stored adapter's files, then PEFT files imported, renamed and deleted through the table
  await row.locator('button[data-action="export"]').click();
  await page.waitForSelector('#adapter-downloads a');
  assert.deepEqual(await page.locator('#adapter-downloads a').evaluateAll((as) => as.map((a) => a.download)), ['adapter_config.json', 'adapter_model.safetensors']);
  await page.setInputFiles('#import-files', ['adapter_config.json', 'adapter_model.safetensors'].map((f) => join(root, 'tests/fixtures/peft/qv-r8', f)));
  await page.waitForSelector('#adapter-table tr[data-name="imported-1"]');
  page.once('dialog', (d) => d.accept('peft-qv'));
  await page.locator('#adapter-table tr[data-name="imported-1"] button[data-action="rename"]').click();
  await page.waitForSelector('#adapter-table tr[data-name="peft-qv"]');
  await page.locator('#adapter-table tr[data-name="peft-qv"] button[data-action="delete"]').click();
  await page.waitForFunction(() => document.querySelector('#adapters-status').textContent === 'Deleted "peft-qv".');
  assert.deepEqual(await page.locator('#adapter-table tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.name)), ['ui-robot']);

  await page.click('#merge-button');
  await page.waitForFunction(() => document.querySelector('#merge-status').dataset.maxDiff);
  const diff = Number(await page.getAttribute('#merge-status', 'data-max-diff'));
  assert.ok(diff < 1e-3, `merged vs adapter: ${diff}`);
  assert.match(await page.textContent('#merge-status'), /matches within 1e-3/);
  await page.click('#download-button');
  await page.waitForSelector('#merge-files a[download="model.safetensors"]');
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#merge-files a[download="model.safetensors"]')]);
  const bytes = readFileSync(await download.path());
  const header = JSON.parse(bytes.subarray(8, 8 + Number(bytes.readBigUInt64LE(0))).toString());
  assert.deepEqual(header['model.layers.0.self_attn.q_proj.weight'].shape, [64, 64]);
  assert.deepEqual((await page.locator('#merge-files a').evaluateAll((as) => as.map((a) => a.download))).sort(),
    ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
  await b.screenshot('site-merged');

  // a narrow window: nothing wider than the screen
  await page.setViewportSize({ width: 360, height: 800 });
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth + 1), 'no horizontal scrolling at 360 px');
  await b.screenshot('site-narrow');
  assert.deepEqual(b.errors, []);
});

test('playground: a run whose tab was closed is offered on the next visit and resumed from its last checkpoint', async () => {
  const context = b.page.context();
  const visit = async () => {
    const page = await context.newPage();
    watchConsole(page, b.errors);
    await page.goto(`${b.base}/`);
    await page.waitForFunction(() => window.app?.ready);
    await loadTiny(page);
    return page;
  };
  let page = await visit();
  await page.click('#sample-button');
  await page.waitForFunction(() => document.querySelector('#data-status').textContent.includes('200 examples'));
  for (const [id, value] of [['#train-lr', '0.01'], ['#train-steps', '40'], ['#train-batch', '2'], ['#train-eval', '1000'], ['#train-seq', '128'], ['#train-name', 'ui-resumed']]) {
    await page.fill(id, value);
  }
  await page.click('#train-button');
  // checkpoints every 4 steps: close the tab once step 8's is kept
  const deadline = Date.now() + limit(300_000);
  while ((await page.evaluate(async () => (await window.app.store.getCheckpoint('playground-run'))?.step ?? 0)) < 8) {
    assert.ok(Date.now() < deadline, `no checkpoint at step 8 in time: ${await page.textContent('#train-status')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  await page.close();

  page = await visit();
  await page.waitForSelector('#resume-button:not([hidden]):not([disabled])');
  const [, from] = (await page.textContent('#resume-button')).match(/^Resume "ui-resumed" from step (\d+) of 40$/) ?? [];
  assert.ok(Number(from) >= 8 && Number(from) < 40 && Number(from) % 4 === 0, `offered from step ${from}`);
  await page.click('#resume-button');
  await page.waitForFunction(() => /^(Done|Stopped|Training failed)/.test(document.querySelector('#train-status').textContent), null, { timeout: limit(300_000) });
  assert.match(await page.textContent('#train-status'), /^Done: 40 steps, .* Saved as "ui-resumed" and active\./);
  assert.equal(await page.isHidden('#resume-button'), true, 'nothing left to resume');
  assert.equal(await page.evaluate(async () => window.app.store.getCheckpoint('playground-run')), null);
  await page.waitForSelector('#adapter-table tr[data-name="ui-resumed"].active');
  await page.close();
  assert.deepEqual(b.errors, []);
});

test('playground: DPO on the sample preference pairs reports the reward margin and saves the adapter', async () => {
  const { page } = b;
  await page.reload();
  await page.waitForFunction(() => window.app?.ready);
  await loadTiny(page);
  await page.selectOption('#train-method', 'dpo');
  assert.equal(await page.inputValue('#lora-dropout'), '0', 'DPO trains without dropout');
  assert.equal(await page.isDisabled('#train-beta'), false);
  await page.click('#sample-button');
  await page.waitForFunction(() => document.querySelector('#data-status').textContent !== '');
  assert.equal(await page.textContent('#data-status'), 'robot-preferences/train.jsonl: 200 examples + 30 for validation.');
  assert.match(await page.textContent('#data-preview'), /"chosen": " Beep boop!/);
  for (const [id, value] of [['#train-lr', '0.01'], ['#train-steps', '2'], ['#train-batch', '2'], ['#train-eval', '2'], ['#train-seq', '256'], ['#train-name', 'ui-dpo']]) {
    await page.fill(id, value);
  }
  const margins = [];
  await page.exposeFunction('__status', (text) => margins.push(text));
  await page.evaluate(() => new MutationObserver(() => window.__status(document.querySelector('#train-status').textContent))
    .observe(document.querySelector('#train-status'), { childList: true, characterData: true, subtree: true }));
  await page.click('#train-button');
  await page.waitForFunction(() => /^(Done|Training failed)/.test(document.querySelector('#train-status').textContent), null, { timeout: limit(300_000) });
  assert.match(await page.textContent('#train-status'), /^Done: 2 steps, \d+ tokens, best validation loss [\d.]+\. Saved as "ui-dpo" and active\./);
  assert.ok(margins.some((t) => /reward margin -?[\d.]+, chosen preferred in \d+% of pairs/.test(t)), margins.join(' | '));
  await page.waitForSelector('#adapter-table tr[data-name="ui-dpo"].active');
  assert.deepEqual(b.errors, []);
});
