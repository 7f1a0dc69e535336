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
//! - **a site's**: USERNAME `patronus-site:<site id>:<link name>` (or without the link), a
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

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The magic cookie of RFC 5389 and later.
pub const MAGIC: u32 = 0x2112_A442;
pub const BINDING_REQUEST: u16 = 0x0001;
pub const BINDING_SUCCESS: u16 = 0x0101;
pub const BINDING_ERROR: u16 = 0x0111;

pub const ATTR_USERNAME: u16 = 0x0006;
pub const ATTR_ERROR_CODE: u16 = 0x0009;
pub const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
pub const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub const ATTR_SOFTWARE: u16 = 0x8022;
pub const ATTR_FINGERPRINT: u16 = 0x8028;
/// The sender's clock in Unix milliseconds (8 bytes), in the comprehension-optional range: a
/// STUN server that does not know it ignores it.
pub const ATTR_PATRONUS_TIME: u16 = 0xC0A1;

/// The USERNAME prefix of a site's request.
pub const SITE_USER: &str = "patronus-site:";
/// How far a site's clock may be from the controller's.
pub const MAX_SKEW_MS: i64 = 30_000;
/// The XOR of FINGERPRINT (RFC 8489 §14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// A Binding request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub transaction: [u8; 12],
    /// The site it claims to come from, if it names one.
    pub site: Option<i64>,
    /// The site's link it was sent from, if it names one.
    pub link: Option<String>,
    pub time_ms: Option<i64>,
    /// Where MESSAGE-INTEGRITY-SHA256 starts, and its value.
    integrity: Option<(usize, [u8; 32])>,
    /// Comprehension-required attributes this server does not know.
    pub unknown: Vec<u16>,
    /// A USERNAME that is not a site's, or MESSAGE-INTEGRITY(-SHA256) without one: refused.
    pub unusable_auth: bool,
    /// Of those, the ones missing half of USERNAME and MESSAGE-INTEGRITY-SHA256: 400, not 401
    /// (RFC 8489 §9.1.3).
    pub bad_request: bool,
}

/// Why a datagram is not a Binding request this server answers (it is dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRequest {
    /// Not STUN, or not well formed.
    Malformed(&'static str),
    /// STUN, but not a Binding request (a response, an indication, another method).
    Other,
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?))
}

/// Parses `datagram` as a Binding request.
pub fn parse(datagram: &[u8]) -> Result<Request, NotRequest> {
    use NotRequest::Malformed;
    if datagram.len() < 20 {
        return Err(Malformed("shorter than a STUN header"));
    }
    let kind = u16_at(datagram, 0).ok_or(Malformed("header"))?;
    if kind & 0xC000 != 0 {
        return Err(Malformed("not STUN (the first two bits are not zero)"));
    }
    let len = usize::from(u16_at(datagram, 2).ok_or(Malformed("header"))?);
    if len % 4 != 0 || len + 20 != datagram.len() {
        return Err(Malformed("length"));
    }
    if datagram[4..8] != MAGIC.to_be_bytes() {
        return Err(Malformed("no magic cookie"));
    }
    if kind != BINDING_REQUEST {
        return Err(NotRequest::Other);
    }
    let mut transaction = [0u8; 12];
    transaction.copy_from_slice(&datagram[8..20]);
    let mut req = Request {
        transaction,
        site: None,
        link: None,
        time_ms: None,
        integrity: None,
        unknown: Vec::new(),
        unusable_auth: false,
        bad_request: false,
    };
    let mut username = None;
    let mut at = 20;
    while at < datagram.len() {
        let t = u16_at(datagram, at).ok_or(Malformed("attribute header"))?;
        let l = usize::from(u16_at(datagram, at + 2).ok_or(Malformed("attribute header"))?);
        let value = datagram
            .get(at + 4..at + 4 + l)
            .ok_or(Malformed("attribute past the end"))?;
        let next = at + 4 + l.div_ceil(4) * 4;
        if next > datagram.len() {
            return Err(Malformed("attribute padding past the end"));
        }
        if req.integrity.is_some() {
            // Only FINGERPRINT may follow MESSAGE-INTEGRITY-SHA256; anything else is ignored.
            at = next;
            continue;
        }
        match t {
            ATTR_USERNAME => {
                if l > 513 {
                    return Err(Malformed("USERNAME longer than 513 bytes"));
                }
                username = Some(value);
            }
            ATTR_MESSAGE_INTEGRITY_SHA256 => {
                let v: [u8; 32] = value
                    .try_into()
                    .map_err(|_| Malformed("MESSAGE-INTEGRITY-SHA256 of another length than 32"))?;
                req.integrity = Some((at, v));
            }
            ATTR_MESSAGE_INTEGRITY => req.unusable_auth = true,
            ATTR_PATRONUS_TIME => {
                let v: [u8; 8] = value
                    .try_into()
                    .map_err(|_| Malformed("PATRONUS-TIME of another length than 8"))?;
                req.time_ms = Some(i64::from_be_bytes(v));
            }
            ATTR_FINGERPRINT | ATTR_SOFTWARE => {}
            t if t < 0x8000 => req.unknown.push(t),
            _ => {}
        }
        at = next;
    }
    match username {
        None if req.integrity.is_some() => {
            req.unusable_auth = true;
            req.bad_request = true;
        }
        None => {}
        Some(u) => {
            // `<id>` or `<id>:<link>`, the link a valid name.
            let parsed = std::str::from_utf8(u)
                .ok()
                .and_then(|u| u.strip_prefix(SITE_USER))
                .and_then(|rest| {
                    let (id, link) = match rest.split_once(':') {
                        Some((id, l)) => (id, Some(l)),
                        None => (rest, None),
                    };
                    let link = match link {
                        Some(l) => Some(patronus_api::Name::new(l).ok()?.to_string()),
                        None => None,
                    };
                    Some((id.parse::<i64>().ok()?, link))
                });
            match parsed {
                _ if req.integrity.is_none() => {
                    req.unusable_auth = true;
                    req.bad_request = true;
                }
                Some((id, link)) => {
                    req.site = Some(id);
                    req.link = link;
                }
                None => req.unusable_auth = true,
            }
        }
    }
    Ok(req)
}

impl Request {
    /// Whether it carries a site's USERNAME and integrity (to check with [`Request::verify`]).
    pub fn authenticated(&self) -> bool {
        self.site.is_some() && self.integrity.is_some()
    }

    /// Whether `datagram` (the request this was parsed from) carries a MESSAGE-INTEGRITY-SHA256
    /// made with `key`.
    pub fn verify(&self, datagram: &[u8], key: &[u8]) -> bool {
        let Some((at, mac)) = self.integrity else {
            return false;
        };
        integrity(datagram, at, key).verify_slice(&mac).is_ok()
    }
}

/// The HMAC of a message's first `at` bytes (up to its MESSAGE-INTEGRITY-SHA256), its header's
/// length counting up to the end of that attribute (RFC 8489 §14.6).
fn integrity(message: &[u8], at: usize, key: &[u8]) -> Hmac<Sha256> {
    #[allow(clippy::expect_used)] // HMAC takes a key of any length
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    let len = (at + 4 + 32 - 20) as u16;
    mac.update(&message[..2]);
    mac.update(&len.to_be_bytes());
    mac.update(&message[4..at]);
    mac
}

/// CRC-32 (IEEE 802.3, as zlib), for FINGERPRINT.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// A STUN message being written: header, then attributes.
struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: u16, transaction: &[u8; 12]) -> Self {
        let mut b = Vec::with_capacity(96);
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(transaction);
        Self(b)
    }

    fn attr(&mut self, t: u16, value: &[u8]) {
        self.0.extend_from_slice(&t.to_be_bytes());
        self.0
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.0.extend_from_slice(value);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
        self.set_len();
    }

    fn set_len(&mut self) {
        let len = (self.0.len() - 20) as u16;
        self.0[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// MESSAGE-INTEGRITY-SHA256 over what is written so far.
    fn integrity(&mut self, key: &[u8]) {
        let at = self.0.len();
        let mac = integrity(&self.0, at, key).finalize().into_bytes();
        self.attr(ATTR_MESSAGE_INTEGRITY_SHA256, &mac);
    }

    /// FINGERPRINT, last.
    fn finish(mut self) -> Vec<u8> {
        let at = self.0.len();
        let len = (at + 8 - 20) as u16;
        self.0[2..4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32(&self.0) ^ FINGERPRINT_XOR;
        self.attr(ATTR_FINGERPRINT, &crc.to_be_bytes());
        self.0
    }
}

/// XOR-MAPPED-ADDRESS's value for `addr` (RFC 8489 §14.2).
pub fn xor_address(addr: SocketAddr, transaction: &[u8; 12]) -> Vec<u8> {
    let port = addr.port() ^ (MAGIC >> 16) as u16;
    let mut v = Vec::with_capacity(20);
    match addr.ip() {
        IpAddr::V4(a) => {
            v.extend_from_slice(&[0, 1]);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(&(u32::from(a) ^ MAGIC).to_be_bytes());
        }
        IpAddr::V6(a) => {
            v.extend_from_slice(&[0, 2]);
            v.extend_from_slice(&port.to_be_bytes());
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC.to_be_bytes());
            mask[4..].copy_from_slice(transaction);
            let o = a.octets();
            v.extend((0..16).map(|i| o[i] ^ mask[i]));
        }
    }
    v
}

/// The address XOR-MAPPED-ADDRESS's `value` holds.
pub fn unxor_address(value: &[u8], transaction: &[u8; 12]) -> Option<SocketAddr> {
    let port = u16_at(value, 2)? ^ (MAGIC >> 16) as u16;
    match (value.get(1)?, value.len()) {
        (1, 8) => {
            let a = u32::from_be_bytes(value[4..8].try_into().ok()?) ^ MAGIC;
            Some(SocketAddr::new(std::net::Ipv4Addr::from(a).into(), port))
        }
        (2, 20) => {
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC.to_be_bytes());
            mask[4..].copy_from_slice(transaction);
            let mut o = [0u8; 16];
            for i in 0..16 {
                o[i] = value[4 + i] ^ mask[i];
            }
            Some(SocketAddr::new(std::net::Ipv6Addr::from(o).into(), port))
        }
        _ => None,
    }
}

/// The success answer to `req` from `from`: its XOR-MAPPED-ADDRESS, keyed with `key` if the
/// request was a site's, and FINGERPRINT.
pub fn success(req: &Request, from: SocketAddr, key: Option<&[u8]>) -> Vec<u8> {
    let mut w = Writer::new(BINDING_SUCCESS, &req.transaction);
    w.attr(
        ATTR_XOR_MAPPED_ADDRESS,
        &xor_address(from, &req.transaction),
    );
    if let Some(k) = key {
        w.integrity(k);
    }
    w.finish()
}

/// An error answer to `req`: `code` (400, 401, 420, ...) with `reason`, and the unknown
/// attributes for 420.
pub fn error(req: &Request, code: u16, reason: &str) -> Vec<u8> {
    error_keyed(req, code, reason, None)
}

/// [`error`], keyed with `key` (an error to a site's authenticated request).
pub fn error_keyed(req: &Request, code: u16, reason: &str, key: Option<&[u8]>) -> Vec<u8> {
    let mut w = Writer::new(BINDING_ERROR, &req.transaction);
    let mut v = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
    v.extend_from_slice(reason.as_bytes());
    w.attr(ATTR_ERROR_CODE, &v);
    if code == 420 {
        let list: Vec<u8> = req.unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
        w.attr(ATTR_UNKNOWN_ATTRIBUTES, &list);
    }
    if let Some(k) = key {
        w.integrity(k);
    }
    w.finish()
}

/// Who sends a site's Binding request.
#[derive(Debug, Clone, Copy)]
pub struct SiteAuth<'a> {
    pub site: i64,
    /// The link it is sent from (whose observed endpoint the answer is).
    pub link: Option<&'a str>,
    /// The sender's clock, Unix milliseconds.
    pub time_ms: i64,
    /// SHA-256 of the site's credential.
    pub key: &'a [u8],
}

/// A Binding request (what an edge sends from each link): a site's, keyed, or without `site`
/// an anonymous one.
pub fn binding_request(transaction: &[u8; 12], site: Option<SiteAuth<'_>>) -> Vec<u8> {
    let mut w = Writer::new(BINDING_REQUEST, transaction);
    if let Some(a) = site {
        let user = match a.link {
            Some(l) => format!("{SITE_USER}{}:{l}", a.site),
            None => format!("{SITE_USER}{}", a.site),
        };
        w.attr(ATTR_USERNAME, user.as_bytes());
        w.attr(ATTR_PATRONUS_TIME, &a.time_ms.to_be_bytes());
        w.integrity(a.key);
    }
    w.finish()
}

/// What an answer said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The address the request arrived from; `keyed`: its integrity checked with the key.
    Mapped {
        addr: SocketAddr,
        keyed: bool,
    },
    Error(u16),
}

/// Reads the answer to the request with `transaction`; with `key`, a success must carry a
/// MESSAGE-INTEGRITY-SHA256 made with it. `None` for anything else (another transaction, a
/// bad integrity, not STUN).
pub fn read_answer(datagram: &[u8], transaction: &[u8; 12], key: Option<&[u8]>) -> Option<Answer> {
    if datagram.len() < 20
        || usize::from(u16_at(datagram, 2)?) + 20 != datagram.len()
        || datagram[4..8] != MAGIC.to_be_bytes()
        || datagram[8..20] != transaction[..]
    {
        return None;
    }
    let kind = u16_at(datagram, 0)?;
    let (mut mapped, mut code, mut keyed) = (None, None, false);
    let mut at = 20;
    while at + 4 <= datagram.len() {
        let t = u16_at(datagram, at)?;
        let l = usize::from(u16_at(datagram, at + 2)?);
        let value = datagram.get(at + 4..at + 4 + l)?;
        match t {
            ATTR_XOR_MAPPED_ADDRESS => mapped = unxor_address(value, transaction),
            ATTR_ERROR_CODE if l >= 4 => {
                code = Some(u16::from(value[2] & 7) * 100 + u16::from(value[3]));
            }
            ATTR_MESSAGE_INTEGRITY_SHA256 => {
                let k = key?;
                integrity(datagram, at, k).verify_slice(value).ok()?;
                keyed = true;
                break;
            }
            _ => {}
        }
        at += 4 + l.div_ceil(4) * 4;
    }
    match kind {
        BINDING_SUCCESS if key.is_some() && !keyed => None,
        BINDING_SUCCESS => Some(Answer::Mapped {
            addr: mapped?,
            keyed,
        }),
        BINDING_ERROR => Some(Answer::Error(code?)),
        _ => None,
    }
}

/// What the responder did with each datagram, for `/metrics` (a fixed set of labels).
#[derive(Debug, Default)]
pub struct StunMetrics {
    counts: [std::sync::atomic::AtomicU64; 6],
}

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
    let mut buf = vec![0u8; 2048];
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
    let Some(site) = req.site.filter(|_| !req.unusable_auth) else {
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
    let Some(key) = site_key(state, &req, datagram, site).await else {
        metrics.count(2);
        return Reply::Send(error(&req, 401, "Unauthorized"));
    };
    // Authenticated: an unknown attribute is refused now, with integrity.
    let reply = if req.unknown.is_empty() {
        metrics.count(1);
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

/// The key `req` (site `site`'s) is made with, if one of the site's credentials made it.
async fn site_key(
    state: &crate::AppState,
    req: &Request,
    datagram: &[u8],
    site: i64,
) -> Option<[u8; 32]> {
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
    keys.into_iter()
        .find(|k| req.verify(datagram, k))?
        .try_into()
        .ok()
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
                site: 42,
                link: Some("lte"),
                time_ms: 1_700_000_000_000,
                key: &key,
            }),
        );
        let req = parse(&raw).unwrap();
        assert_eq!(req.site, Some(42));
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
                assert!(!(r.site == Some(42) && r.verify(&bad, &key)), "byte {i}");
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
                site: 1,
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
