//! `patronus`: one binary for every part of Patronus. `main` is plumbing: parse the command
//! line, run the command, report errors.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;

#[derive(Debug, Parser)]
#[command(
    name = "patronus",
    version,
    about = "Patronus SD-WAN",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks; each prints one JSON object on stdout.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Bench(b) => bench::run(b),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error chain on one line, without a backtrace: this is for the operator.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
