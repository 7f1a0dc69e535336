//! `patronus`: one binary for every part of Patronus. `main` is plumbing: parse the command
//! line, run the command, report errors.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` for command output: when stdout is closed early (`| head`), end quietly with
/// success instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod admin_cmd;
mod api_client;
mod backup_cmd;
mod bench;
mod controller_cmd;
mod demo;
mod demo_view;
mod edge_cmd;
mod lab_cmd;
mod terminal;
mod user_cmd;

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
    /// Backups of the controller's state: create (online), list, verify, prune, keygen.
    Backup(backup_cmd::BackupArgs),
    /// Restore the controller's database from a backup (stop the controllers first).
    Restore(backup_cmd::RestoreArgs),
    /// Benchmarks; each prints one JSON object on stdout.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// The controller: the network's desired state behind an authenticated REST API.
    Controller(controller_cmd::ControllerArgs),
    /// A site's data plane: WireGuard tunnels over every WAN link pair, steered by the path
    /// engine.
    #[command(subcommand)]
    Edge(edge_cmd::EdgeCmd),
    /// A multi-site WAN in network namespaces on this machine, with emulated WAN links (root).
    #[command(subcommand)]
    Lab(lab_cmd::LabCmd),
    /// Log in to a controller (the password is prompted for without echo on a terminal, else
    /// read from stdin); the session is kept 0600 in ~/.config/patronus.
    Login(admin_cmd::LoginArgs),
    /// Sites, through the controller's API.
    #[command(subcommand)]
    Site(admin_cmd::SiteCmd),
    /// WAN links of sites, through the controller's API.
    #[command(subcommand)]
    Link(admin_cmd::LinkCmd),
    /// Traffic policies, through the controller's API.
    #[command(subcommand)]
    Policy(admin_cmd::PolicyCmd),
    /// SLA classes, through the controller's API.
    #[command(subcommand)]
    Class(admin_cmd::ClassCmd),
    /// Failover settings, through the controller's API.
    #[command(subcommand)]
    Failover(admin_cmd::FailoverCmd),
    /// Paths and what their edges measure, through the controller's API.
    #[command(subcommand)]
    Path(admin_cmd::PathCmd),
    /// Traffic the edges reported, through the controller's API.
    #[command(subcommand)]
    Traffic(admin_cmd::TrafficCmd),
    /// Webhooks: URLs told of events (signed), and how each delivery went.
    #[command(subcommand)]
    Webhook(admin_cmd::WebhookCmd),
    /// Users, their roles and passwords, through the controller's API.
    #[command(subcommand)]
    User(user_cmd::UserCmd),
    /// API keys for scripts and integrations, through the controller's API.
    #[command(subcommand)]
    ApiKey(user_cmd::ApiKeyCmd),
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (the threads it starts later inherit the
/// mask), so that one thread can take them with `sigwait` on the set returned.
fn block_shutdown_signals() -> nix::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block()?;
    Ok(signals)
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Bench(b) => bench::run(b),
        Command::Controller(c) => controller_cmd::run(c),
        Command::Backup(b) => backup_cmd::run(b),
        Command::Restore(r) => backup_cmd::restore(r),
        Command::Lab(l) => lab_cmd::run(l),
        Command::Edge(e) => edge_cmd::run(e),
        Command::Login(a) => admin_cmd::login(a),
        Command::Site(c) => admin_cmd::site(c),
        Command::Link(c) => admin_cmd::link(c),
        Command::Policy(c) => admin_cmd::policy(c),
        Command::Path(c) => admin_cmd::path(c),
        Command::Class(c) => admin_cmd::class(c),
        Command::Failover(c) => admin_cmd::failover(c),
        Command::Webhook(c) => admin_cmd::webhook(c),
        Command::Traffic(c) => admin_cmd::traffic(c),
        Command::User(c) => user_cmd::user(c),
        Command::ApiKey(c) => user_cmd::api_key(c),
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
