//! What the edge shows about itself: a status snapshot (JSON at `/status`, a table from
//! `patronus edge status`) and Prometheus metrics (`/metrics`), served on the configured local
//! address by one small HTTP thread. The event loop publishes a fresh snapshot every
//! [`PUBLISH_EVERY`]; the HTTP thread never touches the loop's state.
//!
//! # Metrics
//!
//! Per path (labels `peer`, `local_link`, `remote_link`): `patronus_path_up` (1 Up, 0.5
//! Degraded, 0 Down), `patronus_path_rtt_seconds`, `patronus_path_jitter_seconds`,
//! `patronus_path_loss_ratio`, `patronus_path_flows`, `patronus_path_flaps_total`,
//! `patronus_path_{tx,rx}_{packets,bytes}_total`, `patronus_path_probes_{sent,received,lost}_total`.
//! Per SLA class: `patronus_class_tx_{packets,bytes}_total{class}`.
//! Per edge: `patronus_failovers_total{reason}`, and the edge's counters as
//! `patronus_edge_<name>_total`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use patronus_api::{FailoverReason, PathState};

use crate::edge::{EdgeCounters, RecentEvent};

/// How often the loop publishes a snapshot.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// A WAN link: its receive queues (see [`crate::linksock`]), its address and how it is seen.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub name: String,
    /// Whether handshake messages have a queue of their own on this link.
    pub handshake_queue: bool,
    /// Datagrams the kernel dropped because the data queue was full (since the edge started).
    pub data_drops: u64,
    /// ... and because the handshake queue was full: a handshake flood lands here.
    pub handshake_drops: u64,
    /// The address its sockets are bound to (it follows the interface's: see `Edge`).
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// Where the controller last saw it from (endpoint discovery), and how long ago it said so.
    #[serde(default)]
    pub observed: Option<SocketAddr>,
    #[serde(default)]
    pub observed_age_s: Option<f64>,
    /// The controller's refusal of its last endpoint report (a STUN error code), if it refused.
    #[serde(default)]
    pub stun_refused: Option<u16>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PathStatus {
    pub id: u32,
    pub peer: String,
    pub local_link: String,
    pub remote_link: String,
    pub endpoint: Option<SocketAddr>,
    /// Whether its datagrams go through the relay (the controller's UDP port, see
    /// `patronus_api::relay`) rather than straight to the peer's endpoint.
    #[serde(default)]
    pub relayed: bool,
    pub state: PathState,
    pub rtt_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    pub jitter_ms: f64,
    pub loss_pct: f64,
    pub probe_interval_ms: f64,
    pub flows: u32,
    pub flaps: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub probes_sent: u64,
    pub probes_received: u64,
    pub probes_lost: u64,
    /// Seconds since the last WireGuard handshake of this path's session.
    pub last_handshake_s: Option<f64>,
}

/// This edge's key roll in progress.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RollStatus {
    /// The key the edge is rolling to.
    pub public_key: String,
    pub since_s: f64,
    /// Paths that are not down, and how many of them send on the new key already.
    pub live_paths: usize,
    pub moved: usize,
}

/// The edge's control connection, when a controller runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlStatus {
    /// The controller in use (the last that answered).
    pub controller: String,
    /// How many controllers the edge knows.
    pub controllers: usize,
    /// Times the edge moved to another controller because the one in use failed.
    pub failovers: u64,
    /// The version (ETag) of the configuration the edge runs, once it has one.
    #[serde(default)]
    pub config_version: Option<String>,
}

/// The process's control connection: one edge per process, and its controller agent runs
/// beside the engine (which publishes [`EdgeStatus`]), so it is kept here and joined to the
/// status when served.
static CONTROL: Mutex<Option<ControlStatus>> = Mutex::new(None);

/// The controller agent used `url` (one of `controllers`).
pub fn control_in_use(url: &str, controllers: usize) {
    let mut c = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
    let s = c.get_or_insert_with(ControlStatus::default);
    if s.controller != url {
        s.controller = url.to_owned();
    }
    s.controllers = controllers;
}

/// The control connection as it is now, if a controller runs this edge.
pub fn control_now() -> Option<ControlStatus> {
    CONTROL.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The edge runs the controller's configuration of version `etag` (an ETag, quoted).
pub fn control_config(etag: &str) {
    let mut c = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
    let s = c.get_or_insert_with(ControlStatus::default);
    // At most 64 visible characters: the controller's ETags are 18.
    let v: String = etag
        .trim_matches('"')
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .take(64)
        .collect();
    s.config_version = Some(v);
}

/// The controller agent moved to `url` because the controller in use failed.
pub fn control_moved(url: &str, controllers: usize) {
    control_in_use(url, controllers);
    let mut c = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = c.as_mut() {
        s.failovers += 1;
    }
}

/// One SLA class's traffic.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ClassStatus {
    pub class: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Times a path stopped meeting the class's SLA.
    #[serde(default)]
    pub sla_breaches: u64,
}

/// How long the paths that went down with flows on them had been silent: the outages those
/// flows saw at this edge (see [`patronus_core::EngineStats::failover_outages`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct OutageStatus {
    /// (upper bound in seconds, how many were at most that): cumulative, as Prometheus has
    /// them; the last bound is infinite (`null` in JSON).
    pub buckets: Vec<(Option<f64>, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl From<patronus_core::Outages> for OutageStatus {
    fn from(o: patronus_core::Outages) -> Self {
        let mut total = 0;
        let buckets = o
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                total += n;
                (patronus_core::OUTAGE_BOUNDS_S.get(i).copied(), total)
            })
            .collect();
        Self {
            buckets,
            count: o.count,
            sum_seconds: o.sum.as_secs_f64(),
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct EdgeStatus {
    pub site: String,
    pub public_key: String,
    pub tun: String,
    pub tun_mtu: u16,
    pub uptime_s: f64,
    pub counters: EdgeCounters,
    /// Probe requests and replies the engine refused (malformed, stale, wrong path).
    pub probe_requests_rejected: u64,
    pub probe_replies_rejected: u64,
    /// Times the event loop ran its timers late by more than `patronus_core::path::LATE`
    /// (the host busy, the process stopped), the total and the largest lateness: excused to
    /// the paths, not blamed on them.
    #[serde(default)]
    pub loop_late: u64,
    #[serde(default)]
    pub loop_late_seconds: f64,
    #[serde(default)]
    pub loop_late_max_seconds: f64,
    /// Times a path's detection time ran out while every path to its peer was silent (the
    /// path was held up: see `patronus_core::path`).
    #[serde(default)]
    pub peer_silences: u64,
    /// Times a path went down as steering sees it, reported or not (`path_events` has the
    /// reported changes, with hysteresis).
    #[serde(default)]
    pub path_downs: u64,
    /// Packets of new flows decided but not cached because the flow table was full (each is
    /// decided again on its next packet; nothing is dropped).
    #[serde(default)]
    pub flow_table_full: u64,
    /// Flow moves by reason.
    pub failovers: BTreeMap<FailoverReason, u64>,
    /// The outages of the flows of paths that went down.
    #[serde(default)]
    pub failover_outages: OutageStatus,
    /// The last failover events, oldest first.
    #[serde(default)]
    pub failover_events: Vec<patronus_api::FailoverEvent>,
    /// The last path state changes, oldest first.
    #[serde(default)]
    pub path_events: Vec<patronus_api::PathEvent>,
    pub flows: usize,
    /// When this run started (Unix ms).
    #[serde(default)]
    pub started_unix_ms: i64,
    /// What each SLA class's traffic sent since the edge started.
    #[serde(default)]
    pub classes: Vec<ClassStatus>,
    /// The key roll in progress, if any.
    #[serde(default)]
    pub key_roll: Option<RollStatus>,
    /// The WAN links' receive queues.
    #[serde(default)]
    pub links: Vec<LinkStatus>,
    /// The control connection, when a controller runs this edge.
    #[serde(default)]
    pub control: Option<ControlStatus>,
    pub paths: Vec<PathStatus>,
    pub events: Vec<RecentEvent>,
}

/// Where the loop publishes and the HTTP thread reads.
pub type Shared = Arc<Mutex<Arc<EdgeStatus>>>;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition of a snapshot.
pub fn render_metrics(s: &EdgeStatus) -> String {
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let labels = |p: &PathStatus| {
        format!(
            "{{peer=\"{}\",local_link=\"{}\",remote_link=\"{}\"}}",
            esc(&p.peer),
            esc(&p.local_link),
            esc(&p.remote_link)
        )
    };
    let per_path = |f: &dyn Fn(&PathStatus) -> Option<f64>| -> Vec<(String, f64)> {
        s.paths
            .iter()
            .filter_map(|p| f(p).map(|v| (labels(p), v)))
            .collect()
    };
    family(
        "patronus_path_up",
        "gauge",
        "Path state: 1 up, 0.5 degraded (breaks some SLA), 0 down.",
        per_path(&|p| {
            Some(match p.state {
                PathState::Up => 1.0,
                PathState::Degraded => 0.5,
                PathState::Down => 0.0,
            })
        }),
    );
    family(
        "patronus_path_relayed",
        "gauge",
        "1 if the path's datagrams go through the relay, 0 if straight to the peer.",
        per_path(&|p| Some(if p.relayed { 1.0 } else { 0.0 })),
    );
    family(
        "patronus_path_rtt_seconds",
        "gauge",
        "Smoothed round-trip time of the path's probes (absent while the path has none).",
        per_path(&|p| p.rtt_ms.map(|v| v / 1e3)),
    );
    family(
        "patronus_path_jitter_seconds",
        "gauge",
        "RFC 3550 interarrival jitter of the path's probes, worse direction.",
        per_path(&|p| Some(p.jitter_ms / 1e3)),
    );
    family(
        "patronus_path_loss_ratio",
        "gauge",
        "Share of the path's recent probes without a reply.",
        per_path(&|p| Some(p.loss_pct / 100.0)),
    );
    family(
        "patronus_path_flows",
        "gauge",
        "Flows currently steered onto the path.",
        per_path(&|p| Some(f64::from(p.flows))),
    );
    family(
        "patronus_path_handshake_age_seconds",
        "gauge",
        "Time since the path's WireGuard session last completed a handshake (absent before the \
         first).",
        per_path(&|p| p.last_handshake_s),
    );
    family(
        "patronus_path_flaps_total",
        "counter",
        "Times the path went down after being up.",
        per_path(&|p| Some(p.flaps as f64)),
    );
    for (name, help, f) in [
        (
            "tx_packets",
            "Packets sent on the path.",
            (|p: &PathStatus| p.tx_packets) as fn(&PathStatus) -> u64,
        ),
        ("tx_bytes", "Bytes sent on the path.", |p| p.tx_bytes),
        ("rx_packets", "Packets received on the path.", |p| {
            p.rx_packets
        }),
        ("rx_bytes", "Bytes received on the path.", |p| p.rx_bytes),
        ("probes_sent", "Probes sent on the path.", |p| p.probes_sent),
        (
            "probes_received",
            "Probe replies accepted on the path.",
            |p| p.probes_received,
        ),
        ("probes_lost", "Probes without a reply in time.", |p| {
            p.probes_lost
        }),
    ] {
        family(
            &format!("patronus_path_{name}_total"),
            "counter",
            help,
            per_path(&|p| Some(f(p) as f64)),
        );
    }
    for (name, help, f) in [
        (
            "patronus_class_tx_packets_total",
            "Packets each SLA class's traffic sent into the tunnels (once, however many paths).",
            (|c: &ClassStatus| c.tx_packets) as fn(&ClassStatus) -> u64,
        ),
        (
            "patronus_class_tx_bytes_total",
            "Bytes each SLA class's traffic sent into the tunnels (inner packets).",
            |c: &ClassStatus| c.tx_bytes,
        ),
    ] {
        family(
            name,
            "counter",
            help,
            s.classes
                .iter()
                .map(|c| (format!("{{class=\"{}\"}}", esc(&c.class)), f(c) as f64))
                .collect(),
        );
    }
    family(
        "patronus_class_sla_breaches_total",
        "counter",
        "Times a path stopped meeting the SLA class's bounds (latency, jitter or loss); its \
         flows then move to a path that meets them.",
        s.classes
            .iter()
            .map(|c| {
                (
                    format!("{{class=\"{}\"}}", esc(&c.class)),
                    c.sla_breaches as f64,
                )
            })
            .collect(),
    );
    family(
        "patronus_failovers_total",
        "counter",
        "Flow moves from one path to another, by reason.",
        s.failovers
            .iter()
            .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), *n as f64))
            .collect(),
    );
    let outages = &s.failover_outages;
    let mut rows: Vec<(String, f64)> = outages
        .buckets
        .iter()
        .map(|(le, n)| {
            // Whole numbers as `1.0`: what Prometheus 3 stores whatever was written, and
            // what 2 stores as written, so one rule matches both.
            let le = le.map_or("+Inf".to_owned(), |b| {
                if b.fract() == 0.0 {
                    format!("{b:.1}")
                } else {
                    b.to_string()
                }
            });
            (format!("_bucket{{le=\"{le}\"}}"), *n as f64)
        })
        .collect();
    rows.push(("_sum".to_owned(), outages.sum_seconds));
    rows.push(("_count".to_owned(), outages.count as f64));
    // None in a status from a build before the histogram: no half a histogram.
    if !outages.buckets.is_empty() {
        family(
            "patronus_failover_outage_seconds",
            "histogram",
            "How long each path that went down with flows on it had been silent when it was \
         declared down: the outage its flows saw at this edge (they move at their next packet).",
            rows,
        );
    }
    let c = &s.counters;
    for (name, help, v) in [
        (
            "tun_packets",
            "Packets read from the LAN (TUN).",
            c.tun_packets,
        ),
        ("tun_bytes", "Bytes read from the LAN (TUN).", c.tun_bytes),
        (
            "delivered_packets",
            "Decrypted packets written to the LAN.",
            c.delivered_packets,
        ),
        (
            "delivered_bytes",
            "Decrypted bytes written to the LAN.",
            c.delivered_bytes,
        ),
        (
            "tun_writes",
            "Writes to the TUN carrying the delivered packets (TCP segments coalesced).",
            c.tun_writes,
        ),
        (
            "tun_write_errors",
            "Writes to the TUN the kernel refused.",
            c.tun_write_errors,
        ),
        (
            "rx_unknown",
            "Datagrams that are not WireGuard or name no session.",
            c.rx_unknown,
        ),
        (
            "rx_rejected",
            "Datagrams a session refused (MAC, replay, stale).",
            c.rx_rejected,
        ),
        (
            "rx_spoofed",
            "Decrypted packets with a source the peer may not use.",
            c.rx_spoofed,
        ),
        (
            "tx_dropped",
            "LAN packets dropped by the engine (no route, no path).",
            c.tx_dropped,
        ),
        ("tx_errors", "Sends the kernel refused.", c.tx_errors),
        ("probes_sent", "Probes sent on all paths.", c.probes_sent),
        (
            "probes_unsent",
            "Probes held back because their path had no completed handshake.",
            c.probes_unsent,
        ),
        (
            "handshakes_admitted",
            "Handshake messages passed to their session.",
            c.handshakes_admitted,
        ),
        (
            "handshake_cookies_sent",
            "Cookie replies sent to handshake messages that came while their path was under load.",
            c.handshake_cookies_sent,
        ),
        (
            "handshakes_dropped",
            "Handshake messages dropped unanswered: under load with the cookie budget spent.",
            c.handshakes_dropped,
        ),
        (
            "sessions_rekeyed",
            "Paths whose sending session moved to a new key in a key roll (ours or the peer's).",
            c.sessions_rekeyed,
        ),
        (
            "endpoints_moved",
            "Times a path's peer endpoint moved to the source of authenticated traffic (the peer \
             roamed, its NAT mapped it anew, or the path went to or from the relay).",
            c.endpoints_moved,
        ),
        (
            "probe_requests_rejected",
            "Probe requests refused as malformed.",
            s.probe_requests_rejected,
        ),
        (
            "probe_replies_rejected",
            "Probe replies refused (malformed, stale, wrong path).",
            s.probe_replies_rejected,
        ),
        (
            "loop_late",
            "Times the event loop ran its timers more than 10 ms late (host busy or process \
             stopped); the lateness was not held against the paths.",
            s.loop_late,
        ),
        (
            "peer_silences",
            "Times a path's detection time ran out while every path to its peer was silent \
             (held up: the peer, not the path, was silent).",
            s.peer_silences,
        ),
        (
            "path_downs",
            "Times a path went down as steering sees it (reported changes are path events, \
             with hysteresis).",
            s.path_downs,
        ),
        (
            "flow_table_full",
            "Packets of new flows decided but not cached because the flow table was full \
             (forwarded all the same; each is decided again on its next packet).",
            s.flow_table_full,
        ),
    ] {
        family(
            &format!("patronus_edge_{name}_total"),
            "counter",
            help,
            vec![(String::new(), v as f64)],
        );
    }
    family(
        "patronus_edge_socket_drops_total",
        "counter",
        "Datagrams the kernel dropped because a link's receive queue was full, by link and \
         queue (data: data and probes; handshake: WireGuard handshake messages).",
        s.links
            .iter()
            .flat_map(|l| {
                let mut v = vec![(
                    format!("{{link=\"{}\",queue=\"data\"}}", esc(&l.name)),
                    l.data_drops as f64,
                )];
                if l.handshake_queue {
                    v.push((
                        format!("{{link=\"{}\",queue=\"handshake\"}}", esc(&l.name)),
                        l.handshake_drops as f64,
                    ));
                }
                v
            })
            .collect(),
    );
    family(
        "patronus_edge_loop_late_seconds_total",
        "counter",
        "Total lateness of the event loop's late runs.",
        vec![(String::new(), s.loop_late_seconds)],
    );
    family(
        "patronus_edge_loop_late_max_seconds",
        "gauge",
        "The largest lateness of the event loop since the edge started.",
        vec![(String::new(), s.loop_late_max_seconds)],
    );
    if let Some(c) = &s.control {
        family(
            "patronus_edge_control_failovers_total",
            "counter",
            "Times the edge moved its control connection to another controller because the one \
             in use failed.",
            vec![(String::new(), c.failovers as f64)],
        );
        if let Some(v) = &c.config_version {
            family(
                "patronus_edge_config_info",
                "gauge",
                "Always 1; the label is the version of the controller's configuration the edge \
                 runs (the controller's `patronus_site_config_current` compares it with the \
                 current one).",
                vec![(format!("{{version=\"{}\"}}", esc(v)), 1.0)],
            );
        }
        family(
            "patronus_edge_controller_info",
            "gauge",
            "Always 1; the label is the controller the edge uses now (one the operator listed).",
            vec![(format!("{{controller=\"{}\"}}", esc(&c.controller)), 1.0)],
        );
    }
    family(
        "patronus_build_info",
        "gauge",
        "Always 1; the labels say which build of the edge is running.",
        vec![(
            format!(
                "{{version=\"{}\",component=\"edge\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        )],
    );
    o
}

/// The bearer token of `metrics_token_file`: one line, at most 4 KiB, in a file no other user
/// can read.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let p = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("metrics_token_file {p}: {e}"))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "metrics_token_file {p}: readable by other users (mode {:o}); chmod 600 it",
            meta.permissions().mode() & 0o777
        ));
    }
    if meta.len() > 4096 {
        return Err(format!("metrics_token_file {p}: longer than 4 KiB"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("metrics_token_file {p}: {e}"))?;
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "metrics_token_file {p}: must hold one token (no spaces), and holds none"
        ));
    }
    Ok(token.to_owned())
}

/// Whether `header` (an `Authorization` value) is `Bearer <token>`, in time that does not
/// depend on where they differ.
fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| {
        let (scheme, rest) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    }) else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Serves `/metrics` and `/status` from `shared` on `listener`, one request at a time, until
/// the process ends; with `token`, only to requests that carry it as a bearer token.
pub fn serve(listener: TcpListener, shared: Shared, token: Option<String>) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
        // The request line, then the headers up to the blank line (read and ignored, so the
        // client is never cut off mid-request): at most 8 KiB and 2 s in all, so a slow or
        // endless client can neither exhaust memory nor hold the server.
        let started = std::time::Instant::now();
        let mut reader = BufReader::new(Read::take(&conn, 8 * 1024));
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let mut header = String::new();
        let mut authorization = None;
        loop {
            header.clear();
            match reader.read_line(&mut header) {
                Ok(n) if n > 0 && !header.trim().is_empty() => {}
                _ => break,
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.trim().eq_ignore_ascii_case("authorization") {
                    authorization = Some(value.trim().to_owned());
                }
            }
            if started.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        if let Some(t) = &token {
            if !bearer_matches(authorization.as_deref(), t) {
                let body = r#"{"error":{"code":"unauthorized","message":"this edge's status needs its metrics token: Authorization: Bearer <token>"}}"#;
                let _ = write!(
                    conn,
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                continue;
            }
        }
        let path = line.split_whitespace().nth(1).unwrap_or("");
        // A panic elsewhere cannot leave the status half-written (it is replaced whole): a
        // poisoned lock still serves what the edge last published, never an empty status.
        let mut snapshot = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let control = control_now();
        if control.is_some() {
            Arc::make_mut(&mut snapshot).control = control;
        }
        let (status, ctype, body) = match path {
            "/metrics" => (
                "200 OK",
                "text/plain; version=0.0.4",
                render_metrics(&snapshot),
            ),
            "/status" => (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&*snapshot).unwrap_or_default(),
            ),
            _ => (
                "404 Not Found",
                "application/json",
                r#"{"error":{"code":"not_found","message":"try /metrics or /status"}}"#.to_string(),
            ),
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_token_is_asked_as_a_bearer_token() {
        assert!(bearer_matches(Some("Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(Some("bearer  s3cret "), "s3cret"));
        assert!(!bearer_matches(Some("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(Some("Bearer s3cretX"), "s3cret"));
        assert!(!bearer_matches(Some("Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(Some("s3cret"), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }

    #[test]
    fn metrics_carry_one_series_per_path_and_escape_labels() {
        let s = EdgeStatus {
            paths: vec![PathStatus {
                peer: "b\"x".into(),
                local_link: "mpls".into(),
                remote_link: "inet".into(),
                state: PathState::Degraded,
                rtt_ms: Some(12.5),
                ..Default::default()
            }],
            failovers: [(FailoverReason::PathDown, 3)].into_iter().collect(),
            failover_outages: {
                let mut o = patronus_core::Outages::default();
                o.observe(std::time::Duration::from_millis(62));
                o.observe(std::time::Duration::from_millis(1500));
                o.into()
            },
            classes: vec![ClassStatus {
                class: "realtime".into(),
                sla_breaches: 4,
                ..Default::default()
            }],
            links: vec![
                LinkStatus {
                    name: "mpls".into(),
                    handshake_queue: true,
                    data_drops: 0,
                    handshake_drops: 7,
                    ..Default::default()
                },
                LinkStatus {
                    name: "lte".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let m = render_metrics(&s);
        assert!(
            m.contains("patronus_edge_socket_drops_total{link=\"mpls\",queue=\"handshake\"} 7")
        );
        // A link without a handshake queue has no such series.
        assert!(m.contains("patronus_edge_socket_drops_total{link=\"lte\",queue=\"data\"} 0"));
        assert!(!m.contains("link=\"lte\",queue=\"handshake\""));
        assert!(
            m.contains(r#"patronus_path_up{peer="b\"x",local_link="mpls",remote_link="inet"} 0.5"#),
            "{m}"
        );
        assert!(m.contains("patronus_path_rtt_seconds{peer=\"b\\\"x\",local_link=\"mpls\",remote_link=\"inet\"} 0.0125"));
        assert!(m.contains("patronus_failovers_total{reason=\"path-down\"} 3"));
        assert!(m.contains("patronus_class_sla_breaches_total{class=\"realtime\"} 4"));
        // Cumulative buckets, whole bounds written as Prometheus 3 stores them.
        assert!(m.contains("patronus_failover_outage_seconds_bucket{le=\"0.05\"} 0"));
        assert!(m.contains("patronus_failover_outage_seconds_bucket{le=\"0.075\"} 1"));
        assert!(m.contains("patronus_failover_outage_seconds_bucket{le=\"1.0\"} 1"));
        assert!(m.contains("patronus_failover_outage_seconds_bucket{le=\"2.0\"} 2"));
        assert!(m.contains("patronus_failover_outage_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(m.contains("patronus_failover_outage_seconds_count 2"));
        assert!(m.contains("patronus_failover_outage_seconds_sum 1.562"));
        assert!(m.contains("patronus_edge_rx_rejected_total 0"));
        assert!(m.contains("patronus_build_info{version=\""));
        patronus_lab::harness::promtool_accepts(&m);
    }

    /// `/status` as `patronus edge status`, the demo and the lab tests read it.
    #[test]
    fn the_status_document_spells_states_and_reasons_as_the_wire_does() {
        let s = EdgeStatus {
            paths: vec![PathStatus {
                state: PathState::Degraded,
                ..Default::default()
            }],
            failovers: [(FailoverReason::SlaViolated, 2)].into_iter().collect(),
            ..Default::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["paths"][0]["state"], "degraded");
        assert_eq!(v["failovers"]["sla-violated"], 2);
        let back: EdgeStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back.failovers[&FailoverReason::SlaViolated], 2);
        assert_eq!(back.paths[0].state, PathState::Degraded);
    }
}
