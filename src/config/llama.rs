//! `LlamaConfig`: the Hugging Face `config.json` of a Llama-architecture causal LM: a
//! `LlamaForCausalLM` (Llama 2 and 3.x, with their rotary scalings), a `SmolLM3ForCausalLM`
//! (no rotary embedding on some layers), a `Qwen2ForCausalLM` (bias on q, k and v), a
//! `Qwen3ForCausalLM` (an RMSNorm on each head of q and k; `head_dim` of its own) or a
//! `Gemma3ForCausalLM` (GeGLU, RMSNorm by 1 + weight, scaled embeddings, norms after attention
//! and the MLP too, q/k norms, its own attention scale, and sliding-window layers with a rotary
//! base of their own).
//!
//! Only what the forward pass needs is typed; the rest of the file is kept as it was so that a
//! merged model can be written back with the same config.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The architecture of plain Llama models (and of GGUF files we write).
pub const LLAMA_ARCHITECTURE: &str = "LlamaForCausalLM";

/// The architectures this crate runs, with their config.json `model_type`.
pub const ARCHITECTURES: [(&str, &str); 5] = [
    (LLAMA_ARCHITECTURE, "llama"),
    ("SmolLM3ForCausalLM", "smollm3"),
    ("Qwen2ForCausalLM", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3"),
    ("Gemma3ForCausalLM", "gemma3_text"),
];

/// Gemma 3's `model_type`.
const GEMMA3: &str = "gemma3_text";

/// Config keys of features not implemented, refused when set (not null, not false): each
/// would change the logits silently if ignored.
const MUST_BE_UNSET: [&str; 4] = ["final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention", "num_experts"];

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

/// The activation of a gated MLP, and its derivative (the backward's act'):
///
/// ```text
/// Silu:      act(x) = x s,                       s = sigmoid(x);  act'(x) = s (1 + x - act(x))
/// GeluTanh:  act(x) = x/2 (1 + t),  t = tanh(c (x + k x^3)),  c = sqrt(2/pi), k = 0.044715;
///            act'(x) = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 k x^2)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU's (Llama, Qwen, SmolLM: `hidden_act` "silu").
    Silu,
    /// GeGLU's (Gemma: `hidden_activation` "gelu_pytorch_tanh", torch's `gelu(approximate="tanh")`).
    GeluTanh,
}

/// A rotary embedding: the base of its frequencies and their scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// How one layer attends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerAttention {
    /// Whether queries and keys are rotated by their positions (false: SmolLM3's NoPE layers).
    pub rope: bool,
    /// Gemma 3's sliding layers: each query sees only the last `window` keys (itself included),
    /// and the rotary embedding is [`LlamaConfig::local_rope`].
    pub sliding_window: Option<usize>,
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
    /// The rotary embedding (of Gemma 3's full-attention layers).
    pub rope: Rope,
    /// The rotary embedding of Gemma 3's sliding layers (`rope_local_base_freq`).
    pub local_rope: Option<Rope>,
    /// Per layer, how it attends: SmolLM3's `no_rope_layers` (0 marks a layer without
    /// positions, "NoPE"), Gemma 3's `layer_types`.
    pub layers: Vec<LayerAttention>,
    /// The scale of attention scores: 1 / sqrt(head_dim), Gemma 3's 1 / sqrt(query_pre_attn_scalar).
    pub attention_scale: f64,
    /// The gated MLP's activation (SwiGLU's silu; Gemma's GeGLU).
    pub activation: Activation,
    /// Gemma's RMSNorm, which scales by 1 + weight (the weight as stored is its offset from 1).
    pub norm_adds_one: bool,
    /// Gemma's embeddings, multiplied by sqrt(hidden_size).
    pub embed_scale: Option<f32>,
    /// Gemma's norms after attention and after the MLP too (`post_attention_layernorm` then
    /// normalises attention's output; the MLP's input gets `pre_feedforward_layernorm`).
    pub post_norms: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Whether q, k and v have a bias (Qwen2's always do; `attention_bias` elsewhere).
    pub qkv_bias: bool,
    /// Whether o has a bias (`attention_bias`; not Qwen2's).
    pub o_bias: bool,
    /// Qwen3's and Gemma 3's RMSNorm over each head of q and of k, before the rotary embedding.
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
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    no_rope_layers: Option<Vec<u8>>,
    #[serde(default = "default_no_rope_layer_interval")]
    no_rope_layer_interval: usize,
    #[serde(default)]
    use_sliding_window: bool,
    // Gemma 3
    rope_local_base_freq: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    #[serde(default = "default_sliding_window")]
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    #[serde(default = "default_sliding_window_pattern")]
    sliding_window_pattern: usize,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_sliding_window() -> Option<usize> {
    Some(4096)
}
fn default_sliding_window_pattern() -> usize {
    6
}
fn default_no_rope_layer_interval() -> usize {
    4
}
const DEFAULT_ROPE_THETA: f64 = 10000.0;
/// Gemma 3's defaults: the full-attention and sliding layers' rotary bases.
const GEMMA3_ROPE_THETA: [f64; 2] = [1_000_000.0, 10_000.0];

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
        let gemma = model_type == GEMMA3;

        if c.mlp_bias {
            return bad("mlp_bias = true is not supported (the MLP's linears have no bias here)".into());
        }
        if let Some(key) = MUST_BE_UNSET.iter().find(|key| raw.get(**key).is_some_and(|v| !v.is_null() && *v != Value::Bool(false))) {
            return bad(format!("{key} = {} is not supported; it must be null or absent", raw[*key]));
        }
        let activation = match (gemma, c.hidden_activation.as_deref().or(c.hidden_act.as_deref())) {
            (false, None | Some("silu")) => Activation::Silu,
            (true, None | Some("gelu_pytorch_tanh")) => Activation::GeluTanh,
            (_, Some(act)) => {
                let (key, supported) =
                    if gemma { ("hidden_activation", "\"gelu_pytorch_tanh\" (GeGLU)") } else { ("hidden_act", "\"silu\" (SwiGLU)") };
                return bad(format!("{key} {act:?} is not supported; only {supported}"));
            }
        };
        if c.use_sliding_window {
            return bad("use_sliding_window = true is not supported for this architecture".into());
        }
        let (rope, local_rope) = parse_rope(&c, gemma, file)?;
        let layers = layer_attention(&c, model_type, file)?;
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
            rope,
            local_rope,
            layers,
            // transformers: a Python float, rounded to f32 where it scales
            attention_scale: c.query_pre_attn_scalar.filter(|_| gemma).unwrap_or(head_dim as f64).powf(-0.5),
            activation,
            norm_adds_one: gemma,
            embed_scale: gemma.then(|| (c.hidden_size as f64).sqrt() as f32),
            post_norms: gemma,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(if gemma { 131_072 } else { 2048 }),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias: c.attention_bias || model_type == "qwen2",
            o_bias: c.attention_bias && model_type != "qwen2",
            qk_norm: model_type == "qwen3" || gemma,
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

/// The rotary embedding, and Gemma 3's sliding layers' own. transformers >= 5 writes
/// `rope_parameters: {rope_theta, rope_type, ...}` (Gemma 3: one such object per layer type);
/// older files `rope_theta`, `rope_scaling` and Gemma's `rope_local_base_freq`.
fn parse_rope(c: &RawConfig, gemma: bool, file: &str) -> Result<(Rope, Option<Rope>)> {
    let max_positions = c.max_position_embeddings.unwrap_or(2048);
    let [global_theta, local_theta] = if gemma { GEMMA3_ROPE_THETA } else { [DEFAULT_ROPE_THETA; 2] };
    let parse = |params: &Value, key: &str, theta: f64| -> Result<Rope> {
        Ok(Rope {
            theta: params.get("rope_theta").and_then(Value::as_f64).unwrap_or(theta),
            scaling: parse_rope_scaling(params, key, max_positions, file)?,
        })
    };
    let mut rope = Rope { theta: c.rope_theta.unwrap_or(global_theta), scaling: RopeScaling::None };
    let mut local_rope = gemma.then_some(Rope { theta: c.rope_local_base_freq.unwrap_or(local_theta), scaling: RopeScaling::None });
    for (key, params) in [("rope_scaling", &c.rope_scaling), ("rope_parameters", &c.rope_parameters)] {
        let Some(params) = params.as_ref().filter(|v| !v.is_null()) else { continue };
        match (params.get("full_attention"), params.get("sliding_attention")) {
            (None, None) => rope = parse(params, key, rope.theta)?,
            (full, sliding) => {
                if let Some(full) = full {
                    rope = parse(full, &format!("{key}.full_attention"), rope.theta)?;
                }
                if let (Some(sliding), Some(local)) = (sliding, local_rope.as_mut()) {
                    *local = parse(sliding, &format!("{key}.sliding_attention"), local.theta)?;
                }
            }
        }
    }
    Ok((rope, local_rope))
}

/// How each layer attends: SmolLM3's `no_rope_layers` (transformers' default: every
/// `no_rope_layer_interval`-th layer without positions), Gemma 3's `layer_types` (default: every
/// `sliding_window_pattern`-th layer full attention, the others sliding).
fn layer_attention(c: &RawConfig, model_type: &str, file: &str) -> Result<Vec<LayerAttention>> {
    let n = c.num_hidden_layers;
    let bad = |m: String| Err(Error::file(file, m));
    let full = LayerAttention { rope: true, sliding_window: None };
    match model_type {
        "smollm3" => {
            let rope: Vec<bool> = match &c.no_rope_layers {
                Some(layers) if layers.len() == n => layers.iter().map(|&l| l != 0).collect(),
                Some(layers) => return bad(format!("no_rope_layers has {} entries for {n} layers", layers.len())),
                None => (0..n).map(|i| (i + 1) % c.no_rope_layer_interval.max(1) != 0).collect(),
            };
            Ok(rope.into_iter().map(|rope| LayerAttention { rope, sliding_window: None }).collect())
        }
        GEMMA3 => {
            let types: Vec<String> = match &c.layer_types {
                Some(types) if types.len() == n => types.clone(),
                Some(types) => return bad(format!("layer_types has {} entries for {n} layers", types.len())),
                None => (0..n)
                    .map(|i| {
                        if (i + 1) % c.sliding_window_pattern.max(1) != 0 { "sliding_attention" } else { "full_attention" }.to_string()
                    })
                    .collect(),
            };
            types
                .iter()
                .map(|kind| match (kind.as_str(), c.sliding_window) {
                    ("full_attention", _) => Ok(full),
                    ("sliding_attention", Some(window)) if window > 0 => Ok(LayerAttention { rope: true, sliding_window: Some(window) }),
                    ("sliding_attention", _) => Err(Error::file(file, "sliding layers need sliding_window, a positive number")),
                    (other, _) => Err(Error::file(
                        file,
                        format!("layer_types entry {other:?} is not supported; supported: \"full_attention\", \"sliding_attention\""),
                    )),
                })
                .collect()
        }
        _ => Ok(vec![full; n]),
    }
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
        assert_eq!(parse("").unwrap().rope.theta, 10000.0);
        assert_eq!(parse(r#","rope_theta":5e5"#).unwrap().rope.theta, 5e5);
        let c = parse(r#","rope_parameters":{"rope_theta":1e5,"rope_type":"default"}"#).unwrap();
        assert_eq!(c.rope.theta, 1e5);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn rope_scalings_and_nope_layers() {
        let c = parse(r#","rope_parameters":{"rope_theta":5e5,"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#).unwrap();
        assert_eq!(
            c.rope,
            Rope {
                theta: 5e5,
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0
                }
            }
        );
        assert_eq!(parse(r#","rope_scaling":{"type":"linear","factor":2.0}"#).unwrap().rope.scaling, RopeScaling::Linear { factor: 2.0 });
        let rope = |c: LlamaConfig| c.layers.iter().map(|l| l.rope).collect::<Vec<_>>();
        assert_eq!(rope(parse("").unwrap()), [true]);
        let smollm3 = |extra: &str| {
            let json = format!(
                r#"{{"architectures":["SmolLM3ForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":8,"num_attention_heads":2{extra}}}"#
            );
            LlamaConfig::from_json(json.as_bytes(), "config.json")
        };
        // transformers' default: no rotary on every fourth layer
        assert_eq!(rope(smollm3("").unwrap()), [true, true, true, false, true, true, true, false]);
        assert_eq!(rope(smollm3(r#","no_rope_layers":[1,0,1,0,1,0,1,0]"#).unwrap()), [true, false, true, false, true, false, true, false]);
        assert!(smollm3(r#","no_rope_layers":[1,0]"#).unwrap_err().to_string().contains("no_rope_layers has 2 entries for 8 layers"));
        assert!(smollm3(r#","use_sliding_window":true"#).unwrap_err().to_string().contains("use_sliding_window"));
    }

    fn gemma3(extra: &str) -> Result<LlamaConfig> {
        let json = format!(
            r#"{{"architectures":["Gemma3ForCausalLM"],"model_type":"gemma3_text","vocab_size":10,"hidden_size":16,"intermediate_size":16,"num_hidden_layers":7,"num_attention_heads":2,"head_dim":8{extra}}}"#
        );
        LlamaConfig::from_json(json.as_bytes(), "config.json")
    }

    #[test]
    fn gemma3_as_transformers_reads_it() {
        let c = gemma3("").unwrap();
        let windows: Vec<_> = c.layers.iter().map(|l| l.sliding_window).collect();
        // every sixth layer full attention, the others sliding (4096 by default)
        assert_eq!(windows, [Some(4096), Some(4096), Some(4096), Some(4096), Some(4096), None, Some(4096)]);
        assert_eq!((c.rope.theta, c.local_rope.unwrap().theta), (1e6, 1e4));
        assert_eq!(
            (c.activation, c.norm_adds_one, c.post_norms, c.qk_norm, c.tie_word_embeddings),
            (Activation::GeluTanh, true, true, true, true)
        );
        // as Python computes query_pre_attn_scalar**-0.5 (1 / sqrt(8) differs in the last bit)
        assert_eq!((c.embed_scale, c.attention_scale), (Some(4.0), 8f64.powf(-0.5)));
        // transformers 5's layout: rope parameters per layer type
        let c = gemma3(r#","sliding_window":3,"query_pre_attn_scalar":16,"layer_types":["sliding_attention","full_attention","sliding_attention","sliding_attention","full_attention","sliding_attention","full_attention"],
            "rope_parameters":{"full_attention":{"rope_type":"linear","factor":8.0,"rope_theta":5e5},"sliding_attention":{"rope_type":"default","rope_theta":2e4}}"#).unwrap();
        assert_eq!(c.layers[0], LayerAttention { rope: true, sliding_window: Some(3) });
        assert_eq!(c.layers[1], LayerAttention { rope: true, sliding_window: None });
        assert_eq!(c.rope, Rope { theta: 5e5, scaling: RopeScaling::Linear { factor: 8.0 } });
        assert_eq!(c.local_rope, Some(Rope { theta: 2e4, scaling: RopeScaling::None }));
        assert_eq!(c.attention_scale, 0.25);
        // the older keys
        let c = gemma3(r#","rope_theta":1e5,"rope_local_base_freq":3e3,"rope_scaling":{"rope_type":"linear","factor":2.0}"#).unwrap();
        assert_eq!((c.rope.theta, c.rope.scaling, c.local_rope.unwrap().theta), (1e5, RopeScaling::Linear { factor: 2.0 }, 3e3));
    }

    #[test]
    fn gemma3_features_not_implemented_are_named() {
        for (extra, named) in [
            (r#","final_logit_softcapping":30.0"#, "final_logit_softcapping = 30.0 is not supported"),
            (r#","attn_logit_softcapping":50.0"#, "attn_logit_softcapping"),
            (r#","use_bidirectional_attention":true"#, "use_bidirectional_attention"),
            (r#","hidden_activation":"gelu""#, "hidden_activation \"gelu\" is not supported; only \"gelu_pytorch_tanh\""),
            (
                r#","layer_types":["chunked_attention","full_attention","full_attention","full_attention","full_attention","full_attention","full_attention"]"#,
                "layer_types entry \"chunked_attention\"",
            ),
            (r#","layer_types":["full_attention"]"#, "layer_types has 1 entries for 7 layers"),
            (r#","sliding_window":null"#, "sliding layers need sliding_window"),
            (
                r#","rope_parameters":{"full_attention":{"rope_type":"yarn","factor":4.0}}"#,
                "rope_parameters.full_attention.rope_type \"yarn\"",
            ),
        ] {
            let err = gemma3(extra).unwrap_err().to_string();
            assert!(err.starts_with("config.json: ") && err.contains(named), "{extra}: {err}");
        }
        // null soft-capping is transformers' default, and accepted
        assert!(gemma3(r#","final_logit_softcapping":null,"attn_logit_softcapping":null"#).is_ok());
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
        let err = parse(r#","num_experts":8"#).unwrap_err().to_string();
        assert!(err.contains("num_experts = 8 is not supported"), "{err}");
        let err = parse(r#","mlp_bias":true"#).unwrap_err().to_string();
        assert!(err.contains("mlp_bias"), "{err}");
        let err = LlamaConfig::from_json(br#"{"architectures":["GPT2LMHeadModel"]}"#, "m/config.json").unwrap_err().to_string();
        assert!(err.starts_with("m/config.json: unsupported architecture") && err.contains("GPT2LMHeadModel"), "{err}");
        assert!(err.contains("supported: LlamaForCausalLM (model_type \"llama\"), SmolLM3ForCausalLM"), "{err}");
        assert!(LlamaConfig::from_json(b"{", "c.json").unwrap_err().to_string().contains("not valid JSON"));
    }
}
