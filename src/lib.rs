//! # webgpu-lora
//!
//! LoRA fine-tuning, adapter swapping and merging of small Llama-architecture language models (f32,
//! f16 or quantized bases) on WebGPU, in the browser (wasm32 + burn's WebGPU backend) and natively
//! (burn's CPU and wgpu backends). One core, tested natively; the CLI (`src/bin`) and the wasm bindings (`src/web`) only
//! translate.
//!
//! The modules, each importing only those above it in this list (tests/architecture.rs checks):
//!
//! - [`error`]: the one error type; messages name the file or option and the fix.
//! - [`tensor`]: host tensors, reading device tensors back, uploading.
//! - [`linalg`]: host QR and SVD (faer) for OLoRA, PiSSA and the "svd" combination.
//! - [`config`]: `LlamaConfig` from a Hugging Face `config.json`.
//! - [`io`]: safetensors (single or sharded, F32/F16/BF16), GGUF reading, loading, conversion and
//!   writing (merged models, llama.cpp LoRA adapters), ggml's quantized block types, the model's
//!   files, the tokenizer and chat template.
//! - [`nn`]: layers below any model: f32/f16/quantized weight matrices, `Linear`, fused operations
//!   (products with quantized matrices among them).
//! - [`lora`]: LoRA as PEFT's `tuners/lora/`: `LoraConfig`, `LoraLinear`, initialisation, dropout,
//!   PEFT's files, what a model shows of its layers ([`LoraLayers`]) and the model-level verbs of
//!   the [`LoraModel`] trait.
//! - [`model`]: the Llama forward pass (Llama 2/3.x, SmolLM3, Qwen2/3, Gemma 3 by config) with a KV cache; its
//!   linear layers carry adapters.
//! - [`generate`]: greedy and sampled generation, streamed.
//! - [`llm`]: a model with its tokenizer, loaded from [`io::ModelFiles`].
//! - [`train`]: SFT of an adapter: options, data, loss, AdamW, the loop, a whole job.
//! - [`evaluate`]: loss, perplexity, exact match and ROUGE-L of the model as it is on held-out data.
//! - `web` (wasm32 only): the wasm-bindgen edge.

pub mod config;
pub mod error;
pub mod evaluate;
pub mod generate;
pub mod io;
pub mod linalg;
pub mod llm;
pub mod lora;
pub mod model;
pub mod nn;
pub mod tensor;
pub mod train;

#[cfg(target_arch = "wasm32")]
pub mod web;

pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use generate::{Generation, GenerationConfig, StopReason};
pub use llm::Llm;
pub use lora::{LoraLayers, LoraModel};
pub use model::{KvCache, LlamaModel};
