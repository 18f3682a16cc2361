//! Reading and writing model files: safetensors, GGUF, the Hugging Face directory layout, the
//! tokenizer and its chat template.

pub mod gguf;
pub mod gguf_convert;
pub mod model_files;
pub mod safetensors;
pub mod tokenizer;

pub use model_files::ModelFiles;
pub use safetensors::{HostTensor, SafetensorsWeights, StoreDtype};
pub use tokenizer::{ChatMessage, TextTokenizer};
