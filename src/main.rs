//! The `agentreg` binary: parse arguments, set up logging, run the command.

use agentreg::cli::Cli;
use clap::Parser;

fn main() {
    let cli = Cli::parse();
    agentreg::cli::logging::init(cli.log_format);
    if let Err(e) = agentreg::cli::main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(agentreg::cli::exit_status(&e));
    }
}
