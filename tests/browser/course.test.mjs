// The course exercises (www/course/), each page run with its "Run all steps" button on the tiny
// models: every self-check passes, no console errors; screenshots in test-results/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { start, limit } from './helpers.mjs';

let b;
before(async () => { b = await start(); });
after(async () => { await b?.close(); });

const PAGES = [
  // the tiny random Llama with two adapters PEFT saved for it
  ['1-adapters', '?model=/fixtures/tiny-llama/&adapters=/fixtures/peft/qv-r8/,/fixtures/peft/all7-r4/', 6],
  // the tiny chat model (byte tokenizer, SmolLM2's template) trains quickly on the sample data
  ['2-fine-tune', '?model=/fixtures/tiny-chat/&steps=6&lr=0.05', 6],
  ['3-merge', '?model=/fixtures/tiny-chat/', 6],
  ['4-olora', '?model=/fixtures/tiny-chat/&steps=4&lr=0.05', 4],
  ['5-compare', '?model=/fixtures/tiny-chat/&steps=6&lr=0.05', 7],
];

for (const [name, query, checks] of PAGES) {
  test(`course page ${name}: every self-check passes`, async () => {
    const { page } = b;
    await page.goto(`${b.base}/course/${name}.html${query}`);
    await page.waitForFunction(() => window.course);
    await page.click('#run-all');
    await page.waitForFunction(() => window.course.done, null, { timeout: limit(300_000) });
    const items = await page.locator('#checks li').allTextContents();
    const errors = await page.locator('.cell[data-state="error"] .output').allTextContents();
    assert.deepEqual(errors, [], 'no cell failed');
    assert.equal(items.length, checks, items.join('\n'));
    assert.ok(items.every((t) => t.startsWith('✓ passed')), items.join('\n'));
    await b.screenshot(`course-${name}`);
    assert.deepEqual(b.errors, []);
  });
}

test('the course index links every exercise', async () => {
  await b.page.goto(`${b.base}/course/`);
  const links = await b.page.locator('main a').evaluateAll((as) => as.map((a) => a.getAttribute('href')));
  assert.deepEqual(links, PAGES.map(([name]) => `${name}.html`));
  await b.screenshot('course-index');
});
