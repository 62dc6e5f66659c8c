//! Logging set-up: `RUST_LOG` filters (default `info`), `LOG_FORMAT` picks the format.
//!
//! A log line that cannot be written (stdout piped into a reader that has exited) is
//! dropped silently: tracing-subscriber would otherwise report it on stderr with
//! `eprintln!`, which panics when stderr is gone too — in whatever task was logging, the
//! shutdown's included.

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, from `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
}
