// Types of the webgpu-lora package (lib/index.js). Everything the package hands out is camelCase
// (options, events, reports, stored metadata); file contents keep their own format's keys
// (config.json, adapter_config.json). tests/browser/types.test.mjs compares these declarations
// with the objects a real session emits, both ways.

/** Bytes in any of the forms the browser hands out. */
export type Bytes = ArrayBuffer | ArrayBufferView | Blob | string;

/** A model or adapter given as files, by file name. */
export type Files = Record<string, Bytes>;

/** PEFT adapter files. */
export interface AdapterFiles {
  'adapter_config.json': Blob;
  'adapter_model.safetensors': Blob;
}

export type LoadProgress =
  | { stage: 'download'; file: string; loaded: number; total: number; fileLoaded: number; fileTotal: number; cached: boolean }
  | { stage: 'upload'; done: number; total: number };

export interface FromPretrainedOptions {
  /**
   * How the base model's matrices are kept on the GPU, always computed with in f32: "auto"
   * (default: as the file stores them, a GGUF's quantized blocks stay quantized, safetensors load
   * as f32), "f32", "f16" (half the memory; merging into an f16 base rounds to f16, as PEFT's merge
   * does), or "q8_0" | "q4_0" | "q4_1" | "q5_0": the decoder layers' linear weights quantized on
   * load with llama.cpp's rounding (transformers' load_in_8bit / load_in_4bit role); embeddings and
   * norms stay as loaded. Adapters are always f32.
   */
  dtype?: 'auto' | 'f32' | 'f16' | 'q8_0' | 'q4_0' | 'q4_1' | 'q5_0';
  onProgress?: (event: LoadProgress) => void;
  /** Keep downloaded files in the Cache API and reuse them while the server reports the same size (default true). */
  cache?: boolean;
  /** The base model's name, recorded with saved adapters (default: from the URL or config). */
  name?: string;
  /** Where the engine's worker script is (default: worker.js next to this module). */
  workerUrl?: string | URL;
  /** For a hub id: the branch, tag or commit (default "main"). */
  revision?: string;
  /** For a hub id: one file of the repository to load, e.g. "model.Q4_1.gguf" (default: the directory). */
  file?: string;
}

/** Where hub ids resolve: `${remoteHost}ORG/NAME/resolve/REVISION/` (default https://huggingface.co/). */
export const env: { remoteHost: string };

/** Whether this browser can run the engine; if not, a message saying what is missing and what to use. */
export function webgpuStatus(): Promise<{ available: true } | { available: false; message: string }>;

/** A base model's identity: stored adapters remember it and refuse another base. */
export interface BaseModel {
  name: string;
  shapes: BaseShapes | null;
}

/** The config.json values an adapter's shapes depend on. */
export interface BaseShapes {
  hiddenSize: number; intermediateSize: number; numHiddenLayers: number; numAttentionHeads: number; numKeyValueHeads: number; vocabSize: number;
}

export interface ChatMessage { role: 'system' | 'user' | 'assistant' | string; content: string }

export interface GenerateOptions {
  /** Wrap a text prompt as a user message in the chat template (default true). */
  chat?: boolean;
  maxNewTokens?: number;
  /** 0 (default) is greedy. */
  temperature?: number;
  topP?: number;
  topK?: number;
  repetitionPenalty?: number;
  seed?: number;
  /** Generation ends where any of these strings appears; the text stops before it. */
  stop?: string[];
  stopTokenIds?: number[];
  /** Aborting ends the stream after the current token. */
  signal?: AbortSignal;
}

export interface GenerationResult {
  tokens: number[];
  text: string;
  stopReason: 'stopToken' | 'maxNewTokens' | 'cancelled' | 'contextFull' | 'stopString';
  promptIds: number[];
}

export interface TextStream extends AsyncGenerator<string, void, undefined> {
  /** Resolves when generation ends. */
  result: Promise<GenerationResult>;
}

export interface LoraConfigOptions {
  r?: number;
  loraAlpha?: number;
  loraDropout?: number;
  /** Module names, or ["all-linear"]. */
  targetModules?: string[];
  initLoraWeights?: 'default' | 'gaussian' | 'olora' | 'pissa';
  useRslora?: boolean;
  /** Recorded in adapter_config.json (default: the loaded base model's name). */
  baseModelNameOrPath?: string;
}

/** The CLI's training flags in camelCase; transformers' names (learningRate, numTrainEpochs, ...) also work. */
export interface TrainingArgs {
  /**
   * "sft" (default): supervised fine-tuning on text. "dpo": preference tuning on JSONL pairs of
   * {prompt, chosen, rejected} (text), against the model without the adapter, as TRL's DPOTrainer;
   * needs loraDropout 0. The step's metrics then carry DPO's rewards and its loss. "full": every
   * weight of the model trained on text (an f32 model with no adapter loaded; no loraConfig); the
   * model changes in place and the report carries `modelFiles`.
   */
  method?: 'sft' | 'dpo' | 'full';
  /** DPO's beta (default 0.1): how strongly the adapter is held near the model without it. */
  beta?: number;
  lr?: number; learningRate?: number;
  maxSteps?: number;
  epochs?: number; numTrainEpochs?: number;
  batchSize?: number; perDeviceTrainBatchSize?: number;
  gradAccum?: number; gradientAccumulationSteps?: number;
  warmupSteps?: number;
  schedule?: 'cosine' | 'linear' | 'constant'; lrSchedulerType?: 'cosine' | 'linear' | 'constant';
  weightDecay?: number;
  adamBeta1?: number;
  adamBeta2?: number;
  adamEpsilon?: number;
  maxGradNorm?: number;
  maxSeqLen?: number;
  seed?: number;
  /** Shuffle the examples every epoch (default true); false keeps the data's order. */
  shuffle?: boolean;
  evalEvery?: number; evalSteps?: number;
  patience?: number; earlyStoppingPatience?: number;
  checkpointEvery?: number; saveSteps?: number;
  valSplit?: number;
  packing?: boolean;
  trainOnEverything?: boolean;
  truncate?: boolean;
  skipBadLines?: boolean;
  /** Keep only each layer's input and run the layer again for its gradient: far less memory, ~1/3 more compute. */
  gradientCheckpointing?: boolean;
  /** Full fine-tuning: refuse a run whose memory estimate is above this many MB. */
  memoryLimitMb?: number;
}

/** Full fine-tuning's memory estimate, before the first step. */
export interface MemoryEstimate {
  parameters: number;
  bytes: number;
  parts: { what: string; bytes: number }[];
}

/** One optimizer step. */
export interface StepMetrics {
  step: number; totalSteps: number; epoch: number; loss: number; lr: number;
  /** Before clipping. */
  gradNorm: number;
  tokensPerS: number; elapsedS: number; etaS: number;
  /** DPO only: TRL's rewards/chosen, /rejected, /accuracies, /margins (means over the step's pairs). */
  rewards?: { chosen: number; rejected: number; accuracies: number; margins: number };
}

/** One evaluation on the validation set (step 0 is before training). */
export interface EvalEvent { event: 'eval'; step: number; valLoss: number; best: boolean }

export interface TrainingSummary {
  steps: number; tokens: number; finalLoss: number | null; bestValLoss: number | null; bestStep: number | null;
  elapsedS: number; end: 'completed' | 'earlyStopped' | 'cancelled';
}

/** What reading a data file did. */
export interface DataReport {
  examples: number;
  /** [line, problem] of lines skipped with skipBadLines. */
  skipped: [number, string][];
  truncated: number; tokens: number; trainableTokens: number;
}

export interface TrainReport {
  summary: TrainingSummary; trainData: DataReport; valData: DataReport | null;
  /** Full fine-tuning only: the trained model as a Hugging Face directory (f32), as fromPretrained takes it. */
  modelFiles?: Record<string, Blob>;
}

/** model.evaluate(): the model as it is on held-out data. */
export interface Evaluation {
  examples: number;
  /** The tokens the loss counts (completions and assistant turns; every token of plain text). */
  tokens: number;
  meanLoss: number;
  /** exp(meanLoss). */
  perplexity: number;
  /** Over the rows with a reference; null when there are none or maxNewTokens is 0. */
  generation: GenerationScores | null;
}

export interface GenerationScores {
  pairs: number;
  /** Pairs whose prompt fills the model's context: not scored. */
  skipped: number;
  exactMatch: number;
  rougeL: number;
}

export interface EvaluateOptions {
  /** Decides the format: ".jsonl" (default "data.jsonl") or plain text. */
  dataName?: string;
  /** The longest greedy answer (default 64); 0 skips exact match and ROUGE-L. */
  maxNewTokens?: number;
  batchSize?: number;
  maxSeqLen?: number;
}

/** An adapter's checkpoint; a full fine-tuning run's holds the model's files ("model.safetensors", "config.json", the tokenizer's) instead of the adapter's. */
export interface CheckpointFiles {
  step: number; 'adapter_config.json'?: string; 'adapter_model.safetensors'?: Uint8Array; 'trainer_state.safetensors': Uint8Array;
  [file: string]: string | number | Uint8Array | undefined;
}

export type TrainData = string | Bytes | object[];

export interface TrainOptions {
  data: TrainData;
  validation?: TrainData;
  /** Decides the format: ".jsonl" (default "data.jsonl") or plain text. */
  dataName?: string;
  adapterName?: string;
  loraConfig?: LoraConfigOptions;
  trainingArgs?: TrainingArgs;
  /**
   * An adapter to train further instead of a new one, as loadAdapter takes it (a stored name, a
   * URL, or its PEFT files): its adapter_config.json sets r, alpha, targets...; a loraConfig that
   * says otherwise is refused.
   */
  initFrom?: string | Files | FileList | File[];
  /** A checkpoint's files, as onCheckpoint got them: the run resumes where it was taken (give the same data and trainingArgs). */
  resumeFrom?: CheckpointFiles;
  /** A callback that throws stops the run; train() rejects with its error. */
  onStep?: (metrics: StepMetrics) => void;
  onEval?: (event: EvalEvent) => void;
  onCheckpoint?: (files: CheckpointFiles) => void;
  /** Full fine-tuning: its memory estimate, before the first step. */
  onMemory?: (estimate: MemoryEstimate) => void;
  /** Stops after the current step (the adapter so far is kept); aborted before the run starts, train() rejects and nothing is trained. */
  signal?: AbortSignal;
}

export interface StoredAdapter {
  name: string;
  baseModel: BaseModel | { name: string | null; shapes: null };
  r: number;
  loraAlpha: number;
  targetModules: string[] | string;
  initLoraWeights: boolean | string;
  /** Bytes of the adapter's files. */
  size: number;
  /** Milliseconds since the epoch. */
  created: number;
  updated: number;
  trainingSummary: TrainingSummary | null;
}

export class AdapterStore {
  static open(options?: { name?: string }): Promise<AdapterStore>;
  list(): Promise<StoredAdapter[]>;
  get(name: string): Promise<(StoredAdapter & { config: string; weights: Uint8Array }) | null>;
  save(adapter: { name: string; config: string; weights: Bytes; baseModel?: BaseModel; trainingSummary?: TrainingSummary | null }, options?: { overwrite?: boolean }): Promise<StoredAdapter>;
  delete(name: string): Promise<void>;
  rename(from: string, to: string): Promise<void>;
  import(files: Files | FileList | File[], options?: { name?: string; overwrite?: boolean }): Promise<StoredAdapter>;
  export(name: string): Promise<AdapterFiles>;
  usage(): Promise<{ adapters: number; bytes: number; usage: number | null; quota: number | null }>;
  /** Keeps a training run's latest checkpoint (onCheckpoint's files) under `name`, replacing the one before atomically; `job` is kept beside it. Saves land in the order they were asked for. */
  saveCheckpoint(name: string, files: CheckpointFiles, job?: unknown): Promise<void>;
  /** The checkpoint kept under `name`, its files as train({resumeFrom}) takes them, or null. */
  getCheckpoint(name: string): Promise<{ name: string; step: number; job: unknown; updated: number; files: CheckpointFiles } | null>;
  listCheckpoints(): Promise<{ name: string; step: number; job: unknown; updated: number }[]>;
  deleteCheckpoint(name: string): Promise<void>;
  /** Another page of this origin (or another AdapterStore object) changed the store; returns a function that stops listening. */
  onChange(listener: (change: { change: 'save' | 'delete' | 'rename'; name: string; to?: string }) => void): () => void;
  /** Whether the browser keeps this origin's storage under pressure; the first save asks for it. null where the browser cannot say. */
  persisted(): Promise<boolean | null>;
  close(): void;
}

export class LoraModel {
  /** `source`: a URL (directory ending in "/", or a .gguf file), a hub id "ORG/NAME", a GGUF File/Blob, or a directory's files. */
  static fromPretrained(source: string | Blob | Files, options?: FromPretrainedOptions): Promise<LoraModel>;
  readonly config: Record<string, unknown> & { vocab_size: number; hidden_size: number; num_hidden_layers: number };
  readonly hasChatTemplate: boolean;
  readonly baseModel: BaseModel;
  readonly activeAdapter: string | null;
  readonly disabled: boolean;
  readonly mergedAdapters: string[];
  adapters(): string[];
  adapterConfig(name: string): Record<string, unknown> | null;
  loadAdapter(source: string | Files | FileList | File[], name?: string, options?: { store?: AdapterStore; allowOtherBase?: boolean }): Promise<void>;
  setAdapter(name: string): Promise<void>;
  disableAdapter(): Promise<void>;
  enableAdapter(): Promise<void>;
  deleteAdapter(name: string): Promise<void>;
  unload(): Promise<void>;
  mergeAdapter(names?: string[], options?: { safeMerge?: boolean }): Promise<{ merged: string[]; skipped: string[] }>;
  unmergeAdapter(): Promise<void>;
  mergeAndUnload(options?: { adapterNames?: string[]; safeMerge?: boolean }): Promise<{ merged: string[]; skipped: string[] }>;
  addWeightedAdapter(names: string[], weights: number[], newName: string, combination?: 'svd' | 'linear' | 'cat', options?: { svdRank?: number }): Promise<void>;
  /** Bytes the weights (base and adapters) occupy on the GPU, as transformers' get_memory_footprint. */
  getMemoryFootprint(): Promise<number>;
  trainableParameters(): Promise<{ trainable: number; all: number }>;
  loraParameterCount(loraConfig: LoraConfigOptions): Promise<{ trainable: number; all: number }>;
  logits(ids: Int32Array | Uint32Array | number[]): Promise<{ data: Float32Array; dims: [number, number] }>;
  generate(prompt: string | ChatMessage[], options?: GenerateOptions): TextStream;
  train(options: TrainOptions): Promise<TrainReport>;
  /** Loss, perplexity, exact match and ROUGE-L of the model as it is (the active adapter) on held-out data. */
  evaluate(data: TrainData, options?: EvaluateOptions): Promise<Evaluation>;
  saveAdapter(name: string, options?: { as?: string; overwrite?: boolean; store?: AdapterStore }): Promise<StoredAdapter>;
  /** After a crash, running out of memory, a lost GPU or an ended worker: a new engine with the base and every adapter that came from a URL, files or the store; what could not come back is listed. */
  recover(options?: { onProgress?: (event: LoadProgress) => void }): Promise<{ restored: string[]; lost: string[]; mergedAway: string[]; fineTunedAway: boolean }>;
  /** Destroys the engine's GPU device, as a driver reset would: for testing a page's recovery. */
  destroyDevice(): Promise<void>;
  /** {asLora: true}: an OLoRA/PiSSA adapter as a plain LoRA of rank 2r for the unmodified base. */
  exportAdapter(name: string, options?: { asLora?: boolean; format?: 'peft' }): Promise<AdapterFiles>;
  /** {format: 'gguf'}: a llama.cpp GGUF LoRA adapter. */
  exportAdapter(name: string, options: { format: 'gguf' }): Promise<{ 'adapter.gguf': Blob }>;
  /** A Hugging Face directory's files. */
  exportMerged(options?: { adapterName?: string; format?: 'hf' }): Promise<Record<string, Blob>>;
  /** {format: 'gguf'}: one GGUF (metadata as llama.cpp's converter writes it, or a GGUF base's as stored), its matrices in `outType` (default 'auto': as the base stores them). */
  exportMerged(options: { adapterName?: string; format: 'gguf'; outType?: 'auto' | 'f32' | 'f16' | 'q8_0' | 'q4_0' | 'q4_1' | 'q5_0' }): Promise<{ 'model.gguf': Blob }>;
  dispose(): void;
}
