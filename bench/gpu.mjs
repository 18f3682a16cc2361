// The browser half of `npm run bench:gpu` (not a test): SmolLM2-135M-Instruct in headless
// Chromium on the WebGPU adapter it reports, for each base storage (f32, f16, q8_0 quantized on
// load, the shipped Q4_1 GGUF as it is): load time, the first forward pass (shader compilation
// included), greedy decode tokens/s, and LoRA training tokens/s (r=8 on q,v, one chat example per
// step, the first step not timed; TRAIN_STEPS 0 skips training). Prints one JSON line per storage.
//
//   node bench/gpu.mjs [NEW_TOKENS] [TRAIN_STEPS]
// Extra Chromium flags for a real GPU go in WEBGPU_LORA_CHROMIUM_FLAGS (see bench/gpu.sh).
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { start, root } from '../tests/browser/helpers.mjs';

const newTokens = Number(process.argv[2] ?? 32);
const trainSteps = Number(process.argv[3] ?? 4);
const data = readFileSync(join(root, 'data/robot/train.jsonl'), 'utf8').split('\n').slice(0, trainSteps).join('\n');
const BASES = [
  ['f32', '/models/SmolLM2-135M-Instruct/', 'f32'],
  ['f16', '/models/SmolLM2-135M-Instruct/', 'f16'],
  ['q8_0 (on load)', '/models/SmolLM2-135M-Instruct/', 'q8_0'],
  ['GGUF Q4_1 (as shipped)', '/models/SmolLM2-135M-Instruct.Q4_1.gguf', 'auto'],
];
const b = await start({ mounts: [['/models/', join(root, 'models')], ['/lib/', join(root, 'lib')], ['/', join(root, 'bench', 'page')]] });
await b.page.waitForFunction(() => window.app);
try {
  for (const [label, url, dtype] of BASES) {
    const row = await b.page.evaluate(async ({ url, dtype, data, newTokens, trainSteps }) => {
      const info = (await navigator.gpu.requestAdapter()).info ?? {};
      const now = () => performance.now() / 1000;
      let t = now();
      const m = await window.app.webgpuLora.LoraModel.fromPretrained(url, { dtype });
      const load_s = now() - t;
      t = now();
      await m.logits(Int32Array.from([1, 504, 3458, 282, 4649, 314, 5149, 47]));
      const first_forward_s = now() - t;
      const pieces = [];
      const stream = m.generate('What is the capital of France?', { maxNewTokens: newTokens });
      for await (const _ of stream) pieces.push(now());
      await stream.result;
      const decode_tokens_per_s = (pieces.length - 1) / (pieces.at(-1) - pieces[0]);
      const steps = [];
      const report = trainSteps > 0 && await m.train({
        data, dataName: 'robot.jsonl', adapterName: 'bench',
        loraConfig: { r: 8, loraAlpha: 16, loraDropout: 0, targetModules: ['q_proj', 'v_proj'] },
        trainingArgs: { learningRate: 2e-4, maxSteps: trainSteps, batchSize: 1, seed: 0 },
        onStep: (metrics) => steps.push(metrics),
      });
      const timed = steps.slice(1);
      const train_tokens_per_s = report && timed.length
        ? (report.summary.tokens * timed.length / steps.length) / (timed.at(-1).elapsedS - steps[0].elapsedS)
        : null;
      const r = {
        adapter: [info.vendor, info.architecture, info.description].filter(Boolean).join(' / ') || 'adapter info hidden',
        weights_mb: (await m.getMemoryFootprint()) / 1e6, load_s, first_forward_s, decode_tokens_per_s, train_tokens_per_s,
      };
      m.dispose();
      return r;
    }, { url, dtype, data, newTokens, trainSteps });
    console.log(JSON.stringify({ engine: 'browser WebGPU', weights: label, ...row }));
  }
} finally {
  await b.close();
}
