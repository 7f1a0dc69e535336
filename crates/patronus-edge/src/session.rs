//! The WireGuard sessions of one path, without I/O: which session takes a datagram, the
//! handshake guard in front of them, the key roll (ours and the peer's), where the peer's end of
//! the path is, and the timers. The event loop ([`crate::edge`]) owns sockets and buffers and
//! hands each path's datagrams here; what a session wants sent comes back through a `send`
//! callback (a datagram and its destination), so the tests below run two of them against each
//! other in memory, as boringtun keeps its `noise` state machine apart from its `device`.
//!
//! # Sessions and indices
//!
//! A path has one sending session, and during a key roll a second one (`Alt`): the new key's,
//! which takes over as soon as it can send, or the old one, which only receives what is still
//! in flight until [`OLD_SESSION_GRACE`] ends. Each session's WireGuard index tells the path
//! and which of the two it is (see [`tunnel_index`]): the receiver finds a datagram's session
//! from the index alone, whatever socket and source it came from.
//!
//! # Where the peer is
//!
//! A path's endpoint is the one the configuration gives (configured on the peer's link, or the
//! one the controller observed: `patronus_controller::stun`), and otherwise, or when the peer
//! moves (a new DHCP lease, a NAT mapping that changed), the source of the last authenticated
//! datagram, as WireGuard does: a handshake message that completed, or data that decrypted and
//! passed the replay check. A cookie reply moves nothing (anyone who knows our public key can
//! make one), and the caller says whether a datagram may move it at all: a `duplicate` copy
//! arrives under this path's session from another path's address. A configured endpoint that
//! changes while the peer talks from elsewhere is taken only once the peer falls silent
//! ([`LIVE`]); a path the caller sends through a relay has the relay as its endpoint.
//!
//! A path with no session says hello (a fresh initiation) at most once a second
//! ([`PathSession::hello`]): behind filtering NATs both ends' first initiations are lost by
//! design, each opening its own NAT for the other's.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use patronus_core::PathId;

use crate::edge::EdgeCounters;
use crate::handshake::{Bucket, Guard, Verdict};

/// Bit of a tunnel index that tells a path's two sessions (sides) apart during a key roll.
pub const GEN_BIT: u32 = 1 << 22;

/// How long a replaced session still receives what was sent on it before the switch.
pub const OLD_SESSION_GRACE: Duration = Duration::from_secs(10);

/// How recently a peer must have been heard from its endpoint for the configuration not to
/// move it (see [`PathSession::configure`]).
pub const LIVE: Duration = Duration::from_secs(1);

/// How often a path that is down starts a fresh handshake (WireGuard's own retry is 5 s, too
/// slow for a peer that restarted a moment after the path went down).
pub const DOWN_REHANDSHAKE: Duration = Duration::from_secs(1);

/// The WireGuard index (24 bits) of path `id`'s session on side `side` (0 or 1).
pub fn tunnel_index(id: PathId, side: u32) -> u32 {
    (id.0 + 1) | (side * GEN_BIT)
}

/// The path and side a tunnel index (the top 24 bits of a receiver index) names, if any.
pub fn path_of(tunnel: u32) -> Option<(PathId, u32)> {
    let path = tunnel & (GEN_BIT - 1);
    (path > 0 && tunnel < 2 * GEN_BIT).then(|| (PathId(path - 1), tunnel / GEN_BIT))
}

/// The peer's "base" in a WireGuard sender index: its path number, without the side bit and
/// the counter boringtun keeps in the low byte. It stays the same across the peer's handshakes
/// and key rolls on one path, so an initiation from an address nobody knew yet (the peer moved)
/// still finds its path.
pub fn peer_base(sender_index: u32) -> u32 {
    (sender_index >> 8) & (GEN_BIT - 1)
}

/// The public half of a secret, as bytes.
pub fn public_of(secret: &StaticSecret) -> [u8; 32] {
    PublicKey::from(secret).to_bytes()
}

/// A WireGuard session of ours (`secret`) with a peer's key. Its own rate limiter only checks
/// MAC1: whether a handshake message needs a cookie is decided before, by the path's
/// [`Guard`], with a budget for the replies.
fn new_tunn(
    secret: &StaticSecret,
    peer_key: [u8; 32],
    id: PathId,
    side: u32,
    keepalive: Option<u16>,
) -> Box<Tunn> {
    Box::new(Tunn::new(
        secret.clone(),
        PublicKey::from(peer_key),
        None,
        keepalive,
        tunnel_index(id, side),
        Some(Arc::new(RateLimiter::new(
            &PublicKey::from(secret),
            u64::MAX,
        ))),
    ))
}

/// A handshake initiation of session `t` into `out`, unless one is already under way (or
/// `force`: a fresh one anyway); its length (0 for none).
fn initiation_of(t: &mut Tunn, out: &mut [u8], force: bool) -> usize {
    match t.format_handshake_initiation(out, force) {
        TunnResult::WriteToNetwork(d) => d.len(),
        _ => 0,
    }
}

/// What a decapsulation produced, without the borrow of the buffer it wrote to.
enum Decap {
    Done,
    Rejected,
    /// A datagram of this length, at the start of `out`, to send back (a handshake message).
    Network(usize),
    /// A packet of this length, at the start of `dst`, to deliver.
    Tunnel(usize),
}

fn decap(t: &mut Tunn, from: IpAddr, datagram: &[u8], dst: &mut [u8], out: &mut [u8]) -> Decap {
    match t.decapsulate(Some(from), datagram, dst) {
        TunnResult::Done => Decap::Done,
        TunnResult::Err(_) => Decap::Rejected,
        TunnResult::WriteToNetwork(d) => {
            let n = d.len().min(out.len());
            out[..n].copy_from_slice(&d[..n]);
            Decap::Network(n)
        }
        TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
            Decap::Tunnel(p.len())
        }
    }
}

/// A path's second WireGuard session while a key rolls. Receiving is by session index, so both
/// sessions receive what is addressed to them; a handshake initiation is tried on both.
struct Alt {
    tunn: Box<Tunn>,
    /// Made with the new key (ours, or the peer's): it takes over sending as soon as it has a
    /// session. Otherwise it is the old one, kept only to receive what is still in flight (it
    /// takes no new handshake) until `drop_at`.
    next: bool,
    peer_key: [u8; 32],
    own: [u8; 32],
    drop_at: Option<Instant>,
}

/// The edge-wide budget and counters a path's sessions use.
#[derive(Debug)]
pub struct Context<'a> {
    /// The edge's budget of cookie replies, over all paths.
    pub cookies: &'a mut Bucket,
    /// Each path's budget of cookie replies, per second.
    pub cookies_per_path_per_s: u32,
    pub counters: &'a mut EdgeCounters,
}

/// What a datagram given to [`PathSession::receive`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Nothing more for the caller: a handshake step (answered through `send`), a keepalive, a
    /// cookie; or the datagram was refused, answered with a cookie or dropped (and counted).
    Nothing,
    /// A packet of this length was decrypted into the start of `dst`.
    Packet(usize),
}

/// What [`PathSession::encapsulate`] wrote into its `out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    /// A data datagram of this length.
    Data(usize),
    /// The session has no keys yet: it queued the packet and wrote a handshake initiation of
    /// this length, which goes to the path's endpoint (and only there).
    Initiation(usize),
    /// Nothing to send (queued behind a handshake already under way).
    Nothing,
}

/// One path's WireGuard sessions and where the peer's end of the path is.
pub struct PathSession {
    id: PathId,
    /// The endpoint the configuration gives, if any.
    configured: Option<SocketAddr>,
    /// Where datagrams go: the configured endpoint, or the source of the last authenticated
    /// datagram that was allowed to move it (see the module's documentation).
    endpoint: Option<SocketAddr>,
    /// The peer's index base on this path (see [`peer_base`]), once it sent a handshake message
    /// that completed.
    peer_base: Option<u32>,
    /// WireGuard's persistent keepalive, seconds (none: off).
    keepalive: Option<u16>,
    /// The session that sends.
    tunn: Box<Tunn>,
    /// The peer's key `tunn` was made with.
    peer_key: [u8; 32],
    /// Our (public) key `tunn` was made with.
    own: [u8; 32],
    /// Which of the two index spaces `tunn`'s sessions use (see [`tunnel_index`]).
    side: u32,
    /// During a key roll (ours or the peer's), the path's other session.
    alt: Option<Alt>,
    /// Its check of handshake messages, made when the first comes (see [`crate::handshake`]).
    guard: Option<Guard>,
    /// While the path is down: when it next starts a fresh handshake (see [`DOWN_REHANDSHAKE`]).
    rehandshake_at: Option<Instant>,
    /// When authenticated traffic last came from the endpoint.
    heard_at: Option<Instant>,
    /// The configured endpoint changed while the peer was talking from elsewhere: taken when
    /// it falls silent.
    pending: bool,
    /// When [`Self::hello`] last started a handshake, and how many it started since the path
    /// was last up.
    hello_at: Option<Instant>,
    hellos: u32,
}

impl std::fmt::Debug for PathSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathSession")
            .field("id", &self.id)
            .field("endpoint", &self.endpoint)
            .field("side", &self.side)
            .field("rolling", &self.alt.is_some())
            .finish_non_exhaustive()
    }
}

impl PathSession {
    /// Path `id`'s sessions of ours (`secret`) with `peer_key`, and (a peer rolling its key)
    /// with its `next` key, accepted from the start.
    pub fn new(
        secret: &StaticSecret,
        peer_key: [u8; 32],
        next: Option<[u8; 32]>,
        id: PathId,
        endpoint: Option<SocketAddr>,
        keepalive: Option<u16>,
    ) -> Self {
        let keepalive = keepalive.filter(|k| *k > 0);
        let mut s = Self {
            id,
            configured: endpoint,
            endpoint,
            peer_base: None,
            keepalive,
            tunn: new_tunn(secret, peer_key, id, 0, keepalive),
            peer_key,
            own: public_of(secret),
            side: 0,
            alt: None,
            guard: None,
            rehandshake_at: None,
            heard_at: None,
            pending: false,
            hello_at: None,
            hellos: 0,
        };
        s.alt = next.map(|k| s.next_alt(secret, k));
        s
    }

    fn make(&self, secret: &StaticSecret, peer_key: [u8; 32], side: u32) -> Box<Tunn> {
        new_tunn(secret, peer_key, self.id, side, self.keepalive)
    }

    /// A session of ours (`secret`) with `peer_key`, on the other side, that takes over sending
    /// as soon as it has a session.
    fn next_alt(&self, secret: &StaticSecret, peer_key: [u8; 32]) -> Alt {
        Alt {
            tunn: self.make(secret, peer_key, self.side ^ 1),
            next: true,
            peer_key,
            own: public_of(secret),
            drop_at: None,
        }
    }

    /// Where this path's datagrams go, if anywhere is known.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    /// The configuration gives a new endpoint (or none). It is where datagrams go from now on,
    /// unless the peer is talking from where they go now (authenticated traffic in the last
    /// [`LIVE`]): a peer behind an endpoint-dependent NAT reaches us from another port than the
    /// one the controller saw, and a relayed path stays relayed. If the peer falls silent
    /// later, the configured one is taken then (see [`Self::tick`]). None keeps what was
    /// learned.
    pub fn configure(&mut self, endpoint: Option<SocketAddr>, now: Instant) {
        if endpoint != self.configured {
            self.configured = endpoint;
            self.pending = endpoint.is_some() && endpoint != self.endpoint;
            if !self.live(now) {
                self.take_configured();
            }
        }
    }

    fn live(&self, now: Instant) -> bool {
        self.heard_at
            .is_some_and(|t| now.saturating_duration_since(t) < LIVE)
    }

    fn take_configured(&mut self) {
        if self.pending {
            self.endpoint = self.configured;
            self.pending = false;
        }
    }

    /// The peer's index base on this path, once known (see [`peer_base`]).
    pub fn peer_base(&self) -> Option<u32> {
        self.peer_base
    }

    /// How long ago the sending session's last handshake completed (none: it has no keys).
    pub fn last_handshake(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }

    /// Encrypts `packet` under the sending session into `out` (see [`Sealed`]).
    pub fn encapsulate(&mut self, packet: &[u8], out: &mut [u8]) -> Sealed {
        match self.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) if d.first() == Some(&4) => Sealed::Data(d.len()),
            TunnResult::WriteToNetwork(d) => Sealed::Initiation(d.len()),
            _ => Sealed::Nothing,
        }
    }

    /// A handshake initiation of the sending session into `out`, unless one is under way (or
    /// `force`: a fresh one anyway); its length (0 for none).
    pub fn initiation(&mut self, out: &mut [u8], force: bool) -> usize {
        initiation_of(&mut self.tunn, out, force)
    }

    /// A path with no session yet wants one: a fresh handshake into `out` (its length), unless
    /// this started one less than [`DOWN_REHANDSHAKE`] ago. Not WireGuard's 5 s between tries:
    /// behind NATs the first initiations are lost by design (each side's opens its own NAT for
    /// the other's: hole punching), and a path should form within a second or two of both
    /// sides knowing where the other is.
    pub fn hello(&mut self, out: &mut [u8], now: Instant) -> usize {
        if self
            .hello_at
            .is_some_and(|t| now.saturating_duration_since(t) < DOWN_REHANDSHAKE)
        {
            return 0;
        }
        self.hello_at = Some(now);
        self.hellos = self.hellos.saturating_add(1);
        self.initiation(out, true)
    }

    /// How many handshakes [`Self::hello`] started since the path was last up.
    pub fn hellos(&self) -> u32 {
        self.hellos
    }

    /// Datagrams go to `relay` from now on (no direct handshake came through); the
    /// configured endpoint stays, and wins again when the configuration changes it, as does
    /// authenticated traffic from elsewhere.
    pub fn relay_via(&mut self, relay: Option<SocketAddr>) {
        if relay.is_some() {
            self.endpoint = relay;
            self.hello_at = None;
        }
    }

    /// The path went down: a fresh handshake now, into `out` (its length), and one every
    /// [`DOWN_REHANDSHAKE`] until [`Self::up`].
    pub fn down(&mut self, out: &mut [u8], now: Instant) -> usize {
        self.rehandshake_at = Some(now + DOWN_REHANDSHAKE);
        self.initiation(out, true)
    }

    /// The path is up again.
    pub fn up(&mut self) {
        self.rehandshake_at = None;
        self.hellos = 0;
    }

    /// Forgets the handshake guard (its limits changed): the next message makes a new one.
    pub fn reset_guard(&mut self) {
        self.guard = None;
    }

    /// The sessions' timers (rekeys, retries, keepalives), the end of an old session's grace,
    /// the guard's second and a down path's next handshake. What is due is sent through `send`
    /// (`out` is room for one datagram).
    pub fn tick(&mut self, now: Instant, out: &mut [u8], send: &mut impl FnMut(&[u8], SocketAddr)) {
        if self
            .alt
            .as_ref()
            .is_some_and(|a| a.drop_at.is_some_and(|t| t <= now))
        {
            self.alt = None;
        }
        if let Some(g) = self.guard.as_mut() {
            g.tick(self.own, self.alt.as_ref().map(|a| a.own));
        }
        if self.pending && !self.live(now) {
            self.take_configured();
        }
        if self.rehandshake_at.is_some_and(|t| t <= now) {
            let n = self.down(out, now);
            self.send_to_endpoint(&out[..n], send);
        }
        for alt in [false, true] {
            let t = match (alt, &mut self.alt) {
                (false, _) => &mut self.tunn,
                (true, Some(a)) => &mut a.tunn,
                (true, None) => break,
            };
            if let TunnResult::WriteToNetwork(d) = t.update_timers(out) {
                let n = d.len();
                self.send_to_endpoint(&out[..n], send);
            }
        }
    }

    fn send_to_endpoint(&self, d: &[u8], send: &mut impl FnMut(&[u8], SocketAddr)) {
        if let (Some(ep), false) = (self.endpoint, d.is_empty()) {
            send(d, ep);
        }
    }

    /// Starts our key roll on this path: a second session made with our new key `secret`,
    /// which handshakes at once (into `out`: its length) and takes over sending when it is up.
    pub fn begin_roll(&mut self, secret: &StaticSecret, out: &mut [u8]) -> usize {
        let mut alt = self.next_alt(secret, self.peer_key);
        let n = initiation_of(&mut alt.tunn, out, false);
        self.alt = Some(alt);
        n
    }

    /// Ends our key roll: the path sends with the new key `secret` from now on (its roll's
    /// session if it has one, else a fresh session), and a peer's next key accepted with our
    /// old key is accepted with the new one. Whether the roll's session took over here.
    pub fn commit_roll(&mut self, secret: &StaticSecret) -> bool {
        let new = public_of(secret);
        let mut promoted = false;
        if self.own != new {
            if self
                .alt
                .as_ref()
                .is_some_and(|a| a.next && a.own == new && a.peer_key == self.peer_key)
            {
                self.promote(Instant::now());
                promoted = true;
            } else {
                self.remake(secret, self.peer_key);
            }
        }
        // A peer's next key, accepted with our old key: with the new one now.
        let stale = self.alt.as_ref().filter(|a| a.next && a.own != new);
        if let Some(peer_key) = stale.map(|a| a.peer_key) {
            self.alt = Some(self.next_alt(secret, peer_key));
        }
        promoted
    }

    /// The peer's keys are now `want` and (rolling) `next`, ours `secret`: a new `next` gets a
    /// second session, which takes over when the peer handshakes with it; a `want` that is that
    /// one promotes it. Whether a session took over here.
    pub fn rekey(&mut self, secret: &StaticSecret, want: [u8; 32], next: Option<[u8; 32]>) -> bool {
        let own = public_of(secret);
        let mut promoted = false;
        if self.peer_key != want {
            if self
                .alt
                .as_ref()
                .is_some_and(|a| a.peer_key == want && a.own == own)
            {
                self.promote(Instant::now());
                promoted = true;
            } else {
                self.remake(secret, want);
            }
        }
        match next.filter(|k| *k != want) {
            Some(k) => {
                if !self.alt.as_ref().is_some_and(|a| a.next && a.peer_key == k) {
                    self.alt = Some(self.next_alt(secret, k));
                }
            }
            // The roll is over (or given up): an unused new session goes; an old one stays
            // until its grace ends, to receive what is in flight.
            None => {
                if self.alt.as_ref().is_some_and(|a| a.next) {
                    self.alt = None;
                }
            }
        }
        promoted
    }

    /// A fresh sending session of ours (`secret`) with `peer_key`, on the other side of the
    /// index space than the session it replaces; any second session goes.
    fn remake(&mut self, secret: &StaticSecret, peer_key: [u8; 32]) {
        self.side ^= 1;
        self.tunn = self.make(secret, peer_key, self.side);
        self.peer_key = peer_key;
        self.own = public_of(secret);
        self.alt = None;
    }

    /// The new-key session sends from now on; the old one stays to receive until its grace
    /// ends.
    fn promote(&mut self, now: Instant) {
        let Some(a) = &mut self.alt else {
            return;
        };
        std::mem::swap(&mut self.tunn, &mut a.tunn);
        std::mem::swap(&mut self.peer_key, &mut a.peer_key);
        std::mem::swap(&mut self.own, &mut a.own);
        a.next = false;
        a.drop_at = Some(now + OLD_SESSION_GRACE);
        self.side ^= 1;
    }

    /// Whether our key is `own` on the sending session (a roll moved it).
    pub fn sends_with(&self, own: [u8; 32]) -> bool {
        self.own == own
    }

    /// One WireGuard datagram for this path, from `from`: for the session on `side` (from its
    /// receiver index), or, a handshake initiation (`side` none), for whichever session accepts
    /// it. A decrypted packet is written to `dst`; replies (a handshake response, then what the
    /// session queued behind its handshake) go to `from` through `send`, `out` being room for
    /// one. With `may_move`, an authenticated datagram from elsewhere moves the path's endpoint.
    #[allow(clippy::too_many_arguments)] // one datagram, where it is from, and where things go
    pub fn receive(
        &mut self,
        side: Option<u32>,
        from: SocketAddr,
        datagram: &[u8],
        dst: &mut [u8],
        out: &mut [u8],
        may_move: bool,
        ctx: &mut Context<'_>,
        now: Instant,
        send: &mut impl FnMut(&[u8], SocketAddr),
    ) -> Received {
        let kind = datagram.first().copied().unwrap_or(0);
        if matches!(kind, 1 | 2) && !self.admit(side, from, datagram, out, ctx, now, send) {
            return Received::Nothing;
        }
        let mut on_alt = side.is_some_and(|g| g != self.side);
        let mut result = match (on_alt, &mut self.alt) {
            (false, _) => decap(&mut self.tunn, from.ip(), datagram, dst, out),
            (true, Some(a)) => decap(&mut a.tunn, from.ip(), datagram, dst, out),
            (true, None) => Decap::Rejected,
        };
        if side.is_none() && matches!(result, Decap::Rejected) {
            // An initiation made with the new key of a roll (an old session takes none).
            if let Some(a) = self.alt.as_mut().filter(|a| a.next) {
                result = decap(&mut a.tunn, from.ip(), datagram, dst, out);
                on_alt = true;
            }
        }
        // The new key's session takes over as soon as it can send.
        if on_alt
            && self
                .alt
                .as_ref()
                .is_some_and(|a| a.next && a.tunn.time_since_last_handshake().is_some())
        {
            self.promote(now);
            ctx.counters.sessions_rekeyed += 1;
            on_alt = false;
        }
        // Authenticated: a handshake message that completed, data or a keepalive that
        // decrypted and passed the replay check (not a cookie reply: see the module's text).
        let authentic = match result {
            Decap::Network(_) | Decap::Tunnel(_) => true,
            Decap::Done => kind == 4,
            Decap::Rejected => false,
        };
        if authentic {
            if matches!(kind, 1 | 2) {
                if let Some(s) = datagram.get(4..8) {
                    let sender = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    self.peer_base = Some(peer_base(sender));
                }
            }
            if self.endpoint != Some(from) && (may_move || self.endpoint.is_none()) {
                self.endpoint = Some(from);
                ctx.counters.endpoints_moved += 1;
            }
            if self.endpoint == Some(from) {
                self.heard_at = Some(now);
            }
        }
        match result {
            Decap::Done => Received::Nothing,
            Decap::Rejected => {
                ctx.counters.rx_rejected += 1;
                Received::Nothing
            }
            Decap::Network(n) => {
                // A handshake response (or a keepalive after ours completed): back the way the
                // peer came; then whatever the session queued behind the handshake.
                send(&out[..n], from);
                loop {
                    let t = match (on_alt, &mut self.alt) {
                        (false, _) => &mut self.tunn,
                        (true, Some(a)) => &mut a.tunn,
                        (true, None) => break,
                    };
                    match t.decapsulate(None, &[], out) {
                        TunnResult::WriteToNetwork(d) => {
                            let n = d.len();
                            send(&out[..n], from);
                        }
                        _ => break,
                    }
                }
                Received::Nothing
            }
            Decap::Tunnel(len) => Received::Packet(len),
        }
    }

    /// Whether handshake message `msg` (an initiation if `side` is none, else a response to the
    /// session on `side`) may go to its session; if not, it was refused, answered with a cookie
    /// (through `send`) or dropped here, and counted (see [`crate::handshake`]).
    #[allow(clippy::too_many_arguments)] // one message, where it is from, and where things go
    fn admit(
        &mut self,
        side: Option<u32>,
        from: SocketAddr,
        msg: &[u8],
        out: &mut [u8],
        ctx: &mut Context<'_>,
        now: Instant,
        send: &mut impl FnMut(&[u8], SocketAddr),
    ) -> bool {
        // The keys of ours it may be for: a response names its session; an initiation is for
        // the sending session, or during a roll the new key's.
        let (response, keys) = match side {
            Some(g) if g == self.side => (true, [Some(self.own), None]),
            Some(_) => (true, [self.alt.as_ref().map(|a| a.own), None]),
            None => (
                false,
                [
                    Some(self.own),
                    self.alt.as_ref().filter(|a| a.next).map(|a| a.own),
                ],
            ),
        };
        let rate = ctx.cookies_per_path_per_s;
        let guard = self.guard.get_or_insert_with(|| Guard::new(rate, now));
        let mut cookie = [0u8; 64];
        let mut verdict = Verdict::Refuse;
        for own in keys.into_iter().flatten() {
            verdict = guard.check(own, response, from.ip(), msg, &mut cookie, ctx.cookies, now);
            if verdict != Verdict::Refuse {
                break;
            }
        }
        match verdict {
            Verdict::Admit => {
                ctx.counters.handshakes_admitted += 1;
                true
            }
            Verdict::Refuse => {
                ctx.counters.rx_rejected += 1;
                false
            }
            Verdict::Cookie(n) => {
                let n = n.min(out.len());
                out[..n].copy_from_slice(&cookie[..n]);
                send(&out[..n], from);
                ctx.counters.handshake_cookies_sent += 1;
                false
            }
            Verdict::Drop => {
                ctx.counters.handshakes_dropped += 1;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, WgMessage};

    /// A datagram on the wire between the two peers: its bytes, its source and destination.
    type Wire = Vec<(Vec<u8>, SocketAddr, SocketAddr)>;

    const A_ADDR: &str = "192.0.2.1:51820";
    const B_ADDR: &str = "198.51.100.7:51820";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn secret(seed: u8) -> StaticSecret {
        StaticSecret::from([seed; 32])
    }

    /// One end of a path: its sessions, its address, its budgets and counters.
    struct End {
        s: PathSession,
        at: SocketAddr,
        cookies: Bucket,
        counters: EdgeCounters,
        received: Vec<Vec<u8>>,
    }

    impl End {
        /// Path `id` of the end keyed `own` with the peer keyed `peer` at `peer_at`.
        fn new(own: u8, peer: u8, id: u32, at: &str, peer_at: Option<&str>) -> Self {
            Self {
                s: PathSession::new(
                    &secret(own),
                    public_of(&secret(peer)),
                    None,
                    PathId(id),
                    peer_at.map(addr),
                    None,
                ),
                at: addr(at),
                cookies: Bucket::new(100, Instant::now()),
                counters: EdgeCounters::default(),
                received: Vec::new(),
            }
        }

        /// Gives this end a datagram from `from`, as the edge would (the side from the
        /// receiver index); what it sends is put on `wire`.
        fn take(&mut self, d: &[u8], from: SocketAddr, may_move: bool, wire: &mut Wire) {
            let side = match wire::classify(d) {
                Some(WgMessage::ToSession(r)) => match path_of(wire::tunnel_of(r)) {
                    Some((_, side)) => Some(side),
                    None => {
                        self.counters.rx_unknown += 1;
                        return;
                    }
                },
                Some(WgMessage::Initiation) => None,
                None => {
                    self.counters.rx_unknown += 1;
                    return;
                }
            };
            let mut dst = vec![0u8; 2048];
            let mut out = vec![0u8; 2048];
            let at = self.at;
            let mut ctx = Context {
                cookies: &mut self.cookies,
                cookies_per_path_per_s: 10,
                counters: &mut self.counters,
            };
            let got = self.s.receive(
                side,
                from,
                d,
                &mut dst,
                &mut out,
                may_move,
                &mut ctx,
                Instant::now(),
                &mut |d, to| wire.push((d.to_vec(), at, to)),
            );
            if let Received::Packet(n) = got {
                self.received.push(dst[..n].to_vec());
            }
        }

        /// Encrypts `packet`; what goes out is put on `wire`.
        fn send(&mut self, packet: &[u8], wire: &mut Wire) {
            let mut out = vec![0u8; 2048];
            let (Sealed::Data(n) | Sealed::Initiation(n)) = self.s.encapsulate(packet, &mut out)
            else {
                return;
            };
            if let Some(to) = self.s.endpoint() {
                wire.push((out[..n].to_vec(), self.at, to));
            }
        }

        fn tick(&mut self, now: Instant, wire: &mut Wire) {
            let mut out = vec![0u8; 2048];
            let at = self.at;
            self.s
                .tick(now, &mut out, &mut |d, to| wire.push((d.to_vec(), at, to)));
        }
    }

    /// Carries everything on `wire` to whichever end it is addressed to (a datagram to an
    /// address neither end has is lost), until nothing is left; each arrives from the source it
    /// was sent from, or from `nat` if that end is behind one. Returns how many were carried.
    fn run(
        a: &mut End,
        b: &mut End,
        wire: &mut Wire,
        nat: Option<(SocketAddr, SocketAddr)>,
    ) -> usize {
        let mut n = 0;
        while !wire.is_empty() {
            let batch = std::mem::take(wire);
            for (d, from, to) in batch {
                let from = match nat {
                    Some((inside, outside)) if from == inside => outside,
                    _ => from,
                };
                n += 1;
                if to == a.at || nat.is_some_and(|(i, o)| i == a.at && to == o) {
                    a.take(&d, from, true, wire);
                } else if to == b.at {
                    b.take(&d, from, true, wire);
                }
            }
        }
        n
    }

    /// An IPv4 packet from 10.0.0.1 to 10.0.0.2 carrying `tag` (the tunnel delivers IP packets).
    fn packet(tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[27] = tag;
        p
    }

    /// Two ends of one path, A (keyed 1) and B (keyed 2), each knowing the other's address.
    fn pair() -> (End, End) {
        (
            End::new(1, 2, 0, A_ADDR, Some(B_ADDR)),
            End::new(2, 1, 5, B_ADDR, Some(A_ADDR)),
        )
    }

    fn handshake(a: &mut End, b: &mut End, wire: &mut Wire) {
        let mut out = vec![0u8; 256];
        let n = a.s.initiation(&mut out, false);
        assert_eq!(n, 148);
        wire.push((out[..n].to_vec(), a.at, b.at));
        run(a, b, wire, None);
        assert!(a.s.last_handshake().is_some(), "A has a session");
        assert!(b.s.last_handshake().is_some(), "B has a session");
    }

    #[test]
    fn two_peers_handshake_and_carry_data_both_ways() {
        let (mut a, mut b) = pair();
        let mut wire = Wire::new();
        // Data before any handshake is queued behind one and delivered once it completes.
        a.send(&packet(1), &mut wire);
        assert_eq!(wire.len(), 1);
        assert_eq!(wire[0].0[0], 1, "an initiation goes first");
        run(&mut a, &mut b, &mut wire, None);
        assert_eq!(b.received, vec![packet(1)]);
        for i in 2..10 {
            a.send(&packet(i), &mut wire);
            b.send(&packet(100 + i), &mut wire);
        }
        run(&mut a, &mut b, &mut wire, None);
        assert_eq!(b.received.len(), 9);
        assert_eq!(a.received.len(), 8);
        assert_eq!(a.received[0], packet(102));
        // Each knows the other's path number from the handshake.
        assert_eq!(b.s.peer_base(), Some(1), "A's path 0 is tunnel 1");
        assert_eq!(a.s.peer_base(), Some(6), "B's path 5 is tunnel 6");
        assert_eq!(a.counters.rx_rejected + b.counters.rx_rejected, 0);
    }

    /// A rolls its key while data flows both ways: B accepts A's next key from the start (as
    /// the controller gives it), A's new session takes over when up, what was in flight under
    /// the old one still arrives, and nothing is lost.
    #[test]
    fn a_key_roll_loses_nothing() {
        let (mut a, mut b) = pair();
        let mut wire = Wire::new();
        handshake(&mut a, &mut b, &mut wire);
        let new = secret(9);
        b.s.rekey(&secret(2), public_of(&secret(1)), Some(public_of(&new)));
        // In flight under A's old session while the roll starts.
        a.send(&packet(1), &mut wire);
        let in_flight = std::mem::take(&mut wire);
        let mut out = vec![0u8; 256];
        let n = a.s.begin_roll(&new, &mut out);
        assert_eq!(n, 148);
        wire.push((out[..n].to_vec(), a.at, b.at));
        // Still the old session until the new one has keys.
        a.send(&packet(2), &mut wire);
        run(&mut a, &mut b, &mut wire, None);
        assert!(a.s.sends_with(public_of(&new)), "A's new session took over");
        for i in 3..6 {
            a.send(&packet(i), &mut wire);
            b.send(&packet(100 + i), &mut wire);
        }
        run(&mut a, &mut b, &mut wire, None);
        // The old session's datagram arrives last, within its grace.
        wire.extend(in_flight);
        run(&mut a, &mut b, &mut wire, None);
        let mut got: Vec<u8> = b.received.iter().map(|p| p[27]).collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        assert_eq!(a.received.len(), 3);
        // The peer's side: B's roll ends, A's new key becomes the only one.
        assert!(
            !b.s.rekey(&secret(2), public_of(&new), None),
            "B moved when A's data came"
        );
        a.s.commit_roll(&new);
        a.send(&packet(6), &mut wire);
        run(&mut a, &mut b, &mut wire, None);
        assert_eq!(b.received.len(), 6);
        assert_eq!(a.counters.sessions_rekeyed + b.counters.sessions_rekeyed, 2);
        assert_eq!(a.counters.rx_rejected + b.counters.rx_rejected, 0);
    }

    /// The peer moves (a new address behind its NAT): its next authenticated datagram moves
    /// the endpoint, replies go to the new address; a datagram replayed from elsewhere, a cookie
    /// or a datagram the caller does not allow to move it, does not.
    #[test]
    fn the_endpoint_follows_authenticated_traffic_only() {
        let (mut a, mut b) = pair();
        let mut wire = Wire::new();
        handshake(&mut a, &mut b, &mut wire);
        // A now sends from 203.0.113.9:40000 (its NAT renumbered).
        let moved = addr("203.0.113.9:40000");
        a.send(&packet(1), &mut wire);
        let captured = wire[0].0.clone();
        run(&mut a, &mut b, &mut wire, Some((addr(A_ADDR), moved)));
        assert_eq!(b.received.len(), 1);
        assert_eq!(b.s.endpoint(), Some(moved));
        assert_eq!(b.counters.endpoints_moved, 1);
        // Replies go there.
        b.send(&packet(2), &mut wire);
        assert_eq!(wire[0].2, moved);
        wire.clear();
        // The captured datagram replayed from an attacker: rejected, the endpoint stays.
        let attacker = addr("192.0.2.66:1");
        b.take(&captured, attacker, true, &mut wire);
        assert_eq!(b.s.endpoint(), Some(moved));
        assert_eq!(b.received.len(), 1);
        assert_eq!(b.counters.rx_rejected, 1);
        // Fresh, authentic data the caller says cannot move it (a duplicate on another path).
        a.send(&packet(3), &mut wire);
        let d = wire.remove(0).0;
        b.take(&d, attacker, false, &mut wire);
        assert_eq!(b.received.len(), 2);
        assert_eq!(b.s.endpoint(), Some(moved));
        // The configuration names another endpoint: the peer was heard from where it is a
        // moment ago, so that stays; once it has not been heard for a while, the configured
        // one wins.
        let now = Instant::now();
        b.s.configure(Some(addr("203.0.113.10:51820")), now);
        assert_eq!(b.s.endpoint(), Some(moved));
        b.s.configure(Some(addr("203.0.113.11:51820")), now + 2 * LIVE);
        assert_eq!(b.s.endpoint(), Some(addr("203.0.113.11:51820")));
        // Changed while the peer talks, and then the peer falls silent: taken then.
        b.take(
            &{
                a.send(&packet(4), &mut wire);
                wire.remove(0).0
            },
            moved,
            true,
            &mut wire,
        );
        assert_eq!(b.s.endpoint(), Some(moved));
        let now = Instant::now();
        b.s.configure(Some(addr("203.0.113.12:51820")), now);
        assert_eq!(b.s.endpoint(), Some(moved));
        b.tick(now + LIVE / 2, &mut wire);
        assert_eq!(b.s.endpoint(), Some(moved));
        b.tick(now + 2 * LIVE, &mut wire);
        assert_eq!(b.s.endpoint(), Some(addr("203.0.113.12:51820")));
    }

    /// A peer with no known endpoint (behind a NAT the controller has not seen yet) is learned
    /// from its first initiation, and the response goes back there.
    #[test]
    fn a_peer_without_an_endpoint_is_learned_from_its_handshake() {
        let mut a = End::new(1, 2, 0, A_ADDR, Some(B_ADDR));
        let mut b = End::new(2, 1, 5, B_ADDR, None);
        let mut wire = Wire::new();
        // B cannot start: nowhere to send.
        b.send(&packet(9), &mut wire);
        assert!(wire.is_empty());
        let outside = addr("203.0.113.9:20001");
        a.send(&packet(1), &mut wire);
        run(&mut a, &mut b, &mut wire, Some((addr(A_ADDR), outside)));
        assert_eq!(b.s.endpoint(), Some(outside));
        assert_eq!(b.received, vec![packet(1)]);
        // B's packet, queued behind a handshake it could not send, went once A's gave it keys.
        assert_eq!(a.received, vec![packet(9)]);
        b.send(&packet(2), &mut wire);
        assert_eq!(wire[0].2, outside);
    }

    /// An initiation replayed from the peer's real address is refused (its timestamp is not
    /// newer) and the session carries on; garbage of every kind is refused without harm.
    #[test]
    fn a_replayed_initiation_and_garbage_change_nothing() {
        let (mut a, mut b) = pair();
        let mut wire = Wire::new();
        let mut out = vec![0u8; 256];
        let n = a.s.initiation(&mut out, false);
        let init = out[..n].to_vec();
        wire.push((init.clone(), a.at, b.at));
        run(&mut a, &mut b, &mut wire, None);
        a.send(&packet(1), &mut wire);
        run(&mut a, &mut b, &mut wire, None);
        assert_eq!(b.received.len(), 1);
        let before = b.counters;
        b.take(&init, a.at, true, &mut wire);
        assert!(wire.is_empty(), "no response to a replay");
        assert_eq!(b.counters.rx_rejected, before.rx_rejected + 1);
        // Garbage: a short datagram, a response that answers nothing, random bytes shaped as
        // data, an initiation from a key B does not know.
        let mut bogus_data = vec![4u8, 0, 0, 0];
        bogus_data.extend(tunnel_index(PathId(5), 0).wrapping_shl(8).to_le_bytes());
        bogus_data.extend([0x5a; 40]);
        let mut stranger = End::new(7, 2, 3, "192.0.2.200:1", Some(B_ADDR));
        let m = stranger.s.initiation(&mut out, false);
        let strange_init = out[..m].to_vec();
        let mut forged_response = vec![2u8, 0, 0, 0];
        forged_response.extend([1, 2, 3, 4]);
        forged_response.extend((tunnel_index(PathId(5), 0) << 8).to_le_bytes());
        forged_response.extend([0u8; 80]);
        for g in [
            &[4u8, 0, 0][..],
            &bogus_data,
            &strange_init,
            &forged_response,
            &[1u8; 148][..],
        ] {
            b.take(g, addr("192.0.2.66:9"), true, &mut wire);
        }
        assert!(wire.is_empty(), "nothing answered");
        assert_eq!(b.s.endpoint(), Some(a.at));
        assert!(b.counters.rx_rejected + b.counters.rx_unknown >= before.rx_rejected + 5);
        // The session still works both ways.
        a.send(&packet(2), &mut wire);
        b.send(&packet(3), &mut wire);
        run(&mut a, &mut b, &mut wire, None);
        assert_eq!(b.received.len(), 2);
        assert_eq!(a.received, vec![packet(3)]);
    }

    /// A path that went down handshakes afresh at once and every second until it is up: the
    /// peer may have lost its session (restarted) while ours still looks valid.
    #[test]
    fn a_down_path_handshakes_again_every_second_until_up() {
        let (mut a, mut b) = pair();
        let mut wire = Wire::new();
        handshake(&mut a, &mut b, &mut wire);
        let now = Instant::now();
        let mut out = vec![0u8; 256];
        assert_eq!(
            a.s.down(&mut out, now),
            148,
            "a fresh initiation, although one completed"
        );
        a.tick(now + Duration::from_millis(500), &mut wire);
        assert!(wire.iter().all(|d| d.0[0] != 1), "not before the second");
        wire.clear();
        a.tick(now + DOWN_REHANDSHAKE, &mut wire);
        assert_eq!(wire.iter().filter(|d| d.0[0] == 1).count(), 1);
        run(&mut a, &mut b, &mut wire, None);
        a.s.up();
        a.tick(now + 3 * DOWN_REHANDSHAKE, &mut wire);
        assert!(wire.iter().all(|d| d.0[0] != 1), "up: no more");
    }

    /// A path with no session yet tries again every second, not every 5 s: behind NATs the
    /// first initiations of both sides are lost by design.
    #[test]
    fn a_path_without_a_session_says_hello_every_second() {
        let (mut a, _) = pair();
        let now = Instant::now();
        let mut out = vec![0u8; 256];
        assert_eq!(a.s.hello(&mut out, now), 148);
        assert_eq!(a.s.hello(&mut out, now + Duration::from_millis(900)), 0);
        assert_eq!(a.s.hello(&mut out, now + DOWN_REHANDSHAKE), 148);
    }

    #[test]
    fn indices_name_their_path_and_side() {
        for id in [0, 1, 4000, GEN_BIT - 2] {
            for side in [0, 1] {
                assert_eq!(
                    path_of(tunnel_index(PathId(id), side)),
                    Some((PathId(id), side))
                );
            }
        }
        assert_eq!(path_of(0), None);
        assert_eq!(path_of(GEN_BIT), None);
        assert_eq!(path_of(u32::MAX >> 8), None);
        assert_eq!(peer_base(tunnel_index(PathId(7), 1) << 8 | 0x33), 8);
    }
}
