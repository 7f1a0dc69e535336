//! Running real edges in a lab: each site's edge generates its own key in the lab's run
//! directory (the lab only ever reads the public half), gets a configuration naming every other
//! site as a peer over all of its links, and runs as `patronus edge run` in the site's namespace.
//!
//! Overlay addresses: site `i` is `10.255.0.(i+1)` (IPv4 underlay) and talks to its peers over
//! every local × remote link pair of the same address family.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use patronus_api::{EdgeConfig, EdgeLink, EdgeLocal, Link, LocalLink, PeerConfig, WgPublicKey};

use crate::lab::{Lab, LabError, run_dir};
use crate::topology::Plan;

/// The UDP port every edge listens on in the lab.
pub const EDGE_PORT: u16 = 51820;
/// Where each edge serves `/status` and `/metrics` inside its namespace (127.0.0.1).
pub const STATUS_PORT: u16 = 9101;

/// Overlay address of the site at `index` in the plan.
pub fn overlay4(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0aff_0000u32 + index as u32 + 1)
}

/// Which underlay the edges use between each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Underlay {
    #[default]
    V4,
    V6,
}

/// The configuration of site `index`'s edge, given every site's public key.
pub fn edge_config(
    plan: &Plan,
    index: usize,
    keys: &[WgPublicKey],
    key_file: PathBuf,
    underlay: Underlay,
) -> EdgeConfig {
    // The edge's own address on a link (behind its NAT, if it has one: IPv4 only there).
    let addr = |l: &crate::topology::LinkPlan| -> IpAddr {
        match underlay {
            Underlay::V4 => l.local4().into(),
            Underlay::V6 => l.addr6.into(),
        }
    };
    // Where peers send: the link's address, or the NAT's fixed public port for the edge's
    // (`open` and `cgnat`; a symmetric NAT has none to give).
    let link = |l: &crate::topology::LinkPlan, endpoint: bool| {
        let mut k = Link::new(l.name.clone(), l.kind);
        k.mtu = l.mtu;
        if endpoint {
            k.endpoint = match (&l.nat, underlay) {
                (None, Underlay::V4) => Some(SocketAddr::new(l.addr4.into(), EDGE_PORT)),
                (None, Underlay::V6) => Some(SocketAddr::new(l.addr6.into(), EDGE_PORT)),
                (Some(n), _) if n.kind != crate::topology::NatKind::Symmetric => {
                    Some(SocketAddr::new(l.addr4.into(), n.public_port))
                }
                (Some(_), _) => None,
            };
        }
        k
    };
    let me = &plan.sites[index];
    EdgeConfig {
        site: me.name.clone(),
        private_key_file: key_file,
        overlay: overlay4(index).into(),
        listen_port: EDGE_PORT,
        tun_name: "patronus0".into(),
        links: me
            .links
            .iter()
            .map(|l| EdgeLink {
                link: link(l, false),
                interface: None,
                address: addr(l),
            })
            .collect(),
        peers: plan
            .sites
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != index)
            .map(|(j, s)| PeerConfig {
                name: s.name.clone(),
                public_key: keys[j],
                overlay: overlay4(j).into(),
                lan_prefixes: vec![s.lan4, s.lan6],
                links: s.links.iter().map(|l| link(l, true)).collect(),
                next_public_key: None,
                probe: patronus_api::ProbeMode::Stamp,
            })
            .collect(),
        classes: patronus_api::SlaClass::builtins(),
        policies: Vec::new(),
        failover: Default::default(),
        default_class: patronus_api::Name::new("business").unwrap_or_else(|_| unreachable!()),
        default_steering: Default::default(),
        metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], STATUS_PORT))),
        metrics_token_file: None,
        handshake: Default::default(),
        keepalive_s: 25,
    }
}

/// Where site `site`'s edge keeps its files in the lab.
pub fn edge_dir(lab: &Lab, site: &str) -> PathBuf {
    run_dir(lab.run_id()).join("edges").join(site)
}

/// Has site `site`'s edge generate its key (in its own namespace, into the lab's run
/// directory, 0600) and returns the public half.
pub fn public_key(lab: &Lab, patronus: &Path, site: &str) -> Result<WgPublicKey, LabError> {
    let dir = edge_dir(lab, site);
    crate::lab::create_private_dir(&dir)?;
    let out = lab.exec(
        site,
        &[
            patronus.to_string_lossy().as_ref(),
            "edge",
            "pubkey",
            "--key",
            dir.join("private.key").to_string_lossy().as_ref(),
        ],
    )?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| {
            LabError::Other(format!(
                "edge {site}: no public key ({e}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })
}

/// Writes `cfg` for site `site` and starts its edge (logging to `edge.log` beside it); returns
/// its PID.
pub fn start_edge(
    lab: &Lab,
    patronus: &Path,
    site: &str,
    cfg: &EdgeConfig,
) -> Result<u32, LabError> {
    let dir = edge_dir(lab, site);
    crate::lab::create_private_dir(&dir)?;
    let path = dir.join("edge.toml");
    let text = toml::to_string(cfg)
        .map_err(|e| LabError::Other(format!("edge {site}: writing config: {e}")))?;
    std::fs::write(&path, text).map_err(|error| LabError::Io {
        what: format!("writing {}", path.display()),
        error,
    })?;
    let log = std::fs::File::create(dir.join("edge.log")).map_err(|error| LabError::Io {
        what: "creating the edge log".into(),
        error,
    })?;
    let mut cmd = Command::new(patronus);
    cmd.args(["edge", "run", "--config"]).arg(&path);
    lab.spawn_logged(site, cmd, log)
}

/// Starts an edge in every site of `lab` with `patronus` (the binary), after letting `adjust`
/// change each configuration. Returns each edge's configuration and PID once every edge process
/// runs; use [`wait_for_tunnel`] for the tunnels.
pub fn start_edges(
    lab: &Lab,
    patronus: &Path,
    underlay: Underlay,
    adjust: impl Fn(&mut EdgeConfig),
) -> Result<Vec<(EdgeConfig, u32)>, LabError> {
    let plan = lab.plan().clone();
    let keys = plan
        .sites
        .iter()
        .map(|s| public_key(lab, patronus, s.name.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut configs = Vec::new();
    for (i, s) in plan.sites.iter().enumerate() {
        let dir = edge_dir(lab, s.name.as_str());
        let mut cfg = edge_config(&plan, i, &keys, dir.join("private.key"), underlay);
        adjust(&mut cfg);
        let pid = start_edge(lab, patronus, s.name.as_str(), &cfg)?;
        configs.push((cfg, pid));
    }
    Ok(configs)
}

/// Site `index`'s local part of a controller-run edge (IPv4 underlay): its links by name with
/// their lab addresses, registered as their public endpoints at enrolment.
pub fn local_config(plan: &Plan, index: usize, controller: &str, state_dir: PathBuf) -> EdgeLocal {
    let me = &plan.sites[index];
    EdgeLocal {
        controller: controller.into(),
        ca_file: None,
        ca_fingerprint: Vec::new(),
        state_dir,
        listen_port: EDGE_PORT,
        tun_name: "patronus0".into(),
        metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], STATUS_PORT))),
        metrics_token_file: None,
        links: me
            .links
            .iter()
            .map(|l| LocalLink {
                name: l.name.clone(),
                interface: None,
                address: l.local4().into(),
                // Behind a NAT, the public endpoint is not this machine's to know.
                public_endpoint: l
                    .nat
                    .is_none()
                    .then(|| SocketAddr::new(l.addr4.into(), EDGE_PORT)),
            })
            .collect(),
        handshake: Default::default(),
        keepalive_s: 25,
    }
}

/// Runs `patronus edge <verb> --local <file>` for site `site` (writing `local` beside its
/// state): `enroll` to completion (with `token`), or `run` as a lab process; returns the PID
/// for `run`, 0 for `enroll`.
pub fn controller_edge(
    lab: &Lab,
    patronus: &Path,
    site: &str,
    local: &EdgeLocal,
    verb: &str,
    token: Option<&str>,
) -> Result<u32, LabError> {
    let dir = edge_dir(lab, site);
    crate::lab::create_private_dir(&dir)?;
    let path = dir.join("local.toml");
    let text = toml::to_string(local)
        .map_err(|e| LabError::Other(format!("edge {site}: writing local config: {e}")))?;
    std::fs::write(&path, text).map_err(|error| LabError::Io {
        what: format!("writing {}", path.display()),
        error,
    })?;
    let mut cmd = Command::new(patronus);
    cmd.args(["edge", verb, "--local"]).arg(&path);
    if let Some(t) = token {
        cmd.env("PATRONUS_ENROLL_TOKEN", t);
    }
    if verb == "run" {
        let log = std::fs::File::create(dir.join("edge.log")).map_err(|error| LabError::Io {
            what: "creating the edge log".into(),
            error,
        })?;
        return lab.spawn_logged(site, cmd, log);
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut c = lab.command(site, &program)?;
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    let out = c.output().map_err(|error| LabError::Io {
        what: format!("running patronus edge {verb} in {site}"),
        error,
    })?;
    if !out.status.success() {
        return Err(LabError::Other(format!(
            "edge {site}: patronus edge {verb} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(0)
}

/// Waits until `from` can ping `to` (an address across the tunnels), or `timeout` passes.
pub fn wait_for_tunnel(
    lab: &Lab,
    from: &str,
    to: IpAddr,
    timeout: Duration,
) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = lab.exec(from, &["ping", "-c", "1", "-W", "1", &to.to_string()])?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::Other(format!(
                "no tunnel from {from} to {to} within {timeout:?}"
            )));
        }
        // ping fails at once while there is no route yet; do not spin on it.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The result of [`failover_trials`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverRun {
    /// Loss-derived outage of each cut, in ms (0 when nothing was lost).
    pub outages_ms: Vec<f64>,
    /// Loss outside every cut's window, in ms: should be 0.
    pub unexplained_ms: f64,
    /// The links cut, in order.
    pub cut: Vec<String>,
    pub stream: crate::stream::StreamReport,
}

/// Scenario "hard failover": a constant-rate UDP stream from `from` to `to` (LAN hosts of two
/// sites running edges); `trials` times, cut the link of `site` that carries it (found on the
/// emulated link's counters, not from the edge), restore it a second later, and let 1.5 s pass.
/// The flow stays where it failed over to, so the next trial cuts the other link. Each cut's
/// outage is the loss-derived time of the gaps that start within its window. (One stream, hard
/// cuts: [`failure_trials`] has the other failures and a stream each way.)
pub fn failover_trials(
    lab: &Lab,
    from: &str,
    to: &str,
    site: &str,
    trials: usize,
    rate_pps: u32,
) -> Result<FailoverRun, LabError> {
    let run = failure_trials(
        lab,
        &Trials {
            from,
            to,
            site,
            failure: Failure::Cut,
            trials,
            rate_pps,
            both_ways: false,
            edge_pid: None,
        },
    )?;
    Ok(FailoverRun {
        outages_ms: run.forward_ms,
        unexplained_ms: run.unexplained_ms[0],
        cut: run.targets,
        stream: run.forward,
    })
}

/// What a failover trial does (see [`failure_trials`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Both directions of the site's link carrying its outbound stream cut.
    Cut,
    /// Only the site's sending direction (into the WAN) of the link carrying its outbound stream.
    OneWayUp,
    /// Only the site's receiving direction of the link carrying its inbound stream.
    OneWayDown,
    /// The site's edge process stopped (SIGSTOP) for this long, then continued (SIGCONT), on
    /// healthy links.
    Stall(Duration),
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Cut => "cut",
            Failure::OneWayUp => "one-way-up",
            Failure::OneWayDown => "one-way-down",
            Failure::Stall(_) => "stall",
        }
    }
}

/// A run of failover trials: where, what, how often.
#[derive(Debug, Clone)]
pub struct Trials<'a> {
    /// LAN hosts (`site/host`) the forward stream goes from and to.
    pub from: &'a str,
    pub to: &'a str,
    /// The site whose link (or edge) fails.
    pub site: &'a str,
    pub failure: Failure,
    pub trials: usize,
    pub rate_pps: u32,
    /// A second stream from `to` to `from` at the same rate (two-way traffic, as voice, video
    /// and TCP make).
    pub both_ways: bool,
    /// The site's edge process, for [`Failure::Stall`].
    pub edge_pid: Option<u32>,
}

/// The result of [`failure_trials`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrialRun {
    pub failure: &'static str,
    /// What each trial acted on: a link (`site/link`), or the edge process.
    pub targets: Vec<String>,
    /// Loss-derived outage of each trial (ms) of the forward stream and of the reverse one
    /// (empty without it).
    pub forward_ms: Vec<f64>,
    pub reverse_ms: Vec<f64>,
    /// Loss outside every trial's window, forward and reverse: should be 0.
    pub unexplained_ms: [f64; 2],
    pub forward: crate::stream::StreamReport,
    pub reverse: Option<crate::stream::StreamReport>,
}

/// Failover trials: constant-rate UDP streams between LAN hosts of two sites running edges
/// (from `from` to `to`, and back with `both_ways`); `trials` times, the failure strikes the
/// link of `site` that carries the affected stream (found on the emulated link's counters, not
/// from the edge) or its edge process, is repaired a second later (a stall lasts what it says),
/// and 1.5 s pass. Flows stay where they failed over to, so the next trial strikes the other
/// link. Each trial's outage, per stream, is the loss-derived time of the gaps that start
/// within its window (200 ms before it to 1.2 s after).
pub fn failure_trials(lab: &Lab, t: &Trials<'_>) -> Result<TrialRun, LabError> {
    let links: Vec<String> = lab
        .plan()
        .site(t.site)
        .ok_or_else(|| LabError::NoNode(t.site.into(), lab.plan().nodes().join(", ")))?
        .links
        .iter()
        .map(|l| format!("{}/{}", t.site, l.name))
        .collect();
    let (from_ns, to_ns) = (lab.ns(t.from)?, lab.ns(t.to)?);
    let (to_addr, from_addr) = (lab.addr(t.to, false)?, lab.addr(t.from, false)?);
    let settle = Duration::from_secs(1);
    let period = Duration::from_millis(2500);
    let cfg = crate::stream::StreamConfig {
        rate_pps: t.rate_pps,
        duration: settle + period * t.trials as u32 + Duration::from_millis(500),
        size: 100,
        linger: Duration::from_millis(500),
        ..Default::default()
    };
    let pid = match (t.failure, t.edge_pid) {
        (Failure::Stall(_), None) => {
            return Err(LabError::Other(
                "a stall trial needs the edge's process id".into(),
            ));
        }
        (_, p) => p.map(|p| nix::unistd::Pid::from_raw(p as i32)),
    };
    let signal = |sig| -> Result<(), LabError> {
        let Some(pid) = pid else {
            return Ok(());
        };
        nix::sys::signal::kill(pid, sig)
            .map_err(|e| LabError::Other(format!("sending {sig} to the edge ({pid}): {e}")))
    };
    // The busy link over the next 200 ms, by what it forwards up (out of the site) or down.
    let busiest = |down: bool| -> Result<String, LabError> {
        let count = |l: &str| -> Result<u64, LabError> {
            let s = lab.link_status(l)?;
            Ok(if down {
                s.down_stats.forwarded
            } else {
                s.up_stats.forwarded
            })
        };
        let before: Vec<u64> = links.iter().map(|l| count(l)).collect::<Result<_, _>>()?;
        std::thread::sleep(Duration::from_millis(200));
        let mut best = (0, 0u64);
        for (i, l) in links.iter().enumerate() {
            let d = count(l)? - before[i];
            if d > best.1 {
                best = (i, d);
            }
        }
        Ok(links[best.0].clone())
    };
    std::thread::scope(|s| {
        let t0 = Instant::now();
        let fwd = s.spawn(|| crate::stream::run(&from_ns, &to_ns, to_addr, &cfg));
        let rev = t
            .both_ways
            .then(|| s.spawn(|| crate::stream::run(&to_ns, &from_ns, from_addr, &cfg)));
        let mut at = Vec::new();
        let mut targets = Vec::new();
        let result = (|| -> Result<(), LabError> {
            std::thread::sleep(settle);
            for _ in 0..t.trials {
                let dir = match t.failure {
                    Failure::Stall(d) => {
                        std::thread::sleep(Duration::from_millis(200));
                        at.push(t0.elapsed());
                        targets.push(format!("{} edge", t.site));
                        signal(nix::sys::signal::Signal::SIGSTOP)?;
                        std::thread::sleep(d);
                        signal(nix::sys::signal::Signal::SIGCONT)?;
                        std::thread::sleep(period - Duration::from_millis(200) - d.min(period / 2));
                        continue;
                    }
                    Failure::Cut => "dir=both",
                    Failure::OneWayUp => "dir=up",
                    Failure::OneWayDown => "dir=down",
                };
                let link = busiest(t.failure == Failure::OneWayDown && t.both_ways)?;
                at.push(t0.elapsed());
                lab.link_command(&link, &["cut", dir])?;
                targets.push(link.clone());
                std::thread::sleep(Duration::from_secs(1));
                lab.link_command(&link, &["restore", dir])?;
                std::thread::sleep(period - Duration::from_millis(1200));
            }
            Ok(())
        })();
        // Whatever happened, the edge runs again.
        let _ = signal(nix::sys::signal::Signal::SIGCONT);
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<_, _>>| {
            h.join()
                .map_err(|_| LabError::Other("a stream thread panicked".into()))?
                .map_err(|e: crate::stream::StreamError| LabError::Other(e.to_string()))
        };
        let forward = join(fwd)?;
        let reverse = rev.map(join).transpose()?;
        result?;
        let interval = 1.0 / f64::from(t.rate_pps);
        let attribute = |r: &crate::stream::StreamReport| {
            let mut outages = vec![0.0; at.len()];
            let mut unexplained = 0.0;
            for g in &r.gaps {
                let when = g.first_seq as f64 * interval;
                match at.iter().position(|c| {
                    let c = c.as_secs_f64();
                    when >= c - 0.2 && when <= c + 1.2
                }) {
                    Some(i) => outages[i] += g.ms,
                    None => unexplained += g.ms,
                }
            }
            (outages, unexplained)
        };
        let (forward_ms, fu) = attribute(&forward);
        let (reverse_ms, ru) = reverse.as_ref().map(attribute).unwrap_or_default();
        Ok(TrialRun {
            failure: t.failure.name(),
            targets,
            forward_ms,
            reverse_ms,
            unexplained_ms: [fu, ru],
            forward,
            reverse,
        })
    })
}

/// A peer of a stock WireGuard interface.
#[derive(Debug, Clone)]
pub struct StockPeer {
    pub public_key: WgPublicKey,
    pub endpoint: SocketAddr,
    /// Allowed IPs, also routed through the interface.
    pub allowed: Vec<String>,
}

/// Generates a WireGuard key with `wg genkey` in site `site`'s namespace, into the lab's run
/// directory (0600); returns its path and public key.
pub fn wg_keypair(lab: &Lab, site: &str) -> Result<(PathBuf, WgPublicKey), LabError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = edge_dir(lab, site);
    crate::lab::create_private_dir(&dir)?;
    let path = dir.join("wg.key");
    let out = lab.exec(site, &["wg", "genkey"])?;
    if !out.status.success() {
        return Err(LabError::Other(format!(
            "wg genkey: {} (apt-get install wireguard-tools)",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |error| LabError::Io { what, error }
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("creating"))?;
    f.write_all(&out.stdout).map_err(io("writing"))?;
    let mut c = lab.command(site, "wg")?;
    c.arg("pubkey")
        .stdin(std::fs::File::open(&path).map_err(io("reading"))?)
        .stdout(std::process::Stdio::piped());
    let out = c.output().map_err(io("wg pubkey for"))?;
    let key = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| LabError::Other(format!("wg pubkey: {e}")))?;
    Ok((path, key))
}

/// The interface name of site `site`'s stock WireGuard peer. wireguard-go's control socket
/// (`/var/run/wireguard/<name>.sock`) is shared by every namespace, so each site's must differ.
pub fn wg_ifname(lab: &Lab, site: &str) -> Result<String, LabError> {
    let i = lab
        .plan()
        .sites
        .iter()
        .position(|s| s.name.as_str() == site)
        .ok_or_else(|| LabError::NoNode(site.into(), lab.plan().nodes().join(", ")))?;
    // Run id and site index: unique across labs and sites, and within 15 characters.
    Ok(format!("wg{}{i}", lab.run_id()))
}

/// Runs Debian's `wireguard-go` in site `site` (interface [`wg_ifname`]) with the private key
/// at `key`, the overlay address `overlay`, and `peers` (configured with `wg`, routes added for
/// their allowed IPs). Returns the daemon's PID once the interface is configured; its output
/// goes to `wireguard-go.log` in the site's edge directory.
pub fn start_wireguard_go(
    lab: &Lab,
    site: &str,
    key: &Path,
    overlay: Ipv4Addr,
    peers: &[StockPeer],
) -> Result<u32, LabError> {
    let ifname = wg_ifname(lab, site)?;
    let dir = edge_dir(lab, site);
    crate::lab::create_private_dir(&dir)?;
    let log =
        std::fs::File::create(dir.join("wireguard-go.log")).map_err(|error| LabError::Io {
            what: "creating the wireguard-go log".into(),
            error,
        })?;
    let mut c = Command::new("wireguard-go");
    c.args(["-f", &ifname]);
    let pid = lab.spawn_logged(site, c, log)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab
        .exec(site, &["ip", "link", "show", &ifname])?
        .status
        .success()
    {
        if Instant::now() >= deadline {
            return Err(LabError::Other(format!(
                "wireguard-go made no {ifname} in {site} (apt-get install wireguard-go)"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = |args: &[&str]| -> Result<(), LabError> {
        let out = lab.exec(site, args)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LabError::Other(format!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    };
    let key = key.to_string_lossy();
    run(&[
        "wg",
        "set",
        &ifname,
        "private-key",
        &key,
        "listen-port",
        &EDGE_PORT.to_string(),
    ])?;
    for p in peers {
        run(&[
            "wg",
            "set",
            &ifname,
            "peer",
            &p.public_key.to_string(),
            "endpoint",
            &p.endpoint.to_string(),
            "allowed-ips",
            &p.allowed.join(","),
        ])?;
    }
    run(&[
        "ip",
        "addr",
        "add",
        &format!("{overlay}/32"),
        "dev",
        &ifname,
    ])?;
    run(&["ip", "link", "set", &ifname, "up"])?;
    for p in peers {
        for a in &p.allowed {
            run(&["ip", "route", "replace", a, "dev", &ifname])?;
        }
    }
    Ok(pid)
}
