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
//! 5. Link socket (`recvmmsg`, up to 8 receives of up to 64 KB each, coalesced by UDP_GRO) →
//!    find the session (see [`crate::wire`]) → decrypt → a probe goes to the engine, anything
//!    else to the TUN (if its source is one the peer may use), and counts as evidence that the
//!    path is alive. TCP segments are decrypted in place into larger packets (see
//!    [`crate::coalesce`]), one TUN write each.
//!
//! The per-path WireGuard logic (sessions, key roll, handshake guard, where the peer is) is in
//! [`crate::session`], without I/O. Around it the loop keeps endpoint discovery (a STUN request
//! to the controller from each link's socket, see [`Discovery`]), each link's address (rebound
//! when the interface's changes) and the relay (frames of `patronus_api::relay` to and from the
//! controller's UDP port, for paths no direct handshake gets through).
//!
//! Sends use `sendmsg` with UDP_SEGMENT, up to 64 datagrams per call, not `sendmmsg`: what one
//! turn sends to one destination is already one call, and consecutive batches differ in socket
//! or in segment size, which one `sendmmsg` (whose control messages are shared) cannot carry.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::x25519::StaticSecret;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg,
    sendmsg, setsockopt, sockopt,
};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use patronus_api::{
    EdgeConfig, EdgeLink, FailoverReason, PathEventKind, PeerConfig, Prefix, ProbeMode,
};
use patronus_core::engine::{Engine, EngineConfig};
use patronus_core::packet::PacketMeta;
use patronus_core::probe::STAMP_PORT;
use patronus_core::{Decision, Event, PathId, PeerId};
use tun_rs::{DeviceBuilder, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::coalesce::Coalescer;
use crate::handshake::Bucket;
use crate::keys::PrivateKey;
use crate::session::{self, PathSession, Received, Sealed, public_of};
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
/// The longest a datagram is believed to have waited in its socket; a longer wait by the
/// clocks means the real-time clock was stepped.
const MAX_SOCKET_WAIT: Duration = Duration::from_secs(10);
/// `recvmmsg` calls per socket per wake-up, so one busy link cannot starve the others.
const READ_BUDGET: usize = 16;
/// Receives per `recvmmsg`, each up to 64 KB of datagrams the kernel coalesced.
const RECV_BATCH: usize = 8;
/// Most segments in one UDP_SEGMENT send (the kernel's limit).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one UDP_SEGMENT send: a UDP payload is at most 65,507 bytes over IPv4.
const GSO_MAX_BYTES: usize = 64_000;
/// Room for one encrypted datagram in a batch: the largest TUN packet we accept plus
/// WireGuard's 32 bytes of header and tag, plus padding to 16.
const MAX_DATAGRAM: usize = 9216 + 48;
/// Socket buffers: a few milliseconds of line rate, so bursts are not dropped.
const SOCKET_BUFFER: usize = 8 << 20;
/// The handshake queue's buffer: about 1,400 messages (a queued datagram takes about 768
/// bytes of buffer), 28 ms of a 50,000/s flood. A genuine message waits no longer than the
/// queue takes to drain; beyond that the flood is dropped by the kernel, at no cost to us.
const HANDSHAKE_BUFFER: usize = 1 << 20;
/// Handshake datagrams read from a link's handshake queue per wake-up: a flood gets this
/// much of each pass of the loop, and the data and the TUN the rest.
const HANDSHAKE_BUDGET: usize = 64;

/// Encrypted datagrams for one path (or path pair, in duplicate mode), sent with one
/// UDP_SEGMENT `sendmsg`: every datagram but the last has the same length.
struct TxBatch {
    key: Option<(PathId, Option<PathId>)>,
    buf: Vec<u8>,
    stride: usize,
    count: usize,
    len: usize,
    /// The last datagram was shorter than the stride: nothing more can follow it.
    closed: bool,
}

const TOKEN_TUN: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_CONFIG: u64 = 3;
/// Link `i`'s data socket is `TOKEN_LINK_BASE + 2 i`, its handshake socket the next.
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
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct EdgeCounters {
    pub tun_packets: u64,
    pub tun_bytes: u64,
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
    /// Writes to the TUN that carried them (fewer: segments of a TCP flow are coalesced).
    pub tun_writes: u64,
    /// Writes to the TUN that the kernel refused.
    pub tun_write_errors: u64,
    /// Datagrams that are not WireGuard, or name no session of ours.
    pub rx_unknown: u64,
    /// Datagrams a session refused (bad MAC, replay, stale). In `duplicate` mode the second
    /// copy of every packet lands here too.
    pub rx_rejected: u64,
    /// Decrypted packets whose source the peer may not use.
    pub rx_spoofed: u64,
    /// LAN packets the engine dropped (no route, no path, strict SLA).
    pub tx_dropped: u64,
    /// Sends the kernel refused.
    pub tx_errors: u64,
    pub probes_sent: u64,
    /// Probes not sent because their path's session had no completed handshake: queued behind
    /// it, a probe would time the handshake, not the path. The engine counts them lost.
    #[serde(default)]
    pub probes_unsent: u64,
    /// Paths whose sending session moved to a new key (ours or the peer's) in a key roll.
    #[serde(default)]
    pub sessions_rekeyed: u64,
    /// Handshake messages passed to their session (see [`crate::handshake`]).
    #[serde(default)]
    pub handshakes_admitted: u64,
    /// Cookie replies sent to handshake messages that came while their path was under load.
    #[serde(default)]
    pub handshake_cookies_sent: u64,
    /// Handshake messages dropped unanswered: under load, and the cookie budget spent.
    #[serde(default)]
    pub handshakes_dropped: u64,
    /// Paths whose peer's endpoint moved to the source of an authenticated datagram (the peer
    /// roamed, or its NAT mapped it anew; see [`crate::session`]).
    #[serde(default)]
    pub endpoints_moved: u64,
}

/// One WAN link's sockets (see [`crate::linksock`]).
struct LinkSock {
    name: String,
    /// The interface it is on.
    dev: String,
    /// The address its sockets are bound to: the configured one, or the one the interface got
    /// instead (see [`Edge::check_addresses`]).
    address: IpAddr,
    /// Data and probes; every send goes from here.
    sock: UdpSocket,
    /// Handshake messages, when the kernel gave them their own queue.
    hs: Option<UdpSocket>,
    v6: bool,
    /// Its endpoint discovery (see [`Discovery`]).
    stun: LinkStun,
    /// The relay this link's paths may fall back to: the controller's UDP port it asks (see
    /// [`patronus_api::relay`]).
    relay: Option<SocketAddr>,
    /// What the kernel dropped for want of room in each queue (data, handshake), as it last
    /// said (`SO_RXQ_OVFL`, a running count per socket).
    drops: [u32; 2],
}

/// Where an edge asks its controller how each of its links is seen from outside: a STUN
/// Binding request (`patronus_api::stun`) from each link's own socket, keyed with the site's
/// credential. The controller records the source it saw as the link's observed endpoint and
/// gives it to the site's peers; the answer tells this edge the same (its status shows it).
#[derive(Clone)]
pub struct Discovery {
    /// The controller's STUN addresses; a link asks the first of its own address family.
    pub servers: Vec<SocketAddr>,
    /// The site's name.
    pub site: String,
    /// SHA-256 of the site's credential.
    pub key: [u8; 32],
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("servers", &self.servers)
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

/// How often a link asks again once answered: the answer may change (a NAT's mapping, a new
/// address), and the request keeps the link's mapping towards the controller open.
const STUN_EVERY: Duration = Duration::from_secs(25);
/// The first retry of an unanswered request; each next one waits twice as long, up to
/// [`STUN_EVERY`].
const STUN_RETRY: Duration = Duration::from_secs(1);
/// The most paths an initiation from an unknown address is tried on (see
/// [`Edge::initiation_from_elsewhere`]).
const MAX_INITIATION_CANDIDATES: usize = 4;
/// How often the links' interfaces are checked for a new address.
const ADDRESS_CHECK_EVERY: Duration = Duration::from_millis(500);

/// A link's endpoint discovery.
#[derive(Debug, Default)]
struct LinkStun {
    /// The request waiting for its answer: its transaction.
    pending: Option<[u8; 12]>,
    /// When to ask next (none: at the next tick).
    next_at: Option<Instant>,
    /// Requests unanswered in a row (the retry's backoff).
    unanswered: u32,
    /// When the last request went.
    sent_at: Option<Instant>,
    /// Where the controller last saw this link's socket, and when it said so.
    observed: Option<(SocketAddr, Instant)>,
    /// The controller's last refusal (a STUN error code), until it answers again.
    refused: Option<u16>,
}

impl LinkSock {
    /// Sends datagram `d` to `to`; framed with `hdr` (a path's relay header) when `to` is this
    /// link's relay. Whether the kernel took it.
    fn send(&self, d: &[u8], to: SocketAddr, hdr: &[u8]) -> bool {
        if Some(to) == self.relay && !hdr.is_empty() {
            let addr = SockaddrStorage::from(to);
            sendmsg(
                self.sock.as_raw_fd(),
                &[IoSlice::new(hdr), IoSlice::new(d)],
                &[],
                MsgFlags::empty(),
                Some(&addr),
            )
            .is_ok()
        } else {
            self.sock.send_to(d, to).is_ok()
        }
    }
}

/// Paths with no session after this many hellos (one a second) go through the relay, if their
/// link has one.
const RELAY_AFTER_HELLOS: u32 = 2;

/// Which of a link's queues to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Data,
    Handshake,
}

/// One path at run time.
struct PathRt {
    peer: usize,
    link: usize,
    /// Its WireGuard sessions and where the peer's end is.
    s: PathSession,
    /// The relay header that names the peer's end (see [`patronus_api::relay`]).
    relay_hdr: Vec<u8>,
}

/// Now, in Unix milliseconds (the clock events are reported with).
/// When a datagram read at `now` (`wall` on the real-time clock) arrived, by the kernel's
/// stamp on that clock: earlier by the time it waited in the socket. `now` when there is no
/// stamp, or when the clocks disagree beyond reason (the real-time clock was stepped).
fn arrival(now: Instant, wall: Option<TimeSpec>, stamp: Option<TimeSpec>) -> Instant {
    let (Some(wall), Some(stamp)) = (wall, stamp) else {
        return now;
    };
    let waited = Duration::from(wall).checked_sub(Duration::from(stamp));
    match waited {
        Some(w) if w <= MAX_SOCKET_WAIT => now.checked_sub(w).unwrap_or(now),
        _ => now,
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct PeerRt {
    overlay: IpAddr,
    /// As configured; a peer whose configuration changes is removed and added again.
    config: PeerConfig,
    /// False once removed (its id is not used again).
    active: bool,
}

/// The prefixes routed through the TUN for a peer: its LAN prefixes and its overlay address.
fn routed(p: &PeerConfig) -> Vec<Prefix> {
    let host = if p.overlay.is_ipv4() { 32 } else { 128 };
    let mut v = p.lan_prefixes.clone();
    v.push(Prefix::truncating(p.overlay, host));
    v
}

/// Whether local link `l` and peer link `r` make a path: the same address family, or a peer
/// link with no endpoint known yet (one may be learned).
fn pairs(l: &EdgeLink, r: &patronus_api::Link) -> bool {
    r.endpoint
        .is_none_or(|e| e.is_ipv6() == l.address.is_ipv6())
}

/// The (local link, peer link) pairs peer `p`'s paths are, by index.
fn path_pairs(local_links: &[EdgeLink], p: &PeerConfig) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for (li, l) in local_links.iter().enumerate() {
        for (ri, r) in p.links.iter().enumerate() {
            if pairs(l, r) {
                v.push((li, ri));
            }
        }
    }
    v
}

/// Registers peer `p` with the engine and builds a WireGuard session for each of its paths:
/// every local link × every remote link of the same address family.
#[allow(clippy::too_many_arguments)] // the edge's parts a peer is built into, and its settings
fn build_peer(
    engine: &mut Engine,
    local_links: &[EdgeLink],
    secret: &StaticSecret,
    p: &PeerConfig,
    now: Instant,
    paths: &mut Vec<Option<PathRt>>,
    by_endpoint: &mut HashMap<(usize, SocketAddr), PathId>,
    by_relay: &mut [HashMap<Vec<u8>, PathId>],
    keepalive_s: u16,
) -> Result<(PeerId, PeerRt), EdgeError> {
    let peer = engine
        .add_peer(p.name.as_str(), &routed(p))
        .map_err(|e| EdgeError::Config(format!("peer {}: {e}", p.name)))?;
    let rt = PeerRt {
        overlay: p.overlay,
        config: p.clone(),
        active: true,
    };
    for (li, l) in local_links.iter().enumerate() {
        for r in &p.links {
            if !pairs(l, r) {
                continue;
            }
            let id = match engine.add_path(peer, &l.link, r, now) {
                Ok(id) => id,
                Err(e) => {
                    // The peer goes as a whole or not at all.
                    engine.remove_peer(peer);
                    return Err(EdgeError::Config(format!("peer {}: {e}", p.name)));
                }
            };
            if id.0 + 1 >= session::GEN_BIT {
                engine.remove_peer(peer);
                return Err(EdgeError::Config(format!(
                    "peer {}: more than {} paths",
                    p.name,
                    session::GEN_BIT - 2
                )));
            }
            let slot = id.0 as usize;
            if paths.len() <= slot {
                paths.resize_with(slot + 1, || None);
            }
            if let Some(ep) = r.endpoint {
                by_endpoint.insert((li, ep), id);
            }
            let names = patronus_api::relay::names(p.name.as_str(), r.name.as_str());
            if let Some(m) = by_relay.get_mut(li) {
                m.insert(names.clone(), id);
            }
            paths[slot] = Some(PathRt {
                peer: peer.0 as usize,
                link: li,
                // A peer rolling its key: its next key is accepted from the start.
                s: PathSession::new(
                    secret,
                    p.public_key.0,
                    p.next_public_key.map(|k| k.0),
                    id,
                    r.endpoint,
                    Some(keepalive_s),
                ),
                relay_hdr: patronus_api::relay::header_for(patronus_api::relay::TO, &names),
            });
        }
    }
    Ok((peer, rt))
}

/// Where a new configuration is handed to a running edge (from another thread).
#[derive(Debug)]
pub struct ConfigInbox {
    slot: std::sync::Mutex<Option<EdgeConfig>>,
    roll: std::sync::Mutex<Option<Roll>>,
    /// Endpoint discovery to start, change or stop (the inner `None`).
    discovery: std::sync::Mutex<Option<Option<Discovery>>>,
    wake: EventFd,
}

/// A step of this edge's key roll, handed to the running edge.
#[derive(Debug)]
pub enum Roll {
    /// Start moving every path's session to this new key (the peers have been told to accept
    /// it): each path handshakes with it beside its current session, and sends on it once the
    /// handshake is done.
    Begin(PrivateKey),
    /// The controller has made the new key the site's: the paths that have not moved (down
    /// ones) move now, and new sessions use it.
    Commit,
}

impl ConfigInbox {
    /// Hands the edge a step of its key roll.
    pub fn roll(&self, step: Roll) {
        if let Ok(mut s) = self.roll.lock() {
            *s = Some(step);
        }
        let _ = self.wake.write(1);
    }

    /// Starts endpoint discovery with `d`, or changes it (another controller, say), or stops
    /// it (`None`).
    pub fn discover(&self, d: Option<Discovery>) {
        if let Ok(mut s) = self.discovery.lock() {
            *s = Some(d);
        }
        let _ = self.wake.write(1);
    }

    /// Hands `cfg` to the edge, replacing one it has not taken yet; the edge applies it in its
    /// loop.
    pub fn send(&self, cfg: EdgeConfig) {
        if let Ok(mut s) = self.slot.lock() {
            *s = Some(cfg);
        }
        let _ = self.wake.write(1);
    }
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
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RecentEvent {
    pub unix_ms: u128,
    pub text: String,
}

pub struct Edge {
    site: String,
    public_key: String,
    tun_name: String,
    started: Instant,
    /// The same moment, Unix ms: the counters' origin for whoever reads them elsewhere.
    started_unix_ms: i64,
    /// This edge's key roll in progress: the new key, its public half, and when it began.
    roll: Option<(StaticSecret, String, Instant)>,
    shared: Shared,
    next_publish: Instant,
    failovers: BTreeMap<FailoverReason, u64>,
    /// Structured failover events, for the controller.
    failover_log: VecDeque<patronus_api::FailoverEvent>,
    failover_seq: u64,
    /// Structured path state changes, for the controller.
    path_log: VecDeque<patronus_api::PathEvent>,
    /// The sequence number of the last probe sent as an ICMP echo request.
    echo_seq: u16,
    path_seq: u64,
    overlay: IpAddr,
    engine: Engine,
    tun: SyncDevice,
    tun_mtu: u16,
    /// The largest MTU the TUN's buffers hold.
    tun_mtu_cap: u16,
    links: Vec<LinkSock>,
    paths: Vec<Option<PathRt>>,
    by_endpoint: HashMap<(usize, SocketAddr), PathId>,
    /// Paths by (local link, peer's site, peer's link), for relayed datagrams.
    /// Keyed by the peer's site and link as a relay frame names them
    /// (`patronus_api::relay::names`), one map per local link.
    by_relay: Vec<HashMap<Vec<u8>, PathId>>,
    peers: Vec<PeerRt>,
    epoll: Epoll,
    timer: TimerFd,
    /// When the timer will fire, if armed: it is re-armed only for an earlier deadline (a
    /// later one just costs a wake-up that re-arms it), saving a system call per turn.
    timer_at: Option<Instant>,
    stop: Arc<EventFd>,
    next_wg_tick: Instant,
    /// The edge's budget of cookie replies, over all paths.
    cookies: Bucket,
    handshake: patronus_api::HandshakeLimits,
    counters: EdgeCounters,
    events: VecDeque<RecentEvent>,
    // Buffers, reused.
    rx_orig: Vec<u8>,
    rx_bufs: Vec<Vec<u8>>,
    rx_sizes: Vec<usize>,
    /// Receive buffers, one per message of a `recvmmsg`.
    net_bufs: Vec<Vec<u8>>,
    out_buf: Vec<u8>,
    probe_buf: Vec<u8>,
    /// Decrypted packets on their way to the TUN.
    to_tun: Coalescer,
    tx: TxBatch,
    // For changes while running.
    secret: StaticSecret,
    local_links: Vec<EdgeLink>,
    tun_index: u32,
    current: EdgeConfig,
    inbox: Arc<ConfigInbox>,
    /// Endpoint discovery, once the edge's agent gave it (see [`Discovery`]).
    discovery: Option<Discovery>,
    /// When the links' interfaces are next checked for a new address.
    next_address_check: Instant,
    /// Cleared when the kernel refuses UDP_SEGMENT; sends then go one datagram at a time.
    gso: bool,
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

/// A link's sockets, bound to `addr` on device `dev`, with the options the loop relies on.
fn open_link(name: String, dev: String, addr: SocketAddr) -> Result<LinkSock, EdgeError> {
    let (socks, note) =
        crate::linksock::bind_link(addr, Some(&dev)).map_err(|e| EdgeError::Io {
            what: format!("link {name}: {}", e.what),
            error: e.error,
        })?;
    if let Some(note) = note {
        eprintln!("edge: link {name}: {note}");
    }
    for sock in std::iter::once(&socks.data).chain(&socks.handshake) {
        // Coalesced receive (UDP_GRO) and large buffers; both only help, so a kernel
        // that refuses them is noted and the edge carries on. (UDP_GRO on both: the
        // kernel's GRO picks a socket of the group by hash, before the steering.)
        if let Err(e) = setsockopt(sock, sockopt::UdpGroSegment, &true) {
            eprintln!("edge: link {name}: no UDP_GRO ({e}); receiving one datagram per call");
        }
        // The kernel's receive time of each datagram: a probe read late (the loop was
        // busy or stopped) is still measured from when it came (see `read_link`).
        if let Err(e) = setsockopt(sock, sockopt::ReceiveTimestampns, &true) {
            eprintln!(
                "edge: link {name}: no receive timestamps ({e}); probes read late will \
                 measure the lateness too"
            );
        }
        // The count of datagrams dropped for want of room, on every read.
        let _ = setsockopt(sock, sockopt::RxqOvfl, &1);
        let _ = setsockopt(sock, sockopt::SndBufForce, &SOCKET_BUFFER);
    }
    let _ = setsockopt(&socks.data, sockopt::RcvBufForce, &SOCKET_BUFFER);
    if let Some(hs) = &socks.handshake {
        let _ = setsockopt(hs, sockopt::RcvBufForce, &HANDSHAKE_BUFFER);
    }
    Ok(LinkSock {
        name,
        dev,
        address: addr.ip(),
        sock: socks.data,
        hs: socks.handshake,
        v6: addr.is_ipv6(),
        drops: [0; 2],
        stun: LinkStun::default(),
        relay: None,
    })
}

/// Whether `a` is link-local (not an address a link is reached at from elsewhere).
fn is_link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The TUN MTU for `cfg`: the smallest MTU of the links its paths cross, ours and the peers'
/// (a packet leaves on one of ours and arrives on one of theirs), less WireGuard's overhead.
fn tun_mtu_for(cfg: &EdgeConfig, v6_underlay: bool) -> u16 {
    let overhead = if v6_underlay {
        OVERHEAD_V6
    } else {
        OVERHEAD_V4
    };
    cfg.links
        .iter()
        .map(|l| l.link.mtu)
        .chain(cfg.peers.iter().flat_map(|p| {
            p.links
                .iter()
                .filter(|l| l.endpoint.is_some())
                .map(|l| l.mtu)
        }))
        .min()
        .unwrap_or(1500)
        .saturating_sub(overhead)
}

/// The path engine's part of `cfg`.
fn engine_config(cfg: &EdgeConfig, instance: u32) -> EngineConfig {
    EngineConfig {
        failover: cfg.failover.clone(),
        classes: cfg.classes.clone(),
        policies: cfg.policies.clone(),
        default_class: cfg.default_class.clone(),
        default_steering: cfg.default_steering,
        instance,
        ..EngineConfig::default()
    }
}

/// Everything an edge would refuse in `cfg` that can be known without the machine: the
/// configuration's own checks and the path engine's (classes, failover settings, policies).
/// A configuration that passes is one a running edge applies whole.
pub fn check(cfg: &EdgeConfig) -> Result<(), EdgeError> {
    cfg.validate()
        .map_err(|e| EdgeError::Config(e.to_string()))?;
    engine_config(cfg, 0)
        .validate()
        .map_err(|e| EdgeError::Config(e.to_string()))
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
        let mut engine = Engine::new(engine_config(cfg, u32::from_le_bytes(instance)), now)
            .map_err(|e| EdgeError::Config(e.to_string()))?;

        // Sockets: one per link, bound to the link's address and device.
        let mut links = Vec::new();
        for l in &cfg.links {
            let name = l.link.name.to_string();
            let dev = l.interface.clone().unwrap_or_else(|| name.clone());
            links.push(open_link(
                name,
                dev,
                SocketAddr::new(l.address, cfg.listen_port),
            )?);
        }

        // The TUN device: MTU leaves room for WireGuard on the smallest link any path crosses.
        let tun_mtu = tun_mtu_for(cfg, links.iter().any(|l| l.v6));
        let tun = DeviceBuilder::new()
            .name(cfg.tun_name.clone())
            .mtu(tun_mtu)
            .offload(true)
            // Room for a burst from the LAN while the loop is busy with the WAN side.
            .tx_queue_len(5_000)
            .build_sync()
            .map_err(io_err(format!("creating TUN {}", cfg.tun_name)))?;
        tun.set_nonblocking(true)
            .map_err(io_err("non-blocking TUN"))?;
        let all_routed: Vec<Prefix> = cfg.peers.iter().flat_map(routed).collect();
        let tun_index = nix::net::if_::if_nametoindex(cfg.tun_name.as_str())
            .map_err(sys_err(format!("finding {}", cfg.tun_name)))?;
        crate::routes::install(&cfg.tun_name, tun_index, cfg.overlay, &all_routed)
            .map_err(EdgeError::Config)?;

        // Peers and their paths.
        let secret: StaticSecret = key.secret().clone();
        let mut peers = Vec::new();
        let mut paths: Vec<Option<PathRt>> = Vec::new();
        let mut by_endpoint = HashMap::new();
        let mut by_relay = vec![HashMap::new(); cfg.links.len()];
        for p in &cfg.peers {
            let (id, rt) = build_peer(
                &mut engine,
                &cfg.links,
                &secret,
                p,
                now,
                &mut paths,
                &mut by_endpoint,
                &mut by_relay,
                cfg.keepalive_s,
            )?;
            debug_assert_eq!(id.0 as usize, peers.len());
            peers.push(rt);
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
        let inbox = Arc::new(ConfigInbox {
            slot: std::sync::Mutex::new(None),
            roll: std::sync::Mutex::new(None),
            discovery: std::sync::Mutex::new(None),
            wake: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(sys_err("eventfd"))?,
        });
        add(inbox.wake.as_fd(), TOKEN_CONFIG)?;
        for (i, l) in links.iter().enumerate() {
            add(l.sock.as_fd(), TOKEN_LINK_BASE + 2 * i as u64)?;
            if let Some(hs) = &l.hs {
                add(hs.as_fd(), TOKEN_LINK_BASE + 2 * i as u64 + 1)?;
            }
        }
        let buf_len = VIRTIO_NET_HDR_LEN + usize::from(tun_mtu).max(1500) + 64;
        let shared: Shared = Arc::default();
        if let Some(addr) = cfg.metrics_listen {
            let token = match &cfg.metrics_token_file {
                Some(f) => Some(status::read_token(f).map_err(EdgeError::Config)?),
                None => None,
            };
            let listener = std::net::TcpListener::bind(addr)
                .map_err(io_err(format!("metrics_listen {addr}")))?;
            let s = shared.clone();
            std::thread::Builder::new()
                .name("edge-status".into())
                .spawn(move || status::serve(listener, s, token))
                .map_err(io_err("starting the status thread"))?;
        }
        Ok(Self {
            site: cfg.site.to_string(),
            public_key: key.public().to_string(),
            tun_name: cfg.tun_name.clone(),
            started: now,
            roll: None,
            started_unix_ms: unix_ms(),
            shared,
            next_publish: now,
            failovers: BTreeMap::new(),
            failover_log: VecDeque::new(),
            failover_seq: 0,
            path_log: VecDeque::new(),
            echo_seq: 0,
            path_seq: 0,
            overlay: cfg.overlay,
            engine,
            tun,
            tun_mtu,
            tun_mtu_cap: tun_mtu.max(1500 - OVERHEAD_V4),
            links,
            paths,
            by_endpoint,
            by_relay,
            peers,
            epoll,
            timer,
            timer_at: None,
            stop,
            next_wg_tick: now,
            cookies: Bucket::new(cfg.handshake.cookies_per_edge_per_s, now),
            handshake: cfg.handshake,
            counters: EdgeCounters::default(),
            events: VecDeque::new(),
            rx_orig: vec![0; VIRTIO_NET_HDR_LEN + 65_536],
            rx_bufs: (0..IDEAL_BATCH_SIZE).map(|_| vec![0; buf_len]).collect(),
            rx_sizes: vec![0; IDEAL_BATCH_SIZE],
            net_bufs: (0..RECV_BATCH).map(|_| vec![0; 65_536 + 148]).collect(),
            out_buf: vec![0; 65_536 + 148],
            probe_buf: Vec::with_capacity(128),
            to_tun: Coalescer::new(),
            tx: TxBatch {
                key: None,
                buf: vec![0; GSO_MAX_BYTES + MAX_DATAGRAM],
                stride: 0,
                count: 0,
                len: 0,
                closed: false,
            },
            gso: true,
            secret,
            local_links: cfg.links.clone(),
            tun_index,
            current: cfg.clone(),
            inbox,
            discovery: None,
            next_address_check: now + ADDRESS_CHECK_EVERY,
        })
    }

    /// The TUN device's MTU.
    pub fn tun_mtu(&self) -> u16 {
        self.tun_mtu
    }

    /// The status snapshot the loop publishes (every 250 ms), for reporters.
    pub fn status_shared(&self) -> Shared {
        self.shared.clone()
    }

    /// Where another thread hands this edge a new configuration.
    pub fn config_inbox(&self) -> Arc<ConfigInbox> {
        self.inbox.clone()
    }

    /// Applies a new configuration without disturbing what it does not change: peers that are
    /// the same keep their sessions, paths and flows; a peer that is new is added, one that is
    /// gone is removed, one that changed (key, links, prefixes) is removed and added again;
    /// new policies, SLA classes or failover settings take effect at once (paths keep their
    /// measurements and hold-downs, flows are placed again on their next packet and keep their
    /// path if it still fits). What cannot change in a running edge (its own links, overlay
    /// address, TUN, port) is reported and waits for a restart.
    /// Returns what was done, one line each.
    pub fn apply(&mut self, new: &EdgeConfig) -> Vec<String> {
        let mut notes = Vec::new();
        let cur = &self.current;
        if new.site != cur.site
            || new.overlay != cur.overlay
            || new.links != cur.links
            || new.listen_port != cur.listen_port
            || new.tun_name != cur.tun_name
            || new.metrics_listen != cur.metrics_listen
            || new.metrics_token_file != cur.metrics_token_file
            || new.keepalive_s != cur.keepalive_s
        {
            notes.push(
                "this edge's own links or addresses changed: applied at its next start".into(),
            );
        }
        let classes_changed = new.classes != cur.classes
            || new.failover != cur.failover
            || new.default_class != cur.default_class
            || new.default_steering != cur.default_steering;
        let now = Instant::now();
        let mut refused = false;
        let (mut added, mut removed) = (0, 0);
        // A peer whose keys alone changed rolls its key, one whose links' endpoints alone
        // changed moved (its NAT, a new address): its sessions change in place, its routes,
        // paths and flows stay.
        let (mut rekeyed, mut moved) = (0, 0);
        for i in 0..self.peers.len() {
            let rt = &self.peers[i];
            if !rt.active || new.peers.contains(&rt.config) {
                continue;
            }
            let same = |np: &&PeerConfig| {
                let mut a = (*np).clone();
                a.public_key = rt.config.public_key;
                a.next_public_key = rt.config.next_public_key;
                // Endpoints that make the same paths (see `build_peer`).
                if path_pairs(&self.local_links, np) != path_pairs(&self.local_links, &rt.config) {
                    return false;
                }
                for (l, old) in a.links.iter_mut().zip(&rt.config.links) {
                    l.endpoint = old.endpoint;
                }
                a == rt.config
            };
            if let Some(np) = new.peers.iter().find(same) {
                let np = np.clone();
                let old = rt.config.clone();
                if (np.public_key, np.next_public_key) != (old.public_key, old.next_public_key) {
                    self.rekey_peer(i, &np);
                    rekeyed += 1;
                }
                if np.links != old.links {
                    self.move_peer(i, &np, now);
                    moved += 1;
                }
                self.peers[i].config = np;
            }
        }
        if rekeyed > 0 {
            notes.push(format!("{rekeyed} peers' keys rolled in place"));
        }
        if moved > 0 {
            notes.push(format!("{moved} peers' endpoints changed in place"));
        }
        // Gone or changed peers leave first, so that a changed peer can take its prefixes again.
        for i in 0..self.peers.len() {
            let rt = &self.peers[i];
            if !rt.active || new.peers.contains(&rt.config) {
                continue;
            }
            self.remove_peer_rt(i);
            removed += 1;
        }
        for p in &new.peers {
            if self.peers.iter().any(|rt| rt.active && rt.config == *p) {
                continue;
            }
            match build_peer(
                &mut self.engine,
                &self.local_links,
                &self.secret,
                p,
                now,
                &mut self.paths,
                &mut self.by_endpoint,
                &mut self.by_relay,
                new.keepalive_s,
            ) {
                Ok((id, rt)) => {
                    debug_assert_eq!(id.0 as usize, self.peers.len());
                    self.peers.push(rt);
                    if let Err(e) = crate::routes::add(&self.tun_name, self.tun_index, &routed(p)) {
                        notes.push(format!("peer {}: {e}", p.name));
                    }
                    added += 1;
                }
                Err(e) => notes.push(e.to_string()),
            }
        }
        if classes_changed {
            match self.engine.reconfigure(
                new.failover.clone(),
                new.classes.clone(),
                new.default_class.clone(),
                new.default_steering,
                new.policies.clone(),
                now,
            ) {
                Ok(()) => notes.push(format!(
                    "{} SLA classes, the failover settings and {} policies in force",
                    new.classes.len(),
                    new.policies.len()
                )),
                Err(e) => {
                    refused = true;
                    notes.push(format!(
                        "the new SLA classes, failover settings and policies were refused: {e}"
                    ));
                }
            }
        } else if new.policies != self.current.policies {
            match self.engine.set_policies(new.policies.clone()) {
                Ok(()) => notes.push(format!("{} policies in force", new.policies.len())),
                Err(e) => {
                    refused = true;
                    notes.push(format!("the new policies were refused: {e}"));
                }
            }
        }
        if added + removed > 0 {
            notes.push(format!("peers: {added} added, {removed} removed"));
        }
        // A peer's link with a smaller MTU lowers the TUN's at once (and its removal raises it
        // again), within what the TUN's buffers were made for.
        let mtu = tun_mtu_for(new, self.links.iter().any(|l| l.v6)).min(self.tun_mtu_cap);
        if mtu != self.tun_mtu {
            match self.tun.set_mtu(mtu) {
                Ok(()) => {
                    notes.push(format!("TUN MTU {} -> {mtu}", self.tun_mtu));
                    self.tun_mtu = mtu;
                }
                Err(e) => notes.push(format!("TUN MTU {mtu}: {e}")),
            }
        }
        if new.handshake != self.handshake {
            // New budgets start full; the paths' counts of the current second are kept.
            self.handshake = new.handshake;
            self.cookies = Bucket::new(new.handshake.cookies_per_edge_per_s, now);
            for p in self.paths.iter_mut().flatten() {
                p.s.reset_guard();
            }
            notes.push("handshake limits changed".into());
        }
        let old = std::mem::replace(&mut self.current, new.clone());
        if refused {
            // What is in force is still the old: a later configuration is compared with it.
            self.current.classes = old.classes;
            self.current.failover = old.failover;
            self.current.default_class = old.default_class;
            self.current.default_steering = old.default_steering;
            self.current.policies = old.policies;
        }
        for n in &notes {
            self.record(format!("configuration: {n}"));
        }
        self.publish(now);
        notes
    }

    /// Removes peer `i`: its sessions and paths, its prefixes from the engine and the routes.
    fn remove_peer_rt(&mut self, i: usize) {
        let id = PeerId(i as u32);
        for pid in self.engine.peer_paths(id).to_vec() {
            if let Some(slot) = self.paths.get_mut(pid.0 as usize) {
                *slot = None;
            }
        }
        let paths = &self.paths;
        self.by_endpoint
            .retain(|_, p| matches!(paths.get(p.0 as usize), Some(Some(_))));
        for m in &mut self.by_relay {
            m.retain(|_, p| matches!(paths.get(p.0 as usize), Some(Some(_))));
        }
        self.engine.remove_peer(id);
        let prefixes = routed(&self.peers[i].config);
        if let Err(e) = crate::routes::remove(&self.tun_name, self.tun_index, &prefixes) {
            self.record(format!(
                "configuration: peer {}: {e}",
                self.peers[i].config.name
            ));
        }
        self.peers[i].active = false;
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
            let mut now = Instant::now();
            if self
                .engine
                .poll_timeout()
                .is_some_and(|t| now.saturating_duration_since(t) > patronus_core::path::LATE)
            {
                // Late (the host was busy or the process stopped): read what came meanwhile
                // first, so replies that arrived count before any path is judged silent.
                for l in 0..self.links.len() {
                    self.read_link(l, Queue::Data);
                }
                self.flush_tun(false);
                now = Instant::now();
            }
            self.engine.handle_timeout(now);
            self.send_probes();
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
                    TOKEN_CONFIG => {
                        let _ = self.inbox.wake.read();
                        let next = self.inbox.slot.lock().ok().and_then(|mut s| s.take());
                        if let Some(cfg) = next {
                            self.apply(&cfg);
                        }
                        let discovery = self.inbox.discovery.lock().ok().and_then(|mut s| s.take());
                        if let Some(d) = discovery {
                            self.set_discovery(d);
                        }
                        let roll = self.inbox.roll.lock().ok().and_then(|mut s| s.take());
                        match roll {
                            Some(Roll::Begin(key)) => self.begin_roll(&key, Instant::now()),
                            Some(Roll::Commit) => self.commit_roll(),
                            None => {}
                        }
                    }
                    TOKEN_TIMER => {
                        let _ = self.timer.wait();
                        self.timer_at = None;
                    }
                    TOKEN_TUN => self.read_tun()?,
                    t => {
                        let (link, hs) = ((t - TOKEN_LINK_BASE) / 2, t % 2 == 1);
                        let queue = if hs { Queue::Handshake } else { Queue::Data };
                        self.read_link(link as usize, queue);
                    }
                }
            }
            self.flush_tun(false);
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
                    endpoint: rt.s.endpoint(),
                    relayed: rt.s.endpoint().is_some()
                        && rt.s.endpoint() == self.links.get(rt.link).and_then(|l| l.relay),
                    state: snap.state,
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
                    last_handshake_s: rt.s.last_handshake().map(|d| d.as_secs_f64()),
                })
            })
            .collect();
        EdgeStatus {
            site: self.site.clone(),
            public_key: self.public_key.clone(),
            tun: self.tun_name.clone(),
            tun_mtu: self.tun_mtu,
            uptime_s: now.duration_since(self.started).as_secs_f64(),
            counters: self.counters,
            probe_requests_rejected: self.engine.stats().probe_requests_rejected,
            probe_replies_rejected: self.engine.stats().replies_rejected,
            loop_late: self.engine.stats().late_wakeups,
            loop_late_seconds: self.engine.stats().late_total.as_secs_f64(),
            loop_late_max_seconds: self.engine.stats().late_max.as_secs_f64(),
            peer_silences: self.engine.stats().peer_silences,
            path_downs: self.engine.stats().paths_down,
            flow_table_full: self.engine.stats().flow_table_full,
            failovers: self.failovers.clone(),
            failover_outages: self.engine.stats().failover_outages.into(),
            failover_events: self.failover_log.iter().cloned().collect(),
            path_events: self.path_log.iter().cloned().collect(),
            flows: self.engine.flow_count(),
            started_unix_ms: self.started_unix_ms,
            key_roll: self.roll.as_ref().map(|(secret, public, since)| {
                let new = public_of(secret);
                let mut r = status::RollStatus {
                    public_key: public.clone(),
                    since_s: now.saturating_duration_since(*since).as_secs_f64(),
                    ..Default::default()
                };
                for id in self.engine.path_ids() {
                    let Some(Some(p)) = self.paths.get(id.0 as usize) else {
                        continue;
                    };
                    if self
                        .engine
                        .path(id, now)
                        .is_none_or(|s| s.state == patronus_core::PathState::Down)
                    {
                        continue;
                    }
                    r.live_paths += 1;
                    // Moved: its sending session is made with the new key.
                    r.moved += usize::from(p.s.sends_with(new));
                }
                r
            }),
            classes: self
                .engine
                .class_counters()
                .map(|(c, p, b, breaches)| status::ClassStatus {
                    class: c.to_string(),
                    tx_packets: p,
                    tx_bytes: b,
                    sla_breaches: breaches,
                })
                .collect(),
            links: self
                .links
                .iter()
                .map(|l| status::LinkStatus {
                    name: l.name.clone(),
                    handshake_queue: l.hs.is_some(),
                    data_drops: u64::from(l.drops[0]),
                    handshake_drops: u64::from(l.drops[1]),
                    address: Some(l.address),
                    observed: l.stun.observed.map(|(a, _)| a),
                    observed_age_s: l
                        .stun
                        .observed
                        .map(|(_, t)| now.saturating_duration_since(t).as_secs_f64()),
                    stun_refused: l.stun.refused,
                })
                .collect(),
            // Joined when served (see status::control_now).
            control: None,
            paths,
            events: self.events.iter().cloned().collect(),
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
        let now = Instant::now();
        if self
            .timer_at
            .is_some_and(|armed| armed <= at && armed > now)
        {
            return;
        }
        let wait = at
            .saturating_duration_since(now)
            .max(Duration::from_micros(1));
        self.timer_at = Some(now + wait);
        let _ = self.timer.set(
            Expiration::OneShot(TimeSpec::from_duration(wait)),
            TimerSetTimeFlags::empty(),
        );
    }

    /// Prints an event and keeps it for status.
    fn record(&mut self, text: String) {
        eprintln!("edge: {text}");
        if self.events.len() == RECENT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(RecentEvent {
            unix_ms: unix_ms() as u128,
            text,
        });
    }

    fn path_name(&self, id: PathId, now: Instant) -> String {
        match self.engine.path(id, now) {
            Some(p) => format!("{}:{}->{}", p.peer_name, p.local_link, p.remote_link),
            None => format!("path {}", id.0),
        }
    }

    fn drain_events(&mut self, now: Instant) {
        let mut moves = 0u32;
        // Flow moves of this turn, by (from, to, reason): one failover event each.
        let mut batch: BTreeMap<(u32, u32, FailoverReason), u32> = BTreeMap::new();
        let mut down = Vec::new();
        // What steering acted on: paths' internal changes (for re-handshakes, not reported:
        // see below) and flow moves.
        while let Some((_, ev)) = self.engine.poll_event() {
            match ev {
                Event::PathDown { path, .. } => down.push(path),
                Event::PathUp { path, .. } => {
                    if let Some(Some(p)) = self.paths.get_mut(path.0 as usize) {
                        p.s.up();
                    }
                }
                _ => {}
            }
            let Event::FlowMoved {
                flow,
                from,
                to,
                reason,
            } = ev
            else {
                continue;
            };
            *self.failovers.entry(reason.into()).or_default() += 1;
            *batch.entry((from.0, to.0, reason.into())).or_default() += 1;
            // A failover moves every flow of a path; print the first few, count them all.
            moves += 1;
            if moves <= 5 {
                let text = format!(
                    "flow {} -> {} moved from {} to {} ({reason:?})",
                    flow.src(),
                    flow.dst(),
                    self.path_name(from, now),
                    self.path_name(to, now)
                );
                self.record(text);
            }
        }
        // What operators, telemetry and webhooks see: the paths' changes with hysteresis (see
        // `patronus_core::path`).
        while let Some((_, ev)) = self.engine.poll_report() {
            self.log_path_event(&ev, now);
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
                    "path {} meets the SLA of class {} again (held it for its hold-down)",
                    self.path_name(path, now),
                    self.engine.class_name(class).map_or("?", |n| n.as_str())
                ),
                Event::FlowMoved { .. } => continue,
            };
            self.record(text);
        }
        if moves > 5 {
            self.record(format!("... and {} more flow moves", moves - 5));
        }
        let at_ms = unix_ms();
        for ((from, to, reason), flows) in batch {
            let (Some(f), Some(t)) = (
                self.engine.path(PathId(from), now),
                self.engine.path(PathId(to), now),
            ) else {
                continue;
            };
            self.failover_seq += 1;
            if self.failover_log.len() == RECENT_EVENTS {
                self.failover_log.pop_front();
            }
            self.failover_log.push_back(patronus_api::FailoverEvent {
                seq: self.failover_seq,
                at_ms,
                peer: f.peer_name.clone(),
                from_local_link: f.local_link.to_string(),
                from_remote_link: f.remote_link.to_string(),
                to_local_link: t.local_link.to_string(),
                to_remote_link: t.remote_link.to_string(),
                reason,
                flows,
            });
        }
        // A path that went silent may have lost its session at the other end (the peer
        // restarted, say) while ours still looks valid: handshake again now rather than after
        // boringtun's 15 s, and again every second while it stays down (a restarting peer may
        // not listen yet). This side's initiation also brings a path up when the peer's own
        // initiations cannot get through (its endpoint spoofed by a flood: see
        // `crate::handshake`).
        for path in down {
            self.rehandshake(path.0 as usize, now);
            if let Some(Some(p)) = self.paths.get(path.0 as usize) {
                let link = p.link;
                self.stun_soon(link, now);
            }
        }
    }

    /// A fresh handshake on down path `idx`, and the time of its next one (see
    /// [`session::DOWN_REHANDSHAKE`]); [`Self::wg_tick`] starts those.
    fn rehandshake(&mut self, idx: usize, now: Instant) {
        let Some(Some(p)) = self.paths.get_mut(idx) else {
            return;
        };
        let n = p.s.down(&mut self.out_buf, now);
        if n > 0 {
            self.send_on(PathId(idx as u32), n);
        }
    }

    /// Keeps a path's change of state as a structured event for the controller.
    fn log_path_event(&mut self, ev: &Event, now: Instant) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (path, kind) = match *ev {
            Event::PathUp { path, .. } => (path, PathEventKind::Up),
            Event::PathDown { path, .. } => (path, PathEventKind::Down),
            Event::SlaViolated { path, .. } => (path, PathEventKind::SlaViolated),
            Event::SlaRestored { path, .. } => (path, PathEventKind::SlaRestored),
            Event::FlowMoved { .. } => return,
        };
        let Some(p) = self.engine.path(path, now) else {
            return;
        };
        let class = |c| self.engine.class_name(c).map(|n| n.to_string());
        let mut e = patronus_api::PathEvent {
            seq: self.path_seq + 1,
            at_ms: unix_ms(),
            peer: p.peer_name.clone(),
            local_link: p.local_link.to_string(),
            remote_link: p.remote_link.to_string(),
            kind,
            class: None,
            rtt_ms: None,
            jitter_ms: None,
            loss_pct: None,
            silent_ms: None,
            flows: None,
        };
        match *ev {
            Event::PathUp { rtt, .. } => {
                e.rtt_ms = Some(ms(rtt));
            }
            Event::PathDown {
                silent_for, flows, ..
            } => {
                e.silent_ms = Some(ms(silent_for));
                e.flows = Some(flows);
            }
            Event::SlaViolated {
                class: c, metrics, ..
            } => {
                e.class = class(c);
                e.rtt_ms = Some(ms(metrics.rtt));
                e.jitter_ms = Some(ms(metrics.jitter));
                e.loss_pct = Some(metrics.loss * 100.0);
            }
            Event::SlaRestored { class: c, .. } => {
                e.class = class(c);
            }
            Event::FlowMoved { .. } => return,
        }
        self.path_seq = e.seq;
        if self.path_log.len() == RECENT_EVENTS {
            self.path_log.pop_front();
        }
        self.path_log.push_back(e);
    }

    /// Sends `out_buf[..len]` on path `id` (its link socket, to its endpoint).
    fn send_on(&mut self, id: PathId, len: usize) {
        let Some(Some(p)) = self.paths.get(id.0 as usize) else {
            return;
        };
        let Some(ep) = p.s.endpoint() else {
            return;
        };
        if !self.links[p.link].send(&self.out_buf[..len], ep, &p.relay_hdr) {
            self.counters.tx_errors += 1;
        }
    }

    /// Encrypts `packet` under path `id`'s session into `out_buf`; returns the datagram length
    /// (0 if the session queued it behind a handshake, which it then sends itself).
    fn encapsulate(&mut self, id: PathId, packet: &[u8]) -> usize {
        let Some(Some(p)) = self.paths.get_mut(id.0 as usize) else {
            return 0;
        };
        match p.s.encapsulate(packet, &mut self.out_buf) {
            Sealed::Data(n) | Sealed::Initiation(n) => n,
            Sealed::Nothing => 0,
        }
    }

    fn send_probes(&mut self) {
        while let Some(t) = self.engine.poll_transmit() {
            let Some(Some(p)) = self.paths.get_mut(t.path.0 as usize) else {
                continue;
            };
            if p.s.last_handshake().is_none() {
                // The session would queue the probe until its handshake completes, and the
                // first round trip of every path would read the handshake's time (200-350 ms
                // in the demo, each an SLA violation). Start the handshake instead.
                self.counters.probes_unsent += 1;
                if p.s.endpoint().is_none() {
                    // Nowhere to send it yet: no initiation either.
                    continue;
                }
                // No direct handshake came through (both ends behind endpoint-dependent NAT,
                // say): through the relay, if the link has one.
                let relay = self.links[p.link].relay;
                if p.s.hellos() >= RELAY_AFTER_HELLOS && relay.is_some() && p.s.endpoint() != relay
                {
                    let (link, before) = (p.link, p.s.endpoint());
                    p.s.relay_via(relay);
                    let id = t.path;
                    self.moved(id, link, before, relay);
                    continue;
                }
                let n = p.s.hello(&mut self.out_buf, Instant::now());
                if n > 0 {
                    self.send_on(t.path, n);
                }
                continue;
            }
            let peer = &self.peers[p.peer];
            let dst = peer.overlay;
            let mut pkt = std::mem::take(&mut self.probe_buf);
            let built = match peer.config.probe {
                ProbeMode::Stamp => wire::udp_packet(
                    self.overlay,
                    dst,
                    PROBE_SENDER_PORT,
                    STAMP_PORT,
                    &t.payload,
                    &mut pkt,
                ),
                ProbeMode::IcmpEcho => {
                    self.echo_seq = self.echo_seq.wrapping_add(1);
                    wire::echo_request(self.overlay, dst, self.echo_seq, &t.payload, &mut pkt)
                }
            };
            if built.is_some() {
                let n = self.encapsulate(t.path, &pkt);
                if n > 0 {
                    self.send_on(t.path, n);
                }
                self.counters.probes_sent += 1;
            }
            self.probe_buf = pkt;
        }
    }

    fn wg_tick(&mut self) {
        let now = Instant::now();
        let Self {
            paths,
            links,
            out_buf,
            counters,
            ..
        } = self;
        let mut moved = Vec::new();
        for (i, p) in paths.iter_mut().enumerate() {
            let Some(p) = p else {
                continue;
            };
            let l = &links[p.link];
            let hdr = &p.relay_hdr;
            let before = p.s.endpoint();
            p.s.tick(now, out_buf, &mut |d, to| {
                if !l.send(d, to, hdr) {
                    counters.tx_errors += 1;
                }
            });
            if p.s.endpoint() != before {
                moved.push((PathId(i as u32), p.link, before, p.s.endpoint()));
            }
        }
        for (id, link, before, after) in moved {
            self.moved(id, link, before, after);
        }
        self.stun_tick(now);
        if now >= self.next_address_check {
            self.next_address_check = now + ADDRESS_CHECK_EVERY;
            self.check_addresses();
        }
    }

    /// Starts this edge's key roll: every path gets a second session, made with the new key,
    /// which handshakes at once (the peers accept both keys) and takes over sending when it is
    /// up (when a datagram shows it can send); the old one keeps carrying traffic until then.
    pub fn begin_roll(&mut self, key: &PrivateKey, now: Instant) {
        let secret = key.secret().clone();
        for i in 0..self.paths.len() {
            let Some(Some(p)) = self.paths.get_mut(i) else {
                continue;
            };
            if !self.peers.get(p.peer).is_some_and(|r| r.active) {
                continue;
            }
            let id = PathId(i as u32);
            let n = p.s.begin_roll(&secret, &mut self.out_buf);
            if n > 0 {
                self.send_on(id, n);
            }
        }
        let public = key.public().to_string();
        self.record(format!(
            "key roll: moving every path's session to the new key {public}"
        ));
        self.roll = Some((secret, public, now));
        self.publish(now);
    }

    /// Ends this edge's key roll: paths that have not moved yet (down, say) move now, and
    /// every session still made with the old key (a peer's, added during the roll, say) is made
    /// again with the new one: the old key completes no handshake any more.
    pub fn commit_roll(&mut self) {
        let Some((secret, public, _)) = self.roll.take() else {
            return;
        };
        for p in self.paths.iter_mut().flatten() {
            if p.s.commit_roll(&secret) {
                self.counters.sessions_rekeyed += 1;
            }
        }
        self.secret = secret;
        self.record(format!("key roll: done, the edge's key is {public}"));
        self.public_key = public;
        self.publish(Instant::now());
    }

    /// Peer `i`'s links' endpoints changed and nothing else: each path takes its link's new
    /// one (a link that has none now keeps what its path learned).
    fn move_peer(&mut self, i: usize, np: &PeerConfig, now: Instant) {
        for pid in self.engine.peer_paths(PeerId(i as u32)).to_vec() {
            let Some(remote) = self
                .engine
                .path(pid, now)
                .map(|s| s.remote_link.to_string())
            else {
                continue;
            };
            let Some(r) = np.links.iter().find(|l| l.name.as_str() == remote) else {
                continue;
            };
            let Some(Some(p)) = self.paths.get_mut(pid.0 as usize) else {
                continue;
            };
            let before = p.s.endpoint();
            p.s.configure(r.endpoint, now);
            let (after, link) = (p.s.endpoint(), p.link);
            if after != before {
                self.moved(pid, link, before, after);
            }
        }
    }

    /// A peer's keys changed and nothing else (it rolls its key): its paths' sessions move in
    /// place, without touching its routes, paths or flows. A new `next_public_key` gets a
    /// second session on every path, which takes over when the peer handshakes with it; a new
    /// `public_key` that is that one promotes it (if it has not taken over already).
    fn rekey_peer(&mut self, i: usize, np: &PeerConfig) {
        let want = np.public_key.0;
        let next = np.next_public_key.map(|k| k.0);
        for pid in self.engine.peer_paths(PeerId(i as u32)) {
            let Some(Some(p)) = self.paths.get_mut(pid.0 as usize) else {
                continue;
            };
            if p.s.rekey(&self.secret, want, next) {
                self.counters.sessions_rekeyed += 1;
            }
        }
        self.peers[i].config = np.clone();
    }

    fn read_tun(&mut self) -> Result<(), EdgeError> {
        for _ in 0..16 {
            let n = match self.tun.recv_multiple(
                &mut self.rx_orig,
                &mut self.rx_bufs,
                &mut self.rx_sizes,
                VIRTIO_NET_HDR_LEN,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The device is gone (deleted under us) or broken: stop, loudly, rather than
                // spin on it.
                Err(e) if e.raw_os_error().is_some() => {
                    return Err(io_err(format!("reading {}", self.tun_name))(e));
                }
                // A packet tun-rs could not split: lost, counted.
                Err(_) => {
                    self.counters.tx_dropped += 1;
                    continue;
                }
            };
            let now = Instant::now();
            for i in 0..n {
                let len = self.rx_sizes[i];
                let buf = std::mem::take(&mut self.rx_bufs[i]);
                self.handle_lan_packet(&buf[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len], now);
                self.rx_bufs[i] = buf;
            }
        }
        // One send for everything read in this turn: small packets (TCP ACKs, say) of one path
        // share a UDP_SEGMENT batch just as the segments of a TCP super-packet do.
        self.flush_tx();
        Ok(())
    }

    fn handle_lan_packet(&mut self, pkt: &[u8], now: Instant) {
        self.counters.tun_packets += 1;
        self.counters.tun_bytes += pkt.len() as u64;
        let Ok(meta) = PacketMeta::parse(pkt) else {
            self.counters.tx_dropped += 1;
            return;
        };
        let key = match self.engine.decide(&meta, pkt.len(), now) {
            Decision::Send(p) => (p, None),
            Decision::Duplicate { primary, secondary } => (primary, Some(secondary)),
            Decision::Drop(_) => {
                self.counters.tx_dropped += 1;
                return;
            }
        };
        self.batch(key, pkt);
    }

    /// Encrypts `pkt` under `key.0`'s session straight into the send batch, sending the batch
    /// first if the packet cannot join it.
    fn batch(&mut self, key: (PathId, Option<PathId>), pkt: &[u8]) {
        let room = (pkt.len() + 48).max(148);
        if self.tx.key != Some(key)
            || self.tx.closed
            || self.tx.count == GSO_MAX_SEGMENTS
            || self.tx.len + room > GSO_MAX_BYTES
        {
            self.flush_tx();
            self.tx.key = Some(key);
        }
        let Some(Some(p)) = self.paths.get_mut(key.0.0 as usize) else {
            return;
        };
        let at = self.tx.len;
        let n = match p.s.encapsulate(pkt, &mut self.tx.buf[at..at + room]) {
            Sealed::Data(n) => n,
            Sealed::Nothing => return,
            // No session yet: boringtun queued the packet and handed back a handshake
            // initiation, which goes on the primary path alone, now, outside the batch.
            Sealed::Initiation(n) => {
                if let Some(ep) = p.s.endpoint() {
                    if !self.links[p.link].send(&self.tx.buf[at..at + n], ep, &p.relay_hdr) {
                        self.counters.tx_errors += 1;
                    }
                }
                return;
            }
        };
        let tx = &mut self.tx;
        if tx.count == 0 {
            tx.stride = n;
        } else if n > tx.stride {
            // Longer than the batch's datagrams: send the batch, then start a new one with it.
            let key = tx.key;
            self.flush_tx();
            self.tx.buf.copy_within(at..at + n, 0);
            self.tx.key = key;
            self.tx.stride = n;
            self.tx.len = n;
            self.tx.count = 1;
            return;
        } else if n < tx.stride {
            tx.closed = true;
        }
        tx.len += n;
        tx.count += 1;
    }

    /// Sends the batch: one UDP_SEGMENT `sendmsg` per destination.
    fn flush_tx(&mut self) {
        let Some((primary, secondary)) = self.tx.key else {
            return;
        };
        if self.tx.count > 0 {
            for id in std::iter::once(primary).chain(secondary) {
                let Some(Some(p)) = self.paths.get(id.0 as usize) else {
                    continue;
                };
                let Some(ep) = p.s.endpoint() else {
                    continue;
                };
                let l = &self.links[p.link];
                let sock = &l.sock;
                let data = &self.tx.buf[..self.tx.len];
                // Through the relay, each datagram goes framed, on its own.
                let relayed = Some(ep) == l.relay;
                let sent = if self.tx.count > 1 && self.gso && !relayed {
                    let seg = self.tx.stride as u16;
                    let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
                    let addr = SockaddrStorage::from(ep);
                    match sendmsg(
                        sock.as_raw_fd(),
                        &[IoSlice::new(data)],
                        &cmsg,
                        MsgFlags::empty(),
                        Some(&addr),
                    ) {
                        Ok(_) => true,
                        Err(
                            nix::errno::Errno::EIO
                            | nix::errno::Errno::EINVAL
                            | nix::errno::Errno::EOPNOTSUPP,
                        ) => {
                            eprintln!(
                                "edge: the kernel refuses UDP_SEGMENT; sending datagrams one by one"
                            );
                            self.gso = false;
                            false
                        }
                        Err(e) => {
                            self.counters.tx_errors += 1;
                            if self.counters.tx_errors.is_power_of_two() {
                                eprintln!("edge: sending {} datagrams to {ep}: {e}", self.tx.count);
                            }
                            true
                        }
                    }
                } else {
                    false
                };
                if !sent {
                    for d in data.chunks(self.tx.stride.max(1)) {
                        if !l.send(d, ep, &p.relay_hdr) {
                            self.counters.tx_errors += 1;
                        }
                    }
                }
            }
        }
        self.tx.key = None;
        self.tx.count = 0;
        self.tx.len = 0;
        self.tx.closed = false;
    }

    /// Reads what `link`'s `queue` has: up to [`RECV_BATCH`] receives per `recvmmsg`, each up to
    /// 64 KB of datagrams the kernel coalesced (UDP_GRO); from the data queue up to
    /// [`READ_BUDGET`] calls, from the handshake queue until [`HANDSHAKE_BUDGET`] datagrams.
    fn read_link(&mut self, link: usize, queue: Queue) {
        let mut handled = 0;
        for _ in 0..READ_BUDGET {
            let Some(l) = self.links.get(link) else {
                return;
            };
            let fd = match (queue, &l.hs) {
                (Queue::Data, _) => l.sock.as_raw_fd(),
                (Queue::Handshake, Some(hs)) => hs.as_raw_fd(),
                (Queue::Handshake, None) => return,
            };
            // (bytes, source, segment size, kernel receive time) of each receive.
            let mut got = [(0usize, None::<SocketAddr>, 0usize, None::<TimeSpec>); RECV_BATCH];
            let mut dropped = None;
            let n = {
                // Fresh headers for every call: nix's `recvmmsg` does not reset the lengths of
                // the address and control buffers that the kernel shortened on the previous
                // call, and a receive without the UDP_GRO message would then leave no room for
                // it on the next one (its datagrams would be read as one).
                let mut mmsg = MultiHeaders::<SockaddrStorage>::preallocate(
                    RECV_BATCH,
                    Some(nix::cmsg_space!(i32, TimeSpec, u32)),
                );
                let mut bufs = self.net_bufs.iter_mut();
                let mut iovs: [[IoSliceMut<'_>; 1]; RECV_BATCH] = std::array::from_fn(|_| {
                    [IoSliceMut::new(
                        bufs.next().map_or(&mut [][..], |b| &mut b[..]),
                    )]
                });
                let results =
                    match recvmmsg(fd, &mut mmsg, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None) {
                        Ok(r) => r,
                        Err(nix::errno::Errno::EINTR) => continue,
                        // EAGAIN: drained. Anything else: nothing to read now either.
                        Err(_) => return,
                    };
                let mut n = 0;
                for (slot, msg) in got.iter_mut().zip(results) {
                    let from = msg.address.as_ref().and_then(|a| {
                        a.as_sockaddr_in()
                            .map(|a| SocketAddr::V4(SocketAddrV4::from(*a)))
                            .or_else(|| {
                                a.as_sockaddr_in6()
                                    .map(|a| SocketAddr::V6(SocketAddrV6::from(*a)))
                            })
                    });
                    let mut seg = msg.bytes;
                    let mut stamp = None;
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            match c {
                                ControlMessageOwned::UdpGroSegments(s) => {
                                    seg = usize::try_from(s).unwrap_or(msg.bytes).max(1);
                                }
                                ControlMessageOwned::ScmTimestampns(t) => stamp = Some(t),
                                ControlMessageOwned::RxqOvfl(d) => dropped = Some(d),
                                _ => {}
                            }
                        }
                    }
                    *slot = (msg.bytes, from, seg.max(1), stamp);
                    n += 1;
                }
                n
            };
            if let (Some(d), Some(l)) = (dropped, self.links.get_mut(link)) {
                l.drops[queue as usize] = d;
            }
            let now = Instant::now();
            let wall = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).ok();
            for (buf, &(len, from, seg, stamp)) in got[..n].iter().enumerate() {
                let Some(from) = from else {
                    continue;
                };
                let arrived = arrival(now, wall, stamp);
                let mut at = 0;
                while at < len {
                    let end = (at + seg).min(len);
                    self.handle_segment(link, from, buf, at..end, arrived);
                    handled += 1;
                    at = end;
                }
            }
            // Coalesced packets that nothing more can join go now; the one still growing may
            // take segments from the next receive.
            self.flush_tun(true);
            if n < RECV_BATCH || (queue == Queue::Handshake && handled >= HANDSHAKE_BUDGET) {
                return;
            }
        }
    }

    /// One datagram, `net_bufs[buf][at]`, from `from` on `link`.
    fn handle_segment(
        &mut self,
        link: usize,
        from: SocketAddr,
        buf: usize,
        at: Range<usize>,
        now: Instant,
    ) {
        let (id, side) = match wire::classify(&self.net_bufs[buf][at.clone()]) {
            Some(WgMessage::Initiation) => match self.by_endpoint.get(&(link, from)) {
                Some(id) => (Some(*id), None),
                None => {
                    // From an address no path knows: the peer moved, or it is behind a NAT
                    // nobody has seen yet.
                    self.initiation_from_elsewhere(link, from, buf, at, now);
                    return;
                }
            },
            Some(WgMessage::ToSession(r)) => match session::path_of(wire::tunnel_of(r)) {
                Some((id, side)) => (Some(id), Some(side)),
                None => (None, None),
            },
            // Not WireGuard (whose second to fourth bytes are 0): the controller's STUN answer
            // or a relayed frame, checked only here, off the path of the tunnels' datagrams.
            None => {
                let d = &self.net_bufs[buf][at.clone()];
                if wire::is_stun_answer(d) {
                    self.handle_stun(link, from, buf, at, now);
                } else if patronus_api::relay::is_frame(d) {
                    self.handle_relayed(link, from, buf, at, now);
                } else {
                    self.counters.rx_unknown += 1;
                }
                return;
            }
        };
        match id {
            Some(id) if matches!(self.paths.get(id.0 as usize), Some(Some(_))) => {
                self.handle_datagram(id, side, link, from, buf, at, false, now)
            }
            _ => self.counters.rx_unknown += 1,
        }
    }

    /// A handshake initiation, `net_bufs[buf][at]`, from `from` on `link`, an address no path
    /// has as its endpoint. It is for the path on `link` whose peer sent its earlier handshakes
    /// with the same sender index base (see [`session::peer_base`]): a peer that moved keeps
    /// its numbering. Failing that, for the one path on `link` with no endpoint at all (a peer
    /// behind a NAT nobody has seen yet), or else with no session and an endpoint at this
    /// address on another port (an endpoint-dependent NAT's mapping towards us), if there is
    /// exactly one. Candidates are tried in turn (two peers may number a path alike) until
    /// one's session accepts it; each refusal counts.
    fn initiation_from_elsewhere(
        &mut self,
        link: usize,
        from: SocketAddr,
        buf: usize,
        at: Range<usize>,
        now: Instant,
    ) {
        let d = &self.net_bufs[buf][at.clone()];
        let Some(sender) = d
            .get(4..8)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        else {
            self.counters.rx_unknown += 1;
            return;
        };
        let base = session::peer_base(sender);
        let on_link = || {
            self.paths
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((PathId(i as u32), p.as_ref()?)))
                .filter(|(_, p)| p.link == link)
        };
        let mut candidates: Vec<PathId> = on_link()
            .filter(|(_, p)| p.s.peer_base() == Some(base))
            .map(|(id, _)| id)
            .take(MAX_INITIATION_CANDIDATES)
            .collect();
        // The one path with no endpoint yet, or else (behind an endpoint-dependent NAT, whose
        // mapping towards us is not the one the controller saw) the one that expects the peer
        // at this address on another port and has no session.
        let only = |fits: &dyn Fn(&PathRt) -> bool| match on_link()
            .filter(|(_, p)| fits(p))
            .map(|(id, _)| id)
            .take(2)
            .collect::<Vec<_>>()[..]
        {
            [id] => Some(id),
            _ => None,
        };
        if candidates.is_empty() {
            candidates.extend(only(&|p| p.s.endpoint().is_none()).or_else(|| {
                only(&|p| {
                    p.s.last_handshake().is_none()
                        && p.s.endpoint().is_some_and(|e| e.ip() == from.ip())
                })
            }));
        }
        if candidates.is_empty() {
            self.counters.rx_unknown += 1;
            return;
        }
        for id in candidates {
            self.handle_datagram(id, None, link, from, buf, at.clone(), false, now);
            if matches!(self.paths.get(id.0 as usize), Some(Some(p)) if p.s.endpoint() == Some(from))
            {
                return;
            }
        }
    }

    /// A relay frame, `net_bufs[buf][at]`, from `from` on `link`: from the link's relay, it
    /// names the peer's site and link it comes from, and so its path; the WireGuard datagram
    /// in it goes to that path. Anything else is counted as unknown.
    fn handle_relayed(
        &mut self,
        link: usize,
        from: SocketAddr,
        buf: usize,
        at: Range<usize>,
        now: Instant,
    ) {
        let d = &self.net_bufs[buf][at.clone()];
        let found = patronus_api::relay::parse(d)
            .filter(|f| f.kind == patronus_api::relay::FROM)
            .filter(|_| self.links.get(link).and_then(|l| l.relay) == Some(from))
            .and_then(|f| Some((*self.by_relay.get(link)?.get(f.names)?, f.at)));
        let Some((id, skip)) = found else {
            self.counters.rx_unknown += 1;
            return;
        };
        let inner = at.start + skip..at.end;
        let side = match wire::classify(&self.net_bufs[buf][inner.clone()]) {
            Some(WgMessage::Initiation) => None,
            Some(WgMessage::ToSession(r)) => match session::path_of(wire::tunnel_of(r)) {
                Some((p, side)) if p == id => Some(side),
                _ => {
                    self.counters.rx_unknown += 1;
                    return;
                }
            },
            None => {
                self.counters.rx_unknown += 1;
                return;
            }
        };
        if matches!(self.paths.get(id.0 as usize), Some(Some(_))) {
            self.handle_datagram(id, side, link, from, buf, inner, true, now);
        }
    }

    /// Starts, changes or stops endpoint discovery: every link asks at once.
    fn set_discovery(&mut self, d: Option<Discovery>) {
        match &d {
            Some(d) => self.record(format!(
                "endpoint discovery: asking the controller at {} how each link is seen",
                d.servers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None if self.discovery.is_some() => {
                self.record("endpoint discovery: stopped".into());
            }
            None => {}
        }
        for l in &mut self.links {
            l.stun = LinkStun::default();
            l.relay = d
                .as_ref()
                .and_then(|d| d.servers.iter().find(|s| s.is_ipv6() == l.v6).copied());
        }
        self.discovery = d;
    }

    /// Sends each link's STUN request when it is due (see [`Discovery`]).
    fn stun_tick(&mut self, now: Instant) {
        let Some(d) = &self.discovery else {
            return;
        };
        for l in &mut self.links {
            if l.stun.next_at.is_some_and(|t| t > now) {
                continue;
            }
            let Some(server) = d.servers.iter().find(|s| s.is_ipv6() == l.v6) else {
                continue;
            };
            if l.stun.pending.is_some() {
                l.stun.unanswered = l.stun.unanswered.saturating_add(1);
            }
            let mut transaction = [0u8; 12];
            if getrandom::getrandom(&mut transaction).is_err() {
                continue;
            }
            let req = patronus_api::stun::binding_request(
                &transaction,
                Some(patronus_api::stun::SiteAuth {
                    site: &d.site,
                    link: Some(&l.name),
                    time_ms: unix_ms(),
                    key: &d.key,
                }),
            );
            if l.sock.send_to(&req, *server).is_err() {
                self.counters.tx_errors += 1;
            }
            l.stun.pending = Some(transaction);
            l.stun.sent_at = Some(now);
            let backoff = STUN_RETRY
                .saturating_mul(1 << l.stun.unanswered.min(5))
                .min(STUN_EVERY);
            l.stun.next_at = Some(now + backoff);
        }
    }

    /// A STUN answer on `link`: the controller's, to the link's request, keyed with the
    /// site's key; anything else is counted as unknown.
    fn handle_stun(
        &mut self,
        link: usize,
        from: SocketAddr,
        buf: usize,
        at: Range<usize>,
        now: Instant,
    ) {
        let (Some(d), Some(l)) = (&self.discovery, self.links.get_mut(link)) else {
            self.counters.rx_unknown += 1;
            return;
        };
        let answer = match l.stun.pending {
            Some(t) if d.servers.contains(&from) => {
                patronus_api::stun::read_answer(&self.net_bufs[buf][at], &t, Some(&d.key))
            }
            _ => None,
        };
        let text = match answer {
            Some(patronus_api::stun::Answer::Mapped { addr, .. }) => {
                let before = l.stun.observed.map(|(a, _)| a);
                l.stun.observed = Some((addr, now));
                l.stun.refused = None;
                (before != Some(addr))
                    .then(|| format!("link {}: the controller sees it at {addr}", l.name))
            }
            Some(patronus_api::stun::Answer::Error(code)) => {
                let first = l.stun.refused != Some(code);
                l.stun.refused = Some(code);
                first.then(|| {
                    format!(
                        "link {}: the controller refused its endpoint report ({code}{})",
                        l.name,
                        if code == 401 {
                            ": a revoked credential, or a clock more than 30 s off"
                        } else {
                            ""
                        }
                    )
                })
            }
            None => {
                self.counters.rx_unknown += 1;
                return;
            }
        };
        l.stun.pending = None;
        l.stun.unanswered = 0;
        l.stun.next_at = Some(now + STUN_EVERY);
        if let Some(t) = text {
            self.record(t);
        }
    }

    /// Asks the controller again now how `link` is seen (its paths went down: its address or
    /// its NAT's mapping may have changed), unless it asked in the last second.
    fn stun_soon(&mut self, link: usize, now: Instant) {
        if let Some(l) = self.links.get_mut(link) {
            let soon = l.stun.sent_at.map_or(now, |t| (t + STUN_RETRY).max(now));
            if l.stun.next_at.is_some_and(|t| t > soon) {
                l.stun.next_at = Some(soon);
            }
        }
    }

    /// Rebinds a link whose address is gone from its interface to the address the interface
    /// has instead (a new DHCP lease): when the old one is missing and exactly one other of the
    /// same family (not link-local) is there. The link's paths then handshake from the new
    /// address at once (their peers follow it: see [`session`]) and the controller is asked
    /// how the link is seen now.
    fn check_addresses(&mut self) {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            return;
        };
        let mut by_dev: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for a in addrs {
            let ip = a.address.as_ref().and_then(|s| {
                s.as_sockaddr_in()
                    .map(|a| IpAddr::V4(a.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
            });
            if let Some(ip) = ip {
                by_dev.entry(a.interface_name).or_default().push(ip);
            }
        }
        for i in 0..self.links.len() {
            let l = &self.links[i];
            let Some(have) = by_dev.get(&l.dev) else {
                continue;
            };
            if have.contains(&l.address) {
                continue;
            }
            let others: Vec<IpAddr> = have
                .iter()
                .copied()
                .filter(|a| a.is_ipv6() == l.v6 && !is_link_local(*a))
                .collect();
            if let [new] = others[..] {
                self.rebind(i, new);
            }
        }
    }

    /// Moves link `i`'s sockets to address `new` (same port and device).
    fn rebind(&mut self, i: usize, new: IpAddr) {
        let l = &self.links[i];
        let (old, port) = (l.address, l.sock.local_addr().map_or(0, |a| a.port()));
        let fresh = match open_link(l.name.clone(), l.dev.clone(), SocketAddr::new(new, port)) {
            Ok(f) => f,
            Err(e) => {
                let text = format!(
                    "link {}: its address moved from {old} to {new}, and rebinding failed: {e}",
                    l.name
                );
                self.record(text);
                return;
            }
        };
        let token = TOKEN_LINK_BASE + 2 * i as u64;
        let _ = self.epoll.delete(&self.links[i].sock);
        if let Some(hs) = &self.links[i].hs {
            let _ = self.epoll.delete(hs);
        }
        let _ = self
            .epoll
            .add(&fresh.sock, EpollEvent::new(EpollFlags::EPOLLIN, token));
        if let Some(hs) = &fresh.hs {
            let _ = self
                .epoll
                .add(hs, EpollEvent::new(EpollFlags::EPOLLIN, token + 1));
        }
        let name = fresh.name.clone();
        self.links[i] = fresh;
        self.record(format!(
            "link {name}: its address moved from {old} to {new}; its sockets are rebound"
        ));
        // Its paths handshake from the new address now.
        for idx in 0..self.paths.len() {
            let Some(Some(p)) = self.paths.get_mut(idx) else {
                continue;
            };
            if p.link != i {
                continue;
            }
            let n = p.s.initiation(&mut self.out_buf, true);
            if n > 0 {
                self.send_on(PathId(idx as u32), n);
            }
        }
    }

    /// One WireGuard datagram for path `id`: for the session on `side` (by its index), or, a
    /// handshake initiation (`side` none), for whichever of the path's sessions accepts it.
    #[allow(clippy::too_many_arguments)] // the datagram's coordinates, passed down as they are
    fn handle_datagram(
        &mut self,
        id: PathId,
        side: Option<u32>,
        link: usize,
        from: SocketAddr,
        buf: usize,
        at: Range<usize>,
        relayed: bool,
        now: Instant,
    ) {
        let idx = id.0 as usize;
        // Another path's endpoint: a `duplicate` copy sent under this path's session, which
        // must not move this path's endpoint there.
        let elsewhere = self
            .by_endpoint
            .get(&(link, from))
            .is_some_and(|other| *other != id);
        let Self {
            paths,
            links,
            net_bufs,
            out_buf,
            to_tun,
            cookies,
            counters,
            handshake,
            ..
        } = self;
        let Some(Some(p)) = paths.get_mut(idx) else {
            return;
        };
        let before = p.s.endpoint();
        // Relayed: the frame named the path; otherwise a datagram moves a path's endpoint
        // only on the path's own link and not from another path's endpoint.
        let may_move = relayed || (link == p.link && !elsewhere);
        // The datagram is decrypted where it will be written to the TUN if it is data (see
        // [`crate::coalesce`]): its plaintext is no longer than it.
        let dst = to_tun.slot(at.len());
        let l = &links[link];
        let hdr = &p.relay_hdr;
        let mut send_errors = 0;
        let got = p.s.receive(
            side,
            from,
            &net_bufs[buf][at],
            dst,
            out_buf,
            may_move,
            &mut session::Context {
                cookies,
                cookies_per_path_per_s: handshake.cookies_per_path_per_s,
                counters,
            },
            now,
            &mut |d, to| {
                if !l.send(d, to, hdr) {
                    send_errors += 1;
                }
            },
        );
        self.counters.tx_errors += send_errors;
        let (after, own_link) = (p.s.endpoint(), p.link);
        if after != before {
            self.moved(id, own_link, before, after);
        }
        match got {
            Received::Packet(len) => self.deliver(id, len, now),
            Received::Nothing => self.to_tun.discard(),
        }
    }

    /// Path `id`'s endpoint (on local `link`) moved from `before` to `after`: initiations from
    /// there are its now. A path that had none, or no session yet, handshakes there at once
    /// (one that is up carries on: its peer is already talking from there).
    fn moved(
        &mut self,
        id: PathId,
        link: usize,
        before: Option<SocketAddr>,
        after: Option<SocketAddr>,
    ) {
        if let Some(b) = before {
            if self.by_endpoint.get(&(link, b)) == Some(&id) {
                self.by_endpoint.remove(&(link, b));
            }
        }
        if let Some(a) = after {
            // The relay is every relayed path's endpoint: its frames name their path.
            if Some(a) != self.links.get(link).and_then(|l| l.relay) {
                self.by_endpoint.insert((link, a), id);
            }
            let now = Instant::now();
            let name = self.path_name(id, now);
            self.record(format!("path {name}: the peer's endpoint is now {a}"));
            if let Some(Some(p)) = self.paths.get_mut(id.0 as usize) {
                if before.is_none() || p.s.last_handshake().is_none() {
                    let n = p.s.hello(&mut self.out_buf, now);
                    if n > 0 {
                        self.send_on(id, n);
                    }
                }
            }
        }
    }

    /// A packet of `len` bytes decrypted on path `id` is in the TUN queue's slot. `now` is when
    /// its datagram arrived (the kernel's stamp): probes are measured from then.
    fn deliver(&mut self, id: PathId, len: usize, now: Instant) {
        let Some(Some(p)) = self.paths.get(id.0 as usize) else {
            self.to_tun.discard();
            return;
        };
        let peer = p.peer;
        let pkt = self.to_tun.packet(len);
        // Cryptokey routing: the source must be routed to this very peer (the longest prefix
        // containing it is one of this peer's), not merely inside one of its prefixes.
        let allowed = wire::source(pkt)
            .and_then(|s| self.engine.peer_for(s))
            .is_some_and(|owner| owner.0 as usize == peer);
        if !allowed {
            self.to_tun.discard();
            self.counters.rx_spoofed += 1;
            return;
        }
        match wire::inspect(pkt, self.overlay) {
            Inner::ProbeReply { payload } => {
                let _ = self.engine.handle_probe_reply(id, payload, now);
                self.to_tun.discard();
            }
            Inner::EchoReply { payload } => {
                let _ = self.engine.handle_echo_reply(id, payload, now);
                self.to_tun.discard();
            }
            Inner::ProbeRequest {
                payload,
                from,
                sport,
                ttl,
            } => {
                let reply = self
                    .engine
                    .handle_probe_request(id, payload, ttl, now, Instant::now());
                self.to_tun.discard();
                if let Ok(reply) = reply {
                    let mut pkt = std::mem::take(&mut self.probe_buf);
                    if wire::udp_packet(self.overlay, from, STAMP_PORT, sport, &reply, &mut pkt)
                        .is_some()
                    {
                        let n = self.encapsulate(id, &pkt);
                        if n > 0 {
                            self.send_on(id, n);
                        }
                    }
                    self.probe_buf = pkt;
                }
            }
            Inner::Data => {
                self.engine.handle_data_received(id, len, now);
                self.counters.delivered_packets += 1;
                self.counters.delivered_bytes += len as u64;
                self.to_tun.commit(len);
            }
        }
    }

    /// Writes the decrypted packets gathered so far to the TUN; with `keep_open`, not those
    /// that later segments may still join.
    fn flush_tun(&mut self, keep_open: bool) {
        if self.to_tun.pending() == 0 {
            return;
        }
        self.to_tun.flush(self.tun.as_fd(), keep_open);
        let c = self.to_tun.counts();
        self.counters.tun_writes = c.writes;
        self.counters.tun_write_errors = c.errors;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tun_mtu_leaves_room_for_wireguard_on_the_smallest_link_of_either_end() {
        let text = include_str!("../edge.example.toml");
        let mut cfg: patronus_api::EdgeConfig =
            toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(super::tun_mtu_for(&cfg, false), 1440);
        assert_eq!(super::tun_mtu_for(&cfg, true), 1420);
        // A peer's LTE link with a 1400-byte MTU: every path to it crosses that link or may.
        cfg.peers[0].links[1].mtu = 1400;
        assert_eq!(super::tun_mtu_for(&cfg, false), 1340);
        // A peer link we never dial (no endpoint) carries no path of ours.
        cfg.peers[0].links[1].endpoint = None;
        assert_eq!(super::tun_mtu_for(&cfg, false), 1440);
    }
}
