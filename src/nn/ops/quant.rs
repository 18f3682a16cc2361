//! Products with a quantized matrix that stays quantized: `y = x Wᵀ` and its input gradient
//! `dL/dx = dL/dy · W`, for W [rows, cols] in the repacked row layout of [`crate::io::quant`]
//! (one Int tensor [rows, words per row]).
//!
//! A backend extension ([`QuantOps`]) like the fused operations: the CPU backend multiplies a few
//! rows (decoding) by dequantizing one weight row at a time into a buffer and taking its dot
//! products, so the f32 matrix never exists; for many rows it dequantizes the matrix once into
//! a transient and multiplies with gemm. WebGPU and wgpu never write the f32 matrix: a few rows
//! take their dot products straight from the codes, more rows (prefill, training) go through a
//! tiled kernel that dequantizes a tile of W at a time into workgroup memory, and so does the
//! input gradient. The autodiff node keeps the quantized words (not an f32 copy) for the
//! backward pass.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Cube, DType, TensorMetadata, backend_extension};
use burn::tensor::{Int, Tensor};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::{CubeCount, CubeDim};

use crate::io::quant::{QuantType, RowLayout};

#[backend_extension(Flex: cfg(not(target_arch = "wasm32")), Cube, Autodiff)]
pub trait QuantOps: Backend {
    /// The f32 matrix [rows, cols] of the repacked rows `words` [rows, words per row] of `kind`.
    fn dequantize_rows(words: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self>;

    /// x [m, cols] · Wᵀ: [m, rows].
    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self> {
        let w = Self::dequantize_rows(words, kind, cols);
        Self::float_matmul(x, Self::float_transpose(w))
    }

    /// grad [m, rows] · W: [m, cols] (the input gradient of [`quant_matmul`](Self::quant_matmul)).
    fn quant_matmul_backward(grad: FloatTensor<Self>, words: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self> {
        let w = Self::dequantize_rows(words, kind, cols);
        Self::float_matmul(grad, w)
    }
}

/// The layout of `kind` rows of `cols` values (checked when the matrix was made).
pub fn layout(kind: QuantType, cols: usize) -> RowLayout {
    RowLayout::new(kind, cols).expect("a quantized matrix's layout was checked when it was made")
}

mod kernels {
    use cubecl::prelude::*;
    use cubecl::terminate;

    use crate::io::quant::RowLayout;
    use crate::nn::weight::packed_f16::kernels::half_to_f32;

    /// Scale or offset `g` of a row whose scales (or offsets) start at word `at`.
    #[cube]
    fn scale_at(words: &Tensor<u32>, at: usize, g: usize, #[comptime] l: RowLayout) -> f32 {
        if comptime!(l.half_scales) {
            let word = words[at + g / 2];
            half_to_f32((word >> (16u32 * u32::cast_from(g % 2))) & 0xffffu32)
        } else {
            f32::reinterpret(words[at + g])
        }
    }

    /// The code of value `j` of the row whose words start at `base`.
    #[cube]
    fn code(words: &Tensor<u32>, base: usize, j: usize, #[comptime] l: RowLayout) -> u32 {
        let (low_bits, high_bits) = (comptime!(l.low_bits as u32), comptime!(l.high_bits as u32));
        let per_low = comptime!(32 / l.low_bits);
        let mut q = (words[base + j / per_low] >> (u32::cast_from(j % per_low) * low_bits)) & comptime!((1u32 << low_bits) - 1);
        if comptime!(high_bits > 0) {
            let per_high = comptime!(32 / l.high_bits);
            let at = base + comptime!(l.high_at) + j / per_high;
            q |= ((words[at] >> (u32::cast_from(j % per_high) * high_bits)) & comptime!((1u32 << high_bits) - 1)) << 4u32;
        }
        q
    }

    /// The value of code `q` in group `g` of the row at `base` times `x` summed over the group,
    /// from Σ q x and Σ x: `scale · Σ q x + offset · Σ x`, or `scale · (Σ q x - zero · Σ x)` (with
    /// one value and x = 1, that value: `scale · (q - zero)` as gguf-py computes it).
    #[cube]
    fn group_value(words: &Tensor<u32>, base: usize, g: usize, qx: f32, x_sum: f32, #[comptime] l: RowLayout) -> f32 {
        let scale = scale_at(words, base + comptime!(l.scales_at), g, l);
        if comptime!(l.own_offsets) {
            scale * qx + scale_at(words, base + comptime!(l.offsets_at), g, l) * x_sum
        } else {
            scale * (qx - f32::cast_from(comptime!(l.zero)) * x_sum)
        }
    }

    /// One thread per value: x = scale · q + offset or scale · (q - zero) (see `crate::io::quant`).
    #[cube(launch)]
    pub fn dequantize_kernel(words: &Tensor<u32>, out: &mut Tensor<f32>, #[comptime] l: RowLayout) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let cols = comptime!(l.cols);
        let (base, j) = ((i / cols) * comptime!(l.words), i % cols);
        let q = f32::cast_from(code(words, base, j, l));
        out[i] = group_value(words, base, j / comptime!(l.group), q, 1.0f32, l);
    }

    /// Outputs per side of the block of `out` a workgroup of [`tiled_kernel`] computes, and the
    /// values of the contraction it takes per step.
    pub const TILE: usize = 32;
    /// Threads per side of [`tiled_kernel`]'s workgroup: each computes 2 x 2 outputs of the tile.
    pub const THREADS: usize = 16;

    /// W's value at row `r`, column `c`.
    #[cube]
    fn weight_at(words: &Tensor<u32>, r: usize, c: usize, #[comptime] l: RowLayout) -> f32 {
        let base = r * comptime!(l.words);
        group_value(words, base, c / comptime!(l.group), f32::cast_from(code(words, base, c, l)), 1.0f32, l)
    }

    /// `a Wᵀ` (a [m, cols], out [m, rows]) or, `transposed`, `a W` (a [m, rows], out [m, cols]),
    /// W dequantized a TILE x TILE tile at a time into workgroup memory beside a tile of a: a
    /// workgroup computes a TILE x TILE block of out; no f32 matrix is written. Tiles are read
    /// along W's rows, where its codes lie next to each other.
    #[cube(launch)]
    pub fn tiled_kernel(
        words: &Tensor<u32>,
        a: &Tensor<f32>,
        out: &mut Tensor<f32>,
        #[comptime] l: RowLayout,
        #[comptime] transposed: bool,
    ) {
        let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
        let t = ty * THREADS + tx;
        let (m, n, depth) = (out.shape(0), out.shape(1), a.shape(1));
        let (i0, j0) = (CUBE_POS_Y as usize * TILE, CUBE_POS_X as usize * TILE);
        // a's tile padded by one column, so the threads of a column read different banks
        let mut a_tile = Shared::<[f32]>::new_slice(comptime!(TILE * (TILE + 1)));
        let mut w_tile = Shared::<[f32]>::new_slice(comptime!(TILE * TILE));
        let mut acc00 = 0.0f32;
        let mut acc01 = 0.0f32;
        let mut acc10 = 0.0f32;
        let mut acc11 = 0.0f32;
        let mut k0 = 0usize;
        while k0 < depth {
            for p in 0..comptime!(TILE * TILE / (THREADS * THREADS)) {
                let e = t + p * THREADS * THREADS;
                let (i, kk) = (e / TILE, e % TILE);
                let mut value = 0.0f32;
                if i0 + i < m && k0 + kk < depth {
                    value = a[(i0 + i) * depth + k0 + kk];
                }
                a_tile[i * (TILE + 1) + kk] = value;
                // w_tile[kk][j]: W at (row j0 + j, column k0 + kk), or transposed at (row k0 + kk, column j0 + j)
                let mut kk = e % TILE;
                let mut j = e / TILE;
                if comptime!(transposed) {
                    kk = e / TILE;
                    j = e % TILE;
                }
                let mut w = 0.0f32;
                if j0 + j < n && k0 + kk < depth {
                    if comptime!(transposed) {
                        w = weight_at(words, k0 + kk, j0 + j, l);
                    } else {
                        w = weight_at(words, j0 + j, k0 + kk, l);
                    }
                }
                w_tile[kk * TILE + j] = w;
            }
            sync_cube();
            for kk in 0..TILE {
                let a0 = a_tile[ty * (TILE + 1) + kk];
                let a1 = a_tile[(ty + THREADS) * (TILE + 1) + kk];
                let w0 = w_tile[kk * TILE + tx];
                let w1 = w_tile[kk * TILE + tx + THREADS];
                acc00 += a0 * w0;
                acc01 += a0 * w1;
                acc10 += a1 * w0;
                acc11 += a1 * w1;
            }
            sync_cube();
            k0 += TILE;
        }
        let (i, j) = (i0 + ty, j0 + tx);
        if i < m && j < n {
            out[i * n + j] = acc00;
        }
        if i < m && j + THREADS < n {
            out[i * n + j + THREADS] = acc01;
        }
        if i + THREADS < m && j < n {
            out[(i + THREADS) * n + j] = acc10;
        }
        if i + THREADS < m && j + THREADS < n {
            out[(i + THREADS) * n + j + THREADS] = acc11;
        }
    }

    /// x Wᵀ for a few rows of x (decoding): one thread per output value [i, r], the dot product of
    /// row i of x with row r of W taken group by group straight from W's codes; no dequantized
    /// matrix is written.
    #[cube(launch)]
    pub fn rows_dot_kernel(words: &Tensor<u32>, x: &Tensor<f32>, out: &mut Tensor<f32>, #[comptime] l: RowLayout) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let (cols, group) = (comptime!(l.cols), comptime!(l.group));
        let rows = out.shape(1);
        let base = (i % rows) * comptime!(l.words);
        let x_at = (i / rows) * cols;
        let mut total = 0.0f32;
        for g in 0..comptime!(l.cols / l.group) {
            let mut qx = 0.0f32;
            let mut x_sum = 0.0f32;
            for k in 0..group {
                let j = g * group + k;
                let value = x[x_at + j];
                qx += f32::cast_from(code(words, base, j, l)) * value;
                x_sum += value;
            }
            total += group_value(words, base, g, qx, x_sum, l);
        }
        out[i] = total;
    }
}

/// Rows of x up to which a product takes the dot products straight from the codes (decoding),
/// on every backend; above it, dequantizing once into a transient and a matmul is faster.
pub(super) const ROW_BY_ROW: usize = 8;

/// Launches a quantized kernel of one thread per value of `out` [rows, cols], with the layout's
/// constants after `inputs`.
macro_rules! launch_quant {
    ($kernel:ident, $client:expr, $count:expr, $layout:expr, $($input:expr),+) => {{
        let (l, cube_dim) = ($layout, CubeDim::new($client, $count));
        let cube_count = calculate_cube_count_elemwise($client, $count, cube_dim);
        kernels::$kernel::launch($client, cube_count, cube_dim, $($input),+, l)
    }};
}

impl QuantOps for Cube {
    fn dequantize_rows(words: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self> {
        let words: CubeTensor = burn_cubecl::kernel::into_contiguous(words);
        let rows = words.shape().dims::<2>()[0];
        let client = words.client.clone();
        let out = empty_device_dtype(client.clone(), words.device.clone(), [rows, cols].into(), DType::F32);
        launch_quant!(dequantize_kernel, &client, rows * cols, layout(kind, cols), words.into_tensor_arg(), out.clone().into_tensor_arg());
        out
    }

    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self> {
        let [m, k] = x.shape().dims::<2>();
        if k != cols || x.dtype != DType::F32 {
            let w = Self::dequantize_rows(words, kind, cols);
            return Self::float_matmul(x, Self::float_transpose(w));
        }
        if m > ROW_BY_ROW {
            return tiled(x, words, kind, cols, false);
        }
        let (x, words): (CubeTensor, CubeTensor) = (burn_cubecl::kernel::into_contiguous(x), burn_cubecl::kernel::into_contiguous(words));
        let rows = words.shape().dims::<2>()[0];
        let client = words.client.clone();
        let out = empty_device_dtype(client.clone(), words.device.clone(), [m, rows].into(), DType::F32);
        let args = (words.into_tensor_arg(), x.into_tensor_arg(), out.clone().into_tensor_arg());
        launch_quant!(rows_dot_kernel, &client, m * rows, layout(kind, cols), args.0, args.1, args.2);
        out
    }

    fn quant_matmul_backward(grad: FloatTensor<Self>, words: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self> {
        if grad.dtype != DType::F32 {
            return Self::float_matmul(grad, Self::dequantize_rows(words, kind, cols));
        }
        tiled(grad, words, kind, cols, true)
    }
}

/// [`kernels::tiled_kernel`]: `a Wᵀ`, or `transposed`, `a W`.
fn tiled(a: CubeTensor, words: CubeTensor, kind: QuantType, cols: usize, transposed: bool) -> CubeTensor {
    use kernels::{THREADS, TILE};
    let (a, words): (CubeTensor, CubeTensor) = (burn_cubecl::kernel::into_contiguous(a), burn_cubecl::kernel::into_contiguous(words));
    let (m, rows) = (a.shape().dims::<2>()[0], words.shape().dims::<2>()[0]);
    let n = if transposed { cols } else { rows };
    let client = words.client.clone();
    let out = empty_device_dtype(client.clone(), words.device.clone(), [m, n].into(), DType::F32);
    kernels::tiled_kernel::launch(
        &client,
        CubeCount::Static(n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1),
        CubeDim::new_2d(THREADS as u32, THREADS as u32),
        words.into_tensor_arg(),
        a.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        layout(kind, cols),
        transposed,
    );
    out
}

/// [`QuantOps::quant_matmul`]'s autodiff node: keeps the quantized words, and runs
/// [`QuantOps::quant_matmul_backward`]. The matrix is a constant.
#[derive(Debug)]
struct QuantMatmulBackward;

impl<B: QuantOps> Backward<B, 1> for QuantMatmulBackward {
    type State = (IntTensor<B>, QuantType, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (words, kind, cols) = ops.state;
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::quant_matmul_backward(grad, words, kind, cols));
        }
    }
}

impl<B: QuantOps, C: CheckpointStrategy> QuantOps for Autodiff<B, C> {
    /// A constant: nothing flows back into a base weight.
    fn dequantize_rows(words: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self> {
        <FloatTensor<Self>>::new(B::dequantize_rows(words, kind, cols))
    }

    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self> {
        match QuantMatmulBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::quant_matmul(x.into_primitive(), words.clone(), kind, cols);
                prep.finish((words, kind, cols), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::quant_matmul(x.into_primitive(), words, kind, cols)),
        }
    }
}

/// The f32 matrix of quantized rows `words`.
pub fn dequantize(words: Tensor<2, Int>, kind: QuantType, cols: usize) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as QuantOps>::dequantize_rows(words.into_dispatch(), kind, cols))
}

/// x Wᵀ for the quantized W of `words` (differentiable in x).
pub fn quant_matmul(x: Tensor<2>, words: Tensor<2, Int>, kind: QuantType, cols: usize) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as QuantOps>::quant_matmul(x.into_dispatch(), words.into_dispatch(), kind, cols))
}
