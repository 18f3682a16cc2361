//! Configuration files: the base model's Hugging Face `config.json` and PEFT's `adapter_config.json`.

mod llama;
mod lora;

pub use llama::{LLAMA_ARCHITECTURE, LlamaConfig, PROJECTIONS};
pub use lora::{LoraConfig, LoraInit, TargetModules};
