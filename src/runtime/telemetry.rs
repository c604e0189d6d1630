//! Logging: human-readable by default, JSON lines when asked for, filtered by `RUST_LOG`.
//! Colours only on a terminal (a log file or a pipe gets plain text), unless asked otherwise.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// When text logs are coloured.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogColor {
    /// When writing to a terminal and `NO_COLOR` is not set.
    Auto,
    Always,
    Never,
}

pub fn init(format: LogFormat, color: LogColor) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let ansi = match color {
        LogColor::Always => true,
        LogColor::Never => false,
        LogColor::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
