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
    /// Exit 0 if the controller of this configuration answers `/ready` (it serves and its
    /// database answers), else 1: for container health checks and scripts. Asks its listen
    /// address (loopback if it listens on every address), trusting only the certificate it
    /// serves (the configured file's, or the one it made in <data_dir>/tls/).
    Ready,
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
    /// After a breach: a new access-token signing key (written to jwt_key_file; every running
    /// controller over the database takes it from its own jwt_key_file within seconds, or
    /// refuses every token until that file holds it) and every session ended; on request,
    /// every API key revoked, every site credential revoked with a new one-time enrolment
    /// token per site, and every edge's WireGuard key rolled. See the README's "After a
    /// breach".
    RotateSecrets {
        /// Revoke every API key (make new ones with `patronus api-key create`).
        #[arg(long)]
        revoke_api_keys: bool,
        /// Revoke every site credential and unused enrolment token, and write one new
        /// one-time token per enrolled site to --tokens-out, for each edge to enrol again
        /// with (put it in the edge's <state_dir>/enroll-token).
        #[arg(long, requires = "tokens_out")]
        revoke_site_credentials: bool,
        /// Where the new enrolment tokens go (`SITE TOKEN` per line, mode 0600; the file
        /// must not exist).
        #[arg(long)]
        tokens_out: Option<PathBuf>,
        /// How long the new tokens are valid (minutes, 1 to 10080).
        #[arg(long, default_value_t = 1440)]
        token_minutes: u32,
        /// Ask every edge to roll its WireGuard key (zero-loss), connected sites one after
        /// the other, and wait for them (the controllers must be running).
        #[arg(long)]
        roll_edge_keys: bool,
        /// How long to wait for each round of key rolls (and for edges to enrol again), in
        /// seconds.
        #[arg(long, default_value_t = 300)]
        patience_s: u64,
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
    if let Some(ControllerCmd::Ready) = args.cmd {
        return ready(&config);
    }
    match args.cmd.unwrap_or(ControllerCmd::Run) {
        ControllerCmd::Ready => unreachable!("answered above"),
        ControllerCmd::Run => rt.block_on(async {
            let shutdown = patronus_controller::server::shutdown_signal()?;
            let state = patronus_controller::server::prepare(config, &env).await?;
            patronus_controller::server::serve(state, shutdown, |l| {
                let url = l.url();
                if let Some(stun) = l.stun {
                    eprintln!("controller: answering STUN Binding requests on udp {stun}");
                }
                match &l.fingerprint {
                    Some(fp) => eprintln!(
                        "controller: listening on {url}/ (API under /api/v1; log in with \
                         POST /api/v1/auth/login); certificate {fp} (pin it: patronus login \
                         --url {url} --ca-fingerprint {fp})"
                    ),
                    None => eprintln!(
                        "controller: listening on {url}/ (plain HTTP; API under /api/v1; log \
                         in with POST /api/v1/auth/login)"
                    ),
                }
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
        ControllerCmd::RotateSecrets {
            revoke_api_keys,
            revoke_site_credentials,
            tokens_out,
            token_minutes,
            roll_edge_keys,
            patience_s,
        } => rt.block_on(rotate_secrets(
            &config,
            patronus_controller::secrets::Rotation {
                revoke_api_keys,
                revoke_site_credentials,
                token_minutes,
            },
            tokens_out,
            roll_edge_keys.then(|| std::time::Duration::from_secs(patience_s)),
        )),
    }
}

/// `patronus controller rotate-secrets`: see [`patronus_controller::secrets`].
async fn rotate_secrets(
    config: &Config,
    what: patronus_controller::secrets::Rotation,
    tokens_out: Option<PathBuf>,
    roll: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    anyhow::ensure!(
        (1..=10_080).contains(&what.token_minutes),
        "--token-minutes {}: must be between 1 and 10080",
        what.token_minutes
    );
    // The tokens file first: a rotation whose tokens could not be written would leave every
    // edge locked out.
    let mut out = match &tokens_out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("--tokens-out {}", p.display()))?,
        ),
        None => None,
    };
    if let patronus_controller::config::Database::Sqlite(p) = &config.database {
        anyhow::ensure!(p.exists(), "{}: no such database", p.display());
    }
    let store = Store::connect_existing(&config.database)
        .await
        .with_context(|| format!("opening {}", config.database.display()))?;
    let actor = Actor {
        id: None,
        name: "cli".into(),
        source: "rotate-secrets".into(),
    };
    let result = async {
        let done = patronus_controller::secrets::rotate(&store, &config.jwt_key_file, what, &actor)
            .await?;
        if let (Some(f), Some(p)) = (out.as_mut(), &tokens_out) {
            for (site, token) in &done.tokens {
                writeln!(f, "{site} {token}").with_context(|| p.display().to_string())?;
            }
            f.sync_all().with_context(|| p.display().to_string())?;
        }
        if let Some(why) = &done.key_not_in_place {
            eprintln!("rotate-secrets: {why}");
        }
        outln!(
            "new signing key {} in {} (copy it, mode 0600, to every controller's \
             jwt_key_file); {} sessions ended, {} API keys revoked, {} site credentials \
             revoked, {} unused enrolment tokens expired",
            done.fingerprint,
            config.jwt_key_file.display(),
            done.sessions_ended,
            done.api_keys_revoked,
            done.credentials_revoked,
            done.tokens_expired
        );
        if let Some(p) = &tokens_out {
            outln!(
                "{} one-time enrolment tokens in {}: put each in its edge's \
                 <state_dir>/enroll-token (the edge enrols again with its key and carries on)",
                done.tokens.len(),
                p.display()
            );
        }
        anyhow::ensure!(
            done.key_not_in_place.is_none(),
            "the rotation is done but the new key is not in place (above)"
        );
        if let Some(patience) = roll {
            let rolled = patronus_controller::secrets::roll_edge_keys(
                &store,
                &actor,
                patience,
                &|m: &str| eprintln!("rotate-secrets: {m}"),
            )
            .await?;
            outln!(
                "{} edges rolled their WireGuard keys in {} rounds; {} did not{}",
                rolled.rolled.len(),
                rolled.rounds,
                rolled.not_rolled.len(),
                rolled
                    .not_rolled
                    .iter()
                    .map(|(s, why)| format!("\n  {s}: {why}"))
                    .collect::<String>()
            );
            anyhow::ensure!(
                rolled.not_rolled.is_empty(),
                "some edges did not roll their keys: run again with --roll-edge-keys once they \
                 are back"
            );
        }
        anyhow::Ok(())
    }
    .await;
    store.close().await;
    // An empty tokens file left by a rotation that failed before writing it is removed.
    if let (Err(_), Some(p)) = (&result, &tokens_out) {
        if std::fs::metadata(p).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(p);
        }
    }
    result
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

/// `patronus controller ready`: the controller of `config` answers `/ready`.
fn ready(config: &Config) -> anyhow::Result<()> {
    use patronus_controller::config::Tls;
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let cert = match &config.tls {
        Tls::Plain => None,
        Tls::Files { cert, .. } => Some(cert.clone()),
        Tls::SelfSigned { .. } => Some(config.data_dir.join("tls").join("cert.pem")),
    };
    let url = match &cert {
        None => format!("http://{addr}"),
        Some(cert) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let leaf = CertificateDer::pem_file_iter(cert)
                .and_then(|mut certs| certs.next().transpose())
                .with_context(|| format!("reading the certificate {}", cert.display()))?
                .with_context(|| format!("{}: holds no certificate", cert.display()))?;
            crate::api_client::pin(&[patronus_controller::tls::fingerprint(leaf.as_ref())])?;
            format!("https://{addr}")
        }
    };
    let r = crate::api_client::request(&url, "GET", "/ready", None, None)
        .with_context(|| format!("{url}/ready"))?;
    anyhow::ensure!(
        r.status == 200,
        "{url}/ready answered {}: {}",
        r.status,
        crate::api_client::error_text(&r)
    );
    outln!("ready");
    Ok(())
}
