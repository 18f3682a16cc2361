//! The wasm-bindgen edge: a JS class `Engine` over the core. It only translates: bytes in,
//! options through serde-wasm-bindgen, errors out as rejected promises carrying the core's message.
//! Long work returns a Promise; the engine is meant to live in a dedicated Web Worker.

use std::cell::RefCell;
use std::rc::Rc;

use burn::tensor::Device;
use js_sys::{Function, Promise, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::generate::{GenerationConfig, read_f32};
use crate::io::ModelFiles;
use crate::{Error, Llm};

fn js_error(e: Error) -> JsValue {
    JsError::new(&e.to_string()).into()
}

struct State {
    device: Device,
    pending: Option<ModelFiles>,
    llm: Option<Rc<Llm>>,
}

/// A model runtime on WebGPU. Create it once per worker: WebGPU is initialised once per page.
#[wasm_bindgen]
pub struct Engine {
    state: Rc<RefCell<State>>,
}

#[wasm_bindgen]
impl Engine {
    /// Initialises WebGPU and resolves to an Engine; rejects with what to do when WebGPU is missing.
    pub fn create() -> Promise {
        console_error_panic_hook::set_once();
        future_to_promise(async {
            let device = Device::wgpu_options().init_async().await.map_err(|e| {
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

    /// The weight files a model needs, given its `model.safetensors.index.json` text (or null).
    #[wasm_bindgen(js_name = weightFiles)]
    pub fn weight_files(index_json: Option<String>) -> Result<Vec<String>, JsValue> {
        ModelFiles::weight_file_names(index_json.as_deref().map(str::as_bytes)).map_err(js_error)
    }

    /// Builds the model from the added files; `on_progress(stage, done, total)` after each tensor.
    #[wasm_bindgen(js_name = loadModel)]
    pub fn load_model(&self, on_progress: Option<Function>) -> Result<(), JsValue> {
        let (files, device) = {
            let mut state = self.state.borrow_mut();
            let files = state.pending.take().ok_or_else(|| js_error(Error::invalid("no model files: call beginModel and addFile first")))?;
            (files, state.device.clone())
        };
        let llm = Llm::load(files, &device, &mut |stage, done, total| {
            if let Some(f) = &on_progress {
                let _ = f.call3(&JsValue::NULL, &stage.into(), &(done as u32).into(), &(total as u32).into());
            }
        })
        .map_err(js_error)?;
        self.state.borrow_mut().llm = Some(Rc::new(llm));
        Ok(())
    }

    fn llm(&self) -> Result<Rc<Llm>, JsValue> {
        self.state.borrow().llm.clone().ok_or_else(|| js_error(Error::invalid("no model is loaded: call loadModel first")))
    }

    /// The model's config.json as loaded.
    #[wasm_bindgen(js_name = modelConfig)]
    pub fn model_config(&self) -> Result<String, JsValue> {
        Ok(self.llm()?.model.config.to_json())
    }

    /// Prompt token ids: `chat` wraps the text as a user message in the chat template.
    #[wasm_bindgen(js_name = promptIds)]
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>, JsValue> {
        self.llm()?.prompt_ids(text, chat).map_err(js_error)
    }

    /// Generates after `prompt_ids`; `options` is a GenerationConfig in camelCase
    /// (maxNewTokens, temperature, topK, topP, repetitionPenalty, seed, stopTokenIds);
    /// `on_text(piece, tokenId)` gets each decoded piece and returns false to stop.
    /// Resolves to {tokens, text, stopReason}.
    pub fn generate(&self, prompt_ids: Vec<u32>, options: JsValue, on_text: Function) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            let config: GenerationConfig = if options.is_undefined() || options.is_null() {
                GenerationConfig::default()
            } else {
                serde_wasm_bindgen::from_value(options).map_err(|e| js_error(Error::invalid(format!("generation options: {e}"))))?
            };
            let (generation, text) = llm
                .generate_text(&prompt_ids, &config, &mut |piece| {
                    on_text.call1(&JsValue::NULL, &piece.into()).map(|r| r.as_bool() != Some(false)).unwrap_or(false)
                })
                .await
                .map_err(js_error)?;
            let result = js_sys::Object::new();
            let set = |k: &str, v: JsValue| js_sys::Reflect::set(&result, &k.into(), &v);
            set("tokens", serde_wasm_bindgen::to_value(&generation.tokens)?)?;
            set("text", text.into())?;
            set("stopReason", serde_wasm_bindgen::to_value(&generation.stop_reason)?)?;
            Ok(result.into())
        })
    }

    /// The logits [ids.length * vocab] (row-major) of one forward pass, as a Float32Array.
    pub fn logits(&self, ids: Vec<u32>) -> Promise {
        let llm = self.llm();
        future_to_promise(async move {
            let llm = llm?;
            llm.model.check_ids(&ids).map_err(js_error)?;
            let values = read_f32(llm.model.forward(llm.model.ids_tensor(&ids), None)).await.map_err(js_error)?;
            Ok(js_sys::Float32Array::from(values.as_slice()).into())
        })
    }
}
