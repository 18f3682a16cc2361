// A promise-based proxy to the engine in its Web Worker. Every call returns a promise; progress
// and streamed text arrive through the optional `onEvent` callback.
export class EngineClient {
  constructor(workerUrl = new URL('./worker.js', import.meta.url)) {
    this.worker = new Worker(workerUrl, { type: 'module' });
    this.pending = new Map();
    this.nextId = 1;
    this.worker.onmessage = ({ data: { id, event, result, error } }) => {
      const call = this.pending.get(id);
      if (!call) return;
      if (event !== undefined) return call.onEvent?.(event);
      this.pending.delete(id);
      if (error !== undefined) call.reject(new Error(error));
      else call.resolve(result);
    };
    this.worker.onerror = (e) => {
      for (const call of this.pending.values()) call.reject(new Error(`engine worker failed: ${e.message}`));
      this.pending.clear();
    };
  }

  call(op, args = [], onEvent) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onEvent });
      this.worker.postMessage({ id, op, args });
    });
  }

  /** Loads a Hugging Face model directory served at `baseUrl`; resolves to its config. */
  load(baseUrl, onProgress) { return this.call('load', [baseUrl], onProgress); }

  /** Generates after `prompt` ({chat, maxNewTokens, temperature, topK, topP, repetitionPenalty, seed}). */
  generate(prompt, options, onPiece) {
    return this.call('generate', [prompt, options], (e) => onPiece?.(e.piece));
  }

  /** Stops a running generation after its current token. */
  cancel() { return this.call('cancel'); }

  /** Logits of one forward pass over `ids`, flat [ids.length * vocab]. */
  logits(ids) { return this.call('logits', [ids]); }

  /**
   * Fine-tunes a LoRA adapter on `data` (text of a .jsonl or plain text file named `dataName`),
   * with `val` (same format) or options.valSplit for validation. `options` as the CLI's flags in
   * camelCase (r, loraAlpha, targetModules, lr, maxSteps, batchSize, evalEvery, ...). `onEvent`
   * gets {event: "step", metrics}, {event: "eval", step, val_loss} and checkpoints. Resolves to
   * {report, adapterConfig, adapterWeights}; `cancel()` stops after the current step.
   */
  train(dataName, data, val, options, onEvent) {
    return this.call('train', [dataName, data, val, options], onEvent);
  }
}
