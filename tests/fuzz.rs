//! Every parser of untrusted bytes fed mutated files, on stable Rust: safetensors (headers,
//! offsets, the sharded index), GGUF (header, metadata, tensor infos, quantized blocks, the model
//! built from them), config.json, PEFT adapters (adapter_config.json and their safetensors),
//! tokenizer.json, chat templates and training JSONL. Each input is a committed fixture (the seed
//! corpus) with a few mutations a fuzzer makes: bit flips, extreme integers written over the
//! bytes (sizes, counts, offsets, lengths), truncation, deletion, duplication and, for text,
//! JSON and Jinja fragments spliced in.
//!
//! An input fails the run if it panics, takes longer than a second, or makes any single
//! allocation over 256 MiB (every seed is under 256 KiB: a header's claimed size must be refused
//! before anything is allocated). Errors are the expected outcome. `npm test` runs a smoke pass;
//! `npm run fuzz` (WEBGPU_LORA_FUZZ_EXECS, default 1,000,000 per target) the long one. A failure
//! names the target, the seed file and the iteration, which replays it
//! (WEBGPU_LORA_FUZZ_ONLY=target WEBGPU_LORA_FUZZ_FROM=iteration WEBGPU_LORA_FUZZ_EXECS=1;
//! WEBGPU_LORA_FUZZ_SAVE=FILE writes the input there before it runs).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fixture;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use webgpu_lora::config::LlamaConfig;
use webgpu_lora::io::gguf_convert::GgufModel;
use webgpu_lora::io::{ChatMessage, SafetensorsWeights, TextTokenizer};
use webgpu_lora::lora::{AdapterFiles, AdapterSource};
use webgpu_lora::train::{DataOptions, read_dataset};

/// The largest single allocation any input may make.
const ALLOCATION_CAP: usize = 256 << 20;
/// The longest any input may take.
const TIME_CAP: Duration = Duration::from_secs(1);
/// Inputs per target in the smoke pass of `cargo test`.
const SMOKE_EXECS: u64 = 1500;

/// The allocator of this test binary: the system's, refusing (and reporting) any allocation over
/// [`ALLOCATION_CAP`] while an input runs.
struct Capped;

static RUNNING: AtomicUsize = AtomicUsize::new(usize::MAX);
static ITERATION: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_CAP && RUNNING.load(Ordering::Relaxed) != usize::MAX {
            report_allocation(layout.size());
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_CAP && RUNNING.load(Ordering::Relaxed) != usize::MAX {
            report_allocation(new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// Writes which input asked for how much, without allocating, and aborts: the input is a bug.
fn report_allocation(size: usize) -> ! {
    fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return &buf[i..];
            }
        }
    }
    let target = TARGETS.get(RUNNING.load(Ordering::Relaxed)).map_or("?", |t| t.name);
    let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
    let parts: [&[u8]; 7] = [
        b"\nfuzz: target ",
        target.as_bytes(),
        b", iteration ",
        digits(ITERATION.load(Ordering::Relaxed), &mut a),
        b": one allocation of ",
        digits(size as u64, &mut b),
        b" bytes, over the 256 MiB cap\n",
    ];
    for part in parts {
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    std::process::abort();
}

/// A parser under test: its name, its seed files (fixtures), and a run over one mutated input.
struct Target {
    name: &'static str,
    seeds: &'static [&'static str],
    text: bool,
    run: fn(&[u8]),
}

const TARGETS: &[Target] = &[
    Target {
        name: "safetensors",
        seeds: &["tiny-llama/model.safetensors", "peft/qv-r8/adapter_model.safetensors"],
        text: false,
        run: safetensors,
    },
    Target { name: "sharded-index", seeds: &["tiny-llama-sharded/model.safetensors.index.json"], text: true, run: sharded_index },
    Target {
        name: "gguf",
        seeds: &["quant/tiny-q4_0.gguf", "quant/tiny-q8_0.gguf", "quant/tiny-q5_0.gguf", "quant/blocks.gguf", "quant/adapter-qv-r8.gguf"],
        text: false,
        run: gguf,
    },
    Target { name: "config.json", seeds: &["tiny-llama/config.json", "tiny-chat/config.json"], text: true, run: config },
    Target {
        name: "adapter_config.json",
        seeds: &["peft/qv-r8/adapter_config.json", "peft/rank-pattern/adapter_config.json"],
        text: true,
        run: adapter_config,
    },
    Target { name: "tokenizer.json", seeds: &["tiny-chat/tokenizer.json"], text: true, run: tokenizer },
    Target { name: "chat-template", seeds: &["tiny-chat/tokenizer_config.json"], text: true, run: chat_template },
    Target { name: "training-jsonl", seeds: &["../../data/robot/val.jsonl"], text: true, run: training_jsonl },
];

fn safetensors(bytes: &[u8]) {
    if let Ok(weights) = SafetensorsWeights::new(vec![("model.safetensors".into(), bytes.to_vec())]) {
        for name in weights.names().iter().map(|n| n.to_string()).collect::<Vec<_>>() {
            let _ = weights.tensor(&name);
        }
    }
}

fn sharded_index(bytes: &[u8]) {
    let Ok(names) = SafetensorsWeights::shard_names(bytes) else { return };
    let shard = |name: &str| std::fs::read(fixture("tiny-llama-sharded").join(name)).ok();
    let mut files: Vec<(String, Vec<u8>)> = vec![("model.safetensors.index.json".into(), bytes.to_vec())];
    files.extend(names.iter().filter_map(|n| shard(n).map(|b| (n.clone(), b))));
    if let Ok(weights) = SafetensorsWeights::new(files) {
        for name in weights.names().iter().map(|n| n.to_string()).collect::<Vec<_>>() {
            let _ = weights.tensor(&name);
        }
    }
}

fn gguf(bytes: &[u8]) {
    let Ok(model) = GgufModel::parse("fuzz.gguf", bytes.to_vec()) else { return };
    for name in model.weights.names().map(str::to_string).collect::<Vec<_>>() {
        let _ = model.weights.tensor_f32(&name);
    }
    let _ = model.text_files(model.stored_dtype());
}

fn config(bytes: &[u8]) {
    let _ = LlamaConfig::from_json(bytes, "config.json");
}

fn adapter_config(bytes: &[u8]) {
    let weights = std::fs::read(fixture("peft/qv-r8/adapter_model.safetensors")).unwrap();
    let files = AdapterFiles { config_json: String::from_utf8_lossy(bytes).into_owned(), safetensors: weights };
    let _ = AdapterSource::from_files(files, "fuzz").read();
}

fn tokenizer(bytes: &[u8]) {
    if let Ok(tokenizer) = TextTokenizer::from_files(bytes, None, None) {
        if let Ok(ids) = tokenizer.encode("Hello, wörld! 123 <|im_start|>", true) {
            let _ = tokenizer.decode(&ids, false);
        }
    }
}

fn chat_template(bytes: &[u8]) {
    static TOKENIZER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let tokenizer_json = TOKENIZER.get_or_init(|| std::fs::read(fixture("tiny-chat/tokenizer.json")).unwrap());
    if let Ok(tokenizer) = TextTokenizer::from_files(tokenizer_json, Some(bytes), None) {
        let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi"), ChatMessage::new("assistant", "Hello")];
        let _ = tokenizer.apply_chat_template(&messages, true);
    }
}

fn training_jsonl(bytes: &[u8]) {
    static TOKENIZER: std::sync::OnceLock<TextTokenizer> = std::sync::OnceLock::new();
    let tokenizer = TOKENIZER.get_or_init(|| {
        let dir = fixture("tiny-chat");
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        TextTokenizer::from_files(&read("tokenizer.json"), Some(&read("tokenizer_config.json")), None).unwrap()
    });
    let _ = read_dataset("data.jsonl", bytes, Some(tokenizer), &DataOptions::default());
}

/// Integers that break size arithmetic, written over a file's bytes.
const INTERESTING: [u64; 12] = [0, 1, 0x7f, 0xff, 0x7fff_ffff, 0xffff_ffff, 1 << 31, 1 << 32, 1 << 40, 1 << 62, i64::MAX as u64, u64::MAX];
/// Fragments spliced into text files.
const FRAGMENTS: [&str; 18] = [
    "-1",
    "1e308",
    "99999999999999999999999",
    "4294967296",
    "null",
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\\u0000",
    "[[[[[[[[[[[[[[[[[[[[",
    "{% for i in range(100000) %}{{ i }}{% endfor %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ 'x' * 100000000 }}",
    "\n",
    "\u{fffd}",
];

/// `seed` with one to four mutations.
fn mutate(seed: &[u8], text: bool, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = if b.is_empty() { 0 } else { rng.random_range(0..b.len()) };
        match rng.random_range(0..if text { 8 } else { 7 }) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.random_range(0..8),
            1 if !b.is_empty() => b[at] = [0, 0xff, 0x7f, 0x80][rng.random_range(0..4)],
            2 => {
                let value = INTERESTING[rng.random_range(0..INTERESTING.len())].to_le_bytes();
                let width = [4, 8][rng.random_range(0..2)];
                for (i, byte) in value[..width].iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = *byte;
                    }
                }
            }
            3 => b.truncate(at),
            4 => {
                let end = (at + rng.random_range(1..64)).min(b.len());
                b.drain(at..end);
            }
            5 => {
                let end = (at + rng.random_range(1..256)).min(b.len());
                let chunk = b[at..end].to_vec();
                let to = rng.random_range(0..=b.len());
                b.splice(to..to, chunk);
            }
            6 => {
                let mut noise = vec![0u8; rng.random_range(1..16)];
                rng.fill_bytes(&mut noise);
                b.splice(at..at, noise);
            }
            _ => {
                let fragment = FRAGMENTS[rng.random_range(0..FRAGMENTS.len())];
                // over a number or at a random place
                let end = (at + rng.random_range(0..8)).min(b.len());
                b.splice(at..end, fragment.bytes());
            }
        }
    }
    b
}

/// The first failure's description, taken by the panic hook.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Runs `execs` inputs of target `index` from iteration `from`; returns the failures.
fn fuzz(index: usize, from: u64, execs: u64) -> Vec<String> {
    let target = &TARGETS[index];
    let seeds: Vec<(String, Vec<u8>)> =
        target.seeds.iter().map(|s| (s.to_string(), std::fs::read(fixture(s)).unwrap_or_else(|e| panic!("seed {s}: {e}")))).collect();
    let save = std::env::var("WEBGPU_LORA_FUZZ_SAVE").ok();
    let mut failures = Vec::new();
    for iteration in from..from + execs {
        let mut rng = ChaCha8Rng::seed_from_u64(iteration ^ ((index as u64) << 48));
        let (seed_name, seed) = &seeds[rng.random_range(0..seeds.len())];
        let input = mutate(seed, target.text, &mut rng);
        if let Some(path) = &save {
            std::fs::write(path, &input).unwrap();
        }
        ITERATION.store(iteration, Ordering::Relaxed);
        RUNNING.store(index, Ordering::Relaxed);
        let start = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        let took = start.elapsed();
        RUNNING.store(usize::MAX, Ordering::Relaxed);
        let what = format!("target {}, seed {seed_name}, iteration {iteration}", target.name);
        if outcome.is_err() {
            failures.push(format!("{what}: panicked: {}", PANIC.lock().unwrap().take().unwrap_or_default()));
        } else if took > TIME_CAP {
            failures.push(format!("{what}: took {took:?}"));
        }
        if failures.len() >= 5 {
            break;
        }
    }
    failures
}

#[test]
fn parsers_survive_mutated_files() {
    std::panic::set_hook(Box::new(|info| {
        let mut slot = PANIC.lock().unwrap();
        slot.get_or_insert_with(|| info.to_string());
    }));
    let env = |key: &str| std::env::var(key).ok();
    let execs = env("WEBGPU_LORA_FUZZ_EXECS").map_or(SMOKE_EXECS, |v| v.parse().expect("WEBGPU_LORA_FUZZ_EXECS: a count"));
    let from = env("WEBGPU_LORA_FUZZ_FROM").map_or(0, |v| v.parse().expect("WEBGPU_LORA_FUZZ_FROM: an iteration"));
    let only = env("WEBGPU_LORA_FUZZ_ONLY");
    let mut failures = Vec::new();
    for (index, target) in TARGETS.iter().enumerate() {
        if only.as_deref().is_some_and(|o| o != target.name) {
            continue;
        }
        let start = Instant::now();
        let found = fuzz(index, from, execs);
        let rate = execs as f64 / start.elapsed().as_secs_f64();
        eprintln!("fuzz: {:<20} {execs} inputs, {} failures, {:.0} inputs/s", target.name, found.len(), rate);
        failures.extend(found);
    }
    let _ = std::panic::take_hook();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
