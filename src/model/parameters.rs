//! The model's own weights as full fine-tuning trains them: every matrix and vector (norm
//! weights, biases) in model order, under its Hugging Face name.
//!
//! Training reads them as plain f32 tensors ([`LlamaModel::parameters`]), runs a copy of the
//! model whose weights are autodiff leaves ([`LlamaModel::with_parameters`]: the copy shares
//! every buffer, only the handles differ), and updates them in place, one at a time
//! ([`LlamaModel::update_parameters`]). Vectors travel as [1, d] so that every parameter, its
//! gradient and AdamW's moments are matrices, as the adapter's are.

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::lora::LoraLayers;
use crate::model::{DecoderLayer, LlamaModel, RmsNorm};
use crate::nn::Weight;

/// One trained tensor.
#[derive(Clone)]
pub struct Parameter {
    /// The Hugging Face name; a matrix held in several buffers (larger than one) is one
    /// parameter per buffer, named with its rows: `model.embed_tokens.weight[0..32768]`.
    pub name: String,
    /// The values as the model holds them: a linear layer's weight transposed ([in, out]), a
    /// vector as [1, d].
    pub value: Tensor<2>,
    /// Whether `value` is the transpose of the Hugging Face tensor.
    pub transposed: bool,
    /// Whether AdamW's weight decay applies: to matrices, not to norms and biases (as
    /// transformers' Trainer groups them, `get_decay_parameter_names`).
    pub decays: bool,
}

/// Where a parameter lives in the model.
enum Slot<'a> {
    Matrix(&'a mut Weight),
    Norm(&'a mut RmsNorm),
    Bias(&'a mut Tensor<1>),
}

impl LlamaModel {
    /// Every weight of the model, in model order. Refused while adapters are loaded (full
    /// fine-tuning trains the base itself) and for a matrix not stored in f32.
    pub fn parameters(&self) -> Result<Vec<Parameter>> {
        if let Some(adapter) = self.lora_linears().flat_map(|l| l.adapters.keys()).next() {
            return Err(Error::invalid(format!(
                "full fine-tuning trains the base model itself, and adapter {adapter:?} is loaded: merge it into the base \
                 (merge_and_unload, merge --out) or delete it first"
            )));
        }
        let mut copy = self.clone();
        let mut out = Vec::new();
        for (name, slot) in copy.slots() {
            match slot {
                Slot::Matrix(w) => {
                    let Some(parts) = w.f32_parts() else {
                        return Err(Error::invalid(format!(
                            "full fine-tuning trains f32 weights, and {name} is stored as {}: load the model with dtype f32 \
                             (--dtype f32, dtype: 'f32')",
                            w.dtype().name()
                        )));
                    };
                    let (many, transposed) = (parts.len() > 1, w.is_transposed());
                    let mut row = 0;
                    for value in parts {
                        let rows = value.dims()[usize::from(transposed)];
                        let name = if many { format!("{name}[{row}..{}]", row + rows) } else { name.clone() };
                        row += rows;
                        out.push(Parameter { name, value, transposed, decays: true });
                    }
                }
                vector => {
                    let value = vector.values().expect("a vector").remove(0);
                    out.push(Parameter { name, value, transposed: false, decays: false });
                }
            }
        }
        Ok(out)
    }

    /// Puts `values` (one per [`parameters`](Self::parameters) entry, in its order and shapes)
    /// in place of the model's weights; a norm's gain follows its weight.
    pub fn set_parameters(&mut self, values: Vec<Tensor<2>>) {
        let mut values = values.into_iter();
        self.update_parameters(|_, _| values.next().expect("one value per parameter"));
        assert!(values.next().is_none(), "one value per parameter");
    }

    /// Replaces every weight by `update(index, value)`, in [`parameters`](Self::parameters)
    /// order, one at a time: the model lets go of a matrix while it is updated, so an update that
    /// writes in place (AdamW) needs no second copy of it, and each old one is freed before the
    /// next is written.
    pub fn update_parameters(&mut self, mut update: impl FnMut(usize, Tensor<2>) -> Tensor<2>) {
        let adds_one = self.config.norm_adds_one;
        let mut index = 0;
        for (_, mut slot) in self.slots() {
            let values = slot.take();
            let updated = values
                .into_iter()
                .map(|value| {
                    index += 1;
                    update(index - 1, value)
                })
                .collect();
            slot.set(updated, adds_one);
        }
    }

    /// A copy of the model (sharing its buffers) with `values` as its weights.
    pub fn with_parameters(&self, values: Vec<Tensor<2>>) -> LlamaModel {
        let mut copy = self.clone();
        copy.set_parameters(values);
        copy
    }

    /// Every parameter's place, in model order.
    fn slots(&mut self) -> Vec<(String, Slot<'_>)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), Slot::Matrix(&mut self.embed_tokens))];
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let DecoderLayer { input_layernorm, self_attn, post_attention_layernorm, feedforward_norms, mlp } = layer;
            let norms = [Some(("input_layernorm", input_layernorm)), Some(("post_attention_layernorm", post_attention_layernorm))]
                .into_iter()
                .chain(feedforward_norms.iter_mut().flat_map(|n| {
                    [
                        Some(("pre_feedforward_layernorm", &mut n.pre_feedforward_layernorm)),
                        Some(("post_feedforward_layernorm", &mut n.post_feedforward_layernorm)),
                    ]
                }))
                .chain([
                    self_attn.q_norm.as_mut().map(|n| ("self_attn.q_norm", n)),
                    self_attn.k_norm.as_mut().map(|n| ("self_attn.k_norm", n)),
                ])
                .flatten();
            out.extend(norms.map(|(name, norm)| (format!("model.layers.{i}.{name}.weight"), Slot::Norm(norm))));
            let linears = [&mut self_attn.q_proj, &mut self_attn.k_proj, &mut self_attn.v_proj, &mut self_attn.o_proj].into_iter().chain([
                &mut mlp.gate_proj,
                &mut mlp.up_proj,
                &mut mlp.down_proj,
            ]);
            for linear in linears {
                out.push((format!("{}.weight", linear.name), Slot::Matrix(&mut linear.base.weight_t)));
                if let Some(bias) = linear.base.bias.as_mut() {
                    out.push((format!("{}.bias", linear.name), Slot::Bias(bias)));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), Slot::Norm(&mut self.norm)));
        if let Some(head) = self.lm_head.as_mut() {
            out.push(("lm_head.weight".to_string(), Slot::Matrix(head)));
        }
        out
    }
}

impl Slot<'_> {
    /// Its values, taken from a matrix (which holds nothing until [`set`](Self::set)); a vector's
    /// (small) are copied.
    fn take(&mut self) -> Vec<Tensor<2>> {
        match self {
            Slot::Matrix(w) => w.take_f32_parts(),
            vector => vector.values().expect("a vector"),
        }
    }

    /// Its current values (`None` for a matrix not stored in f32).
    fn values(&self) -> Option<Vec<Tensor<2>>> {
        match self {
            Slot::Matrix(w) => w.f32_parts(),
            Slot::Norm(norm) => Some(vec![as_row(norm.weight.clone())]),
            Slot::Bias(bias) => Some(vec![as_row((*bias).clone())]),
        }
    }

    /// Replaces its values; a norm's gain is 1 + weight where `adds_one` (Gemma).
    fn set(self, values: Vec<Tensor<2>>, adds_one: bool) {
        let one = |values: Vec<Tensor<2>>| values.into_iter().next().expect("a vector's value");
        match self {
            Slot::Matrix(w) => w.put_f32_parts(values),
            Slot::Norm(norm) => {
                norm.weight = one(values).reshape([norm.weight.dims()[0]]);
                norm.gain = if adds_one { norm.weight.clone() + 1.0 } else { norm.weight.clone() };
            }
            Slot::Bias(bias) => *bias = one(values).reshape([bias.dims()[0]]),
        }
    }
}

/// A vector as [1, d].
fn as_row(v: Tensor<1>) -> Tensor<2> {
    let d = v.dims()[0];
    v.reshape([1, d])
}
