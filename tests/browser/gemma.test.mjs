// Gemma 3 270M in the page (headless Chromium, WebGPU on SwiftShader), picked in the playground's
// model picker and loaded straight from Google's Q4_K_M GGUF (scripts/fetch-gemma.sh): its
// 262,144 x 640 embedding (178 MB in Q8_0) stays quantized, the logits of the prompt equal
// transformers' on the same GGUF (5e-3, same argmax: tests/fixtures/gemma3-270m/expected.json),
// and the chat, without a chat template, continues the text greedily as transformers does; the
// Train panel's sample dataset is then the prompt/completion form.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { start, readJson, root, limit, maxAbsDiff } from './helpers.mjs';

const expected = readJson(join(root, 'tests/fixtures/gemma3-270m/expected.json')).prompts[0];
let b;

before(async () => { b = await start(); });
after(async () => { await b?.close(); });

test('the picker loads Gemma 3 270M from its GGUF: transformers\' logits, and the chat continues the text as transformers does', async (t) => {
  const { page } = b;
  await page.selectOption('#model-choice', 'models/gemma-3-270m-q4_k_m.gguf');
  assert.match(await page.textContent('#model-about'), /Gemma 3 270M .*pre-trained base.*Gemma Terms of Use/);
  assert.equal(await page.inputValue('#model-url'), 'models/gemma-3-270m-q4_k_m.gguf');
  await page.click('#load-button');
  await page.waitForFunction(() => /^(Loaded|Could not)/.test(document.querySelector('#load-status').textContent), null, { timeout: limit(600_000) });
  const status = await page.textContent('#load-status');
  assert.match(status, /^Loaded: 18 layers, hidden size 640, vocabulary 262144, .* no chat template/, status);

  const out = await page.evaluate(async (ids) => {
    const m = window.app.model;
    const { data } = await m.logits(ids);
    return { logits: Array.from(data), footprint: await m.getMemoryFootprint(), hasChatTemplate: m.hasChatTemplate };
  }, expected.prompt_ids);
  assert.equal(out.hasChatTemplate, false);
  assert.ok(out.footprint < 260e6, `weights on the GPU: ${out.footprint} bytes (kept quantized)`);
  t.diagnostic(`Gemma 3 270M's weights on the GPU: ${out.footprint} bytes`);
  const vocab = 262144;
  for (const at of expected.positions) {
    const row = out.logits.slice(at.position * vocab, (at.position + 1) * vocab);
    const diff = maxAbsDiff(at.ids.map((id) => row[id]), at.logits);
    assert.ok(diff < 5e-3, `position ${at.position}: max |ours - transformers| = ${diff}`);
    const argmax = row.reduce((best, x, i) => (x > row[best] ? i : best), 0);
    assert.equal(argmax, at.argmax, `position ${at.position}: argmax`);
  }

  await page.click('summary');
  await page.fill('#max-new-tokens', '4');
  await page.fill('#prompt', expected.prompt);
  await page.click('#send-button');
  await page.waitForFunction(() => document.querySelector('.message.assistant')?.dataset.stopReason, null, { timeout: limit(600_000) });
  const tokens = JSON.parse(await page.locator('.message.assistant').last().getAttribute('data-tokens'));
  assert.deepEqual(tokens, expected.greedy_ids.slice(0, 4));
  await b.screenshot('gemma-chat');
  // the Train panel's sample dataset comes as prompt/completion pairs for a model without a chat template
  await page.click('#sample-button');
  await page.waitForFunction(() => document.querySelector('#data-status').textContent !== '');
  assert.equal(await page.textContent('#data-status'), 'robot-completions/train.jsonl: 200 examples + 30 for validation.');
  assert.deepEqual(b.errors, [], 'console errors');
});
