//! PEFT's `add_weighted_adapter`: a new adapter from a weighted combination of loaded ones, per
//! layer, as `linear`, `cat` or `svd` (see [`Combination`]). The new adapter has r = lora_alpha =
//! the new rank (scaling 1) and the other settings of the first adapter.

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::linalg::{leading_columns, thin_svd};
use crate::lora::model::{check_new_name, install_adapter};
use crate::lora::{AdapterWeights, LoraConfig, LoraModel, LoraWeights, TargetModules};
use crate::tensor::{read_host, upload};

/// How [`LoraModel::add_weighted_adapter`] combines adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// A = sum sign_i sqrt(|w_i s_i|) A_i, B = sum sqrt(|w_i s_i|) B_i (equal ranks).
    Linear,
    /// A = rows of w_i s_i A_i stacked, B = columns of B_i side by side: rank sum r_i, exact sum of deltas.
    Cat,
    /// The best rank-k approximation of sum w_i s_i B_i A_i (truncated SVD: B = U_k S_k, A = V_k^T);
    /// k = `rank`, or the largest rank of the adapters. PEFT's default.
    Svd { rank: Option<usize> },
}

impl Combination {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "linear" => Ok(Combination::Linear),
            "cat" => Ok(Combination::Cat),
            "svd" => Ok(Combination::Svd { rank: None }),
            other => Err(Error::invalid(format!("combination {other:?} is not supported; use \"svd\", \"linear\" or \"cat\""))),
        }
    }
}

/// See [`LoraModel::add_weighted_adapter`].
pub(super) async fn add_weighted_adapter<M: LoraModel + ?Sized>(
    model: &mut M,
    names: &[&str],
    weights: &[f64],
    new_name: &str,
    combination: Combination,
) -> Result<()> {
    if names.is_empty() || names.len() != weights.len() {
        return Err(Error::invalid(format!("give one weight per adapter: {} adapters, {} weights", names.len(), weights.len())));
    }
    check_new_name(model, new_name)?;
    let mut configs = Vec::with_capacity(names.len());
    for name in names {
        configs.push(model.known_adapter(name)?);
    }
    // with one adapter PEFT always combines linearly
    let combination = if names.len() == 1 { Combination::Linear } else { combination };
    let new_rank = new_rank(&configs, combination)?;
    let config = combined_config(&configs, new_rank)?;

    let mut built = AdapterWeights::new();
    for layer in model.lora_linears() {
        let parts: Vec<(&LoraWeights, f64)> =
            names.iter().zip(weights).filter_map(|(n, &w)| layer.adapters.get(*n).map(|l| (l, w * l.scaling))).collect();
        if parts.is_empty() {
            continue;
        }
        let (a_t, b_t) = combine_layer(&parts, combination, new_rank, &layer.name).await?;
        built.insert(layer.name.clone(), LoraWeights { a_t, b_t, scaling: 1.0 });
    }
    install_adapter(model, new_name, config, built, AdapterWeights::new()).await
}

/// The rank of the combined adapter.
fn new_rank(configs: &[&LoraConfig], combination: Combination) -> Result<usize> {
    let max_rank = |c: &LoraConfig| c.rank_pattern.iter().map(|(_, r)| *r).chain([c.r]).max().unwrap_or(c.r);
    let ranks: Vec<usize> = configs.iter().map(|c| max_rank(c)).collect();
    match combination {
        Combination::Linear if ranks.iter().any(|&r| r != ranks[0]) => {
            Err(Error::invalid(format!("linear combination needs equal ranks, got {ranks:?}: use \"cat\"")))
        }
        Combination::Linear => Ok(ranks[0]),
        Combination::Cat => Ok(ranks.iter().sum()),
        Combination::Svd { rank: Some(0) } => Err(Error::invalid("the svd combination needs a rank of at least 1")),
        Combination::Svd { rank } => Ok(rank.unwrap_or_else(|| ranks.iter().copied().max().expect("non-empty"))),
    }
}

/// The first adapter's config with every adapter's targets, rank and alpha `rank`, no patterns.
fn combined_config(configs: &[&LoraConfig], rank: usize) -> Result<LoraConfig> {
    let mut config = configs[0].clone();
    config.target_modules = TargetModules::union(&configs.iter().map(|c| &c.target_modules).collect::<Vec<_>>())?;
    config.r = rank;
    config.lora_alpha = rank as f64;
    config.use_rslora = false;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    Ok(config)
}

/// One layer's combined (A^T [in, rank], B^T [rank, out]) from its (adapter, weight x scaling)
/// parts.
async fn combine_layer(
    parts: &[(&LoraWeights, f64)],
    combination: Combination,
    rank: usize,
    module: &str,
) -> Result<(Tensor<2>, Tensor<2>)> {
    let (a_t, b_t) = match combination {
        Combination::Linear => {
            if parts.iter().any(|(l, _)| l.rank() != parts[0].0.rank()) {
                return Err(Error::invalid(format!(
                    "linear combination needs equal ranks, but the adapters' ranks differ at {module}: use \"cat\""
                )));
            }
            let a = parts.iter().map(|(l, ws)| l.a_t.clone().mul_scalar(ws.abs().sqrt() * ws.signum())).reduce(|x, y| x + y);
            let b = parts.iter().map(|(l, ws)| l.b_t.clone().mul_scalar(ws.abs().sqrt())).reduce(|x, y| x + y);
            (a.expect("non-empty"), b.expect("non-empty"))
        }
        Combination::Cat => (
            Tensor::cat(parts.iter().map(|(l, ws)| l.a_t.clone().mul_scalar(*ws)).collect(), 1),
            Tensor::cat(parts.iter().map(|(l, _)| l.b_t.clone()).collect(), 0),
        ),
        Combination::Svd { .. } => {
            let delta_t = parts.iter().map(|(l, ws)| l.a_t.clone().matmul(l.b_t.clone()).mul_scalar(*ws)).reduce(|x, y| x + y);
            truncated_svd(delta_t.expect("non-empty"), rank).await?
        }
    };
    // modules with a smaller rank than the new one (cat of fewer adapters) are zero-padded, as PEFT
    let r = a_t.dims()[1];
    if r >= rank {
        return Ok((a_t, b_t));
    }
    let device = a_t.device();
    let ([d_in, _], d_out) = (a_t.dims(), b_t.dims()[1]);
    Ok((
        Tensor::cat(vec![a_t, Tensor::zeros([d_in, rank - r], &device)], 1),
        Tensor::cat(vec![b_t, Tensor::zeros([rank - r, d_out], &device)], 0),
    ))
}

/// (A^T, B^T) of rank <= k whose product is the best rank-k approximation of `delta_t` = (dW)^T
/// [in, out]. With dW^T = U S V^T: PEFT's B = V_k S_k ([out, k]) and A = U_k^T ([k, in]).
async fn truncated_svd(delta_t: Tensor<2>, k: usize) -> Result<(Tensor<2>, Tensor<2>)> {
    let device = delta_t.device();
    let svd = thin_svd(&read_host(delta_t).await?)?;
    let k = k.min(svd.s.len());
    let a_t = leading_columns(&svd.u, k, &vec![1.0; k]);
    let b_t = leading_columns(&svd.v, k, &svd.s[..k]).transpose();
    Ok((upload(a_t, &device), upload(b_t, &device)))
}
