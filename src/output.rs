//! Standard output of the CLI without panics: `println!` panics when stdout is a closed pipe (Rust ignores
//! SIGPIPE, so the write fails with EPIPE) or a full disk. Everything the commands print goes through
//! [`out!`](crate::out) / [`outln!`](crate::outln) instead, which return a [`CageError::Io`] naming standard
//! output; `main` turns a broken pipe into a quiet exit with status 141 (what a shell reports for a tool
//! killed by SIGPIPE) and any other write error into `cage: error: writing standard output: ...`, status 1.

use crate::error::{CageError, Result};
use std::io::Write;

/// The context of every standard-output write error.
pub const STDOUT: &str = "writing standard output";

/// Exit status after standard output was closed early: 128 + SIGPIPE, as `cat` killed by the signal.
pub const BROKEN_PIPE_STATUS: u8 = 141;

/// Writes `text` to standard output and flushes it (so that streamed text appears as it is decoded).
pub fn write_stdout(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())
        .and_then(|_| o.flush())
        .map_err(|source| CageError::Io { context: STDOUT.into(), source })
}

/// Whether `e` says that standard output was closed by its reader (EPIPE).
pub fn is_broken_stdout(e: &CageError) -> bool {
    matches!(e, CageError::Io { context, source } if context == STDOUT && source.kind() == std::io::ErrorKind::BrokenPipe)
}

/// `print!` that returns a [`Result`] instead of panicking.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::output::write_stdout(&format!($($t)*)) };
}

/// `println!` that returns a [`Result`] instead of panicking.
#[macro_export]
macro_rules! outln {
    () => { $crate::output::write_stdout("\n") };
    ($($t:tt)*) => { $crate::output::write_stdout(&(format!($($t)*) + "\n")) };
}

/// For code that still prints with `println!`/`eprintln!` (and for standard error, which the progress bars
/// and messages use): a panic hook that turns the standard library's "failed printing to stdout/stderr" panic
/// into the same exits as [`write_stdout`]'s errors, instead of a backtrace and status 101.
pub fn install_print_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if let Some(rest) = msg.strip_prefix("failed printing to ") {
            if msg.contains("Broken pipe") || msg.contains("os error 32") {
                std::process::exit(BROKEN_PIPE_STATUS as i32);
            }
            // Standard error may be the stream that failed: try once, ignore the outcome.
            let _ = writeln!(std::io::stderr(), "cage: error: writing {rest}");
            std::process::exit(1);
        }
        default(info);
    }));
}
