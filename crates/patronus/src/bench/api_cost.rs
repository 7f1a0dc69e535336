//! `patronus bench api-cost`: what one API request costs as the network grows. For each size in
//! `--sites`, a real controller (its HTTP server on loopback, its SQLite store in a temporary
//! directory) holds that many sites with two links each (written through the store, as in
//! `bench mesh`), and the same requests are timed one after another over HTTP: `POST /sites`
//! (a new site with two links), `GET /sites?limit=1`, `GET /paths?limit=1` and
//! `GET /paths/{id}`. A page or an object should cost what it returns, not what the database
//! holds: the report gives each request's median at each size and the ratio of the largest
//! size's median to the smallest's, from one run.

use std::time::Instant;

use serde_json::{Value, json};

use super::push::{BenchController, get, post};
use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Network sizes (sites), comma-separated.
    #[arg(long, default_value = "10,1000", value_delimiter = ',')]
    sites: Vec<usize>,
    /// Requests of each kind at each size.
    #[arg(long, default_value_t = 50)]
    requests: usize,
}

/// The median of `v` (ms), or none.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

async fn one_size(n: usize, requests: usize) -> anyhow::Result<Value> {
    let dir = std::env::temp_dir().join(format!(
        "patronus-bench-api-cost-{}-{n}",
        std::process::id()
    ));
    progress(format_args!("a controller with {n} sites"));
    let c = BenchController::start(&dir, n, None).await?;
    let (addr, token) = (c.addr, c.login().await?);
    let (status, _, _) = get(addr, "/api/v1/paths?limit=1", &token, None).await?;
    anyhow::ensure!(status == 200, "GET /paths: {status}");
    // A path that exists: between the first two sites' first links (ids 1 and 3).
    let path = "/api/v1/paths/1-3";
    let mut times: [Vec<f64>; 4] = Default::default();
    for k in 0..requests {
        let site = json!({
            "name": format!("cost-{k}"),
            "lan_prefixes": [format!("172.16.{k}.0/24")],
            "links": [
                { "name": "mpls", "kind": "mpls" },
                { "name": "inet", "kind": "broadband" }
            ]
        });
        let t = Instant::now();
        let (status, _) = post(addr, "/api/v1/sites", Some(&token), &site).await?;
        times[0].push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(status == 201, "POST /sites: {status}");
        for (i, p) in ["/api/v1/sites?limit=1", "/api/v1/paths?limit=1", path]
            .iter()
            .enumerate()
        {
            let t = Instant::now();
            let (status, _, _) = get(addr, p, &token, None).await?;
            times[i + 1].push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(status == 200, "GET {p}: {status}");
        }
    }
    c.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    let [a, b, c, d] = times;
    Ok(json!({
        "sites": n,
        "post_sites_ms": median(a),
        "get_sites_page_ms": median(b),
        "get_paths_page_ms": median(c),
        "get_path_ms": median(d),
    }))
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        !args.sites.is_empty() && args.sites.iter().all(|n| (2..=60_000).contains(n)),
        "--sites: sizes from 2 to 60000"
    );
    anyhow::ensure!(
        (1..=200).contains(&args.requests),
        "--requests must be 1 to 200"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let sizes: Vec<Value> = rt.block_on(async {
        let mut v = Vec::new();
        for n in &args.sites {
            v.push(one_size(*n, args.requests).await?);
        }
        anyhow::Ok(v)
    })?;
    let ratio = |k: &str| {
        let first = sizes.first()?[k].as_f64()?;
        let last = sizes.last()?[k].as_f64()?;
        (first > 0.0).then(|| last / first)
    };
    Ok(json!({
        "bench": "api-cost",
        "requests": args.requests,
        "sizes": sizes,
        "largest_over_smallest": {
            "post_sites": ratio("post_sites_ms"),
            "get_sites_page": ratio("get_sites_page_ms"),
            "get_paths_page": ratio("get_paths_page_ms"),
            "get_path": ratio("get_path_ms"),
        },
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    let sizes = r["sizes"].as_array().cloned().unwrap_or_default();
    let row = |s: &Value| {
        format!(
            "{} sites: POST /sites {}, GET /sites?limit=1 {}, GET /paths?limit=1 {}, GET /paths/{{id}} {}",
            s["sites"],
            fig(&s["post_sites_ms"], 2, " ms"),
            fig(&s["get_sites_page_ms"], 2, " ms"),
            fig(&s["get_paths_page_ms"], 2, " ms"),
            fig(&s["get_path_ms"], 2, " ms"),
        )
    };
    let q = &r["largest_over_smallest"];
    format!(
        "api-cost (medians of {} requests):\n  {}\n  largest over smallest: POST /sites {}, GET /sites {}, GET /paths {}, GET /paths/{{id}} {}",
        r["requests"],
        sizes.iter().map(row).collect::<Vec<_>>().join("\n  "),
        fig(&q["post_sites"], 2, "x"),
        fig(&q["get_sites_page"], 2, "x"),
        fig(&q["get_paths_page"], 2, "x"),
        fig(&q["get_path"], 2, "x"),
    )
}
