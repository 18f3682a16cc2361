//! `Linear`: a frozen linear layer without bias, `y = x W^T`.

use burn::tensor::Tensor;

use crate::nn::Weight;

/// A linear layer without bias; `weight_t` is the Hugging Face weight transposed: [in, out], so
/// that the layer is one plain matmul.
pub struct Linear {
    pub weight_t: Weight,
}

impl Linear {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_in] = x.dims();
        let d_out = self.weight_t.dims()[1];
        self.weight_t.apply(x.reshape([batch * seq, d_in])).reshape([batch, seq, d_out])
    }

    /// (d_in, d_out).
    pub fn shape(&self) -> (usize, usize) {
        let [d_in, d_out] = self.weight_t.dims();
        (d_in, d_out)
    }
}
