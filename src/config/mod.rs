//! The base model's Hugging Face `config.json`.

mod llama;

pub use llama::{ARCHITECTURES, Activation, LLAMA_ARCHITECTURE, LayerAttention, LlamaConfig, Rope, RopeScaling};
