// The engine's home: a dedicated module Web Worker, so WebGPU work and file parsing never block
// the page. It speaks a tiny request/response protocol: {id, op, args} in; {id, event} while the
// operation runs, then {id, result} or {id, error}.
import init, { Engine } from './pkg/webgpu_lora.js';

const TEXT_FILES = ['tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja', 'generation_config.json'];
let enginePromise = null;
let cancelled = false;

function engine() {
  enginePromise ??= init().then(() => Engine.create());
  return enginePromise;
}

// Fetches one file as bytes, reporting progress; `optional` files may be missing (404).
async function fetchFile(url, { optional = false, onBytes = () => {} } = {}) {
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new Error(`${url}: cannot download (${e.message}); check the URL and your connection`);
  }
  if (!response.ok) {
    if (optional && response.status === 404) return null;
    throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`);
  }
  const total = Number(response.headers.get('content-length')) || 0;
  const reader = response.body.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.length;
    onBytes(value.length, total);
  }
  const bytes = new Uint8Array(loaded);
  let offset = 0;
  for (const c of chunks) { bytes.set(c, offset); offset += c.length; }
  return bytes;
}

const ops = {
  async load(baseUrl, emit) {
    const e = await engine();
    const base = baseUrl.endsWith('/') ? baseUrl : baseUrl + '/';
    let loaded = 0;
    const onBytes = (file) => (n, total) => { loaded += n; emit({ stage: 'download', file, loaded, fileTotal: total }); };
    e.beginModel(base);
    const config = await fetchFile(base + 'config.json', { onBytes: onBytes('config.json') });
    e.addFile('config.json', config);
    const index = await fetchFile(base + 'model.safetensors.index.json', { optional: true });
    if (index) e.addFile('model.safetensors.index.json', index);
    const weights = Engine.weightFiles(index ? new TextDecoder().decode(index) : null);
    for (const name of TEXT_FILES) {
      const bytes = await fetchFile(base + name, { optional: true, onBytes: onBytes(name) });
      if (bytes) e.addFile(name, bytes);
    }
    for (const name of weights) {
      e.addFile(name, await fetchFile(base + name, { onBytes: onBytes(name) }));
    }
    emit({ stage: 'upload', done: 0, total: 1 });
    // yield once so the progress message goes out before the (synchronous) upload
    await new Promise((r) => setTimeout(r, 0));
    e.loadModel((stage, done, total) => emit({ stage: 'upload', done, total }));
    return JSON.parse(e.modelConfig());
  },

  async generate(prompt, options, emit) {
    const e = await engine();
    const { chat = true, ...config } = options ?? {};
    const ids = e.promptIds(prompt, chat);
    cancelled = false;
    const result = await e.generate(ids, config, (piece) => {
      emit({ piece });
      return !cancelled;
    });
    return { promptIds: ids, ...result };
  },

  cancel() {
    cancelled = true;
  },

  async train(dataName, data, val, options, emit) {
    const e = await engine();
    const bytes = (x) => (typeof x === 'string' ? new TextEncoder().encode(x) : new Uint8Array(x));
    cancelled = false;
    const result = await e.train(dataName, bytes(data), val == null ? undefined : bytes(val), options ?? {}, (json) => {
      emit(JSON.parse(json));
      return !cancelled;
    });
    return { ...result, report: JSON.parse(result.report) };
  },

  async logits(ids) {
    const e = await engine();
    return await e.logits(ids);
  },
};

self.onmessage = async ({ data: { id, op, args = [] } }) => {
  try {
    if (!(op in ops)) throw new Error(`unknown operation ${op}`);
    const result = await ops[op](...args, (event) => self.postMessage({ id, event }));
    self.postMessage({ id, result });
  } catch (e) {
    self.postMessage({ id, error: String(e?.message ?? e) });
  }
};
