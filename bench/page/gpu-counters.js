// Counters on what a GPU pays for: compute dispatches, queue submissions, buffer creations and
// uploads (writeBuffer), wrapped on the WebGPU prototypes; count-worker.js imports this before the
// engine's worker. The page reads the totals over a BroadcastChannel (bench/gpu_work.mjs).
const counts = { dispatches: 0, submits: 0, buffers: 0, writes: 0 };
const count = (proto, method, key) => {
  const original = proto[method];
  proto[method] = function counted(...args) {
    counts[key] += 1;
    return original.apply(this, args);
  };
};
count(GPUComputePassEncoder.prototype, 'dispatchWorkgroups', 'dispatches');
count(GPUComputePassEncoder.prototype, 'dispatchWorkgroupsIndirect', 'dispatches');
count(GPUQueue.prototype, 'submit', 'submits');
count(GPUDevice.prototype, 'createBuffer', 'buffers');
count(GPUQueue.prototype, 'writeBuffer', 'writes');
const channel = new BroadcastChannel('webgpu-lora-gpu-counts');
channel.onmessage = () => channel.postMessage({ ...counts });
