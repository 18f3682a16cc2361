//! f16 values packed two to a 32-bit word, for devices without f16 arithmetic (WebGPU without
//! `shader-f16`, e.g. SwiftShader): element 2i is the low half of word i, 2i+1 the high half, so
//! the words are the little-endian f16 bytes of the row-major matrix. Two cubecl kernels convert,
//! by integer arithmetic only (no f16 type, no reliance on the GPU keeping f32 subnormals):
//! `unpack` (exact) and `pack` (IEEE round-to-nearest-even, overflow to infinity, NaN kept).
//!
//! Reached through burn's backend extension: [`unpack`] and [`pack`] take and give ordinary
//! tensors; only burn's cubecl backend implements them (the CPU backend has a real f16 dtype and
//! never packs).

use burn::backend::{Backend, Cube, DType, FloatDType, TensorMetadata, backend_extension, tensor::FloatTensor, tensor::IntTensor};
use burn::tensor::{Int, Tensor};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::client::Client;
use cubecl::prelude::{CubeCount, CubeDim, TensorArg};

/// The kernels, in cubecl's Rust dialect (compiled to WGSL at first use).
pub(crate) mod kernels {
    use cubecl::prelude::*;
    use cubecl::terminate;

    /// The f32 value of the f16 bit pattern `h` (low 16 bits); the quantized kernels' f16
    /// scales use it too.
    #[cube]
    pub(crate) fn half_to_f32(h: u32) -> f32 {
        let sign = (h & 0x8000u32) << 16u32;
        let exp = (h >> 10u32) & 0x1fu32;
        let mant = h & 0x3ffu32;
        let mut bits = sign | ((exp + 112u32) << 23u32) | (mant << 13u32);
        if exp == 0u32 {
            // zero or subnormal: mant * 2^-24, exact as an f32 product of two exact values
            bits = sign | u32::reinterpret(f32::cast_from(mant) * 5.960_464_5e-8f32);
        } else if exp == 31u32 {
            // infinity or NaN
            bits = sign | 0x7f80_0000u32 | (mant << 13u32);
        }
        f32::reinterpret(bits)
    }

    /// The f16 bit pattern nearest to `x` (ties to even), in the low 16 bits.
    #[cube]
    fn f32_to_half(x: f32) -> u32 {
        let bits = u32::reinterpret(x);
        let sign = (bits >> 16u32) & 0x8000u32;
        let abs = bits & 0x7fff_ffffu32;
        let exp = abs >> 23u32;
        let mut h = 0u32;
        if abs > 0x7f80_0000u32 {
            h = 0x7e00u32; // NaN
        } else if abs >= 0x477f_f000u32 {
            h = 0x7c00u32; // 65520 and above round to infinity
        } else if exp >= 113u32 {
            // normal in f16: rebias the exponent, keep 10 of 23 mantissa bits, round the 13 dropped
            let rest = abs & 0x1fffu32;
            h = ((exp - 112u32) << 10u32) | ((abs >> 13u32) & 0x3ffu32);
            if rest > 0x1000u32 || (rest == 0x1000u32 && (h & 1u32) == 1u32) {
                h += 1u32; // a carry into the exponent is the right result
            }
        } else if exp >= 102u32 {
            // subnormal in f16: the value in units of 2^-24 is mant24 >> shift, rounded
            let mant24 = (abs & 0x7f_ffffu32) | 0x80_0000u32;
            let shift = 126u32 - exp;
            let rest = mant24 & ((1u32 << shift) - 1u32);
            let halfway = 1u32 << (shift - 1u32);
            h = mant24 >> shift;
            if rest > halfway || (rest == halfway && (h & 1u32) == 1u32) {
                h += 1u32;
            }
        }
        // below 2^-25 (exp < 102): rounds to zero, h stays 0
        sign | h
    }

    #[cube(launch)]
    pub fn unpack_kernel(words: &Tensor<u32>, values: &mut Tensor<f32>) {
        let i = ABSOLUTE_POS;
        if i >= words.len() {
            terminate!();
        }
        let w = words[i];
        values[2 * i] = half_to_f32(w & 0xffffu32);
        values[2 * i + 1] = half_to_f32(w >> 16u32);
    }

    #[cube(launch)]
    pub fn pack_kernel(values: &Tensor<f32>, words: &mut Tensor<u32>) {
        let i = ABSOLUTE_POS;
        if i >= words.len() {
            terminate!();
        }
        words[i] = f32_to_half(values[2 * i]) | (f32_to_half(values[2 * i + 1]) << 16u32);
    }
}

#[backend_extension(Cube)]
trait PackedF16Backend: Backend {
    fn unpack_f16(words: IntTensor<Self>) -> FloatTensor<Self>;
    fn pack_f16(values: FloatTensor<Self>) -> IntTensor<Self>;
}

/// Runs a kernel of one thread per word from `input` into a new contiguous tensor of `shape`.
fn launch_per_word(
    input: CubeTensor,
    shape: [usize; 2],
    dtype: DType,
    words: usize,
    launch: impl FnOnce(&Client, CubeCount, CubeDim, TensorArg, TensorArg),
) -> CubeTensor {
    let input = burn_cubecl::kernel::into_contiguous(input);
    let client = input.client.clone();
    let output = empty_device_dtype(client.clone(), input.device.clone(), shape.into(), dtype);
    let cube_dim = CubeDim::new(&client, words);
    let cube_count = calculate_cube_count_elemwise(&client, words, cube_dim);
    launch(&client, cube_count, cube_dim, input.into_tensor_arg(), output.clone().into_tensor_arg());
    output
}

impl PackedF16Backend for Cube {
    fn unpack_f16(words: IntTensor<Self>) -> FloatTensor<Self> {
        let [rows, cols] = words.shape().dims::<2>();
        launch_per_word(words, [rows, 2 * cols], DType::F32, rows * cols, |client, count, dim, input, output| {
            kernels::unpack_kernel::launch(client, count, dim, input, output)
        })
    }

    fn pack_f16(values: FloatTensor<Self>) -> IntTensor<Self> {
        let [rows, cols] = values.shape().dims::<2>();
        launch_per_word(values, [rows, cols / 2], DType::I32, rows * cols / 2, |client, count, dim, input, output| {
            kernels::pack_kernel::launch(client, count, dim, input, output)
        })
    }
}

/// The f32 matrix [rows, 2 * cols] whose halves `words` [rows, cols] holds.
pub fn unpack(words: Tensor<2, Int>) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as PackedF16Backend>::unpack_f16(words.into_dispatch()))
}

/// `values` [rows, cols] (cols even) rounded to f16 and packed: [rows, cols / 2].
pub fn pack(values: Tensor<2>) -> Tensor<2, Int> {
    let values = values.cast(FloatDType::F32);
    Tensor::from_dispatch(<burn::backend::Dispatch as PackedF16Backend>::pack_f16(values.into_dispatch()))
}

/// The packed words of f16 bit patterns, for upload: `halves` (even length) two to a word.
pub fn words_of(halves: &[u16]) -> Vec<i32> {
    halves.chunks_exact(2).map(|pair| (u32::from(pair[0]) | (u32::from(pair[1]) << 16)) as i32).collect()
}
