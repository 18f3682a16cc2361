//! Safetensors in and out: the weights of a Hugging Face model (one file or shards with
//! `model.safetensors.index.json`), from bytes in memory (the browser's downloads) or from files
//! on disk read a tensor at a time (so loading never holds a whole checkpoint besides the model),
//! through one path. Tensors come out as f32 whatever their storage type (F32, F16, BF16).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Mutex;

use safetensors::{
    Dtype, SafeTensorError, SafeTensors,
    tensor::{Metadata, TensorInfo},
};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensor::HostTensor;

/// The name of the index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Storage type of tensors written to safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    /// Parses "f32", "f16"/"float16", "bf16"/"bfloat16".
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(StoreDtype::F32),
            "f16" | "float16" => Ok(StoreDtype::F16),
            "bf16" | "bfloat16" => Ok(StoreDtype::BF16),
            other => Err(Error::invalid(format!("unknown dtype {other:?}; use f32, f16 or bf16"))),
        }
    }

    /// The name transformers writes as `torch_dtype` / `dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "float32",
            StoreDtype::F16 => "float16",
            StoreDtype::BF16 => "bfloat16",
        }
    }
}

/// Where a checkpoint file's bytes are.
pub enum WeightFile {
    Memory(Vec<u8>),
    /// A file on disk, read a tensor at a time.
    Disk(PathBuf),
}

/// An open [`WeightFile`].
enum Bytes {
    Memory(Vec<u8>),
    Disk(Mutex<File>),
}

impl Bytes {
    /// Bytes `range` of the file (`name` for errors).
    fn read(&self, range: (usize, usize), name: &str) -> Result<Cow<'_, [u8]>> {
        match self {
            Bytes::Memory(bytes) => Ok(Cow::Borrowed(&bytes[range.0..range.1])),
            Bytes::Disk(file) => {
                let mut out = vec![0; range.1 - range.0];
                let mut file = file.lock().expect("no thread panics holding a weight file");
                file.seek(SeekFrom::Start(range.0 as u64))
                    .and_then(|_| file.read_exact(&mut out))
                    .map_err(|source| Error::io(name, source))?;
                Ok(Cow::Owned(out))
            }
        }
    }
}

/// The weights of a model: one or more safetensors files, validated on construction and decoded
/// tensor by tensor on demand (so at most one tensor is held twice in memory while loading).
pub struct SafetensorsWeights {
    files: Vec<(String, Bytes)>,
    /// tensor name -> (index into `files`, its entry in that file's header, with data offsets
    /// made absolute), so decoding a tensor does not parse the header again
    location: HashMap<String, (usize, TensorInfo)>,
}

impl SafetensorsWeights {
    /// Takes the files (name, bytes) of one checkpoint; every header is checked here, so a truncated
    /// or inconsistent file fails before anything is built.
    pub fn new(files: Vec<(String, Vec<u8>)>) -> Result<Self> {
        Self::open(files.into_iter().map(|(name, bytes)| (name, WeightFile::Memory(bytes))).collect())
    }

    /// As [`new`](Self::new), from bytes or files on disk (of which only the headers are read here).
    pub fn open(files: Vec<(String, WeightFile)>) -> Result<Self> {
        let files: Vec<(String, Bytes)> = files
            .into_iter()
            .map(|(name, file)| match file {
                WeightFile::Memory(bytes) => Ok((name, Bytes::Memory(bytes))),
                WeightFile::Disk(path) => {
                    File::open(&path).map(|f| (name, Bytes::Disk(Mutex::new(f)))).map_err(|source| Error::io(path.display(), source))
                }
            })
            .collect::<Result<_>>()?;
        let mut location = HashMap::new();
        for (index, (name, bytes)) in files.iter().enumerate() {
            let (data_start, metadata) = header(name, bytes)?;
            for (tensor, info) in metadata.tensors() {
                let mut info = info.clone();
                info.data_offsets = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
                if location.insert(tensor.clone(), (index, info)).is_some() {
                    return Err(Error::file(name, format!("tensor {tensor} also appears in another shard")));
                }
            }
        }
        Ok(SafetensorsWeights { files, location })
    }

    /// The shard file names listed by a `model.safetensors.index.json`, in order of first use.
    pub fn shard_names(index_json: &[u8]) -> Result<Vec<String>> {
        let value: Value = serde_json::from_slice(index_json).map_err(|e| Error::file(INDEX_FILE, format!("not valid JSON: {e}")))?;
        let map = value.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::file(INDEX_FILE, "no \"weight_map\" object"))?;
        let mut names: Vec<String> = Vec::new();
        for file in map.values() {
            let file = file.as_str().ok_or_else(|| Error::file(INDEX_FILE, "weight_map values must be file names"))?;
            if file.contains('/') || file.contains("..") {
                return Err(Error::file(INDEX_FILE, format!("shard name {file:?} must be a plain file name")));
            }
            if !names.iter().any(|n| n == file) {
                names.push(file.to_string());
            }
        }
        Ok(names)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.location.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The file that holds `name` (for error messages).
    pub fn file_of(&self, name: &str) -> &str {
        self.location.get(name).map_or("(weights)", |(i, _)| self.files[*i].0.as_str())
    }

    /// Decodes one tensor to f32.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let (index, info) = self.location.get(name).ok_or_else(|| {
            let files: Vec<&str> = self.files.iter().map(|(n, _)| n.as_str()).collect();
            Error::file(files.join(", "), format!("tensor {name} is missing"))
        })?;
        let (file, bytes) = &self.files[*index];
        let data = decode(info.dtype, &bytes.read(info.data_offsets, file)?)
            .ok_or_else(|| Error::file(file, format!("tensor {name} has dtype {:?}; only F32, F16 and BF16 are supported", info.dtype)))?;
        Ok(HostTensor::new(info.shape.clone(), data))
    }
}

/// Where a file's tensor data starts, and its header, checked against the file (offsets, sizes,
/// overlaps, and that the data ends where the file does).
fn header(name: &str, bytes: &Bytes) -> Result<(usize, Metadata)> {
    let file = match bytes {
        Bytes::Memory(bytes) => {
            SafeTensors::deserialize(bytes).map_err(|e| describe(name, bytes.len(), e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| describe(name, bytes.len(), e))?;
            return Ok((8 + header_len, metadata));
        }
        Bytes::Disk(file) => file,
    };
    let len =
        file.lock().expect("no thread panics holding a weight file").metadata().map_err(|source| Error::io(name, source))?.len() as usize;
    if len < 8 {
        return Err(describe(name, len, SafeTensorError::HeaderTooSmall));
    }
    let header_len = u64::from_le_bytes(bytes.read((0, 8), name)?.as_ref().try_into().expect("8 bytes")) as usize;
    if header_len > len - 8 {
        return Err(describe(name, len, SafeTensorError::InvalidHeaderLength));
    }
    // parsing the header validates its offsets and sizes (read_metadata would want the whole file)
    let text = bytes.read((8, 8 + header_len), name)?;
    let text = std::str::from_utf8(&text).map_err(|e| describe(name, len, SafeTensorError::InvalidHeader(e)))?;
    let metadata: Metadata =
        serde_json::from_str(text).map_err(|e| describe(name, len, SafeTensorError::InvalidHeaderDeserialization(e)))?;
    if 8 + header_len + metadata.data_len() != len {
        return Err(describe(name, len, SafeTensorError::MetadataIncompleteBuffer));
    }
    Ok((8 + header_len, metadata))
}

/// Little-endian bytes of F32/F16/BF16 to f32 values; `None` for other types.
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let words2 = || bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => words2().map(|w| half::f16::from_bits(w).to_f32()).collect(),
        Dtype::BF16 => words2().map(|w| half::bf16::from_bits(w).to_f32()).collect(),
        _ => return None,
    })
}

/// Explains a safetensors error in terms of the file a user has in hand.
fn describe(file: &str, len: usize, e: SafeTensorError) -> Error {
    use SafeTensorError as E;
    let hint = match &e {
        E::MetadataIncompleteBuffer | E::HeaderTooSmall | E::InvalidHeaderLength => {
            format!("; the file ({len} bytes) looks truncated or is not safetensors: download it again")
        }
        E::InvalidOffset(_) | E::TensorInvalidInfo => "; the header's offsets do not match the data: the file is corrupt".to_string(),
        _ => String::new(),
    };
    Error::file(file, format!("invalid safetensors ({e}){hint}"))
}

/// Serializes named f32 tensors to safetensors bytes in `dtype`, with `metadata` (e.g. {"format": "pt"}).
pub fn write_safetensors(
    tensors: &BTreeMap<String, HostTensor>,
    dtype: StoreDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    write_safetensors_as(tensors, &|_| dtype, metadata)
}

/// [`write_safetensors`] with each tensor in the dtype `dtype_of` gives for its name.
pub fn write_safetensors_as(
    tensors: &BTreeMap<String, HostTensor>,
    dtype_of: &dyn Fn(&str) -> StoreDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let entries =
        tensors.iter().map(|(name, t)| TensorEntry { name: name.clone(), shape: t.shape.clone(), dtype: dtype_of(name), values: t });
    let (mut file, entries) = file_layout(entries.collect(), metadata)?;
    for entry in entries {
        append(&mut file, &entry, entry.values)?;
    }
    Ok(file)
}

/// A safetensors file of `tensors` whose values are read one at a time, as the file comes to
/// each (`read` of its `values`: e.g. from the device): the file and one tensor exist at once,
/// where reading them all first holds the values twice more (the f32 values, then the file).
pub async fn write_safetensors_reading<T>(
    tensors: Vec<TensorEntry<T>>,
    metadata: Option<HashMap<String, String>>,
    mut read: impl AsyncFnMut(T) -> Result<HostTensor>,
) -> Result<Vec<u8>> {
    let (mut file, entries) = file_layout(tensors, metadata)?;
    for TensorEntry { name, shape, dtype, values } in entries {
        let t = read(values).await?;
        append(&mut file, &TensorEntry { name, shape, dtype, values: () }, &t)?;
    }
    Ok(file)
}

/// A tensor of a file being written: its name, shape and dtype, and where its values come from.
pub struct TensorEntry<T> {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StoreDtype,
    pub values: T,
}

fn st_dtype(dtype: StoreDtype) -> Dtype {
    match dtype {
        StoreDtype::F32 => Dtype::F32,
        StoreDtype::F16 => Dtype::F16,
        StoreDtype::BF16 => Dtype::BF16,
    }
}

/// The start of a safetensors file of `tensors` (its length, then the header: every tensor's
/// dtype, shape and offsets, and `metadata`), with room reserved for their data, and the tensors
/// in the order their data follows: `safetensors::serialize`'s (largest alignment first, then by
/// name), so the file is the bytes it would write.
fn file_layout<T>(mut tensors: Vec<TensorEntry<T>>, metadata: Option<HashMap<String, String>>) -> Result<(Vec<u8>, Vec<TensorEntry<T>>)> {
    tensors.sort_by(|a, b| st_dtype(b.dtype).cmp(&st_dtype(a.dtype)).then_with(|| a.name.cmp(&b.name)));
    let mut offset = 0;
    let mut infos = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let bytes = t.shape.iter().product::<usize>() * st_dtype(t.dtype).bitsize() / 8;
        infos.push((
            t.name.clone(),
            TensorInfo { dtype: st_dtype(t.dtype), shape: t.shape.clone(), data_offsets: (offset, offset + bytes) },
        ));
        offset += bytes;
    }
    let cannot = |e: &dyn std::fmt::Display| Error::invalid(format!("cannot serialize tensors: {e}"));
    let header = Metadata::new(metadata, infos).map_err(|e| cannot(&e))?;
    let mut header = serde_json::to_string(&header).map_err(|e| cannot(&e))?.into_bytes();
    // the data starts 8-byte aligned, the header padded with spaces
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut file = Vec::with_capacity(8 + header.len() + offset);
    file.extend((header.len() as u64).to_le_bytes());
    file.extend(header);
    Ok((file, tensors))
}

/// Appends the data of `entry`, whose values are `t`, to the file.
fn append<T>(file: &mut Vec<u8>, entry: &TensorEntry<T>, t: &HostTensor) -> Result<()> {
    if t.shape != entry.shape {
        return Err(Error::invalid(format!("cannot serialize tensor {}: its shape is {:?}, not {:?}", entry.name, t.shape, entry.shape)));
    }
    match entry.dtype {
        StoreDtype::F32 => file.extend(t.data.iter().flat_map(|v| v.to_le_bytes())),
        StoreDtype::F16 => file.extend(t.data.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes())),
        StoreDtype::BF16 => file.extend(t.data.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn sample() -> BTreeMap<String, HostTensor> {
        let mut t = BTreeMap::new();
        t.insert("a".to_string(), HostTensor::new(vec![2, 3], vec![0.5, -1.0, 2.0, 3.25, 0.0, -0.125]));
        t
    }

    #[test]
    fn round_trip_in_every_dtype() {
        for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
            let bytes = write_safetensors(&sample(), dtype, None).unwrap();
            let w = SafetensorsWeights::new(vec![("m.safetensors".into(), bytes)]).unwrap();
            // these values are exact in all three types
            assert_eq!(w.tensor("a").unwrap(), sample()["a"], "{dtype:?}");
        }
    }

    /// The file is the bytes `safetensors::serialize` writes for the same tensors (mixed dtypes,
    /// names out of order, metadata), whether the values are at hand or read one at a time; a
    /// value read in another shape than announced is refused by name.
    #[test]
    fn files_are_the_bytes_safetensors_serialize_writes() {
        let t = |shape: Vec<usize>, salt: f32| {
            let n = shape.iter().product::<usize>();
            HostTensor::new(shape, (0..n).map(|i| (i as f32 * 0.37 + salt).sin()).collect())
        };
        let tensors = BTreeMap::from([
            ("b.w".to_string(), t(vec![3, 5], 1.0)),
            ("a.w".to_string(), t(vec![4], 2.0)),
            ("c".to_string(), t(vec![2, 2], 3.0)),
        ]);
        let dtype_of = |name: &str| match name {
            "a.w" => StoreDtype::BF16,
            "c" => StoreDtype::F16,
            _ => StoreDtype::F32,
        };
        let metadata = || Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(name, t)| {
                let bytes = match dtype_of(name) {
                    StoreDtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    StoreDtype::F16 => t.data.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
                    StoreDtype::BF16 => t.data.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
                };
                (name.clone(), st_dtype(dtype_of(name)), t.shape.clone(), bytes)
            })
            .collect();
        let views =
            encoded.iter().map(|(name, dtype, shape, bytes)| (name.as_str(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()));
        let expected = safetensors::serialize(views, metadata()).unwrap();
        assert_eq!(write_safetensors_as(&tensors, &dtype_of, metadata()).unwrap(), expected);

        let entries = |shape_of: &dyn Fn(&HostTensor) -> Vec<usize>| {
            tensors
                .iter()
                .map(|(name, t)| TensorEntry { name: name.clone(), shape: shape_of(t), dtype: dtype_of(name), values: name.clone() })
                .collect()
        };
        let read = async |name: String| Ok(tensors[&name].clone());
        let streamed = pollster::block_on(write_safetensors_reading(entries(&|t| t.shape.clone()), metadata(), read)).unwrap();
        assert_eq!(streamed, expected);
        let wrong = pollster::block_on(write_safetensors_reading(entries(&|t| vec![t.data.len() + 1]), None, read)).unwrap_err();
        assert!(wrong.to_string().contains("cannot serialize tensor b.w: its shape is [3, 5], not [16]"), "{wrong}");
    }

    #[test]
    fn truncated_file_names_file_and_problem() {
        let mut bytes = write_safetensors(&sample(), StoreDtype::F32, None).unwrap();
        bytes.truncate(bytes.len() - 4);
        let err = SafetensorsWeights::new(vec![("model.safetensors".into(), bytes)]).err().unwrap().to_string();
        assert!(err.starts_with("model.safetensors: invalid safetensors") && err.contains("truncated"), "{err}");
    }

    /// From disk, a tensor at a time: the same values, and the same checks of the header.
    #[test]
    fn files_on_disk_read_as_bytes_do() {
        let dir = std::env::temp_dir().join(format!("webgpu-lora-safetensors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, cut) = (dir.join("good.safetensors"), dir.join("cut.safetensors"));
        let bytes = write_safetensors(&sample(), StoreDtype::BF16, None).unwrap();
        std::fs::write(&good, &bytes).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
        let w = SafetensorsWeights::open(vec![("m.safetensors".into(), WeightFile::Disk(good))]).unwrap();
        assert_eq!(w.tensor("a").unwrap(), sample()["a"]);
        let err = SafetensorsWeights::open(vec![("model.safetensors".into(), WeightFile::Disk(cut))]).err().unwrap().to_string();
        assert!(err.starts_with("model.safetensors: invalid safetensors") && err.contains("truncated"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_tensor_is_named() {
        let bytes = write_safetensors(&sample(), StoreDtype::F32, None).unwrap();
        let w = SafetensorsWeights::new(vec![("x.safetensors".into(), bytes)]).unwrap();
        let err = w.tensor("lm_head.weight").unwrap_err().to_string();
        assert_eq!(err, "x.safetensors: tensor lm_head.weight is missing");
    }
}
