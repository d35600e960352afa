//! The `leadconv` commands, one file per group. `main.rs` only parses the
//! command line and dispatches here; each command is a thin edge over the
//! library (store, queue, http, automation).

pub mod admin;
pub mod automation;
pub mod doctor;
pub mod jobs;
pub mod services;

use std::io::Write;
use std::time::Duration;

use leadconv::error::{ErrorCode, Refusal};
use serde_json::Value;

/// Reads a JSON argument given inline or as @FILE.
pub fn json_arg(name: &str, raw: &str) -> anyhow::Result<Value> {
    let text = match raw.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Refusal::new(ErrorCode::InvalidOption, name, format!("cannot read {path}: {e}")))?,
        None => raw.to_owned(),
    };
    let code = if name == "criteria" { ErrorCode::InvalidCriteria } else { ErrorCode::InvalidOption };
    serde_json::from_str(&text).map_err(|e| Refusal::new(code, name, format!("not valid JSON: {e}")).into())
}

/// A positive number of seconds, e.g. `30` or `0.5`.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

/// Prints one line of a command's output. An error (stdout closed: `leadconv
/// results | head -1`) goes back to the caller, which ends quietly on a
/// broken pipe instead of panicking like `println!`.
pub fn say(line: impl std::fmt::Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}
