//! `patronus bench backup`: a backup of a big controller, and what it costs the API meanwhile.
//! A real controller (its HTTP server on loopback, SQLite in a temporary directory) holds
//! `--sites` sites in hub and spoke (2 hubs) and `--samples` path samples spread over the last
//! week (written through the store, as edges' reports would leave them). Reads of the API
//! (`GET /sites?limit=1` and `GET /paths?limit=1`, one after another) are timed for a few
//! seconds alone, then while `backup create` runs as the controller runs its scheduled ones (on
//! a blocking thread of the same runtime); then the backup is verified (decrypted, restored
//! into a scratch database, checked) and restored into a fresh database. Reported: the rows,
//! the sizes, each step's time, and the reads' p50/p99 alone and during the backup, in one JSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use patronus_controller::backup;
use patronus_controller::store::{Actor, Store};
use serde_json::{Value, json};

use super::push::{BenchController, get};
use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sites (two links each, hub and spoke with 2 hubs).
    #[arg(long, default_value_t = 1000)]
    sites: usize,
    /// Path samples, spread over the last 7 days (a week of telemetry).
    #[arg(long, default_value_t = 1_000_000)]
    samples: usize,
}

/// Reads the API one request after another until `stop`; each one's time (ms).
async fn reads(addr: std::net::SocketAddr, token: String, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut out = Vec::new();
    let pages = ["/api/v1/sites?limit=1", "/api/v1/paths?limit=1"];
    while !stop.load(Ordering::Relaxed) {
        let page = pages[out.len() % 2];
        let t = Instant::now();
        match get(addr, page, &token, None).await {
            Ok((200, _, _)) => out.push(t.elapsed().as_secs_f64() * 1e3),
            // A failed read is not a fast one: the run reports none rather than lie.
            _ => return Vec::new(),
        }
    }
    out
}

fn percentiles(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * q).round() as usize]);
    json!({ "reads": v.len(), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0) })
}

async fn write_samples(store: &Store, sites: usize, samples: usize) -> anyhow::Result<()> {
    let now = patronus_controller::store::now_s();
    let week = 7 * 24 * 3600;
    let report = patronus_api::PathReport {
        peer: "hub".into(),
        local_link: "mpls".into(),
        remote_link: "mpls".into(),
        state: patronus_api::PathState::Up,
        rtt_ms: Some(21.5),
        jitter_ms: 0.4,
        loss_pct: 0.1,
        tx_bytes: 0,
        rx_bytes: 0,
        tx_packets: 0,
        rx_packets: 0,
        relayed: false,
    };
    let per_tx = 10_000;
    let mut written = 0;
    while written < samples {
        let mut tx = store.begin().await?;
        for k in written..(written + per_tx).min(samples) {
            // Eight paths per site (two links to two hubs' two links), oldest first.
            let site = (k / 8) % sites + 1;
            let path = format!("{}-{}", 2 * site - 1, k % 8);
            let at = now - week + (k as i64 * week) / samples as i64;
            patronus_controller::store::telemetry::insert_samples(
                &mut tx,
                site as i64,
                at,
                &[(&path, &report)],
            )
            .await?;
        }
        tx.commit().await?;
        written = (written + per_tx).min(samples);
    }
    Ok(())
}

async fn bench(args: &Args) -> anyhow::Result<Value> {
    let dir = std::env::temp_dir().join(format!("patronus-bench-backup-{}", std::process::id()));
    let result = async {
        progress(format_args!("a controller with {} sites", args.sites));
        let c = BenchController::start(&dir, args.sites, Some(2)).await?;
        progress(format_args!(
            "{} path samples over the last week",
            args.samples
        ));
        let t = Instant::now();
        write_samples(c.store(), args.sites, args.samples).await?;
        let populate_s = t.elapsed().as_secs_f64();
        let (identity, recipient) = backup::keygen();
        let id_file = dir.join("identity.txt");
        std::fs::write(&id_file, identity)?;
        let recipients = backup::recipients(&[recipient])?;
        let ids = backup::identities(&id_file)?;
        let backups = dir.join("backups");
        let token = c.login().await?;

        progress(format_args!("reads alone for 3 s"));
        let stop = Arc::new(AtomicBool::new(false));
        let r = tokio::spawn(reads(c.addr, token.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        let alone = r.await?;

        progress(format_args!("reads while the backup is taken"));
        let stop = Arc::new(AtomicBool::new(false));
        let r = tokio::spawn(reads(c.addr, token, stop.clone()));
        let (store, to, rs) = (c.store().clone(), backups.clone(), recipients.clone());
        let handle = tokio::runtime::Handle::current();
        let t = Instant::now();
        let m =
            tokio::task::spawn_blocking(move || handle.block_on(backup::create(&store, &to, &rs)))
                .await??;
        let create_s = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let during = r.await?;

        progress(format_args!("verify, then restore into a fresh database"));
        let t = Instant::now();
        let v = backup::verify(&backups, &m, &ids, &dir).await?;
        let verify_s = t.elapsed().as_secs_f64();
        let fresh = Store::connect(&patronus_controller::config::Database::Sqlite(
            dir.join("restored.db"),
        ))
        .await?;
        let actor = Actor {
            id: None,
            name: "bench".into(),
            source: "bench backup".into(),
        };
        let t = Instant::now();
        backup::restore(&fresh, &backups, &m, &ids, &actor, false).await?;
        let restore_s = t.elapsed().as_secs_f64();
        fresh.close().await;
        c.stop().await;
        let db_bytes = std::fs::metadata(dir.join("controller.db"))
            .map(|m| m.len())
            .ok();
        anyhow::Ok(json!({
            "sites": args.sites,
            "path_samples": args.samples,
            "rows": m.rows.iter().map(|(_, n)| n).sum::<i64>(),
            "database_bytes": db_bytes,
            "plaintext_bytes": m.plaintext_bytes,
            "backup_bytes": m.ciphertext_bytes,
            "populate_s": populate_s,
            "create_s": create_s,
            "verify_s": verify_s,
            "verified": v.integrity,
            "restore_s": restore_s,
            "reads_alone": percentiles(alone),
            "reads_during_create": percentiles(during),
        }))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        (3..=60_000).contains(&args.sites),
        "--sites: from 3 to 60000"
    );
    anyhow::ensure!(args.samples <= 50_000_000, "--samples: at most 50000000");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut r = rt.block_on(bench(args))?;
    r["bench"] = json!("backup");
    r["machine"] = super::machine();
    Ok(r)
}

pub fn summary(r: &Value) -> String {
    format!(
        "backup: {} sites, {} path samples ({} rows, {} MB of database): created in {}, {} MB \
         encrypted; verified in {}, restored in {}; API reads p50/p99 alone {}/{}, during the \
         backup {}/{}",
        r["sites"],
        r["path_samples"],
        r["rows"],
        fig(&json!(r["database_bytes"].as_f64().map(|b| b / 1e6)), 1, ""),
        fig(&r["create_s"], 2, " s"),
        fig(&json!(r["backup_bytes"].as_f64().map(|b| b / 1e6)), 1, ""),
        fig(&r["verify_s"], 2, " s"),
        fig(&r["restore_s"], 2, " s"),
        fig(&r["reads_alone"]["p50_ms"], 2, " ms"),
        fig(&r["reads_alone"]["p99_ms"], 2, " ms"),
        fig(&r["reads_during_create"]["p50_ms"], 2, " ms"),
        fig(&r["reads_during_create"]["p99_ms"], 2, " ms"),
    )
}
