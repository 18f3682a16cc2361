//! Training-speed benchmark (not a test): LoRA SFT (or DPO) steps on a real base model, or full
//! fine-tuning steps (`--method full`: every weight, no adapter; `--targets` is ignored).
//!
//! cargo bench --bench training -- --model DIR|FILE.gguf --targets qv|all-linear [--dtype auto|f32|q4_0|...] [--backend cpu|wgpu]
//!     [--steps 5] [--threads N] [--gradient-checkpointing] [--method dpo|full]
//!     [--batch 4] [--seq 128]
//!
//! With `--method dpo` a micro-batch is `--batch` preference pairs of random tokens, each sequence
//! `--seq` long (half prompt, half completion), as bench/trl_dpo_baseline.py times TRL's.
//!
//! r=8 (alpha 16, no dropout), AdamW lr 2e-4, batches of 4 x 128 random in-vocabulary tokens (by
//! default), every token trained on (as bench/peft_train_baseline.py does); one warm-up step, then
//! `--steps` timed steps. Prints one JSON line: tokens/s, CPU seconds per step (all threads: steadier
//! than tokens/s on a shared machine, for comparing changes) and the process's peak RSS (VmHWM), after
//! loading and in all.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Device, DeviceKind};
use rand::{Rng, SeedableRng};
use webgpu_lora::io::ModelFiles;
use webgpu_lora::lora::LoraConfig;
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::train::dpo::{PreferencePair, preference_batch};
use webgpu_lora::train::trainer::{Target, train_steps};
use webgpu_lora::train::{Batch, Control, Method, Schedule, TrainOptions};
use webgpu_lora::{Llm, LoraLayers, LoraModel};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system, all threads) this process has used: /proc/self/stat's utime and stime.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // the fields after the command name, which is in parentheses and may hold spaces
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let model_dir = PathBuf::from(arg("--model").expect("--model DIR|FILE.gguf"));
    let dtype = WeightDtype::parse(&arg("--dtype").unwrap_or_else(|| "auto".into())).unwrap();
    let targets = arg("--targets").unwrap_or_else(|| "qv".into());
    let backend = arg("--backend").unwrap_or_else(|| "cpu".into());
    let steps: usize = arg("--steps").map_or(5, |v| v.parse().unwrap());
    let device = if backend == "wgpu" { Device::wgpu(DeviceKind::DefaultDevice) } else { Device::flex() };
    let mut llm = Llm::load(ModelFiles::from_path(&model_dir).unwrap(), dtype, &device, &mut |_, _, _| {}).unwrap();
    let load_peak_rss = peak_rss_mb();
    let method = arg("--method");
    let (dpo, full) = (method.as_deref() == Some("dpo"), method.as_deref() == Some("full"));
    let target_json = if targets == "qv" { r#"["q_proj","v_proj"]"# } else { r#""all-linear""# };
    let config = format!(r#"{{"peft_type":"LORA","task_type":"CAUSAL_LM","r":8,"lora_alpha":16,"target_modules":{target_json}}}"#);
    if !full {
        pollster::block_on(llm.model.add_adapter("bench", LoraConfig::from_json(config.as_bytes(), "bench").unwrap(), 0)).unwrap();
    }

    let batch: usize = arg("--batch").map_or(4, |v| v.parse().unwrap());
    let seq: usize = arg("--seq").map_or(128, |v| v.parse().unwrap());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = llm.model.config.vocab_size as u32;
    let mut make = || {
        let mut random = |n: usize| (0..n).map(|_| rng.random_range(0..vocab)).collect::<Vec<u32>>();
        if dpo {
            let pairs: Vec<PreferencePair> = (0..batch)
                .map(|_| PreferencePair { prompt: random(seq / 2), chosen: random(seq - seq / 2), rejected: random(seq - seq / 2) })
                .collect();
            return vec![preference_batch(&pairs.iter().collect::<Vec<_>>(), 0)];
        }
        let ids = random(batch * seq);
        vec![Batch { labels: ids.iter().map(|&i| i as i32).collect(), ids, batch, seq, tokens: batch * seq }]
    };
    let plan: Vec<Vec<Batch>> = (0..steps + 1).map(|_| make()).collect();
    // as the CLI does: on the CPU backend, a micro-batch's rows split across the cores
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: usize = arg("--threads").map_or(if backend == "wgpu" { 1 } else { cores }, |v| v.parse().unwrap());
    let train = TrainOptions {
        lr: 2e-4,
        schedule: Schedule::Constant,
        max_grad_norm: 0.0,
        batch_size: batch,
        threads: Some(threads),
        gradient_checkpointing: std::env::args().any(|a| a == "--gradient-checkpointing"),
        method: if dpo {
            Method::Dpo
        } else if full {
            Method::Full
        } else {
            Method::Sft
        },
        lora_dropout: 0.0,
        ..Default::default()
    };
    let start = Instant::now();
    let clock = move || start.elapsed().as_secs_f64();
    let mut times = Vec::new();
    let mut last = 0.0;
    let mut cpu_at_first_step = 0.0;
    let target = if full { Target::Model } else { Target::Adapter("bench") };
    pollster::block_on(train_steps(&mut llm.model, target, &plan, plan.len(), None, &train, None, &clock, &mut |event| {
        if let webgpu_lora::train::TrainEvent::Step(m) = event {
            times.push(m.elapsed_s - last);
            last = m.elapsed_s;
            if times.len() == 1 {
                cpu_at_first_step = cpu_seconds();
            }
        }
        Control::Continue
    }))
    .unwrap();
    let timed: f64 = times[1..].iter().sum();
    let cpu_per_step = (cpu_seconds() - cpu_at_first_step) / steps as f64;
    let (trainable, _) = if full { (llm.model.base_parameters(), 0) } else { llm.model.trainable_parameters() };
    let targets = if full { "full".to_string() } else { targets };
    let mut line = serde_json::json!({
        "engine": format!("webgpu-lora ({backend})"), "training": targets, "trainable_params": trainable, "batch": format!("{batch} x {seq}"),
        "tokens_per_s": (steps * batch * seq) as f64 / timed, "peak_rss_mb": peak_rss_mb(), "load_peak_rss_mb": load_peak_rss, "steps": steps, "threads": threads,
        "cpu_s_per_step": cpu_per_step, "gradient_checkpointing": train.gradient_checkpointing, "weights": dtype.name(), "weights_mb": llm.model.memory_footprint() as f64 / 1e6,
    });
    if dpo {
        // a pair is two sequences of `seq` tokens
        line["method"] = "dpo".into();
        line["pairs_per_s"] = ((steps * batch) as f64 / timed).into();
        line["tokens_per_s"] = ((steps * batch * 2 * seq) as f64 / timed).into();
    }
    println!("{line}");
}
