//! The key/value cache of generation: per layer, the keys (turned by the rotary embedding) and
//! values of the positions seen so far, in buffers with room to spare, so that a step writes
//! only its own positions ([`kv_append`]) rather than copying the whole cache. A sliding layer's
//! cache keeps only what its window can still see: when its buffer fills, the positions no later
//! query reaches are dropped.

use burn::tensor::{Tensor, s};

use crate::nn::ops::kv_append;

/// Positions a cache grows by at least: a decoded token does not reallocate every step.
const GROW_BY: usize = 256;

/// One layer's keys and values, [2, batch, kv_heads, capacity, head_dim] (keys, then values):
/// slot s holds position `first` + s.
#[derive(Clone)]
struct LayerCache {
    kv: Tensor<5>,
    first: usize,
}

/// Keys and values per layer, of which the positions up to `seen` are filled between forward
/// passes (a layer's, start + seq once the pass has reached it).
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
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

    /// The positions `layer`'s buffer has room for (its memory), if it has one.
    pub fn capacity(&self, layer: usize) -> Option<usize> {
        self.layers.get(layer)?.as_ref().map(|c| c.kv.dims()[3])
    }

    /// Writes this step's keys (turned by the step's rotary `tables` [2, seq, head_dim]) and
    /// values, [batch, seq, kv_heads * head_dim] as projected, for `layer` at positions
    /// `start`.. and returns the layer's cache (filled up to start + seq) with the position of
    /// its first slot. With a sliding `window`, positions before start + 1 - window (which no
    /// query of this step or later sees) may be dropped.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor<3>,
        v: Tensor<3>,
        tables: Tensor<3>,
        start: usize,
        window: Option<usize>,
    ) -> (Tensor<5>, usize) {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let [batch, seq, width] = k.dims();
        let d = tables.dims()[2];
        let layout = [batch, width / d];
        // the first position this step's queries see
        let keep = window.map_or(0, |w| start.saturating_sub(w - 1));
        let cache = match self.layers[layer].take() {
            Some(c) if start + seq - c.first <= c.kv.dims()[3] && c.kv.dims()[1..3] == layout => c,
            old => {
                // a cache continues the run it was made for: same batch and heads, from where it stopped
                assert!(
                    old.as_ref().is_none_or(|c| c.kv.dims()[1..3] == layout) && (old.is_some() || start == 0),
                    "a KV cache continued by another run (batch and key/value heads {layout:?}, from position {start})"
                );
                let needed = start + seq - keep;
                // the first run gets the room reserved (a sliding layer no more than its window
                // and a step of growth); a growing cache room to spare
                let capacity = match (start, window) {
                    (0, None) => needed.max(self.reserve),
                    (0, Some(w)) => needed.max(self.reserve.min(w + GROW_BY)),
                    (_, None) => needed.max(2 * start).next_multiple_of(GROW_BY),
                    (_, Some(_)) => needed + GROW_BY,
                };
                let empty = Tensor::<5>::empty([2, batch, width / d, capacity, d], &k.device());
                let kv = match old {
                    // the positions keep..start move to the front
                    Some(old) if start > keep => {
                        let (from, to) = (keep - old.first, start - old.first);
                        empty.slice_assign(s![.., .., .., 0..to - from], old.kv.slice(s![.., .., .., from..to]))
                    }
                    _ => empty,
                };
                LayerCache { kv, first: keep }
            }
        };
        let kv = kv_append(cache.kv, k, v, tables, start - cache.first);
        self.layers[layer] = Some(LayerCache { kv: kv.clone(), first: cache.first });
        (kv, cache.first)
    }

    /// Records that `new_tokens` positions were added (after all layers appended).
    pub(crate) fn advance(&mut self, new_tokens: usize) {
        self.seen += new_tokens;
    }
}
