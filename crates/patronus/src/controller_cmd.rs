//! `patronus controller`: serve the API, or manage its database offline.

use std::io::{BufRead, IsTerminal};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use patronus_controller::auth::Role;
use patronus_controller::config::{Config, Overrides};
use patronus_controller::routes::users::{NewUser, add_user};
use patronus_controller::store::{Actor, Store};

#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(subcommand)]
    cmd: Option<ControllerCmd>,
    #[command(flatten)]
    common: Common,
}

/// Where the configuration and the state are; for every subcommand.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// A TOML configuration file (see crates/patronus-controller/controller.example.toml);
    /// also PATRONUS_CONFIG.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Directory for the database and signing key [default: /var/lib/patronus].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// The database: an SQLite file (a path or sqlite://PATH) or postgres://… (prefer the
    /// `database` key or PATRONUS_DATABASE for a URL with a password: arguments are public)
    /// [default: DATA_DIR/controller.db].
    #[arg(long, global = true)]
    database: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ControllerCmd {
    /// Serve the API (what `patronus controller` alone does).
    Run,
    /// Add a user to the database directly, without the API (the first admin, or a way back
    /// in). Reads the password from the first line of stdin.
    AddUser {
        #[arg(long)]
        email: String,
        /// admin, operator or viewer.
        #[arg(long, default_value = "admin")]
        role: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Copy the whole state (users, keys, sites, credentials, history, audit, webhooks and
    /// their deliveries) into a fresh PostgreSQL database, ids and all: then point the
    /// controller at it and start it; edges reconnect by themselves. Stop the controller
    /// first: what it writes after the copy's snapshot is not copied.
    Migrate {
        /// The source [default: the configured database].
        #[arg(long)]
        from: Option<String>,
        /// The target, postgres://… [default: PATRONUS_MIGRATE_TO, which keeps a password off
        /// the command line].
        #[arg(long)]
        to: Option<String>,
    },
}

impl Common {
    /// The configuration: the file, then `env`, then these flags.
    pub(crate) fn config(&self, env: &[(String, String)]) -> anyhow::Result<Config> {
        let file = self
            .config
            .clone()
            .or_else(|| std::env::var_os("PATRONUS_CONFIG").map(PathBuf::from));
        Ok(Config::load(
            file.as_deref(),
            env.to_vec(),
            &Overrides {
                listen: self.listen,
                data_dir: self.data_dir.clone(),
                database: self.database.clone(),
            },
        )?)
    }
}

pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = args.common.config(&env)?;
    tracing_subscriber::fmt()
        .with_target(false)
        .with_max_level(config.log_level)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match args.cmd.unwrap_or(ControllerCmd::Run) {
        ControllerCmd::Run => rt.block_on(async {
            let shutdown = patronus_controller::server::shutdown_signal()?;
            let state = patronus_controller::server::prepare(config, &env).await?;
            patronus_controller::server::serve(state, shutdown, |addr| {
                eprintln!(
                    "controller: listening on http://{addr}/ (API under /api/v1; log in \
                         with POST /api/v1/auth/login)"
                )
            })
            .await
        }),
        ControllerCmd::AddUser { email, role, name } => rt.block_on(async {
            let role = Role::parse(&role)
                .with_context(|| format!("--role {role}: must be admin, operator or viewer"))?;
            let mut password = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut password)
                .context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\r', '\n']).to_owned();
            patronus_controller::store::create_private_dir(&config.data_dir)?;
            let store = Store::connect(&config.database).await?;
            let actor = Actor {
                id: None,
                name: "cli".into(),
                source: "local".into(),
            };
            let u = add_user(
                &store,
                &actor,
                NewUser {
                    email,
                    name,
                    role,
                    password,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            outln!("added user {} ({}) with id {}", u.email, u.role, u.id);
            Ok(())
        }),
        ControllerCmd::Migrate { from, to } => rt.block_on(migrate(&config, from, to)),
    }
}

/// `patronus controller migrate`: see [`patronus_controller::store::copy`].
async fn migrate(config: &Config, from: Option<String>, to: Option<String>) -> anyhow::Result<()> {
    use patronus_controller::config::Database;
    let from = match from {
        Some(f) => Database::parse(&f).map_err(|e| anyhow::anyhow!("--from: {e}"))?,
        None => config.database.clone(),
    };
    let to = to
        .or_else(|| std::env::var("PATRONUS_MIGRATE_TO").ok())
        .context("give the target with --to or PATRONUS_MIGRATE_TO")?;
    let to = Database::parse(&to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    if !matches!(to, Database::Postgres(_)) {
        anyhow::bail!("--to {}: the target must be postgres://…", to.display());
    }
    if let Database::Sqlite(path) = &from {
        // Opening would make an empty database and copy nothing.
        anyhow::ensure!(path.exists(), "--from {}: no such file", path.display());
    }
    let source = Store::connect(&from)
        .await
        .with_context(|| format!("opening the source {}", from.display()))?;
    let target = Store::connect(&to)
        .await
        .with_context(|| format!("opening the target {}", to.display()))?;
    let actor = Actor {
        id: None,
        name: "cli".into(),
        source: "local".into(),
    };
    let copied = patronus_controller::store::copy::copy_all(&source, &target, &actor)
        .await
        .with_context(|| format!("copying {} into {}", from.display(), to.display()))?;
    for (table, rows) in &copied {
        outln!("{table:<20} {rows:>10} rows");
    }
    outln!(
        "copied {} into {} (schema {}); set `database` to it and start the controller",
        from.display(),
        to.display(),
        target.schema_version().await?
    );
    source.close().await;
    target.close().await;
    Ok(())
}

/// Raises the open-file soft limit to the hard limit: every client connection is a descriptor,
/// and the default soft limit (often 1024) is far below what a controller serving many edges
/// needs. The controller still caps its connections below the limit it ends up with.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-file limit"),
    }
}
