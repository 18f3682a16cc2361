//! The base model: a Llama-architecture causal LM on burn tensors, whose linear layers carry
//! LoRA adapters ([`crate::lora`]).

mod kv_cache;
mod llama;
pub mod parameters;

pub use kv_cache::KvCache;
pub use llama::{Attention, DecoderLayer, Head, LlamaModel, Mlp, Positions, RmsNorm};
pub use parameters::Parameter;
