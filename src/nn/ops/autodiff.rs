//! The autodiff backend's side of the fused operations: each recorded as one node whose
//! backward is the matching `*_backward` operation of the inner backend (LoRA and self-attention
//! through [`InnerOps`], which their nodes call with arguments that never cross burn's dispatch:
//! an optional mask, saved state). Untracked, an operation runs on the inner backend as it is.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend};

use super::{Activation, Dropout, FusedOps, InnerOps, SavedAttention, composed};

/// The gated activation's autodiff node: keeps gate, up and the activation, and runs
/// [`FusedOps::gated_backward`].
#[derive(Debug)]
struct GatedBackward;

impl<B: FusedOps> Backward<B, 2> for GatedBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, Activation);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [gate_node, up_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up, act) = ops.state;
        let (d_gate, d_up) = B::gated_backward(gate, up, grad, act);
        if let Some(node) = gate_node {
            grads.register::<B>(node.id, d_gate);
        }
        if let Some(node) = up_node {
            grads.register::<B>(node.id, d_up);
        }
    }
}

/// RMSNorm's autodiff node over (x, weight): keeps x, the weight and eps, and runs
/// [`FusedOps::rms_norm_backward`] for x and, where the weight is trained (full fine-tuning),
/// [`composed::rms_norm_weight_grad`] for it.
#[derive(Debug)]
struct RmsNormBackward;

impl<B: FusedOps> Backward<B, 2> for RmsNormBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node, weight_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, eps) = ops.state;
        if let Some(node) = weight_node {
            grads.register::<B>(node.id, composed::rms_norm_weight_grad::<B>(x.clone(), grad.clone(), eps));
        }
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::rms_norm_backward(x, weight, grad, eps));
        }
    }
}

/// The rotary embedding's autodiff node: keeps cos and sin (constants); the backward is the
/// rotation back.
#[derive(Debug)]
struct RotaryBackward;

impl<B: FusedOps> Backward<B, 1> for RotaryBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin, inverse) = ops.state;
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::rotary(grad, cos, sin, !inverse));
        }
    }
}

/// The masked softmax's autodiff node: keeps the probabilities, and runs
/// [`FusedOps::softmax_backward`]. The mask is a constant.
#[derive(Debug)]
struct SoftmaxBackward;

impl<B: FusedOps> Backward<B, 1> for SoftmaxBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [scores_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = scores_node {
            grads.register::<B>(node.id, B::softmax_backward(ops.state, grad));
        }
    }
}

/// A sum's autodiff node: its gradient goes to both terms as it is.
#[derive(Debug)]
struct AddBackward;

impl<B: FusedOps> Backward<B, 2> for AddBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        for node in ops.parents.into_iter().flatten() {
            grads.register::<B>(node.id, grad.clone());
        }
    }
}

/// LoRA's autodiff node: keeps x, the dropout, A^T, B^T, (x * dropout) A^T and the scaling,
/// and runs [`InnerOps::lora_backward`]; the base output's gradient is the output's.
#[derive(Debug)]
struct LoraBackward;

type LoraState<B> = (FloatTensor<B>, Option<Dropout<B>>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f32);

impl<B: FusedOps + InnerOps> Backward<B, 4> for LoraBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [base_node, x_node, a_node, b_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, dropout, a_t, b_t, xa, scaling) = ops.state;
        // x's gradient only where x has a node (not the first layer's input, say)
        let (d_x, d_a, d_b) = B::lora_backward(x, dropout, a_t, b_t, xa, grad.clone(), scaling, x_node.is_none());
        for (node, g) in [(base_node, Some(grad)), (x_node, d_x), (a_node, Some(d_a)), (b_node, Some(d_b))] {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// LoRA with or without a dropout mask as one node over (base, x, A^T, B^T).
fn lora<B: FusedOps + InnerOps, C: CheckpointStrategy>(
    base: FloatTensor<Autodiff<B, C>>,
    x: FloatTensor<Autodiff<B, C>>,
    dropout: Option<(FloatTensor<Autodiff<B, C>>, f32)>,
    a_t: FloatTensor<Autodiff<B, C>>,
    b_t: FloatTensor<Autodiff<B, C>>,
    scaling: f32,
) -> FloatTensor<Autodiff<B, C>> {
    let parents = [base.node(), x.node(), a_t.node(), b_t.node()];
    let [base, x, a_t, b_t] = [base, x, a_t, b_t].map(|t| t.into_primitive());
    let dropout = dropout.map(|(mask, keep_scale)| Dropout { mask: mask.into_primitive(), keep_scale });
    let xa = B::lora_down(x.clone(), dropout.clone(), a_t.clone());
    let out = B::lora_epilogue(base, xa.clone(), b_t.clone(), scaling);
    match LoraBackward.prepare::<C>(parents).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((x, dropout, a_t, b_t, xa, scaling), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Self-attention's autodiff node over (q, k, v): keeps what the kernels saved, and runs
/// [`InnerOps::self_attention_backward`].
#[derive(Debug)]
struct SelfAttentionBackward;

impl<B: FusedOps + InnerOps> Backward<B, 3> for SelfAttentionBackward {
    type State = SavedAttention<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (d_q, d_k, d_v) = B::self_attention_backward(ops.state, grad);
        for (node, g) in ops.parents.into_iter().zip([d_q, d_k, d_v]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: FusedOps + InnerOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn gated(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        match GatedBackward.prepare::<C>([gate.node(), up.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (gate, up) = (gate.into_primitive(), up.into_primitive());
                let out = B::gated(gate.clone(), up.clone(), act);
                prep.finish((gate, up, act), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gated(gate.into_primitive(), up.into_primitive(), act)),
        }
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let parents = [x.node(), weight.node()];
        let weight = weight.into_primitive();
        match RmsNormBackward.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let x = x.into_primitive();
                let out = B::rms_norm(x.clone(), weight.clone(), eps);
                prep.finish((x, weight, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x.into_primitive(), weight, eps)),
        }
    }

    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, inverse: bool) -> FloatTensor<Self> {
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match RotaryBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::rotary(x.into_primitive(), cos.clone(), sin.clone(), inverse);
                prep.finish((cos, sin, inverse), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rotary(x.into_primitive(), cos, sin, inverse)),
        }
    }

    /// One pass of the inner backend; tracked, the sum's node (its gradient passes to both terms)
    /// and RMSNorm's node on the sum, as if they had run apart.
    fn add_rms_norm(
        x: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let parents = [x.node(), delta.node()];
        let weight_node = weight.node();
        let weight = weight.into_primitive();
        let (h, normed) = B::add_rms_norm(x.into_primitive(), delta.into_primitive(), weight.clone(), eps);
        let h: FloatTensor<Self> = AddBackward.prepare::<C>(parents).compute_bound().stateless(h);
        let normed = match RmsNormBackward.prepare::<C>([h.node(), weight_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((h.primitive().clone(), weight, eps), normed),
            OpsKind::UnTracked(prep) => prep.finish(normed),
        };
        (h, normed)
    }

    /// Untracked, the backend's; tracked, the backend's kernels as one node where it has them,
    /// otherwise the composed steps, each with its own node.
    fn self_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        scale: f32,
        window: Option<usize>,
    ) -> FloatTensor<Self> {
        if !(q.is_tracked() || k.is_tracked() || v.is_tracked()) {
            let [q, k, v, tables] = [q, k, v, tables].map(|t| t.into_primitive());
            return Self::from_inner(B::self_attention(q, k, v, tables, scale, window));
        }
        let inner = |t: &FloatTensor<Self>| t.primitive().clone();
        match B::self_attention_kernels(inner(&q), inner(&k), inner(&v), inner(&tables), scale, window) {
            Some((out, saved)) => match SelfAttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(saved, out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            },
            None => composed::self_attention::<Self>(q, k, v, tables, scale, window),
        }
    }

    fn lora(
        base: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a_t: FloatTensor<Self>,
        b_t: FloatTensor<Self>,
        scaling: f32,
    ) -> FloatTensor<Self> {
        lora::<B, C>(base, x, None, a_t, b_t, scaling)
    }

    fn lora_dropout(
        base: FloatTensor<Self>,
        x: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        keep_scale: f32,
        a_t: FloatTensor<Self>,
        b_t: FloatTensor<Self>,
        scaling: f32,
    ) -> FloatTensor<Self> {
        lora::<B, C>(base, x, Some((mask, keep_scale)), a_t, b_t, scaling)
    }

    fn kv_append(
        kv: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        if k.is_tracked() || v.is_tracked() {
            return composed::kv_append::<Self>(kv, k, v, tables, start);
        }
        let [kv, k, v, tables] = [kv, k, v, tables].map(|t| t.into_primitive());
        Self::from_inner(B::kv_append(kv, k, v, tables, start))
    }

    /// Untracked, the backend's attention; tracked, the composed steps, each with its own node.
    fn causal_attention(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        scale: f32,
        start: usize,
        cached_from: usize,
        window: Option<usize>,
    ) -> FloatTensor<Self> {
        if q.is_tracked() || kv.is_tracked() {
            return composed::causal_attention::<Self>(q, kv, tables, scale, start, cached_from, window);
        }
        let [q, kv, tables] = [q, kv, tables].map(|t| t.into_primitive());
        Self::from_inner(B::causal_attention(q, kv, tables, scale, start, cached_from, window))
    }

    fn masked_softmax(scores: FloatTensor<Self>, mask: FloatTensor<Self>) -> FloatTensor<Self> {
        let probs = B::masked_softmax(scores.primitive().clone(), mask.into_primitive());
        match SoftmaxBackward.prepare::<C>([scores.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(probs.clone(), probs),
            OpsKind::UnTracked(prep) => prep.finish(probs),
        }
    }
}
