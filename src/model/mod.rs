//! The base model: a Llama-architecture causal LM on burn tensors.

mod kv_cache;
mod llama;
pub mod ops;
pub mod weight;

pub use kv_cache::KvCache;
pub use llama::{DecoderLayer, Linear, LlamaModel, transpose};
pub use weight::{Weight, WeightDtype};
