//! The CLI's exact command forms (later issues and outside checks rely on them).

mod common;

use std::process::Command;

use common::*;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_webgpu-lora"))
}

#[test]
fn logits_command_writes_the_golden_logits() {
    let dir = fixture("tiny-llama");
    let input = ids(&read_json(dir.join("expected.json"))["ids"]);
    let out = std::env::temp_dir().join(format!("webgpu-lora-cli-logits-{}.safetensors", std::process::id()));
    let ids_arg = input.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let status = cli().args(["logits", "--model"]).arg(&dir).args(["--ids", &ids_arg, "--out"]).arg(&out).status().unwrap();
    assert!(status.success());
    let ours = expected_logits(out.clone());
    std::fs::remove_file(&out).unwrap();
    let diff = max_abs_diff(&ours, &expected_logits(dir.join("expected.safetensors")));
    assert!(diff < 1e-4, "max diff {diff}");
}

#[test]
fn errors_exit_nonzero_with_the_message() {
    let output = cli().args(["logits", "--model", "/nonexistent/model", "--ids", "1", "--out", "/tmp/x.safetensors"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error: /nonexistent/model: not a directory"), "{stderr}");

    let dir = fixture("tiny-llama");
    let output = cli().args(["logits", "--model"]).arg(&dir).args(["--ids", "1,x", "--out", "/tmp/x.safetensors"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--ids: \"x\" is not a token id"), "{stderr}");

    let output = cli().args(["generate", "--model"]).arg(&dir).args(["--prompt", "hi"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no tokenizer.json"), "{stderr}");
}
