//! `patronus edge …`: run a site's data plane from a local configuration file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use nix::sys::signal::{SigSet, Signal};
use patronus_api::EdgeConfig;
use patronus_edge::{Edge, PrivateKey};

#[derive(Debug, Subcommand)]
pub enum EdgeCmd {
    /// Run the edge (root: it creates a TUN device and routes).
    Run {
        /// The edge's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the edge's public key, generating its private key (0600) first if there is none.
    Pubkey {
        /// Where the private key is (or will be) stored.
        #[arg(long)]
        key: PathBuf,
    },
    /// Show a running edge's peers, paths and recent events (from its `metrics_listen` address).
    Status {
        #[arg(long, default_value = "127.0.0.1:9101")]
        addr: std::net::SocketAddr,
        /// Print the JSON snapshot instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Answer Patronus path probes (STAMP, RFC 8762 layout) on a peer that does not run a Patronus
    /// edge, e.g. a stock WireGuard box: listen on its overlay address, port 862.
    Reflect {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Check a configuration file and print every problem in it.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

pub fn run(cmd: EdgeCmd) -> anyhow::Result<()> {
    match cmd {
        EdgeCmd::Pubkey { key } => {
            let k = PrivateKey::load_or_create(&key)?;
            outln!("{}", k.public());
            Ok(())
        }
        EdgeCmd::Status { addr, json } => status(addr, json),
        EdgeCmd::Reflect { listen } => reflect(listen),
        EdgeCmd::Check { config } => {
            load(&config)?;
            outln!("{}: ok", config.display());
            Ok(())
        }
        EdgeCmd::Run { config } => {
            // Shutdown signals are taken by one thread with sigwait, which stops the loop; the
            // TUN device (and with it every route through it) goes when the edge exits.
            let mut signals = SigSet::empty();
            for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
                signals.add(s);
            }
            signals.thread_block()?;
            let cfg = load(&config)?;
            let key = PrivateKey::load_or_create(&cfg.private_key_file)?;
            let mut edge = Edge::new(&cfg, &key).context("starting the edge")?;
            let stop = edge.stop_handle();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    if let Ok(sig) = signals.wait() {
                        eprintln!("edge: {sig:?}, stopping");
                    }
                    stop.stop();
                })?;
            eprintln!(
                "edge {} up: public key {}, {} links, {} peers, TUN MTU {}",
                cfg.site,
                key.public(),
                cfg.links.len(),
                cfg.peers.len(),
                edge.tun_mtu()
            );
            edge.run()?;
            Ok(())
        }
    }
}

/// Reads and validates a configuration, naming every bad key.
fn load(path: &Path) -> anyhow::Result<EdgeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: EdgeConfig =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Err(e) = cfg.validate() {
        bail!("{}: {e}", path.display());
    }
    Ok(cfg)
}

fn status(addr: std::net::SocketAddr, json: bool) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut conn =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
            .with_context(|| format!("no edge answers on {addr} (is metrics_listen set?)"))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    conn.write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp)?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("the edge's answer has no body")?;
    if json {
        outln!("{body}");
        return Ok(());
    }
    let s: patronus_edge::status::EdgeStatus =
        serde_json::from_str(body).context("the edge's status is not what this version reads")?;
    outln!(
        "edge {} (key {}), {} MTU {}, up {:.0} s, {} flows",
        s.site,
        s.public_key,
        s.tun,
        s.tun_mtu,
        s.uptime_s,
        s.flows
    );
    outln!(
        "{:<24} {:<9} {:>9} {:>9} {:>7} {:>6} {:>12} {:>12} {:>9}",
        "path",
        "state",
        "rtt ms",
        "jitter ms",
        "loss %",
        "flows",
        "tx bytes",
        "rx bytes",
        "handshake"
    );
    for p in &s.paths {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        outln!(
            "{:<24} {:<9} {:>9} {:>9.1} {:>7.1} {:>6} {:>12} {:>12} {:>9}",
            format!("{}:{}->{}", p.peer, p.local_link, p.remote_link),
            p.state,
            opt(p.rtt_ms),
            p.jitter_ms,
            p.loss_pct,
            p.flows,
            p.tx_bytes,
            p.rx_bytes,
            p.last_handshake_s
                .map_or("-".to_string(), |v| format!("{v:.0}s ago"))
        );
    }
    if !s.failovers.is_empty() {
        outln!("flow moves: {:?}", s.failovers);
    }
    for e in s.events.iter().rev().take(10).rev() {
        outln!("  {} {}", e.unix_ms, e.text);
    }
    Ok(())
}

/// A stateless STAMP session-reflector: every well-formed request gets its reply, timestamped
/// on this host's clock (the sender's estimators need only differences of it).
fn reflect(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use patronus_core::probe::{NtpTime, reflect};
    let sock = std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    let epoch = std::time::Instant::now();
    let mut buf = [0u8; 2048];
    eprintln!("reflecting probes on {listen}");
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        let t2 = NtpTime::from_duration(epoch.elapsed());
        // Malformed requests are ignored: a reflector answers only what it can parse.
        if let Ok(reply) = reflect(&buf[..n], t2, NtpTime::from_duration(epoch.elapsed()), 0) {
            let _ = sock.send_to(&reply, from);
        }
    }
}
