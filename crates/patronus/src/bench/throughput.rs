//! `patronus bench throughput` (root): one TCP stream (iperf3) between LAN hosts of two sites,
//! in one lab and one run: over the bare veth path with no tunnel (`raw`), through Patronus
//! edges, and through a pair of Debian `wireguard-go` peers. The sites have one link each, a
//! bare veth (no emulator), so that the tunnel is what is measured.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use patronus_api::LinkKind;
use patronus_lab::edges::{self, StockPeer, Underlay};
use patronus_lab::{Lab, LabOptions, Topology, iperf};
use serde_json::Value;

use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    // Plain routing gives the raw baseline: LAN to LAN over the veths, no tunnel. The tunnels'
    // routes (through their TUN devices) then take precedence: they are more specific than
    // the edges' default routes.
    let lab = Lab::up(
        &Topology::two_sites("bench-throughput", &[("wan", LinkKind::Other, false)]),
        LabOptions {
            plain_routing: true,
            ..Default::default()
        },
    )
    .context("building the bench lab")?;
    let (a_ns, b_ns) = (lab.ns("a/h1")?, lab.ns("b/h1")?);
    let b_host = lab.addr("b/h1", false)?;
    let tcp = |what: &str| {
        progress(format_args!("TCP for {} s {what}", args.seconds));
        iperf::tcp(&b_ns, &a_ns, b_host, None, args.seconds)
            .with_context(|| format!("iperf3 {what}"))
    };
    let raw = tcp("over the bare veth")?;

    let exe = std::env::current_exe()?;
    let started = edges::start_edges(&lab, &exe, Underlay::V4, |_| {})?;
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15))?;
    let patronus = tcp("through Patronus")?;
    // Stop the edges (their TUN devices and routes go with them) before the stock pair.
    for (_, pid) in started {
        lab.stop(pid)?;
    }

    let plan = lab.plan().clone();
    let (ka, pa) = edges::wg_keypair(&lab, "a")?;
    let (kb, pb) = edges::wg_keypair(&lab, "b")?;
    let (sa, sb) = (&plan.sites[0], &plan.sites[1]);
    let ep = |s: &patronus_lab::topology::SitePlan| {
        SocketAddr::new(s.links[0].addr4.into(), edges::EDGE_PORT)
    };
    edges::start_wireguard_go(
        &lab,
        "a",
        &ka,
        edges::overlay4(0),
        &[StockPeer {
            public_key: pb,
            endpoint: ep(sb),
            allowed: vec![format!("{}/32", edges::overlay4(1)), sb.lan4.to_string()],
        }],
    )?;
    edges::start_wireguard_go(
        &lab,
        "b",
        &kb,
        edges::overlay4(1),
        &[StockPeer {
            public_key: pa,
            endpoint: ep(sa),
            allowed: vec![format!("{}/32", edges::overlay4(0)), sa.lan4.to_string()],
        }],
    )?;
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15))?;
    let wg = tcp("through wireguard-go")?;
    lab.down()?;
    Ok(serde_json::json!({
        "bench": "throughput",
        "seconds": args.seconds,
        "patronus_gbps": patronus.gbps,
        "wireguard_go_gbps": wg.gbps,
        "raw_gbps": raw.gbps,
        "patronus_over_wireguard_go": patronus.gbps / wg.gbps,
        "patronus_over_raw": patronus.gbps / raw.gbps,
        "retransmits": {
            "patronus": patronus.retransmits,
            "wireguard_go": wg.retransmits,
            "raw": raw.retransmits,
        },
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    format!(
        "throughput, one TCP stream for {} s: Patronus {}, wireguard-go {}, bare veth {}; \
         Patronus / wireguard-go {}, Patronus / bare veth {}",
        r["seconds"],
        fig(&r["patronus_gbps"], 2, " Gbit/s"),
        fig(&r["wireguard_go_gbps"], 2, " Gbit/s"),
        fig(&r["raw_gbps"], 2, " Gbit/s"),
        fig(&r["patronus_over_wireguard_go"], 2, "x"),
        fig(&r["patronus_over_raw"], 2, "x"),
    )
}
