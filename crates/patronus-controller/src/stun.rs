//! Endpoint discovery: the controller answers STUN Binding requests (RFC 8489) on UDP, at the
//! API's address (`stun_port`, by default the API's port number), telling each sender the
//! address and port its packets arrive from: what the NATs between a site's link and the
//! controller made of its source. An edge sends one from each link's own WireGuard socket, so
//! the answer is the endpoint its peers can reach that link at.
//!
//! Two kinds of request are answered:
//!
//! - **anonymous** (no USERNAME, no MESSAGE-INTEGRITY-SHA256): a plain reflection, as any public
//!   STUN server gives, and nothing is recorded. An answer to anyone without the key is at most
//!   64 bytes (less than twice the smallest request bigger than 36): no amplifier worth the
//!   name.
//! - **a site's**: USERNAME `patronus-site:<site name>:<link name>` (or without the link), a
//!   PATRONUS-TIME attribute (the sender's
//!   clock, Unix milliseconds; within [`MAX_SKEW_MS`] of the controller's), and
//!   MESSAGE-INTEGRITY-SHA256 keyed with the hash the controller keeps of the site's
//!   credential (SHA-256 of the credential the edge holds). The answer is keyed the same way,
//!   so the edge knows it comes from its controller and was not altered on the way. A request
//!   whose clock, site or integrity does not check out gets 401, without integrity; one that
//!   lacks half of USERNAME and MESSAGE-INTEGRITY-SHA256, 400. A retransmission (the same
//!   transaction from the same address, RFC 8489 §6.2.1) gets the same answer again, the same
//!   transaction from elsewhere (a replay) nothing. Lookups of site credentials are held to a
//!   budget per second, overall and per source address, checked after the clock. The
//!   address a site's request came from is recorded as its link's observed endpoint
//!   (`links.observed_endpoint`): when it changes, the configuration generation moves, and the
//!   site's peers are given it for a link that has no configured endpoint.
//!
//! Everything else (responses, indications, garbage) is dropped unanswered; a request with an
//! unknown comprehension-required attribute gets 420 (RFC 8489 §6.3.1), keyed if it was a
//! site's whose integrity checked out.

use std::net::{IpAddr, SocketAddr};

pub use patronus_api::stun::*;

/// The response header that tells an edge, with its configuration, the UDP port this
/// controller answers STUN on (at the address the edge reached it at); absent when it does not.
pub const PORT_HEADER: &str = "patronus-stun-port";

/// What the responder did with each datagram, for `/metrics` (a fixed set of labels).
#[derive(Debug, Default)]
pub struct StunMetrics {
    counts: [std::sync::atomic::AtomicU64; 6],
    relayed: [std::sync::atomic::AtomicU64; 5],
}

/// The `result` labels of `patronus_relay_datagrams_total`, in [`StunMetrics`]'s order.
pub const RELAY_RESULTS: [&str; 5] = [
    "relayed",
    "malformed",
    "unregistered",
    "unknown_destination",
    "throttled",
];

/// The `result` labels of `patronus_stun_requests_total`, in [`StunMetrics`]'s order.
pub const RESULTS: [&str; 6] = [
    "anonymous",
    "site",
    "unauthorized",
    "unknown_attribute",
    "dropped",
    "throttled",
];

impl StunMetrics {
    fn count(&self, result: usize) {
        self.counts[result].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn count_relay(&self, result: usize) {
        self.relayed[result].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The family, in the text exposition format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str(
            "# HELP patronus_stun_requests_total STUN datagrams on the controller's UDP port, by \
             what was done with them: answered (anonymous, or a site's whose integrity checked \
             out), refused (unauthorized, unknown_attribute), dropped (not a Binding request) or \
             throttled (over the budget of site lookups).\n\
             # TYPE patronus_stun_requests_total counter\n",
        );
        for (i, r) in RESULTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "patronus_stun_requests_total{{result=\"{r}\"}} {}",
                self.counts[i].load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP patronus_relay_datagrams_total Datagrams the controller's UDP port was asked \
             to relay between sites' links (`patronus_api::relay`), by what was done with them: \
             relayed, or dropped as malformed, from an address no site registered, to a link not \
             registered, or over the sender's budget.\n\
             # TYPE patronus_relay_datagrams_total counter\n",
        );
        for (i, r) in RELAY_RESULTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "patronus_relay_datagrams_total{{result=\"{r}\"}} {}",
                self.relayed[i].load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    }
}

/// Site requests checked against the store per second, at most (each is one query), and from
/// one source address.
pub const SITE_LOOKUPS_PER_S: u32 = 2_000;
pub const SITE_LOOKUPS_PER_SOURCE_PER_S: u32 = 20;
/// Answers to site requests kept, to answer a retransmission (RFC 8489 §6.2.1: the same
/// transaction, resent when an answer is late or lost) the same and refuse a replay from
/// elsewhere: every transaction of the last [`REMEMBER`] at the lookup budget.
const REMEMBERED: usize = SITE_LOOKUPS_PER_S as usize * 2 * MAX_SKEW_MS as usize / 1000;
/// How long an answer is kept: past it, the request's clock is out of the window anyway.
const REMEMBER: std::time::Duration = std::time::Duration::from_millis(2 * MAX_SKEW_MS as u64);

/// A site request answered: who sent it, what it was, what it got.
#[derive(Debug)]
struct Answered {
    from: SocketAddr,
    request: Vec<u8>,
    answer: Vec<u8>,
}

/// The responder's memory: answers to recent site requests, the lookup budgets of this
/// second, and what each site's links were last recorded at.
#[derive(Debug)]
struct Memory {
    answers: std::collections::HashMap<[u8; 12], Answered>,
    order: std::collections::VecDeque<([u8; 12], std::time::Instant)>,
    second: std::time::Instant,
    lookups: u32,
    per_source: std::collections::HashMap<IpAddr, u32>,
    /// (site, link) -> the endpoint last recorded and the request clock it came with.
    observed: std::collections::HashMap<(i64, String), (SocketAddr, i64)>,
    /// Who may relay and be relayed to (see [`Relay`]).
    relay: Relay,
}

/// How long a link's registration with the relay lasts: three of the edges' requests (every
/// 25 s) may be lost.
const REGISTRATION: std::time::Duration = std::time::Duration::from_secs(80);
/// Datagrams one registered address may have relayed per second.
pub const RELAY_PER_SOURCE_PER_S: u32 = 50_000;

/// The relay's registrations: each site link whose authenticated STUN request came lately, at
/// the address it came from (what its NATs made of the link's socket towards this port, the
/// one address the relay can reach it at), by (site name, link) and by address.
#[derive(Debug, Default)]
struct Relay {
    /// Keyed by site and link as a frame's header names them (`patronus_api::relay::names`):
    /// a frame is looked up without parsing its names or copying them.
    by_link: std::collections::HashMap<Vec<u8>, (SocketAddr, std::time::Instant)>,
    by_addr: std::collections::HashMap<SocketAddr, (Vec<u8>, std::time::Instant)>,
    /// When expired registrations were last forgotten.
    pruned: Option<std::time::Instant>,
    /// This second's relayed datagrams per source, and when it began.
    second: Option<std::time::Instant>,
    sent: std::collections::HashMap<SocketAddr, u32>,
}

impl Relay {
    /// `site`'s `link` is at `from` (an authenticated request said so).
    fn register(&mut self, site: &str, link: &str, from: SocketAddr, now: std::time::Instant) {
        let k = patronus_api::relay::names(site, link);
        if k.is_empty() {
            return;
        }
        if let Some((old, _)) = self.by_link.insert(k.clone(), (from, now)) {
            if old != from {
                self.by_addr.remove(&old);
            }
        }
        self.by_addr.insert(from, (k, now));
        // Bounded by the sites' links, and what expired goes as new ones come (looked at once
        // a second, not on every registration).
        if self
            .pruned
            .is_none_or(|p| now.saturating_duration_since(p) >= std::time::Duration::from_secs(1))
        {
            self.pruned = Some(now);
            self.by_link
                .retain(|_, (_, t)| now.saturating_duration_since(*t) < REGISTRATION);
            self.by_addr
                .retain(|_, (_, t)| now.saturating_duration_since(*t) < REGISTRATION);
        }
    }

    /// What to send where for frame `d` from `from`, or the result to count.
    fn forward(
        &mut self,
        d: &[u8],
        from: SocketAddr,
        now: std::time::Instant,
    ) -> Result<(Vec<u8>, SocketAddr), usize> {
        let f = patronus_api::relay::parse(d)
            .filter(|f| f.kind == patronus_api::relay::TO)
            .ok_or(1usize)?;
        let live = |t: &std::time::Instant| now.saturating_duration_since(*t) < REGISTRATION;
        let (names, _) = self
            .by_addr
            .get(&from)
            .filter(|(_, t)| live(t))
            .ok_or(2usize)?;
        let (to, _) = self
            .by_link
            .get(f.names)
            .filter(|(_, t)| live(t))
            .ok_or(3usize)?;
        if self
            .second
            .is_none_or(|s| now.saturating_duration_since(s) >= std::time::Duration::from_secs(1))
        {
            self.second = Some(now);
            self.sent.clear();
        }
        let n = self.sent.entry(from).or_insert(0);
        if *n >= RELAY_PER_SOURCE_PER_S {
            return Err(4);
        }
        *n += 1;
        let mut out = patronus_api::relay::header_for(patronus_api::relay::FROM, names);
        out.extend_from_slice(&d[f.at..]);
        Ok((out, *to))
    }
}

impl Memory {
    fn new() -> Self {
        Self {
            answers: Default::default(),
            order: Default::default(),
            second: std::time::Instant::now(),
            lookups: 0,
            per_source: Default::default(),
            observed: Default::default(),
            relay: Relay::default(),
        }
    }

    /// Takes a lookup from this second's budgets (the whole one and `from`'s).
    fn lookup(&mut self, from: IpAddr, now: std::time::Instant) -> bool {
        if now.duration_since(self.second) >= std::time::Duration::from_secs(1) {
            self.second = now;
            self.lookups = 0;
            self.per_source.clear();
        }
        if self.lookups >= SITE_LOOKUPS_PER_S {
            return false;
        }
        let n = self.per_source.entry(from).or_insert(0);
        if *n >= SITE_LOOKUPS_PER_SOURCE_PER_S {
            return false;
        }
        *n += 1;
        self.lookups += 1;
        true
    }

    /// Forgets answers older than [`REMEMBER`]; whether there is room for one more (the
    /// memory is never made by evicting a live one: a replay must not get through).
    fn room(&mut self, now: std::time::Instant) -> bool {
        while let Some(&(t, at)) = self.order.front() {
            if now.duration_since(at) <= REMEMBER {
                break;
            }
            self.order.pop_front();
            self.answers.remove(&t);
        }
        self.order.len() < REMEMBERED
    }

    fn remember(&mut self, t: [u8; 12], a: Answered, now: std::time::Instant) {
        self.answers.insert(t, a);
        self.order.push_back((t, now));
    }
}

/// What to do with a datagram.
enum Reply {
    Send(Vec<u8>),
    /// Counted, unanswered.
    Drop(usize),
}

/// Answers STUN on `socket` until the task is dropped.
pub async fn serve(state: crate::AppState, socket: tokio::net::UdpSocket) {
    // Room for a relayed WireGuard datagram of a jumbo-frame link.
    let mut buf = vec![0u8; 9300];
    let mut memory = Memory::new();
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "STUN: receiving");
                continue;
            }
        };
        // An IPv4 client of a dual-stack socket is answered and recorded as IPv4.
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        if patronus_api::relay::is_frame(&buf[..n]) {
            match memory
                .relay
                .forward(&buf[..n], from, std::time::Instant::now())
            {
                Ok((out, to)) => {
                    state.stun.count_relay(0);
                    if let Err(e) = socket.send_to(&out, to).await {
                        tracing::debug!(%to, error = %e, "relay: sending");
                    }
                }
                Err(result) => state.stun.count_relay(result),
            }
            continue;
        }
        match answer(&state, &buf[..n], from, &mut memory).await {
            Reply::Send(a) => {
                if let Err(e) = socket.send_to(&a, from).await {
                    tracing::debug!(%from, error = %e, "STUN: answering");
                }
            }
            Reply::Drop(result) => state.stun.count(result),
        }
    }
}

/// The answer to `datagram` from `from`.
async fn answer(
    state: &crate::AppState,
    datagram: &[u8],
    from: SocketAddr,
    memory: &mut Memory,
) -> Reply {
    let metrics = &state.stun;
    let Ok(req) = parse(datagram) else {
        return Reply::Drop(4);
    };
    let Some(site) = req.site.as_deref().filter(|_| !req.unusable_auth) else {
        // Not a site's: anonymous, or refused before any lookup.
        return Reply::Send(if req.unusable_auth {
            metrics.count(2);
            error(
                &req,
                if req.bad_request { 400 } else { 401 },
                "Unauthorized",
            )
        } else if !req.unknown.is_empty() {
            metrics.count(3);
            error(&req, 420, "Unknown Attribute")
        } else {
            metrics.count(0);
            success(&req, from, None)
        });
    };
    let now = std::time::Instant::now();
    let now_ms = crate::store::now_ms();
    // Its clock first: what is out of the window costs nothing more.
    if req
        .time_ms
        .is_none_or(|t| now_ms.abs_diff(t) > MAX_SKEW_MS as u64)
    {
        metrics.count(2);
        return Reply::Send(error(&req, 401, "Unauthorized"));
    }
    // A retransmission gets the same answer; the same transaction from elsewhere (a replay)
    // gets nothing.
    if let Some(a) = memory.answers.get(&req.transaction) {
        if a.from == from && a.request == datagram {
            metrics.count(1);
            return Reply::Send(a.answer.clone());
        }
        return Reply::Drop(2);
    }
    if !memory.room(now) || !memory.lookup(from.ip(), now) {
        return Reply::Drop(5);
    }
    let Some((site, key)) = site_key(state, &req, datagram, site).await else {
        metrics.count(2);
        return Reply::Send(error(&req, 401, "Unauthorized"));
    };
    // Authenticated: an unknown attribute is refused now, with integrity.
    let reply = if req.unknown.is_empty() {
        metrics.count(1);
        if let (Some(link), Some(name)) = (&req.link, &req.site) {
            memory.relay.register(name, link, from, now);
        }
        if let Some(link) = &req.link {
            observe(
                state,
                memory,
                site,
                link,
                from,
                req.time_ms.unwrap_or(now_ms),
            )
            .await;
        }
        success(&req, from, Some(&key))
    } else {
        metrics.count(3);
        error_keyed(&req, 420, "Unknown Attribute", Some(&key))
    };
    memory.remember(
        req.transaction,
        Answered {
            from,
            request: datagram.to_vec(),
            answer: reply.clone(),
        },
        now,
    );
    Reply::Send(reply)
}

/// Records that site `site`'s `link` was seen from `from` by a request made at `time_ms` (its
/// clock), unless a later request said otherwise already; when the endpoint is new and the
/// link has no configured one, the configuration generation moves with it (its peers are
/// given it).
async fn observe(
    state: &crate::AppState,
    memory: &mut Memory,
    site: i64,
    link: &str,
    from: SocketAddr,
    time_ms: i64,
) {
    let k = (site, link.to_owned());
    match memory.observed.get(&k) {
        Some(&(_, t)) if t > time_ms => return,
        Some(&(e, _)) if e == from => {
            memory.observed.insert(k, (from, time_ms));
            return;
        }
        _ => {}
    }
    let write = async {
        let mut tx = state.store.begin().await?;
        let changed =
            crate::store::sites::observe_link(&mut tx, site, link, from, time_ms / 1000).await?;
        if changed == Some(true) {
            tx.config_changed().await?;
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(changed)
    };
    match write.await {
        Ok(changed) => {
            if changed.is_some() {
                tracing::info!(site, %link, endpoint = %from, "a link was observed at a new endpoint");
            }
            // Bounded by the sites' links: only authenticated requests get here.
            memory.observed.insert(k, (from, time_ms));
        }
        Err(e) => {
            tracing::warn!(site, %link, error = %e, "STUN: recording an observed endpoint");
        }
    }
}

/// The site `req` names (`site`) and the key it is made with, if one of that site's credentials
/// made it.
async fn site_key(
    state: &crate::AppState,
    req: &Request,
    datagram: &[u8],
    site: &str,
) -> Option<(i64, [u8; 32])> {
    let keys = match state.store.conn().await {
        Ok(mut c) => crate::store::enrollment::credential_hashes(&mut c, site).await,
        Err(e) => Err(e),
    };
    let keys = match keys {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "STUN: reading site credentials");
            return None;
        }
    };
    let (id, key) = keys.into_iter().find(|(_, k)| req.verify(datagram, k))?;
    Some((id, key.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5769 §2.2 and §2.3: the transaction and the XOR-mapped values of its samples.
    const TXID: [u8; 12] = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    #[test]
    fn xor_mapped_addresses_match_the_rfc_5769_samples() {
        let v4: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        assert_eq!(
            xor_address(v4, &TXID),
            [0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]
        );
        let v6: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap();
        let x = xor_address(v6, &TXID);
        assert_eq!(x[..4], [0x00, 0x02, 0xa1, 0x47]);
        assert_eq!(
            x[4..],
            [
                0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2,
                0xb9, 0xd9
            ]
        );
        assert_eq!(unxor_address(&x, &TXID), Some(v6));
        assert_eq!(unxor_address(&xor_address(v4, &TXID), &TXID), Some(v4));
    }

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_sites_request_verifies_with_its_key_only_and_its_answer_too() {
        let key = [7u8; 32];
        let raw = binding_request(
            &TXID,
            Some(SiteAuth {
                site: "hq",
                link: Some("lte"),
                time_ms: 1_700_000_000_000,
                key: &key,
            }),
        );
        let req = parse(&raw).unwrap();
        assert_eq!(req.site.as_deref(), Some("hq"));
        assert_eq!(req.link.as_deref(), Some("lte"));
        assert_eq!(req.time_ms, Some(1_700_000_000_000));
        assert!(req.authenticated() && !req.unusable_auth);
        assert!(req.verify(&raw, &key));
        assert!(!req.verify(&raw, &[8u8; 32]));
        // One bit changed anywhere before the integrity: refused.
        for i in 0..raw.len() - 8 - 36 {
            let mut bad = raw.clone();
            bad[i] ^= 1;
            if let Ok(r) = parse(&bad) {
                assert!(
                    !(r.site.as_deref() == Some("hq") && r.verify(&bad, &key)),
                    "byte {i}"
                );
            }
        }
        let from: SocketAddr = "198.51.100.7:40001".parse().unwrap();
        let answer = success(&req, from, Some(&key));
        assert_eq!(
            read_answer(&answer, &TXID, Some(&key)),
            Some(Answer::Mapped {
                addr: from,
                keyed: true
            })
        );
        assert_eq!(read_answer(&answer, &TXID, Some(&[8u8; 32])), None);
        assert_eq!(read_answer(&answer, &[0u8; 12], Some(&key)), None);
        // An unkeyed answer is not taken when one keyed was asked for.
        let plain = success(&req, from, None);
        assert_eq!(read_answer(&plain, &TXID, Some(&key)), None);
        assert_eq!(
            read_answer(&plain, &TXID, None),
            Some(Answer::Mapped {
                addr: from,
                keyed: false
            })
        );
    }

    #[test]
    fn anonymous_requests_unknown_attributes_and_bad_auth_are_told_apart() {
        let anon = parse(&binding_request(&TXID, None)).unwrap();
        assert!(!anon.authenticated() && !anon.unusable_auth && anon.unknown.is_empty());
        // A comprehension-required attribute this server does not know: 420, listing it.
        let mut w = Writer::new(BINDING_REQUEST, &TXID);
        w.attr(0x0777, b"x");
        w.attr(0x8777, b"optional");
        let req = parse(&w.finish()).unwrap();
        assert_eq!(req.unknown, vec![0x0777]);
        assert_eq!(
            read_answer(&error(&req, 420, "Unknown Attribute"), &TXID, None),
            Some(Answer::Error(420))
        );
        // A USERNAME that is not a site's, with integrity: unusable.
        let mut w = Writer::new(BINDING_REQUEST, &TXID);
        w.attr(ATTR_USERNAME, b"alice");
        w.integrity(&[1; 32]);
        let r = parse(&w.finish()).unwrap();
        assert!(r.unusable_auth && !r.bad_request);
        // Integrity without a USERNAME: half of it, 400.
        let mut w = Writer::new(BINDING_REQUEST, &TXID);
        w.integrity(&[1; 32]);
        let r = parse(&w.finish()).unwrap();
        assert!(r.unusable_auth && r.bad_request);
        // Responses and indications are not requests; garbage is malformed.
        let answer = success(&anon, "192.0.2.1:1".parse().unwrap(), None);
        assert_eq!(parse(&answer), Err(NotRequest::Other));
        assert!(matches!(parse(b"hello"), Err(NotRequest::Malformed(_))));
    }

    #[test]
    fn no_datagram_makes_the_parser_panic() {
        let key = [3u8; 32];
        let valid = binding_request(
            &TXID,
            Some(SiteAuth {
                site: "hq",
                link: None,
                time_ms: 2,
                key: &key,
            }),
        );
        // Every truncation, every length field, and pseudo-random bytes after a valid header.
        for n in 0..valid.len() {
            let _ = parse(&valid[..n]);
            let _ = read_answer(&valid[..n], &TXID, Some(&key));
        }
        let mut x = 0x1234_5678u32;
        for round in 0..20_000 {
            let mut d = valid.clone();
            for _ in 0..(round % 7 + 1) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = (x as usize) % d.len();
                d[i] = (x >> 8) as u8;
            }
            if let Ok(r) = parse(&d) {
                let _ = r.verify(&d, &key);
            }
            let _ = read_answer(&d, &TXID, Some(&key));
        }
    }
}
