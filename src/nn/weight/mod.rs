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
//!
//! A matrix larger than the device's largest buffer ([`set_max_buffer_bytes`]: WebGPU binds at
//! most 128 MiB by default) is kept in parts, each a run of the Hugging Face matrix's rows in a
//! buffer of its own. Products go part by part: where the parts split the output, the results
//! sit side by side (x·Wᵀ with W = [E₀; E₁] is [x·E₀ᵀ, x·E₁ᵀ]); where they split the contracted
//! dimension, x is split the same way and the results summed (x·W = x₀·E₀ + x₁·E₁).

pub mod packed_f16;

use std::ops::Range;
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

/// A base-model matrix (a constant, except for full fine-tuning's copy of the model, whose f32
/// parts are autodiff leaves): the Hugging Face [rows, cols] matrix, or its transpose when
/// `transposed` (a linear layer's [in, out] of an [out, in] weight).
#[derive(Clone)]
pub struct Weight {
    /// Runs of the Hugging Face rows, in order, one buffer each (one part unless the matrix is
    /// larger than a buffer).
    parts: Vec<Part>,
    transposed: bool,
}

/// One buffer of a [`Weight`]: dense storage holds the values as the weight is oriented,
/// quantized storage the Hugging Face rows (blocks run along them, as in the file).
#[derive(Clone)]
enum Part {
    F32(Tensor<2>),
    /// burn's f16 dtype.
    F16(Tensor<2>),
    /// f16 halves two to a word: [rows, cols / 2].
    PackedF16(Tensor<2, Int>),
    /// Quantized rows [rows, words per row] of a Hugging Face [rows, cols] matrix.
    Quant {
        words: Tensor<2, Int>,
        kind: QuantType,
        cols: usize,
    },
}

/// How a dense part is stored.
#[derive(Clone, Copy, PartialEq)]
enum Dense {
    F32,
    F16,
    PackedF16,
}

impl Weight {
    /// Uploads a Hugging Face [rows, cols] host matrix in `dtype` (taken, so f32 values move to the
    /// device without a copy); the weight is its transpose when `transposed`. A quantized `dtype`
    /// quantizes the matrix as it is, blocks along its rows (see [`QuantMatrix::quantize`]); `name`
    /// goes into the error when a value does not fit in f16 or cannot be quantized, or a row in no
    /// buffer of the device.
    pub fn upload(t: HostTensor, dtype: WeightDtype, transposed: bool, name: &str, device: &Device) -> Result<Self> {
        let dense = match dtype {
            WeightDtype::Quant(kind) => return Self::quantized(QuantMatrix::quantize(kind, &t, name)?, transposed, name, device),
            WeightDtype::F32 | WeightDtype::Auto => Dense::F32,
            WeightDtype::F16 if device.supports_dtype(FloatDType::F16) => Dense::F16,
            WeightDtype::F16 => Dense::PackedF16,
        };
        Self::dense(t, dense, transposed, name, device)
    }

    /// Uploads in f16 packed two to a word, whatever the device supports (WebGPU devices only:
    /// the packing kernels run on burn's cubecl backend).
    pub fn packed_f16(t: &HostTensor, name: &str, device: &Device) -> Result<Self> {
        Self::dense(t.clone(), Dense::PackedF16, false, name, device)
    }

    fn dense(t: HostTensor, dense: Dense, transposed: bool, name: &str, device: &Device) -> Result<Self> {
        let [rows, cols] = [t.shape[0], t.shape[1]];
        let runs = row_runs(rows, cols * if dense == Dense::F32 { 4 } else { 2 }, name)?;
        let parts = split_rows(t, &runs)
            .into_iter()
            .map(|t| {
                let t = if transposed { t.transpose() } else { t };
                let shape = [t.shape[0], t.shape[1]];
                Ok(match dense {
                    Dense::F32 => Part::F32(Tensor::from_data(TensorData::new(t.data, shape), device)),
                    Dense::F16 => Part::F16(Tensor::from_data(TensorData::new(to_f16(&t, name)?, shape), (device, DType::F16))),
                    Dense::PackedF16 => {
                        if shape[1] % 2 != 0 {
                            return Err(Error::invalid(format!(
                                "{name} has an odd number of columns ({}); load the model with dtype \"f32\"",
                                shape[1]
                            )));
                        }
                        let bits: Vec<u16> = to_f16(&t, name)?.iter().map(|h| h.to_bits()).collect();
                        let words = TensorData::new(packed_f16::words_of(&bits), [shape[0], shape[1] / 2]);
                        Part::PackedF16(Tensor::from_data(words, (device, DType::I32)))
                    }
                })
            })
            .collect::<Result<_>>()?;
        Ok(Weight { parts, transposed })
    }

    /// Uploads a quantized Hugging Face matrix as it is; the weight is its transpose when
    /// `transposed`. `name` goes into the error when a row fits in no buffer of the device.
    pub fn quantized(q: QuantMatrix, transposed: bool, name: &str, device: &Device) -> Result<Self> {
        let n = q.layout.words;
        let parts = row_runs(q.rows, 4 * n, name)?
            .into_iter()
            .map(|rows| {
                let words: Vec<i32> = q.words[rows.start * n..rows.end * n].iter().map(|&w| w as i32).collect();
                let words = Tensor::from_data(TensorData::new(words, [rows.len(), n]), (device, DType::I32));
                Part::Quant { words, kind: q.kind, cols: q.cols() }
            })
            .collect();
        Ok(Weight { parts, transposed })
    }

    /// The matrix in f32 (for a quantized one, a transient dequantized copy), in one tensor.
    pub fn value(&self) -> Tensor<2> {
        side_by_side(self.parts.iter().map(|p| p.value(self.transposed)).collect(), self.row_axis())
    }

    /// x · W for x [m, rows]: a quantized W is dequantized inside the product.
    pub fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        self.by_parts(x, self.transposed, |p, x| p.apply(x, self.transposed))
    }

    /// x · Wᵀ for x [m, cols]: a quantized W is dequantized inside the product.
    pub fn apply_transposed(&self, x: Tensor<2>) -> Tensor<2> {
        self.by_parts(x, !self.transposed, |p, x| p.apply_transposed(x, self.transposed))
    }

    /// The product `each` of x with every part, put together: side by side when the parts split
    /// the product's output (`outputs_split`), otherwise summed over x's columns split as the
    /// parts split the contracted dimension.
    fn by_parts(&self, x: Tensor<2>, outputs_split: bool, each: impl Fn(&Part, Tensor<2>) -> Tensor<2>) -> Tensor<2> {
        if let [part] = self.parts.as_slice() {
            return each(part, x);
        }
        if outputs_split {
            return side_by_side(self.parts.iter().map(|p| each(p, x.clone())).collect(), 1);
        }
        let runs = self.runs();
        self.parts
            .iter()
            .zip(runs)
            .map(|(p, rows)| each(p, x.clone().narrow(1, rows.start, rows.len())))
            .reduce(|a, b| a + b)
            .expect("a weight has a part")
    }

    /// Rows `ids` of the matrix in f32 (an embedding lookup): only those rows are converted.
    pub fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        if self.transposed {
            return self.value().select(0, ids);
        }
        if let [part] = self.parts.as_slice() {
            return part.rows(ids);
        }
        // every part looks up the ids it holds (the others clamped into it, their rows zeroed)
        let [n, cols] = [ids.dims()[0], self.dims()[1]];
        let runs = self.runs();
        let looked_up = self.parts.iter().zip(runs).map(|(p, rows)| {
            let local = ids.clone().sub_scalar(rows.start as i64);
            let outside = local.clone().lower_elem(0).bool_or(local.clone().greater_equal_elem(rows.len() as i64));
            p.rows(local.clamp(0, rows.len() as i64 - 1)).mask_fill(outside.unsqueeze_dim::<2>(1).expand([n, cols]), 0.0)
        });
        looked_up.reduce(|a, b| a + b).expect("a weight has a part")
    }

    /// W <- W + sign * delta, rounded to the storage precision. Each part is taken out first, so
    /// the backend can add into its buffer instead of allocating a second one. A quantized part
    /// becomes f32 (dequantized + delta, exact).
    pub fn add(&mut self, delta: Tensor<2>, sign: f64) {
        let delta = if sign > 0.0 { delta } else { delta.neg() };
        let (axis, transposed, runs) = (self.row_axis(), self.transposed, self.runs());
        let parts = std::mem::take(&mut self.parts).into_iter().zip(runs);
        self.parts = parts.map(|(p, rows)| p.plus(delta.clone().narrow(axis, rows.start, rows.len()), transposed)).collect();
    }

    /// This weight plus `delta` as a new weight in the same storage: a quantized one is
    /// dequantized, added to in f32 on the device, read back and quantized again on the host
    /// (llama.cpp's rounding, to [`QuantType::requantized_as`]); `name` goes into the error when a
    /// value cannot be quantized (NaN or infinity).
    pub async fn plus(&self, delta: Tensor<2>, name: &str) -> Result<Weight> {
        let Part::Quant { kind, .. } = self.parts[0] else {
            let mut sum = self.clone();
            sum.add(delta, 1.0);
            return Ok(sum);
        };
        // part by part, so no sum larger than a buffer exists
        let (axis, [rows, cols]) = (self.row_axis(), self.hf_dims());
        let mut sum = HostTensor::new(vec![0, cols], Vec::with_capacity(rows * cols));
        for (part, run) in self.parts.iter().zip(self.runs()) {
            let part_sum = read_host(part.value(self.transposed) + delta.clone().narrow(axis, run.start, run.len())).await?;
            sum.data.extend(if self.transposed { part_sum.transpose() } else { part_sum }.data);
            sum.shape[0] += run.len();
        }
        Self::quantized(QuantMatrix::quantize(kind.requantized_as(), &sum, name)?, self.transposed, name, &self.device())
    }

    /// The weight with its quantized parts dequantized to f32 (parts split again to fit a buffer):
    /// a transient for a run of products that would each dequantize it.
    pub fn dequantized(&self) -> Weight {
        let mut parts = Vec::new();
        for part in &self.parts {
            let Part::Quant { words, kind, cols } = part else {
                parts.push(part.clone());
                continue;
            };
            let rows = words.dims()[0];
            let whole = std::iter::once(0..rows).collect();
            for run in row_runs(rows, 4 * cols, "").unwrap_or(whole) {
                let w = dequantize(words.clone().narrow(0, run.start, run.len()), *kind, *cols);
                parts.push(Part::F32(if self.transposed { w.transpose() } else { w }));
            }
        }
        Weight { parts, transposed: self.transposed }
    }

    /// The Hugging Face matrix read back: quantized blocks as they are, other storage as f32.
    pub async fn read(&self) -> Result<StoredTensor> {
        let mut read = Vec::new();
        for part in &self.parts {
            read.push(part.read(self.transposed).await?);
        }
        let mut read = read.into_iter();
        let first = read.next().expect("a weight has a part");
        Ok(read.fold(first, |mut all, more| {
            match (&mut all, more) {
                (StoredTensor::Dense(all), StoredTensor::Dense(more)) => {
                    all.shape[0] += more.shape[0];
                    all.data.extend(more.data);
                }
                (StoredTensor::Quant(all), StoredTensor::Quant(more)) => {
                    all.rows += more.rows;
                    all.words.extend(more.words);
                }
                _ => unreachable!("the parts of a weight share one storage"),
            }
            all
        }))
    }

    /// [rows, cols].
    pub fn dims(&self) -> [usize; 2] {
        let [rows, cols] = self.hf_dims();
        if self.transposed { [cols, rows] } else { [rows, cols] }
    }

    /// [rows, cols] of the Hugging Face matrix.
    pub fn hf_dims(&self) -> [usize; 2] {
        [self.runs().last().expect("a weight has a part").end, self.parts[0].hf_dims(self.transposed)[1]]
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.parts[0], Part::Quant { .. })
    }

    pub fn dtype(&self) -> WeightDtype {
        match self.parts[0] {
            Part::F32(_) => WeightDtype::F32,
            Part::F16(_) | Part::PackedF16(_) => WeightDtype::F16,
            Part::Quant { kind, .. } => WeightDtype::Quant(kind),
        }
    }

    /// Bytes the matrix occupies on the device.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes(self.transposed)).sum()
    }

    /// How many buffers hold the matrix.
    pub fn buffers(&self) -> usize {
        self.parts.len()
    }

    pub fn device(&self) -> Device {
        match &self.parts[0] {
            Part::F32(w) | Part::F16(w) => w.device(),
            Part::PackedF16(words) | Part::Quant { words, .. } => words.device(),
        }
    }

    /// The f32 values of each part, oriented as the weight (what full fine-tuning trains); `None`
    /// for f16 or quantized storage.
    pub fn f32_parts(&self) -> Option<Vec<Tensor<2>>> {
        self.parts.iter().map(|p| if let Part::F32(w) = p { Some(w.clone()) } else { None }).collect()
    }

    /// Whether the matrix is stored transposed (a linear layer's [in, out]).
    pub fn is_transposed(&self) -> bool {
        self.transposed
    }

    /// The same matrix with new f32 values for its parts (as [`f32_parts`](Self::f32_parts) gave them).
    pub fn with_f32_parts(&self, values: Vec<Tensor<2>>) -> Weight {
        debug_assert_eq!(values.len(), self.parts.len(), "one value per part");
        Weight { parts: values.into_iter().map(Part::F32).collect(), transposed: self.transposed }
    }

    /// Takes the f32 parts out (full fine-tuning's update, which writes each in place where
    /// nothing else holds it): the weight holds nothing until [`put_f32_parts`](Self::put_f32_parts).
    pub fn take_f32_parts(&mut self) -> Vec<Tensor<2>> {
        let parts = std::mem::take(&mut self.parts);
        parts.into_iter().map(|p| if let Part::F32(w) = p { w } else { panic!("a trained weight is f32") }).collect()
    }

    /// Puts f32 parts (as [`take_f32_parts`](Self::take_f32_parts) took them) back in.
    pub fn put_f32_parts(&mut self, values: Vec<Tensor<2>>) {
        self.parts = values.into_iter().map(Part::F32).collect();
    }

    /// The axis of the weight along which the Hugging Face rows, and so the parts, run.
    fn row_axis(&self) -> usize {
        usize::from(self.transposed)
    }

    /// The Hugging Face rows of each part.
    fn runs(&self) -> Vec<Range<usize>> {
        let mut at = 0;
        let runs = self.parts.iter().map(|p| {
            let rows = p.hf_dims(self.transposed)[0];
            at += rows;
            at - rows..at
        });
        runs.collect()
    }
}

impl Part {
    /// The part in f32, oriented as the weight.
    fn value(&self, transposed: bool) -> Tensor<2> {
        match self {
            Part::F32(w) => w.clone(),
            Part::F16(w) => w.clone().cast(FloatDType::F32),
            Part::PackedF16(words) => packed_f16::unpack(words.clone()),
            Part::Quant { words, kind, cols } => {
                let w = dequantize(words.clone(), *kind, *cols);
                if transposed { w.transpose() } else { w }
            }
        }
    }

    /// x · P (P oriented as the weight).
    fn apply(&self, x: Tensor<2>, transposed: bool) -> Tensor<2> {
        match self {
            Part::Quant { words, kind, cols } if transposed => quant_matmul(x, words.clone(), *kind, *cols),
            _ => x.matmul(self.value(transposed)),
        }
    }

    /// x · Pᵀ (P oriented as the weight).
    fn apply_transposed(&self, x: Tensor<2>, transposed: bool) -> Tensor<2> {
        match self {
            Part::Quant { words, kind, cols } if !transposed => quant_matmul(x, words.clone(), *kind, *cols),
            _ => x.matmul(self.value(transposed).transpose()),
        }
    }

    /// Rows `ids` of an untransposed part, in f32.
    fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        match self {
            Part::F32(w) => w.clone().select(0, ids),
            Part::F16(w) => w.clone().select(0, ids).cast(FloatDType::F32),
            Part::PackedF16(words) => packed_f16::unpack(words.clone().select(0, ids)),
            Part::Quant { words, kind, cols } => dequantize(words.clone().select(0, ids), *kind, *cols),
        }
    }

    /// The part plus `delta` (oriented as the weight), rounded to the storage precision.
    fn plus(self, delta: Tensor<2>, transposed: bool) -> Part {
        match self {
            Part::F32(w) => Part::F32(w + delta),
            Part::F16(w) => Part::F16((w.cast(FloatDType::F32) + delta).cast(FloatDType::F16)),
            Part::PackedF16(words) => Part::PackedF16(packed_f16::pack(packed_f16::unpack(words) + delta)),
            quant @ Part::Quant { .. } => Part::F32(quant.value(transposed) + delta),
        }
    }

    /// The part's Hugging Face rows read back: quantized blocks as they are, other storage as f32.
    async fn read(&self, transposed: bool) -> Result<StoredTensor> {
        let Part::Quant { words, kind, cols } = self else {
            let t = read_host(self.value(transposed)).await?;
            return Ok(StoredTensor::Dense(if transposed { t.transpose() } else { t }));
        };
        let rows = words.dims()[0];
        let words = read_i32(words.clone()).await?.into_iter().map(|w| w as u32).collect();
        Ok(StoredTensor::Quant(QuantMatrix { kind: *kind, rows, layout: RowLayout::new(*kind, *cols)?, words }))
    }

    /// [Hugging Face rows, cols] of the part.
    fn hf_dims(&self, transposed: bool) -> [usize; 2] {
        let [rows, cols] = match self {
            Part::F32(w) | Part::F16(w) => w.dims(),
            Part::PackedF16(words) => {
                let [rows, half_cols] = words.dims();
                [rows, 2 * half_cols]
            }
            Part::Quant { words, cols, .. } => return [words.dims()[0], *cols],
        };
        if transposed { [cols, rows] } else { [rows, cols] }
    }

    fn bytes(&self, transposed: bool) -> usize {
        let [rows, cols] = self.hf_dims(transposed);
        match self {
            Part::F32(_) => 4 * rows * cols,
            Part::F16(_) | Part::PackedF16(_) => 2 * rows * cols,
            Part::Quant { words, .. } => 4 * words.dims().iter().product::<usize>(),
        }
    }
}

/// Tensors joined along `axis` (one is returned as it is, not copied).
fn side_by_side(mut tensors: Vec<Tensor<2>>, axis: usize) -> Tensor<2> {
    if tensors.len() == 1 { tensors.pop().expect("one tensor") } else { Tensor::cat(tensors, axis) }
}

/// The host matrix's rows in the runs `runs` (one run covering it: the matrix itself, not copied).
fn split_rows(t: HostTensor, runs: &[Range<usize>]) -> Vec<HostTensor> {
    if runs.len() == 1 {
        return vec![t];
    }
    let cols = t.shape[1];
    runs.iter().map(|r| HostTensor::new(vec![r.len(), cols], t.data[r.start * cols..r.end * cols].to_vec())).collect()
}

/// The largest buffer the device can bind, in bytes (0: no limit known). The web edge sets it from
/// the WebGPU adapter's limits; one device per process (a worker), so one value.
static MAX_BUFFER_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Sets the largest buffer a matrix part may occupy: WebGPU's `min(maxStorageBufferBindingSize,
/// maxBufferSize)` of the device (which requests the adapter's own limits, not the defaults).
pub fn set_max_buffer_bytes(bytes: usize) {
    MAX_BUFFER_BYTES.store(bytes, Ordering::Relaxed);
}

/// The largest buffer the device can bind, in bytes (0: no limit known).
pub fn max_buffer_bytes() -> usize {
    MAX_BUFFER_BYTES.load(Ordering::Relaxed)
}

/// The runs of rows, `row_bytes` each, that go into one buffer each: all of them when they fit,
/// otherwise as many as fit (an even number, so a transposed f16 part packs two to a word). A
/// row that fits in no buffer is refused before anything is allocated (the allocation would abort
/// the engine), saying which limit and what to do.
fn row_runs(rows: usize, row_bytes: usize, name: &str) -> Result<Vec<Range<usize>>> {
    let limit = max_buffer_bytes();
    if limit == 0 || rows * row_bytes <= limit {
        return Ok(std::iter::once(0..rows).collect());
    }
    let per_buffer = match limit / row_bytes {
        0 => {
            let size = |b: usize| format!("{b} bytes ({:.1} MiB)", b as f64 / (1 << 20) as f64);
            return Err(Error::invalid(format!(
                "a row of {name} needs {} in one GPU buffer, but this GPU binds at most {} (WebGPU's maxStorageBufferBindingSize / maxBufferSize): \
                 load the model with a smaller dtype (\"q8_0\" needs about a quarter of f32, \"q4_0\" an eighth), or from a quantized GGUF, \
                 or use a browser/GPU with higher limits",
                size(row_bytes),
                size(limit)
            )));
        }
        1 => 1,
        n => n & !1,
    };
    Ok((0..rows).step_by(per_buffer).map(|start| start..rows.min(start + per_buffer)).collect())
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
