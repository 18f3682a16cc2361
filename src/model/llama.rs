//! A Llama-architecture causal LM (Llama, SmolLM3, Qwen2/3, Gemma 3), written to read like the math:
//!
//! ```text
//! h = embed(ids)                         (Gemma: times sqrt(hidden))
//! for each layer:  h = h + attn(rmsnorm(h));  h = h + mlp(rmsnorm(h))
//! logits = rmsnorm(h) @ lm_head          (lm_head = embed^T when tied)
//! attn(x) = softmax(rope(q) rope(k)^T * scale + causal_mask) v,  each k/v head shared by a group of q heads
//! mlp(x)  = down(act(gate(x)) * up(x))   (act: silu, SwiGLU; Gemma's gelu_tanh, GeGLU)
//! rmsnorm(x) = x / sqrt(mean(x^2) + eps) * w   (Gemma: * (1 + w))
//! ```
//!
//! rope rotates by the position's angles, pos * inv_freq (scaled for Llama 3.x); SmolLM3's NoPE
//! layers leave q and k as they are. scale is 1 / sqrt(head_dim) (Gemma: 1 / sqrt(query_pre_attn_scalar)).
//! Qwen3 and Gemma normalise each head of q and k first (rmsnorm over head_dim). Gemma 3 also
//! normalises each block's output before adding it (attn and mlp end in a norm of their own), and
//! its sliding layers' queries see only the last `sliding_window` keys, rotated by a base of their own.
//!
//! Weights are loaded by their Hugging Face names and stay constants: nothing here requires a
//! gradient, except in full fine-tuning, which runs a copy whose weights are autodiff leaves
//! ([`crate::model::parameters`]). Linear weights are kept transposed ([in, out]) so that every projection is `x @ W^T`
//! as one plain matmul.

use std::collections::BTreeMap;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::{LayerAttention, LlamaConfig, Rope, RopeScaling};
use crate::error::{Error, Result};
use crate::io::gguf::StoredTensor;
use crate::io::model_files::CONFIG_FILE;
use crate::io::quant::QuantMatrix;
use crate::io::safetensors::{SINGLE_FILE, TensorEntry, write_safetensors_reading};
use crate::io::{StoreDtype, WeightSource};
use crate::lora::{AdapterState, LoraLayers, LoraLinear, LoraRun};
use crate::model::KvCache;
use crate::nn::ops::{Activation, add_rms_norm, causal_attention, gated, rms_norm, self_attention};
use crate::nn::{Linear, Weight, WeightDtype};
use crate::tensor::{HostTensor, read_f32, read_host};

/// Root-mean-square normalisation: x / sqrt(mean(x^2) + eps) * gain, the gain being the weight
/// (Gemma's: 1 + the weight).
#[derive(Clone)]
pub struct RmsNorm {
    /// As stored (what is written back).
    pub weight: Tensor<1>,
    /// What multiplies: `weight`, or Gemma's 1 + weight, added once at load in f32 as
    /// transformers adds it.
    pub gain: Tensor<1>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        rms_norm(x, self.gain.clone(), self.eps)
    }
}

/// The residual stream between two norms: h plus a block's output not yet added to it. The
/// next norm adds it in the same pass ([`add_rms_norm`]), so a residual add costs no pass of its own.
struct Residual {
    h: Tensor<3>,
    pending: Option<Tensor<3>>,
}

impl Residual {
    fn new(h: Tensor<3>) -> Self {
        Residual { h, pending: None }
    }

    /// h with `delta` still to be added.
    fn with_pending(h: Tensor<3>, delta: Tensor<3>) -> Self {
        Residual { h, pending: Some(delta) }
    }

    /// The stream's value: h plus what is pending.
    fn value(self) -> Tensor<3> {
        match self.pending {
            Some(delta) => self.h + delta,
            None => self.h,
        }
    }

    /// (the stream's value, norm(that value)).
    fn normed(self, norm: &RmsNorm) -> (Tensor<3>, Tensor<3>) {
        match self.pending {
            Some(delta) => add_rms_norm(self.h, delta, norm.gain.clone(), norm.eps),
            None => (self.h.clone(), norm.forward(self.h)),
        }
    }
}

/// The rotary frequencies as transformers computes them, in f32: inv_freq_i = 1 / theta^(2i/d),
/// then scaled. Llama 3's scaling, with wavelength w = 2 pi / inv_freq and the original context L:
///
/// ```text
/// w < L / high_freq_factor:   inv_freq                                      (kept)
/// w > L / low_freq_factor:    inv_freq / factor
/// otherwise:                  (1 - s) inv_freq / factor + s inv_freq,  s = (L / w - low) / (high - low)
/// ```
fn inv_freq(rope: &Rope, d: usize) -> Vec<f32> {
    let theta = rope.theta as f32;
    let plain = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32));
    match rope.scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Linear { factor } => plain.map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let [factor, low, high, context] =
                [factor, low_freq_factor, high_freq_factor, original_max_position_embeddings].map(|v| v as f32);
            plain
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < context / high {
                        f
                    } else if wavelen > context / low {
                        f / factor
                    } else {
                        let smooth = (context / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// cos and sin of the rotary angles for a run of positions, [2, seq, head_dim], as transformers
/// computes them, in f32: angle = pos * inv_freq.
fn rotary_tables(rope: &Rope, d: usize, start: usize, seq: usize, device: &Device) -> Tensor<3> {
    let inv_freq = inv_freq(rope, d);
    let mut cos = Vec::with_capacity(seq * d);
    let mut sin = Vec::with_capacity(seq * d);
    for pos in start..start + seq {
        // the two halves of each row repeat the same angles (HF's cat(freqs, freqs))
        for _ in 0..2 {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    Tensor::from_data(TensorData::new([cos, sin].concat(), [2, seq, d]), device)
}

/// The positions a run of ids takes (from `start` on): what every layer needs besides its input.
pub struct Positions {
    start: usize,
    /// The positions' rotary cos and sin [2, seq, head_dim].
    rotary: Tensor<3>,
    /// The same for Gemma 3's sliding layers, with their own base.
    local: Option<Tensor<3>>,
    /// cos 1 and sin 0, which rotate nothing, for layers without positions (NoPE); only when
    /// the model has such layers.
    unrotated: Option<Tensor<3>>,
    /// Attention's scale of scores.
    scale: f32,
    head_dim: usize,
}

/// Grouped-query attention with rotary embeddings.
#[derive(Clone)]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    /// Qwen3's RMSNorm over each head of q and of k.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    layer: usize,
    /// Rotated or not (NoPE), sliding or not.
    kind: LayerAttention,
}

impl Attention {
    /// With a cache, this step's keys and values join it and the queries attend over all of it.
    fn forward(&self, x: Tensor<3>, at: &Positions, cache: Option<&mut KvCache>, lora: Option<LoraRun>) -> Tensor<3> {
        let q = per_head(self.q_norm.as_ref(), self.q_proj.forward(x.clone(), lora), at.head_dim);
        let k = per_head(self.k_norm.as_ref(), self.k_proj.forward(x.clone(), lora), at.head_dim);
        let v = self.v_proj.forward(x, lora);
        let rotary = match (self.kind.rope, self.kind.sliding_window) {
            (false, _) => at.unrotated.clone().expect("tables for NoPE layers"),
            (true, Some(_)) => at.local.clone().unwrap_or_else(|| at.rotary.clone()),
            (true, None) => at.rotary.clone(),
        };
        let window = self.kind.sliding_window;
        let out = match cache {
            Some(cache) => {
                let (kv, cached_from) = cache.append(self.layer, k, v, rotary.clone(), at.start, window);
                causal_attention(q, kv, rotary, at.scale, at.start, cached_from, window)
            }
            None => self_attention(q, k, v, rotary, at.scale, window),
        };
        self.o_proj.forward(out, lora)
    }
}

/// `norm` over each head of x [batch, seq, heads * head_dim] (x itself without a norm).
fn per_head(norm: Option<&RmsNorm>, x: Tensor<3>, head_dim: usize) -> Tensor<3> {
    let Some(norm) = norm else { return x };
    let [batch, seq, width] = x.dims();
    norm.forward(x.reshape([batch, seq * width / head_dim, head_dim])).reshape([batch, seq, width])
}

/// The gated feed-forward block (SwiGLU, GeGLU).
#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
    act: Activation,
}

impl Mlp {
    fn forward(&self, x: Tensor<3>, lora: Option<LoraRun>) -> Tensor<3> {
        self.down_proj.forward(gated(self.gate_proj.forward(x.clone(), lora), self.up_proj.forward(x, lora), self.act), lora)
    }
}

/// Gemma's norms around the MLP: `post_attention_layernorm` then normalises attention's output,
/// and these the MLP's input and output.
#[derive(Clone)]
pub struct FeedforwardNorms {
    pub pre_feedforward_layernorm: RmsNorm,
    pub post_feedforward_layernorm: RmsNorm,
}

/// One transformer block.
#[derive(Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub feedforward_norms: Option<FeedforwardNorms>,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// h = x + attn(norm(x)); out = h + mlp(norm(h)), each residual add done by the norm after it.
    fn forward(&self, x: Residual, at: &Positions, cache: Option<&mut KvCache>, lora: Option<LoraRun>) -> Residual {
        let (x, normed) = x.normed(&self.input_layernorm);
        let (h, normed) = Residual::with_pending(x, self.attention_out(normed, at, cache, lora)).normed(self.mlp_norm());
        Residual::with_pending(h, self.mlp_out(normed, lora))
    }

    /// attn(x), normalised where the family normalises block outputs (Gemma).
    fn attention_out(&self, x: Tensor<3>, at: &Positions, cache: Option<&mut KvCache>, lora: Option<LoraRun>) -> Tensor<3> {
        let out = self.self_attn.forward(x, at, cache, lora);
        if self.feedforward_norms.is_some() { self.post_attention_layernorm.forward(out) } else { out }
    }

    /// The norm of the MLP's input.
    fn mlp_norm(&self) -> &RmsNorm {
        self.feedforward_norms.as_ref().map_or(&self.post_attention_layernorm, |n| &n.pre_feedforward_layernorm)
    }

    /// mlp(x), normalised where the family normalises block outputs (Gemma).
    fn mlp_out(&self, x: Tensor<3>, lora: Option<LoraRun>) -> Tensor<3> {
        let out = self.mlp.forward(x, lora);
        match &self.feedforward_norms {
            Some(norms) => norms.post_feedforward_layernorm.forward(out),
            None => out,
        }
    }

    /// The block's norms under their Hugging Face names (after `model.layers.N.`).
    pub fn norms(&self) -> impl Iterator<Item = (&'static str, &RmsNorm)> {
        let ff = self.feedforward_norms.as_ref();
        [
            ("input_layernorm", Some(&self.input_layernorm)),
            ("post_attention_layernorm", Some(&self.post_attention_layernorm)),
            ("pre_feedforward_layernorm", ff.map(|n| &n.pre_feedforward_layernorm)),
            ("post_feedforward_layernorm", ff.map(|n| &n.post_feedforward_layernorm)),
            ("self_attn.q_norm", self.self_attn.q_norm.as_ref()),
            ("self_attn.k_norm", self.self_attn.k_norm.as_ref()),
        ]
        .into_iter()
        .filter_map(|(name, norm)| norm.map(|n| (name, n)))
    }

    /// The block's f32 vectors: its norms' weights and its linears' biases.
    pub fn vectors(&self) -> impl Iterator<Item = &Tensor<1>> {
        self.norms().map(|(_, n)| &n.weight).chain(self.linears().into_iter().filter_map(|l| l.base.bias.as_ref()))
    }

    /// The block's linear layers in model order.
    pub fn linears(&self) -> [&LoraLinear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    /// The same, mutable.
    pub fn linears_mut(&mut self) -> [&mut LoraLinear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }
}

/// The whole causal LM.
#[derive(Clone)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    /// [vocab, hidden]
    pub embed_tokens: Weight,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// [hidden, vocab]; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Weight>,
    /// The adapters loaded, which one runs, and whether adapters are disabled (see [`LoraLayers`]).
    pub adapters: AdapterState,
}

impl LlamaModel {
    /// Hidden states after the final norm, [batch, seq, hidden], with the running adapter. With
    /// a cache, the ids continue the sequence it holds and their keys/values are added to it.
    pub fn hidden_states(&self, input_ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        // without one, a cache of this run's own: keys and values go once into the layout attention reads
        let mut own = KvCache::default();
        self.hidden_states_with(input_ids, Some(cache.unwrap_or(&mut own)), self.adapters.running())
    }

    /// [`hidden_states`](Self::hidden_states) with the adapter given: training runs its own copies
    /// of the adapter's matrices, with dropout.
    pub fn hidden_states_with(&self, input_ids: Tensor<2, Int>, mut cache: Option<&mut KvCache>, lora: Option<LoraRun>) -> Tensor<3> {
        let (start, seq) = (cache.as_ref().map_or(0, |c| c.seen()), input_ids.dims()[1]);
        let (h, at) = self.decoder_input(input_ids, start);
        let mut h = Residual::new(h);
        for layer in &self.layers {
            h = layer.forward(h, &at, cache.as_deref_mut(), lora);
        }
        if let Some(cache) = cache {
            cache.advance(seq);
        }
        h.normed(&self.norm).1
    }

    /// The embedded ids [batch, seq, hidden], at positions from `start` on, and those positions.
    pub fn decoder_input(&self, input_ids: Tensor<2, Int>, start: usize) -> (Tensor<3>, Positions) {
        let [batch, seq] = input_ids.dims();
        let (c, device) = (&self.config, self.embed_tokens.device());
        let d = c.head_dim;
        let rotary = rotary_tables(&c.rope, d, start, seq, &device);
        let local = c.local_rope.map(|rope| rotary_tables(&rope, d, start, seq, &device));
        let unrotated = c
            .layers
            .iter()
            .any(|l| !l.rope)
            .then(|| Tensor::cat(vec![Tensor::ones([1, seq, d], &device), Tensor::zeros([1, seq, d], &device)], 0));
        let h = self.embed_tokens.rows(input_ids.reshape([batch * seq])).reshape([batch, seq, c.hidden_size]);
        let h = match c.embed_scale {
            Some(scale) => h * scale,
            None => h,
        };
        (h, Positions { start, rotary, local, unrotated, scale: c.attention_scale as f32, head_dim: d })
    }

    /// Layer `i` on its input `h` (no cache): the decoder a layer at a time, for training that
    /// keeps only each layer's input and runs the layer again for its gradient.
    pub fn layer_forward(&self, i: usize, h: Tensor<3>, at: &Positions, lora: Option<LoraRun>) -> Tensor<3> {
        self.layers[i].forward(Residual::new(h), at, None, lora).value()
    }

    /// Logits [batch, seq, vocab] from hidden states.
    pub fn head(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [batch, seq, hidden_size] = hidden.dims();
        let h = hidden.reshape([batch * seq, hidden_size]);
        let logits = match &self.lm_head {
            Some(head_t) => head_t.apply(h),
            None => self.embed_tokens.apply_transposed(h),
        };
        logits.reshape([batch, seq, self.config.vocab_size])
    }

    /// The head for a run of products over slices of positions (the loss): the weight it
    /// multiplies by, a quantized one dequantized once here rather than in every product (a
    /// transient of the head's f32 size, as long as the run holds it).
    pub fn head_for_slices(&self) -> Head {
        let (weight, tied) = match &self.lm_head {
            Some(head_t) => (head_t, false),
            None => (&self.embed_tokens, true),
        };
        Head { weight: weight.dequantized(), tied }
    }

    /// Logits [batch, seq, vocab] for every position.
    pub fn forward(&self, input_ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.head(self.hidden_states(input_ids, cache))
    }

    /// Logits [batch, vocab] of the last position only (what generation needs).
    pub fn forward_last(&self, input_ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<2> {
        let hidden = self.hidden_states(input_ids, cache);
        let [batch, seq, _] = hidden.dims();
        self.head(hidden.narrow(1, seq - 1, 1)).reshape([batch, self.config.vocab_size])
    }

    /// The logits [ids.len() * vocab] (row-major) of one forward pass over `ids`, read back;
    /// ids outside the vocabulary are refused.
    pub async fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        read_f32(self.forward(self.ids_tensor(ids), None)).await
    }

    /// Bytes the weights occupy on the device, as transformers' `get_memory_footprint`: the base's
    /// matrices in their dtype, norms and adapters (OLoRA/PiSSA initial values included) in f32.
    pub fn memory_footprint(&self) -> usize {
        let f32_bytes = |dims: &[usize]| 4 * dims.iter().product::<usize>();
        let mut bytes = self.embed_tokens.bytes() + self.lm_head.as_ref().map_or(0, Weight::bytes) + f32_bytes(&self.norm.weight.dims());
        for layer in &self.layers {
            bytes += layer.vectors().map(|v| f32_bytes(&v.dims())).sum::<usize>();
            for linear in layer.linears() {
                bytes += linear.base.weight_t.bytes();
                for lora in linear.adapters.values().chain(linear.initial.values()) {
                    bytes += f32_bytes(&lora.a_t.dims()) + f32_bytes(&lora.b_t.dims());
                }
            }
        }
        bytes
    }

    /// A new, empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// A new, empty cache with room for `positions` positions (more grow it).
    pub fn new_cache_for(&self, positions: usize) -> KvCache {
        KvCache::with_capacity(self.layers.len(), positions.min(self.config.max_position_embeddings))
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// Checks that `ids` is non-empty and within the vocabulary (an id past it would index out of
    /// the embedding on the device).
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::invalid("no token ids: give at least one"));
        }
        let vocab = self.config.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(bad) => Err(Error::invalid(format!("token id {bad} is out of the vocabulary (size {vocab})"))),
            None => Ok(()),
        }
    }

    /// Token ids as the Int tensor [1, seq] the forward pass takes.
    pub fn ids_tensor(&self, ids: &[u32]) -> Tensor<2, Int> {
        self.ids_batch(ids, 1, ids.len())
    }

    /// `batch` rows of `seq` token ids as an Int tensor [batch, seq].
    pub fn ids_batch(&self, ids: &[u32], batch: usize, seq: usize) -> Tensor<2, Int> {
        let ids: Vec<i32> = ids.iter().map(|&id| id as i32).collect();
        Tensor::from_data(TensorData::new(ids, [batch, seq]), &self.device())
    }

    /// The weights under their Hugging Face names and layout ([out, in] linears), read back from
    /// the device in f32: merged adapters included, unmerged ones not, plus adapter `merge` (if
    /// given) added on the way out without touching the model (into a quantized matrix exactly:
    /// its dequantized values plus the update). The inverse of [`load`](Self::load).
    pub async fn hf_tensors(&self, merge: Option<&str>) -> Result<BTreeMap<String, HostTensor>> {
        Ok(self.hf_weights(merge, false).await?.into_iter().map(|(name, t)| (name, t.into_f32())).collect())
    }

    /// model.safetensors (in `dtype`, as [`hf_tensors`](Self::hf_tensors) reads the weights,
    /// `merge` folded in) and config.json (its dtype saying so): a Hugging Face directory but for
    /// the tokenizer's files. The weights are read into the file one at a time, so that the
    /// model's size is held once more, not three times (values, encoding, file).
    pub async fn hf_files(&self, merge: Option<&str>, dtype: StoreDtype) -> Result<Vec<(String, Vec<u8>)>> {
        let tensors =
            self.hf_plan(merge).into_iter().map(|(name, t)| TensorEntry { name, shape: t.hf_shape(), dtype, values: t }).collect();
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let weights = write_safetensors_reading(tensors, Some(metadata), async |t: HfTensor| Ok(t.read(false).await?.into_f32())).await?;
        let mut config = self.config.clone();
        for key in ["torch_dtype", "dtype"] {
            if let Some(value) = config.raw.get_mut(key) {
                *value = dtype.torch_name().into();
            }
        }
        Ok(vec![(SINGLE_FILE.to_string(), weights), (CONFIG_FILE.to_string(), config.to_json().into_bytes())])
    }

    /// The matrix stored under the Hugging Face name `name`, if it is one.
    pub fn matrix(&self, name: &str) -> Option<&Weight> {
        match name {
            "model.embed_tokens.weight" => Some(&self.embed_tokens),
            "lm_head.weight" => self.lm_head.as_ref(),
            _ => self.lora_linears().find(|l| name.strip_suffix(".weight") == Some(l.name.as_str())).map(|l| &l.base.weight_t),
        }
    }

    /// As [`hf_tensors`](Self::hf_tensors), quantized matrices read as their blocks when
    /// `quantized`; `merge` is then requantized into them, as merge_and_unload would.
    pub async fn hf_weights(&self, merge: Option<&str>, quantized: bool) -> Result<BTreeMap<String, StoredTensor>> {
        let mut out = BTreeMap::new();
        for (name, t) in self.hf_plan(merge) {
            out.insert(name, t.read(quantized).await?);
        }
        Ok(out)
    }

    /// Every Hugging Face tensor of the model by name, unread, adapter `merge` to be added to the
    /// matrices it changes (those it is not merged into already).
    fn hf_plan<'a>(&'a self, merge: Option<&'a str>) -> Vec<(String, HfTensor<'a>)> {
        let matrix = |weight, merge| HfTensor::Matrix { weight, merge };
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), matrix(&self.embed_tokens, None)),
            ("model.norm.weight".to_string(), HfTensor::Vector(&self.norm.weight)),
        ];
        if let Some(head_t) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), matrix(head_t, None)));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            out.extend(layer.norms().map(|(name, norm)| (format!("model.layers.{i}.{name}.weight"), HfTensor::Vector(&norm.weight))));
        }
        for linear in self.lora_linears() {
            let merge = merge.filter(|m| !linear.merged.iter().any(|done| done == m)).map(|m| (linear, m));
            out.push((format!("{}.weight", linear.name), matrix(&linear.base.weight_t, merge)));
            if let Some(bias) = &linear.base.bias {
                out.push((format!("{}.bias", linear.name), HfTensor::Vector(bias)));
            }
        }
        out
    }

    /// Builds the model from Hugging Face weights, checking every tensor's shape against the config.
    /// Matrices are stored in `dtype` (see [`WeightDtype`]; norm weights always in f32).
    /// `progress(done, total)` is called after each tensor is on the device.
    pub fn load(
        config: LlamaConfig,
        weights: &WeightSource,
        dtype: WeightDtype,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let c = &config;
        let (hidden, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let per_layer =
            9 + 3 * usize::from(c.qkv_bias) + usize::from(c.o_bias) + 2 * usize::from(c.qk_norm) + 2 * usize::from(c.post_norms);
        let total = 2 + per_layer * c.num_hidden_layers + usize::from(!c.tie_word_embeddings);
        let mut loader = Loader { weights, dtype, norm_adds_one: c.norm_adds_one, device, done: 0, total, progress };

        let embed_tokens = loader.weight("model.embed_tokens.weight", [c.vocab_size, hidden], false, false)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linear =
                |name: &str, d_out: usize, d_in: usize, bias: bool| loader.lora_linear(&format!("{p}.{name}"), d_out, d_in, bias);
            let (q_proj, k_proj, v_proj, o_proj) = (
                linear("self_attn.q_proj", c.num_attention_heads * hd, hidden, c.qkv_bias)?,
                linear("self_attn.k_proj", c.num_key_value_heads * hd, hidden, c.qkv_bias)?,
                linear("self_attn.v_proj", c.num_key_value_heads * hd, hidden, c.qkv_bias)?,
                linear("self_attn.o_proj", hidden, c.num_attention_heads * hd, c.o_bias)?,
            );
            let mut head_norm =
                |name: &str| c.qk_norm.then(|| loader.norm(&format!("{p}.self_attn.{name}.weight"), hd, c.rms_norm_eps)).transpose();
            let self_attn = Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                q_norm: head_norm("q_norm")?,
                k_norm: head_norm("k_norm")?,
                layer: i,
                kind: c.layers[i],
            };
            let mut linear = |name: &str, d_out: usize, d_in: usize| loader.lora_linear(&format!("{p}.{name}"), d_out, d_in, false);
            let mlp = Mlp {
                gate_proj: linear("mlp.gate_proj", inter, hidden)?,
                up_proj: linear("mlp.up_proj", inter, hidden)?,
                down_proj: linear("mlp.down_proj", hidden, inter)?,
                act: c.activation,
            };
            let mut norm = |name: &str| loader.norm(&format!("{p}.{name}.weight"), hidden, c.rms_norm_eps);
            let (input_layernorm, post_attention_layernorm) = (norm("input_layernorm")?, norm("post_attention_layernorm")?);
            let feedforward_norms = match c.post_norms {
                true => Some(FeedforwardNorms {
                    pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
                    post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
                }),
                false => None,
            };
            layers.push(DecoderLayer { input_layernorm, self_attn, post_attention_layernorm, feedforward_norms, mlp });
        }
        let norm = loader.norm("model.norm.weight", hidden, c.rms_norm_eps)?;
        let lm_head =
            if c.tie_word_embeddings { None } else { Some(loader.weight("lm_head.weight", [c.vocab_size, hidden], true, false)?) };
        Ok(LlamaModel { config, embed_tokens, layers, norm, lm_head, adapters: Default::default() })
    }
}

impl LoraLayers for LlamaModel {
    fn lora_linears(&self) -> impl Iterator<Item = &LoraLinear> {
        self.layers.iter().flat_map(DecoderLayer::linears)
    }

    fn lora_linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.layers.iter_mut().flat_map(DecoderLayer::linears_mut)
    }

    fn adapter_state(&self) -> &AdapterState {
        &self.adapters
    }

    fn adapter_state_mut(&mut self) -> &mut AdapterState {
        &mut self.adapters
    }

    /// Embeddings, norms, every linear layer (with its bias) and an untied head.
    fn base_parameters(&self) -> usize {
        let c = &self.config;
        let numel = |dims: [usize; 2]| dims[0] * dims[1];
        let linears: usize = self.lora_linears().map(|l| numel(l.base.weight_t.dims())).sum();
        let norms = c.hidden_size + self.layers.iter().flat_map(DecoderLayer::vectors).map(|v| v.dims()[0]).sum::<usize>();
        numel(self.embed_tokens.dims()) + norms + linears + self.lm_head.as_ref().map_or(0, |head| numel(head.dims()))
    }

    fn device(&self) -> Device {
        self.embed_tokens.device()
    }
}

/// A Hugging Face tensor of the model, to be read back from the device.
enum HfTensor<'a> {
    /// A matrix, and the linear layer and adapter whose update to add to it on the way out.
    Matrix {
        weight: &'a Weight,
        merge: Option<(&'a LoraLinear, &'a str)>,
    },
    Vector(&'a Tensor<1>),
}

impl HfTensor<'_> {
    fn hf_shape(&self) -> Vec<usize> {
        match self {
            HfTensor::Matrix { weight, .. } => weight.hf_dims().to_vec(),
            HfTensor::Vector(v) => v.dims().to_vec(),
        }
    }

    /// The values: a quantized matrix's blocks as they are where `quantized` (an update
    /// requantized into them), else in f32.
    async fn read(&self, quantized: bool) -> Result<StoredTensor> {
        let (weight, merge) = match *self {
            HfTensor::Vector(v) => return Ok(StoredTensor::Dense(read_host(v.clone()).await?)),
            HfTensor::Matrix { weight, merge } => (weight, merge),
        };
        // the update made here, one matrix's at a time
        let weight = match merge.and_then(|(linear, adapter)| Some((linear, linear.delta_t(adapter)?))) {
            Some((linear, delta)) if quantized => weight.plus(delta, &linear.name).await?,
            Some((_, delta)) => {
                let mut sum = weight.clone();
                sum.add(delta, 1.0);
                sum
            }
            None => weight.clone(),
        };
        let t = weight.read().await?;
        Ok(if quantized { t } else { StoredTensor::Dense(t.into_f32()) })
    }
}

/// The output head as [`LlamaModel::head_for_slices`] gives it: the untied head's W^T [hidden,
/// vocab], or the tied embedding E [vocab, hidden].
#[derive(Clone)]
pub struct Head {
    weight: Weight,
    tied: bool,
}

impl Head {
    /// Logits [rows, vocab] of hidden states [rows, hidden], laid out row by row (as the loss reads
    /// them): with a tied head, `h E^T` through a strided view of E rather than a transposed result,
    /// which a reshape would copy (25 MB per 128 rows).
    pub fn logits(&self, h: Tensor<2>) -> Tensor<2> {
        if self.tied { self.weight.apply_transposed(h) } else { self.weight.apply(h) }
    }

    /// dL/dhidden [rows, hidden] from dL/dlogits [rows, vocab]: the head is linear, so dL/dlogits · W.
    pub fn input_grad(&self, dlogits: Tensor<2>) -> Tensor<2> {
        if self.tied { self.weight.apply(dlogits) } else { self.weight.apply_transposed(dlogits) }
    }

    /// Adds dL/dW of each buffer of the weight as held, from hidden states h [rows, hidden] and
    /// dL/dlogits [rows, vocab], into `sums` (zeros where `None`), in place: dlogitsᵀ · h for the
    /// tied E, hᵀ · dlogits for the untied Wᵀ, [`WORDS_AT_ONCE`] words of the vocabulary at a
    /// time. Summing a whole buffer's product instead would hold a second gradient-sized tensor
    /// (113 MB for SmolLM2's embedding) beside the sums while they add.
    pub fn add_weight_grads(&self, sums: Option<Vec<Tensor<2>>>, h: Tensor<2>, dlogits: Tensor<2>) -> Vec<Tensor<2>> {
        let sums = sums.unwrap_or_else(|| self.zero_weight_grads());
        // the vocabulary runs along E's rows, Wᵀ's columns
        let axis = usize::from(!self.tied);
        let mut at = 0;
        sums.into_iter()
            .map(|mut sum| {
                let words = sum.dims()[axis];
                for start in (0..words).step_by(WORDS_AT_ONCE) {
                    let len = WORDS_AT_ONCE.min(words - start);
                    let d = dlogits.clone().narrow(1, at + start, len);
                    let g = if self.tied { d.transpose().matmul(h.clone()) } else { h.clone().transpose().matmul(d) };
                    let mut ranges = sum.dims().map(|n| 0..n);
                    ranges[axis] = start..start + len;
                    // `current` is used up by the sum before the write, which then goes in place
                    let current = sum.clone().slice(ranges.clone());
                    sum = sum.slice_assign(ranges, current + g);
                }
                at += words;
                sum
            })
            .collect()
    }

    /// Whether the weight is trained (autodiff leaves: full fine-tuning).
    pub fn is_trained(&self) -> bool {
        self.weight.f32_parts().is_some_and(|parts| parts.iter().any(Tensor::is_require_grad))
    }

    /// The same head with plain values (no autodiff).
    pub fn constant(&self) -> Head {
        let weight = match self.weight.f32_parts() {
            Some(parts) => self.weight.with_f32_parts(parts.into_iter().map(Tensor::inner).collect()),
            None => self.weight.clone(),
        };
        Head { weight, tied: self.tied }
    }

    /// A zero gradient of each buffer of the weight: where the sums start (and the whole gradient
    /// of a batch with no trained token).
    pub fn zero_weight_grads(&self) -> Vec<Tensor<2>> {
        self.f32_parts().iter().map(|p| Tensor::zeros(p.dims(), &p.device().inner())).collect()
    }

    /// The trained weight's buffers.
    fn f32_parts(&self) -> Vec<Tensor<2>> {
        self.weight.f32_parts().expect("a trained head is f32")
    }
}

/// Words of the vocabulary whose share of a trained head's weight gradient is made at once:
/// 8192 x 576 is 19 MB.
const WORDS_AT_ONCE: usize = 8192;

/// Moves named host tensors to the device, shape-checked, counting progress.
struct Loader<'a> {
    weights: &'a WeightSource,
    dtype: WeightDtype,
    /// Gemma's norms, whose gain is 1 + the weight.
    norm_adds_one: bool,
    device: &'a Device,
    done: usize,
    total: usize,
    progress: &'a mut dyn FnMut(usize, usize),
}

impl Loader<'_> {
    /// The tensor `name` as stored, checked against the shape the config implies.
    fn stored(&mut self, name: &str, shape: &[usize]) -> Result<StoredTensor> {
        let t = self.weights.tensor(name)?;
        let found = match &t {
            StoredTensor::Dense(t) => t.shape.clone(),
            StoredTensor::Quant(q) => vec![q.rows, q.cols()],
        };
        if found != shape {
            let file = self.weights.file_of(name);
            return Err(Error::file(file, format!("tensor {name} has shape {found:?} but config.json implies {shape:?}")));
        }
        Ok(t)
    }

    fn host(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        Ok(self.stored(name, shape)?.into_f32())
    }

    fn uploaded<T>(&mut self, tensor: T) -> T {
        self.done += 1;
        (self.progress)(self.done, self.total);
        tensor
    }

    /// A Hugging Face [rows, cols] matrix, stored transposed when `transposed`. Quantized types
    /// quantize only a decoder layer's linears (`quantize`); other matrices stay as loaded.
    fn weight(&mut self, name: &str, shape: [usize; 2], transposed: bool, quantize: bool) -> Result<Weight> {
        let stored = self.stored(name, &shape)?;
        let as_stored = |q: QuantMatrix| Weight::quantized(q, transposed, name, self.device);
        let weight = match (stored, self.dtype) {
            (StoredTensor::Quant(q), WeightDtype::Auto) => as_stored(q)?,
            (StoredTensor::Quant(q), WeightDtype::Quant(kind)) if q.kind == kind || !quantize => as_stored(q)?,
            (stored, dtype) => {
                let t = stored.into_f32();
                // matrices other than the layers' linears stay as loaded under a quantized dtype
                let dtype = if matches!(dtype, WeightDtype::Quant(_)) && !quantize { WeightDtype::F32 } else { dtype };
                Weight::upload(t, dtype, transposed, name, self.device)?
            }
        };
        Ok(self.uploaded(weight))
    }

    /// An adaptable linear layer, named after its module (`name` without `.weight`), with its
    /// `.bias` where the family has one.
    fn lora_linear(&mut self, module: &str, d_out: usize, d_in: usize, bias: bool) -> Result<LoraLinear> {
        let weight_t = self.weight(&format!("{module}.weight"), [d_out, d_in], true, true)?;
        let bias = bias.then(|| self.vector(&format!("{module}.bias"), d_out)).transpose()?;
        Ok(LoraLinear::new(module.to_string(), Linear { weight_t, bias }))
    }

    fn norm(&mut self, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
        let weight = self.vector(name, size)?;
        let gain = if self.norm_adds_one { weight.clone() + 1.0 } else { weight.clone() };
        Ok(RmsNorm { weight, gain, eps })
    }

    /// A vector of `size` in f32 (a norm's weight, a bias).
    fn vector(&mut self, name: &str, size: usize) -> Result<Tensor<1>> {
        let t = self.host(name, &[size])?;
        let vector = Tensor::from_data(TensorData::new(t.data, [size]), self.device);
        Ok(self.uploaded(vector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trained head's weight gradient summed in vocabulary chunks equals dlogitsᵀ · h (tied E)
    /// or its transpose (untied Wᵀ), added to what the sums hold: a weight in two buffers (a few
    /// words, then two chunks and a few more), added twice.
    #[test]
    fn head_weight_gradient_is_dlogits_t_h_chunk_by_chunk() {
        let device = Device::flex();
        let (first, vocab, hidden, rows) = (7, 2 * WORDS_AT_ONCE + 10, 3, 2);
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5;
        let host =
            |shape: [usize; 2], salt: usize| HostTensor::new(shape.to_vec(), (0..shape[0] * shape[1]).map(|i| value(i + salt)).collect());
        let tensor = |t: HostTensor| Tensor::<2>::from_data(TensorData::new(t.data, t.shape), &device);
        let (h, dlogits) = (host([rows, hidden], 1), host([rows, vocab], 2));
        // dW[word][j] = Σ_rows dlogits[row][word] · h[row][j], in f64
        let expected = |word: usize, j: usize| {
            (0..rows).map(|r| f64::from(dlogits.data[r * vocab + word]) * f64::from(h.data[r * hidden + j])).sum::<f64>()
        };
        for tied in [true, false] {
            let mut weight = Weight::upload(host([vocab, hidden], 3), WeightDtype::F32, !tied, "head", &device).unwrap();
            let whole = weight.take_f32_parts().remove(0);
            let axis = usize::from(!tied);
            weight.put_f32_parts(vec![whole.clone().narrow(axis, 0, first), whole.narrow(axis, first, vocab - first)]);
            let head = Head { weight, tied };
            let once = head.add_weight_grads(None, tensor(h.clone()), tensor(dlogits.clone()));
            let twice = head.add_weight_grads(Some(once), tensor(h.clone()), tensor(dlogits.clone()));
            let got = pollster::block_on(read_host(Tensor::cat(twice, axis))).unwrap();
            assert_eq!(got.shape, if tied { vec![vocab, hidden] } else { vec![hidden, vocab] });
            for word in 0..vocab {
                for j in 0..hidden {
                    let at = if tied { word * hidden + j } else { j * vocab + word };
                    let want = 2.0 * expected(word, j);
                    assert!(
                        (f64::from(got.data[at]) - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                        "tied {tied}, word {word}, {j}: {} vs {want}",
                        got.data[at]
                    );
                }
            }
        }
    }
}
