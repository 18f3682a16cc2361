//! Generation benchmark (not a test): prefill and decode tokens/s of a model on one backend.
//!
//! cargo bench --bench generation -- --model DIR|FILE.gguf [--backend cpu|wgpu] [--dtype auto|f32|f16|q8_0|...]
//!                                    [--new-tokens 64] [--repeats 3]
//!
//! Prints one JSON line. The prompt is the chat-templated "What is the capital of France?" (the
//! text as it is for a model without a chat template, a pre-trained base) and
//! decoding is greedy with end-of-sequence ignored, so every run decodes the same number of tokens
//! (as transformers' baseline, bench/transformers_baseline.py, does with min_new_tokens).

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Device, DeviceKind};
use webgpu_lora::Llm;
use webgpu_lora::generate::argmax;
use webgpu_lora::io::ModelFiles;
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::tensor::read_f32;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// What the weights are: "f32", "q8_0 (quantized on load)", "GGUF as shipped", ...
fn weights_label(model: &std::path::Path, dtype: WeightDtype) -> String {
    let gguf = model.extension().is_some_and(|e| e == "gguf");
    match (gguf, dtype) {
        (true, WeightDtype::Auto) => "GGUF as shipped".into(),
        (false, WeightDtype::Auto) => "f32".into(),
        (_, WeightDtype::Quant(_)) => format!("{} (quantized on load)", dtype.name()),
        _ => dtype.name(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let model = PathBuf::from(arg("--model").expect("--model DIR|FILE.gguf"));
    let backend = arg("--backend").unwrap_or_else(|| "cpu".into());
    let dtype = WeightDtype::parse(&arg("--dtype").unwrap_or_else(|| "auto".into())).unwrap();
    let new_tokens: usize = arg("--new-tokens").map_or(64, |v| v.parse().unwrap());
    let repeats: usize = arg("--repeats").map_or(3, |v| v.parse().unwrap());
    let device = match backend.as_str() {
        "cpu" => Device::flex(),
        "wgpu" => Device::wgpu(DeviceKind::DefaultDevice),
        other => panic!("unknown backend {other}"),
    };
    let started = Instant::now();
    let llm = Llm::load(ModelFiles::from_path(&model).unwrap(), dtype, &device, &mut |_, _, _| {}).unwrap();
    let load_s = started.elapsed().as_secs_f64();
    // chat-templated where the model has a template (a pre-trained base has none: the text as it is)
    let chat = llm.tokenizer().is_ok_and(|t| t.has_chat_template());
    let prompt = llm.prompt_ids("What is the capital of France?", chat).unwrap();
    let m = &llm.model;

    // warm-up: compiles kernels / fills caches once
    let mut cache = m.new_cache();
    let logits = pollster::block_on(read_f32(m.forward_last(m.ids_tensor(&prompt), Some(&mut cache)))).unwrap();
    let first = argmax(&logits);
    pollster::block_on(read_f32(m.forward_last(m.ids_tensor(&[first]), Some(&mut cache)))).unwrap();

    let (mut prefill, mut decode) = (vec![], vec![]);
    for _ in 0..repeats {
        let mut cache = m.new_cache();
        let t = Instant::now();
        let logits = pollster::block_on(read_f32(m.forward_last(m.ids_tensor(&prompt), Some(&mut cache)))).unwrap();
        prefill.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let mut next = argmax(&logits);
        let t = Instant::now();
        for _ in 0..new_tokens {
            let logits = pollster::block_on(read_f32(m.forward_last(m.ids_tensor(&[next]), Some(&mut cache)))).unwrap();
            next = argmax(&logits);
        }
        decode.push(new_tokens as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "engine": format!("webgpu-lora ({backend})"),
            "weights": weights_label(&model, dtype),
            "weights_mb": llm.model.memory_footprint() as f64 / 1e6,
            "prompt_tokens": prompt.len(),
            "new_tokens": new_tokens,
            "repeats": repeats,
            "load_s": load_s,
            "prefill_tokens_per_s": median(prefill),
            "decode_tokens_per_s": median(decode),
        })
    );
}
