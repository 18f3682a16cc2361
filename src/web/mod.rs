//! The wasm-bindgen edge: a JS class `Engine` over the core. It only translates: bytes in,
//! options through serde-wasm-bindgen, errors out as rejected promises carrying the core's message.
//! Long work returns a Promise; the engine is meant to live in a dedicated Web Worker.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::Device;
use js_sys::{Function, Promise, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::evaluate::{EvalOptions, evaluate};
use crate::generate::GenerationConfig;
use crate::io::{ChatMessage, ModelFiles};
use crate::lora::{AdapterFiles, AdapterSource, Combination, LoraModel};
use crate::nn::WeightDtype;
use crate::train::trainer::TrainedFiles;
use crate::train::{Control, Method, TrainEvent, TrainOptions, TrainStart, fine_tune};
use crate::{Error, Llm};

unsafe extern "C" {
    /// The static constructors, synthesized by wasm-ld.
    fn __wasm_call_ctors();
}

/// Runs the static constructors once, when the module starts (cubecl registers its IR through
/// the `inventory` crate, which needs them on wasm). Calling them explicitly also stops wasm-ld
/// from wrapping exports (malloc and free among them) in a call of every constructor, which cost
/// ~0.3 ms per call from JS.
#[wasm_bindgen(start)]
fn start() {
    // SAFETY: called once, before any other export runs.
    unsafe { __wasm_call_ctors() }
    std::panic::set_hook(Box::new(|info| {
        console_error_panic_hook::hook(info);
        report_panic(&info.to_string());
    }));
    crate::error::show_warnings(|w| web_sys::console::warn_1(&w.into()));
}

#[wasm_bindgen]
extern "C" {
    /// Hands a panic's message to the worker: a panic aborts the wasm instance, and JS would
    /// otherwise only see "unreachable executed".
    #[wasm_bindgen(js_namespace = globalThis, js_name = __webgpuLoraPanic)]
    fn report_panic(message: &str);
}

/// The allocator, recording the size of a request it could not meet: running out of WebAssembly
/// memory aborts the instance ("unreachable"), and the worker reads the size here
/// ([`failed_allocation`]) to say that the engine ran out of memory rather than crashed.
struct CountingAllocator;

static FAILED_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

impl CountingAllocator {
    fn record(ptr: *mut u8, bytes: usize) -> *mut u8 {
        if ptr.is_null() {
            FAILED_ALLOCATION.store(bytes, Ordering::Relaxed);
        }
        ptr
    }
}

// SAFETY: every call is System's, unchanged; a null result is only recorded.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::record(unsafe { System.alloc(layout) }, layout.size())
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::record(unsafe { System.alloc_zeroed(layout) }, layout.size())
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::record(unsafe { System.realloc(ptr, layout, new_size) }, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The bytes of the last allocation the engine's memory could not provide (0: none failed).
/// Safe to call after the instance aborted: it only reads a number.
#[wasm_bindgen(js_name = failedAllocation)]
pub fn failed_allocation() -> f64 {
    FAILED_ALLOCATION.load(Ordering::Relaxed) as f64
}

fn js_error(e: Error) -> JsValue {
    JsError::new(&e.to_string()).into()
}

struct State {
    device: Device,
    pending: Option<ModelFiles>,
    llm: Option<Rc<RefCell<Llm>>>,
}

/// Options from JS: through serde_json, so that unknown keys (typos) are refused by name;
/// serde-wasm-bindgen reads only the fields a struct has.
fn parse_options<T: serde::de::DeserializeOwned + Default>(value: JsValue, what: &str) -> Result<T, JsValue> {
    if value.is_undefined() || value.is_null() {
        return Ok(T::default());
    }
    let bad = |e: &dyn std::fmt::Display| js_error(Error::invalid(format!("{what}: {e}")));
    let json: serde_json::Value = serde_wasm_bindgen::from_value(value).map_err(|e| bad(&e))?;
    serde_json::from_value(json).map_err(|e| bad(&e))
}

/// A plain JS object from (key, value) pairs.
fn object(entries: Vec<(&str, JsValue)>) -> Result<JsValue, JsValue> {
    let out = js_sys::Object::new();
    for (key, value) in entries {
        js_sys::Reflect::set(&out, &key.into(), &value)?;
    }
    Ok(out.into())
}

/// A (trainable, all) parameter count as [trainable, all] for JS.
fn counts((trainable, all): (usize, usize)) -> Vec<f64> {
    vec![trainable as f64, all as f64]
}

fn busy() -> JsValue {
    js_error(Error::invalid("the model is busy with another operation (training or generating): wait for it to finish or cancel it"))
}

/// A model runtime on WebGPU. Create it once per worker: WebGPU is initialised once per page.
#[wasm_bindgen]
pub struct Engine {
    state: Rc<RefCell<State>>,
}

/// Dispatches encoded before the queue is submitted without a read-back forcing it: more than a
/// decoded token or a training step of the models here has.
const TASKS_PER_SUBMISSION: usize = 16_384;

#[wasm_bindgen]
impl Engine {
    /// Initialises WebGPU and resolves to an Engine; rejects with what to do when WebGPU is missing.
    /// `max_buffer_bytes`: the adapter's min(maxStorageBufferBindingSize, maxBufferSize), which
    /// loading checks every matrix against (0: unknown).
    pub fn create(max_buffer_bytes: f64) -> Promise {
        crate::nn::weight::set_max_buffer_bytes(max_buffer_bytes as usize);
        future_to_promise(async {
            // cubecl submits every `tasks_max` dispatches (32 by default: ~56 submissions per decoded
            // token); a read-back submits anyway, so a decoded token or a training step goes out
            // in as few submissions as it has reads
            let device = Device::wgpu_options().tasks_max(TASKS_PER_SUBMISSION).init_async().await.map_err(|e| {
                js_error(Error::Backend(format!(
                    "WebGPU is not available ({e}): use a browser with WebGPU enabled (Chrome/Edge 113+, or Chromium with --enable-unsafe-webgpu)"
                )))
            })?;
            let state = State { device, pending: None, llm: None };
            Ok(Engine { state: Rc::new(RefCell::new(state)) }.into())
        })
    }

    /// Starts collecting the files of a model; `origin` (its URL) is shown in error messages.
    #[wasm_bindgen(js_name = beginModel)]
    pub fn begin_model(&self, origin: &str) {
        self.state.borrow_mut().pending = Some(ModelFiles::new(origin));
    }

    /// Adds one file (config.json, model.safetensors, a shard, tokenizer.json, ...).
    #[wasm_bindgen(js_name = addFile)]
    pub fn add_file(&self, name: &str, bytes: &Uint8Array) -> Result<(), JsValue> {
        let mut state = self.state.borrow_mut();
        let files = state.pending.as_mut().ok_or_else(|| js_error(Error::invalid("call beginModel before addFile")))?;
        files.insert(name, bytes.to_vec());
        Ok(())
    }

    /// The file names of a Hugging Face model directory, as JSON: {config, weights, index,
    /// optional: [...]} (what the worker downloads).
    #[wasm_bindgen(js_name = modelLayout)]
    pub fn model_layout() -> String {
        ModelFiles::layout().to_string()
    }

    /// The weight files a model needs, given its `model.safetensors.index.json` text (or null).
    #[wasm_bindgen(js_name = weightFiles)]
    pub fn weight_files(index_json: Option<String>) -> Result<Vec<String>, JsValue> {
        ModelFiles::weight_file_names(index_json.as_deref().map(str::as_bytes)).map_err(js_error)
    }

    /// Checks PEFT adapter files as far as they can be without a base model (the config, the
    /// safetensors structure, LoRA keys); `origin` labels errors. Returns adapter_config.json's
    /// text. Needs no WebGPU.
    #[wasm_bindgen(js_name = checkAdapterFiles)]
    pub fn check_adapter_files(config: &Uint8Array, weights: &Uint8Array, origin: &str) -> Result<String, JsValue> {
        let files = AdapterFiles { config_json: String::from_utf8_lossy(&config.to_vec()).into_owned(), safetensors: weights.to_vec() };
        let contents = AdapterSource::from_files(files, origin).read().map_err(js_error)?;
        Ok(contents.config.to_json())
    }

    /// Checks a weight dtype name ("auto", "f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0") before anything is downloaded.
    #[wasm_bindgen(js_name = checkDtype)]
    pub fn check_dtype(dtype: &str) -> Result<(), JsValue> {
        WeightDtype::parse(dtype).map(|_| ()).map_err(js_error)
    }

    /// Builds the model from the added files, its matrices stored in `dtype` (see `check_dtype`);
    /// `on_progress(stage, done, total)` after each tensor.
    #[wasm_bindgen(js_name = loadModel)]
    pub fn load_model(&self, on_progress: Option<Function>, dtype: &str) -> Result<(), JsValue> {
        let dtype = WeightDtype::parse(dtype).map_err(js_error)?;
        let (files, device) = {
            let mut state = self.state.borrow_mut();
            let files =
                state.pending.take().ok_or_else(|| js_error(Error::invalid("no model files: call beginModel and addFile first")))?;
            (files, state.device.clone())
        };
        let llm = Llm::load(files, dtype, &device, &mut |stage, done, total| {
            if let Some(f) = &on_progress {
                let _ = f.call3(&JsValue::NULL, &stage.into(), &(done as u32).into(), &(total as u32).into());
            }
        })
        .map_err(js_error)?;
        self.state.borrow_mut().llm = Some(Rc::new(RefCell::new(llm)));
        Ok(())
    }

    fn llm(&self) -> Result<Rc<RefCell<Llm>>, JsValue> {
        self.state.borrow().llm.clone().ok_or_else(|| js_error(Error::invalid("no model is loaded: call loadModel first")))
    }

    /// Runs a quick look at the model, refused while a long change (training) holds it.
    fn read<T>(&self, f: impl FnOnce(&Llm) -> crate::Result<T>) -> Result<T, JsValue> {
        let llm = self.llm()?;
        let llm = llm.try_borrow().map_err(|_| busy())?;
        f(&llm).map_err(js_error)
    }

    /// Runs a quick change of the model, refused while a long operation holds it.
    fn change<T>(&self, f: impl FnOnce(&mut Llm) -> crate::Result<T>) -> Result<T, JsValue> {
        let llm = self.llm()?;
        let mut llm = llm.try_borrow_mut().map_err(|_| busy())?;
        f(&mut llm).map_err(js_error)
    }

    /// Runs a change of the model that may read from the device (a quantized base is
    /// requantized, an OLoRA/PiSSA init decomposes the base) as a promise; refused while a long
    /// operation holds the model.
    fn change_async(&self, f: impl AsyncFnOnce(&mut Llm) -> crate::Result<()> + 'static) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let mut llm = llm.try_borrow_mut().map_err(|_| busy())?;
            f(&mut llm).await.map_err(js_error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The adapters as JSON: {names, active, disabled, merged}.
    #[wasm_bindgen(js_name = adapterState)]
    pub fn adapter_state(&self) -> Result<String, JsValue> {
        self.read(|llm| {
            let m = &llm.model;
            Ok(serde_json::json!({"names": m.adapter_names(), "active": m.active_adapter(), "disabled": m.adapters_disabled(), "merged": m.merged_adapters()}).to_string())
        })
    }

    /// A loaded adapter's adapter_config.json.
    #[wasm_bindgen(js_name = adapterConfig)]
    pub fn adapter_config(&self, name: &str) -> Result<String, JsValue> {
        self.read(|llm| {
            llm.model.adapter_config(name).map(|c| c.to_json()).ok_or_else(|| Error::invalid(format!("no adapter named {name:?}")))
        })
    }

    /// Loads PEFT files as adapter `name` (not activated, as in PEFT); `origin` labels errors.
    #[wasm_bindgen(js_name = loadAdapter)]
    pub fn load_adapter(&self, name: String, config: Uint8Array, weights: Uint8Array, origin: String) -> Promise {
        let source = adapter_source(&config, &weights, &origin);
        self.change_async(async move |llm| llm.model.load_adapter(&name, source).await)
    }

    #[wasm_bindgen(js_name = setAdapter)]
    pub fn set_adapter(&self, name: &str) -> Result<(), JsValue> {
        self.change(|llm| llm.model.set_adapter(name))
    }

    #[wasm_bindgen(js_name = disableAdapter)]
    pub fn disable_adapter(&self) -> Promise {
        self.change_async(async |llm| llm.model.disable_adapter().await)
    }

    #[wasm_bindgen(js_name = enableAdapter)]
    pub fn enable_adapter(&self) -> Result<(), JsValue> {
        self.change(|llm| Ok(llm.model.enable_adapter()))
    }

    /// Promises, like every change of the base weights: a quantized base is requantized.
    #[wasm_bindgen(js_name = deleteAdapter)]
    pub fn delete_adapter(&self, name: String) -> Promise {
        self.change_async(async move |llm| llm.model.delete_adapter(&name).await)
    }

    pub fn unload(&self) -> Promise {
        self.change_async(async |llm| llm.model.unload().await)
    }

    #[wasm_bindgen(js_name = unmergeAdapter)]
    pub fn unmerge_adapter(&self) -> Promise {
        self.change_async(async |llm| llm.model.unmerge_adapter().await)
    }

    /// Merges `names` (empty: the active adapter) into the base weights. Resolves to
    /// {merged, skipped}.
    #[wasm_bindgen(js_name = mergeAdapter)]
    pub fn merge_adapter(&self, names: Vec<String>, safe_merge: bool) -> Promise {
        self.merge(names, safe_merge, false)
    }

    /// Merges `names` (empty: the active adapter), then drops every adapter. Resolves to
    /// {merged, skipped}.
    #[wasm_bindgen(js_name = mergeAndUnload)]
    pub fn merge_and_unload(&self, names: Vec<String>, safe_merge: bool) -> Promise {
        self.merge(names, safe_merge, true)
    }

    fn merge(&self, names: Vec<String>, safe_merge: bool, and_unload: bool) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let mut llm = llm.try_borrow_mut().map_err(|_| busy())?;
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let model = &mut llm.model;
            let report =
                if and_unload { model.merge_and_unload(&names, safe_merge).await } else { model.merge_adapter(&names, safe_merge).await };
            let report = report.map_err(js_error)?;
            object(vec![
                ("merged", serde_wasm_bindgen::to_value(&report.merged)?),
                ("skipped", serde_wasm_bindgen::to_value(&report.skipped)?),
            ])
        })
    }

    /// PEFT's add_weighted_adapter; `combination` is "svd" (default), "linear" or "cat".
    #[wasm_bindgen(js_name = addWeightedAdapter)]
    pub fn add_weighted_adapter(
        &self,
        names: Vec<String>,
        weights: Vec<f64>,
        new_name: String,
        combination: Option<String>,
        svd_rank: Option<usize>,
    ) -> Promise {
        self.change_async(async move |llm| {
            let combination = match Combination::parse(combination.as_deref().unwrap_or("svd"))? {
                Combination::Svd { .. } => Combination::Svd { rank: svd_rank },
                other => other,
            };
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            llm.model.add_weighted_adapter(&names, &weights, &new_name, combination).await
        })
    }

    /// Bytes the model's weights (base and adapters) occupy on the device, as transformers'
    /// get_memory_footprint.
    #[wasm_bindgen(js_name = getMemoryFootprint)]
    pub fn get_memory_footprint(&self) -> Result<f64, JsValue> {
        self.read(|llm| Ok(llm.model.memory_footprint() as f64))
    }

    /// [trainable, all] parameter counts, as PEFT's get_nb_trainable_parameters.
    #[wasm_bindgen(js_name = trainableParameters)]
    pub fn trainable_parameters(&self) -> Result<Vec<f64>, JsValue> {
        self.read(|llm| Ok(counts(llm.model.trainable_parameters())))
    }

    /// [trainable, all] for a new adapter with these LoRA settings (TrainOptions' camelCase keys:
    /// r, loraAlpha, targetModules, useRslora, ...), without adding it.
    #[wasm_bindgen(js_name = loraParameterCount)]
    pub fn lora_parameter_count(&self, options: JsValue) -> Result<Vec<f64>, JsValue> {
        let options: TrainOptions = parse_options(options, "LoRA settings")?;
        let lora = options.lora_config().map_err(js_error)?;
        self.read(|llm| llm.model.count_new_adapter(&lora).map(counts))
    }

    /// Adapter `name` as PEFT files; with `as_lora`, an OLoRA/PiSSA adapter as the plain LoRA of
    /// rank 2r for the original base. Resolves to {config: string, weights: Uint8Array}.
    #[wasm_bindgen(js_name = exportAdapter)]
    pub fn export_adapter(&self, name: String, as_lora: bool) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let llm = llm.try_borrow().map_err(|_| busy())?;
            let files = if as_lora { llm.model.export_adapter_as_lora(&name).await } else { llm.model.export_adapter(&name).await };
            adapter_files(files.map_err(js_error)?)
        })
    }

    /// The model as a Hugging Face directory ({file name: Uint8Array}), with adapter `merge`
    /// folded in (the model itself is not changed).
    #[wasm_bindgen(js_name = exportMerged)]
    pub fn export_merged(&self, merge: Option<String>) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let llm = llm.try_borrow().map_err(|_| busy())?;
            let files = llm.merged_files(merge.as_deref()).await.map_err(js_error)?;
            object(files.iter().map(|(name, bytes)| (name.as_str(), Uint8Array::from(bytes.as_slice()).into())).collect())
        })
    }

    /// Adapter `name` as a llama.cpp GGUF LoRA adapter (Uint8Array).
    #[wasm_bindgen(js_name = exportAdapterGguf)]
    pub fn export_adapter_gguf(&self, name: String) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let llm = llm.try_borrow().map_err(|_| busy())?;
            let bytes = llm.adapter_gguf(&name).await.map_err(js_error)?;
            Ok(Uint8Array::from(bytes.as_slice()).into())
        })
    }

    /// The model as a GGUF (Uint8Array), with adapter `merge` folded in (the model itself is not
    /// changed); `out_type` ("auto", "f32", "f16", "q8_0", ...) is its matrices' type.
    #[wasm_bindgen(js_name = exportMergedGguf)]
    pub fn export_merged_gguf(&self, merge: Option<String>, out_type: String) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let llm = llm.try_borrow().map_err(|_| busy())?;
            let out = WeightDtype::parse(&out_type).map_err(js_error)?;
            let bytes = llm.merged_gguf(merge.as_deref(), out).await.map_err(js_error)?;
            Ok(Uint8Array::from(bytes.as_slice()).into())
        })
    }

    /// The model's config.json as loaded.
    #[wasm_bindgen(js_name = modelConfig)]
    pub fn model_config(&self) -> Result<String, JsValue> {
        self.read(|llm| Ok(llm.model.config.to_json()))
    }

    /// Whether the model's tokenizer has a chat template (what `chat` prompts need).
    #[wasm_bindgen(js_name = hasChatTemplate)]
    pub fn has_chat_template(&self) -> Result<bool, JsValue> {
        self.read(|llm| Ok(llm.tokenizer.as_ref().is_some_and(|t| t.has_chat_template())))
    }

    /// Prompt token ids: `chat` wraps the text as a user message in the chat template.
    #[wasm_bindgen(js_name = promptIds)]
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>, JsValue> {
        self.read(|llm| llm.prompt_ids(text, chat))
    }

    /// Prompt ids for a conversation ([{role, content}, ...]) rendered with the chat template.
    #[wasm_bindgen(js_name = chatIds)]
    pub fn chat_ids(&self, messages: JsValue) -> Result<Vec<u32>, JsValue> {
        let messages: Vec<ChatMessage> = serde_wasm_bindgen::from_value(messages)
            .map_err(|e| js_error(Error::invalid(format!("messages must be [{{role, content}}, ...] with string values: {e}"))))?;
        self.read(|llm| llm.chat_ids(&messages))
    }

    /// Generates after `prompt_ids`; `options` is a GenerationConfig in camelCase
    /// (maxNewTokens, temperature, topK, topP, repetitionPenalty, seed, stopTokenIds, stop);
    /// `on_text(piece)` gets each decoded piece and returns false to stop.
    /// Resolves to {tokens, text, stopReason}.
    pub fn generate(&self, prompt_ids: Vec<u32>, options: JsValue, on_text: Function) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let llm = llm.try_borrow().map_err(|_| busy())?;
            let config: GenerationConfig = parse_options(options, "generation options")?;
            let (generation, text) = llm
                .generate_text(&prompt_ids, &config, &mut |piece| {
                    on_text.call1(&JsValue::NULL, &piece.into()).map(|r| r.as_bool() != Some(false)).unwrap_or(false)
                })
                .await
                .map_err(js_error)?;
            object(vec![
                ("tokens", serde_wasm_bindgen::to_value(&generation.tokens)?),
                ("text", text.into()),
                ("stopReason", serde_wasm_bindgen::to_value(&generation.stop_reason)?),
            ])
        })
    }

    /// The logits [ids.length * vocab] (row-major) of one forward pass, as a Float32Array.
    pub fn logits(&self, ids: Vec<u32>) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let llm = llm.try_borrow().map_err(|_| busy())?;
            let values = llm.model.logits(&ids).await.map_err(js_error)?;
            Ok(js_sys::Float32Array::from(values.as_slice()).into())
        })
    }

    /// Evaluates the model as it is on `data` (see `evaluate::evaluate`; `data_name` decides the
    /// format); `options`: EvalOptions in camelCase. Resolves to the Evaluation as JSON text.
    pub fn evaluate(&self, data_name: String, data: Uint8Array, options: JsValue) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let llm = llm.try_borrow().map_err(|_| busy())?;
            let options: EvalOptions = parse_options(options, "evaluation options")?;
            let evaluation = evaluate(&llm, &data_name, &data.to_vec(), &options).await.map_err(js_error)?;
            Ok(serde_json::to_string(&evaluation).expect("serializable").into())
        })
    }

    /// Fine-tunes a new LoRA adapter (see `train::fine_tune`). `options` are TrainOptions in
    /// camelCase; `data_name` decides the format (`.jsonl` or plain text) and labels errors.
    /// `on_event(json, files)` gets every step / eval / checkpoint as JSON text (a checkpoint also
    /// gets {adapterConfig, adapterWeights, state}); returning false cancels, and an exception
    /// stops the run and rejects with it. Resolves to {report, adapterConfig, adapterWeights} and
    /// leaves the adapter loaded and active. `init_from`: the PEFT files {config, weights, origin}
    /// of an adapter to train further instead of a new one; with `resume_state` (a checkpoint's
    /// trainer_state.safetensors) they are a checkpoint's adapter, and the run resumes there.
    #[allow(clippy::too_many_arguments)]
    pub fn train(
        &self,
        data_name: String,
        data: Uint8Array,
        val: Option<Uint8Array>,
        options: JsValue,
        init_from: Option<js_sys::Object>,
        resume_state: Option<Uint8Array>,
        on_event: Function,
    ) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let mut llm = llm.try_borrow_mut().map_err(|_| busy())?;
            let options: TrainOptions = parse_options(options, "training options")?;
            let start = match (init_from, resume_state) {
                (None, None) => TrainStart::New,
                // full fine-tuning resumes the model this was loaded from, a checkpoint's directory
                (None, Some(state)) if options.method == Method::Full => TrainStart::ResumeModel(state.to_vec()),
                (None, Some(_)) => {
                    return Err(js_error(Error::invalid("a trainer state to resume from needs its checkpoint's adapter files")));
                }
                (Some(files), state) => {
                    let get = |key: &str| js_sys::Reflect::get(&files, &key.into());
                    let origin = get("origin")?.as_string().unwrap_or_else(|| "the given files".into());
                    let adapter = adapter_source(&Uint8Array::new(&get("config")?), &Uint8Array::new(&get("weights")?), &origin);
                    match state {
                        Some(state) => TrainStart::Resume(adapter, state.to_vec()),
                        None => TrainStart::From(adapter),
                    }
                }
            };
            let (data, val) = (data.to_vec(), val.map(|v| v.to_vec()));
            let clock = || js_sys::Date::now() / 1000.0;
            let mut thrown: Option<JsValue> = None;
            let mut on_event = |event: TrainEvent| {
                let json = event.to_json().to_string();
                let files = match event {
                    TrainEvent::Checkpoint { files, state, .. } => {
                        let mut fields = trained_files(*files);
                        fields.push(("state", Uint8Array::from(state.as_slice()).into()));
                        object(fields)
                    }
                    _ => Ok(JsValue::UNDEFINED),
                };
                match files.and_then(|files| on_event.call2(&JsValue::NULL, &json.into(), &files)) {
                    Ok(v) if v.as_bool() == Some(false) => Control::Stop,
                    Ok(_) => Control::Continue,
                    Err(e) => {
                        thrown = Some(e);
                        Control::Stop
                    }
                }
            };
            // the validation data is in the training data's format
            let val_name = if data_name.ends_with(".jsonl") { "validation.jsonl" } else { "validation.txt" };
            let val_file = val.as_deref().map(|v| (val_name, v));
            let result = fine_tune(&mut llm, &options, (&data_name, &data), val_file, start, &clock, &mut on_event).await;
            if let Some(e) = thrown {
                return Err(e);
            }
            let (report, files) = result.map_err(js_error)?;
            let mut fields = vec![("report", report.to_json().into())];
            fields.extend(trained_files(files));
            object(fields)
        })
    }
}

/// A run's files for JS: an adapter's {adapterConfig, adapterWeights}, or a fully fine-tuned
/// model's {modelFiles: [[name, bytes], ...]} (a Hugging Face directory).
fn trained_files(files: TrainedFiles) -> Vec<(&'static str, JsValue)> {
    match files {
        TrainedFiles::Adapter(files) => {
            vec![("adapterConfig", files.config_json.into()), ("adapterWeights", Uint8Array::from(files.safetensors.as_slice()).into())]
        }
        TrainedFiles::Model(files) => {
            let list = js_sys::Array::new();
            for (name, bytes) in files {
                list.push(&js_sys::Array::of2(&name.into(), &Uint8Array::from(bytes.as_slice())));
            }
            vec![("modelFiles", list.into())]
        }
    }
}

/// An adapter's PEFT files from JS bytes; `origin` labels errors.
fn adapter_source(config: &Uint8Array, weights: &Uint8Array, origin: &str) -> AdapterSource {
    let files = AdapterFiles { config_json: String::from_utf8_lossy(&config.to_vec()).into_owned(), safetensors: weights.to_vec() };
    AdapterSource::from_files(files, origin)
}

/// PEFT files for JS: {config: string, weights: Uint8Array}.
fn adapter_files(files: AdapterFiles) -> Result<JsValue, JsValue> {
    object(vec![("config", files.config_json.into()), ("weights", Uint8Array::from(files.safetensors.as_slice()).into())])
}
