//! A GGUF (v3) writer: metadata (typed values, or entries copied as another GGUF stored them)
//! and tensors (F32, F16, or quantized blocks), laid out as gguf-py's `GGUFWriter` lays them
//! out: header, metadata, tensor infos, then each tensor's data aligned to 32 bytes.

use crate::io::gguf::{DEFAULT_ALIGNMENT, MAGIC, RawMetadata};
use crate::io::quant::QuantMatrix;
use crate::tensor::HostTensor;

/// GGUF value type ids.
const UINT32: u32 = 4;
const INT32: u32 = 5;
const FLOAT32: u32 = 6;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;

/// GGML type ids of the float tensors written here.
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;

/// A GGUF file being put together.
#[derive(Default)]
pub struct GgufWriter {
    /// (key, value type id and value bytes as GGUF stores them), in the order written.
    metadata: Vec<(String, Vec<u8>)>,
    /// (name, GGML dims (innermost first), GGML type, data)
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn string_bytes(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend(s.as_bytes());
    out
}

impl GgufWriter {
    /// Sets `key` to a value of type `kind` (its bytes after the type id), replacing an earlier one.
    fn set(&mut self, key: &str, kind: u32, value: &[u8]) {
        let mut raw = kind.to_le_bytes().to_vec();
        raw.extend(value);
        self.set_raw(key, raw);
    }

    /// Sets `key` to an entry as a GGUF stores it (type id, then value), keeping the position of
    /// an earlier value.
    pub fn set_raw(&mut self, key: &str, raw: Vec<u8>) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = raw,
            None => self.metadata.push((key.to_string(), raw)),
        }
    }

    /// Copies every metadata entry of another file, as stored.
    pub fn copy_metadata(&mut self, metadata: &RawMetadata) {
        for (key, raw) in metadata {
            self.set_raw(key, raw.clone());
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    pub fn set_u32(&mut self, key: &str, value: u32) {
        self.set(key, UINT32, &value.to_le_bytes());
    }

    pub fn set_f32(&mut self, key: &str, value: f32) {
        self.set(key, FLOAT32, &value.to_le_bytes());
    }

    pub fn set_str(&mut self, key: &str, value: &str) {
        self.set(key, STRING, &string_bytes(value));
    }

    pub fn set_bool(&mut self, key: &str, value: bool) {
        self.set(key, BOOL, &[value as u8]);
    }

    pub fn set_str_array(&mut self, key: &str, values: &[String]) {
        self.set_array(key, STRING, values.len(), values.iter().flat_map(|v| string_bytes(v)));
    }

    pub fn set_i32_array(&mut self, key: &str, values: &[i32]) {
        self.set_array(key, INT32, values.len(), values.iter().flat_map(|v| v.to_le_bytes()));
    }

    /// An array: the elements' type id, their count, then their bytes.
    fn set_array(&mut self, key: &str, kind: u32, len: usize, elements: impl Iterator<Item = u8>) {
        let mut value = kind.to_le_bytes().to_vec();
        value.extend((len as u64).to_le_bytes());
        value.extend(elements);
        self.set(key, ARRAY, &value);
    }

    /// The metadata set so far, as a GGUF stores it.
    pub fn into_metadata(self) -> RawMetadata {
        self.metadata
    }

    /// A row-major f32 tensor, stored as F32 or (`f16`) F16.
    pub fn add_dense(&mut self, name: &str, t: &HostTensor, f16: bool) {
        let dims = t.shape.iter().rev().map(|&d| d as u64).collect();
        let data = if f16 {
            t.data.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()
        } else {
            t.data.iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        self.tensors.push((name.to_string(), dims, if f16 { GGML_F16 } else { GGML_F32 }, data));
    }

    /// A quantized matrix as GGUF blocks; None (nothing added) for a type whose blocks are not
    /// written here (see [`QuantMatrix::to_ggml`]).
    pub fn add_quant(&mut self, name: &str, q: &QuantMatrix) -> Option<()> {
        let data = q.to_ggml()?;
        self.tensors.push((name.to_string(), vec![q.cols() as u64, q.rows as u64], q.kind.ggml_id(), data));
        Some(())
    }

    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let align = |n: usize| n.div_ceil(DEFAULT_ALIGNMENT as usize) * DEFAULT_ALIGNMENT as usize;
        let mut out = MAGIC.to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, raw) in &self.metadata {
            out.extend(string_bytes(key));
            out.extend(raw);
        }
        let mut offset = 0;
        for (name, dims, kind, data) in &self.tensors {
            out.extend(string_bytes(name));
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(kind.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = align(offset + data.len());
        }
        out.resize(align(out.len()), 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(align(out.len()), 0);
        }
        out
    }
}
