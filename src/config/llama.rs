//! `LlamaConfig`: the Hugging Face `config.json` of a Llama-architecture causal LM: a
//! `LlamaForCausalLM` (Llama 2 and 3.x, with their rotary scalings), a `SmolLM3ForCausalLM`
//! (no rotary embedding on some layers), a `Qwen2ForCausalLM` (bias on q, k and v) or a
//! `Qwen3ForCausalLM` (an RMSNorm on each head of q and k; `head_dim` of its own).
//!
//! Only what the forward pass needs is typed; the rest of the file is kept as it was so that a
//! merged model can be written back with the same config.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The architecture of plain Llama models (and of GGUF files we write).
pub const LLAMA_ARCHITECTURE: &str = "LlamaForCausalLM";

/// The architectures this crate runs, with their config.json `model_type`.
pub const ARCHITECTURES: [(&str, &str); 4] =
    [(LLAMA_ARCHITECTURE, "llama"), ("SmolLM3ForCausalLM", "smollm3"), ("Qwen2ForCausalLM", "qwen2"), ("Qwen3ForCausalLM", "qwen3")];

/// How rotary angles are scaled for contexts longer than the model was trained on
/// (`rope_parameters.rope_type`, or `rope_scaling` in older files).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, the band between them
    /// interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The shape and constants of a Llama-architecture causal LM.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// The family (config.json's `model_type`, one of [`ARCHITECTURES`]).
    pub model_type: &'static str,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Per layer, whether its attention rotates queries and keys (SmolLM3's `no_rope_layers`:
    /// 0 marks a layer without positions, "NoPE"); all true for Llama.
    pub rope_layers: Vec<bool>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Whether q, k and v have a bias (Qwen2's always do; `attention_bias` elsewhere).
    pub qkv_bias: bool,
    /// Whether o has a bias (`attention_bias`; not Qwen2's).
    pub o_bias: bool,
    /// Qwen3's RMSNorm over each head of q and of k, before the rotary embedding.
    pub qk_norm: bool,
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
    no_rope_layers: Option<Vec<u8>>,
    #[serde(default = "default_no_rope_layer_interval")]
    no_rope_layer_interval: usize,
    #[serde(default)]
    use_sliding_window: bool,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_no_rope_layer_interval() -> usize {
    4
}
const DEFAULT_ROPE_THETA: f64 = 10000.0;

impl LlamaConfig {
    /// Parses config.json; `file` names it in errors.
    pub fn from_json(bytes: &[u8], file: &str) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::file(file, format!("not valid JSON: {e}")))?;
        let Value::Object(raw) = value else {
            return Err(Error::file(file, "expected a JSON object"));
        };
        let model_type = check_architecture(&raw, file)?;
        let c: RawConfig =
            serde_json::from_value(Value::Object(raw.clone())).map_err(|e| Error::file(file, format!("not a Llama config: {e}")))?;
        let bad = |m: String| Err(Error::file(file, m));

        if c.mlp_bias {
            return bad("mlp_bias = true is not supported (the MLP's linears have no bias here)".into());
        }
        if let Some(act) = &c.hidden_act {
            if act != "silu" {
                return bad(format!("hidden_act {act:?} is not supported; only \"silu\" (SwiGLU)"));
            }
        }
        if c.use_sliding_window {
            return bad("use_sliding_window = true is not supported for this architecture".into());
        }
        // transformers >= 5 writes `rope_parameters: {rope_theta, rope_type, ...}`; older files
        // `rope_theta` and `rope_scaling`.
        let mut rope_theta = c.rope_theta;
        let mut rope_scaling = RopeScaling::None;
        for (key, params) in [("rope_scaling", &c.rope_scaling), ("rope_parameters", &c.rope_parameters)] {
            if let Some(params) = params.as_ref().filter(|v| !v.is_null()) {
                rope_scaling = parse_rope_scaling(params, key, c.max_position_embeddings, file)?;
                if let Some(theta) = params.get("rope_theta").and_then(Value::as_f64) {
                    rope_theta = Some(theta);
                }
            }
        }
        let rope_layers = match (model_type, &c.no_rope_layers) {
            ("smollm3", Some(layers)) if layers.len() == c.num_hidden_layers => layers.iter().map(|&l| l != 0).collect(),
            ("smollm3", Some(layers)) => {
                return bad(format!("no_rope_layers has {} entries for {} layers", layers.len(), c.num_hidden_layers));
            }
            // transformers' default: every `no_rope_layer_interval`-th layer without positions
            ("smollm3", None) => (0..c.num_hidden_layers).map(|i| (i + 1) % c.no_rope_layer_interval.max(1) != 0).collect(),
            _ => vec![true; c.num_hidden_layers],
        };
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
            model_type,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: rope_theta.unwrap_or(DEFAULT_ROPE_THETA),
            rope_scaling,
            rope_layers,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            qkv_bias: c.attention_bias || model_type == "qwen2",
            o_bias: c.attention_bias && model_type != "qwen2",
            qk_norm: model_type == "qwen3",
            bos_token_id: c.bos_token_id,
            eos_token_ids,
            raw,
        })
    }

    /// The config as JSON text, as it was read (with any changes made to `raw`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&Value::Object(self.raw.clone())).expect("a JSON map serializes")
    }

    /// The id batches are padded with (its labels are ignored): the first end-of-sequence id.
    pub fn pad_token_id(&self) -> u32 {
        self.eos_token_ids.first().copied().unwrap_or(0)
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// The `model_type` of a supported architecture; anything else is refused, naming what was
/// found and what is supported.
fn check_architecture(raw: &Map<String, Value>, file: &str) -> Result<&'static str> {
    let architectures: Vec<&str> =
        raw.get("architectures").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let model_type = raw.get("model_type").and_then(Value::as_str);
    let supported =
        ARCHITECTURES.iter().find(
            |(architecture, kind)| {
                if architectures.is_empty() { model_type == Some(kind) } else { architectures.contains(architecture) }
            },
        );
    if let Some((_, kind)) = supported {
        return Ok(kind);
    }
    let found = if architectures.is_empty() {
        format!("model_type {:?}", model_type.unwrap_or("(none)"))
    } else {
        format!("architectures {architectures:?}")
    };
    let list: Vec<String> = ARCHITECTURES.iter().map(|(a, t)| format!("{a} (model_type \"{t}\")")).collect();
    Err(Error::file(file, format!("unsupported architecture: {found}; supported: {}", list.join(", "))))
}

/// The rotary scaling `params` (the object under `key`) ask for; a kind not implemented is
/// refused: it would silently give wrong logits.
fn parse_rope_scaling(params: &Value, key: &str, max_position_embeddings: usize, file: &str) -> Result<RopeScaling> {
    let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str);
    let number = |name: &str| {
        params.get(name).and_then(Value::as_f64).ok_or_else(|| Error::file(file, format!("{key}.{name} is missing or not a number")))
    };
    match kind {
        None | Some("default") => Ok(RopeScaling::None),
        Some("linear") => Ok(RopeScaling::Linear { factor: number("factor")? }),
        Some("llama3") => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings").unwrap_or(max_position_embeddings as f64),
        }),
        Some(other) => {
            Err(Error::file(file, format!("{key}.rope_type {other:?} is not supported; supported: \"default\", \"linear\" and \"llama3\"")))
        }
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
    fn rope_scalings_and_nope_layers() {
        let c = parse(r#","rope_parameters":{"rope_theta":5e5,"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#).unwrap();
        assert_eq!(
            (c.rope_theta, c.rope_scaling),
            (
                5e5,
                RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 }
            )
        );
        assert_eq!(parse(r#","rope_scaling":{"type":"linear","factor":2.0}"#).unwrap().rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(parse("").unwrap().rope_layers, [true]);
        let smollm3 = |extra: &str| {
            let json = format!(
                r#"{{"architectures":["SmolLM3ForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":8,"num_attention_heads":2{extra}}}"#
            );
            LlamaConfig::from_json(json.as_bytes(), "config.json")
        };
        // transformers' default: no rotary on every fourth layer
        assert_eq!(smollm3("").unwrap().rope_layers, [true, true, true, false, true, true, true, false]);
        assert_eq!(
            smollm3(r#","no_rope_layers":[1,0,1,0,1,0,1,0]"#).unwrap().rope_layers,
            [true, false, true, false, true, false, true, false]
        );
        assert!(smollm3(r#","no_rope_layers":[1,0]"#).unwrap_err().to_string().contains("no_rope_layers has 2 entries for 8 layers"));
        assert!(smollm3(r#","use_sliding_window":true"#).unwrap_err().to_string().contains("use_sliding_window"));
    }

    #[test]
    fn eos_may_be_a_list() {
        assert_eq!(parse(r#","eos_token_id":[2,7]"#).unwrap().eos_token_ids, vec![2, 7]);
        assert_eq!(parse(r#","eos_token_id":2"#).unwrap().eos_token_ids, vec![2]);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let err = parse(r#","rope_scaling":{"rope_type":"yarn","factor":8.0}"#).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("rope_scaling.rope_type \"yarn\" is not supported"), "{err}");
        let err = parse(r#","rope_parameters":{"rope_type":"llama3","factor":8.0}"#).unwrap_err().to_string();
        assert!(err.contains("rope_parameters.low_freq_factor is missing"), "{err}");
        let err = parse(r#","mlp_bias":true"#).unwrap_err().to_string();
        assert!(err.contains("mlp_bias"), "{err}");
        let err = LlamaConfig::from_json(br#"{"architectures":["GPT2LMHeadModel"]}"#, "m/config.json").unwrap_err().to_string();
        assert!(err.starts_with("m/config.json: unsupported architecture") && err.contains("GPT2LMHeadModel"), "{err}");
        assert!(err.contains("supported: LlamaForCausalLM (model_type \"llama\"), SmolLM3ForCausalLM"), "{err}");
        assert!(LlamaConfig::from_json(b"{", "c.json").unwrap_err().to_string().contains("not valid JSON"));
    }
}
