//! # webgpu-lora
//!
//! LoRA fine-tuning, adapter swapping and merging of small Llama-architecture language models on
//! WebGPU, in the browser (wasm32 + burn's WebGPU backend) and natively (burn's CPU and wgpu
//! backends). One core, tested natively; the CLI (`src/bin`) and the wasm bindings (`src/web`) only
//! translate.
//!
//! - [`config`]: `LlamaConfig` from a Hugging Face `config.json`.
//! - [`model`]: the Llama forward pass with a KV cache.
//! - [`io`]: safetensors (single or sharded, F32/F16/BF16), GGUF reading and conversion, the
//!   tokenizer and chat template.
//! - [`generate`]: greedy and sampled generation, streamed.
//! - [`llm`]: a model with its tokenizer, loaded from [`io::ModelFiles`].
//! - [`lora`], [`peft`]: LoRA layers and PEFT adapters on the base model (loading, switching).

pub mod config;
pub mod error;
pub mod generate;
pub mod io;
pub mod linalg;
pub mod llm;
pub mod lora;
pub mod model;
pub mod peft;
pub mod train;

#[cfg(target_arch = "wasm32")]
pub mod web;

pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use generate::{Generation, GenerationConfig, StopReason};
pub use llm::Llm;
pub use model::{KvCache, LlamaModel};
