// The page's side of the GPU work counters (bench/gpu_work.mjs, tests/browser/gpu_work.test.mjs):
// models whose engine worker counts its WebGPU calls (count-worker.js), their totals, and what one
// call makes the engine do. Each model has its own worker; dispose one before loading the next.
import { LoraModel } from '/lib/index.js';

const workerUrl = new URL('./count-worker.js', import.meta.url).href;

/** LoraModel.fromPretrained with the counting worker (and no model cache: every byte is uploaded). */
export const loadCounted = (url, options = {}) => LoraModel.fromPretrained(url, { ...options, workerUrl, cache: false });

/** The worker's totals so far: {dispatches, submits, buffers, writes, kernels: {name: dispatches}}. */
export function readCounts() {
  return new Promise((resolve) => {
    const channel = new BroadcastChannel('webgpu-lora-gpu-counts');
    channel.onmessage = (e) => { channel.close(); resolve(e.data); };
    channel.postMessage('read');
  });
}

/** What `f` makes the engine do, and how long it takes: {out, seconds, dispatches, submits, buffers, writes, kernels}. */
export async function counted(f) {
  const before = await readCounts();
  const t0 = performance.now();
  const out = await f();
  const seconds = (performance.now() - t0) / 1000;
  const after = await readCounts();
  const kernels = Object.fromEntries(Object.entries(after.kernels)
    .map(([k, v]) => [k, v - (before.kernels[k] ?? 0)]).filter(([, v]) => v));
  const totals = Object.entries(after).filter(([k]) => k !== 'kernels').map(([k, v]) => [k, v - before[k]]);
  return { out, seconds, ...Object.fromEntries(totals), kernels };
}

/** The training job both count: 6 already tokenized rows of 20 ids (< 256: any tiny model's vocabulary). */
export const trainingRows = () => Array.from({ length: 6 }, (_, i) => ({ input_ids: Array.from({ length: 20 }, (_, j) => 3 + ((i * 20 + j) * 7) % 250) }));
