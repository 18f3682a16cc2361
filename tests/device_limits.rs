//! The largest buffer a device binds (WebGPU's maxStorageBufferBindingSize / maxBufferSize, set
//! by the web edge from the adapter): a model with a matrix above it is refused before anything
//! is allocated, naming the matrix, both sizes and what to do; a quantized file of the same model
//! fits. Its own test binary: the limit is one value per process.

mod common;

use common::*;
use webgpu_lora::Llm;
use webgpu_lora::io::ModelFiles;
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::nn::weight::set_max_buffer_bytes;

#[test]
fn a_matrix_above_the_buffer_limit_is_refused_and_a_smaller_dtype_fits() {
    // the tiny model's f32 embedding is 256 x 64 x 4 = 65,536 bytes; as Q4_0, 256 rows of 40 bytes
    set_max_buffer_bytes(20_000);
    let err = Llm::load(ModelFiles::from_dir(&fixture("tiny-llama")).unwrap(), WeightDtype::Auto, &cpu(), &mut |_, _, _| {})
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("model.embed_tokens.weight needs 65536 bytes (0.1 MiB) in one GPU buffer, but this GPU binds at most 20000 bytes")
            && err.contains("smaller dtype"),
        "{err}"
    );
    let gguf = ModelFiles::from_path(&fixture("quant/tiny-q4_0.gguf")).unwrap();
    let llm = Llm::load(gguf, WeightDtype::Auto, &cpu(), &mut |_, _, _| {}).unwrap();
    assert!(!logits_of(&llm.model, &tiny_ids()).is_empty());
    set_max_buffer_bytes(0);
}
