//! LoRA: low-rank adapters on the frozen linear layers of the base model.

mod layer;

pub use layer::{LoraLinear, LoraWeights};
