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
count(GPUComputePassEncoder.prototype, 'dispatchWorkgroups', 'dispatches');
count(GPUComputePassEncoder.prototype, 'dispatchWorkgroupsIndirect', 'dispatches');
// dispatches by kernel: cubecl labels each pipeline with its kernel's name
const pipelines = new WeakMap();
const { setPipeline, dispatchWorkgroups } = GPUComputePassEncoder.prototype;
GPUComputePassEncoder.prototype.setPipeline = function kernelNamed(pipeline) {
  pipelines.set(this, pipeline.label || 'unnamed');
  return setPipeline.call(this, pipeline);
};
GPUComputePassEncoder.prototype.dispatchWorkgroups = function kernelCounted(...args) {
  const name = pipelines.get(this) ?? 'unnamed';
  counts.kernels[name] = (counts.kernels[name] ?? 0) + 1;
  return dispatchWorkgroups.apply(this, args);
};
count(GPUQueue.prototype, 'submit', 'submits');
count(GPUDevice.prototype, 'createBuffer', 'buffers');
count(GPUQueue.prototype, 'writeBuffer', 'writes');
const channel = new BroadcastChannel('webgpu-lora-gpu-counts');
channel.onmessage = () => channel.postMessage({ ...counts, kernels: { ...counts.kernels } });
