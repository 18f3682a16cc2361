//! `Linear`: a frozen linear layer, `y = x W^T + b` (most have no bias).

use burn::tensor::Tensor;

use crate::nn::Weight;

/// A linear layer; `weight_t` is the Hugging Face weight transposed: [in, out], so that the layer
/// is one plain matmul (plus the bias, where the family has one: Qwen2's q, k and v).
#[derive(Clone)]
pub struct Linear {
    pub weight_t: Weight,
    /// [out], in f32.
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_in] = x.dims();
        let d_out = self.weight_t.dims()[1];
        self.apply(x.reshape([batch * seq, d_in])).reshape([batch, seq, d_out])
    }

    /// x [rows, in] -> [rows, out].
    pub fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        let y = self.weight_t.apply(x);
        match &self.bias {
            Some(bias) => y + bias.clone().unsqueeze(),
            None => y,
        }
    }

    /// (d_in, d_out).
    pub fn shape(&self) -> (usize, usize) {
        let [d_in, d_out] = self.weight_t.dims();
        (d_in, d_out)
    }
}
