//! `Llm`: a loaded base model with its tokenizer: what the CLI and the browser drive.

use burn::tensor::Device;

use crate::error::{Error, Result};
use crate::generate::{Generation, GenerationConfig, generate};
use crate::io::{ChatMessage, ModelFiles, TextTokenizer};
use crate::model::LlamaModel;
use crate::peft::AdapterSource;

/// PEFT's name for an adapter loaded without one.
pub const DEFAULT_ADAPTER: &str = "default";

/// A model ready to run.
pub struct Llm {
    pub model: LlamaModel,
    /// `None` for a model directory without tokenizer files (token ids only).
    pub tokenizer: Option<TextTokenizer>,
}

/// Stages of loading reported to a progress callback: (stage, done, total).
pub const STAGE_WEIGHTS: &str = "weights";

impl Llm {
    /// Loads from the files of a Hugging Face model directory.
    pub fn load(mut files: ModelFiles, device: &Device, progress: &mut dyn FnMut(&str, usize, usize)) -> Result<Self> {
        let config = files.config()?;
        let tokenizer = files.tokenizer()?;
        let weights = files.take_weights()?;
        let model = LlamaModel::load(config, &weights, device, &mut |done, total| progress(STAGE_WEIGHTS, done, total))?;
        Ok(Llm { model, tokenizer })
    }

    /// PEFT's `PeftModel.from_pretrained(base, adapter)`: the base with the adapter loaded as
    /// "default" and active.
    pub async fn from_pretrained(
        base: ModelFiles,
        adapter: AdapterSource,
        device: &Device,
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<Self> {
        let mut llm = Self::load(base, device, progress)?;
        llm.model.load_adapter(DEFAULT_ADAPTER, adapter).await?;
        llm.model.set_adapter(DEFAULT_ADAPTER)?;
        Ok(llm)
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::invalid("this model has no tokenizer.json: give token ids instead of text"))
    }

    /// Prompt ids for `text`: rendered with the chat template as one user message when `chat`.
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        let tokenizer = self.tokenizer()?;
        if chat {
            tokenizer.encode_chat(&[ChatMessage::new("user", text)], true)
        } else {
            tokenizer.encode(text, true)
        }
    }

    /// Generates after `prompt`, streaming decoded text to `on_text`; it returns false to stop.
    /// The tokenizer's end-of-turn token (`eos_token` of tokenizer_config.json) also stops.
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
        let mut text = String::new();
        let mut failure = None;
        let generation = generate(&self.model, prompt, &config, &mut |id| match decoder.push(id) {
            Ok(Some(piece)) => {
                text.push_str(&piece);
                on_text(&piece)
            }
            Ok(None) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        })
        .await?;
        match failure {
            Some(e) => Err(e),
            None => Ok((generation, text)),
        }
    }
}
