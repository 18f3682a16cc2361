// The engine's home: a dedicated module Web Worker that the package starts itself, so WebGPU work
// and file parsing never block the page. Protocol: {id, op, args, now} in; {id, event} while the
// operation runs, then {id, result, state} or {id, error}. Operations run one at a time, in order;
// those the page marks `now` (`cancel`, which stops a generation or a training run, running or
// queued, and `destroyDevice`) jump the queue.
import init, { Engine, failedAllocation } from './pkg/webgpu_lora.js';
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_STATE, toBytes } from './store.js';
import { RECOVER } from './messages.js';

const CACHE_NAME = 'webgpu-lora-models-v1';
let enginePromise = null;
// The wasm instance's exports (its memory's size goes into an out-of-memory message).
let wasm = null;
// Ids of the calls a `cancel` has stopped, kept until each call ends (it may not have started).
const cancelled = new Set();
// Why the engine is gone, once it is: every call from then on rejects with this message.
let crashed = null;
// A Rust panic aborts the wasm instance: its message arrives here (JS would only see
// "unreachable"). A panic inside a WebGPU callback (wgpu's handler of an uncaptured error, such
// as running out of GPU memory) happens outside any call, which would then wait forever.
let panicked = null;
globalThis.__webgpuLoraPanic = (message) => {
  panicked ??= message;
  setTimeout(() => end(message), 0); // after the running call's own failure, if it failed
};
// A trap outside any call's own code (in a task of the engine's futures: an out-of-memory abort,
// a panic) ends the engine as one inside a call does; the page hears of it from the running call.
self.addEventListener('error', (event) => {
  if (!(event.error instanceof WebAssembly.RuntimeError)) return; // the page's onerror reports it
  event.preventDefault();
  end(panicked ?? event.error.message);
});
let loaded = false;
// The call running now ({id, op} and the sizes an out-of-memory message names), which a crash
// answers at once.
let running = null;
const answered = new Set();
// The calls queued behind it.
const waiting = new Set();
// How long a failed call waits for its device's `lost` before reporting its own error.
const LOST_GRACE_MS = 50;
const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;

// What to change when a call runs out of GPU memory, by operation.
const SMALLER = {
  load: 'load the model with a smaller dtype ("f16" halves f32; "q8_0" and "q4_1" keep about a quarter and an eighth of it) or from a quantized GGUF',
  train: 'lower batchSize or maxSeqLen (gradientAccumulationSteps keeps the effective batch size), or load the base model with a smaller dtype ("q8_0", "q4_1")',
  generate: 'generate from a shorter prompt or fewer tokens (maxNewTokens), or load the model with a smaller dtype',
};
// What to change when a call runs out of the engine's own (WebAssembly) memory.
const LESS = {
  load: 'load a smaller model file (a quantized GGUF, or f16 safetensors)',
  train: 'train on less data at once (the engine reads and tokenizes all of it in its memory) or with a smaller batchSize',
  generate: 'generate from a shorter prompt or fewer tokens (maxNewTokens)',
};
const DOING = { load: 'loading the model', train: 'training', generate: 'generating', logits: 'computing logits', evaluate: 'evaluating' };

// The engine's GPU device, kept when the engine asks for it: a lost device (a driver reset, the
// GPU process restarting, destroy()) ends the engine, and the page can recover() the model.
let device = null;
if (typeof GPUAdapter !== 'undefined') {
  const requestDevice = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = async function (...args) {
    device = await requestDevice.apply(this, args);
    device.lost.then((info) => end(null, info));
    return device;
  };
}

/**
 * Ends the engine (once) for a panic's `message`, a RuntimeError, or a lost device (`lost`: its
 * GPUDeviceLostInfo), with a message saying what happened and what to do; the running call is
 * answered with it at once.
 */
function end(message, lost) {
  crashed ??= crashMessage(message, lost);
  if (running !== null) answer(running.id);
  // a trap may leave the running call unsettled for good, and the calls behind it with it
  waiting.forEach(answer);
}

function crashMessage(message, lost) {
  const doing = running ? (DOING[running.op] ?? running.op) : 'working';
  const smaller = SMALLER[running?.op] ?? 'use a smaller model or dtype';
  if (lost) return `the GPU device was lost (${lost.reason ?? 'unknown'}: ${lost.message || 'no message'}): the model is gone from the GPU; model.recover() loads it again with its adapters`;
  if (/out of memory/i.test(message)) {
    const holding = running?.footprint ? ` (the model's weights take ${mb(running.footprint)} of it)` : running?.fileBytes ? ` (the model's files hold ${mb(running.fileBytes)})` : '';
    return `the GPU ran out of memory while ${doing}${holding}: ${smaller}, or close other pages that use the GPU; ${RECOVER}`;
  }
  const failed = wasm ? failedAllocation() : 0;
  if (failed > 0) {
    return `the engine ran out of memory while ${doing}: it asked for ${mb(failed)} more with ${mb(wasm.memory.buffer.byteLength)} in use, and a page's WebAssembly memory ends at 4 GB (or sooner, where the browser is short of memory): ${LESS[running?.op] ?? 'use a smaller model'}; ${RECOVER}`;
  }
  return `the engine crashed (${message}): this is a bug in webgpu-lora, please report it; ${RECOVER}`;
}

// Answers call `id` with the engine's end, once.
function answer(id) {
  if (answered.has(id)) return;
  answered.add(id);
  self.postMessage({ id, error: crashed, state: null });
}

function engine() {
  // the wasm's URL spelled out here, relative, so bundlers (Vite, webpack) see and copy it
  enginePromise ??= init({ module_or_path: new URL('./pkg/webgpu_lora_bg.wasm', import.meta.url) }).then(async (exports) => {
    wasm = exports;
    // the largest buffer a matrix may take: the engine's device requests the adapter's own limits
    const limits = (await navigator.gpu?.requestAdapter())?.limits;
    return Engine.create(limits ? Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize) : 0);
  });
  return enginePromise;
}

async function openCache(useCache) {
  if (!useCache || typeof caches === 'undefined') return null;
  try { return await caches.open(CACHE_NAME); } catch { return null; }
}

// A response for `url`: the cached copy when the server still has the same file (same size and
// ETag; or the server is unreachable), else the network's. `optional` files may be missing (404).
async function openFile(url, cache, optional) {
  const cached = cache && (await cache.match(url));
  if (cached) {
    const head = await fetch(url, { method: 'HEAD' }).catch(() => null);
    const unchanged = head?.ok && head.headers.get('content-length') === cached.headers.get('content-length')
      && (head.headers.get('etag') ?? '') === cached.headers.get('x-webgpu-lora-etag');
    if (!head || unchanged) return { response: cached, cached: true };
  }
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new Error(`${url}: cannot download (${e.message}): check the URL, your connection and that the server allows cross-origin requests`);
  }
  if (!response.ok) {
    if (optional && response.status === 404) return null;
    throw new Error(`${url}: HTTP ${response.status} ${response.statusText || ''}`.trim() + (response.status === 404 ? ': no such file; check the model URL (a directory in Hugging Face layout, ending in /)' : ''));
  }
  return { response, cached: false };
}

// Reads the bodies of opened files in order, reporting {stage: 'download', file, loaded, total,
// fileLoaded, fileTotal, cached}; stores fresh downloads in the cache once complete.
async function readFiles(base, opened, cache, emit) {
  const total = opened.reduce((sum, [, o]) => sum + (Number(o.response.headers.get('content-length')) || 0), 0);
  let loaded = 0;
  const out = {};
  for (const [name, { response, cached }] of opened) {
    const fileTotal = Number(response.headers.get('content-length')) || 0;
    const reader = response.body.getReader();
    const chunks = [];
    let fileLoaded = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      fileLoaded += value.length;
      loaded += value.length;
      emit({ stage: 'download', file: name, loaded, total, fileLoaded, fileTotal, cached });
    }
    const bytes = new Uint8Array(fileLoaded);
    let offset = 0;
    for (const c of chunks) { bytes.set(c, offset); offset += c.length; }
    if (fileTotal && fileLoaded !== fileTotal) throw new Error(`${base}${name}: the download stopped at ${fileLoaded} of ${fileTotal} bytes; try again`);
    if (cache && !cached) {
      const headers = { 'content-length': String(fileLoaded), 'x-webgpu-lora-etag': response.headers.get('etag') ?? '' };
      await cache.put(base + name, new Response(bytes, { headers })).catch(() => {}); // a full cache only costs the next visit a download
    }
    out[name] = bytes;
  }
  return out;
}

// An adapter's PEFT files as bytes, from the URL of its directory or the two files themselves,
// and where they came from (for errors).
async function adapterBytes(source, emit) {
  let files = source;
  let origin = 'the given files';
  if (typeof source === 'string') {
    origin = source.endsWith('/') ? source : source + '/';
    const opened = [];
    for (const file of [ADAPTER_CONFIG, ADAPTER_WEIGHTS]) opened.push([file, await openFile(origin + file, null, false)]);
    files = await readFiles(origin, opened, null, emit);
  }
  return { config: await toBytes(files[ADAPTER_CONFIG], ADAPTER_CONFIG), weights: await toBytes(files[ADAPTER_WEIGHTS], ADAPTER_WEIGHTS), origin };
}

// The files of a model: from a URL of a directory in Hugging Face layout or of a .gguf file, a
// GGUF given as a Blob or File, or files given as {name: bytes}.
async function modelFiles(source, useCache, emit) {
  if (typeof Blob !== 'undefined' && source instanceof Blob) {
    const name = source.name?.toLowerCase().endsWith('.gguf') ? source.name : 'model.gguf';
    return { origin: source.name || 'the given GGUF file', files: { [name]: await toBytes(source, name) } };
  }
  if (typeof source === 'string' && new URL(source).pathname.toLowerCase().endsWith('.gguf')) {
    // the file's name without any query (?download=true), so the core sees ".gguf"
    const name = decodeURIComponent(new URL(source).pathname.split('/').pop());
    const dir = new URL('.', source).href;
    const cache = await openCache(useCache);
    const opened = [[name, await openFile(source, cache, false)]];
    return { origin: source, files: await readFiles(dir, opened, cache, emit) };
  }
  if (typeof source !== 'string') {
    const files = {};
    for (const [name, value] of Object.entries(source)) files[name] = await toBytes(value, name);
    return { origin: 'the given files', files };
  }
  const base = source.endsWith('/') ? source : source + '/';
  const layout = JSON.parse(Engine.modelLayout()); // the core's names of a model directory's files
  const cache = await openCache(useCache);
  const opened = [];
  const open = async (name, optional = false) => {
    const o = await openFile(base + name, cache, optional);
    if (o) opened.push([name, o]);
    return o;
  };
  await open(layout.config);
  // probe only for what the usual files leave open: the browser logs every 404 as an error
  if (!(await open(layout.weights, true))) {
    const index = await open(layout.index, true);
    if (!index) throw new Error(`${base}: no model weights: neither ${layout.weights} nor ${layout.index} is there`);
    await Promise.all(Engine.weightFiles(await index.response.clone().text()).map((n) => open(n)));
  }
  const tokenizerConfig = await open('tokenizer_config.json', true);
  // a chat template inside tokenizer_config.json makes chat_template.jinja unnecessary
  const template = tokenizerConfig && (await tokenizerConfig.response.clone().json().then((c) => c?.chat_template, () => null));
  const optional = layout.optional.filter((n) => n !== 'tokenizer_config.json' && !(template && n.endsWith('.jinja')));
  await Promise.all(optional.map((n) => open(n, true)));
  return { origin: base, files: await readFiles(base, opened, cache, emit) };
}

const ops = {
  // Holds the Web Lock `name` while this worker lives: the browser releases it when the worker
  // ends in any way (killed, crashed, out of memory), which is how the page learns of it.
  async hold(name) {
    await new Promise((held) => navigator.locks.request(name, () => { held(); return new Promise(() => {}); }));
  },

  async load(source, { cache = true, dtype = 'auto' } = {}, emit) {
    const e = await engine();
    Engine.checkDtype(dtype);
    const { origin, files } = await modelFiles(source, cache, emit);
    if (running) running.fileBytes = Object.values(files).reduce((sum, bytes) => sum + bytes.length, 0);
    e.beginModel(origin);
    for (const [name, bytes] of Object.entries(files)) e.addFile(name, bytes);
    emit({ stage: 'upload', done: 0, total: 1 });
    // yield once so the progress message goes out before the (synchronous) upload
    await new Promise((r) => setTimeout(r, 0));
    e.loadModel((stage, done, total) => emit({ stage: 'upload', done, total }), dtype);
    // the GPU reports a failed upload (out of memory) asynchronously: wait for it here
    await device?.queue.onSubmittedWorkDone();
    loaded = true;
    configsSent.clear();
    return { config: JSON.parse(e.modelConfig()), hasChatTemplate: e.hasChatTemplate() };
  },

  // `source`: the URL of a PEFT directory, or its two files (checked by the page: both present)
  async loadAdapter(name, source, emit) {
    const e = await engine();
    const { config, weights, origin } = await adapterBytes(source, emit);
    await e.loadAdapter(name, config, weights, origin);
  },

  async setAdapter(name) { (await engine()).setAdapter(name); },
  async disableAdapter() { await (await engine()).disableAdapter(); },
  async enableAdapter() { (await engine()).enableAdapter(); },
  async deleteAdapter(name) { await (await engine()).deleteAdapter(name); },
  async unload() { await (await engine()).unload(); },
  async unmergeAdapter() { await (await engine()).unmergeAdapter(); },
  async mergeAdapter(names, safeMerge) { return (await engine()).mergeAdapter(names, safeMerge); },
  async mergeAndUnload(names, safeMerge) { return (await engine()).mergeAndUnload(names, safeMerge); },
  async addWeightedAdapter(names, weights, newName, combination, svdRank) {
    await (await engine()).addWeightedAdapter(names, Float64Array.from(weights), newName, combination, svdRank);
  },
  async getMemoryFootprint() {
    return (await engine()).getMemoryFootprint();
  },

  async trainableParameters() {
    const [trainable, all] = (await engine()).trainableParameters();
    return { trainable, all };
  },
  async loraParameterCount(loraConfig) {
    const [trainable, all] = (await engine()).loraParameterCount(loraConfig);
    return { trainable, all };
  },

  async logits(ids) {
    const e = await engine();
    return await e.logits(Uint32Array.from(ids));
  },

  async generate(prompt, options, emit) {
    const e = await engine();
    const { chat = true, ...config } = options ?? {};
    const ids = Array.isArray(prompt) ? e.chatIds(prompt) : e.promptIds(prompt, chat);
    const result = await e.generate(ids, config, (piece) => {
      emit({ piece });
      return !emit.cancelled();
    });
    return { promptIds: Array.from(ids), ...result };
  },

  cancel(id) {
    cancelled.add(id);
  },

  // `initFrom`: an adapter to train further, as loadAdapter takes it (or null); with
  // `resumeState` (its CHECKPOINT_STATE file), a checkpoint's adapter to resume
  async train(dataName, data, val, options, initFrom, resumeState, emit) {
    const e = await engine();
    const init = initFrom == null ? undefined : await adapterBytes(initFrom, emit);
    const state = resumeState == null ? undefined : await toBytes(resumeState, CHECKPOINT_STATE);
    if (emit.cancelled()) throw new Error('training was cancelled before it started: nothing was trained');
    const result = await e.train(dataName, await toBytes(data, dataName), val == null ? undefined : await toBytes(val, 'validation data'), options ?? {}, init, state, (json, files) => {
      emit(files ? { ...JSON.parse(json), files } : JSON.parse(json));
      return !emit.cancelled();
    });
    return { ...result, report: JSON.parse(result.report) };
  },

  async evaluate(dataName, data, options) {
    return JSON.parse(await (await engine()).evaluate(dataName, await toBytes(data, dataName), options ?? {}));
  },

  async exportAdapter(name, asLora) { return (await engine()).exportAdapter(name, asLora); },
  async exportMerged(adapter) { return (await engine()).exportMerged(await mergedOnExport(adapter)); },
  async exportMergedGguf(adapter, outType) { return (await engine()).exportMergedGguf(await mergedOnExport(adapter), outType); },
  async exportAdapterGguf(name) { return (await engine()).exportAdapterGguf(name); },

  // what a driver reset does, for testing a page's recovery (LoraModel.destroyDevice)
  async destroyDevice() { device?.destroy(); },
};

// The adapter an export merges in: the one named, else the active one unless disabled (an adapter
// already merged is skipped by the engine).
async function mergedOnExport(adapter) {
  if (adapter != null) return adapter;
  const state = JSON.parse((await engine()).adapterState());
  return state.active != null && !state.disabled ? state.active : undefined;
}

// Every result carries the adapters' state, so the page's view of it is never stale; an
// adapter's config goes along once, when the adapter first appears. null only before a model is
// loaded; a failure to read it is an error like any other.
const configsSent = new Set();
async function adapterState() {
  if (!loaded) return null;
  const e = await engine();
  const state = JSON.parse(e.adapterState());
  state.configs = {};
  for (const name of state.names) {
    if (!configsSent.has(name)) state.configs[name] = JSON.parse(e.adapterConfig(name));
  }
  configsSent.clear();
  state.names.forEach((n) => configsSent.add(n));
  return state;
}

let queue = Promise.resolve();
// `now`: the page's mark on the operations that run at once, beside the running one they act on
self.onmessage = ({ data: { id, op, args = [], now = false } }) => {
  const emit = (event) => self.postMessage({ id, event });
  emit.cancelled = () => cancelled.has(id);
  const run = async () => {
    waiting.delete(id);
    if (!now) running = { id, op, ...(await needs(op).catch(() => ({}))) };
    try {
      if (crashed) throw new Error('crashed');
      if (!(op in ops)) throw new Error(`unknown operation ${op}`);
      const result = await ops[op](...args, emit);
      if (panicked) throw new Error(panicked); // a WebGPU error during the call, reported beside it
      // hand big byte arrays over instead of copying them
      const transfer = Object.values(ArrayBuffer.isView(result) ? { result } : result ?? {}).filter(ArrayBuffer.isView).map((v) => v.buffer);
      // these run beside the operation they act on, which holds the model: they change no state
      const state = now ? undefined : await adapterState();
      if (!answered.has(id)) self.postMessage({ id, result, state }, [...new Set(transfer)]);
    } catch (e) {
      // a GPU error may be the device going away: its `lost` settles just after the failed call
      if (device && !crashed) await Promise.race([device.lost, new Promise((r) => setTimeout(r, LOST_GRACE_MS))]);
      if (crashed || panicked || e instanceof WebAssembly.RuntimeError) {
        end(panicked ?? String(e?.message ?? e));
        return answer(id);
      }
      const state = await adapterState().catch(() => undefined); // the error being reported says more
      self.postMessage({ id, error: String(e?.message ?? e), state });
    } finally {
      cancelled.delete(id);
      answered.delete(id);
      if (running?.id === id) running = null;
    }
  };
  if (crashed) answer(id);
  else if (now) run();
  else {
    waiting.add(id);
    queue = queue.then(run);
  }
};

// What an out-of-memory message about call `op` names: the size of the weights it works with
// (a load names its files' size once it has them).
async function needs(op) {
  if (crashed || !loaded || op === 'load' || !(op in DOING)) return {};
  return { footprint: (await engine()).getMemoryFootprint() };
}
