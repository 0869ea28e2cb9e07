//! Will a model fit? The bytes its weights take where they are held (their stored format or f32 on the CPU,
//! bf16 on a GPU) against the
//! memory that is free there, checked before any large allocation: a model that cannot fit is a clear error
//! naming the model and both sizes, not an allocation failure or an out-of-memory kill halfway through loading.

use super::config::ModelConfig;
use super::weight::WeightStorage;
use crate::error::{CageError, Result};

/// Parameters of a model of this config (its matrices, norms and biases; the embedding once when tied).
pub fn parameters(c: &ModelConfig) -> u128 {
    let (h, hd, ffn, v) =
        (c.hidden_size as u128, c.head_dim as u128, c.intermediate_size as u128, c.vocab_size as u128);
    let (q, kv) = (c.num_heads as u128 * hd, c.num_kv_heads as u128 * hd);
    let bias = |on: bool, n: u128| if on { n } else { 0 };
    let layer = h * q
        + 2 * h * kv
        + q * h
        + 3 * h * ffn
        + 2 * h
        + bias(c.qkv_bias, q + 2 * kv)
        + bias(c.o_bias, h)
        + bias(c.mlp_bias, 2 * ffn + h);
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    v * h + c.num_layers as u128 * layer + h + head
}

/// The memory this process may still take on the host: the least of the kernel's `MemAvailable`, the room
/// left under the cgroup's `memory.max` (containers), and `CAGE_MEMORY_LIMIT` (bytes; a user's own cap, which
/// also lets tests exercise the check). `None` where none of them can be read (not Linux).
pub fn host_available() -> Option<u128> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u128>().ok().map(|kb| kb * 1024)
    });
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u128>().ok());
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    let cap = std::env::var("CAGE_MEMORY_LIMIT").ok().and_then(|s| s.trim().parse::<u128>().ok());
    [meminfo, cgroup, cap].into_iter().flatten().min()
}

/// Bytes in the unit that shows them best (tiny test models and 70B models alike).
fn size(bytes: u128) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000_000 => format!("{:.1} KB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

/// Checks that `need` bytes of `what` for `model` fit in `available` bytes of `place` (`None`: unknown, no
/// check).
pub fn check_fits(model: &str, what: &str, need: u128, place: &str, available: Option<u128>) -> Result<()> {
    match available {
        Some(free) if need > free => Err(CageError::Model {
            model: model.to_string(),
            msg: format!(
                "{what} take {}, more than the {} free {place}; use a smaller model{}",
                size(need),
                size(free),
                if place.contains("host") { " or a GPU (model_device cuda holds bf16 weights)" } else { "" }
            ),
        }),
        _ => Ok(()),
    }
}

/// The CPU runtime's check before loading: `need` bytes of weights as `storage` holds them (each matrix in its
/// format, from the files' headers; see [`super::weights::TensorStore::held_bytes`]).
/// A refusal names the setting that changes the bytes: `cpu_weights stored` where the matrices were to be
/// expanded to f32, a smaller format where they are already held as stored.
pub fn check_host(need: u128, storage: WeightStorage, model: &str) -> Result<()> {
    let (how, hint) = match storage {
        WeightStorage::F32 => (
            "as f32",
            "; or set cpu_weights to stored (--cpu-weights stored) to hold the matrices as the files store them \
             (bf16, GGUF blocks) instead of four bytes a parameter",
        ),
        WeightStorage::Stored => (
            "as stored",
            "; or a more quantized copy of it (a Q4_K or Q4_0 GGUF, imported with cage import-gguf --keep-quantized)",
        ),
    };
    check_fits(model, &format!("its weights ({how})"), need, "in host memory", host_available()).map_err(|e| match e {
        CageError::Model { model, msg } => CageError::Model { model, msg: format!("{msg}{hint}") },
        e => e,
    })
}

/// The check before attaching or merging LoRA adapters: `need` more bytes (their A and B matrices as f32, or
/// for a merge into a matrix held in another format, that matrix's f32 copy).
pub fn check_host_more(need: u128, what: &str, model: &str) -> Result<()> {
    check_fits(model, what, need, "in host memory", host_available())
}
