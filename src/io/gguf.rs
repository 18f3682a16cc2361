//! A GGUF (v2/v3) reader: header, metadata, tensor infos, and the tensors: F32, F16 and BF16 as
//! f32 values, the quantized types of [`crate::io::quant`] as they are stored or dequantized to
//! f32 (bit for bit as gguf-py computes it).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::io::quant::{QuantMatrix, QuantType, names};
use crate::tensor::HostTensor;

pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;

/// Metadata entries as a file stores them: (key, value type id and value bytes), in file order:
/// what a GGUF written from this one copies ([`crate::io::gguf_write`]).
pub type RawMetadata = Vec<(String, Vec<u8>)>;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::UInt(v) => Some(v),
            MetaValue::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::Float(v) => Some(v),
            MetaValue::UInt(v) => Some(v as f64),
            MetaValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// GGML tensor types this reader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Quant(QuantType),
}

impl GgmlType {
    pub(crate) fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            30 => GgmlType::BF16,
            _ => GgmlType::Quant(QuantType::from_ggml_id(id)?),
        })
    }

    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Quant(kind) => kind.ggml_block(),
        }
    }
}

/// A tensor as the file stores it: float values, or quantized blocks (repacked).
#[derive(Debug, Clone, PartialEq)]
pub enum StoredTensor {
    Dense(HostTensor),
    Quant(QuantMatrix),
}

impl StoredTensor {
    /// The values in f32 (a quantized matrix dequantized, [rows, cols]).
    pub fn into_f32(self) -> HostTensor {
        match self {
            StoredTensor::Dense(t) => t,
            StoredTensor::Quant(q) => q.dequantize(),
        }
    }
}

/// Names of the GGML type ids, for error messages.
fn ggml_type_name(id: u32) -> String {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
        "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES.get(id as usize).map_or_else(|| format!("unknown type {id}"), |n| format!("{n} (type {id})"))
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: dims[0] is the innermost (row length).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The row-major shape (GGML dims reversed), as PyTorch sees it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file over its bytes.
pub struct GgufFile<'a> {
    pub file: String,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub raw_metadata: RawMetadata,
    pub tensors: Vec<TensorInfo>,
    /// Where the tensor data starts in the file.
    pub data_start: usize,
    data: &'a [u8],
}

/// A bounds-checked little-endian cursor; every failure says where the file ended.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            Error::file(self.file, format!("truncated: {what} at byte {} needs {n} bytes but the file has {}", self.pos, self.bytes.len()))
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len())
            .ok_or_else(|| Error::file(self.file, format!("{what} at byte {} claims length {n}, more than the file holds", self.pos - 8)))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::file(self.file, format!("{what} is not UTF-8")))
    }

    fn value(&mut self, kind: u32, key: &str) -> Result<MetaValue> {
        let mut n = |size: usize| -> Result<u64> {
            let b = self.take(size, key)?;
            let mut buf = [0u8; 8];
            buf[..size].copy_from_slice(b);
            Ok(u64::from_le_bytes(buf))
        };
        Ok(match kind {
            0 => MetaValue::UInt(n(1)?),
            1 => MetaValue::Int(n(1)? as u8 as i8 as i64),
            2 => MetaValue::UInt(n(2)?),
            3 => MetaValue::Int(n(2)? as u16 as i16 as i64),
            4 => MetaValue::UInt(n(4)?),
            5 => MetaValue::Int(n(4)? as u32 as i32 as i64),
            6 => MetaValue::Float(f32::from_bits(n(4)? as u32) as f64),
            7 => MetaValue::Bool(n(1)? != 0),
            8 => MetaValue::String(self.string(key)?),
            9 => {
                let item_kind = self.u32(key)?;
                let count = self.len(key)?;
                let mut items = Vec::with_capacity(count.min(1 << 20));
                for _ in 0..count {
                    items.push(self.value(item_kind, key)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::UInt(n(8)?),
            11 => MetaValue::Int(n(8)? as i64),
            12 => MetaValue::Float(f64::from_bits(n(8)?)),
            other => return Err(Error::file(self.file, format!("metadata {key:?} has unknown value type {other}"))),
        })
    }
}

impl<'a> GgufFile<'a> {
    /// Parses the header of `bytes`; `file` names it in errors.
    pub fn parse(bytes: &'a [u8], file: &str) -> Result<Self> {
        let mut c = Cursor { bytes, pos: 0, file };
        if c.take(4, "magic")? != MAGIC {
            return Err(Error::file(file, "not a GGUF file (it does not start with \"GGUF\")"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::file(file, format!("GGUF version {version} is not supported; only 2 and 3")));
        }
        let tensor_count = c.len("tensor count")?;
        let kv_count = c.len("metadata count")?;
        let (mut metadata, mut raw_metadata) = (BTreeMap::new(), Vec::new());
        for _ in 0..kv_count {
            let key = c.string("metadata key")?;
            let start = c.pos;
            let kind = c.u32(&key)?;
            let value = c.value(kind, &key)?;
            raw_metadata.push((key.clone(), bytes[start..c.pos].to_vec()));
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims > 4 {
                return Err(Error::file(file, format!("tensor {name} claims {n_dims} dimensions (at most 4)")));
            }
            let dims = (0..n_dims).map(|_| c.u64(&name)).collect::<Result<Vec<_>>>()?;
            let ggml_type = c.u32(&name)?;
            let offset = c.u64(&name)?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = metadata.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 {
            return Err(Error::file(file, "general.alignment is 0"));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_start = usize::try_from(data_start).unwrap_or(usize::MAX).min(bytes.len());
        Ok(GgufFile { file: file.to_string(), version, metadata, raw_metadata, tensors, data_start, data: &bytes[data_start..] })
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required metadata value, or an error naming the key.
    pub fn require(&self, key: &str) -> Result<&MetaValue> {
        self.meta(key).ok_or_else(|| Error::file(&self.file, format!("metadata {key:?} is missing")))
    }

    /// Checks that a tensor's type can be read and that its bytes lie within the file.
    pub fn check_tensor(&self, info: &TensorInfo) -> Result<()> {
        tensor_bytes(&self.file, self.data, info).map(|_| ())
    }

    /// One tensor as stored: quantized matrices repacked (not dequantized), float types as f32.
    pub fn tensor(&self, info: &TensorInfo) -> Result<StoredTensor> {
        read_tensor(&self.file, self.data, info)
    }

    /// Dequantizes one tensor to f32 in its row-major shape.
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<HostTensor> {
        Ok(HostTensor::new(info.shape(), self.tensor(info)?.into_f32().data))
    }
}

/// One tensor's type and bytes in the data section `data` of `file`, checked against its shape
/// and the data's length.
fn tensor_bytes<'a>(file: &str, data: &'a [u8], info: &TensorInfo) -> Result<(GgmlType, &'a [u8])> {
    let kind = GgmlType::from_id(info.ggml_type).ok_or_else(|| {
        Error::file(
            file,
            format!(
                "tensor {} has GGML type {}, which cannot be read; supported: F32, F16, BF16, {}",
                info.name,
                ggml_type_name(info.ggml_type),
                names(&QuantType::ALL)
            ),
        )
    })?;
    let (per_block, block_bytes) = kind.block();
    if info.dims.first().is_some_and(|&row| row as usize % per_block != 0) {
        return Err(Error::file(
            file,
            format!("tensor {}: row length {} is not a multiple of the block size {per_block}", info.name, info.dims[0]),
        ));
    }
    let count = info.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?));
    let size = count.map(|n| n / per_block).and_then(|blocks| blocks.checked_mul(block_bytes));
    let bytes = size
        .zip(usize::try_from(info.offset).ok())
        .and_then(|(size, start)| data.get(start..start.checked_add(size)?))
        .ok_or_else(|| Error::file(file, format!("tensor {} lies past the end of the file (truncated?)", info.name)))?;
    Ok((kind, bytes))
}

/// One tensor of the data section `data` of `file` as stored: quantized matrices repacked (not
/// dequantized), float types as f32.
pub fn read_tensor(file: &str, data: &[u8], info: &TensorInfo) -> Result<StoredTensor> {
    let (kind, bytes) = tensor_bytes(file, data, info)?;
    let shape = info.shape();
    Ok(match kind {
        GgmlType::F32 => StoredTensor::Dense(HostTensor::new(
            shape,
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        )),
        GgmlType::F16 => StoredTensor::Dense(HostTensor::new(
            shape,
            bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        )),
        GgmlType::BF16 => StoredTensor::Dense(HostTensor::new(
            shape,
            bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        )),
        GgmlType::Quant(kind) => {
            let cols = shape.last().copied().unwrap_or(1);
            let rows = shape.iter().product::<usize>() / cols.max(1);
            StoredTensor::Quant(
                QuantMatrix::from_ggml(kind, rows, cols, bytes).map_err(|e| Error::file(file, format!("tensor {}: {e}", info.name)))?,
            )
        }
    })
}

/// The order of rows that undoes llama.cpp's rotary row permutation of attn_q / attn_k: within
/// each head, llama.cpp interleaves the two halves (row 2i+j holds Hugging Face row j*half+i), so
/// Hugging Face row `dst` is stored row `order[dst]`.
pub fn rotary_row_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(Error::invalid(format!("cannot split {rows} rows into {heads} rotary heads")));
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                order[h * head_dim + j * half + i] = h * head_dim + 2 * i + j;
            }
        }
    }
    Ok(order)
}

/// `t` with llama.cpp's rotary row permutation undone (see [`rotary_row_order`]).
pub fn unpermute_rotary_rows(t: &HostTensor, heads: usize) -> Result<HostTensor> {
    Ok(rows_in_order(t, &rotary_row_order(t.shape[0], heads)?))
}

/// The rows `order` of a matrix: row i of the result is row `order[i]` of `t`.
pub fn rows_in_order(t: &HostTensor, order: &[usize]) -> HostTensor {
    let cols = t.shape.get(1).copied().unwrap_or(1);
    let data = order.iter().flat_map(|&src| t.data[src * cols..(src + 1) * cols].iter().copied()).collect();
    HostTensor::new(t.shape.clone(), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, half, cols).swapaxes(1, 2): HF row (h, j, i) -> row (h, i, j)
        let (heads, head_dim, cols) = (3, 8, 2);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut permuted = vec![0.0; hf.len()];
        let half = head_dim / 2;
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = h * head_dim + j * half + i;
                    let dst = h * head_dim + i * 2 + j;
                    permuted[dst * cols..dst * cols + cols].copy_from_slice(&hf[src * cols..src * cols + cols]);
                }
            }
        }
        let back = unpermute_rotary_rows(&HostTensor::new(vec![rows, cols], permuted), heads).unwrap();
        assert_eq!(back.data, hf);
    }

    #[test]
    fn truncated_and_foreign_files_are_named() {
        let err = GgufFile::parse(b"GGUF\x03\x00", "m.gguf").err().unwrap().to_string();
        assert!(err.starts_with("m.gguf: truncated"), "{err}");
        let err = GgufFile::parse(b"PK\x03\x04xxxxxxxx", "m.gguf").err().unwrap().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
    }
}
