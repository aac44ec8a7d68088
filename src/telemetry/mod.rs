//! Telemetry of the daemon: Prometheus metrics ([`metrics`]), the HTTP endpoint with
//! `/metrics`, `/healthz` and `/readyz` ([`http`]), and logging set-up.

pub mod http;
pub mod metrics;

/// Colour codes only for a person at a terminal: in a file, a pipe or a log collector
/// they are noise.
pub fn stderr_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Installs the tracing subscriber: `level` is a filter.
pub fn init_logging(format: crate::config::LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(stderr_is_terminal());
    // A second initialisation (tests, demo) keeps the first subscriber.
    let _ =
        if format == crate::config::LogFormat::Json { builder.json().try_init() } else { builder.try_init() };
}
