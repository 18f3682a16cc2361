//! The key/value cache of generation: per layer, the keys (turned by the rotary embedding) and
//! values of every position seen so far, in buffers with room to spare, so that a step writes
//! only its own positions ([`kv_append`]) rather than copying the whole cache.

use burn::tensor::{Tensor, s};

use crate::nn::ops::kv_append;

/// Positions a cache grows by at least: a decoded token does not reallocate every step.
const GROW_BY: usize = 256;

/// Keys and values per layer, [2, batch, kv_heads, capacity, head_dim] (keys, then values), of
/// which the first `seen` positions are filled between forward passes (a layer's, start + seq
/// once the pass has reached it).
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<Tensor<5>>>,
    seen: usize,
    /// Positions the first allocation makes room for (generation: the prompt and every new token).
    reserve: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache whose buffers are made for `positions` positions at first (more grow them).
    pub fn with_capacity(num_layers: usize, positions: usize) -> Self {
        KvCache { layers: vec![None; num_layers], seen: 0, reserve: positions }
    }

    /// How many positions the cache holds: the position of the next token.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Writes this step's keys (turned by the step's rotary `tables` [2, seq, head_dim]) and
    /// values, [batch, seq, kv_heads * head_dim] as projected, for `layer` at positions
    /// `start`.. and returns the layer's cache (filled up to start + seq).
    pub(crate) fn append(&mut self, layer: usize, k: Tensor<3>, v: Tensor<3>, tables: Tensor<3>, start: usize) -> Tensor<5> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let [batch, seq, width] = k.dims();
        let d = tables.dims()[2];
        let needed = start + seq;
        let layout = [batch, width / d];
        let cache = match self.layers[layer].take() {
            Some(cache) if cache.dims()[3] >= needed && cache.dims()[1..3] == layout => cache,
            old => {
                // a cache continues the run it was made for: same batch and heads, from where it stopped
                assert!(
                    old.as_ref().is_none_or(|c| c.dims()[1..3] == layout) && (old.is_some() || start == 0),
                    "a KV cache continued by another run (batch and key/value heads {layout:?}, from position {start})"
                );
                // the first run gets the room reserved (or exactly its size); a growing cache room to spare
                let capacity = if start == 0 { needed.max(self.reserve) } else { needed.max(2 * start).next_multiple_of(GROW_BY) };
                let empty = Tensor::<5>::empty([2, batch, width / d, capacity, d], &k.device());
                match old {
                    Some(old) => empty.slice_assign(s![.., .., .., 0..start], old.slice(s![.., .., .., 0..start])),
                    None => empty,
                }
            }
        };
        let cache = kv_append(cache, k, v, tables, start);
        self.layers[layer] = Some(cache.clone());
        cache
    }

    /// Records that `new_tokens` positions were added (after all layers appended).
    pub(crate) fn advance(&mut self, new_tokens: usize) {
        self.seen += new_tokens;
    }
}
