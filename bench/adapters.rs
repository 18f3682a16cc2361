//! Adapter-operation benchmark (not a test): latency of PEFT's verbs on a real base model.
//!
//! cargo bench --bench adapters -- --model DIR --out DIR [--repeats 7]
//!
//! Makes two adapters (r=8 on q,v and r=8 on all-linear, init false, seeded), saves them as PEFT
//! directories under --out (bench/peft_baseline.py loads the same files), then times, on the CPU
//! backend: load from bytes, set_adapter, disable+enable, unload, merge_and_unload, save; and the
//! OLoRA and PiSSA initialisations (QR / SVD of every targeted base weight).
//! Each directory also gets `logits.safetensors`: our logits for IDS with the adapter active, for
//! PEFT to compare with its own. `olora_as_lora` is an OLoRA adapter, changed as training would,
//! saved converted to a plain rank-2r LoRA for the original base.
//! Prints one JSON line: medians in milliseconds.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;
use webgpu_lora::io::{ModelFiles, write_files};
use webgpu_lora::lora::{AdapterFiles, AdapterSource, LoraConfig};
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::{LlamaModel, Llm, LoraLayers, LoraModel};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2] * 1e3
}

fn time(repeats: usize, mut f: impl FnMut()) -> f64 {
    median_ms(
        (0..repeats)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Token ids of the logits check (any in-vocabulary ids do).
const IDS: [u32; 8] = [1, 504, 3458, 314, 260, 2489, 282, 4649];

/// Writes the files of an adapter and our logits with it active into `dir`.
fn write_adapter(dir: &std::path::Path, files: &AdapterFiles, logits: Vec<f32>) {
    let vocab = logits.len() / IDS.len();
    let tensors =
        std::collections::BTreeMap::from([("logits".to_string(), webgpu_lora::tensor::HostTensor::new(vec![IDS.len(), vocab], logits))]);
    let logits = webgpu_lora::io::safetensors::write_safetensors(&tensors, webgpu_lora::io::StoreDtype::F32, None).unwrap();
    let mut out = files.clone().into_named();
    out.push(("logits.safetensors", logits));
    write_files(dir, out).unwrap();
}

fn logits(model: &LlamaModel) -> Vec<f32> {
    pollster::block_on(model.logits(&IDS)).unwrap()
}

fn main() {
    let model_dir = PathBuf::from(arg("--model").expect("--model DIR"));
    let out = PathBuf::from(arg("--out").expect("--out DIR"));
    let repeats: usize = arg("--repeats").map_or(7, |v| v.parse().unwrap());
    let load_model =
        || Llm::load(ModelFiles::from_dir(&model_dir).unwrap(), WeightDtype::F32, &Device::flex(), &mut |_, _, _| {}).unwrap().model;
    let mut model = load_model();

    let mut results = serde_json::Map::new();
    for (name, targets) in [("qv", r#"["q_proj","v_proj"]"#), ("all_linear", r#""all-linear""#)] {
        let config = format!(
            r#"{{"peft_type":"LORA","task_type":"CAUSAL_LM","r":8,"lora_alpha":16,"target_modules":{targets},"init_lora_weights":false}}"#
        );
        let config = LoraConfig::from_json(config.as_bytes(), "bench").unwrap();
        pollster::block_on(model.add_adapter(name, config, 0)).unwrap();
        let files = pollster::block_on(model.export_adapter(name)).unwrap();
        model.set_adapter(name).unwrap();
        write_adapter(&out.join(name), &files, logits(&model));
        pollster::block_on(model.delete_adapter(name)).unwrap();

        let load = |model: &mut LlamaModel, adapter: &str| {
            let source = AdapterSource {
                config: ("c".into(), files.config_json.clone().into_bytes()),
                weights: ("w".into(), files.safetensors.clone()),
            };
            pollster::block_on(model.load_adapter(adapter, source)).unwrap()
        };
        let load_ms = time(repeats, || {
            load(&mut model, "x");
            pollster::block_on(model.delete_adapter("x")).unwrap();
        });
        load(&mut model, "x");
        load(&mut model, "y");
        let mut flip = false;
        let set_ms = time(repeats * 100, || {
            flip = !flip;
            model.set_adapter(if flip { "x" } else { "y" }).unwrap();
        });
        let disable_ms = time(repeats * 100, || {
            pollster::block_on(model.disable_adapter()).unwrap();
            model.enable_adapter();
        });
        let save_ms = time(repeats, || {
            pollster::block_on(model.export_adapter("x")).unwrap();
        });
        let mut unloads = Vec::new();
        for _ in 0..repeats {
            let t = Instant::now();
            pollster::block_on(model.unload()).unwrap();
            unloads.push(t.elapsed().as_secs_f64());
            load(&mut model, "x");
        }
        // merge_and_unload changes the base: measure on a fresh model each time (load not timed)
        let mut merges = Vec::new();
        for _ in 0..repeats.min(3) {
            let mut m = load_model();
            load(&mut m, "x");
            m.set_adapter("x").unwrap();
            let t = Instant::now();
            pollster::block_on(m.merge_and_unload(&[], false)).unwrap();
            // the merged weights must exist, not just be queued
            pollster::block_on(webgpu_lora::tensor::read_f32(m.layers[0].self_attn.q_proj.base.weight_t.value().sum())).unwrap();
            merges.push(t.elapsed().as_secs_f64());
        }
        pollster::block_on(model.unload()).unwrap();
        results.insert(
            name.to_string(),
            serde_json::json!({
                "load_ms": load_ms, "set_adapter_ms": set_ms, "disable_enable_ms": disable_ms,
                "unload_ms": median_ms(unloads), "merge_and_unload_ms": median_ms(merges), "save_ms": save_ms,
                "adapter_bytes": files.safetensors.len(),
            }),
        );
    }

    // OLoRA / PiSSA init time on q,v; then an OLoRA adapter "trained" (a fixed change of A and B)
    // and saved converted, for PEFT to load on the original base
    for init in ["olora", "pissa"] {
        let config = format!(
            r#"{{"peft_type":"LORA","task_type":"CAUSAL_LM","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],"init_lora_weights":"{init}"}}"#
        );
        let config = LoraConfig::from_json(config.as_bytes(), "bench").unwrap();
        let mut times = Vec::new();
        for _ in 0..repeats.min(3) {
            let t = Instant::now();
            pollster::block_on(model.add_adapter(init, config.clone(), 0)).unwrap();
            times.push(t.elapsed().as_secs_f64());
            pollster::block_on(model.delete_adapter(init)).unwrap();
        }
        results.insert(format!("{init}_init_qv"), serde_json::json!({"init_ms": median_ms(times)}));
    }
    let config = LoraConfig::from_json(br#"{"peft_type":"LORA","task_type":"CAUSAL_LM","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],"init_lora_weights":"olora"}"#, "bench").unwrap();
    pollster::block_on(model.add_adapter("olora", config, 0)).unwrap();
    for linear in model.lora_linears_mut() {
        if let Some(lora) = linear.adapters.get_mut("olora") {
            lora.b_t = lora.b_t.clone().mul_scalar(1.5);
        }
    }
    model.set_adapter("olora").unwrap();
    let files = pollster::block_on(model.export_adapter_as_lora("olora")).unwrap();
    write_adapter(&out.join("olora_as_lora"), &files, logits(&model));
    println!("{}", serde_json::json!({"engine": "webgpu-lora (cpu)", "adapters": results}));
}
