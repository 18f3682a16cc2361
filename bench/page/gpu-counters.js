// Counters on what a GPU pays for: compute dispatches, queue submissions, buffer creations and
// uploads (writeBuffer), wrapped on the WebGPU prototypes; count-worker.js imports this before the
// engine's worker. The page reads the totals over a BroadcastChannel (bench/gpu_work.mjs).
const counts = { dispatches: 0, submits: 0, buffers: 0, writes: 0, kernels: {} };
const count = (proto, method, key) => {
  const original = proto[method];
  proto[method] = function counted(...args) {
    counts[key] += 1;
    return original.apply(this, args);
  };
};
// a dispatch counts once in all and once under its kernel: cubecl labels each pipeline with its
// kernel's name, and a pass dispatches the pipeline it last set
const pipelines = new WeakMap();
const { setPipeline } = GPUComputePassEncoder.prototype;
GPUComputePassEncoder.prototype.setPipeline = function kernelNamed(pipeline) {
  pipelines.set(this, pipeline.label || 'unnamed');
  return setPipeline.call(this, pipeline);
};
for (const method of ['dispatchWorkgroups', 'dispatchWorkgroupsIndirect']) {
  const original = GPUComputePassEncoder.prototype[method];
  GPUComputePassEncoder.prototype[method] = function dispatched(...args) {
    const name = pipelines.get(this) ?? 'unnamed';
    counts.dispatches += 1;
    counts.kernels[name] = (counts.kernels[name] ?? 0) + 1;
    return original.apply(this, args);
  };
}
count(GPUQueue.prototype, 'submit', 'submits');
count(GPUDevice.prototype, 'createBuffer', 'buffers');
count(GPUQueue.prototype, 'writeBuffer', 'writes');
const channel = new BroadcastChannel('webgpu-lora-gpu-counts');
channel.onmessage = () => channel.postMessage({ ...counts, kernels: { ...counts.kernels } });
