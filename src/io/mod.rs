//! Reading and writing model files: safetensors, GGUF and ggml's quantized blocks, the Hugging
//! Face directory layout, the tokenizer and its chat template.

pub mod gguf;
pub mod gguf_convert;
pub mod gguf_metadata;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod model_files;
pub mod quant;
pub mod safetensors;
pub mod tokenizer;

pub use model_files::{ModelFiles, WeightSource, is_gguf, write_file, write_files};
pub use safetensors::{SafetensorsWeights, StoreDtype};
pub use tokenizer::{ChatMessage, TextTokenizer};

use crate::error::{Error, Result};

/// The bytes of the file at `path`.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::io(path.display(), source))
}
