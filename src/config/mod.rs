//! The base model's Hugging Face `config.json`.

mod llama;

pub use llama::{LLAMA_ARCHITECTURE, LlamaConfig};
