// The browser figure of the training benchmark (not a test): SmolLM2-135M-Instruct loaded with the
// package's LoraModel (engine in its worker) in headless Chromium (WebGPU on the adapter it reports), an r=8 q,v LoRA trained
// for a few steps of one chat example each (data/robot), timed from the step events. Prints one
// JSON line for bench/report.py.
//
//   node bench/browser_training.mjs [STEPS]
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { start, root } from '../tests/browser/helpers.mjs';

const steps = Number(process.argv[2] ?? 3);
const data = readFileSync(join(root, 'data/robot/train.jsonl'), 'utf8').split('\n').slice(0, steps).join('\n');
const b = await start({ mounts: [['/models/', join(root, 'models')], ['/lib/', join(root, 'lib')], ['/', join(root, 'bench', 'page')]] });
await b.page.waitForFunction(() => window.app);
try {
  const result = await b.page.evaluate(async ({ data, steps }) => {
    const adapter = await navigator.gpu.requestAdapter();
    const info = adapter.info ?? {};
    const m = await window.app.webgpuLora.LoraModel.fromPretrained('/models/SmolLM2-135M-Instruct/');
    const events = [];
    const report = await m.train({
      data, dataName: 'robot.jsonl',
      loraConfig: { r: 8, loraAlpha: 16, loraDropout: 0, targetModules: ['q_proj', 'v_proj'] },
      trainingArgs: { lr: 2e-4, maxSteps: steps, batchSize: 1, seed: 0 },
      onStep: (metrics) => events.push({ event: 'step', metrics }),
    });
    return { adapter: [info.vendor, info.architecture, info.description].filter(Boolean).join(' / '), events, report };
  }, { data, steps });
  const metrics = result.events.filter((e) => e.event === 'step').map((e) => e.metrics);
  // the first step compiles the shaders: time the rest
  const timed = metrics.slice(1);
  const seconds = timed.at(-1).elapsedS - metrics[0].elapsedS;
  const tokens = result.report.summary.tokens * (timed.length / metrics.length);
  console.log(JSON.stringify({
    engine: `webgpu-lora (browser WebGPU: ${result.adapter || 'adapter info hidden'})`,
    training: 'qv', batch: '1 example (~55 tokens)', trainable_params: 460800,
    tokens_per_s: tokens / seconds, peak_rss_mb: null, steps: timed.length,
  }));
} finally {
  await b.close();
}
