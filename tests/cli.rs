//! The CLI's exact command forms (later issues and outside checks rely on them).

mod common;

use std::process::Command;

use common::*;
use webgpu_lora::io::SafetensorsWeights;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_webgpu-lora"))
}

#[test]
fn logits_command_writes_the_golden_logits() {
    let dir = fixture("tiny-llama");
    let input = ids(&read_json(dir.join("expected.json"))["ids"]);
    let out = scratch("cli-logits.safetensors");
    let ids_arg = input.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let status = cli().args(["logits", "--model"]).arg(&dir).args(["--ids", &ids_arg, "--out"]).arg(&out).status().unwrap();
    assert!(status.success());
    let ours = expected_logits(out.clone());
    std::fs::remove_file(&out).unwrap();
    let diff = max_abs_diff(&ours, &expected_logits(dir.join("expected.safetensors")));
    assert!(diff < 1e-4, "max diff {diff}");
}

/// `--dtype f16`: the f16 tiny model with its matrices kept in f16 gives transformers' logits; the
/// f32 tiny model's logits move by its matrices' f16 rounding (a little, but they do).
#[test]
fn logits_command_with_f16_weights() {
    let input = ids(&read_json(fixture("tiny-llama/expected.json"))["ids"]);
    let ids_arg = input.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let logits = |model: &str, dtype: &str| {
        let out = scratch(&format!("cli-logits-{model}-{dtype}.safetensors"));
        let status = cli()
            .args(["logits", "--dtype", dtype, "--model"])
            .arg(fixture(model))
            .args(["--ids", &ids_arg, "--out"])
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        let values = expected_logits(out.clone());
        std::fs::remove_file(&out).unwrap();
        values
    };
    let diff = max_abs_diff(&logits("tiny-llama-f16", "f16"), &expected_logits(fixture("tiny-llama-f16/expected.safetensors")));
    assert!(diff < 1e-4, "max diff {diff}");
    let rounding = max_abs_diff(&logits("tiny-llama", "f16"), &logits("tiny-llama", "f32"));
    assert!(rounding > 1e-6 && rounding < 1e-2, "f16 rounding moved the logits by {rounding}");
}

#[test]
fn errors_exit_nonzero_with_the_message() {
    let output = cli().args(["logits", "--model", "/nonexistent/model", "--ids", "1", "--out", "/tmp/x.safetensors"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error: /nonexistent/model: not a directory"), "{stderr}");

    let dir = fixture("tiny-llama");
    let output = cli().args(["logits", "--model"]).arg(&dir).args(["--ids", "1,x", "--out", "/tmp/x.safetensors"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--ids: \"x\" is not a token id"), "{stderr}");

    let output = cli().args(["generate", "--model"]).arg(&dir).args(["--prompt", "hi"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no tokenizer.json"), "{stderr}");
}

fn logits_via_cli(args: &[&std::ffi::OsStr]) -> Vec<f32> {
    let dir = fixture("tiny-llama");
    let input = ids(&read_json(dir.join("expected.json"))["ids"]);
    let ids_arg = input.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = scratch(&format!("cli-{}.safetensors", args.len()));
    let output = cli().arg("logits").args(args).args(["--ids", &ids_arg, "--out"]).arg(&out).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let logits = expected_logits(out.clone());
    std::fs::remove_file(out).unwrap();
    logits
}

/// `logits --adapter`, `logits --adapter --merge` and `merge` give PEFT's logits.
#[test]
fn adapter_and_merge_commands_match_peft() {
    let base = fixture("tiny-llama");
    let adapter = fixture("peft/all7-r4");
    let with_adapter = logits_via_cli(&["--model".as_ref(), base.as_os_str(), "--adapter".as_ref(), adapter.as_os_str()]);
    assert!(max_abs_diff(&with_adapter, &expected_logits(adapter.join("expected_logits.safetensors"))) < 1e-4);
    let merged = logits_via_cli(&["--model".as_ref(), base.as_os_str(), "--adapter".as_ref(), adapter.as_os_str(), "--merge".as_ref()]);
    let peft_merged = expected_logits(adapter.join("expected_merged_logits.safetensors"));
    assert!(max_abs_diff(&merged, &peft_merged) < 1e-4);

    let out = scratch("cli-merged");
    let status =
        cli().args(["merge", "--safe", "--model"]).arg(&base).arg("--adapter").arg(&adapter).arg("--out").arg(&out).status().unwrap();
    assert!(status.success());
    let from_dir = logits_via_cli(&["--model".as_ref(), out.as_os_str()]);
    std::fs::remove_dir_all(&out).unwrap();
    assert!(max_abs_diff(&from_dir, &peft_merged) < 1e-4, "the merged directory reloads with PEFT's merged logits");
}

#[test]
fn adapter_info_prints_peft_counts() {
    let output = cli().args(["adapter-info"]).arg(fixture("peft/all7-r4")).arg("--model").arg(fixture("tiny-llama")).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("r: 4  lora_alpha: 8"), "{stdout}");
    assert!(stdout.contains("target modules: 14 layers"), "{stdout}");
    assert!(stdout.contains("trainable params: 8,192 || all params: 98,624 || trainable%: 8.3063"), "{stdout}");
}

/// `train` in the issue's form writes a PEFT adapter directory (plus the run's summary and the
/// JSONL log); a bad learning rate is refused before anything runs (exit status 1).
#[test]
fn train_command_writes_a_peft_adapter() {
    let out = scratch("cli-train");
    let log = out.with_extension("jsonl");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/robot/train.jsonl");
    // the real model, the sample data, and `out`
    let train = || {
        let mut command = cli();
        command.args(["train", "--model"]).arg(real_model_dir()).arg("--data").arg(&data).arg("--out").arg(&out);
        command
    };
    let flags = "--val-split 0.05 --r 4 --alpha 8 --dropout 0.0 --targets q_proj,v_proj --lr 1e-3 --max-steps 2 --batch-size 2 \
                 --grad-accum 1 --max-seq-len 128 --warmup 1 --seed 3 --backend cpu --log";
    let status = train().args(flags.split_whitespace()).arg(&log).status().unwrap();
    assert!(status.success());
    for file in ["adapter_config.json", "adapter_model.safetensors", "training_summary.json"] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let summary = read_json(out.join("training_summary.json"));
    assert_eq!((summary["summary"]["steps"].as_u64(), summary["summary"]["end"].as_str()), (Some(2), Some("completed")));
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.iter().filter(|e| e["event"] == "step").count(), 2);
    assert_eq!(events.iter().filter(|e| e["event"] == "eval").count(), 2, "before the first step and at the end");
    let config = read_json(out.join("adapter_config.json"));
    assert_eq!((config["r"].as_u64(), config["peft_type"].as_str()), (Some(4), Some("LORA")));

    let output = train().args(["--lr", "0"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error: learning rate 0: must be a positive number"), "{stderr}");
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_file(&log).unwrap();
}

/// The logged step events (`--log`): (loss, gradient norm) of each step.
/// A trajectory fixture's batches as `{"input_ids", "labels"}` lines in order, written to
/// `dir`/ids.jsonl (train with `--no-shuffle --batch-size 2 --grad-accum 2`).
fn trajectory_data(t: &serde_json::Value, dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut lines = String::new();
    for micro in t["steps"].as_array().unwrap().iter().flat_map(|s| s.as_array().unwrap()) {
        for (ids, labels) in micro["ids"].as_array().unwrap().iter().zip(micro["labels"].as_array().unwrap()) {
            let (ids, labels) = (ids.as_array().unwrap(), labels.as_array().unwrap());
            let len = ids.len() - ids.iter().rev().take_while(|&i| i == 2).count(); // right padding (eos 2) off
            lines += &format!("{}\n", serde_json::json!({"input_ids": ids[..len], "labels": labels[..len]}));
        }
    }
    let data = dir.join("ids.jsonl");
    std::fs::write(&data, lines).unwrap();
    data
}

/// The flags that train on a trajectory fixture's batches in order with its optimizer settings.
fn trajectory_flags(t: &serde_json::Value) -> String {
    let c = &t["config"];
    format!(
        "--no-shuffle --batch-size 2 --grad-accum 2 --lr {} --adam-beta1 {} --adam-beta2 {} --adam-epsilon {} \
         --weight-decay {} --schedule cosine --warmup {} --max-grad-norm {}",
        c["lr"], c["betas"][0], c["betas"][1], c["eps"], c["weight_decay"], c["warmup"], c["max_grad_norm"]
    )
}

/// `train --model MODEL --data DATA --out OUT --log LOG`, then `args` and the whitespace-separated
/// `flags`: the logged (loss, gradient norm) of each step, and what it printed on stderr.
fn train_via_cli(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    log: &std::path::Path,
    args: &[&std::ffi::OsStr],
    flags: &str,
) -> (Vec<(f64, f64)>, String) {
    let output = cli()
        .args(["train", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--log")
        .arg(log)
        .args(args)
        .args(flags.split_whitespace())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    (logged_steps(log), stderr)
}

fn logged_steps(log: &std::path::Path) -> Vec<(f64, f64)> {
    let events = std::fs::read_to_string(log).unwrap();
    let events = events.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|e| e["event"] == "step");
    events.map(|e| (e["metrics"]["loss"].as_f64().unwrap(), e["metrics"]["gradNorm"].as_f64().unwrap())).collect()
}

/// PEFT's 20-step trajectory (tests/fixtures/train) through the command line: its batches as
/// `{"input_ids", "labels"}` lines in order (`--no-shuffle`, 2 rows a batch, 2 batches a step),
/// continuing PEFT's all7-r4 adapter (`--init-from`). The logged losses (1e-4) and gradient norms
/// (1e-4 relative) are PEFT's, and the adapter written gives the logits of PEFT's trained adapter
/// (1e-4). `--checkpoint-every 10` writes checkpoint-10/ with the trainer state, and `--resume`
/// from it logs the uninterrupted run's last 10 losses and ends with its adapter.
#[test]
fn train_on_fixed_batches_gives_peft_and_resumes() {
    let t = read_json(fixture("train/trajectory.json"));
    let dir = scratch("cli-trajectory");
    let data = trajectory_data(&t, &dir);
    let flags = format!("{} --max-steps 20 --checkpoint-every 10 --backend cpu", trajectory_flags(&t));
    let train = |out: &std::path::Path, log: &std::path::Path, start: &[&std::ffi::OsStr]| {
        train_via_cli(&fixture("tiny-llama"), &data, out, log, start, &flags).0
    };
    let (out, log) = (dir.join("run"), dir.join("run.jsonl"));
    let steps = train(&out, &log, &["--init-from".as_ref(), fixture("peft/all7-r4").as_os_str()]);
    let losses: Vec<f64> = serde_json::from_value(t["losses"].clone()).unwrap();
    let norms: Vec<f64> = serde_json::from_value(t["grad_norms"].clone()).unwrap();
    assert_eq!(steps.len(), 20);
    for (i, ((loss, norm), (peft_loss, peft_norm))) in steps.iter().zip(losses.iter().zip(&norms)).enumerate() {
        assert!((loss - peft_loss).abs() < 1e-4, "step {}: loss {loss} vs PEFT {peft_loss}", i + 1);
        assert!((norm - peft_norm).abs() < 1e-4 * peft_norm, "step {}: gradient norm {norm} vs PEFT {peft_norm}", i + 1);
    }
    let logits = logits_via_cli(&["--model".as_ref(), fixture("tiny-llama").as_os_str(), "--adapter".as_ref(), out.as_os_str()]);
    let peft = expected_logits(fixture("train/final_logits.safetensors"));
    assert!(max_abs_diff(&logits, &peft) < 1e-4, "max |ours - PEFT's trained adapter| = {}", max_abs_diff(&logits, &peft));

    let checkpoint = out.join("checkpoint-10");
    for file in ["adapter_config.json", "adapter_model.safetensors", "trainer_state.safetensors"] {
        assert!(checkpoint.join(file).is_file(), "checkpoint-10/{file}");
    }
    let (resumed, resumed_log) = (dir.join("resumed"), dir.join("resumed.jsonl"));
    let rest = train(&resumed, &resumed_log, &["--resume".as_ref(), checkpoint.as_os_str()]);
    assert_eq!(rest.len(), 10, "the resumed run logs steps 11 to 20");
    for (i, ((a, _), (b, _))) in steps[10..].iter().zip(&rest).enumerate() {
        assert!((a - b).abs() < 1e-6, "step {}: resumed {b} vs uninterrupted {a}", i + 11);
    }
    let resumed_logits =
        logits_via_cli(&["--model".as_ref(), fixture("tiny-llama").as_os_str(), "--adapter".as_ref(), resumed.as_os_str()]);
    assert!(max_abs_diff(&resumed_logits, &logits) < 1e-5, "the resumed run ends with the uninterrupted run's adapter");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The dtype of each matrix (2-D tensor) in a safetensors file, from its header.
fn matrix_dtypes(file: &std::path::Path) -> std::collections::BTreeSet<String> {
    let bytes = std::fs::read(file).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let entries = header.as_object().unwrap().values().filter(|t| t["shape"].as_array().is_some_and(|s| s.len() == 2));
    entries.map(|t| t["dtype"].as_str().unwrap().to_string()).collect()
}

/// `merge` into the f16 and bf16 tiny models and `convert-gguf` of F16, BF16 (with v3 and v2
/// headers), Q8_0 and Q4_0 GGUFs (each also loaded directly) keep the base's dtype (the matrices stored in it, config.json
/// saying so; quantized blocks dequantize exactly only to f32) and give the reference logits
/// (1e-4): PEFT's merge of the same adapter into that base, or transformers loading the GGUF
/// itself. `make_fixtures.py --only cli-outputs` loads these same outputs in transformers and
/// records what it found (tests/fixtures/convert/cli_outputs.json).
#[test]
fn merge_and_convert_gguf_keep_the_base_dtype() {
    let qv = fixture("peft/qv-r8");
    let merge = |base: &str| {
        vec!["merge".into(), "--model".into(), fixture(base).into_os_string(), "--adapter".into(), qv.clone().into_os_string()]
    };
    let convert = |file: &str| vec![std::ffi::OsString::from("convert-gguf"), fixture(file).into_os_string()];
    let cases = [
        (merge("tiny-llama-f16"), "F16", "tiny-llama-f16/expected_qv-r8.safetensors", "merged_logits"),
        (merge("tiny-llama-bf16"), "BF16", "tiny-llama-bf16/expected_qv-r8.safetensors", "merged_logits"),
        (convert("convert/tiny-f16.gguf"), "F16", "convert/expected.safetensors", "F16.logits"),
        (convert("convert/tiny-bf16.gguf"), "BF16", "convert/expected.safetensors", "BF16.logits"),
        (convert("convert/tiny-f16-v2.gguf"), "F16", "convert/expected.safetensors", "F16-v2.logits"),
        (convert("quant/tiny-q8_0.gguf"), "F32", "quant/expected.safetensors", "Q8_0.logits"),
        (convert("quant/tiny-q4_0.gguf"), "F32", "quant/expected.safetensors", "Q4_0.logits"),
    ];
    let checked = read_json(fixture("convert/cli_outputs.json"));
    let merges_and_conversions =
        checked["checked"].as_object().unwrap().keys().filter(|k| k.starts_with("merge ") || k.starts_with("convert-gguf ")).count();
    assert_eq!(merges_and_conversions, cases.len(), "transformers checked each case");
    for (command, dtype, reference, key) in cases {
        let out = scratch("cli-dtype");
        let mut cli_command = cli();
        cli_command.args(&command);
        if command[0] == "merge" {
            cli_command.arg("--out");
        }
        let output = cli_command.arg(&out).output().unwrap();
        let what = format!("{:?}", command[..2].iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>());
        assert!(output.status.success(), "{what}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(matrix_dtypes(&out.join("model.safetensors")), [dtype.to_string()].into(), "{what}: the matrices' dtype");
        let config = read_json(out.join("config.json"));
        let torch_name = match dtype {
            "F16" => "float16",
            "BF16" => "bfloat16",
            _ => "float32",
        };
        assert_eq!(config.get("torch_dtype").or(config.get("dtype")).and_then(|d| d.as_str()), Some(torch_name), "{what}: config.json");
        let logits = logits_via_cli(&["--model".as_ref(), out.as_os_str()]);
        let bytes = std::fs::read(fixture(reference)).unwrap();
        let expected = webgpu_lora::io::SafetensorsWeights::new(vec![(reference.into(), bytes)]).unwrap().tensor(key).unwrap().data;
        let diff = max_abs_diff(&logits, &expected);
        assert!(diff < 1e-4, "{what}: max |ours - reference| = {diff}");
        if command[0] == "convert-gguf" {
            // and the GGUF loaded as it is
            let direct = logits_via_cli(&["--model".as_ref(), command[1].as_os_str()]);
            assert!(max_abs_diff(&direct, &expected) < 1e-4, "{what}: loaded directly");
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// `train --init-from`: the run starts from the PEFT adapter's own A and B and its config (with a
/// learning rate too small to move an f32 value, the adapter comes back as it went in, under its
/// r, alpha and targets); a LoRA option set against its config is refused by name, one that
/// agrees with it is taken, and an option left at its default takes the adapter's value.
#[test]
fn train_init_from_continues_a_peft_adapter() {
    let source = fixture("peft/all7-r4");
    let out = scratch("cli-init-from");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/robot/train.jsonl");
    let train = |extra: &str| {
        let mut command = cli();
        command.args(["train", "--model"]).arg(fixture("tiny-chat")).arg("--data").arg(&data).arg("--out").arg(&out);
        command.arg("--init-from").arg(&source);
        command.args("--max-steps 1 --batch-size 2 --max-seq-len 64 --truncate --train-on-everything --backend cpu".split_whitespace());
        command.args(extra.split_whitespace()).output().unwrap()
    };
    let output = train("--lr 1e-12 --r 4");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let tensors = |dir: &std::path::Path| {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        webgpu_lora::io::SafetensorsWeights::new(vec![("a".into(), bytes)]).unwrap()
    };
    let (ours, theirs) = (tensors(&out), tensors(&source));
    assert_eq!(ours.names(), theirs.names());
    for name in theirs.names() {
        let diff = max_abs_diff(&ours.tensor(name).unwrap().data, &theirs.tensor(name).unwrap().data);
        assert!(diff < 1e-9, "{name} moved by {diff}");
    }
    let (config, peft) = (read_json(out.join("adapter_config.json")), read_json(source.join("adapter_config.json")));
    assert_eq!((config["r"].as_f64(), config["lora_alpha"].as_f64()), (peft["r"].as_f64(), peft["lora_alpha"].as_f64()));
    let targets = |c: &serde_json::Value| {
        let mut t: Vec<String> = serde_json::from_value(c["target_modules"].clone()).unwrap();
        t.sort();
        t
    };
    assert_eq!(targets(&config), targets(&peft));

    let output = train("--lr 1e-3 --r 2 --alpha 8 --targets q_proj");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the run continues this adapter but asks for r 2 (the adapter's is 4), target_modules q_proj"), "{stderr}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// `convert-to-lora`: PEFT's OLoRA adapter becomes a plain LoRA of rank 2r that, on the unmodified
/// base, gives PEFT's logits of the fine-tuned model; a plain LoRA is refused with exit status 1.
#[test]
fn convert_to_lora_gives_peft_logits() {
    let (base, olora, out) = (fixture("tiny-llama"), fixture("peft/olora"), scratch("cli-to-lora"));
    let status =
        cli().args(["convert-to-lora", "--model"]).arg(&base).arg("--adapter").arg(&olora).arg("--out").arg(&out).status().unwrap();
    assert!(status.success());
    let (config, original) = (read_json(out.join("adapter_config.json")), read_json(olora.join("adapter_config.json")));
    assert_eq!(config["r"].as_u64().unwrap(), 2 * original["r"].as_u64().unwrap());
    assert_eq!(config["init_lora_weights"], serde_json::json!(true));
    let logits = logits_via_cli(&["--model".as_ref(), base.as_os_str(), "--adapter".as_ref(), out.as_os_str()]);
    std::fs::remove_dir_all(&out).unwrap();
    let diff = max_abs_diff(&logits, &expected_logits(olora.join("expected_logits.safetensors")));
    assert!(diff < 1e-4, "converted OLoRA: max |ours - PEFT| = {diff}");

    let output = cli()
        .args(["convert-to-lora", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(fixture("peft/qv-r8"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already a plain LoRA"), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!out.exists(), "nothing is written");
}

/// `merge --out FILE.gguf` on a GGUF base writes the GGUF gguf-py writes from PEFT's merge
/// (requantized, make_fixtures.py), with PEFT's rounding warning on stderr; `--out-type` without
/// a .gguf is refused; `adapter-to-gguf` writes the llama.cpp LoRA adapter gguf-py writes.
#[test]
fn gguf_outputs_of_merge_and_adapter_to_gguf() {
    let (base, adapter) = (fixture("quant/tiny-q4_0.gguf"), fixture("peft/qv-r8"));
    let dir = scratch("cli-gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("merged.gguf");
    let output = cli().args(["merge", "--model"]).arg(&base).arg("--adapter").arg(&adapter).arg("--out").arg(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("warning: Merging LoRA into the 14 quantized linear layers requantizes them"), "{stderr}");
    assert_same_gguf(&std::fs::read(&out).unwrap(), "merged-q4_0.gguf");

    let output = cli()
        .args(["merge", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .args(["--out", "/tmp/x", "--out-type", "q8_0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("--out-type is the type of a GGUF's matrices"));

    let out = dir.join("adapter.gguf");
    let status =
        cli().args(["adapter-to-gguf", "--model"]).arg(&base).arg("--adapter").arg(&adapter).arg("--out").arg(&out).status().unwrap();
    assert!(status.success());
    assert_same_gguf(&std::fs::read(&out).unwrap(), "adapter-qv-r8.gguf");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `evaluate`: one row each for the base, the adapter and the adapter merged; the base's loss is
/// transformers' (tests/fixtures/eval), the merged row's the adapter's, and --json holds the rows.
#[test]
fn evaluate_command_compares_base_adapter_and_merged() {
    let json = scratch("cli-evaluate.json");
    let out = cli()
        .args(["evaluate", "--model"])
        .arg(fixture("tiny-llama"))
        .arg("--adapter")
        .arg(fixture("peft/qv-r8"))
        .arg("--data")
        .arg(fixture("eval/ids.jsonl"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("model") && table.contains("perplexity") && table.contains("rouge_l"), "{table}");
    assert_eq!(table.lines().count(), 4, "a header and three rows: {table}");
    let rows = read_json(json.clone());
    std::fs::remove_file(&json).unwrap();
    let loss = |i: usize| rows[i]["evaluation"]["meanLoss"].as_f64().unwrap();
    assert_eq!(rows[0]["model"], "base");
    assert!(rows[2]["model"].as_str().unwrap().ends_with("(merged)"));
    let reference = read_json(fixture("eval/expected.json"))["mean_loss"].as_f64().unwrap();
    assert!((loss(0) - reference).abs() < 1e-5 * reference, "base {} vs transformers {reference}", loss(0));
    assert!((loss(1) - loss(0)).abs() > 1e-3, "the adapter changes the loss");
    assert!((loss(2) - loss(1)).abs() < 1e-4, "merged {} vs adapter {}", loss(2), loss(1));
}

/// Full fine-tuning through the command line: torch's 10-step trajectory (tests/fixtures/full)
/// from its batches in order; the logged losses (1e-4 relative) and the model directory written,
/// whose every weight is torch's (1e-5); `--resume` from checkpoint-5/ (the model loaded from it)
/// logs the last 5 losses; `evaluate --other-model` puts the trained model beside the base.
#[test]
fn train_method_full_writes_torchs_model_and_resumes() {
    let t = read_json(fixture("full/trajectory.json"));
    let dir = scratch("cli-full");
    let data = trajectory_data(&t, &dir);
    let flags = format!("--method full {} --max-steps 10 --checkpoint-every 5", trajectory_flags(&t));
    let train = |model: &std::path::Path, out: &std::path::Path, log: &std::path::Path, extra: &[&std::ffi::OsStr]| {
        let (steps, stderr) = train_via_cli(model, &data, out, log, extra, &flags);
        assert!(
            stderr.contains("full fine-tuning of 90432 parameters: about ") && stderr.contains("AdamW moments 0.7 MB"),
            "the estimate: {stderr}"
        );
        steps
    };
    let (out, log) = (dir.join("model"), dir.join("run.jsonl"));
    let steps = train(&fixture("tiny-llama"), &out, &log, &[]);
    let torch: Vec<f64> = serde_json::from_value(t["losses"].clone()).unwrap();
    assert_eq!(steps.len(), 10);
    for (i, ((loss, _), torch)) in steps.iter().zip(&torch).enumerate() {
        assert!((loss - torch).abs() < 1e-4 * torch, "step {}: loss {loss} vs torch {torch}", i + 1);
    }
    let read = |path: std::path::PathBuf| SafetensorsWeights::new(vec![("weights".into(), std::fs::read(path).unwrap())]).unwrap();
    let (ours, reference) = (read(out.join("model.safetensors")), read(fixture("full/final.safetensors")));
    for name in reference.names() {
        let diff = max_abs_diff(&ours.tensor(name).unwrap().data, &reference.tensor(name).unwrap().data);
        assert!(diff < 1e-5, "{name}: max |ours - torch| = {diff}");
    }
    for file in ["config.json", "model.safetensors", "training_summary.json"] {
        assert!(out.join(file).is_file(), "{file}");
    }

    let checkpoint = out.join("checkpoint-5");
    let rest = train(&checkpoint, &dir.join("resumed"), &dir.join("resumed.jsonl"), &["--resume".as_ref(), checkpoint.as_os_str()]);
    assert_eq!(rest.len(), 5, "the resumed run logs steps 6 to 10");
    for (i, ((a, _), (b, _))) in steps[5..].iter().zip(&rest).enumerate() {
        assert!((a - b).abs() < 1e-6, "step {}: resumed {b} vs uninterrupted {a}", i + 6);
    }

    let table = cli()
        .args(["evaluate", "--model"])
        .arg(fixture("tiny-llama"))
        .arg("--other-model")
        .arg(&out)
        .args(["--max-new-tokens", "0", "--data"])
        .arg(fixture("eval/ids.jsonl"))
        .output()
        .unwrap();
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let table = String::from_utf8(table.stdout).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "a header, the base and the trained model: {table}");
    assert!(rows[1].starts_with("base") && rows[2].starts_with(out.to_str().unwrap()), "{table}");
    std::fs::remove_dir_all(&dir).unwrap();
}
