//! `Llm`: a loaded base model with its tokenizer: what the CLI and the browser drive.

use burn::tensor::Device;

use crate::error::{Error, Result};
use crate::generate::{Generation, GenerationConfig, StopReason, StopText, generate};
use crate::io::gguf::RawMetadata;
use crate::io::gguf_convert::{GgufArchitecture, TensorType, write_model_gguf};
use crate::io::gguf_metadata::model_metadata;
use crate::io::model_files::TEXT_FILES;
use crate::io::{ChatMessage, ModelFiles, StoreDtype, TextTokenizer};
use crate::lora::{AdapterSource, LoraInit, LoraModel};
use crate::model::LlamaModel;
use crate::nn::WeightDtype;

/// PEFT's name for an adapter loaded without one.
pub const DEFAULT_ADAPTER: &str = "default";

/// A model ready to run.
pub struct Llm {
    pub model: LlamaModel,
    /// `None` for a model directory without tokenizer files (token ids only).
    pub tokenizer: Option<TextTokenizer>,
    /// The directory's tokenizer, chat template and generation config, as loaded: a merged model
    /// is written out with them.
    pub text_files: Vec<(String, Vec<u8>)>,
    /// A GGUF model's metadata as stored (tokenizer and chat template included): a GGUF of the
    /// merged model copies it.
    pub gguf_metadata: Option<RawMetadata>,
}

/// Stages of loading reported to a progress callback: (stage, done, total).
pub const STAGE_WEIGHTS: &str = "weights";

impl Llm {
    /// Loads from the files of a Hugging Face model directory or a GGUF file, the base model's
    /// matrices stored in `dtype` (computed with in f32 either way).
    pub fn load(files: ModelFiles, dtype: WeightDtype, device: &Device, progress: &mut dyn FnMut(&str, usize, usize)) -> Result<Self> {
        let mut files = files.expand_gguf()?;
        let config = files.config()?;
        let tokenizer = files.tokenizer()?;
        let weights = files.take_weights()?;
        let model = LlamaModel::load(config, &weights, dtype, device, &mut |done, total| progress(STAGE_WEIGHTS, done, total))?;
        let text_files = TEXT_FILES.iter().filter_map(|&name| files.get(name).map(|b| (name.to_string(), b.to_vec()))).collect();
        Ok(Llm { model, tokenizer, text_files, gguf_metadata: files.gguf_metadata.take() })
    }

    /// PEFT's `PeftModel.from_pretrained(base, adapter)`: the base (in f32) with the adapter
    /// loaded as "default" and active.
    pub async fn from_pretrained(
        base: ModelFiles,
        adapter: AdapterSource,
        device: &Device,
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<Self> {
        let mut llm = Self::load(base, WeightDtype::F32, device, progress)?;
        llm.model.load_adapter(DEFAULT_ADAPTER, adapter).await?;
        llm.model.set_adapter(DEFAULT_ADAPTER)?;
        Ok(llm)
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::invalid("this model has no tokenizer.json: give token ids instead of text"))
    }

    /// Prompt ids for `text`: rendered with the chat template as one user message when `chat`.
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        if chat { self.chat_ids(&[ChatMessage::new("user", text)]) } else { self.tokenizer()?.encode(text, true) }
    }

    /// Prompt ids for a conversation, rendered with the chat template and its generation prompt.
    pub fn chat_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.tokenizer()?.encode_chat(messages, true)
    }

    /// The files of a Hugging Face directory of this model as it is now (merged adapters
    /// included), with `merge` (an adapter's name) folded in as merge_and_unload would, without
    /// changing the model: config.json, model.safetensors in the config's dtype, and the
    /// tokenizer, chat template and generation config it was loaded with. transformers and
    /// [`Llm::load`] both load it.
    pub async fn merged_files(&self, merge: Option<&str>) -> Result<Vec<(String, Vec<u8>)>> {
        self.check_merge(merge)?;
        let config = &self.model.config;
        let dtype = config
            .raw
            .get("torch_dtype")
            .or_else(|| config.raw.get("dtype"))
            .and_then(|v| v.as_str())
            .map_or(Ok(StoreDtype::F32), StoreDtype::parse)?;
        let mut files = self.model.hf_files(merge, dtype).await?;
        files.extend(self.text_files.iter().cloned());
        Ok(files)
    }

    /// A GGUF of this model as it is now, with `merge` (an adapter's name) folded in as
    /// merge_and_unload would, without changing the model: for llama.cpp, Ollama, LM Studio and
    /// wllama. Metadata (tokenizer and chat template included) is the base GGUF's as stored, or
    /// for a base loaded from a Hugging Face directory what llama.cpp's converter writes from its
    /// files ([`model_metadata`]). Every matrix is written in `out` (`Auto`: the type it has
    /// here, a merged quantized matrix requantized to it; a k-quant, which is not written here, as
    /// [`crate::io::quant::QuantType::requantized_as`]; f32 and f16: the dequantized values plus
    /// the update, exactly, then rounded to f16 for f16).
    pub async fn merged_gguf(&self, merge: Option<&str>, out: WeightDtype) -> Result<Vec<u8>> {
        self.check_merge(merge)?;
        let c = &self.model.config;
        // llama.cpp's LlamaFileType of a file mostly in the chosen type; as the base's otherwise
        let file_type = |dtype: WeightDtype| match dtype {
            WeightDtype::F32 | WeightDtype::Auto => 0,
            WeightDtype::F16 => 1,
            WeightDtype::Quant(kind) => kind.llama_file_type(),
        };
        let from_files;
        let metadata = match &self.gguf_metadata {
            Some(metadata) => metadata,
            None => {
                let base = self.model.matrix("model.layers.0.self_attn.q_proj.weight").map_or(WeightDtype::F32, |w| w.dtype());
                let dtype = if out == WeightDtype::Auto { base } else { out };
                from_files = model_metadata(c, self.tokenizer.as_ref(), &self.text_files, file_type(dtype))?;
                &from_files
            }
        };
        let tensor_type = |dtype: WeightDtype| match dtype {
            WeightDtype::F16 => TensorType::F16,
            WeightDtype::Quant(kind) => TensorType::Quant(kind),
            WeightDtype::F32 | WeightDtype::Auto => TensorType::F32,
        };
        // into quantized matrices requantized as merge_and_unload would; into f32/f16 exactly
        let quantized = matches!(out, WeightDtype::Auto | WeightDtype::Quant(_));
        let mut tensors = Vec::new();
        for (name, t) in self.model.hf_weights(merge, quantized).await? {
            let dtype = match out {
                WeightDtype::Auto => self.model.matrix(&name).map_or(WeightDtype::F32, |w| w.dtype()),
                chosen => chosen,
            };
            tensors.push((name, t, tensor_type(dtype)));
        }
        let file_type = (out != WeightDtype::Auto).then(|| file_type(out));
        write_model_gguf(c, metadata, file_type, tensors)
    }

    /// Adapter `name` as a GGUF LoRA in llama.cpp's adapter format (see
    /// [`crate::lora::AdapterContents::to_gguf`]); an OLoRA/PiSSA adapter as the plain LoRA of the original
    /// base that it amounts to ([`LoraModel::export_adapter_as_lora`]), since llama.cpp applies
    /// adapters to the weights as loaded.
    pub async fn adapter_gguf(&self, name: &str) -> Result<Vec<u8>> {
        let config = self.model.known_adapter(name)?;
        let arch = GgufArchitecture::of(&self.model.config)?;
        let files = if matches!(config.init_lora_weights, LoraInit::Olora | LoraInit::Pissa) {
            self.model.export_adapter_as_lora(name).await?
        } else {
            self.model.export_adapter(name).await?
        };
        let contents = AdapterSource::from_files(files, name).read()?;
        let c = &self.model.config;
        contents.to_gguf(arch, c.num_attention_heads, c.num_key_value_heads)
    }

    fn check_merge(&self, merge: Option<&str>) -> Result<()> {
        if let Some(name) = merge.filter(|name| self.model.adapter_config(name).is_none()) {
            return Err(Error::invalid(format!("no adapter named {name:?} to merge (loaded: {:?})", self.model.adapter_names())));
        }
        Ok(())
    }

    /// Generates after `prompt`, streaming decoded text to `on_text`; it returns false to stop.
    /// The tokenizer's end-of-turn token (`eos_token` of tokenizer_config.json) also stops, and so
    /// does any of `config.stop` (the text ends before it).
    pub async fn generate_text(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(Generation, String)> {
        let tokenizer = self.tokenizer()?;
        let mut config = config.clone();
        config.stop_token_ids.extend(tokenizer.eos_token_id());
        let mut decoder = tokenizer.stream_decoder();
        let mut stop = StopText::new(&config.stop);
        let mut text = String::new();
        let mut failure = None;
        let mut stopped = false;
        let mut emit = |piece: &str, text: &mut String| {
            text.push_str(piece);
            piece.is_empty() || on_text(piece)
        };
        let mut generation = generate(&self.model, prompt, &config, &mut |id| match decoder.push(id) {
            Ok(Some(piece)) => {
                let (out, hit) = stop.push(&piece);
                stopped = hit;
                emit(&out, &mut text) && !hit
            }
            Ok(None) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        })
        .await?;
        if let Some(e) = failure {
            return Err(e);
        }
        if stopped {
            generation.stop_reason = StopReason::StopString;
        } else {
            emit(&stop.finish(), &mut text);
        }
        Ok((generation, text))
    }
}
