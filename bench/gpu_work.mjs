// What a GPU would pay for, counted on any WebGPU adapter (not a test): compute dispatches, queue
// submissions, buffer creations and uploads of the package's engine in headless Chromium, counted
// by wrapping the WebGPU prototypes in the engine's worker before its module loads
// (bench/page/count-worker.js, read through bench/page/gpu-counts.js). A launch costs microseconds on a real GPU whatever its size, and a
// 135M model's kernels are small, so these counts bound decode and training speed there. Counts
// hold on any machine; the seconds are this machine's WebGPU adapter (SwiftShader runs it on the
// CPU). Prints a BENCHMARKS.md section.
//
//   node bench/gpu_work.mjs [DECODE_TOKENS] [--kernels]
//
// --kernels adds, for a decoded token and for a training step, the dispatches of each kernel (cubecl
// names a pipeline by its kernel): where the next fusion pays.
import { availableParallelism, cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { start, root } from '../tests/browser/helpers.mjs';

const args = process.argv.slice(2);
const byKernel = args.includes('--kernels');
const decodeTokens = Number(args.find((a) => !a.startsWith('--')) ?? 9);
const b = await start({
  mounts: [['/models/', join(root, 'models')], ['/fixtures/', join(root, 'tests', 'fixtures')], ['/lib/', join(root, 'lib')], ['/bench/', join(root, 'bench', 'page')], ['/', join(root, 'bench', 'page')]],
});
b.page.setDefaultTimeout(0);
await b.page.waitForFunction(() => window.app);
await b.page.evaluate(async () => {
  // the counting worker's page side (bench/page/gpu-counts.js)
  const { loadCounted, counted, readCounts, trainingRows } = await import('/bench/gpu-counts.js');
  Object.assign(window, { counted, readCounts, trainingRows, load: loadCounted });
});

const KEYS = ['dispatches', 'submits', 'buffers', 'writes'];
const per = (a, b, n) => ({
  ...Object.fromEntries([...KEYS, 'seconds'].map((k) => [k, (b[k] - a[k]) / n])),
  kernels: Object.fromEntries(Object.entries(b.kernels).map(([k, v]) => [k, (v - (a.kernels[k] ?? 0)) / n])),
});

/** Inference on SmolLM2 from `url`: loading, prefills of 3 and 12 tokens, and a decoded token. */
async function inference(name, url) {
  const r = await b.page.evaluate(async ({ url, decodeTokens }) => {
    // a new worker: its counts so far are the load's
    const t0 = performance.now();
    const m = await window.load(url);
    const load = { ...(await window.readCounts()), seconds: (performance.now() - t0) / 1000 };
    await m.logits([1, 2, 3]); // compiles the shaders
    const prefill3 = await window.counted(() => m.logits([1, 504, 3458]));
    const prefill12 = await window.counted(() => m.logits([1, 504, 3458, 282, 4649, 314, 5149, 47, 504, 3458, 282, 4649]));
    // greedy generations of 1 and of N tokens after the same prompt: the difference is the decode
    // steps, one forward pass each (a stop token ends a generation after its own forward pass)
    const generate = (maxNewTokens) => window.counted(async () => {
      const stream = m.generate('What is the capital of France?', { maxNewTokens, temperature: 0 });
      for await (const _ of stream);
      const { tokens, stopReason } = await stream.result;
      return tokens.length + (stopReason === 'stopToken' ? 1 : 0);
    });
    const one = await generate(1);
    const many = await generate(decodeTokens);
    const layers = m.config.num_hidden_layers;
    m.dispose();
    return { load, prefill3, prefill12, one, many, layers };
  }, { url, decodeTokens });
  const decode = per(r.one, r.many, r.many.out - r.one.out);
  return [
    { name, what: 'load (upload of the weights)', ...r.load },
    { name, what: 'prefill of 3 tokens', ...r.prefill3 },
    { name, what: 'prefill of 12 tokens', ...r.prefill12 },
    { name, what: `one decoded token (greedy; ${r.many.out - r.one.out} decode steps)`, ...decode, perLayer: decode.dispatches / r.layers },
  ];
}

/** A LoRA training step of the tiny 2-layer chat model: batch 2 x 20 tokens, r=8. */
async function training(targets, gradientCheckpointing) {
  const r = await b.page.evaluate(async ({ targets, gradientCheckpointing }) => {
    const m = await window.load('/fixtures/tiny-chat/');
    const rows = window.trainingRows();
    const run = (maxSteps, adapterName) => window.counted(() => m.train({
      data: rows, dataName: 'ids.jsonl', adapterName,
      loraConfig: { r: 8, loraAlpha: 16, loraDropout: 0.05, targetModules: targets },
      trainingArgs: { maxSteps, batchSize: 2, shuffle: false, gradientCheckpointing },
    }));
    await run(1, 'warm-up'); // compiles the shaders
    const one = await run(1, 'one');
    const three = await run(3, 'three');
    const layers = m.config.num_hidden_layers;
    m.dispose();
    return { one, three, layers };
  }, { targets, gradientCheckpointing });
  const step = per(r.one, r.three, 2);
  const name = `tiny-chat (${r.layers} layers), ${targets.join(',')}${gradientCheckpointing ? ', checkpointing' : ''}`;
  return [{ name, what: 'one LoRA training step (batch 2 x 20 tokens, r=8)', ...step, perLayer: step.dispatches / r.layers }];
}

try {
  const info = await b.page.evaluate(async () => {
    const i = (await navigator.gpu.requestAdapter()).info ?? {};
    return [i.vendor, i.architecture, i.description].filter(Boolean).join(' / ');
  });
  const rows = [
    ...(await inference('SmolLM2-135M-Instruct, f32', '/models/SmolLM2-135M-Instruct/')),
    ...(await inference('SmolLM2-135M-Instruct, GGUF Q4_1 as shipped', '/models/SmolLM2-135M-Instruct.Q4_1.gguf')),
    ...(await training(['q_proj', 'v_proj'], false)),
    ...(await training(['q_proj', 'v_proj'], true)),
    ...(await training(['all-linear'], false)),
  ];
  const n = (x, digits = 0) => x.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
  console.log('## GPU work: dispatches and submissions per token and per training step\n');
  console.log(`Machine: ${cpus()[0].model.trim()}, ${availableParallelism()} cores, ${Math.round(totalmem() / 2 ** 30)} GiB; WebGPU adapter (headless Chromium): ${info || 'hidden'}.  `);
  console.log(`Date: ${new Date().toISOString().slice(0, 10)}  `);
  console.log(`Command: \`node bench/gpu_work.mjs ${decodeTokens}\` (also run by \`npm run bench\`)\n`);
  console.log('Counted in the engine\'s worker by wrapping `dispatchWorkgroups`, `queue.submit`, `createBuffer` and '
    + '`queue.writeBuffer` (bench/page/count-worker.js). Each launch and each submission costs a real GPU '
    + 'microseconds whatever the kernel\'s size, so these counts hold on any machine and bound what a GPU can do '
    + 'with them; the seconds are this machine\'s adapter (SwiftShader: WebGPU on the CPU). A decoded token is the '
    + 'difference between greedy generations of 1 and of N tokens after the same prompt, per forward pass after the prefill; a training '
    + 'step the difference between runs of 1 and 3 steps, per step.\n');
  console.log('| model | work | dispatches | per layer | submits | buffers created | uploads | seconds here |');
  console.log('|---|---|---:|---:|---:|---:|---:|---:|');
  for (const r of rows) {
    console.log(`| ${r.name} | ${r.what} | ${n(r.dispatches)} | ${r.perLayer === undefined ? '' : n(r.perLayer, 1)} | ${n(r.submits, 1)} | ${n(r.buffers)} | ${n(r.writes)} | ${n(r.seconds, 2)} |`);
  }
  if (byKernel) {
    for (const r of rows.filter((row) => row.what.startsWith('one '))) {
      console.log(`\n### ${r.name}: ${r.what}, dispatches by kernel\n`);
      console.log('| kernel | dispatches | per layer |');
      console.log('|---|---:|---:|');
      const layers = r.dispatches / r.perLayer;
      for (const [k, v] of Object.entries(r.kernels).filter(([, v]) => Math.abs(v) > 0.01).sort((x, y) => y[1] - x[1])) {
        console.log(`| ${k} | ${n(v, 1)} | ${n(v / layers, 2)} |`);
      }
    }
  }
} finally {
  await b.close();
}
