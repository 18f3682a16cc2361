// AdapterStore: PEFT adapters kept in the browser's IndexedDB, so they survive reloads.
//
// Database "webgpu-lora", two object stores keyed by adapter name: "adapters" (what list() shows:
// the base model, adapter_config.json, sizes, dates, the training summary) and "weights" (the
// adapter_model.safetensors bytes), so listing never reads weights. Every change is one readwrite
// transaction with durability "strict": a save is all or nothing, and once it resolves it
// survives a crash. Metadata keys are camelCase (records written before that are read the same).
import init, { Engine } from './pkg/webgpu_lora.js';

// 2: training checkpoints (the adapters' stores are unchanged)
const DB_VERSION = 2;
const META = 'adapters';
const WEIGHTS = 'weights';
const CHECKPOINTS = 'checkpoints';
export const ADAPTER_CONFIG = 'adapter_config.json';
export const ADAPTER_WEIGHTS = 'adapter_model.safetensors';
/** A checkpoint's trainer state (optimizer moments, step, data position), as the CLI writes it. */
export const CHECKPOINT_STATE = 'trainer_state.safetensors';

const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;
const request = (r) => new Promise((ok, fail) => { r.onsuccess = () => ok(r.result); r.onerror = () => fail(r.error); });

/** The bytes of an ArrayBuffer, typed array, Blob/File or string. */
export async function toBytes(x, what) {
  if (x instanceof ArrayBuffer) return new Uint8Array(x);
  if (ArrayBuffer.isView(x)) return new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
  if (typeof Blob !== 'undefined' && x instanceof Blob) return new Uint8Array(await x.arrayBuffer());
  if (typeof x === 'string') return new TextEncoder().encode(x);
  throw new Error(`${what}: expected an ArrayBuffer, typed array, Blob or string, got ${x === null ? 'null' : typeof x}`);
}

/** PEFT files as Blobs: {"adapter_config.json", "adapter_model.safetensors"}. */
export function adapterBlobs(config, weights) {
  return {
    [ADAPTER_CONFIG]: new Blob([config], { type: 'application/json' }),
    [ADAPTER_WEIGHTS]: new Blob([weights], { type: 'application/octet-stream' }),
  };
}

/**
 * PEFT files given as {name: bytes}, a Map, a FileList or File[]: the two files by name, or an
 * error saying which is missing.
 */
export function adapterFilesByName(files, origin) {
  const byName = files instanceof Map ? Object.fromEntries(files) : Array.isArray(files) || (typeof FileList !== 'undefined' && files instanceof FileList)
    ? Object.fromEntries(Array.from(files, (f) => [f.name, f])) : files ?? {};
  const missing = [ADAPTER_CONFIG, ADAPTER_WEIGHTS].filter((n) => byName[n] == null);
  if (missing.length) throw new Error(`${origin}: ${missing.join(' and ')} missing; a PEFT adapter is ${ADAPTER_CONFIG} + ${ADAPTER_WEIGHTS} (got: ${Object.keys(byName).join(', ') || 'nothing'})`);
  return { [ADAPTER_CONFIG]: byName[ADAPTER_CONFIG], [ADAPTER_WEIGHTS]: byName[ADAPTER_WEIGHTS] };
}

// The engine's wasm module on this thread, for the checks that need no model and no GPU (the
// worker has its own instance). Loaded on first use.
let core = null;
function engineCore() {
  globalThis.__webgpuLoraPanic ??= () => { core = null; }; // a panic poisons the instance: load it again next time
  core ??= init({ module_or_path: new URL('./pkg/webgpu_lora_bg.wasm', import.meta.url) }).then(() => Engine, (e) => {
    core = null;
    throw new Error(`cannot load the webgpu-lora engine to check adapter files (${e.message}): is the package served with its pkg/ folder?`);
  });
  return core;
}

/**
 * Checks PEFT files before they are stored, with the engine's own checks (the config, the
 * safetensors structure, LoRA keys; shapes are checked against a model when it loads them).
 * Returns {configText, weights (Uint8Array)}.
 */
export async function checkAdapterFiles(files, origin) {
  const byName = adapterFilesByName(files, origin);
  const config = await toBytes(byName[ADAPTER_CONFIG], `${origin}/${ADAPTER_CONFIG}`);
  const weights = await toBytes(byName[ADAPTER_WEIGHTS], `${origin}/${ADAPTER_WEIGHTS}`);
  const configText = (await engineCore()).checkAdapterFiles(config, weights, origin);
  return { configText, weights };
}

const camel = (key) => key.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase());
/** An object with its keys (at every depth) in camelCase. */
const camelKeys = (x) => (x && typeof x === 'object' && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).map(([k, v]) => [camel(k), camelKeys(v)])) : x);

/** A base model's identity: its name and the shapes (from config.json) an adapter depends on. */
export function baseIdentity(name, config) {
  const shapes = {};
  for (const k of ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'vocab_size']) shapes[camel(k)] = config[k];
  return { name, shapes };
}

/** A stored record as this version names things (older records used config.json's snake_case). */
const current = (record) => record && { ...record, baseModel: camelKeys(record.baseModel), trainingSummary: camelKeys(record.trainingSummary) };

const shortName = (name) => String(name ?? '').replace(/\/+$/, '').split('/').pop().toLowerCase();

/** Refuses an adapter saved for another base model (other shapes, or another model's name). */
export function checkSameBase(record, base) {
  const saved = record.baseModel;
  if (!saved?.shapes) return;
  const differ = Object.keys(saved.shapes).filter((k) => saved.shapes[k] !== base.shapes[k]);
  if (differ.length || (saved.name && base.name && shortName(saved.name) !== shortName(base.name))) {
    const configKey = (k) => k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`); // as config.json names it
    const detail = differ.length ? differ.map((k) => `${configKey(k)} ${saved.shapes[k]} vs ${base.shapes[k]}`).join(', ') : 'another model name';
    throw new Error(`adapter "${record.name}" was made for base model "${saved.name}" but the loaded model is "${base.name}" (${detail}): load ${saved.name} first, or pass {allowOtherBase: true} if the two really are the same model`);
  }
}

export class AdapterStore {
  /** Opens (and on first use creates) the database. */
  static async open({ name = 'webgpu-lora' } = {}) {
    if (typeof indexedDB === 'undefined') throw new Error('IndexedDB is not available here (a private window or an old browser?): adapters cannot be stored');
    const open = indexedDB.open(name, DB_VERSION);
    open.onupgradeneeded = () => {
      const db = open.result;
      if (!db.objectStoreNames.contains(META)) db.createObjectStore(META, { keyPath: 'name' });
      if (!db.objectStoreNames.contains(WEIGHTS)) db.createObjectStore(WEIGHTS);
      if (!db.objectStoreNames.contains(CHECKPOINTS)) db.createObjectStore(CHECKPOINTS, { keyPath: 'name' });
    };
    const db = await new Promise((ok, fail) => {
      open.onsuccess = () => ok(open.result);
      open.onerror = () => fail(new Error(`cannot open the adapter database "${name}": ${open.error?.message}`));
      open.onblocked = () => fail(new Error(`the adapter database "${name}" is being upgraded in another tab: close the other tabs of this site and try again`));
    });
    return new AdapterStore(db, name);
  }

  #channel;
  #persistence = null;
  // checkpoint saves, one after another in the order they were asked for: a slow one (a large
  // Blob to read) must not land after, and over, a later step's
  #checkpointSaves = Promise.resolve();

  constructor(db, name = db.name) {
    this.db = db;
    // another tab upgrading the schema must not be blocked by this one
    db.onversionchange = () => db.close();
    // the other pages (and other AdapterStore objects) of this origin hear of every change
    this.#channel = typeof BroadcastChannel === 'undefined' ? null : new BroadcastChannel(`webgpu-lora-store:${name}`);
  }

  close() {
    this.db.close();
    this.#channel?.close();
  }

  /**
   * Calls `listener({change, name, to?})` ('save', 'delete' or 'rename') after another page of
   * this origin (or another AdapterStore object) changed the store; returns a function that
   * stops it. This object's own changes are not reported to it.
   */
  onChange(listener) {
    const handler = ({ data }) => listener(data);
    this.#channel?.addEventListener('message', handler);
    return () => this.#channel?.removeEventListener('message', handler);
  }

  #changed(change) {
    this.#channel?.postMessage(change);
  }

  /**
   * Whether the browser keeps this origin's storage under pressure (navigator.storage.persisted()):
   * true, false, or null where the browser cannot say. The first save asks for it
   * (navigator.storage.persist()); a browser may refuse, as headless ones do.
   */
  async persisted() {
    return (await navigator.storage?.persisted?.().catch(() => null)) ?? null;
  }

  #askToPersist() {
    this.#persistence ??= navigator.storage?.persist?.().catch(() => false) ?? Promise.resolve(false);
    return this.#persistence;
  }

  /** Runs `body(stores)` in one transaction; resolves with its result once the transaction is durable. */
  async #transaction(mode, body, stores = [META, WEIGHTS]) {
    const tx = this.db.transaction(stores, mode, { durability: 'strict' });
    const done = new Promise((ok, fail) => {
      tx.oncomplete = ok;
      tx.onabort = () => fail(tx.error ?? new DOMException('the transaction was aborted', 'AbortError'));
      tx.onerror = (e) => e.preventDefault(); // reported by onabort
    });
    let result;
    try {
      result = await body(Object.fromEntries(stores.map((s) => [s === META ? 'meta' : s, tx.objectStore(s)])));
    } catch (e) {
      try { tx.abort(); } catch { /* already finished */ }
      await done.catch(() => {});
      throw e;
    }
    await done;
    return result;
  }

  /** Every adapter's metadata (no weights), oldest first. */
  async list() {
    const all = await this.#transaction('readonly', ({ meta }) => request(meta.getAll()));
    return all.sort((a, b) => a.created - b.created).map(({ config, ...m }) => current(m));
  }

  /** One adapter's metadata plus its files ({config: text, weights: Uint8Array}), or null. */
  async get(name) {
    return this.#transaction('readonly', async ({ meta, weights }) => {
      const [record, bytes] = await Promise.all([request(meta.get(name)), request(weights.get(name))]);
      return record ? { ...current(record), weights: new Uint8Array(bytes) } : null;
    });
  }

  /**
   * Saves an adapter: {name, config (adapter_config.json text), weights (safetensors bytes),
   * baseModel, trainingSummary}. Replaces one of the same name only with {overwrite: true}.
   * All or nothing: on any failure (a full quota included) nothing is written.
   */
  async save({ name, config, weights, baseModel = null, trainingSummary = null }, { overwrite = false } = {}) {
    if (typeof name !== 'string' || !name.trim()) throw new Error('an adapter needs a non-empty name');
    const bytes = await toBytes(weights, `adapter "${name}" weights`);
    const parsed = JSON.parse(config);
    const now = Date.now();
    const record = {
      name,
      baseModel: baseModel ?? { name: parsed.base_model_name_or_path ?? null, shapes: null },
      config,
      r: parsed.r,
      loraAlpha: parsed.lora_alpha,
      targetModules: parsed.target_modules,
      initLoraWeights: parsed.init_lora_weights,
      size: bytes.byteLength + config.length,
      created: now,
      updated: now,
      trainingSummary,
    };
    try {
      await this.#transaction('readwrite', async ({ meta, weights: store }) => {
        const old = await request(meta.get(name));
        if (old && !overwrite) throw new Error(`an adapter named "${name}" is already stored: choose another name, delete it first, or save with {overwrite: true}`);
        if (old) record.created = old.created;
        meta.put(record);
        // a copy the transaction owns: the caller may reuse or transfer its buffer
        store.put(bytes.slice().buffer, name);
      });
      this.#changed({ change: 'save', name });
      await this.#askToPersist();
    } catch (e) {
      if (e?.name !== 'QuotaExceededError') throw e;
      const { usage = 0, quota = 0 } = (await navigator.storage?.estimate?.()) ?? {};
      throw new Error(`cannot save adapter "${name}" (${mb(record.size)}): the browser's storage quota is full (${mb(usage)} used of ${mb(quota)}). Nothing was written; delete adapters you no longer need (AdapterStore.delete) and try again`);
    }
    const { config: _, ...meta } = record;
    return meta;
  }

  /** Deletes an adapter; rejects if there is none of that name. */
  async delete(name) {
    await this.#transaction('readwrite', async ({ meta, weights }) => {
      if (!(await request(meta.get(name)))) throw new Error(`no stored adapter named "${name}"`);
      meta.delete(name);
      weights.delete(name);
    });
    this.#changed({ change: 'delete', name });
  }

  /** Renames an adapter in one transaction. */
  async rename(from, to) {
    if (typeof to !== 'string' || !to.trim()) throw new Error('the new name must be a non-empty string');
    await this.#transaction('readwrite', async ({ meta, weights }) => {
      const [record, bytes, taken] = await Promise.all([request(meta.get(from)), request(weights.get(from)), request(meta.get(to))]);
      if (!record) throw new Error(`no stored adapter named "${from}"`);
      if (taken) throw new Error(`an adapter named "${to}" is already stored: choose another name`);
      meta.delete(from);
      weights.delete(from);
      meta.put({ ...record, name: to, updated: Date.now() });
      weights.put(bytes, to);
    });
    this.#changed({ change: 'rename', name: from, to });
  }

  /**
   * Stores PEFT files ({"adapter_config.json", "adapter_model.safetensors"} as Blobs/Files/
   * ArrayBuffers, or a FileList / File[] with those names) under `name` (default: the next free
   * "imported-N"). Checked before anything is written.
   */
  async import(files, { name, overwrite = false } = {}) {
    const { configText, weights } = await checkAdapterFiles(files, 'imported adapter');
    if (name === undefined) {
      const taken = new Set((await this.list()).map((a) => a.name));
      let i = 1;
      while (taken.has(`imported-${i}`)) i++;
      name = `imported-${i}`;
    }
    return this.save({ name, config: configText, weights }, { overwrite });
  }

  /** An adapter's PEFT files as Blobs: {"adapter_config.json", "adapter_model.safetensors"}. */
  async export(name) {
    const record = await this.get(name);
    if (!record) throw new Error(`no stored adapter named "${name}"`);
    return adapterBlobs(record.config, record.weights);
  }

  /**
   * Keeps a training run's latest checkpoint under `name` (the files an onCheckpoint callback got,
   * with its `step`), replacing the one before in one transaction: a failure (a full quota
   * included) leaves the previous checkpoint as it was. `job`: whatever the page needs to start
   * the run again (its data's name, trainingArgs...), kept beside it. Saves through one store land
   * in the order they were asked for, so the last one asked for is the one kept.
   */
  saveCheckpoint(name, files, job = null) {
    const save = this.#checkpointSaves.then(() => this.#saveCheckpoint(name, files, job));
    this.#checkpointSaves = save.catch(() => {});
    return save;
  }

  async #saveCheckpoint(name, files, job) {
    const record = {
      name,
      step: files.step,
      job,
      config: await toBytes(files[ADAPTER_CONFIG], ADAPTER_CONFIG).then((b) => new TextDecoder().decode(b)),
      weights: (await toBytes(files[ADAPTER_WEIGHTS], ADAPTER_WEIGHTS)).slice().buffer,
      state: (await toBytes(files[CHECKPOINT_STATE], CHECKPOINT_STATE)).slice().buffer,
      updated: Date.now(),
    };
    try {
      await this.#transaction('readwrite', ({ checkpoints }) => { checkpoints.put(record); }, [CHECKPOINTS]);
    } catch (e) {
      if (e?.name !== 'QuotaExceededError') throw e;
      throw new Error(`cannot keep the checkpoint of "${name}" at step ${record.step}: the browser's storage quota is full; the checkpoint before it is kept`);
    }
  }

  /** The checkpoint kept under `name`: {name, step, job, updated, files} (files as train({resumeFrom}) takes them), or null. */
  async getCheckpoint(name) {
    const record = await this.#transaction('readonly', ({ checkpoints }) => request(checkpoints.get(name)), [CHECKPOINTS]);
    if (!record) return null;
    const { config, weights, state, ...meta } = record;
    return { ...meta, files: { step: record.step, [ADAPTER_CONFIG]: config, [ADAPTER_WEIGHTS]: new Uint8Array(weights), [CHECKPOINT_STATE]: new Uint8Array(state) } };
  }

  /** The names, steps and jobs of the kept checkpoints (no files). */
  async listCheckpoints() {
    const all = await this.#transaction('readonly', ({ checkpoints }) => request(checkpoints.getAll()), [CHECKPOINTS]);
    return all.map(({ name, step, job, updated }) => ({ name, step, job, updated }));
  }

  /** Deletes the checkpoint kept under `name` (nothing if there is none). */
  async deleteCheckpoint(name) {
    await this.#transaction('readwrite', ({ checkpoints }) => { checkpoints.delete(name); }, [CHECKPOINTS]);
  }

  /** {adapters, bytes} stored here, and the origin's {usage, quota} as the browser estimates them. */
  async usage() {
    const all = await this.list();
    const { usage = null, quota = null } = (await navigator.storage?.estimate?.()) ?? {};
    return { adapters: all.length, bytes: all.reduce((s, a) => s + a.size, 0), usage, quota };
  }
}
