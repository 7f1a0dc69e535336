//! `patronus backup` and `patronus restore`: see [`patronus_controller::backup`]. They work on
//! the controller's database directly (its configuration says where), like `controller
//! migrate`, and on the backup directory (`backup_dir`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use patronus_controller::backup::{self, Manifest, Retention};
use patronus_controller::config::Config;
use patronus_controller::store::{Actor, Store};

use crate::controller_cmd::Common;

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    cmd: BackupCmd,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum BackupCmd {
    /// Take a backup now, while the controller serves: one consistent snapshot of the whole
    /// state, encrypted to the configured recipients, with its manifest.
    Create {
        /// Into this directory [default: the configured backup_url, else backup_dir].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// An age recipient (age1…) to encrypt to, instead of the configured
        /// backup_recipients (repeat for several).
        #[arg(long = "recipient")]
        recipients: Vec<String>,
    },
    /// The backups in the directory, oldest first.
    List {
        /// A directory of backups [default: the configured backup_url, else backup_dir].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// `table` or `json`.
        #[arg(long, default_value = "table")]
        output: String,
    },
    /// Check a backup without touching the live database: its hashes, its decryption, and a
    /// restore into a scratch database with its integrity check.
    Verify {
        /// The backup [default: the newest].
        name: Option<String>,
        /// The age identity file that decrypts it.
        #[arg(long)]
        identity: PathBuf,
        /// A directory of backups [default: the configured backup_url, else backup_dir].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Delete the backups the tiered retention does not keep (the newest of each of the last
    /// N hours, days, weeks and months; counts from the configuration unless given).
    Prune {
        /// A directory of backups [default: the configured backup_url, else backup_dir].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        keep_hourly: Option<usize>,
        #[arg(long)]
        keep_daily: Option<usize>,
        #[arg(long)]
        keep_weekly: Option<usize>,
        #[arg(long)]
        keep_monthly: Option<usize>,
    },
    /// Make an age identity (written 0600 to --out; keep it away from the controller) and
    /// print its recipient, for backup_recipients.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup to restore [default: the newest, or the newest at or before --before].
    name: Option<String>,
    /// The newest backup taken at or before this time (RFC 3339, `2026-12-01T17:00:00Z`, or
    /// unix seconds).
    #[arg(long, conflicts_with = "name")]
    before: Option<String>,
    /// The age identity file that decrypts it.
    #[arg(long)]
    identity: PathBuf,
    /// A directory of backups [default: the configured backup_url, else backup_dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Replace what the database holds (required when it holds any user or site). Stop the
    /// controllers first.
    #[arg(long, conflicts_with_all = ["site", "policy", "class"])]
    replace: bool,
    /// Bring back only this site (deleted since the backup), with its links, prefixes,
    /// credentials and history, as an API write would (audited, edges told); the controllers
    /// keep serving.
    #[arg(long, conflicts_with_all = ["policy", "class"])]
    site: Option<String>,
    /// Bring back only this policy.
    #[arg(long, conflicts_with = "class")]
    policy: Option<String>,
    /// Bring back only this SLA class.
    #[arg(long)]
    class: Option<String>,
    #[command(flatten)]
    common: Common,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn actor(what: &str) -> Actor {
    Actor {
        id: None,
        name: "cli".into(),
        source: what.into(),
    }
}

pub fn run(args: BackupArgs) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = args.common.config(&env)?;
    let dest_of = |d: Option<PathBuf>| destination(&config, &env, d);
    match args.cmd {
        BackupCmd::Create { dir, recipients } => {
            let dest = dest_of(dir)?;
            let given = if recipients.is_empty() {
                config.backup_recipients.clone()
            } else {
                recipients
            };
            let recipients = backup::recipients(&given).context(
                "set backup_recipients (or PATRONUS_BACKUP_RECIPIENTS), or give --recipient",
            )?;
            let m = runtime()?.block_on(async {
                let store = open_existing(&config).await?;
                let m = dest.create(&store, &recipients).await;
                store.close().await;
                anyhow::Ok(m?)
            })?;
            outln!(
                "backup {} in {}: {} rows, {} bytes encrypted to {} recipient(s), in {} ms",
                m.name,
                dest.describe(),
                m.rows.iter().map(|(_, n)| n).sum::<i64>(),
                m.ciphertext_bytes,
                m.recipients.len(),
                m.took_ms
            );
            Ok(())
        }
        BackupCmd::List { dir, output } => {
            let dest = dest_of(dir)?;
            let all = runtime()?.block_on(dest.list())?;
            if output == "json" {
                outln!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                outln!(
                    "{:<32} {:>7} {:>10} {:>12}",
                    "NAME",
                    "SCHEMA",
                    "ROWS",
                    "BYTES"
                );
                for m in &all {
                    outln!(
                        "{:<32} {:>7} {:>10} {:>12}",
                        m.name,
                        m.schema_version,
                        m.rows.iter().map(|(_, n)| n).sum::<i64>(),
                        m.ciphertext_bytes
                    );
                }
            }
            Ok(())
        }
        BackupCmd::Verify {
            name,
            identity,
            dir,
        } => {
            let dest = dest_of(dir)?;
            let ids = backup::identities(&identity)?;
            let scratch = std::env::temp_dir();
            let v = runtime()?.block_on(async {
                let m = dest.pick(name.as_deref(), None).await?;
                let local = dest.fetch(&m, &scratch).await?;
                backup::verify(local.dir(), &m, &ids, &scratch).await
            })?;
            outln!(
                "backup {} is whole: hashes match, it decrypts, and restored into a scratch \
                 database it holds {} rows (integrity: {})",
                v.name,
                v.rows.iter().map(|(_, n)| n).sum::<i64>(),
                v.integrity
            );
            Ok(())
        }
        BackupCmd::Prune {
            dir,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
        } => {
            let r = config.backup_retention;
            let retention = Retention {
                hourly: keep_hourly.unwrap_or(r.hourly),
                daily: keep_daily.unwrap_or(r.daily),
                weekly: keep_weekly.unwrap_or(r.weekly),
                monthly: keep_monthly.unwrap_or(r.monthly),
            };
            let dest = dest_of(dir)?;
            let (gone, kept) = runtime()?.block_on(async {
                let gone = dest.prune(&retention).await?;
                anyhow::Ok((gone, dest.list().await?.len()))
            })?;
            for g in &gone {
                outln!("deleted {g}");
            }
            outln!("{} deleted, {} kept", gone.len(), kept);
            Ok(())
        }
        BackupCmd::Keygen { out } => {
            let (identity, recipient) = backup::keygen();
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("{}: writing the identity", out.display()))?;
            f.write_all(identity.as_bytes())?;
            eprintln!(
                "identity written to {} (0600): keep it away from the controller; only \
                 `verify` and `restore` need it",
                out.display()
            );
            outln!("{recipient}");
            Ok(())
        }
    }
}

/// Where backups are: `--dir` if given, else the configured destination (`backup_url`, or
/// `backup_dir`).
fn destination(
    config: &Config,
    env: &[(String, String)],
    dir: Option<PathBuf>,
) -> anyhow::Result<backup::Destination> {
    Ok(match dir {
        Some(d) => backup::Destination::Dir(d),
        None => backup::Destination::from_config(config, env)?,
    })
}

/// The configured database, which must exist (an SQLite file not there would be made empty).
async fn open_existing(config: &Config) -> anyhow::Result<Store> {
    if let patronus_controller::config::Database::Sqlite(p) = &config.database {
        anyhow::ensure!(p.exists(), "{}: no such database", p.display());
    }
    Store::connect_existing(&config.database)
        .await
        .with_context(|| format!("opening {}", config.database.display()))
}

/// `patronus restore`.
pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = args.common.config(&env)?;
    let dest = destination(&config, &env, args.dir.clone())?;
    let before = args.before.as_deref().map(parse_time).transpose()?;
    let ids = backup::identities(&args.identity)?;
    let scratch = std::env::temp_dir();
    let rt = runtime()?;
    let (m, local): (Manifest, _) = rt.block_on(async {
        let m = dest.pick(args.name.as_deref(), before).await?;
        let local = dest.fetch(&m, &scratch).await?;
        anyhow::Ok((m, local))
    })?;
    let dir = local.dir();
    let one = [
        (backup::ObjectKind::Site, &args.site),
        (backup::ObjectKind::Policy, &args.policy),
        (backup::ObjectKind::Class, &args.class),
    ]
    .into_iter()
    .find_map(|(k, n)| n.clone().map(|n| (k, n)));
    if let Some((kind, name)) = one {
        return rt.block_on(async {
            let store = open_existing(&config).await?;
            let restored = backup::restore_object(
                &store,
                dir,
                &m,
                &ids,
                kind,
                &name,
                &actor("patronus restore"),
            )
            .await;
            store.close().await;
            let r = restored?;
            outln!(
                "restored {kind:?} {name} (id {}) from {}: {}",
                r.id,
                m.name,
                r.rows
                    .iter()
                    .map(|(t, n)| format!("{n} {t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            anyhow::Ok(())
        });
    }
    rt.block_on(async {
        if let patronus_controller::config::Database::Sqlite(p) = &config.database {
            patronus_controller::store::create_private_dir(
                p.parent().unwrap_or(std::path::Path::new(".")),
            )?;
        }
        let store = Store::connect(&config.database)
            .await
            .with_context(|| format!("opening {}", config.database.display()))?;
        let restored = backup::restore(
            &store,
            dir,
            &m,
            &ids,
            &actor("patronus restore"),
            args.replace,
        )
        .await;
        store.close().await;
        let s = restored?;
        outln!(
            "restored {} into {}: {} rows (taken on {} at schema {}); start the controller",
            m.name,
            config.database.display(),
            s.rows.iter().map(|(_, n)| n).sum::<i64>(),
            s.backend,
            s.schema_version
        );
        eprintln!(
            "note: what was revoked after {} (API keys, sessions, site credentials) is valid \
             again; if the backup is older than a breach, run `patronus controller \
             rotate-secrets` again before serving",
            m.name
        );
        if !config.jwt_key_file.exists() {
            // A backup holds no signing key: whoever can read one could forge tokens else.
            eprintln!(
                "{} is missing: put back the signing key kept with your identity, or start the \
                 controller once with PATRONUS_REPLACE_SIGNING_KEY=1 (every session ends; \
                 users log in again)",
                config.jwt_key_file.display()
            );
        }
        anyhow::Ok(())
    })
}

/// RFC 3339 UTC (`2026-12-01T17:00:00Z`) or unix seconds, as unix ms.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(secs) = s.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .filter(|ms| *ms >= 0)
            .ok_or_else(|| anyhow::anyhow!("--before {s}: out of range"));
    }
    let bad = || {
        anyhow::anyhow!("--before {s:?}: give RFC 3339 UTC (2026-12-01T17:00:00Z) or unix seconds")
    };
    let s = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = s.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let t: Vec<i64> = time
        .split(':')
        .map(|x| x.split('.').next().unwrap_or("").parse())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let ([y, mo, da], [h, mi, se]) = (d.as_slice(), t.as_slice()) else {
        return Err(bad());
    };
    let ok = (1970..=9999).contains(y)
        && (1..=12).contains(mo)
        && (1..=31).contains(da)
        && (0..=23).contains(h)
        && (0..=59).contains(mi)
        && (0..=60).contains(se);
    anyhow::ensure!(ok, "{}", bad());
    // Days from civil (the inverse of `backup::civil`).
    let (y, mo) = if *mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (*y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 24 + h) * 60 + mi) * 60_000 + se * 1000;
    anyhow::ensure!(backup::name_of(ms).len() == 29, "{}", bad());
    Ok(ms)
}

#[cfg(test)]
mod tests {
    #[test]
    fn before_takes_rfc3339_or_unix_seconds() {
        assert_eq!(super::parse_time("1700000000").unwrap(), 1_700_000_000_000);
        assert_eq!(
            super::parse_time("2026-12-02T12:17:29Z").unwrap(),
            1_796_213_849_000
        );
        assert_eq!(super::parse_time("1970-01-01T00:00:00Z").unwrap(), 0);
        assert!(super::parse_time("yesterday").is_err());
        assert!(super::parse_time("2026-12-02 12:37").is_err());
        assert!(super::parse_time("2026-13-02T12:17:29Z").is_err());
        assert!(super::parse_time("2026-12-02T25:17:29Z").is_err());
        assert!(super::parse_time("9223372036854775807").is_err());
    }
}
