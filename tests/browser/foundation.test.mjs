// The foundation in a real browser: headless Chromium, WebGPU (SwiftShader), the engine in its Web
// Worker, driven through the page. References are transformers' outputs (tests/fixtures).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { start, readJson, root, limit } from './helpers.mjs';

const fixtures = join(root, 'tests', 'fixtures');
let b;

before(async () => { b = await start(); });
after(async () => { await b?.close(); });

test('a bad model rejects fromPretrained with the file and the problem, and a good one still loads', async () => {
  const load = (url) => b.page.evaluate((url) => window.app.webgpuLora.LoraModel.fromPretrained(url).then((m) => { m.dispose(); return 'loaded'; }, (e) => e.message), url);
  assert.match(await load('/fixtures/bad-truncated/'), /bad-truncated\/model\.safetensors: invalid safetensors.*truncated/);
  b.expected404.push('/fixtures/no-such-model/config.json');
  assert.match(await load('/fixtures/no-such-model/'), /no-such-model\/config\.json: HTTP 404.*check the model URL/);
  assert.equal(await load('/fixtures/tiny-llama/'), 'loaded');
});

test('without WebGPU: fromPretrained rejects saying what is missing, the playground says so and disables loading, the course says so', async () => {
  const off = await start({ webgpu: false });
  try {
    const { page } = off;
    await page.waitForFunction(() => document.querySelector('#gpu-status').textContent !== '');
    const expected = /^WebGPU is not available: the browser offers no GPU adapter \(.*\): use Chrome or Edge 113\+ \(.*--enable-unsafe-webgpu\) on https or localhost/;
    assert.match(await page.textContent('#gpu-status'), expected);
    assert.equal(await page.isDisabled('#load-button'), true);
    const rejected = await page.evaluate(() => window.app.webgpuLora.LoraModel.fromPretrained('/fixtures/tiny-llama/').then(() => 'loaded', (e) => e.message));
    assert.match(rejected, expected);
    await page.goto(`${off.base}/course/1-adapters.html`);
    await page.waitForFunction(() => document.querySelector('#gpu-note').textContent !== '');
    assert.match(await page.textContent('#gpu-note'), expected);
    assert.deepEqual(off.errors, []);
  } finally {
    await off.close();
  }
});

test('the page loads SmolLM2-135M-Instruct and streams the France answer (first 8 greedy tokens)', async () => {
  const expected = readJson(join(fixtures, 'smollm2', 'expected.json')).france;
  const { page } = b;
  await page.reload();
  await page.click('#load-button');
  await page.waitForFunction(() => document.querySelector('#load-status').textContent.startsWith('Loaded'), null, { timeout: limit(300_000) });
  await b.screenshot('foundation-loaded');
  await page.click('summary');
  await page.fill('#max-new-tokens', '8');
  await page.fill('#prompt', expected.prompt);
  await page.click('#send-button');
  const answer = page.locator('.message.assistant').last();
  await page.waitForFunction(() => document.querySelector('.message.assistant')?.dataset.stopReason, null, { timeout: limit(300_000) });
  const tokens = JSON.parse(await answer.getAttribute('data-tokens'));
  assert.deepEqual(tokens, expected.greedy_ids.slice(0, 8));
  assert.equal(await answer.textContent(), expected.text);
  await b.screenshot('foundation-chat');
  assert.deepEqual(b.errors, [], 'console errors');
});
