// The course pages' runtime: each `.cell` holds editable code (a textarea) that runs against the
// npm package's API, with `lora` (the package), `ctx` (shared by the page's cells), `settings`
// (from the page's URL: ?model=...&adapters=a,b&steps=N&lr=X&data=DIR/&preferences=DIR/), `log(...)`, `check(label, ok)`
// and `chart(series)` in scope. Self-checks are listed under the page with what passed.
import * as lora from '../lib/index.js';
import { LossChart } from '../chart.js';

const AsyncFunction = (async () => {}).constructor;
const params = new URL(location.href).searchParams;
const settings = {
  model: params.get('model') ?? '../models/SmolLM2-135M-Instruct.Q4_1.gguf',
  data: params.get('data') ?? '../data/robot/',
  preferences: params.get('preferences') ?? '../data/robot-preferences/',
  adapters: params.get('adapters')?.split(',').filter(Boolean) ?? [],
  steps: Number(params.get('steps') ?? 30),
  lr: Number(params.get('lr') ?? 2e-3),
};
const ctx = {};
const results = new Map(); // check label -> passed
window.course = { lora, ctx, settings, results, running: false, done: false };

const checksList = document.getElementById('checks');
function recordCheck(label, ok, detail) {
  results.set(label, Boolean(ok));
  let item = [...checksList.children].find((li) => li.dataset.label === label);
  if (!item) {
    item = document.createElement('li');
    item.dataset.label = label;
    checksList.append(item);
  }
  item.className = ok ? 'pass' : 'fail';
  item.textContent = `${ok ? '✓ passed' : '✗ failed'}: ${label}${detail ? ` (${detail})` : ''}`;
}

async function run(cell) {
  const output = cell.querySelector('.output');
  output.textContent = '';
  output.classList.remove('error');
  const log = (...parts) => { output.textContent += parts.map((p) => (typeof p === 'string' ? p : JSON.stringify(p))).join(' ') + '\n'; };
  const check = (label, ok, detail) => { recordCheck(label, ok, detail); log(`${ok ? '✓' : '✗'} ${label}${detail ? ` (${detail})` : ''}`); return ok; };
  const chart = (series) => {
    let canvas = cell.querySelector('canvas');
    if (!canvas) {
      canvas = Object.assign(document.createElement('canvas'), { width: 640, height: 220 });
      canvas.setAttribute('role', 'img');
      canvas.setAttribute('aria-label', 'loss curves');
      cell.append(canvas);
    }
    return new LossChart(canvas, series);
  };
  cell.setAttribute('aria-busy', 'true');
  try {
    await new AsyncFunction('lora', 'ctx', 'settings', 'log', 'check', 'chart', cell.querySelector('textarea').value)(lora, ctx, settings, log, check, chart);
    cell.dataset.state = 'ok';
  } catch (e) {
    log(`Error: ${e.message}`);
    output.classList.add('error');
    cell.dataset.state = 'error';
    throw e;
  } finally {
    cell.removeAttribute('aria-busy');
  }
}

const cells = [...document.querySelectorAll('.cell')];
for (const [i, cell] of cells.entries()) {
  const textarea = cell.querySelector('textarea');
  textarea.rows = Math.min(18, textarea.value.split('\n').length + 1);
  textarea.spellcheck = false;
  textarea.setAttribute('aria-label', `Code of step ${i + 1}`);
  const button = Object.assign(document.createElement('button'), { type: 'button', textContent: `Run step ${i + 1}` });
  const output = Object.assign(document.createElement('pre'), { className: 'output' });
  output.setAttribute('aria-live', 'polite');
  button.addEventListener('click', () => run(cell).catch(() => {}));
  textarea.addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); button.click(); } });
  textarea.after(button, output);
}

document.getElementById('run-all').addEventListener('click', async () => {
  window.course.running = true;
  window.course.done = false;
  try {
    for (const cell of cells) await run(cell);
  } catch { /* the failing cell shows its error */ } finally {
    window.course.running = false;
    window.course.done = true;
  }
});
lora.webgpuStatus().then(({ available, message }) => {
  if (!available) document.getElementById('gpu-note').textContent = message;
});
