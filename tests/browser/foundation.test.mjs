// The foundation in a real browser: headless Chromium, WebGPU (SwiftShader), the engine in its Web
// Worker, driven through the page. References are transformers' outputs (tests/fixtures).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { start, readSafetensors, readJson, root } from './helpers.mjs';

const fixtures = join(root, 'tests', 'fixtures');
let b;

before(async () => { b = await start(); });
after(async () => { await b?.close(); });

test('the tiny model on WebGPU gives transformers\' logits (max abs diff < 1e-4)', async () => {
  const { ids } = readJson(join(fixtures, 'tiny-llama', 'expected.json'));
  const expected = readSafetensors(join(fixtures, 'tiny-llama', 'expected.safetensors')).logits.data;
  const logits = await b.page.evaluate(async (ids) => {
    await window.app.client.load('/fixtures/tiny-llama/');
    return Array.from(await window.app.client.logits(ids));
  }, ids);
  assert.equal(logits.length, expected.length);
  const diff = Math.max(...logits.map((v, i) => Math.abs(v - expected[i])));
  assert.ok(diff < 1e-4, `max |ours - transformers| = ${diff}`);
});

test('bad input rejects the promise with the file and the problem', async () => {
  const truncated = await b.page.evaluate(() => window.app.client.load('/fixtures/bad-truncated/').then(() => 'loaded', (e) => e.message));
  assert.match(truncated, /bad-truncated\/model\.safetensors: invalid safetensors.*truncated/);
  b.expected404.push('/fixtures/no-such-model/config.json');
  const missing = await b.page.evaluate(() => window.app.client.load('/fixtures/no-such-model/').then(() => 'loaded', (e) => e.message));
  assert.match(missing, /no-such-model\/config\.json: HTTP 404/);
  const outOfVocab = await b.page.evaluate(async () => {
    await window.app.client.load('/fixtures/tiny-llama/');
    return window.app.client.logits([1, 100000]).then(() => 'ok', (e) => e.message);
  });
  assert.equal(outOfVocab, 'token id 100000 is out of the vocabulary (size 256)');
  // the engine is still usable after the errors
  const logits = await b.page.evaluate(async () => (await window.app.client.logits([1, 2])).length);
  assert.equal(logits, 2 * 256);
});

test('the page loads SmolLM2-135M-Instruct and streams the France answer (first 8 greedy tokens)', async () => {
  const expected = readJson(join(fixtures, 'smollm2', 'expected.json')).france;
  const { page } = b;
  await page.reload();
  await page.click('#load-button');
  await page.waitForFunction(() => document.querySelector('#load-status').textContent.startsWith('Loaded'), null, { timeout: 300_000 });
  await b.screenshot('foundation-loaded');
  await page.click('summary');
  await page.fill('#max-new-tokens', '8');
  await page.fill('#prompt', expected.prompt);
  await page.click('#send-button');
  const answer = page.locator('.message.assistant').last();
  await page.waitForFunction(() => document.querySelector('.message.assistant')?.dataset.stopReason, null, { timeout: 300_000 });
  const tokens = JSON.parse(await answer.getAttribute('data-tokens'));
  assert.deepEqual(tokens, expected.greedy_ids.slice(0, 8));
  assert.equal(await answer.textContent(), expected.text);
  await b.screenshot('foundation-chat');
  assert.deepEqual(b.errors, [], 'console errors');
});
