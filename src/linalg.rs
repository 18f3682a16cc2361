//! The decompositions done on the host: the thin SVD behind PiSSA's initialisation and the "svd"
//! combination of adapters, and the thin QR behind OLoRA's. burn-linalg's SVD reads its input back
//! synchronously, which WebGPU cannot do, and its QR is hundreds of small kernels; so callers read
//! the matrix back asynchronously once and faer (pure Rust, the same natively and in wasm)
//! decomposes it here, in f32 as PEFT's `torch.linalg` on f32 weights.

use crate::error::{Error, Result};
use crate::tensor::HostTensor;

/// `a = u diag(s) v^T` with k = min(m, n) singular values in descending order.
pub struct Svd {
    /// [m, k], orthonormal columns.
    pub u: HostTensor,
    pub s: Vec<f32>,
    /// [n, k], orthonormal columns.
    pub v: HostTensor,
}

/// The first `r` columns of `m` ([rows, k]), each scaled by `scale[j]`: [rows, r].
pub fn leading_columns(m: &HostTensor, r: usize, scale: &[f32]) -> HostTensor {
    let (rows, k) = (m.shape[0], m.shape[1]);
    let mut out = Vec::with_capacity(rows * r);
    for row in m.data.chunks_exact(k) {
        out.extend(row[..r].iter().zip(scale).map(|(x, s)| x * s));
    }
    HostTensor::new(vec![rows, r], out)
}

/// The thin SVD of a 2-D matrix.
pub fn thin_svd(a: &HostTensor) -> Result<Svd> {
    let (m, n) = (a.shape[0], a.shape[1]);
    let matrix = faer::Mat::<f32>::from_fn(m, n, |i, j| a.data[i * n + j]);
    let svd = matrix.thin_svd().map_err(|e| Error::Backend(format!("the SVD of a {m}x{n} matrix did not converge: {e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let k = m.min(n);
    // descending order, whatever order the solver returns
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&x, &y| s[y].total_cmp(&s[x]));
    let gather = |mat: faer::MatRef<f32>, rows: usize| {
        HostTensor::new(vec![rows, k], (0..rows).flat_map(|i| order.iter().map(move |&j| mat[(i, j)])).collect())
    };
    Ok(Svd { u: gather(u, m), s: order.iter().map(|&j| s[j]).collect(), v: gather(v, n) })
}

/// The thin QR of a 2-D matrix [m, n]: (Q [m, k] with orthonormal columns, R [k, n] upper
/// triangular), k = min(m, n).
pub fn thin_qr(a: &HostTensor) -> (HostTensor, HostTensor) {
    let (m, n) = (a.shape[0], a.shape[1]);
    let k = m.min(n);
    let qr = faer::Mat::<f32>::from_fn(m, n, |i, j| a.data[i * n + j]).qr();
    let (q, r) = (qr.compute_thin_Q(), qr.thin_R());
    let q = HostTensor::new(vec![m, k], (0..m).flat_map(|i| (0..k).map(move |j| (i, j))).map(|(i, j)| q[(i, j)]).collect());
    let r = HostTensor::new(vec![k, n], (0..k).flat_map(|i| (0..n).map(move |j| (i, j))).map(|(i, j)| r[(i, j)]).collect());
    (q, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// u diag(s) v^T rebuilds the matrix; the columns are orthonormal; s is sorted.
    #[test]
    fn svd_identities() {
        let (m, n) = (7, 4);
        let a = HostTensor::new(vec![m, n], (0..m * n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect());
        let svd = thin_svd(&a).unwrap();
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]), "{:?}", svd.s);
        for i in 0..m {
            for j in 0..n {
                let rebuilt: f32 = (0..n).map(|k| svd.u.data[i * n + k] * svd.s[k] * svd.v.data[j * n + k]).sum();
                assert!((rebuilt - a.data[i * n + j]).abs() < 1e-5, "[{i},{j}]");
            }
        }
        for (mat, rows) in [(&svd.u, m), (&svd.v, n)] {
            for x in 0..n {
                for y in 0..n {
                    let dot: f32 = (0..rows).map(|i| mat.data[i * n + x] * mat.data[i * n + y]).sum();
                    assert!((dot - if x == y { 1.0 } else { 0.0 }).abs() < 1e-5);
                }
            }
        }
        let (q, r) = thin_qr(&a);
        for i in 0..m {
            for j in 0..n {
                let rebuilt: f32 = (0..n).map(|k| q.data[i * n + k] * r.data[k * n + j]).sum();
                assert!((rebuilt - a.data[i * n + j]).abs() < 1e-5, "QR [{i},{j}]");
            }
        }
        assert!((0..n).all(|i| (0..i).all(|j| r.data[i * n + j] == 0.0)), "R is upper triangular");
        let lead = leading_columns(&svd.u, 2, &[2.0, 3.0]);
        assert_eq!(lead.shape, vec![m, 2]);
        assert_eq!(lead.data[3], svd.u.data[n + 1] * 3.0, "row 1, column 1 scaled by 3");
    }
}
