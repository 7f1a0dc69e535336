//! `patronus bench throughput` (root): one TCP stream (iperf3) between LAN hosts of two sites,
//! in one lab and one run: over the bare veth path with no tunnel (`raw`), through Patronus
//! edges, and through a pair of Debian `wireguard-go` peers. The sites have one link each, a
//! bare veth (no emulator), so that the tunnel is what is measured. Then once more through
//! Patronus while a handshake flood (`--flood-rate` initiations a second with a valid MAC1 for
//! b's key, spoofed from a's endpoint, sent from the WAN between them) hits b's link: the ratio
//! of the two Patronus runs is what the flood costs the traffic.
//!
//! Beside the bare veth, the run measures a bound that the CPU alone sets: how fast one core
//! seals and opens WireGuard data messages of the tunnel's MTU with the edge's own code, and
//! what all the machine's cores could carry if they did nothing else (see
//! `patronus_edge::crypto_rate`). The bare veth's rate is set by the kernel's forwarding and
//! moves with the host (11.0 to 12.7 Gbit/s on one 2-vCPU guest from one run to the next); the
//! ratio to the crypto bound says how much of the CPU's cryptographic speed the tunnel turns
//! into traffic.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use patronus_api::LinkKind;
use patronus_lab::edges::{self, StockPeer, Underlay};
use patronus_lab::{Lab, LabOptions, Topology, flood, iperf, netns};
use serde_json::Value;

use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Handshake initiations a second in the flood run; 0 skips that run.
    #[arg(long, default_value_t = 50_000)]
    flood_rate: u64,
}

/// b's edge status (`patronus edge status --json` in b).
fn b_status(lab: &Lab, exe: &std::path::Path) -> anyhow::Result<Value> {
    let out = lab.exec(
        "b",
        &[
            exe.to_str().unwrap_or("patronus"),
            "edge",
            "status",
            "--json",
        ],
    )?;
    anyhow::ensure!(out.status.success(), "edge status in b failed");
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// One Patronus run under a handshake flood at `rate` to `port` of b's link, spoofed from a's
/// endpoint: the throughput, how many initiations went, and what b's edge did with them. To the
/// edge's port it measures what the flood costs through the edge; to a closed port, what the
/// same packets cost the machine without the edge (the attacker's sending, the kernel's
/// forwarding and dropping, all on the same two cores).
fn under_flood(
    lab: &Lab,
    exe: &std::path::Path,
    b_key: [u8; 32],
    (rate, port): (u64, u16),
    tcp: &dyn Fn(&str) -> anyhow::Result<iperf::Throughput>,
    seconds: u32,
) -> anyhow::Result<(iperf::Throughput, u64, Value)> {
    let plan = lab.plan();
    let (a, b) = (&plan.sites[0].links[0], &plan.sites[1].links[0]);
    let src = SocketAddrV4::new(a.addr4, edges::EDGE_PORT);
    let dst = SocketAddrV4::new(b.addr4, port);
    let pkts = flood::initiations(b_key, src, dst, 1000);
    let wan = lab.ns("wan")?;
    let counters = || -> anyhow::Result<Value> { Ok(b_status(lab, exe)?["counters"].clone()) };
    let before = counters()?;
    let stop = AtomicBool::new(false);
    let (sent, r) = std::thread::scope(|s| {
        let f = s.spawn(|| {
            netns::run_in::<_, anyhow::Error>(&wan, || {
                Ok(flood::send(
                    &pkts,
                    dst,
                    rate,
                    Duration::from_secs(u64::from(seconds) + 30),
                    &stop,
                )?)
            })
        });
        // The flood runs a second before the stream starts, and until it ends.
        std::thread::sleep(Duration::from_secs(1));
        let r = tcp(&format!(
            "through Patronus under a flood of {rate} handshake initiations/s to port {port}"
        ));
        stop.store(true, Ordering::Relaxed);
        let sent = f
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"))?;
        anyhow::Ok((sent?, r))
    })?;
    let after = counters()?;
    let mut b_did = serde_json::Map::new();
    for k in [
        "handshakes_admitted",
        "handshake_cookies_sent",
        "handshakes_dropped",
    ] {
        let d = after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
        b_did.insert(k.into(), serde_json::json!(d));
    }
    Ok((r?, sent, Value::Object(b_did)))
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
    // The crypto bound, with the edges idle: at the TUN's MTU, the size of a full segment.
    let mtu = b_status(&lab, &exe)?["tun_mtu"]
        .as_u64()
        .context("b's status has no tun_mtu")? as usize;
    progress(format_args!(
        "sealing and opening {mtu}-byte packets on one core for 2 s"
    ));
    let crypto = patronus_edge::crypto_rate::measure(mtu, Duration::from_secs(2))
        .map_err(|e| anyhow::anyhow!("measuring the crypto bound: {e}"))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ceiling_gbps = crypto.ceiling_bits_per_s(cores) / 1e9;
    let b_key = started
        .first()
        .and_then(|(cfg, _)| cfg.peers.first())
        .map(|p| p.public_key.0)
        .context("a's configuration has no peer")?;
    let flood = |port| {
        under_flood(
            &lab,
            &exe,
            b_key,
            (args.flood_rate, port),
            &tcp,
            args.seconds,
        )
    };
    let (flooded, control) = if args.flood_rate > 0 {
        // Port 9 (discard): nothing listens on b's link there.
        (Some(flood(edges::EDGE_PORT)?), Some(flood(9)?))
    } else {
        (None, None)
    };
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
        "crypto_bound": {
            "packet_bytes": crypto.packet_bytes,
            "seal_gbps_one_core": crypto.seal_bytes_per_s * 8.0 / 1e9,
            "open_gbps_one_core": crypto.open_bytes_per_s * 8.0 / 1e9,
            "cores": cores,
            "gbps": ceiling_gbps,
        },
        "patronus_over_crypto_bound": patronus.gbps / ceiling_gbps,
        "flood": flooded.as_ref().map(|(r, sent, b)| serde_json::json!({
            "rate_per_s": args.flood_rate,
            "initiations_sent": sent,
            "b_edge": b,
            "patronus_gbps": r.gbps,
            "retransmits": r.retransmits,
            "over_no_flood": r.gbps / patronus.gbps,
            "over_closed_port": control.as_ref().map(|(c, _, _)| r.gbps / c.gbps),
            "same_flood_to_a_closed_port": control.as_ref().map(|(c, sent, _)| serde_json::json!({
                "initiations_sent": sent,
                "patronus_gbps": c.gbps,
                "over_no_flood": c.gbps / patronus.gbps,
            })),
        })),
        "retransmits": {
            "patronus": patronus.retransmits,
            "wireguard_go": wg.retransmits,
            "raw": raw.retransmits,
        },
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    let flood = &r["flood"];
    let flood = if flood.is_null() {
        String::new()
    } else {
        format!(
            "; under {} handshake initiations/s: Patronus {} ({} of the run without; b answered \
             {}, dropped {}); the same flood to a closed port: {} ({}); flood to the edge over \
             flood to a closed port {}",
            flood["rate_per_s"],
            fig(&flood["patronus_gbps"], 2, " Gbit/s"),
            fig(&flood["over_no_flood"], 2, "x"),
            flood["b_edge"]["handshake_cookies_sent"],
            flood["b_edge"]["handshakes_dropped"],
            fig(
                &flood["same_flood_to_a_closed_port"]["patronus_gbps"],
                2,
                " Gbit/s"
            ),
            fig(
                &flood["same_flood_to_a_closed_port"]["over_no_flood"],
                2,
                "x"
            ),
            fig(&flood["over_closed_port"], 2, "x"),
        )
    };
    format!(
        "throughput, one TCP stream for {} s: Patronus {}, wireguard-go {}, bare veth {}; \
         Patronus / wireguard-go {}, Patronus / bare veth {}; crypto bound of {} cores {} \
         (one core seals {}, opens {}), Patronus / crypto bound {}{flood}",
        r["seconds"],
        fig(&r["patronus_gbps"], 2, " Gbit/s"),
        fig(&r["wireguard_go_gbps"], 2, " Gbit/s"),
        fig(&r["raw_gbps"], 2, " Gbit/s"),
        fig(&r["patronus_over_wireguard_go"], 2, "x"),
        fig(&r["patronus_over_raw"], 2, "x"),
        r["crypto_bound"]["cores"],
        fig(&r["crypto_bound"]["gbps"], 2, " Gbit/s"),
        fig(&r["crypto_bound"]["seal_gbps_one_core"], 2, " Gbit/s"),
        fig(&r["crypto_bound"]["open_gbps_one_core"], 2, " Gbit/s"),
        fig(&r["patronus_over_crypto_bound"], 2, "x"),
    )
}
