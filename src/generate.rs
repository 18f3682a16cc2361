//! Token generation: greedy or sampled (temperature, top-k, top-p), a repetition penalty as
//! transformers applies it, stop at end-of-sequence or any stop token, each token streamed to a
//! callback that may also cancel. Sampling runs on the host over the last position's logits.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::LlamaModel;
use crate::tensor::read_f32;

/// How to pick tokens. `temperature == 0` means greedy. The CLI's `generate` flags derive from
/// it (clap); JS passes it in camelCase (serde; unknown keys are refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerationConfig {
    #[arg(long, default_value_t = defaults().max_new_tokens)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = defaults().temperature)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = defaults().top_k)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    #[arg(long, default_value_t = defaults().top_p)]
    pub top_p: f32,
    /// > 1 discourages tokens already in the sequence (1: off).
    #[arg(long, default_value_t = defaults().repetition_penalty)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,
    /// Generation ends (without emitting it) at any of these; the model's EOS ids are added.
    #[arg(long, value_delimiter = ',')]
    pub stop_token_ids: Vec<u32>,
    /// Text generation ends where any of these strings appears; the text stops before it.
    #[arg(long)]
    pub stop: Vec<String>,
}

fn defaults() -> GenerationConfig {
    GenerationConfig::default()
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
        }
    }
}

impl GenerationConfig {
    /// Rejects settings that have no meaning, naming the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::invalid(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0 (0 = greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be a finite number > 0 (1 = off)");
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StopReason {
    /// A stop or end-of-sequence token (not included in the output).
    StopToken,
    MaxNewTokens,
    /// The callback asked to stop.
    Cancelled,
    /// The model's context is full.
    ContextFull,
    /// One of the stop strings appeared.
    StopString,
}

/// The generated ids and why generation stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
}

/// Picks next tokens from logits according to a [`GenerationConfig`].
pub struct Sampler {
    config: GenerationConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: GenerationConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Sampler { config, rng }
    }

    /// The next token given the last position's logits and every id so far.
    pub fn next(&mut self, logits: &mut [f32], previous: &[u32]) -> u32 {
        self.penalize(logits, previous);
        if self.config.temperature == 0.0 {
            return argmax(logits);
        }
        let candidates = self.distribution(logits);
        let mut r = self.rng.random::<f32>();
        for &(id, p) in &candidates {
            r -= p;
            if r <= 0.0 {
                return id;
            }
        }
        candidates.last().expect("at least one candidate").0
    }

    /// The repetition penalty on every distinct id so far, as transformers applies it: a
    /// positive logit divided by the penalty, a negative one multiplied (once per id, however
    /// often it occurred).
    pub fn penalize(&self, logits: &mut [f32], previous: &[u32]) {
        let penalty = self.config.repetition_penalty;
        if penalty == 1.0 {
            return;
        }
        let distinct: std::collections::BTreeSet<u32> = previous.iter().copied().collect();
        for id in distinct {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }

    /// The distribution a sampled token is drawn from, given penalized logits: temperature, then
    /// top-k, then top-p (the most likely tokens until the mass before the next reaches top_p;
    /// the first always stays), as transformers' warpers: (id, probability) pairs, most likely
    /// first, summing to 1.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / self.config.temperature)).collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.config.top_k > 0 {
            candidates.truncate(self.config.top_k);
        }
        let max = candidates[0].1;
        candidates.iter_mut().for_each(|c| c.1 = (c.1 - max).exp());
        let sum: f32 = candidates.iter().map(|c| c.1).sum();
        candidates.iter_mut().for_each(|c| c.1 /= sum);
        if self.config.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = candidates.iter().take_while(|c| {
                let before = mass;
                mass += c.1;
                before < self.config.top_p
            });
            let keep = keep.count().max(1);
            candidates.truncate(keep);
            let kept: f32 = candidates.iter().map(|c| c.1).sum();
            candidates.iter_mut().for_each(|c| c.1 /= kept);
        }
        candidates
    }
}

/// Index of the largest value (the first on ties, as torch.argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates after `prompt`, calling `on_token(id)` for each new token; it returns false to cancel.
/// Uses the KV cache: the prompt is one forward pass, then one position per token.
pub async fn generate(
    model: &LlamaModel,
    prompt: &[u32],
    config: &GenerationConfig,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation> {
    config.validate()?;
    model.check_ids(prompt)?;
    let context = model.config.max_position_embeddings;
    if prompt.len() >= context {
        return Err(Error::invalid(format!("the prompt has {} tokens; this model's context is {context}", prompt.len())));
    }
    let mut stop: Vec<u32> = config.stop_token_ids.clone();
    stop.extend(&model.config.eos_token_ids);

    let mut sampler = Sampler::new(config.clone());
    // room for the first 256 new tokens without reallocating; a longer generation grows it by doubling
    let mut cache = model.new_cache_for(prompt.len() + config.max_new_tokens.min(256));
    let mut sequence = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut input = prompt.to_vec();
    let stop_reason = loop {
        if tokens.len() >= config.max_new_tokens {
            break StopReason::MaxNewTokens;
        }
        if sequence.len() >= context {
            break StopReason::ContextFull;
        }
        let logits = model.forward_last(model.ids_tensor(&input), Some(&mut cache));
        let mut logits = read_f32(logits).await?;
        let next = sampler.next(&mut logits, &sequence);
        if stop.contains(&next) {
            break StopReason::StopToken;
        }
        tokens.push(next);
        sequence.push(next);
        if !on_token(next) {
            break StopReason::Cancelled;
        }
        input = vec![next];
    };
    Ok(Generation { tokens, stop_reason })
}

/// Cuts streamed text at the first stop string. Text that could be the start of a stop string is
/// held back until the next piece decides, so a stop string is never streamed, not even in part.
pub struct StopText<'a> {
    stops: &'a [String],
    pending: String,
}

impl<'a> StopText<'a> {
    pub fn new(stops: &'a [String]) -> Self {
        StopText { stops, pending: String::new() }
    }

    /// Adds a decoded piece: (the text now safe to emit, whether a stop string was reached).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let held = (0..self.pending.len())
            .filter(|&i| self.pending.is_char_boundary(i))
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.pending[i..])))
            .unwrap_or(self.pending.len());
        (self.pending.drain(..held).collect(), false)
    }

    /// The text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams `pieces` through StopText: (everything emitted, stopped).
    fn stream(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut stop = StopText::new(&stops);
        let mut out = Vec::new();
        for piece in pieces {
            let (text, hit) = stop.push(piece);
            out.push(text);
            if hit {
                return (out, true);
            }
        }
        out.push(stop.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_cut_the_text_and_are_never_streamed() {
        // a stop string split over pieces: its first part is held back, then dropped
        assert_eq!(
            stream(&["\nUser:"], &["Hi", " there\n", "Us", "er: more"]),
            (vec!["Hi".into(), " there".into(), "".into(), "".into()], true)
        );
        // a held-back prefix that turns out not to be a stop string is released in order
        assert_eq!(stream(&["END"], &["a E", "N", "d b"]), (vec!["a ".into(), "".into(), "ENd b".into(), "".into()], false));
        // the earliest of several stop strings wins; multi-byte text is cut on char boundaries
        assert_eq!(stream(&["é!", "zz"], &["caf", "é! zz"]), (vec!["caf".into(), "".into()], true));
        assert_eq!(stream(&["é!"], &["café", " ok"]), (vec!["caf".into(), "é ok".into(), "".into()], false));
        assert_eq!(stream(&[], &["a", "b"]), (vec!["a".into(), "b".into(), "".into()], false));
    }

    fn sample_many(config: GenerationConfig, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(config);
        (0..n).map(|_| s.next(&mut logits.to_vec(), &[])).collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(sample_many(GenerationConfig::default(), &[0.0, 1.0, 5.0], 3), vec![2, 2, 2]);
    }

    /// transformers' RepetitionPenalty, Temperature, TopK and TopP processors on fixed logits
    /// (tests/fixtures/sampling, made by make_fixtures.py): the same distribution, each kept
    /// token's probability within 1e-6, every other token dropped; a repeated id penalized once.
    #[test]
    fn distributions_are_transformers_processors() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sampling");
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let expected = crate::io::SafetensorsWeights::new(vec![("expected.safetensors".into(), bytes)]).unwrap();
        let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        let previous: Vec<u32> = serde_json::from_value(spec["previous"].clone()).unwrap();
        let logits = expected.tensor("logits").unwrap().data;
        let settings = spec["settings"].as_array().unwrap();
        for (i, s) in settings.iter().enumerate() {
            let config = GenerationConfig {
                temperature: s["temperature"].as_f64().unwrap() as f32,
                top_k: s["top_k"].as_u64().unwrap() as usize,
                top_p: s["top_p"].as_f64().unwrap() as f32,
                repetition_penalty: s["repetition_penalty"].as_f64().unwrap() as f32,
                ..Default::default()
            };
            let sampler = Sampler::new(config);
            let mut penalized = logits.clone();
            sampler.penalize(&mut penalized, &previous);
            let mut ours = vec![0.0f32; logits.len()];
            for (id, p) in sampler.distribution(&penalized) {
                ours[id as usize] = p;
            }
            let theirs = expected.tensor(&format!("probs.{i}")).unwrap().data;
            for (id, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!((a - b).abs() < 1e-6 && (*a == 0.0) == (*b == 0.0), "setting {s}: token {id}: {a} vs transformers' {b}");
            }
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0, 1.0, 2.0, 3.0];
        let base = GenerationConfig { temperature: 1.0, ..Default::default() };
        let k2 = sample_many(GenerationConfig { top_k: 2, ..base.clone() }, &logits, 500);
        assert!(k2.iter().all(|&t| t >= 2) && k2.contains(&2) && k2.contains(&3));
        // probabilities: 0.644, 0.237, 0.087, 0.032 -> top_p 0.7 keeps ids 3 and 2
        let p = sample_many(GenerationConfig { top_p: 0.7, ..base.clone() }, &logits, 500);
        assert!(p.iter().all(|&t| t >= 2) && p.contains(&2));
        let all = sample_many(base, &logits, 2000);
        assert!((0..4).all(|t| all.contains(&t)));
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let c = GenerationConfig { temperature: 1.0, seed: 7, ..Default::default() };
        assert_eq!(sample_many(c.clone(), &logits, 30), sample_many(c.clone(), &logits, 30));
        assert_ne!(
            sample_many(c, &logits, 30),
            sample_many(GenerationConfig { temperature: 1.0, seed: 8, ..Default::default() }, &logits, 30)
        );
    }

    #[test]
    fn repetition_penalty_as_transformers() {
        let mut s = Sampler::new(GenerationConfig { repetition_penalty: 2.0, ..Default::default() });
        let mut logits = vec![4.0, 3.0, -1.0];
        // token 0: 4 / 2 = 2 < 3, so token 1 wins; negative logits are multiplied
        assert_eq!(s.next(&mut logits, &[0, 2]), 1);
        assert_eq!(logits, vec![2.0, 3.0, -2.0]);
    }

    #[test]
    fn invalid_settings_are_named() {
        let err = GenerationConfig { top_p: 0.0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.contains("top_p"), "{err}");
        let err = GenerationConfig { temperature: -1.0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.contains("temperature"), "{err}");
    }
}
