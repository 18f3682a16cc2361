// webgpu-lora: LoRA adapters for a small language model on WebGPU, with PEFT's vocabulary.
//
// The engine (Rust compiled to WebAssembly) runs in a dedicated module Web Worker that this
// module starts; every method here posts a request to it and returns a promise, so the page never
// blocks. Requests run one at a time, in order. Adapters are PEFT files (adapter_config.json +
// adapter_model.safetensors) and are kept across visits in IndexedDB by AdapterStore.
import { AdapterStore, ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_STATE, adapterBlobs, baseIdentity, adapterFilesByName, checkSameBase, toBytes } from './store.js';
import { RECOVER } from './messages.js';

export { AdapterStore };

/**
 * Where hub ids resolve, as transformers.js's `env`: `fromPretrained('ORG/NAME')` loads
 * `${remoteHost}ORG/NAME/resolve/${revision}/` (or that directory's `file`). Change remoteHost to
 * use a mirror or your own server with the same URL layout.
 */
export const env = { remoteHost: 'https://huggingface.co/' };

const NO_WEBGPU = 'use Chrome or Edge 113+ (on Linux, or where the GPU is blocklisted, Chromium started with --enable-unsafe-webgpu) on https or localhost; chrome://gpu says why WebGPU is off';

/**
 * Whether this browser can run the engine: {available: true}, or {available: false, message}
 * saying what is missing (no `navigator.gpu` at all, or no GPU adapter behind it) and what to use.
 */
export async function webgpuStatus() {
  if (typeof navigator === 'undefined' || !navigator.gpu) return { available: false, message: `WebGPU is not available in this browser (it has no navigator.gpu): ${NO_WEBGPU}` };
  const adapter = await navigator.gpu.requestAdapter().catch(() => null);
  if (!adapter) return { available: false, message: `WebGPU is not available: the browser offers no GPU adapter (WebGPU is disabled or behind a flag here, or the GPU is blocklisted): ${NO_WEBGPU}` };
  return { available: true };
}

// "ORG/NAME": two path segments, no scheme, no leading "/" or ".", no trailing "/" and no file
// extension; anything else is a URL or a path (a directory ends in "/", a GGUF in ".gguf")
const HUB_ID = /^[A-Za-z0-9][\w-]*\/[\w.-]*[\w-]$/;
const isHubId = (source) => typeof source === 'string' && HUB_ID.test(source) && !/\.(gguf|json|safetensors)$/i.test(source);

/** A hub id's URL under env.remoteHost: its directory at `revision`, or `file` in it. */
function hubUrl(id, revision, file) {
  const host = env.remoteHost.endsWith('/') ? env.remoteHost : `${env.remoteHost}/`;
  return `${host}${id}/resolve/${encodeURIComponent(revision)}/${file ?? ''}`;
}

const WORKER_ENDED = `the engine's worker stopped: the browser ended it (it ran out of memory, crashed, or the page closed it); ${RECOVER}`;

// Calls that go out and run at once, beside the running call they act on.
const JUMPS_THE_QUEUE = new Set(['cancel', 'destroyDevice']);

class Worker_ {
  #outbox = Promise.resolve();

  constructor(url) {
    // spelled out literally so that bundlers (Vite, webpack) bundle the worker with its wasm
    this.worker = url ? new Worker(url, { type: 'module' }) : new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
    this.pending = new Map();
    this.nextId = 1;
    this.state = null;
    this.configs = new Map();
    this.worker.onmessage = ({ data: { id, event, result, error, state } }) => {
      const call = this.pending.get(id);
      if (!call) return;
      if (event !== undefined) return call.onEvent?.(event);
      this.pending.delete(id);
      if (state) {
        for (const [name, config] of Object.entries(state.configs)) this.configs.set(name, config);
        this.state = state;
      }
      if (error !== undefined) call.reject(new Error(error));
      else call.resolve(result);
    };
    // an error nothing in the worker caught (it could not start, or ran out of memory outside a call)
    this.worker.onerror = (e) => this.#end(`the engine's worker failed: ${e.message ?? 'it could not start (is the package served with its pkg/ folder?)'}; ${RECOVER}`);
    // the worker holds a Web Lock while it lives; the page gets it when the worker ends in any way
    if (globalThis.navigator?.locks) {
      const lock = `webgpu-lora-engine-${crypto.randomUUID()}`;
      this.call('hold', [lock]).then(() => navigator.locks.request(lock, () => this.#end(WORKER_ENDED)), () => {});
    }
  }

  // Rejects every pending call and every later one with `message` (once; not after terminate()).
  #end(message) {
    if (this.ended) return;
    this.ended = message;
    this.worker.terminate();
    this.#failAll(message);
  }

  #failAll(message) {
    for (const call of this.pending.values()) call.reject(new Error(message));
    this.pending.clear();
  }

  call(op, args = [], onEvent, transfer = []) {
    return this.callPrepared(op, { args, transfer }, onEvent);
  }

  /**
   * `call` with its arguments still being prepared (`prepared`: {args, transfer} or a promise of
   * it; a rejection rejects the call, which is then not sent). The call takes its place in the
   * order when it is made: messages go out, and so run, in the order of the calls, whatever each
   * one's preparation (a fetch, an IndexedDB read) takes. Only `cancel` and `destroyDevice` go out at once. The
   * promise's `cancel()` stops this call (a generation or a training run) whether it is running
   * or still waiting its turn: the worker keeps the cancel until the call starts.
   */
  callPrepared(op, prepared, onEvent) {
    const id = this.nextId++;
    const now = JUMPS_THE_QUEUE.has(op); // the worker runs it at once too
    let posted;
    const sent = new Promise((r) => { posted = r; });
    const call = new Promise((resolve, reject) => {
      if (this.ended) { posted(false); return reject(new Error(this.ended)); }
      this.pending.set(id, { resolve, reject, onEvent });
      const send = async () => {
        try {
          const { args = [], transfer = [] } = await prepared;
          this.worker.postMessage({ id, op, args, now }, transfer);
          posted(true);
        } catch (e) {
          posted(false);
          this.pending.delete(id);
          reject(e);
        }
      };
      if (now) send();
      else this.#outbox = this.#outbox.then(send);
    });
    // after the call's own message, so the worker knows the call it stops; not once it has ended
    call.cancel = () => sent.then((ok) => ok && this.pending.has(id) && this.call('cancel', [id]));
    return call;
  }

  terminate() {
    this.#end('the model was disposed');
  }
}

// A GGUF file's model name: "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct" (the
// quantization is not part of the model's identity: adapters move between its files)
const ggufModelName = (file) => file.replace(/\.gguf$/i, '').replace(/[.-](q\d\w*|f16|f32|bf16)$/i, '');
const modelName = (source) => {
  if (typeof Blob !== 'undefined' && source instanceof Blob) return source.name ? ggufModelName(source.name) : null;
  if (typeof source !== 'string') return null;
  const url = new URL(source, globalThis.location?.href ?? 'http://localhost/');
  if (url.pathname.toLowerCase().endsWith('.gguf')) return ggufModelName(url.pathname.split('/').pop());
  const hub = url.pathname.match(/^\/([^/]+\/[^/]+)\/resolve\//); // https://huggingface.co/ORG/NAME/resolve/main/
  return hub ? hub[1] : url.pathname.replace(/\/+$/, '').split('/').pop() || url.host;
};
const absolute = (source) => (typeof source === 'string' ? new URL(source, globalThis.location?.href).href : source);
const jsonl = (rows) => rows.map((r) => JSON.stringify(r)).join('\n');
const isStoreName = (s) => typeof s === 'string' && !s.includes('/') && !s.includes(':');

/** The name data goes by (its extension decides the format): as given, a File's own, or "data.jsonl". */
const dataFileName = (data, dataName) => dataName ?? (typeof File !== 'undefined' && data instanceof File ? data.name : 'data.jsonl');

/** Data for train(): text, bytes, a File/Blob, or an array of rows (objects, written as JSONL). */
async function dataBytes(data, what) {
  if (Array.isArray(data)) return new TextEncoder().encode(jsonl(data));
  return toBytes(data, what);
}

export class LoraModel {
  #engine;
  #base;
  #load;
  #summaries = new Map();
  #defaultStore = null;
  // where each loaded adapter came from (a URL, files, a stored name): what recover() loads again
  #sources = new Map();
  // adapters mergeAndUnload() folded into the base weights: recover() cannot bring those weights back
  #mergedAway = [];
  /** Whether full fine-tuning changed the base in this engine (recover() loads it as it was). */
  #fineTuned = false;

  constructor(engine, base, { config, hasChatTemplate }, load) {
    this.#engine = engine;
    this.#base = base;
    this.#load = load;
    /** The base model's config.json as loaded. */
    this.config = config;
    /** Whether its tokenizer has a chat template: `chat: true` prompts need one (a pre-trained base often has none). */
    this.hasChatTemplate = hasChatTemplate;
  }

  /**
   * Loads a base model. `source`: the URL of a directory in Hugging Face layout ("/models/x/",
   * "https://huggingface.co/ORG/NAME/resolve/main/"), the URL of a .gguf file (loaded as it ships:
   * its quantized weights stay quantized on the GPU), a GGUF as a File or Blob, or a directory's
   * files as {name: ArrayBuffer|Blob}.
   * Options: onProgress({stage: "download", file, loaded, total, fileLoaded, fileTotal, cached} |
   * {stage: "upload", done, total}), cache (default true: files are kept in the Cache API and
   * reused while the server reports the same size), name (the base model's name for stored
   * adapters), dtype (how the base model's matrices are kept on the GPU, always computed with in
   * f32: "auto", the default, as the file stores them (a GGUF stays quantized, safetensors load
   * as f32); "f32"; "f16", half the memory; or "q8_0", "q4_0", "q4_1", "q5_0": the decoder layers'
   * linear weights quantized on load, as transformers' load_in_8bit / load_in_4bit; rounding
   * changes logits slightly, and merging into an f16 base rounds, as in PEFT), workerUrl.
   * `source` may also be a hub id, "ORG/NAME", as transformers.js takes it: the directory
   * `${env.remoteHost}ORG/NAME/resolve/${revision}/` (revision defaults to "main"), or the file
   * `file` in it (a .gguf).
   */
  static async fromPretrained(source, { dtype = 'auto', onProgress, cache = true, name, workerUrl, revision = 'main', file } = {}) {
    if (isHubId(source)) {
      name ??= source;
      source = hubUrl(source, revision, file);
    }
    const webgpu = await webgpuStatus();
    if (!webgpu.available) throw new Error(webgpu.message);
    const load = { source: absolute(source ?? {}), options: { cache, dtype }, workerUrl };
    const { engine, loaded } = await LoraModel.#start(load, onProgress);
    const base = baseIdentity(name ?? modelName(source) ?? loaded.config._name_or_path ?? 'local model', loaded.config);
    return new LoraModel(engine, base, loaded, load);
  }

  /** A new engine with the base model loaded. */
  static async #start({ source, options, workerUrl }, onProgress) {
    const engine = new Worker_(workerUrl);
    try {
      return { engine, loaded: await engine.call('load', [source, options], onProgress) };
    } catch (e) {
      engine.terminate();
      throw e;
    }
  }

  /**
   * After the engine crashed, ran out of memory, lost its GPU or its worker ended (every call then
   * rejects saying so), or at any time:
   * starts a new engine, loads the base model again (from the cache, with the same options) and
   * every adapter that came from a URL, files or the AdapterStore (saved ones included), then
   * sets the active adapter, disables it and merges again as before. Adapters that exist only in
   * this session (trained or combined and not saved) cannot come back: they are listed in the
   * result, {restored, lost, mergedAway, fineTunedAway}, with the adapters mergeAndUnload() had
   * folded into the base (the base comes back without them) and whether full fine-tuning had
   * changed the base (it comes back as loaded: load its modelFiles instead). Save adapters as you
   * go (saveAdapter) to keep them.
   */
  async recover({ onProgress } = {}) {
    const before = this.#engine.state ?? { names: [], active: null, disabled: false, merged: [] };
    this.#engine.terminate();
    const { engine } = await LoraModel.#start(this.#load, onProgress);
    this.#engine = engine;
    const restored = [];
    const lost = [];
    for (const name of before.names) {
      const source = this.#sources.get(name);
      if (source) {
        await this.loadAdapter(source.source, name, source.options);
        restored.push(name);
      } else {
        lost.push(name);
      }
    }
    if (before.active && restored.includes(before.active)) await this.setAdapter(before.active);
    const merged = before.merged.filter((n) => restored.includes(n));
    if (merged.length) await this.mergeAdapter(merged);
    if (before.disabled && this.activeAdapter) await this.disableAdapter();
    const mergedAway = this.#mergedAway;
    const fineTunedAway = this.#fineTuned;
    this.#mergedAway = [];
    this.#fineTuned = false;
    return { restored, lost, mergedAway, fineTunedAway };
  }

  /** Destroys the engine's GPU device, as a driver reset would: for testing a page's recovery (recover()). */
  destroyDevice() { return this.#engine.call('destroyDevice'); }

  /** The given store, or the default AdapterStore (opened once, kept open). */
  async #store(store) {
    return store ?? (this.#defaultStore ??= AdapterStore.open());
  }

  /** The base model's {name, shapes}, recorded with every adapter saved from it. */
  get baseModel() { return this.#base; }
  /** The active adapter's name (also while adapters are disabled), or null. */
  get activeAdapter() { return this.#engine.state?.active ?? null; }
  /** Whether disableAdapter() is in effect. */
  get disabled() { return this.#engine.state?.disabled ?? false; }
  /** The adapters merged into the base weights. */
  get mergedAdapters() { return this.#engine.state?.merged ?? []; }
  /** The names of the loaded adapters. */
  adapters() { return [...(this.#engine.state?.names ?? [])]; }
  /** The adapter_config.json (parsed) of a loaded adapter, or null. */
  adapterConfig(name) { return this.adapters().includes(name) ? this.#engine.configs.get(name) : null; }

  /**
   * Loads a PEFT adapter as `name` (not activated, as in PEFT). `source`: the name of an adapter
   * in the AdapterStore (a plain name, no "/"), the URL of a PEFT directory, or its files
   * {"adapter_config.json", "adapter_model.safetensors"} (Blobs, ArrayBuffers, Files).
   * A stored adapter made for another base is refused unless {allowOtherBase: true}.
   */
  async loadAdapter(source, name, { store, allowOtherBase = false } = {}) {
    const source_ = this.#adapterSource(source, { store, allowOtherBase });
    const loaded = name ?? (isStoreName(source) ? source : 'default');
    // the engine checks the files (and everything else) before it changes the model
    const prepared = source_.then(({ files, record }) => ({ args: [loaded, files], transfer: record ? [record.weights.buffer] : [] }));
    await this.#engine.callPrepared('loadAdapter', prepared);
    this.#sources.set(loaded, { source, options: { store, allowOtherBase } });
    const { record } = await source_;
    if (record?.trainingSummary) this.#summaries.set(loaded, record.trainingSummary);
    else if (!record) this.#summaries.delete(loaded); // files carry no training summary
  }

  /** What the worker takes for an adapter `source` (a stored name, a URL, or the PEFT files), and the stored record. */
  async #adapterSource(source, { store, allowOtherBase = false } = {}) {
    if (isStoreName(source)) {
      const s = await this.#store(store);
      const record = await s.get(source);
      if (!record) throw new Error(`no adapter named "${source}" in the store (stored: ${JSON.stringify((await s.list()).map((a) => a.name))})`);
      if (!allowOtherBase) checkSameBase(record, this.#base);
      return { files: { [ADAPTER_CONFIG]: record.config, [ADAPTER_WEIGHTS]: record.weights }, record };
    }
    return { files: typeof source === 'string' ? absolute(source) : adapterFilesByName(source, 'the given adapter files') };
  }

  setAdapter(name) { return this.#engine.call('setAdapter', [name]); }
  disableAdapter() { return this.#engine.call('disableAdapter'); }
  enableAdapter() { return this.#engine.call('enableAdapter'); }
  async deleteAdapter(name) {
    await this.#engine.call('deleteAdapter', [name]);
    this.#summaries.delete(name);
    this.#sources.delete(name);
  }
  /** Removes every adapter (undoing merges): back to the base model. */
  async unload() {
    await this.#engine.call('unload');
    this.#summaries.clear();
    this.#sources.clear();
  }
  /** Merges adapters (default: the active one) into the base weights; resolves to {merged, skipped}. */
  mergeAdapter(names = [], { safeMerge = false } = {}) { return this.#engine.call('mergeAdapter', [names, safeMerge]); }
  unmergeAdapter() { return this.#engine.call('unmergeAdapter'); }
  /** Merges and then removes every adapter: a plain model with the merged weights. */
  async mergeAndUnload({ adapterNames = [], safeMerge = false } = {}) {
    const report = await this.#engine.call('mergeAndUnload', [adapterNames, safeMerge]);
    this.#summaries.clear();
    this.#sources.clear();
    this.#mergedAway.push(...report.merged); // the merged weights exist only in this engine now
    return report;
  }
  /** PEFT's add_weighted_adapter; combination "svd" (default, with {svdRank}), "linear" or "cat". */
  addWeightedAdapter(names, weights, newName, combination = 'svd', { svdRank } = {}) {
    return this.#engine.call('addWeightedAdapter', [names, weights, newName, combination, svdRank]);
  }
  /** Bytes the weights (base and adapters) occupy on the GPU: transformers' get_memory_footprint. */
  getMemoryFootprint() { return this.#engine.call('getMemoryFootprint'); }

  /** {trainable, all}: PEFT's get_nb_trainable_parameters for the active adapter. */
  trainableParameters() { return this.#engine.call('trainableParameters'); }

  /** {trainable, all} that a new adapter with these LoRA settings would have, without adding it. */
  loraParameterCount(loraConfig) { return this.#engine.call('loraParameterCount', [loraConfig]); }

  /** The logits of one forward pass: {data: Float32Array [seq * vocab], dims: [seq, vocab]}. */
  async logits(ids) {
    const data = await this.#engine.call('logits', [Array.from(ids)]);
    return { data, dims: [ids.length, this.config.vocab_size] };
  }

  /**
   * Streams generated text: `for await (const piece of model.generate(prompt, options))`.
   * `prompt`: text (a user message in the chat template unless {chat: false}) or messages
   * [{role, content}]. Options: maxNewTokens, temperature (0: greedy), topP, topK,
   * repetitionPenalty, seed, stop (strings), signal (an AbortSignal; aborting ends the stream
   * after the current token). `.result` resolves to {tokens, text, stopReason, promptIds}.
   */
  generate(prompt, { signal, ...options } = {}) {
    const queue = [];
    let wake = null;
    let finished = false;
    const call = this.#engine.call('generate', [prompt, options], (e) => { queue.push(e.piece); wake?.(); });
    const cancel = () => call.cancel();
    const result = call.finally(() => { finished = true; wake?.(); signal?.removeEventListener('abort', cancel); });
    if (signal?.aborted) cancel();
    signal?.addEventListener('abort', cancel);
    async function* pieces() {
      let complete = false;
      try {
        for (;;) {
          if (queue.length) { yield queue.shift(); continue; }
          if (finished) break;
          await new Promise((r) => { wake = r; });
          wake = null;
        }
        await result; // rethrows a failure
        complete = true;
      } finally {
        if (!complete && !finished) cancel(); // the caller stopped iterating
      }
    }
    const stream = pieces();
    stream.result = result;
    result.catch(() => {}); // reported through the iterator too
    return stream;
  }

  /**
   * Fine-tunes a new LoRA adapter with SFT and leaves it loaded and active (or, with
   * `trainingArgs.method`, as below). `data` (and
   * `validation`): JSONL text, bytes, a File/Blob, or an array of rows ({messages}, {prompt,
   * completion} or {text}); `dataName` ("data.jsonl"; a name not ending in .jsonl means plain
   * text). `loraConfig` {r, loraAlpha, loraDropout, targetModules, initLoraWeights, useRslora} and
   * `trainingArgs` {lr | learningRate, maxSteps, epochs, batchSize, gradAccum, warmupSteps,
   * schedule, weightDecay, maxGradNorm, maxSeqLen, evalEvery, valSplit, patience, seed, ...} as the
   * CLI's flags in camelCase. onStep(metrics), onEval({step, valLoss, best}), onCheckpoint(files);
   * `signal` cancels after the current step (the adapter so far is kept), or, aborted before the
   * run starts (while it waits behind another call), rejects and trains nothing. A callback that throws
   * stops the run, and train() rejects with that error. Resolves to the report. `initFrom` (a
   * stored adapter's name, a URL, or PEFT files, as loadAdapter takes them) trains that adapter
   * further instead of a new one: its adapter_config.json sets r, alpha, targets..., and a
   * `loraConfig` that says otherwise is refused. `resumeFrom` (the files an onCheckpoint
   * callback got: {"adapter_config.json", "adapter_model.safetensors",
   * "trainer_state.safetensors"}) resumes that run where its checkpoint was taken: given the same
   * data and trainingArgs, it continues with the losses the uninterrupted run has.
   *
   * `trainingArgs.method`: "sft" (the default), "dpo" (preference pairs, see the README) or
   * "full": every weight of the model trained (an f32 model, no adapter loaded, no `loraConfig`).
   * Full fine-tuning first calls onMemory({parameters, bytes, parts}) with its memory estimate
   * (refused above `trainingArgs.memoryLimitMb`), changes the model in place, and resolves to the
   * report with `modelFiles` ({"model.safetensors", "config.json", the tokenizer's files} as
   * Blobs: a Hugging Face directory in f32, which fromPretrained takes); its checkpoints are such
   * files (bytes) plus the trainer state, and `resumeFrom` resumes one on a model loaded from them.
   */
  async train({ data, validation, dataName, adapterName = 'default', loraConfig = {}, trainingArgs = {}, initFrom, resumeFrom, onStep, onEval, onCheckpoint, onMemory, signal } = {}) {
    if (data == null) throw new Error('train: "data" is required (JSONL text, a File, or an array of examples)');
    if (initFrom != null && resumeFrom != null) throw new Error('train: give "initFrom" (an adapter to train further) or "resumeFrom" (a checkpoint to resume), not both');
    if (resumeFrom != null && resumeFrom[CHECKPOINT_STATE] == null) throw new Error(`train: "resumeFrom" is a checkpoint's files, as onCheckpoint gets them; it has no "${CHECKPOINT_STATE}"`);
    const name = dataFileName(data, dataName);
    const options = { baseModelNameOrPath: this.#base.name, ...loraConfig, ...trainingArgs, adapterName };
    const prepared = (async () => {
      const bytes = await dataBytes(data, 'train: data');
      const val = validation == null ? null : await dataBytes(validation, 'train: validation');
      const full = options.method === 'full';
      const init = resumeFrom != null
        ? (full ? null : adapterFilesByName(resumeFrom, 'the checkpoint to resume'))
        : initFrom == null ? null : (await this.#adapterSource(initFrom)).files;
      const state = resumeFrom == null ? null : await toBytes(resumeFrom[CHECKPOINT_STATE], CHECKPOINT_STATE);
      if (signal?.aborted) throw new DOMException('training was aborted before it started', 'AbortError');
      return { args: [name, bytes, val, options, init, state] };
    })();
    let thrown = null;
    const deliver = (callback, value) => {
      if (thrown) return;
      try { callback?.(value); } catch (e) { thrown = { error: e }; call.cancel(); }
    };
    const call = this.#engine.callPrepared('train', prepared, (e) => {
      if (e.event === 'step') deliver(onStep, e.metrics);
      else if (e.event === 'eval') deliver(onEval, e);
      else if (e.event === 'memory') deliver(onMemory, { parameters: e.parameters, bytes: e.bytes, parts: e.parts });
      else if (e.event === 'checkpoint' && e.files.modelFiles) deliver(onCheckpoint, { step: e.step, ...Object.fromEntries(e.files.modelFiles), [CHECKPOINT_STATE]: e.files.state });
      else if (e.event === 'checkpoint') deliver(onCheckpoint, { step: e.step, [ADAPTER_CONFIG]: e.files.adapterConfig, [ADAPTER_WEIGHTS]: e.files.adapterWeights, [CHECKPOINT_STATE]: e.files.state });
    });
    const cancel = () => call.cancel();
    signal?.addEventListener('abort', cancel);
    try {
      const out = await call.catch((e) => { if (!thrown) throw e; });
      if (thrown) throw thrown.error;
      if (out.modelFiles) {
        this.#fineTuned = true;
        return { ...out.report, modelFiles: Object.fromEntries(out.modelFiles.map(([n, bytes]) => [n, new Blob([bytes])])) };
      }
      this.#summaries.set(adapterName, out.report.summary);
      this.#sources.delete(adapterName); // trained here: only a save can bring it back
      return out.report;
    } finally {
      signal?.removeEventListener('abort', cancel);
    }
  }

  /**
   * Evaluates the model as it is (the active adapter, merged adapters included; none while
   * disabled) on held-out `data` (JSONL text, a File, or an array of rows, as train() takes it):
   * {examples, tokens, meanLoss, perplexity, generation: {pairs, skipped, exactMatch, rougeL} | null}.
   * Exact match and ROUGE-L (rouge_score's, without stemming) score greedy answers of the rows
   * with a reference ({prompt, completion}, or messages ending with the assistant's); a prompt that
   * fills the model's context is skipped and counted. Options: dataName, maxNewTokens (default 64; 0 skips generation), batchSize, maxSeqLen.
   */
  async evaluate(data, { dataName, ...options } = {}) {
    if (data == null) throw new Error('evaluate: "data" is required (JSONL text, a File, or an array of rows)');
    const name = dataFileName(data, dataName);
    return this.#engine.callPrepared('evaluate', dataBytes(data, 'evaluate: data').then((bytes) => ({ args: [name, bytes, options] })));
  }

  /**
   * The adapter's PEFT files as Blobs: {"adapter_config.json", "adapter_model.safetensors"}.
   * With {asLora: true}, an OLoRA/PiSSA adapter as a plain LoRA of rank 2r that loads on the
   * unmodified base (PEFT's path_initial_model_for_weight_conversion). With {format: 'gguf'},
   * {"adapter.gguf"}: a llama.cpp LoRA adapter (llama.cpp's --lora, Ollama's ADAPTER, wllama).
   */
  async exportAdapter(name, { asLora = false, format = 'peft' } = {}) {
    if (format === 'gguf') return { 'adapter.gguf': new Blob([await this.#engine.call('exportAdapterGguf', [name])]) };
    if (format !== 'peft') throw new Error(`exportAdapter: format ${JSON.stringify(format)} is not "peft" or "gguf"`);
    const { config, weights } = await this.#engine.call('exportAdapter', [name, asLora]);
    return adapterBlobs(config, weights);
  }

  /**
   * Saves a loaded adapter in the AdapterStore (IndexedDB) under `as` (default: its name), with
   * this base model and its training summary. All or nothing. Resolves to the stored metadata.
   */
  async saveAdapter(name, { as, overwrite = false, store } = {}) {
    const { config, weights } = await this.#engine.call('exportAdapter', [name, false]);
    const s = await this.#store(store);
    const saved = await s.save({ name: as ?? name, config, weights, baseModel: this.#base, trainingSummary: this.#summaries.get(name) ?? null }, { overwrite });
    this.#sources.set(name, { source: as ?? name, options: { store } });
    return saved;
  }

  /**
   * The files of a Hugging Face model directory (config.json, model.safetensors, tokenizer
   * files, generation config) as Blobs: the base with merged adapters, and with `adapterName`
   * (default: the active adapter unless disabled or already merged) merged in on the way out;
   * the model itself is not changed. transformers and fromPretrained load the result; a
   * quantized base is dequantized (exactly) first. With {format: 'gguf'}, {"model.gguf"} for
   * llama.cpp, Ollama, LM Studio and wllama (a GGUF base's metadata is copied; a Hugging Face
   * base's is written from its config and tokenizer files as llama.cpp's converter writes it),
   * its matrices in `outType` ('auto': as the base stores them, a merged quantized
   * matrix requantized; or 'f32', 'f16', 'q8_0', 'q4_0', 'q4_1', 'q5_0').
   */
  async exportMerged({ adapterName, format = 'hf', outType = 'auto' } = {}) {
    // the worker resolves the default when the call runs (after the calls made before it)
    const merge = adapterName ?? null;
    if (format === 'gguf') return { 'model.gguf': new Blob([await this.#engine.call('exportMergedGguf', [merge, outType])]) };
    if (format !== 'hf') throw new Error(`exportMerged: format ${JSON.stringify(format)} is not "hf" or "gguf"`);
    const files = await this.#engine.call('exportMerged', [merge]);
    return Object.fromEntries(Object.entries(files).map(([n, bytes]) => [n, new Blob([bytes])]));
  }

  /** Stops the engine's worker; the model cannot be used afterwards. */
  dispose() {
    this.#engine.terminate();
    this.#defaultStore?.then((s) => s.close(), () => {});
  }
}
