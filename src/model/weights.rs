//! Memory-mapped safetensors, single-file or sharded (`model.safetensors.index.json`), read as f32 or as
//! their stored format ([`TensorStore::weight`]).
//!
//! Tensors are converted element by element from little-endian bytes, so f16 / bf16 / f32 data at any
//! byte offset (safetensors does not promise alignment) load the same way.

use super::gguf::GgmlType;
use super::weight::{Weight, WeightStorage};
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
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`, or the file
    /// auto-gptq's `quantize_config.json` names, or a single file given directly (adapters).
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
        } else if let Some(file) = super::gptq::model_file(path)? {
            paths.push(file);
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

    /// A tensor's view and, for a tensor of raw GGUF blocks (`cage import-gguf --keep-quantized`), the ggml
    /// type id its file's metadata gives it.
    fn view(&self, name: &str) -> Result<(safetensors::tensor::TensorView<'_>, Option<u32>)> {
        let &i = self.index.get(name).ok_or_else(|| CageError::Model {
            model: self.what.clone(),
            msg: format!("tensor \"{name}\" is missing"),
        })?;
        let (p, m) = &self.files[i];
        let bad = |msg: String| CageError::Format { what: p.display().to_string(), msg };
        let st = parse(p, m)?;
        let t = st.tensor(name).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        let ggml = match SafeTensors::read_metadata(m).map_err(|e| bad(e.to_string()))?.1.metadata() {
            Some(md) => match md.get(&format!("{GGML_TYPE_KEY}{name}")) {
                Some(v) => Some(
                    v.parse::<u32>().map_err(|_| bad(format!("tensor {name}: ggml type \"{v}\" is not a number")))?,
                ),
                None => None,
            },
            None => None,
        };
        Ok((t, ggml))
    }

    fn shape_error(&self, name: &str, has: &[usize], want: &[usize]) -> CageError {
        CageError::Model {
            model: self.what.clone(),
            msg: format!("tensor \"{name}\" has shape {has:?}, but config.json implies {want:?}"),
        }
    }

    /// Reads a tensor as f32 and checks its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (t, ggml) = self.view(name)?;
        if ggml.is_some() {
            return match self.weight(name, shape, WeightStorage::F32)? {
                Weight::F32(w) => Ok(w),
                _ => unreachable!("WeightStorage::F32 gives f32"),
            };
        }
        if t.shape() != shape {
            return Err(self.shape_error(name, t.shape(), shape));
        }
        let b = t.data();
        let v = match t.dtype() {
            Dtype::F32 => self.convert(name, b, 4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Dtype::F16 => self.convert(name, b, 2, |c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            Dtype::BF16 => self.convert(name, b, 2, |c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            d => return Err(self.dtype_error(name, d)),
        };
        self.release(name, b);
        Ok(v)
    }

    /// A tensor's bytes converted `size` at a time into one vector (allocated once), releasing the file pages
    /// of each 16 MiB read (see [`TensorStore::release`]): loading holds at most that much of the file on top
    /// of the weights.
    fn convert<T>(&self, name: &str, b: &[u8], size: usize, f: impl Fn(&[u8]) -> T) -> Vec<T> {
        let mut out = Vec::with_capacity(b.len() / size);
        for part in b.chunks(((16 << 20) / size).max(1) * size) {
            out.extend(part.chunks_exact(size).map(&f));
            self.release(name, part);
        }
        out
    }

    /// Drops the file pages of a tensor that was just copied out from this process's mapping: mapped pages
    /// count in its resident memory, and a model read through the mapping would otherwise take its file size
    /// on top of its loaded weights until it is dropped. The kernel keeps them in the page cache.
    fn release(&self, name: &str, data: &[u8]) {
        let Some(&i) = self.index.get(name) else { return };
        let m = &self.files[i].1;
        let offset = data.as_ptr() as usize - m.as_ptr() as usize;
        #[cfg(unix)]
        // SAFETY: the mapping is a read-only, shared mapping of a file: MADV_DONTNEED only unmaps its pages from
        // this process, and a later read faults them in again with the same contents. No reference into the
        // range is used after the copy (`data` is not read again by the caller).
        let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len()) };
        #[cfg(not(unix))]
        let _ = (m, offset);
    }

    fn dtype_error(&self, name: &str, d: Dtype) -> CageError {
        CageError::Model {
            model: self.what.clone(),
            msg: format!("tensor \"{name}\" has dtype {d:?}; supported are F32, F16 and BF16"),
        }
    }

    /// The type and byte length of a tensor as `storage` holds it, from the file's header alone (nothing is
    /// read): what the memory check adds up before loading.
    fn held(&self, name: &str, storage: WeightStorage) -> Result<(GgmlType, u128)> {
        let (t, ggml) = self.view(name)?;
        let numel = t.shape().iter().map(|&d| d as u128).product::<u128>();
        let ty = match (ggml, t.dtype()) {
            (Some(id), Dtype::U8) => self.ggml_type(name, id)?,
            (Some(_), d) => {
                return Err(CageError::Model {
                    model: self.what.clone(),
                    msg: format!("tensor \"{name}\" has a ggml type but dtype {d:?} (raw blocks are U8)"),
                });
            }
            (None, Dtype::F32) => GgmlType::F32,
            (None, Dtype::F16) => GgmlType::F16,
            (None, Dtype::BF16) => GgmlType::Bf16,
            (None, d) => return Err(self.dtype_error(name, d)),
        };
        let elements = if ggml.is_some() {
            let (per, bytes) = ty.block();
            numel / bytes as u128 * per as u128
        } else {
            numel
        };
        Ok(match storage {
            WeightStorage::F32 => (GgmlType::F32, elements * 4),
            WeightStorage::Stored if ggml.is_some() => (ty, numel),
            WeightStorage::Stored => (ty, elements * ty.block().1 as u128),
        })
    }

    fn ggml_type(&self, name: &str, id: u32) -> Result<GgmlType> {
        GgmlType::from_id(id)
            .ok_or_else(|| CageError::Model { model: self.what.clone(), msg: super::gguf::unsupported_type(name, id) })
    }

    /// Bytes the named matrices take as `storage` holds them, and the other tensors (norms, biases: always
    /// f32) as f32, from the headers alone.
    pub fn held_bytes(&self, names: &[String], storage: WeightStorage) -> Result<u128> {
        let mut total = 0u128;
        for n in names {
            // Tensors of other dtypes (buffers some checkpoints carry) are never loaded.
            let (t, ggml) = self.view(n)?;
            if ggml.is_none() && !matches!(t.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                continue;
            }
            let matrix = self.shape(n).is_some_and(|s| s.len() == 2);
            total += self.held(n, if matrix { storage } else { WeightStorage::F32 })?.1;
        }
        Ok(total)
    }

    /// A tensor's dtype and shape from its file's header (nothing is read): what the GPTQ / AWQ loader checks
    /// before it reads a packed layer ([`super::gptq`]).
    pub(crate) fn header(&self, name: &str) -> Result<(Dtype, Vec<usize>)> {
        let (t, _) = self.view(name)?;
        Ok((t.dtype(), t.shape().to_vec()))
    }

    /// A tensor's little-endian words of `size` bytes converted by `f` (GPTQ / AWQ's packed int32 and f16
    /// tensors, read as stored), releasing its file pages as [`TensorStore::get`] does.
    pub(crate) fn words<T>(&self, name: &str, size: usize, f: impl Fn(&[u8]) -> T) -> Result<Vec<T>> {
        let (t, _) = self.view(name)?;
        let b = t.data();
        let v = self.convert(name, b, size, f);
        self.release(name, b);
        Ok(v)
    }

    /// Reads a `[rows, cols]` matrix as `storage` says, straight into its final buffer (one allocation of the
    /// bytes it takes), and checks its shape. Raw GGUF blocks (U8 tensors of `[rows, row bytes]` with a ggml
    /// type in the metadata) keep their blocks; an unknown type is an error naming the tensor and the type,
    /// before anything is allocated.
    pub fn weight(&self, name: &str, shape: &[usize], storage: WeightStorage) -> Result<Weight> {
        let (t, ggml) = self.view(name)?;
        let b = t.data();
        let Some(id) = ggml else {
            if t.shape() != shape {
                return Err(self.shape_error(name, t.shape(), shape));
            }
            let w = match (storage, t.dtype()) {
                (WeightStorage::Stored, Dtype::F16) => {
                    Weight::F16(self.convert(name, b, 2, |c| f16::from_le_bytes([c[0], c[1]])))
                }
                (WeightStorage::Stored, Dtype::BF16) => {
                    Weight::Bf16(self.convert(name, b, 2, |c| bf16::from_le_bytes([c[0], c[1]])))
                }
                _ => Weight::F32(self.get(name, shape)?),
            };
            self.release(name, b);
            return Ok(w);
        };
        let ty = self.ggml_type(name, id)?;
        let (per, bytes) = ty.block();
        let &[rows, cols] = shape else {
            return Err(CageError::Model {
                model: self.what.clone(),
                msg: format!("tensor \"{name}\" holds ggml blocks but is not a matrix ({shape:?})"),
            });
        };
        let want = [rows, cols / per * bytes];
        if !cols.is_multiple_of(per) || t.shape() != want {
            return Err(CageError::Model {
                model: self.what.clone(),
                msg: format!(
                    "tensor \"{name}\" holds {:?} bytes of {ty:?} blocks, but config.json implies {shape:?} values ({want:?} bytes)",
                    t.shape()
                ),
            });
        }
        let w = match storage {
            WeightStorage::Stored => match ty {
                GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => Weight::from_ggml(ty, b),
                _ => Weight::Quant { ty, raw: self.convert(name, b, 1, |c| c[0]) },
            },
            WeightStorage::F32 => {
                let mut out = vec![0f32; rows * cols];
                super::gguf::dequantize_into(ty, b, &mut out);
                Weight::F32(out)
            }
        };
        self.release(name, b);
        Ok(w)
    }
}

/// Metadata key prefix of a safetensors file that holds raw GGUF blocks: `cage.ggml_type.<tensor>` = the
/// ggml type id of that U8 tensor.
pub const GGML_TYPE_KEY: &str = "cage.ggml_type.";
