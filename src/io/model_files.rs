//! `ModelFiles`: the files of a Hugging Face model directory, held as bytes, or of a GGUF file
//! (its config and tokenizer files made from its metadata). The browser fills it from `fetch`,
//! the native build from a directory or a file; everything after that is one code path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::io::gguf::{RawMetadata, StoredTensor};
use crate::io::gguf_convert::{GgufModel, GgufWeights};
use crate::io::safetensors::{INDEX_FILE, SINGLE_FILE, SafetensorsWeights, StoreDtype, WeightFile};
use crate::io::tokenizer::TextTokenizer;

pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// The optional files of a model directory besides config and weights.
pub const TEXT_FILES: [&str; 4] = [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE];

/// The files of one model, by file name.
pub struct ModelFiles {
    /// Where they came from (a directory or a URL), prefixed to file names in errors.
    origin: String,
    files: BTreeMap<String, Vec<u8>>,
    /// Weight files left on disk, read a tensor at a time while loading (a directory's).
    on_disk: BTreeMap<String, PathBuf>,
    /// The tensors of a GGUF model (its other files are in `files`).
    gguf: Option<GgufWeights>,
    /// A GGUF model's metadata as stored (what a GGUF export of the model copies).
    pub gguf_metadata: Option<RawMetadata>,
}

/// Where a model's tensors come from.
pub enum WeightSource {
    Safetensors(SafetensorsWeights),
    Gguf(GgufWeights),
}

impl WeightSource {
    /// The tensor named `name` (its Hugging Face name) as the file stores it.
    pub fn tensor(&self, name: &str) -> Result<StoredTensor> {
        match self {
            WeightSource::Safetensors(w) => w.tensor(name).map(StoredTensor::Dense),
            WeightSource::Gguf(w) => w.tensor(name),
        }
    }

    /// The file that holds `name`, for messages.
    pub fn file_of(&self, name: &str) -> &str {
        match self {
            WeightSource::Safetensors(w) => w.file_of(name),
            WeightSource::Gguf(w) => w.file(),
        }
    }
}

impl ModelFiles {
    /// An empty set; `origin` (a directory or URL) is shown in error messages.
    pub fn new(origin: impl Into<String>) -> Self {
        ModelFiles {
            origin: origin.into().trim_end_matches('/').to_string(),
            files: BTreeMap::new(),
            on_disk: BTreeMap::new(),
            gguf: None,
            gguf_metadata: None,
        }
    }

    /// The files of a GGUF model: config and tokenizer files made from its metadata, its tensors
    /// kept in their stored types. `origin` (the file's path or URL) names it in errors.
    pub fn from_gguf(origin: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        let origin = origin.into();
        let model = GgufModel::parse(&origin, bytes)?;
        let mut files = ModelFiles::new(origin);
        for (name, bytes) in model.text_files(StoreDtype::F32) {
            files.insert(name, bytes);
        }
        files.gguf = Some(model.weights);
        files.gguf_metadata = Some(model.metadata);
        Ok(files)
    }

    /// A model directory, or a `.gguf` file.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_file() && is_gguf(&path.display().to_string()) {
            Self::from_gguf(path.display().to_string(), crate::io::read_file(path)?)
        } else {
            Self::from_dir(path)
        }
    }

    /// These files, or, when they are one `.gguf` file (as the browser adds it), the files of
    /// that GGUF model.
    pub fn expand_gguf(mut self) -> Result<Self> {
        let ggufs: Vec<String> = self.files.keys().filter(|name| is_gguf(name)).cloned().collect();
        match ggufs.as_slice() {
            [] => Ok(self),
            [name] if self.files.len() == 1 => {
                let bytes = self.files.remove(name).expect("listed");
                let origin = if self.origin.ends_with(name.as_str()) { self.origin.clone() } else { self.label(name) };
                Self::from_gguf(origin, bytes)
            }
            _ => Err(Error::file(
                &self.origin,
                format!("give one .gguf file on its own, not with {:?}", self.files.keys().collect::<Vec<_>>()),
            )),
        }
    }

    pub fn insert(&mut self, name: impl Into<String>, bytes: Vec<u8>) {
        self.files.insert(name.into(), bytes);
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.files.get(name).map(Vec::as_slice)
    }

    /// The label of one file in errors: "origin/name".
    pub fn label(&self, name: &str) -> String {
        if self.origin.is_empty() { name.to_string() } else { format!("{}/{name}", self.origin) }
    }

    /// The file names of a model directory, as JSON for the browser's downloader: {config,
    /// weights (single file), index (of shards), optional: [tokenizer and generation files]}.
    pub fn layout() -> serde_json::Value {
        serde_json::json!({"config": CONFIG_FILE, "weights": SINGLE_FILE, "index": INDEX_FILE, "optional": TEXT_FILES})
    }

    /// The weight files a model needs: the shards an index lists, or `model.safetensors`.
    pub fn weight_file_names(index_json: Option<&[u8]>) -> Result<Vec<String>> {
        match index_json {
            Some(index) => SafetensorsWeights::shard_names(index),
            None => Ok(vec![SINGLE_FILE.to_string()]),
        }
    }

    /// Reads a model directory: config, weights (single or sharded) and whichever text files exist.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let origin = dir.display().to_string();
        if !dir.is_dir() {
            return Err(Error::file(
                origin,
                "not a directory: give the folder that holds config.json and model.safetensors, or a .gguf file",
            ));
        }
        let mut files = ModelFiles::new(origin);
        let label = |name: &str| format!("{}/{name}", dir.display());
        let read = |name: &str| crate::io::read_file(&dir.join(name));
        let mut weights = Vec::new();
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            let bytes = read(INDEX_FILE)?;
            weights.extend(Self::weight_file_names(Some(&bytes))?);
            files.insert(INDEX_FILE, bytes);
        } else if dir.join(SINGLE_FILE).is_file() {
            weights.push(SINGLE_FILE.to_string());
        } else {
            return Err(Error::file(
                label(SINGLE_FILE),
                format!(
                    "no model weights: neither {SINGLE_FILE} nor {INDEX_FILE} is in this directory (a GGUF file loads as it is: give its path)"
                ),
            ));
        }
        files.insert(CONFIG_FILE, read(CONFIG_FILE)?);
        for name in weights {
            let path = dir.join(&name);
            if !path.is_file() {
                return Err(Error::file(label(&name), format!("missing: {INDEX_FILE} lists it")));
            }
            files.on_disk.insert(name, path);
        }
        for name in TEXT_FILES {
            if dir.join(name).is_file() {
                let bytes = read(name)?;
                files.insert(name, bytes);
            }
        }
        Ok(files)
    }

    /// Puts the origin in front of an error that names one of these files by its bare name.
    fn relabel(&self, e: Error) -> Error {
        match e {
            Error::File { file, message }
                if self.files.contains_key(&file) || TEXT_FILES.contains(&file.as_str()) || file == INDEX_FILE =>
            {
                Error::File { file: self.label(&file), message }
            }
            other => other,
        }
    }

    /// Parses config.json.
    pub fn config(&self) -> Result<LlamaConfig> {
        let bytes =
            self.get(CONFIG_FILE).ok_or_else(|| Error::file(self.label(CONFIG_FILE), "missing: every model needs its config.json"))?;
        LlamaConfig::from_json(bytes, &self.label(CONFIG_FILE))
    }

    /// Moves the weights out (they are the bulk of the memory) and checks their headers.
    pub fn take_weights(&mut self) -> Result<WeightSource> {
        match self.gguf.take() {
            Some(gguf) => Ok(WeightSource::Gguf(gguf)),
            None => self.take_safetensors().map(WeightSource::Safetensors),
        }
    }

    fn take_safetensors(&mut self) -> Result<SafetensorsWeights> {
        let names = Self::weight_file_names(self.get(INDEX_FILE)).map_err(|e| self.relabel(e))?;
        let mut weights = Vec::with_capacity(names.len());
        for name in names {
            let label = self.label(&name);
            let file = match (self.files.remove(&name), self.on_disk.remove(&name)) {
                (Some(bytes), _) => WeightFile::Memory(bytes),
                (None, Some(path)) => WeightFile::Disk(path),
                (None, None) => {
                    return Err(Error::file(
                        &label,
                        format!("missing: the model's weights are not loaded ({SINGLE_FILE} or the shards of {INDEX_FILE})"),
                    ));
                }
            };
            weights.push((label, file));
        }
        SafetensorsWeights::open(weights)
    }

    /// The tokenizer, when tokenizer.json is present (a model without one runs on token ids).
    pub fn tokenizer(&self) -> Result<Option<TextTokenizer>> {
        let Some(json) = self.get(TOKENIZER_FILE) else { return Ok(None) };
        TextTokenizer::from_files(json, self.get(TOKENIZER_CONFIG_FILE), self.get(CHAT_TEMPLATE_FILE))
            .map(Some)
            .map_err(|e| self.relabel(e))
    }
}

/// Whether a file name (or URL) names a GGUF file.
pub fn is_gguf(name: &str) -> bool {
    name.rsplit('.').next().is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"))
}

/// Writes files into `dir` (created if needed), each as [`write_file`] does.
pub fn write_files<S: AsRef<str>>(dir: &Path, files: Vec<(S, Vec<u8>)>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::io(dir.display(), source))?;
    for (name, bytes) in files {
        write_file(&dir.join(name.as_ref()), bytes)?;
    }
    Ok(())
}

/// Writes a file under a temporary name first and then renames it, so an interrupted write
/// never leaves a half-written file under the real name; missing parent directories are made.
pub fn write_file(path: &Path, bytes: Vec<u8>) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::io(dir.display(), source))?;
    }
    std::fs::write(&tmp, bytes).map_err(|source| Error::io(tmp.display(), source))?;
    std::fs::rename(&tmp, path).map_err(|source| Error::io(path.display(), source))
}
