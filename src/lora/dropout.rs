//! LoRA dropout for a micro-batch whose rows may run as parts on several threads: each adapted
//! layer's keep-mask is drawn once for the whole micro-batch, in layer order, by whichever part
//! gets there first, and every part uses its own rows of it. The device's random stream is thus
//! consumed exactly as by one unsplit forward pass, whatever the threads' timing: a seeded run
//! draws the same masks split or not.

use std::cell::Cell;
use std::ops::Range;
use std::sync::Mutex;

use burn::tensor::{Device, Distribution, Tensor};

/// The masks of one micro-batch, shared by its parts.
pub struct DropoutMasks {
    p: f64,
    /// Rows (tokens) of the whole micro-batch.
    tokens: usize,
    parts: usize,
    /// How many times each part runs each layer (2 with gradient checkpointing).
    passes: usize,
    /// Per draw, in order: the keep-mask (0 or 1) and how many takes of its rows are still to come
    /// (the mask is let go after the last, so only the parts' autodiff graphs keep it alive).
    drawn: Mutex<Vec<(Option<Tensor<2>>, usize)>>,
}

impl DropoutMasks {
    /// Dropout probability `p` (0 < p < 1) for `tokens` rows split into `parts`, each running
    /// every layer `passes` times (the forward pass, and again for the gradient when
    /// checkpointing: see [`PartDropout::seek`]).
    pub fn new(p: f64, tokens: usize, parts: usize, passes: usize) -> Self {
        DropoutMasks { p, tokens, parts, passes, drawn: Mutex::new(Vec::new()) }
    }

    /// What part `rows` (token rows of the micro-batch) of a forward pass applies.
    pub fn part(&self, rows: Range<usize>) -> PartDropout<'_> {
        PartDropout { masks: self, rows, next: Cell::new(0) }
    }
}

/// One part's view: its rows, and how many layers it has passed.
pub struct PartDropout<'a> {
    masks: &'a DropoutMasks,
    rows: Range<usize>,
    next: Cell<usize>,
}

impl PartDropout<'_> {
    /// Which mask the next adapted layer takes.
    pub fn position(&self) -> usize {
        self.next.get()
    }

    /// Makes the next adapted layer take mask `position` again: a layer run a second time (for
    /// its gradient, when checkpointing) applies the masks of its first run.
    pub fn seek(&self, position: usize) {
        self.next.set(position);
    }

    /// Inverted dropout (torch.nn.Dropout in training mode) of the next adapted layer's input
    /// [this part's tokens, `width`]: its keep-mask (each entry 0 or 1) and the scale 1 / (1 - p)
    /// of what is kept; the layer multiplies its input by both.
    pub fn mask(&self, width: usize, device: &Device) -> (Tensor<2>, f32) {
        let m = self.masks;
        let index = self.next.replace(self.next.get() + 1);
        let mut drawn = m.drawn.lock().expect("no thread panics holding the masks");
        if drawn.len() == index {
            let keep = Tensor::<2>::random([m.tokens, width], Distribution::Bernoulli(1.0 - m.p), device);
            drawn.push((Some(keep), m.parts * m.passes));
        }
        let (mask, waiting) = &mut drawn[index];
        *waiting -= 1;
        let full = if *waiting == 0 { mask.take() } else { mask.clone() }.expect("a part takes its rows once a pass");
        drop(drawn);
        let rows = if self.rows.len() == m.tokens { full } else { full.narrow(0, self.rows.start, self.rows.len()) };
        (rows, (1.0 / (1.0 - m.p)) as f32)
    }
}
