//! Memory-mapped safetensors, single-file or sharded (`model.safetensors.index.json`), read as f32.
//!
//! Tensors are converted element by element from little-endian bytes, so f16 / bf16 / f32 data at any
//! byte offset (safetensors does not promise alignment) load the same way.

use crate::error::{CageError, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A set of memory-mapped safetensors files with a name -> file index.
pub struct TensorStore {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, usize>,
    what: String,
}

fn map(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path)
        .map_err(|source| CageError::Io { context: format!("opening {}", path.display()), source })?;
    // SAFETY: read-only mapping of a model file that nothing modifies while it is loaded.
    unsafe { Mmap::map(&f) }.map_err(|source| CageError::Io { context: format!("mapping {}", path.display()), source })
}

fn parse<'a>(path: &Path, m: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(m).map_err(|e| CageError::Format {
        what: path.display().to_string(),
        msg: format!("not a valid safetensors file: {e}"),
    })
}

impl TensorStore {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`, or a single
    /// file given directly (adapters).
    pub fn open(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let mut paths = Vec::new();
        if path.is_file() {
            paths.push(path.to_path_buf());
        } else if path.join("model.safetensors").is_file() {
            paths.push(path.join("model.safetensors"));
        } else if path.join("model.safetensors.index.json").is_file() {
            let ip = path.join("model.safetensors.index.json");
            let text = std::fs::read_to_string(&ip)
                .map_err(|source| CageError::Io { context: format!("reading {}", ip.display()), source })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| CageError::Format { what: ip.display().to_string(), msg: e.to_string() })?;
            let wm = v.get("weight_map").and_then(|w| w.as_object()).ok_or_else(|| CageError::Format {
                what: ip.display().to_string(),
                msg: "no \"weight_map\" object".into(),
            })?;
            let mut shards: Vec<&str> = wm.values().filter_map(|s| s.as_str()).collect();
            shards.sort();
            shards.dedup();
            for s in shards {
                if s.contains("..") || s.starts_with('/') {
                    return Err(CageError::Format {
                        what: ip.display().to_string(),
                        msg: format!("shard name \"{s}\" leaves the model folder"),
                    });
                }
                paths.push(path.join(s));
            }
        } else {
            return Err(CageError::Model {
                model: what,
                msg: "no model.safetensors or model.safetensors.index.json in this folder".into(),
            });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.into_iter().enumerate() {
            let m = map(&p)?;
            for name in parse(&p, &m)?.names() {
                index.insert(name.to_string(), i);
            }
            files.push((p, m));
        }
        Ok(TensorStore { files, index, what })
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &i = self.index.get(name)?;
        let (p, m) = &self.files[i];
        parse(p, m).ok()?.tensor(name).ok().map(|t| t.shape().to_vec())
    }

    /// Reads a tensor as f32 and checks its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let &i = self.index.get(name).ok_or_else(|| CageError::Model {
            model: self.what.clone(),
            msg: format!("tensor \"{name}\" is missing"),
        })?;
        let (p, m) = &self.files[i];
        let st = parse(p, m)?;
        let t = st
            .tensor(name)
            .map_err(|e| CageError::Format { what: p.display().to_string(), msg: format!("tensor {name}: {e}") })?;
        if t.shape() != shape {
            return Err(CageError::Model {
                model: self.what.clone(),
                msg: format!("tensor \"{name}\" has shape {:?}, but config.json implies {shape:?}", t.shape()),
            });
        }
        let b = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            d => {
                return Err(CageError::Model {
                    model: self.what.clone(),
                    msg: format!("tensor \"{name}\" has dtype {d:?}; supported are F32, F16 and BF16"),
                });
            }
        })
    }
}
