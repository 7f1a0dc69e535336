//! `patronus bench mesh`: N sites with two links each in a real controller store (SQLite in a
//! temporary directory), then every site's configuration compiled for a full mesh and for hub
//! and spoke, timed, sized and weighed.
//!
//! The sites are written straight into the store in one transaction, as the API's create and
//! an edge's enrolment would leave them: names, LAN prefixes, two links with endpoints, an
//! overlay address, and a public key made for the benchmark (32 random bytes; the controller
//! never sees a private key either way).

use std::time::Instant;

use anyhow::Context;
use patronus_controller::compile::{Network, compile};
use patronus_controller::store::{Store, now_s};
use serde_json::{Value, json};

use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sites in the network.
    #[arg(long, default_value_t = 1000)]
    sites: usize,
    /// Hubs for the hub-and-spoke run.
    #[arg(long, default_value_t = 2)]
    hubs: usize,
    /// Which topologies to compile: `full-mesh`, `hub-spoke` or `both` (a full mesh of 10,000
    /// sites holds 200 million path entries: run that size with `hub-spoke`).
    #[arg(long, default_value = "both")]
    topology: String,
}

/// This process's resident memory, MiB.
fn rss_mb() -> Option<f64> {
    super::proc_status_kb(None, "VmRSS:").map(|kb| kb as f64 / 1024.0)
}

pub(super) async fn populate(store: &Store, n: usize) -> anyhow::Result<Vec<String>> {
    use patronus_controller::store::{enrollment, sites, topology};
    let now = now_s();
    let mut tx = store.begin().await?;
    let mut credentials = Vec::with_capacity(n);
    for i in 0..n {
        let (hi, lo) = (i / 256, i % 256);
        let spec: sites::SiteSpec = serde_json::from_value(json!({
            "name": format!("site-{i:05}"),
            "lan_prefixes": [format!("10.{hi}.{lo}.0/24")],
        }))?;
        let id = sites::insert(&mut tx, &spec, now).await?;
        for (j, (name, kind)) in [("mpls", "mpls"), ("inet", "broadband")].iter().enumerate() {
            let link: patronus_api::Link = serde_json::from_value(json!({
                "name": name,
                "kind": kind,
                "endpoint": format!("100.{}.{}.{}:{}", 64 + j * 16 + hi / 256, hi % 256, lo, 51820),
                "up_kbps": 100_000,
                "down_kbps": 100_000,
            }))?;
            sites::insert_link(&mut tx, id, &link, now).await?;
        }
        topology::allocate(&mut tx, id)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        // Enrolled: a key made for the benchmark and a site credential.
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).context("random key")?;
        let mut b = [0u8; 32];
        getrandom::getrandom(&mut b).context("random credential")?;
        let c = format!("psc_{}", patronus_controller::auth::b64url(&b));
        let hash = patronus_controller::auth::sha256(c.as_bytes());
        enrollment::enrol(
            &mut tx,
            id,
            &patronus_api::key_to_base64(&key),
            &hash[..],
            now,
        )
        .await?;
        credentials.push(c);
    }
    tx.commit().await?;
    Ok(credentials)
}

/// Makes the topology hub and spoke with the first `hubs` sites as hubs.
pub(super) async fn hub_and_spoke(store: &Store, hubs: usize) -> anyhow::Result<()> {
    use patronus_controller::store::topology;
    let mut tx = store.begin().await?;
    let cur = topology::load(&mut tx)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let first: std::collections::BTreeSet<i64> = topology::site_names(&mut tx)
        .await?
        .into_keys()
        .take(hubs)
        .collect();
    topology::update(
        &mut tx,
        cur.version,
        topology::Mode::HubSpoke,
        &cur.overlay_prefix,
        &first,
        now_s(),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Loads the network and compiles every configuration; the configurations are kept while the
/// memory is read, as a controller serving them keeps them.
async fn run_one(store: &Store, rss_before: Option<f64>) -> anyhow::Result<Value> {
    let t = Instant::now();
    let net = Network::load(store)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let configs = compile(&net).map_err(|e| anyhow::anyhow!(e.message))?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let bytes: usize = configs.iter().map(|c| c.len()).sum();
    let largest = configs.iter().map(|c| c.len()).max().unwrap_or(0);
    // Every configuration laid out as it is sent, one at a time, through one buffer.
    let t = Instant::now();
    let mut buf = Vec::new();
    let mut written = 0usize;
    for c in &configs {
        buf.clear();
        c.write_to(&mut buf);
        written += buf.len();
    }
    let serialize_ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(written == bytes);
    let pairs = patronus_controller::routes::topology::connected_pairs(&net.topology, &net.sites);
    let paths: usize = pairs
        .iter()
        .map(|(a, b)| a.links.len() * b.links.len())
        .sum();
    let rss = rss_mb();
    let n = configs.len().max(1) as f64;
    Ok(json!({
        "configurations": configs.len(),
        "paths": paths,
        "load_ms": load_ms,
        "compile_ms": compile_ms,
        "write_out_ms": serialize_ms,
        "bytes_per_site": bytes as f64 / n,
        "largest_bytes": largest,
        "rss_mb": rss,
        "rss_kb_per_site": rss.map(|r| r * 1024.0 / n),
        "rss_growth_mb": rss.zip(rss_before).map(|(a, b)| a - b),
    }))
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        (1..=60_000).contains(&args.sites),
        "--sites must be 1 to 60000 (LAN prefixes are 10.x.y.0/24 below the overlay's 10.255.0.0/16)"
    );
    anyhow::ensure!(
        args.hubs >= 1 && args.hubs <= args.sites,
        "--hubs must be 1 to --sites"
    );
    let dir = std::env::temp_dir().join(format!("patronus-bench-mesh-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let rss_start = rss_mb();
        progress(format_args!("writing {} sites into a store", args.sites));
        let store = Store::open(&dir.join("controller.db")).await?;
        let t = Instant::now();
        populate(&store, args.sites).await?;
        let populate_ms = t.elapsed().as_secs_f64() * 1e3;
        let (mesh, spoke) = match args.topology.as_str() {
            "both" => (true, true),
            "full-mesh" => (true, false),
            "hub-spoke" => (false, true),
            other => anyhow::bail!("--topology {other}: full-mesh, hub-spoke or both"),
        };
        let full_mesh = if mesh {
            progress(format_args!("compiling every configuration, full mesh"));
            run_one(&store, rss_start).await?
        } else {
            Value::Null
        };
        let hub_spoke = if spoke {
            hub_and_spoke(&store, args.hubs).await?;
            progress(format_args!(
                "compiling every configuration, hub and spoke ({} hubs)",
                args.hubs
            ));
            run_one(&store, rss_start).await?
        } else {
            Value::Null
        };
        store.close().await;
        // The headline figures at the top: the full mesh's when it ran (the harder case),
        // else the hub and spoke's; both in full below.
        let (topology, head) = if full_mesh.is_null() {
            ("hub-spoke", &hub_spoke)
        } else {
            ("full-mesh", &full_mesh)
        };
        let mut out = json!({
            "bench": "mesh",
            "sites": args.sites,
            "topology": topology,
            "links_per_site": 2,
            "hubs": args.hubs,
            "populate_ms": populate_ms,
            "machine": super::machine(),
        });
        for key in [
            "paths",
            "compile_ms",
            "rss_mb",
            "bytes_per_site",
            "rss_kb_per_site",
        ] {
            out[key] = head[key].clone();
        }
        out["full_mesh"] = full_mesh;
        out["hub_spoke"] = hub_spoke;
        anyhow::Ok(out)
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn summary(r: &Value) -> String {
    let one = |name: &str, t: &Value| {
        if t.is_null() {
            return String::new();
        }
        format!(
            "\n  {name}: {} paths, compiled in {}, {} per site, {} resident ({} per site)",
            t["paths"],
            fig(&t["compile_ms"], 1, " ms"),
            fig(&t["bytes_per_site"], 0, " bytes"),
            fig(&t["rss_mb"], 0, " MB"),
            fig(&t["rss_kb_per_site"], 1, " KB"),
        )
    };
    format!(
        "mesh: {} sites{}{}",
        r["sites"],
        one("full mesh", &r["full_mesh"]),
        one("hub and spoke", &r["hub_spoke"]),
    )
}
