//! The base model's Hugging Face `config.json`.

mod llama;

pub use llama::{ARCHITECTURES, LLAMA_ARCHITECTURE, LlamaConfig, RopeScaling};
