//! The key/value cache of generation: per layer, the keys and values of every position seen so far.

use burn::tensor::Tensor;

/// Keys and values per layer, each [batch, kv_heads, seen, head_dim].
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    seen: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![None; num_layers], seen: 0 }
    }

    /// How many positions the cache holds: the position of the next token.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Appends this step's keys and values for `layer` and returns all of them.
    pub(crate) fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.layers[layer].take() {
            Some((past_k, past_v)) => (Tensor::cat(vec![past_k, k], 2), Tensor::cat(vec![past_v, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// Records that `new_tokens` positions were added (after all layers appended).
    pub(crate) fn advance(&mut self, new_tokens: usize) {
        self.seen += new_tokens;
    }
}
