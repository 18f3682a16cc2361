//! `Weight`: a frozen matrix of the base model, stored in f32, in f16 (half the memory, like
//! transformers' `torch_dtype=float16`) or in quantized blocks (ggml's types, a quarter to an
//! eighth of it, like bitsandbytes' `load_in_8bit`/`load_in_4bit`), and always computed with in
//! f32: an f16 matrix is converted where it is used, a quantized one is dequantized inside its
//! products ([`crate::nn::ops::quant`]), so every product accumulates in f32 and activations stay f32.
//!
//! f16 storage is burn's f16 dtype where the device has one (the CPU backend, GPUs with
//! `shader-f16`) and otherwise two halves packed in a 32-bit word ([`packed_f16`]), which any
//! WebGPU device can hold. Updates (merging an adapter) round the sum to the storage precision,
//! as PEFT's merge into an f16 base does.

pub mod packed_f16;

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::io::gguf::StoredTensor;
use crate::io::quant::{QuantMatrix, QuantType, RowLayout, names};
use crate::nn::ops::quant::{dequantize, quant_matmul};
use crate::tensor::{HostTensor, read_host, read_i32};

/// How the base model's matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// As the file stores them: a GGUF's quantized and f16 tensors keep their type, everything
    /// else (safetensors included) loads as f32.
    #[default]
    Auto,
    F32,
    F16,
    /// The decoder layers' linear weights quantized to this type (dequantized first if the file
    /// stores them in another quantized type); embeddings, head and norms stay as loaded, as
    /// bitsandbytes leaves them.
    Quant(QuantType),
}

impl WeightDtype {
    /// Parses "auto", "f32"/"float32", "f16"/"float16", or a quantized type to quantize to
    /// ("q8_0", "q4_0", "q4_1", "q5_0").
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(WeightDtype::Auto),
            "f32" | "float32" => Ok(WeightDtype::F32),
            "f16" | "float16" => Ok(WeightDtype::F16),
            other => match QuantType::parse(other).filter(|k| QuantType::QUANTIZABLE.contains(k)) {
                Some(kind) => Ok(WeightDtype::Quant(kind)),
                None => Err(Error::invalid(format!(
                    "unknown weight dtype {other:?}: use \"auto\", \"f32\", \"f16\" or a type to quantize to ({})",
                    names(&QuantType::QUANTIZABLE).to_lowercase()
                ))),
            },
        }
    }

    /// The name `parse` takes.
    pub fn name(self) -> String {
        match self {
            WeightDtype::Auto => "auto".into(),
            WeightDtype::F32 => "f32".into(),
            WeightDtype::F16 => "f16".into(),
            WeightDtype::Quant(kind) => kind.name().to_lowercase(),
        }
    }
}

#[derive(Clone)]
enum Stored {
    F32(Tensor<2>),
    /// burn's f16 dtype.
    F16(Tensor<2>),
    /// f16 halves two to a word: [rows, cols / 2].
    PackedF16(Tensor<2, Int>),
    /// Quantized rows [rows, words per row] of a [rows, cols] matrix; the weight is that
    /// matrix, or its transpose when `transposed` (a linear layer's [in, out] of a Hugging Face
    /// [out, in] weight: blocks run along the input dimension, as in the file).
    Quant {
        words: Tensor<2, Int>,
        kind: QuantType,
        cols: usize,
        transposed: bool,
    },
}

/// A base-model matrix (constant: it never requires a gradient).
#[derive(Clone)]
pub struct Weight {
    stored: Stored,
}

impl Weight {
    /// An f32 matrix as it is.
    pub fn f32(value: Tensor<2>) -> Self {
        Weight { stored: Stored::F32(value) }
    }

    /// Uploads a 2-D host matrix in `dtype` (taken, so f32 values move to the device without a
    /// copy); the weight is its transpose when `transposed`. A quantized `dtype` quantizes the
    /// matrix as it is, blocks along its rows (see [`QuantMatrix::quantize`]); `name` goes into
    /// the error when a value does not fit in f16 or cannot be quantized, or the matrix in no
    /// buffer of the device ([`check_buffer_size`]).
    pub fn upload(t: HostTensor, dtype: WeightDtype, transposed: bool, name: &str, device: &Device) -> Result<Self> {
        let oriented = |t: HostTensor| if transposed { t.transpose() } else { t };
        match dtype {
            WeightDtype::Quant(kind) => {
                let q = QuantMatrix::quantize(kind, &t, name)?;
                check_buffer_size(q.bytes(), name)?;
                Ok(Self::quantized(q, transposed, device))
            }
            WeightDtype::F32 | WeightDtype::Auto => {
                check_buffer_size(4 * t.data.len(), name)?;
                let t = oriented(t);
                let shape = [t.shape[0], t.shape[1]];
                Ok(Weight::f32(Tensor::from_data(TensorData::new(t.data, shape), device)))
            }
            WeightDtype::F16 => {
                check_buffer_size(2 * t.data.len(), name)?;
                if !device.supports_dtype(FloatDType::F16) {
                    return Self::packed_f16(&oriented(t), name, device);
                }
                let t = oriented(t);
                let halves = to_f16(&t, name)?;
                Ok(Weight {
                    stored: Stored::F16(Tensor::from_data(TensorData::new(halves, [t.shape[0], t.shape[1]]), (device, DType::F16))),
                })
            }
        }
    }

    /// Uploads in f16 packed two to a word, whatever the device supports (WebGPU devices only:
    /// the packing kernels run on burn's cubecl backend).
    pub fn packed_f16(t: &HostTensor, name: &str, device: &Device) -> Result<Self> {
        let [rows, cols] = [t.shape[0], t.shape[1]];
        if cols % 2 != 0 {
            return Err(Error::invalid(format!("{name} has an odd number of columns ({cols}); load the model with dtype \"f32\"")));
        }
        let bits: Vec<u16> = to_f16(t, name)?.iter().map(|h| h.to_bits()).collect();
        let words = TensorData::new(packed_f16::words_of(&bits), [rows, cols / 2]);
        Ok(Weight { stored: Stored::PackedF16(Tensor::from_data(words, (device, DType::I32))) })
    }

    /// Uploads a quantized matrix as it is; the weight is its transpose when `transposed`.
    pub fn quantized(q: QuantMatrix, transposed: bool, device: &Device) -> Self {
        let shape = [q.rows, q.layout.words];
        let words: Vec<i32> = q.words.into_iter().map(|w| w as i32).collect();
        let words = Tensor::from_data(TensorData::new(words, shape), (device, DType::I32));
        Weight { stored: Stored::Quant { words, kind: q.kind, cols: q.layout.cols, transposed } }
    }

    /// The matrix in f32 (for a quantized one, a transient dequantized copy).
    pub fn value(&self) -> Tensor<2> {
        match &self.stored {
            Stored::F32(w) => w.clone(),
            Stored::F16(w) => w.clone().cast(FloatDType::F32),
            Stored::PackedF16(words) => packed_f16::unpack(words.clone()),
            Stored::Quant { words, kind, cols, transposed } => {
                let w = dequantize(words.clone(), *kind, *cols);
                if *transposed { w.transpose() } else { w }
            }
        }
    }

    /// x · W for x [m, rows]: a quantized W is dequantized inside the product.
    pub fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.stored {
            Stored::Quant { words, kind, cols, transposed: true } => quant_matmul(x, words.clone(), *kind, *cols),
            _ => x.matmul(self.value()),
        }
    }

    /// x · Wᵀ for x [m, cols]: a quantized W is dequantized inside the product.
    pub fn apply_transposed(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.stored {
            Stored::Quant { words, kind, cols, transposed: false } => quant_matmul(x, words.clone(), *kind, *cols),
            _ => x.matmul(self.value().transpose()),
        }
    }

    /// Rows `ids` of the matrix in f32 (an embedding lookup): only those rows are converted.
    pub fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        match &self.stored {
            Stored::F32(w) => w.clone().select(0, ids),
            Stored::F16(w) => w.clone().select(0, ids).cast(FloatDType::F32),
            Stored::PackedF16(words) => packed_f16::unpack(words.clone().select(0, ids)),
            Stored::Quant { words, kind, cols, transposed: false } => dequantize(words.clone().select(0, ids), *kind, *cols),
            Stored::Quant { .. } => self.value().select(0, ids),
        }
    }

    /// W <- W + sign * delta, rounded to the storage precision. An f32 matrix is taken out first,
    /// so the backend can add into its buffer instead of allocating a second one. A quantized
    /// matrix becomes f32 (dequantized + delta, exact).
    pub fn add(&mut self, delta: Tensor<2>, sign: f64) {
        let placeholder = Stored::F32(Tensor::empty([1, 1], &delta.device()));
        let delta = if sign > 0.0 { delta } else { delta.neg() };
        self.stored = match std::mem::replace(&mut self.stored, placeholder) {
            Stored::F32(w) => Stored::F32(w + delta),
            Stored::F16(w) => Stored::F16((w.cast(FloatDType::F32) + delta).cast(FloatDType::F16)),
            Stored::PackedF16(words) => Stored::PackedF16(packed_f16::pack(packed_f16::unpack(words) + delta)),
            quant @ Stored::Quant { .. } => Stored::F32(Weight { stored: quant }.value() + delta),
        };
    }

    /// This weight plus `delta` as a new weight in the same storage: a quantized one is
    /// dequantized, added to in f32 on the device, read back and quantized again on the host
    /// (llama.cpp's rounding, to [`QuantType::requantized_as`]); `name` goes into the error when a
    /// value cannot be quantized (NaN or infinity).
    pub async fn plus(&self, delta: Tensor<2>, name: &str) -> Result<Weight> {
        let Stored::Quant { kind, transposed, .. } = self.stored else {
            let mut sum = self.clone();
            sum.add(delta, 1.0);
            return Ok(sum);
        };
        let sum = read_host(self.value() + delta).await?;
        let rows = if transposed { sum.transpose() } else { sum };
        Ok(Self::quantized(QuantMatrix::quantize(kind.requantized_as(), &rows, name)?, transposed, &self.device()))
    }

    /// The matrix read back in the Hugging Face orientation (`transposed`: this weight is the
    /// transpose of the Hugging Face matrix, as a linear layer's is): quantized blocks as they
    /// are, other storage as f32.
    pub async fn read(&self, transposed: bool) -> Result<StoredTensor> {
        let Stored::Quant { words, kind, cols, .. } = &self.stored else {
            let t = read_host(self.value()).await?;
            return Ok(StoredTensor::Dense(if transposed { t.transpose() } else { t }));
        };
        let rows = words.dims()[0];
        let words = read_i32(words.clone()).await?.into_iter().map(|w| w as u32).collect();
        Ok(StoredTensor::Quant(QuantMatrix { kind: *kind, rows, layout: RowLayout::new(*kind, *cols)?, words }))
    }

    /// [rows, cols].
    pub fn dims(&self) -> [usize; 2] {
        match &self.stored {
            Stored::F32(w) | Stored::F16(w) => w.dims(),
            Stored::PackedF16(words) => {
                let [rows, half_cols] = words.dims();
                [rows, 2 * half_cols]
            }
            Stored::Quant { words, cols, transposed, .. } => {
                let rows = words.dims()[0];
                if *transposed { [*cols, rows] } else { [rows, *cols] }
            }
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.stored, Stored::Quant { .. })
    }

    pub fn dtype(&self) -> WeightDtype {
        match self.stored {
            Stored::F32(_) => WeightDtype::F32,
            Stored::F16(_) | Stored::PackedF16(_) => WeightDtype::F16,
            Stored::Quant { kind, .. } => WeightDtype::Quant(kind),
        }
    }

    /// Bytes the matrix occupies on the device.
    pub fn bytes(&self) -> usize {
        let [rows, cols] = self.dims();
        match &self.stored {
            Stored::F32(_) => 4 * rows * cols,
            Stored::F16(_) | Stored::PackedF16(_) => 2 * rows * cols,
            Stored::Quant { words, .. } => 4 * words.dims().iter().product::<usize>(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.stored {
            Stored::F32(w) | Stored::F16(w) => w.device(),
            Stored::PackedF16(words) | Stored::Quant { words, .. } => words.device(),
        }
    }
}

/// The largest buffer the device can bind, in bytes (0: no limit known). The web edge sets it from
/// the WebGPU adapter's limits; one device per process (a worker), so one value.
static MAX_BUFFER_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Sets the largest buffer a matrix may occupy: WebGPU's `min(maxStorageBufferBindingSize,
/// maxBufferSize)` of the device (which requests the adapter's own limits, not the defaults).
pub fn set_max_buffer_bytes(bytes: usize) {
    MAX_BUFFER_BYTES.store(bytes, Ordering::Relaxed);
}

/// Refuses a matrix of `bytes` that no buffer of the device can hold, before anything is
/// allocated (the allocation would abort the engine), saying which limit and what to do.
pub fn check_buffer_size(bytes: usize, name: &str) -> Result<()> {
    let limit = MAX_BUFFER_BYTES.load(Ordering::Relaxed);
    if limit == 0 || bytes <= limit {
        return Ok(());
    }
    let size = |b: usize| format!("{b} bytes ({:.1} MiB)", b as f64 / (1 << 20) as f64);
    Err(Error::invalid(format!(
        "{name} needs {} in one GPU buffer, but this GPU binds at most {} (WebGPU's maxStorageBufferBindingSize / maxBufferSize): \
         load the model with a smaller dtype (\"q8_0\" needs about a quarter of f32, \"q4_0\" an eighth), or from a quantized GGUF, \
         or use a browser/GPU with higher limits",
        size(bytes),
        size(limit)
    )))
}

/// `t`'s values rounded to f16 (to nearest, ties to even); a finite value beyond f16's range
/// (|x| >= 65520 rounds to infinity) is refused rather than stored as infinity.
fn to_f16(t: &HostTensor, name: &str) -> Result<Vec<half::f16>> {
    let halves: Vec<half::f16> = t.data.iter().map(|&v| half::f16::from_f32(v)).collect();
    if let Some((i, v)) = t.data.iter().enumerate().find(|&(i, v)| v.is_finite() && halves[i].is_infinite()) {
        return Err(Error::invalid(format!(
            "{name}[{i}] = {v} is beyond f16's range (largest finite value 65504); load the model with dtype \"f32\""
        )));
    }
    Ok(halves)
}
