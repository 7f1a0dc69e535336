//! The edge's event loop: one thread that owns the TUN device, one UDP socket per WAN link, a
//! WireGuard session per path, and the path engine, and moves packets between them.
//!
//! # One turn of the loop
//!
//! 1. Read the clock once; run the engine's due timers (probes, Down detection, hold-downs) and
//!    send the probes it asks for, each inside the tunnel of the path it measures; log its events.
//! 2. Every 100 ms, run boringtun's timers for every session (rekeys, keepalives, handshake
//!    retries). Every path is probed all the time, so every path keeps a live session and a
//!    failover never waits for a handshake.
//! 3. Wait (epoll) for the TUN, a link socket, the timer or the stop signal.
//! 4. TUN → classify and decide (the engine) → encrypt under the chosen path's session → send on
//!    that path's link socket to the peer's endpoint on that path. `duplicate` encrypts once and
//!    sends the same datagram on both paths.
//! 5. Link socket → find the session (see [`crate::wire`]) → decrypt → a probe goes to the engine,
//!    anything else to the TUN (if its source is one the peer may use), and counts as evidence
//!    that the path is alive.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use patronus_api::{EdgeConfig, Prefix};
use patronus_core::engine::{Engine, EngineConfig};
use patronus_core::packet::PacketMeta;
use patronus_core::probe::STAMP_PORT;
use patronus_core::{Decision, Event, PathId};
use tun_rs::{DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::keys::PrivateKey;
use crate::status::{self, EdgeStatus, PathStatus, Shared};
use crate::wire::{self, Inner, PROBE_SENDER_PORT, WgMessage};

/// WireGuard's overhead on an IPv6 underlay: 40 (IPv6) + 8 (UDP) + 32 (WireGuard).
pub const OVERHEAD_V6: u16 = 80;
/// ... and on IPv4: 20 + 8 + 32.
pub const OVERHEAD_V4: u16 = 60;
/// How often boringtun's timers run.
const WG_TICK: Duration = Duration::from_millis(100);
/// Events kept for status.
const RECENT_EVENTS: usize = 256;
/// Datagrams read per socket per wake-up, so one busy link cannot starve the others.
const READ_BUDGET: usize = 256;

const TOKEN_TUN: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_LINK_BASE: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
    #[error("{what}: {error}")]
    Sys { what: String, error: nix::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EdgeError {
    let what = what.into();
    move |error| EdgeError::Io { what, error }
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> EdgeError {
    let what = what.into();
    move |error| EdgeError::Sys { what, error }
}

/// Counters of things the edge refused or could not do; every one of them is a packet lost or
/// a peer misbehaving, so they are all exported.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct EdgeCounters {
    pub tun_packets: u64,
    pub tun_bytes: u64,
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
    /// Datagrams that are not WireGuard, or name no session of ours.
    pub rx_unknown: u64,
    /// Datagrams a session refused (bad MAC, replay, stale).
    pub rx_rejected: u64,
    /// Decrypted packets whose source the peer may not use.
    pub rx_spoofed: u64,
    /// LAN packets the engine dropped (no route, no path, strict SLA).
    pub tx_dropped: u64,
    /// Sends the kernel refused.
    pub tx_errors: u64,
    pub probes_sent: u64,
}

/// One WAN link's socket.
struct LinkSock {
    name: String,
    sock: UdpSocket,
    v6: bool,
}

/// One path at run time.
struct PathRt {
    peer: usize,
    link: usize,
    /// Where the peer's end of this path is; learned from authenticated packets if not
    /// configured (a peer behind NAT).
    endpoint: Option<SocketAddr>,
    tunn: Box<Tunn>,
}

struct PeerRt {
    overlay: IpAddr,
    allowed: Vec<Prefix>,
}

/// A handle that stops a running edge from another thread.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<EventFd>);

impl StopHandle {
    pub fn stop(&self) {
        let _ = self.0.write(1);
    }
}

/// A recent event, for status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentEvent {
    pub unix_ms: u128,
    pub text: String,
}

pub struct Edge {
    site: String,
    public_key: String,
    tun_name: String,
    started: Instant,
    shared: Shared,
    next_publish: Instant,
    failovers: BTreeMap<String, u64>,
    overlay: IpAddr,
    engine: Engine,
    tun: SyncDevice,
    tun_mtu: u16,
    links: Vec<LinkSock>,
    paths: Vec<Option<PathRt>>,
    by_endpoint: HashMap<(usize, SocketAddr), PathId>,
    peers: Vec<PeerRt>,
    epoll: Epoll,
    timer: TimerFd,
    stop: Arc<EventFd>,
    next_wg_tick: Instant,
    counters: EdgeCounters,
    events: VecDeque<RecentEvent>,
    // Buffers, reused.
    rx_orig: Vec<u8>,
    rx_bufs: Vec<Vec<u8>>,
    rx_sizes: Vec<usize>,
    net_buf: Vec<u8>,
    out_buf: Vec<u8>,
    probe_buf: Vec<u8>,
    to_tun: Vec<Vec<u8>>,
    tun_pool: Vec<Vec<u8>>,
    gro: GROTable,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("overlay", &self.overlay)
            .field(
                "links",
                &self.links.iter().map(|l| &l.name).collect::<Vec<_>>(),
            )
            .field("paths", &self.paths.len())
            .finish()
    }
}

impl Edge {
    /// Builds everything the edge needs: TUN, routes, sockets, sessions, engine. Fails with a
    /// message that names what could not be done.
    pub fn new(cfg: &EdgeConfig, key: &PrivateKey) -> Result<Self, EdgeError> {
        cfg.validate()
            .map_err(|e| EdgeError::Config(e.to_string()))?;
        let now = Instant::now();
        let mut instance = [0u8; 4];
        getrandom::getrandom(&mut instance).map_err(|e| EdgeError::Config(e.to_string()))?;
        let mut engine = Engine::new(
            EngineConfig {
                failover: cfg.failover.clone(),
                classes: cfg.classes.clone(),
                policies: cfg.policies.clone(),
                default_class: cfg.default_class.clone(),
                default_steering: cfg.default_steering,
                instance: u32::from_le_bytes(instance),
                ..EngineConfig::default()
            },
            now,
        )
        .map_err(|e| EdgeError::Config(e.to_string()))?;

        // Sockets: one per link, bound to the link's address and device.
        let mut links = Vec::new();
        for l in &cfg.links {
            let name = l.link.name.to_string();
            let addr = SocketAddr::new(l.address, cfg.listen_port);
            let sock =
                UdpSocket::bind(addr).map_err(io_err(format!("link {name}: binding {addr}")))?;
            let dev = l.interface.clone().unwrap_or_else(|| name.clone());
            setsockopt(
                &sock,
                sockopt::BindToDevice,
                &std::ffi::OsString::from(&dev),
            )
            .map_err(sys_err(format!("link {name}: binding to device {dev}")))?;
            sock.set_nonblocking(true)
                .map_err(io_err(format!("link {name}: non-blocking")))?;
            links.push(LinkSock {
                name,
                sock,
                v6: l.address.is_ipv6(),
            });
        }

        // The TUN device: MTU leaves room for WireGuard on the smallest link.
        let overhead = if links.iter().any(|l| l.v6) {
            OVERHEAD_V6
        } else {
            OVERHEAD_V4
        };
        let min_mtu = cfg.links.iter().map(|l| l.link.mtu).min().unwrap_or(1500);
        let tun_mtu = min_mtu.saturating_sub(overhead);
        let tun = DeviceBuilder::new()
            .name(cfg.tun_name.clone())
            .mtu(tun_mtu)
            .offload(true)
            .build_sync()
            .map_err(io_err(format!("creating TUN {}", cfg.tun_name)))?;
        tun.set_nonblocking(true)
            .map_err(io_err("non-blocking TUN"))?;
        let mut routed: Vec<Prefix> = Vec::new();
        for p in &cfg.peers {
            routed.extend(p.lan_prefixes.iter().copied());
            routed.push(Prefix::truncating(
                p.overlay,
                if p.overlay.is_ipv4() { 32 } else { 128 },
            ));
        }
        crate::routes::install(&cfg.tun_name, cfg.overlay, &routed).map_err(EdgeError::Config)?;

        // Peers and their paths: every local link × every remote link of the same family.
        let secret: &StaticSecret = key.secret();
        let mut peers = Vec::new();
        let mut paths: Vec<Option<PathRt>> = Vec::new();
        let mut by_endpoint = HashMap::new();
        for p in &cfg.peers {
            let host = if p.overlay.is_ipv4() { 32 } else { 128 };
            let mut allowed = p.lan_prefixes.clone();
            allowed.push(Prefix::truncating(p.overlay, host));
            let peer = engine
                .add_peer(p.name.as_str(), &allowed)
                .map_err(|e| EdgeError::Config(format!("peer {}: {e}", p.name)))?;
            for (li, l) in cfg.links.iter().enumerate() {
                for r in &p.links {
                    if r.endpoint
                        .is_some_and(|e| e.is_ipv6() != l.address.is_ipv6())
                    {
                        continue;
                    }
                    let id = engine
                        .add_path(peer, &l.link, r, now)
                        .map_err(|e| EdgeError::Config(format!("peer {}: {e}", p.name)))?;
                    let index = id.0 + 1;
                    let tunn = Tunn::new(
                        secret.clone(),
                        PublicKey::from(p.public_key.0),
                        None,
                        None,
                        index,
                        None,
                    );
                    let slot = id.0 as usize;
                    if paths.len() <= slot {
                        paths.resize_with(slot + 1, || None);
                    }
                    if let Some(ep) = r.endpoint {
                        by_endpoint.insert((li, ep), id);
                    }
                    paths[slot] = Some(PathRt {
                        peer: peer.0 as usize,
                        link: li,
                        endpoint: r.endpoint,
                        tunn: Box::new(tunn),
                    });
                }
            }
            peers.push(PeerRt {
                overlay: p.overlay,
                allowed,
            });
        }

        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(sys_err("epoll"))?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(sys_err("timerfd"))?;
        let stop =
            Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(sys_err("eventfd"))?);
        let add = |fd: std::os::fd::BorrowedFd<'_>, token| {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                .map_err(sys_err("epoll add"))
        };
        add(tun.as_fd(), TOKEN_TUN)?;
        add(timer.as_fd(), TOKEN_TIMER)?;
        add(stop.as_fd(), TOKEN_STOP)?;
        for (i, l) in links.iter().enumerate() {
            add(l.sock.as_fd(), TOKEN_LINK_BASE + i as u64)?;
        }
        let buf_len = VIRTIO_NET_HDR_LEN + usize::from(tun_mtu).max(1500) + 64;
        let shared: Shared = Arc::default();
        if let Some(addr) = cfg.metrics_listen {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(io_err(format!("metrics_listen {addr}")))?;
            let s = shared.clone();
            std::thread::Builder::new()
                .name("edge-status".into())
                .spawn(move || status::serve(listener, s))
                .map_err(io_err("starting the status thread"))?;
        }
        Ok(Self {
            site: cfg.site.to_string(),
            public_key: key.public().to_string(),
            tun_name: cfg.tun_name.clone(),
            started: now,
            shared,
            next_publish: now,
            failovers: BTreeMap::new(),
            overlay: cfg.overlay,
            engine,
            tun,
            tun_mtu,
            links,
            paths,
            by_endpoint,
            peers,
            epoll,
            timer,
            stop,
            next_wg_tick: now,
            counters: EdgeCounters::default(),
            events: VecDeque::new(),
            rx_orig: vec![0; VIRTIO_NET_HDR_LEN + 65_536],
            rx_bufs: (0..IDEAL_BATCH_SIZE).map(|_| vec![0; buf_len]).collect(),
            rx_sizes: vec![0; IDEAL_BATCH_SIZE],
            net_buf: vec![0; 65_536 + 148],
            out_buf: vec![0; 65_536 + 148],
            probe_buf: Vec::with_capacity(128),
            to_tun: Vec::new(),
            tun_pool: Vec::new(),
            gro: GROTable::new(),
        })
    }

    /// The TUN device's MTU.
    pub fn tun_mtu(&self) -> u16 {
        self.tun_mtu
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    pub fn counters(&self) -> EdgeCounters {
        self.counters
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn recent_events(&self) -> impl Iterator<Item = &RecentEvent> {
        self.events.iter()
    }

    /// Runs until [`StopHandle::stop`].
    pub fn run(&mut self) -> Result<(), EdgeError> {
        let mut events = vec![EpollEvent::empty(); 32];
        loop {
            let now = Instant::now();
            self.engine.handle_timeout(now);
            self.send_probes(now);
            self.drain_events(now);
            if now >= self.next_wg_tick {
                self.wg_tick();
                self.next_wg_tick = now + WG_TICK;
            }
            if now >= self.next_publish {
                self.publish(now);
                self.next_publish = now + status::PUBLISH_EVERY;
            }
            self.arm_timer();
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(sys_err("epoll_wait")(e)),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_TIMER => {
                        let _ = self.timer.wait();
                    }
                    TOKEN_TUN => self.read_tun(),
                    t => self.read_link((t - TOKEN_LINK_BASE) as usize),
                }
            }
            self.flush_tun();
        }
    }

    /// A snapshot of everything, for status and metrics.
    pub fn status(&self, now: Instant) -> EdgeStatus {
        let paths = self
            .engine
            .path_ids()
            .filter_map(|id| {
                let snap = self.engine.path(id, now)?;
                let rt = self.paths.get(id.0 as usize)?.as_ref()?;
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let c = snap.counters;
                Some(PathStatus {
                    id: id.0,
                    peer: snap.peer_name.clone(),
                    local_link: snap.local_link.to_string(),
                    remote_link: snap.remote_link.to_string(),
                    endpoint: rt.endpoint,
                    state: format!("{:?}", snap.state).to_lowercase(),
                    rtt_ms: snap.rtt.map(ms),
                    rtt_p99_ms: snap.rtt_p99.map(ms),
                    jitter_ms: ms(snap.jitter),
                    loss_pct: snap.loss * 100.0,
                    probe_interval_ms: ms(snap.probe_interval),
                    flows: snap.flows,
                    flaps: snap.flaps,
                    tx_packets: c.tx_packets,
                    tx_bytes: c.tx_bytes,
                    rx_packets: c.rx_packets,
                    rx_bytes: c.rx_bytes,
                    probes_sent: c.probes_sent,
                    probes_received: c.probes_received,
                    probes_lost: c.probes_lost,
                    last_handshake_s: rt.tunn.time_since_last_handshake().map(|d| d.as_secs_f64()),
                })
            })
            .collect();
        EdgeStatus {
            site: self.site.clone(),
            public_key: self.public_key.clone(),
            tun: self.tun_name.clone(),
            tun_mtu: self.tun_mtu,
            uptime_s: now.duration_since(self.started).as_secs_f64(),
            counters: self.counters.into(),
            probe_requests_rejected: self.engine.stats().probe_requests_rejected,
            probe_replies_rejected: self.engine.stats().replies_rejected,
            failovers: self.failovers.clone(),
            flows: self.engine.flow_count(),
            paths,
            events: self.events.iter().map(Into::into).collect(),
        }
    }

    fn publish(&mut self, now: Instant) {
        let s = Arc::new(self.status(now));
        if let Ok(mut slot) = self.shared.lock() {
            *slot = s;
        }
    }

    fn arm_timer(&mut self) {
        let mut at = self.next_wg_tick.min(self.next_publish);
        if let Some(t) = self.engine.poll_timeout() {
            at = at.min(t);
        }
        let wait = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        let _ = self.timer.set(
            Expiration::OneShot(TimeSpec::from_duration(wait)),
            TimerSetTimeFlags::empty(),
        );
    }

    fn record(&mut self, text: String) {
        self.record_as(text, true);
    }

    /// Keeps an event for status; `log` also prints it (flow moves are too many to print each).
    fn record_as(&mut self, text: String, log: bool) {
        if log {
            eprintln!("edge: {text}");
        }
        if self.events.len() == RECENT_EVENTS {
            self.events.pop_front();
        }
        let unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        self.events.push_back(RecentEvent { unix_ms, text });
    }

    fn path_name(&self, id: PathId, now: Instant) -> String {
        match self.engine.path(id, now) {
            Some(p) => format!("{}:{}->{}", p.peer_name, p.local_link, p.remote_link),
            None => format!("path {}", id.0),
        }
    }

    fn drain_events(&mut self, now: Instant) {
        let mut moves = 0u32;
        while let Some((_, ev)) = self.engine.poll_event() {
            let is_move = matches!(ev, Event::FlowMoved { .. });
            let text = match ev {
                Event::PathUp { path, rtt } => {
                    format!(
                        "path {} up, rtt {:.1} ms",
                        self.path_name(path, now),
                        rtt.as_secs_f64() * 1e3
                    )
                }
                Event::PathDown {
                    path,
                    silent_for,
                    flows,
                } => format!(
                    "path {} down after {:.0} ms of silence, {flows} flows on it",
                    self.path_name(path, now),
                    silent_for.as_secs_f64() * 1e3
                ),
                Event::SlaViolated { path, class, .. } => format!(
                    "path {} breaks the SLA of class {}",
                    self.path_name(path, now),
                    self.engine.class_name(class).map_or("?", |n| n.as_str())
                ),
                Event::SlaRestored { path, class } => format!(
                    "path {} meets the SLA of class {} again",
                    self.path_name(path, now),
                    self.engine.class_name(class).map_or("?", |n| n.as_str())
                ),
                Event::FlowMoved {
                    flow,
                    from,
                    to,
                    reason,
                } => {
                    *self
                        .failovers
                        .entry(reason.as_str().to_string())
                        .or_default() += 1;
                    format!(
                        "flow {} -> {} moved from {} to {} ({reason:?})",
                        flow.src(),
                        flow.dst(),
                        self.path_name(from, now),
                        self.path_name(to, now)
                    )
                }
            };
            if is_move {
                // A failover moves every flow of a path; print the first few, count them all.
                moves += 1;
                if moves <= 5 {
                    self.record_as(text, true);
                }
            } else {
                self.record(text);
            }
        }
        if moves > 5 {
            self.record(format!("... and {} more flow moves", moves - 5));
        }
    }

    /// Sends `datagram` on path `id` (its link socket, to its endpoint).
    fn send_on(&mut self, id: PathId, len: usize, from_out_buf: bool) {
        let Some(Some(p)) = self.paths.get(id.0 as usize) else {
            return;
        };
        let Some(ep) = p.endpoint else {
            return;
        };
        let buf = if from_out_buf {
            &self.out_buf
        } else {
            &self.net_buf
        };
        if self.links[p.link].sock.send_to(&buf[..len], ep).is_err() {
            self.counters.tx_errors += 1;
        }
    }

    /// Encrypts `packet` under path `id`'s session into `out_buf`; returns the datagram length
    /// (0 if the session queued it behind a handshake, which it then sends itself).
    fn encapsulate(&mut self, id: PathId, packet: &[u8]) -> usize {
        let Some(Some(p)) = self.paths.get_mut(id.0 as usize) else {
            return 0;
        };
        match p.tunn.encapsulate(packet, &mut self.out_buf) {
            TunnResult::WriteToNetwork(d) => d.len(),
            _ => 0,
        }
    }

    fn send_probes(&mut self, now: Instant) {
        while let Some(t) = self.engine.poll_transmit() {
            let Some(Some(p)) = self.paths.get(t.path.0 as usize) else {
                continue;
            };
            let dst = self.peers[p.peer].overlay;
            let mut pkt = std::mem::take(&mut self.probe_buf);
            if wire::udp_packet(
                self.overlay,
                dst,
                PROBE_SENDER_PORT,
                STAMP_PORT,
                &t.payload,
                &mut pkt,
            )
            .is_some()
            {
                let n = self.encapsulate(t.path, &pkt);
                if n > 0 {
                    self.send_on(t.path, n, true);
                }
                self.counters.probes_sent += 1;
            }
            self.probe_buf = pkt;
        }
        let _ = now;
    }

    fn wg_tick(&mut self) {
        for i in 0..self.paths.len() {
            let Some(Some(p)) = self.paths.get_mut(i) else {
                continue;
            };
            if let TunnResult::WriteToNetwork(d) = p.tunn.update_timers(&mut self.net_buf) {
                let n = d.len();
                self.send_on(PathId(i as u32), n, false);
            }
        }
    }

    fn read_tun(&mut self) {
        for _ in 0..16 {
            let n = match self.tun.recv_multiple(
                &mut self.rx_orig,
                &mut self.rx_bufs,
                &mut self.rx_sizes,
                VIRTIO_NET_HDR_LEN,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => continue,
            };
            let now = Instant::now();
            for i in 0..n {
                let len = self.rx_sizes[i];
                let buf = std::mem::take(&mut self.rx_bufs[i]);
                self.handle_lan_packet(&buf[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len], now);
                self.rx_bufs[i] = buf;
            }
        }
    }

    fn handle_lan_packet(&mut self, pkt: &[u8], now: Instant) {
        self.counters.tun_packets += 1;
        self.counters.tun_bytes += pkt.len() as u64;
        let Ok(meta) = PacketMeta::parse(pkt) else {
            self.counters.tx_dropped += 1;
            return;
        };
        match self.engine.decide(&meta, pkt.len(), now) {
            Decision::Send(p) => {
                let n = self.encapsulate(p, pkt);
                if n > 0 {
                    self.send_on(p, n, true);
                }
            }
            Decision::Duplicate { primary, secondary } => {
                let n = self.encapsulate(primary, pkt);
                if n > 0 {
                    self.send_on(primary, n, true);
                    self.send_on(secondary, n, true);
                }
            }
            Decision::Drop(_) => self.counters.tx_dropped += 1,
        }
    }

    fn read_link(&mut self, link: usize) {
        for _ in 0..READ_BUDGET {
            let Some(l) = self.links.get(link) else {
                return;
            };
            let (n, from) = match l.sock.recv_from(&mut self.net_buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return,
            };
            let now = Instant::now();
            let id = match wire::classify(&self.net_buf[..n]) {
                Some(WgMessage::Initiation) => self.by_endpoint.get(&(link, from)).copied(),
                Some(WgMessage::ToSession(r)) => {
                    let t = wire::tunnel_of(r);
                    (t > 0).then(|| PathId(t - 1))
                }
                None => None,
            };
            match id {
                Some(id) if matches!(self.paths.get(id.0 as usize), Some(Some(_))) => {
                    self.handle_datagram(id, link, from, n, now)
                }
                _ => self.counters.rx_unknown += 1,
            }
        }
    }

    fn handle_datagram(
        &mut self,
        id: PathId,
        link: usize,
        from: SocketAddr,
        n: usize,
        now: Instant,
    ) {
        let idx = id.0 as usize;
        let mut first = true;
        loop {
            let Some(Some(p)) = self.paths.get_mut(idx) else {
                return;
            };
            let input: &[u8] = if first { &self.net_buf[..n] } else { &[] };
            let result = p
                .tunn
                .decapsulate(Some(from.ip()), input, &mut self.out_buf);
            let was_first = first;
            first = false;
            match result {
                TunnResult::Done => return,
                TunnResult::Err(_) => {
                    if was_first {
                        self.counters.rx_rejected += 1;
                    }
                    return;
                }
                TunnResult::WriteToNetwork(d) => {
                    // Handshake responses and queued packets go back the way the peer came.
                    let len = d.len();
                    if let Some(l) = self.links.get(link) {
                        if l.sock.send_to(&self.out_buf[..len], from).is_err() {
                            self.counters.tx_errors += 1;
                        }
                    }
                    self.learn_endpoint(id, link, from, was_first);
                }
                TunnResult::WriteToTunnelV4(pkt, _) | TunnResult::WriteToTunnelV6(pkt, _) => {
                    let len = pkt.len();
                    self.learn_endpoint(id, link, from, was_first);
                    self.deliver(id, len, now);
                    return;
                }
            }
        }
    }

    /// Roaming: a peer whose endpoint on this path was unknown (or moved) is answered where its
    /// authenticated packets come from. Only the path's own link counts.
    fn learn_endpoint(&mut self, id: PathId, link: usize, from: SocketAddr, authenticated: bool) {
        let Some(Some(p)) = self.paths.get_mut(id.0 as usize) else {
            return;
        };
        if !authenticated || p.link != link || p.endpoint == Some(from) {
            return;
        }
        if let Some(old) = p.endpoint.replace(from) {
            self.by_endpoint.remove(&(link, old));
        }
        self.by_endpoint.insert((link, from), id);
    }

    /// A packet decrypted on path `id` is in `out_buf[..len]`.
    fn deliver(&mut self, id: PathId, len: usize, now: Instant) {
        let Some(Some(p)) = self.paths.get(id.0 as usize) else {
            return;
        };
        let peer = p.peer;
        let pkt = &self.out_buf[..len];
        if len == 0 {
            return; // keepalive
        }
        let allowed = wire::source(pkt)
            .is_some_and(|s| self.peers[peer].allowed.iter().any(|a| a.contains(s)));
        if !allowed {
            self.counters.rx_spoofed += 1;
            return;
        }
        match wire::inspect(pkt, self.overlay) {
            Inner::ProbeReply { payload } => {
                let _ = self.engine.handle_probe_reply(id, payload, now);
            }
            Inner::ProbeRequest {
                payload,
                from,
                sport,
                ttl,
            } => {
                if let Ok(reply) = self.engine.handle_probe_request(id, payload, ttl, now) {
                    let mut pkt = std::mem::take(&mut self.probe_buf);
                    if wire::udp_packet(self.overlay, from, STAMP_PORT, sport, &reply, &mut pkt)
                        .is_some()
                    {
                        let n = self.encapsulate(id, &pkt);
                        if n > 0 {
                            self.send_on(id, n, true);
                        }
                    }
                    self.probe_buf = pkt;
                }
            }
            Inner::Data => {
                self.engine.handle_data_received(id, len, now);
                self.counters.delivered_packets += 1;
                self.counters.delivered_bytes += len as u64;
                let mut b = self.tun_pool.pop().unwrap_or_default();
                b.clear();
                b.resize(VIRTIO_NET_HDR_LEN, 0);
                b.extend_from_slice(&self.out_buf[..len]);
                self.to_tun.push(b);
                if self.to_tun.len() >= IDEAL_BATCH_SIZE {
                    self.flush_tun();
                }
            }
        }
    }

    /// Writes the decrypted packets gathered so far to the TUN, coalesced where possible.
    fn flush_tun(&mut self) {
        if self.to_tun.is_empty() {
            return;
        }
        if self
            .tun
            .send_multiple(&mut self.gro, &mut self.to_tun, VIRTIO_NET_HDR_LEN)
            .is_err()
        {
            self.counters.tx_errors += 1;
        }
        self.tun_pool.append(&mut self.to_tun);
    }
}
