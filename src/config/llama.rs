//! `LlamaConfig`: the Hugging Face `config.json` of a `LlamaForCausalLM`.
//!
//! Only what the forward pass needs is typed; the rest of the file is kept as it was so that a
//! merged model can be written back with the same config.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The architecture this crate runs.
pub const LLAMA_ARCHITECTURE: &str = "LlamaForCausalLM";

/// The shape and constants of a Llama-architecture causal LM.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids: `eos_token_id` may be one id or a list in config.json.
    pub eos_token_ids: Vec<u32>,
    /// The file as read, for writing it back unchanged.
    pub raw: Map<String, Value>,
}

/// The fields read from config.json; defaults are transformers' `LlamaConfig` defaults.
#[derive(Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_position_embeddings() -> usize {
    2048
}
const DEFAULT_ROPE_THETA: f64 = 10000.0;

impl LlamaConfig {
    /// Parses config.json; `file` names it in errors.
    pub fn from_json(bytes: &[u8], file: &str) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::file(file, format!("not valid JSON: {e}")))?;
        let Value::Object(raw) = value else {
            return Err(Error::file(file, "expected a JSON object"));
        };
        check_architecture(&raw, file)?;
        let c: RawConfig =
            serde_json::from_value(Value::Object(raw.clone())).map_err(|e| Error::file(file, format!("not a Llama config: {e}")))?;
        let bad = |m: String| Err(Error::file(file, m));

        if c.attention_bias || c.mlp_bias {
            return bad("attention_bias/mlp_bias = true is not supported (Llama linears have no bias here)".into());
        }
        if let Some(act) = &c.hidden_act {
            if act != "silu" {
                return bad(format!("hidden_act {act:?} is not supported; only \"silu\" (SwiGLU)"));
            }
        }
        if let Some(scaling) = c.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            check_rope_type(scaling, "rope_scaling", file)?;
        }
        // transformers >= 5 writes `rope_parameters: {rope_theta, rope_type}`; older files `rope_theta`.
        let mut rope_theta = c.rope_theta;
        if let Some(params) = c.rope_parameters.as_ref().filter(|v| !v.is_null()) {
            check_rope_type(params, "rope_parameters", file)?;
            if let Some(theta) = params.get("rope_theta").and_then(Value::as_f64) {
                rope_theta = Some(theta);
            }
        }
        let num_key_value_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 && c.head_dim.is_none() {
            return bad(format!("hidden_size {} is not divisible by num_attention_heads {}", c.hidden_size, c.num_attention_heads));
        }
        if num_key_value_heads == 0 || c.num_attention_heads % num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads, num_key_value_heads
            ));
        }
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        if head_dim % 2 != 0 {
            return bad(format!("head_dim {head_dim} must be even for rotary embeddings"));
        }
        let eos_token_ids = match &c.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![n.as_u64().unwrap_or(0) as u32],
            Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).map(|id| id as u32).collect(),
            Some(other) => return bad(format!("eos_token_id must be an id or a list of ids, got {other}")),
        };
        Ok(LlamaConfig {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: rope_theta.unwrap_or(DEFAULT_ROPE_THETA),
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_ids,
            raw,
        })
    }

    /// The config as JSON text, as it was read (with any changes made to `raw`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&Value::Object(self.raw.clone())).expect("a JSON map serializes")
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// Refuses anything but a Llama causal LM, naming what was found.
fn check_architecture(raw: &Map<String, Value>, file: &str) -> Result<()> {
    let architectures: Vec<&str> =
        raw.get("architectures").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let model_type = raw.get("model_type").and_then(Value::as_str);
    let is_llama = if architectures.is_empty() { model_type == Some("llama") } else { architectures.contains(&LLAMA_ARCHITECTURE) };
    if is_llama {
        return Ok(());
    }
    let found = if architectures.is_empty() {
        format!("model_type {:?}", model_type.unwrap_or("(none)"))
    } else {
        format!("architectures {architectures:?}")
    };
    Err(Error::file(file, format!("unsupported architecture: {found}; only {LLAMA_ARCHITECTURE} (model_type \"llama\") is supported")))
}

/// Only plain rotary embeddings are implemented; scaled variants would silently give wrong logits.
fn check_rope_type(params: &Value, key: &str, file: &str) -> Result<()> {
    let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str);
    match kind {
        None | Some("default") => Ok(()),
        Some(other) => Err(Error::file(file, format!("{key}.rope_type {other:?} is not supported; only the default rotary embedding"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
        "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1"#;

    fn parse(extra: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_json(format!("{BASE}{extra}}}").as_bytes(), "config.json")
    }

    #[test]
    fn rope_theta_from_either_key_and_transformers_defaults() {
        assert_eq!(parse("").unwrap().rope_theta, 10000.0);
        assert_eq!(parse(r#","rope_theta":5e5"#).unwrap().rope_theta, 5e5);
        let c = parse(r#","rope_parameters":{"rope_theta":1e5,"rope_type":"default"}"#).unwrap();
        assert_eq!(c.rope_theta, 1e5);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn eos_may_be_a_list() {
        assert_eq!(parse(r#","eos_token_id":[2,7]"#).unwrap().eos_token_ids, vec![2, 7]);
        assert_eq!(parse(r#","eos_token_id":2"#).unwrap().eos_token_ids, vec![2]);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let err = parse(r#","rope_scaling":{"rope_type":"llama3","factor":8.0}"#).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("llama3"), "{err}");
        let err = parse(r#","attention_bias":true"#).unwrap_err().to_string();
        assert!(err.contains("attention_bias"), "{err}");
        let err = LlamaConfig::from_json(br#"{"architectures":["GPT2LMHeadModel"]}"#, "m/config.json").unwrap_err().to_string();
        assert!(err.starts_with("m/config.json: unsupported architecture") && err.contains("GPT2LMHeadModel"), "{err}");
        assert!(LlamaConfig::from_json(b"{", "c.json").unwrap_err().to_string().contains("not valid JSON"));
    }
}
