// The browser figures of the package's API (not a test): SmolLM2-135M-Instruct in headless
// Chromium on the WebGPU adapter it reports. A first visit downloads the model and stores an r=8
// q,v adapter (the one bench/adapters.rs wrote) in IndexedDB; a second visit on the same profile
// measures the cold start (wasm + model from the Cache API + upload + the first forward pass, which
// compiles the shaders), loading the adapter from IndexedDB, setAdapter's round trip to the
// worker, mergeAndUnload, and greedy decoding; a third visit loads the model with dtype "f16" (its
// memory footprint, first forward, decode, and how far its logits are from f32's). Prints one JSON
// line for bench/report.py.
//
//   node bench/browser_api.mjs ADAPTER_DIR [NEW_TOKENS]
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { launchChromium, root } from '../tests/browser/helpers.mjs';
import { serve } from '../scripts/serve.mjs';

const adapterDir = resolve(process.argv[2] ?? '.cache/bench-adapters/qv');
const newTokens = Number(process.argv[3] ?? 4);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const server = await serve(0, '127.0.0.1', [['/models/', join(root, 'models')], ['/lib/', join(root, 'lib')], ['/adapter/', adapterDir], ['/', join(root, 'bench', 'page')]]);
const origin = `http://127.0.0.1:${server.address().port}`;
const profile = mkdtempSync(join(tmpdir(), 'webgpu-lora-bench-'));
const MODEL = '/models/SmolLM2-135M-Instruct/';

// In the page: greedy decoding's speed (the first piece comes after the prefill; the rest are one
// decode step each) and a fixed prompt of token ids for comparing logits.
async function defineDecode(page) {
  await page.evaluate(() => {
    window.PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 5149, 47];
    window.decode = async (m, maxNewTokens) => {
      const pieces = [];
      const stream = m.generate('What is the capital of France?', { maxNewTokens });
      for await (const _ of stream) pieces.push(performance.now());
      const result = await stream.result;
      return { tokens: result.tokens.length, perSecond: (pieces.length - 1) / ((pieces.at(-1) - pieces[0]) / 1000) };
    };
  });
}
try {
  let browser = await launchChromium(profile);
  await browser.page.goto(`${origin}/`);
  await browser.page.waitForFunction(() => window.app);
  const first = await browser.page.evaluate(async (MODEL) => {
    const t0 = performance.now();
    const m = await window.app.webgpuLora.LoraModel.fromPretrained(MODEL);
    const load_s = (performance.now() - t0) / 1000;
    await m.loadAdapter('/adapter/', 'qv');
    await m.saveAdapter('qv', { as: 'bench-qv', overwrite: true });
    return { load_s };
  }, MODEL);
  await browser.close();

  browser = await launchChromium(profile);
  await browser.page.goto(`${origin}/`);
  await browser.page.waitForFunction(() => window.app);
  await defineDecode(browser.page);
  const second = await browser.page.evaluate(async ({ MODEL, newTokens }) => {
    const adapter = await navigator.gpu.requestAdapter();
    const info = adapter.info ?? {};
    const now = () => performance.now();
    let t = now();
    let cached = true;
    const m = await window.app.webgpuLora.LoraModel.fromPretrained(MODEL, { onProgress: (e) => { if (e.stage === 'download' && !e.cached) cached = false; } });
    const modelReady = now() - t;
    t = now();
    await m.logits([1]);
    const firstForward = now() - t;
    // performance.now() counts from the start of the navigation
    const coldStart = now();
    const footprint = await m.getMemoryFootprint();
    const logits = Array.from((await m.logits(PROMPT_IDS)).data);
    const loads = [];
    for (let i = 0; i < 5; i++) {
      t = now();
      await m.loadAdapter('bench-qv', `qv${i}`);
      loads.push(now() - t);
    }
    // the floor: a round trip to an empty worker on this machine
    const echo = new Worker(URL.createObjectURL(new Blob(['onmessage = (e) => postMessage(e.data)'], { type: 'text/javascript' })));
    const pings = [];
    for (let i = 0; i < 200; i++) {
      t = now();
      await new Promise((r) => { echo.onmessage = r; echo.postMessage(i); });
      pings.push(now() - t);
    }
    echo.terminate();
    const sets = [];
    for (let i = 0; i < 200; i++) {
      t = now();
      await m.setAdapter(`qv${i % 2}`);
      sets.push(now() - t);
    }
    const decode = await window.decode(m, newTokens);
    t = now();
    await m.mergeAndUnload();
    const merge = now() - t;
    return {
      adapter: [info.vendor, info.architecture, info.description].filter(Boolean).join(' / '),
      cached, modelReady, firstForward, coldStart, loads, pings, sets, merge, decode, footprint, logits,
    };
  }, { MODEL, newTokens });
  await browser.close();

  // a third visit: the same model with its matrices stored in f16
  browser = await launchChromium(profile);
  await browser.page.goto(`${origin}/`);
  await browser.page.waitForFunction(() => window.app);
  await defineDecode(browser.page);
  const half = await browser.page.evaluate(async ({ MODEL, newTokens, f32Logits }) => {
    const now = () => performance.now();
    let t = now();
    const m = await window.app.webgpuLora.LoraModel.fromPretrained(MODEL, { dtype: 'f16' });
    const modelReady = now() - t;
    t = now();
    await m.logits([1]);
    const firstForward = now() - t;
    const logits = (await m.logits(PROMPT_IDS)).data;
    const maxDiff = logits.reduce((d, v, i) => Math.max(d, Math.abs(v - f32Logits[i])), 0);
    return { modelReady, firstForward, maxDiff, footprint: await m.getMemoryFootprint(), decode: await window.decode(m, newTokens) };
  }, { MODEL, newTokens, f32Logits: second.logits });
  await browser.close();
  const wasm = readFileSync(join(root, 'lib/pkg/webgpu_lora_bg.wasm'));
  const median_of = (xs) => Math.round(median(xs) * 1000) / 1000;
  console.log(JSON.stringify({
    engine: `webgpu-lora (browser WebGPU: ${second.adapter || 'adapter info hidden'})`,
    browser: {
      first_visit_load_s: first.load_s,
      cold_start_s: second.coldStart / 1000,
      model_from_cache: second.cached,
      model_ready_s: second.modelReady / 1000,
      first_forward_s: second.firstForward / 1000,
      adapter_load_idb_ms: median_of(second.loads),
      set_adapter_round_trip_ms: median_of(second.sets),
      empty_worker_round_trip_ms: median_of(second.pings),
      merge_and_unload_ms: second.merge,
      decode_tokens_per_s: second.decode.perSecond,
      decoded_tokens: second.decode.tokens,
      footprint_mb: second.footprint / 1e6,
      f16: {
        model_ready_s: half.modelReady / 1000,
        first_forward_s: half.firstForward / 1000,
        footprint_mb: half.footprint / 1e6,
        decode_tokens_per_s: half.decode.perSecond,
        decoded_tokens: half.decode.tokens,
        max_logit_diff_vs_f32: half.maxDiff,
      },
      wasm_mb: wasm.length / 1e6,
      wasm_gzip_mb: gzipSync(wasm, { level: 9 }).length / 1e6,
    },
  }));
} finally {
  server.close();
  rmSync(profile, { recursive: true, force: true });
}
