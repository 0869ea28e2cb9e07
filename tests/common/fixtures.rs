//! Paths to the tiny fixture models, scratch folders, run configs on them, the `cage` binary, and the plain
//! greedy decoding that the decoding commands are checked against.

use cage::model::{CpuDecoder, Model};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `tests/fixtures/<name>` of this checkout, or of the current directory: scripts/gpu-bundle.sh runs the test
/// binaries from the root of a copy of the repository on the GPU machine, where the build's path does not exist.
pub fn fixture(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if built.is_dir() { built.join(name) } else { PathBuf::from("tests/fixtures").join(name) }
}

/// A fresh, empty scratch folder, unique per process and call.
pub fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "cage-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A run config on tiny-llama with its word tokenizer (`t3` ... `t127`), an ARM on LoRA a and a lexicon;
/// `extra` fields are merged in (and override).
pub fn tiny_config(extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({
        "base": fixture("tiny-llama"),
        "tokenizer": fixture("tiny-word-tokenizer"),
        "principals": [
            {"name": "adapter", "kind": "arm", "adapter": fixture("tiny-lora-a")},
            {"name": "words", "kind": "lexicon", "words": {"t5": 2.0, "t17": 1.0, "t40": -1.0}}
        ],
        "weights": [0.5, 0.5], "method": "cage", "tau": 0.1, "k": 20, "max_new_tokens": 8
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// Writes `config` as `dir/name` and returns its path.
pub fn write_json(dir: &Path, name: &str, config: &serde_json::Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, config.to_string()).unwrap();
    p
}

/// The word tokenizer's ids of a prompt like `"t3 t4 t5"` (no BOS: the fixture tokenizer adds none).
pub fn ids(prompt: &str) -> Vec<u32> {
    prompt.split_whitespace().map(|t| t[1..].parse().unwrap()).collect()
}

/// The words of token ids, as the word tokenizer spells them (`[3, 4]` -> `"t3 t4"`; EOS dropped).
pub fn words(tokens: &[u32]) -> String {
    tokens.iter().filter(|&&t| t > 2).map(|t| format!("t{t}")).collect::<Vec<_>>().join(" ")
}

/// Greedy decoding of tiny-llama alone, by the runtime's plain greedy loop on the CPU decoder (no engine, no
/// principals): the reference for the `base` method.
pub fn plain_greedy(prompt: &str, max_new_tokens: usize) -> Vec<u32> {
    let m = Arc::new(Model::load(&fixture("tiny-llama")).unwrap());
    let mut dec = CpuDecoder::new(m, 1, 64, 64);
    cage::model::greedy(&mut dec, &[&ids(prompt)[..]], &[None], max_new_tokens, &[2]).unwrap().remove(0)
}

/// What a run of the `cage` binary left: exit code, standard output and standard error.
#[derive(Debug)]
pub struct Ran {
    /// The exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ran {
    /// Panics with both streams unless the command succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "cage failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }

    /// Panics unless the command failed with exit code 1; returns its standard error.
    pub fn failed(self) -> String {
        assert_eq!(self.code, Some(1), "expected exit 1:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        // Progress lines may come first; the error is the last line.
        let last = self.stderr.trim_end().lines().last().unwrap_or("");
        assert!(last.starts_with("cage: error: "), "{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self.stderr
    }
}

/// The `cage` binary under test, with `CAGE_MODELS` pointing nowhere useful unless the caller sets it.
pub fn cage() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cage"));
    c.stdin(Stdio::null());
    c
}

/// Runs `cage args`.
pub fn run_cage<I, S>(args: I) -> Ran
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    ran(cage().args(args))
}

/// Runs a prepared command.
pub fn ran(c: &mut Command) -> Ran {
    let out = c.output().unwrap();
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// The run config `tiny_config(extra)` describes, parsed.
pub fn tiny_run_config(extra: serde_json::Value) -> cage::decode::RunConfig {
    cage::decode::RunConfig::parse(&tiny_config(extra).to_string()).unwrap()
}

/// Decodes `prompts` with the config's weights through the engine; the rows' results.
pub fn decode(cfg: &cage::decode::RunConfig, prompts: &[&str]) -> cage::Result<Vec<cage::decode::RowResult>> {
    use cage::decode::{DecodeOptions, Engine, RowRequest};
    let mut e = Engine::from_config(cfg)?;
    let opts = DecodeOptions::from_config(cfg)?;
    let rows: Vec<RowRequest> =
        prompts.iter().map(|p| RowRequest { prompt: p.to_string(), weights: cfg.weights() }).collect();
    e.prepare(&rows, opts.method)?;
    Ok(e.decode(&rows, &opts, &mut |_| {})?.0)
}

/// The generated tokens of each row.
pub fn tokens(rows: &[cage::decode::RowResult]) -> Vec<Vec<u32>> {
    rows.iter().map(|r| r.tokens.clone()).collect()
}

/// Next-token log-probabilities of tiny-llama after `seq` (f64 log-softmax of its f32 logits).
pub fn next_logprobs(model: &Arc<Model>, seq: &[u32]) -> Vec<f64> {
    use cage::model::{Decoder, LogitsAt, Seq};
    let mut dec = CpuDecoder::new(model.clone(), 1, 64, 64);
    let row = dec.forward(&[Seq { slot: 0, tokens: seq, adapter: None }], LogitsAt::Last).unwrap();
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}
