//! The `dlsr` binary: load the CUDA backend if present, parse arguments, set up logging,
//! run the subcommand, map errors to exit codes (0 ok, 1 failure, 2 usage).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    dlsr::memory::limit_malloc_arenas();
    // Before any tch call: a CUDA libtorch must be loaded before tensors exist.
    dlsr::device::init_backends();
    let cli = dlsr::cli::Cli::parse();
    // `serve` logs as its configuration says; everything else as the flags say.
    if !matches!(cli.command, dlsr::cli::Command::Serve(_)) {
        let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("warn"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(dlsr::telemetry::stderr_is_terminal());
        if cli.log_json {
            builder.json().init();
        } else {
            builder.init();
        }
    }
    match dlsr::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
