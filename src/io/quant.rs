//! ggml's quantized block types (Q8_0, Q4_0, Q4_1, Q5_0 and the k-quants Q4_K, Q5_K, Q6_K), read
//! from their GGUF blocks, written by llama.cpp's reference rounding (the non-k types, as gguf-py
//! quantizes them), and repacked into the one row layout the device keeps.
//!
//! Every type dequantizes per group of 32 values (16 for Q6_K) from an unsigned code `q` of 4 to 8
//! bits, as `x = scale · (q - zero)` or, for the types with a minimum of their own,
//! `x = scale · q + offset`:
//!
//! ```text
//! Q8_0  q = byte + 128,  zero 128                 Q4_1  offset = m (the block minimum)
//! Q4_0  q = nibble,      zero 8                   Q4_K, Q5_K  scale = d · sc, offset = -(dmin · m)
//! Q5_0  q = 5 bits,      zero 16                  Q6_K  scale = d · sc (per 16 values), zero 32
//! ```
//!
//! These are gguf-py's formulas operation for operation, and each product is exact in f32 (at
//! most 24 significant bits), so the values are gguf-py's `dequantize` bit for bit (signed zeros
//! included), with or without a fused multiply-add.
//!
//! A repacked row is a run of 32-bit words: the low 4 (or 8) bits of every code in order, then
//! the high bits (Q5: 1, Q6_K: 2), then the scales, then the offsets where the type has its own
//! (Q4_1 and the k-quants; the others derive it from the scale). Scales and offsets that ggml
//! stores in f16 stay f16, two to a word; the k-quants' products `d · sc` are f32. A row's words
//! are all its values need, so selecting rows (an embedding lookup) selects whole rows.

use crate::error::{Error, Result};
use crate::tensor::HostTensor;

/// A quantized block type (ggml's names).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// Values per k-quant super-block.
const QK_K: usize = 256;

impl QuantType {
    pub const ALL: [QuantType; 7] =
        [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q5_0, QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K];
    /// The types a matrix can be quantized to here (gguf-py quantizes the same ones).
    pub const QUANTIZABLE: [QuantType; 4] = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q5_0];

    /// ggml's name: "Q8_0", "Q4_K", ...
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
        }
    }

    /// The type named `name` in any case ("q8_0", "Q4_K").
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The type a matrix of this type is requantized to after a change (a merge): itself, or
    /// for a k-quant, which is not quantized here, the type of the same kind (scales with or
    /// without offsets) and at least its precision.
    pub fn requantized_as(self) -> Self {
        match self {
            QuantType::Q4_K => QuantType::Q4_1,
            QuantType::Q5_K => QuantType::Q5_0,
            QuantType::Q6_K => QuantType::Q8_0,
            other => other,
        }
    }

    /// llama.cpp's `LlamaFileType` of a file mostly in this type (`general.file_type`; the
    /// k-quants as their "_M" mixes).
    pub fn llama_file_type(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q8_0 => 7,
            QuantType::Q5_0 => 8,
            QuantType::Q4_K => 15,
            QuantType::Q5_K => 17,
            QuantType::Q6_K => 18,
        }
    }

    /// The GGML type id in GGUF tensor infos.
    pub fn ggml_id(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q8_0 => 8,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
        }
    }

    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// (values, bytes) of one GGUF block.
    pub fn ggml_block(self) -> (usize, usize) {
        match self {
            QuantType::Q8_0 => (32, 34),
            QuantType::Q4_0 => (32, 18),
            QuantType::Q4_1 => (32, 20),
            QuantType::Q5_0 => (32, 22),
            QuantType::Q4_K => (QK_K, 144),
            QuantType::Q5_K => (QK_K, 176),
            QuantType::Q6_K => (QK_K, 210),
        }
    }

    /// (group, low bits, high bits, f16 scales, own offsets, zero point when derived)
    fn codes(self) -> (usize, usize, usize, bool, bool, u32) {
        match self {
            QuantType::Q8_0 => (32, 8, 0, true, false, 128),
            QuantType::Q4_0 => (32, 4, 0, true, false, 8),
            QuantType::Q4_1 => (32, 4, 0, true, true, 0),
            QuantType::Q5_0 => (32, 4, 1, true, false, 16),
            QuantType::Q4_K => (32, 4, 0, false, true, 0),
            QuantType::Q5_K => (32, 4, 1, false, true, 0),
            QuantType::Q6_K => (16, 4, 2, false, false, 32),
        }
    }
}

/// Where the parts of a repacked row of `cols` values lie, in words from the row's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowLayout {
    pub cols: usize,
    pub group: usize,
    pub low_bits: usize,
    pub high_bits: usize,
    /// Scales (and offsets) in f16, two to a word; otherwise f32 bits, one to a word.
    pub half_scales: bool,
    pub own_offsets: bool,
    /// x = scale · (q - zero) where the type has no offsets of its own.
    pub zero: u32,
    pub high_at: usize,
    pub scales_at: usize,
    pub offsets_at: usize,
    /// Words per row.
    pub words: usize,
}

impl RowLayout {
    /// The layout of rows of `cols` values of `kind`; `cols` must be a multiple of its GGUF block.
    pub fn new(kind: QuantType, cols: usize) -> Result<Self> {
        let (block, _) = kind.ggml_block();
        if cols == 0 || cols % block != 0 {
            return Err(Error::invalid(format!(
                "a row of {cols} values cannot be stored as {}: its blocks hold {block} values each; load the model with dtype \"f32\" or \"f16\"",
                kind.name()
            )));
        }
        let (group, low_bits, high_bits, half_scales, own_offsets, zero) = kind.codes();
        let groups = cols / group;
        let scale_words = if half_scales { groups.div_ceil(2) } else { groups };
        let high_at = cols * low_bits / 32;
        let scales_at = high_at + cols * high_bits / 32;
        let offsets_at = scales_at + scale_words;
        let words = offsets_at + if own_offsets { scale_words } else { 0 };
        Ok(RowLayout { cols, group, low_bits, high_bits, half_scales, own_offsets, zero, high_at, scales_at, offsets_at, words })
    }

    /// The scales of the row's groups `first..first + out.len()` into `out` (`first` even; f16
    /// ones converted a slice at a time, with the CPU's f16 instructions where it has them).
    #[inline(always)]
    pub fn scales_into(&self, row: &[u32], first: usize, out: &mut [f32]) {
        self.halves_or_floats(row, self.scales_at, first, out);
    }

    /// The offsets of the row's groups `first..` into `out`: its own where the type has them, else
    /// -zero · scale from those groups' scales in `scales`.
    #[inline(always)]
    pub fn offsets_into(&self, row: &[u32], first: usize, scales: &[f32], out: &mut [f32]) {
        if self.own_offsets {
            self.halves_or_floats(row, self.offsets_at, first, out);
        } else {
            let zero = self.zero as f32;
            out.iter_mut().zip(scales).for_each(|(o, &s)| *o = -zero * s);
        }
    }

    #[inline(always)]
    fn halves_or_floats(&self, row: &[u32], at: usize, first: usize, out: &mut [f32]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        let n = out.len();
        if self.half_scales {
            let words = &row[at + first / 2..at + (first + n).div_ceil(2)];
            let halves: &[u16] = bytemuck::cast_slice(words);
            halves[..n].reinterpret_cast::<half::f16>().convert_to_f32_slice(out);
        } else {
            out.iter_mut().zip(&row[at + first..]).for_each(|(o, &w)| *o = f32::from_bits(w));
        }
    }

    /// The values of one repacked row into `out` (`cols` long): the codes a word at a time, then
    /// each group's scale and offset (inlined into callers, so that their vectorised builds
    /// vectorise it too).
    #[inline(always)]
    pub fn dequantize_row(&self, row: &[u32], out: &mut [f32]) {
        let (low, high) = (&row[..self.high_at], &row[self.high_at..self.scales_at]);
        match self.low_bits {
            4 => unpack::<8, 4>(low, out, 0),
            _ => unpack::<4, 8>(low, out, 0),
        }
        match self.high_bits {
            1 => unpack::<32, 1>(high, out, 4),
            2 => unpack::<16, 2>(high, out, 4),
            _ => {}
        }
        // scales and offsets 64 groups at a time
        let (mut scales, mut offsets) = ([0.0f32; 64], [0.0f32; 64]);
        for (n, values) in out.chunks_mut(64 * self.group).enumerate() {
            let groups = values.len() / self.group;
            self.scales_into(row, 64 * n, &mut scales[..groups]);
            if self.own_offsets {
                self.offsets_into(row, 64 * n, &scales[..groups], &mut offsets[..groups]);
                for ((chunk, &scale), &offset) in values.chunks_exact_mut(self.group).zip(&scales).zip(&offsets) {
                    chunk.iter_mut().for_each(|x| *x = scale * *x + offset);
                }
            } else {
                // scale · (q - zero), not scale · q - zero · scale: gguf-py's signed zeros
                let zero = self.zero as f32;
                for (chunk, &scale) in values.chunks_exact_mut(self.group).zip(&scales) {
                    chunk.iter_mut().for_each(|x| *x = scale * (*x - zero));
                }
            }
        }
    }
}

impl RowLayout {
    /// The code of value `j` of a repacked row (high bits included).
    fn code(&self, row: &[u32], j: usize) -> u32 {
        let per_low = 32 / self.low_bits;
        let low = row[j / per_low] >> (j % per_low * self.low_bits) & ((1 << self.low_bits) - 1);
        if self.high_bits == 0 {
            return low;
        }
        let per_high = 32 / self.high_bits;
        low | (row[self.high_at + j / per_high] >> (j % per_high * self.high_bits) & ((1 << self.high_bits) - 1)) << 4
    }

    /// The f16 bits of scale (or offset) `g` of a row whose scales start at word `at`.
    fn half_bits(&self, row: &[u32], at: usize, g: usize) -> u16 {
        (row[at + g / 2] >> (16 * (g % 2))) as u16
    }
}

/// Codes of `BITS` bits, `PER` to a word: written into `out` (`at` = 0) or added to it shifted
/// left by `at` bits (the high bits above the low nibbles); small integers, exact in f32.
#[inline(always)]
fn unpack<const PER: usize, const BITS: u32>(words: &[u32], out: &mut [f32], at: u32) {
    let mask = (1u32 << BITS) - 1;
    for (w, o) in words.iter().zip(out.chunks_exact_mut(PER)) {
        for (k, o) in o.iter_mut().enumerate() {
            let q = ((w >> (BITS * k as u32)) & mask) << at;
            if at == 0 { *o = q as f32 } else { *o += q as f32 }
        }
    }
}

/// A quantized matrix [rows, cols] on the host, in the repacked layout: `rows · layout.words` words.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    pub kind: QuantType,
    pub rows: usize,
    pub layout: RowLayout,
    pub words: Vec<u32>,
}

/// Collects a row's parts and writes them into its words.
struct RowWriter<'a> {
    layout: RowLayout,
    words: &'a mut [u32],
}

impl RowWriter<'_> {
    fn code(&mut self, j: usize, q: u32) {
        let l = &self.layout;
        let per_low = 32 / l.low_bits;
        self.words[j / per_low] |= (q & ((1 << l.low_bits) - 1)) << (j % per_low * l.low_bits);
        if l.high_bits > 0 {
            let per_high = 32 / l.high_bits;
            self.words[l.high_at + j / per_high] |= (q >> 4) << (j % per_high * l.high_bits);
        }
    }

    fn scale_bits(&mut self, at: usize, g: usize, value: ScaleValue) {
        match value {
            ScaleValue::Half(bits) => self.words[at + g / 2] |= u32::from(bits) << (16 * (g % 2)),
            ScaleValue::F32(v) => self.words[at + g] = v.to_bits(),
        }
    }

    fn scale(&mut self, g: usize, value: ScaleValue) {
        self.scale_bits(self.layout.scales_at, g, value);
    }

    fn offset(&mut self, g: usize, value: ScaleValue) {
        self.scale_bits(self.layout.offsets_at, g, value);
    }
}

#[derive(Clone, Copy)]
enum ScaleValue {
    Half(u16),
    F32(f32),
}

fn f16_bits(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn f16_value(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(f16_bits(b, i)).to_f32()
}

/// The 6-bit scales and minimums of the 8 sub-blocks of a Q4_K / Q5_K block (its 12 bytes).
fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for i in 0..4 {
        sc[i] = s[i] & 0x3f;
        m[i] = s[4 + i] & 0x3f;
        sc[4 + i] = (s[8 + i] & 0x0f) | ((s[i] >> 2) & 0x30);
        m[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30);
    }
    (sc, m)
}

impl QuantMatrix {
    /// An all-zero matrix of the layout (codes, scales and offsets zero).
    fn zeroed(kind: QuantType, rows: usize, cols: usize) -> Result<Self> {
        let layout = RowLayout::new(kind, cols)?;
        Ok(QuantMatrix { kind, rows, layout, words: vec![0; rows * layout.words] })
    }

    pub fn cols(&self) -> usize {
        self.layout.cols
    }

    /// Repacks the GGUF blocks `bytes` of a [rows, cols] matrix (`rows · cols / block` blocks,
    /// which the caller has checked).
    pub fn from_ggml(kind: QuantType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let mut m = Self::zeroed(kind, rows, cols)?;
        let (block, block_bytes) = kind.ggml_block();
        let row_bytes = cols / block * block_bytes;
        debug_assert_eq!(bytes.len(), rows * row_bytes);
        let layout = m.layout;
        for (words, row) in m.words.chunks_exact_mut(layout.words).zip(bytes.chunks_exact(row_bytes)) {
            let mut w = RowWriter { layout, words };
            for (n, b) in row.chunks_exact(block_bytes).enumerate() {
                let first = n * block; // first value of the block in the row
                let groups = first / layout.group;
                match kind {
                    QuantType::Q8_0 => {
                        w.scale(groups, ScaleValue::Half(f16_bits(b, 0)));
                        b[2..].iter().enumerate().for_each(|(j, &q)| w.code(first + j, u32::from(q ^ 0x80)));
                    }
                    QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 => {
                        w.scale(groups, ScaleValue::Half(f16_bits(b, 0)));
                        let (qs, high) = match kind {
                            QuantType::Q4_0 => (&b[2..], 0),
                            QuantType::Q4_1 => {
                                w.offset(groups, ScaleValue::Half(f16_bits(b, 2)));
                                (&b[4..], 0)
                            }
                            _ => (&b[6..], u32::from_le_bytes([b[2], b[3], b[4], b[5]])),
                        };
                        for j in 0..32 {
                            let nibble = if j < 16 { qs[j] & 0x0f } else { qs[j - 16] >> 4 };
                            w.code(first + j, u32::from(nibble) | (high >> j & 1) << 4);
                        }
                    }
                    QuantType::Q4_K | QuantType::Q5_K => {
                        let (d, dmin) = (f16_value(b, 0), f16_value(b, 2));
                        let (sc, mins) = k_scale_min(&b[4..16]);
                        let (qh, qs) = if kind == QuantType::Q5_K { (Some(&b[16..48]), &b[48..]) } else { (None, &b[16..]) };
                        for s in 0..8 {
                            w.scale(groups + s, ScaleValue::F32(d * f32::from(sc[s])));
                            w.offset(groups + s, ScaleValue::F32(-(dmin * f32::from(mins[s]))));
                            for i in 0..32 {
                                let low = qs[s / 2 * 32 + i] >> (4 * (s % 2)) & 0x0f;
                                let high = qh.map_or(0, |qh| qh[i] >> s & 1);
                                w.code(first + s * 32 + i, u32::from(low | high << 4));
                            }
                        }
                    }
                    QuantType::Q6_K => {
                        let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
                        let d = f16_value(b, 208);
                        for (s, &sc) in scales.iter().enumerate() {
                            w.scale(groups + s, ScaleValue::F32(d * f32::from(sc as i8)));
                        }
                        for e in 0..QK_K {
                            let (h, r) = (e / 128, e % 128);
                            let low = ql[h * 64 + r % 64] >> (4 * (r / 64)) & 0x0f;
                            let high = qh[h * 32 + r % 32] >> (2 * (r / 32)) & 0x03;
                            w.code(first + e, u32::from(low | high << 4));
                        }
                    }
                }
            }
        }
        Ok(m)
    }

    /// The GGUF blocks of this matrix, the inverse of [`from_ggml`](Self::from_ggml), for the
    /// types written here ([`QuantType::QUANTIZABLE`]); None for a k-quant, whose sub-block scales
    /// the repacked layout keeps only multiplied out.
    pub fn to_ggml(&self) -> Option<Vec<u8>> {
        if !QuantType::QUANTIZABLE.contains(&self.kind) {
            return None;
        }
        let l = &self.layout;
        let (block, block_bytes) = self.kind.ggml_block();
        let mut out = Vec::with_capacity(self.rows * l.cols / block * block_bytes);
        for row in self.words.chunks_exact(l.words) {
            for first in (0..l.cols).step_by(block) {
                let code = |j: usize| l.code(row, first + j);
                out.extend(l.half_bits(row, l.scales_at, first / block).to_le_bytes());
                if self.kind == QuantType::Q8_0 {
                    out.extend((0..32).map(|j| code(j) as u8 ^ 0x80));
                    continue;
                }
                if self.kind == QuantType::Q4_1 {
                    out.extend(l.half_bits(row, l.offsets_at, first / block).to_le_bytes());
                }
                if self.kind == QuantType::Q5_0 {
                    out.extend((0..32).fold(0u32, |high, j| high | (code(j) >> 4) << j).to_le_bytes());
                }
                out.extend((0..16).map(|j| (code(j) & 0x0f | (code(j + 16) & 0x0f) << 4) as u8));
            }
        }
        Some(out)
    }

    /// Quantizes `t` [rows, cols] by llama.cpp's reference rounding, as gguf-py's `quantize`
    /// computes it (f32 arithmetic, scales rounded to f16 only when stored). `name` goes into the
    /// error when a value is not finite or `kind` is a k-quant (neither is quantized here).
    pub fn quantize(kind: QuantType, t: &HostTensor, name: &str) -> Result<Self> {
        let [rows, cols] = <[usize; 2]>::try_from(t.shape.as_slice())
            .map_err(|_| Error::invalid(format!("{name}: only matrices are quantized, not shape {:?}", t.shape)))?;
        if !QuantType::QUANTIZABLE.contains(&kind) {
            return Err(Error::invalid(format!(
                "{name}: cannot quantize to {}; choose one of {}",
                kind.name(),
                names(&QuantType::QUANTIZABLE)
            )));
        }
        if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("{name}[{}, {}] = {}: only finite values can be quantized", i / cols, i % cols, t.data[i])));
        }
        let mut m = Self::zeroed(kind, rows, cols).map_err(|e| Error::invalid(format!("{name}: {e}")))?;
        let layout = m.layout;
        for (words, row) in m.words.chunks_exact_mut(layout.words).zip(t.data.chunks_exact(cols)) {
            let mut w = RowWriter { layout, words };
            for (g, x) in row.chunks_exact(32).enumerate() {
                let half = |v: f32| ScaleValue::Half(half::f16::from_f32(v).to_bits());
                let inverse = |d: f32| if d == 0.0 { 0.0 } else { 1.0 / d };
                match kind {
                    QuantType::Q8_0 => {
                        let d = x.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
                        let id = inverse(d);
                        w.scale(g, half(d));
                        // round half away from zero, as ggml's roundf
                        x.iter().enumerate().for_each(|(j, &v)| w.code(g * 32 + j, ((v * id).round() as i8 as u8 ^ 0x80).into()));
                    }
                    QuantType::Q4_0 | QuantType::Q5_0 => {
                        // the value of largest magnitude (the first such), with its sign
                        let max = x[1..].iter().fold(x[0], |a, &v| if v.abs() > a.abs() { v } else { a });
                        let (levels, top) = if kind == QuantType::Q4_0 { (8.0, 15.0) } else { (16.0, 31.0) };
                        let d = max / -levels;
                        let id = inverse(d);
                        w.scale(g, half(d));
                        x.iter().enumerate().for_each(|(j, &v)| w.code(g * 32 + j, (v * id + (levels + 0.5)).trunc().min(top) as u32));
                    }
                    QuantType::Q4_1 => {
                        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                        let d = (max - min) / 15.0;
                        let id = inverse(d);
                        w.scale(g, half(d));
                        w.offset(g, half(min));
                        x.iter().enumerate().for_each(|(j, &v)| w.code(g * 32 + j, ((v - min) * id + 0.5).trunc().min(15.0) as u32));
                    }
                    _ => unreachable!("checked above"),
                }
            }
        }
        Ok(m)
    }

    /// The f32 values [rows, cols].
    pub fn dequantize(&self) -> HostTensor {
        let cols = self.cols();
        let mut out = vec![0.0; self.rows * cols];
        for (row, values) in self.words.chunks_exact(self.layout.words).zip(out.chunks_exact_mut(cols)) {
            self.layout.dequantize_row(row, values);
        }
        HostTensor::new(vec![self.rows, cols], out)
    }

    /// The matrix of rows `order` (each an index into this one), e.g. to undo a row permutation.
    pub fn select_rows(&self, order: &[usize]) -> Self {
        let n = self.layout.words;
        let words = order.iter().flat_map(|&r| self.words[r * n..(r + 1) * n].iter().copied()).collect();
        QuantMatrix { kind: self.kind, rows: order.len(), layout: self.layout, words }
    }

    /// Bytes the repacked matrix occupies.
    pub fn bytes(&self) -> usize {
        4 * self.words.len()
    }
}

/// "Q8_0, Q4_0, ..." for messages.
pub fn names(kinds: &[QuantType]) -> String {
    kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> HostTensor {
        // a small deterministic generator (xorshift) of values in [-2, 2)
        let mut s = seed.max(1);
        let data = (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 4.0 - 2.0
            })
            .collect();
        HostTensor::new(vec![rows, cols], data)
    }

    /// Quantizing then dequantizing stays within half a step of each value (a full step for
    /// Q4_0/Q5_0, whose top code is clipped), for every quantizable type.
    #[test]
    fn round_trip_error_is_within_a_step() {
        let t = matrix(3, 64, 7);
        for kind in QuantType::QUANTIZABLE {
            let q = QuantMatrix::quantize(kind, &t, "w").unwrap();
            let back = q.dequantize();
            for (g, (x, y)) in t.data.chunks(32).zip(back.data.chunks(32)).enumerate() {
                let range = x.iter().fold(0.0f32, |a, v| a.max(v.abs())) * 2.0;
                let levels = match kind {
                    QuantType::Q8_0 => 254.0,
                    QuantType::Q5_0 => 32.0,
                    _ => 15.0,
                };
                let worst = x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(worst <= range / levels * 1.01, "{kind:?} group {g}: error {worst} for step {}", range / levels);
            }
        }
    }

    #[test]
    fn q8_0_and_q4_0_follow_the_ggml_formulas() {
        // Q8_0: d = 2, bytes j - 16
        let mut block = half::f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend((0..32).map(|j: i32| (j - 16) as i8 as u8));
        let x = QuantMatrix::from_ggml(QuantType::Q8_0, 1, 32, &block).unwrap().dequantize().data;
        assert_eq!((x[0], x[31]), (-32.0, 30.0));
        // Q4_0: d = 0.5, nibbles low = j % 16, high = 15 - j % 16
        let mut block = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let x = QuantMatrix::from_ggml(QuantType::Q4_0, 1, 32, &block).unwrap().dequantize().data;
        for j in 0..16 {
            assert_eq!(x[j], 0.5 * (j as f32 - 8.0));
            assert_eq!(x[j + 16], 0.5 * ((15 - j) as f32 - 8.0));
        }
        // Q4_1: d = 0.25, m = -1
        let mut block = half::f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend(half::f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = QuantMatrix::from_ggml(QuantType::Q4_1, 1, 32, &block).unwrap().dequantize().data;
        assert_eq!((y[3], y[16 + 3]), (0.25 * 3.0 - 1.0, 0.25 * 12.0 - 1.0));
    }

    #[test]
    fn rows_that_do_not_fill_blocks_and_bad_values_are_refused() {
        let err = RowLayout::new(QuantType::Q4_K, 96).unwrap_err().to_string();
        assert!(err.contains("96 values") && err.contains("Q4_K") && err.contains("256"), "{err}");
        let mut t = matrix(1, 32, 3);
        t.data[5] = f32::NAN;
        let err = QuantMatrix::quantize(QuantType::Q8_0, &t, "w").unwrap_err().to_string();
        assert!(err.contains("w[0, 5] = NaN"), "{err}");
        let err = QuantMatrix::quantize(QuantType::Q6_K, &matrix(1, 256, 3), "w").unwrap_err().to_string();
        assert!(err.contains("cannot quantize to Q6_K") && err.contains("Q8_0, Q4_0, Q4_1, Q5_0"), "{err}");
    }
}
