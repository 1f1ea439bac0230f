//! The `agentreg` binary: parse arguments, set up logging, run the command.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use agentreg::cli::{Cli, LogFormat};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Err(e) = agentreg::cli::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
