//! STUN (RFC 8489) Binding messages as Patronus uses them for endpoint discovery: what an edge
//! sends from each link's own socket and reads back, and what the controller parses and answers
//! (`patronus_controller::stun` has the responder and its rules). A site's request names its
//! site and link in USERNAME (`patronus-site:<site name>:<link>`), carries the sender's clock in
//! PATRONUS-TIME and is keyed with MESSAGE-INTEGRITY-SHA256 (the key: SHA-256 of the site's
//! credential, which is what the controller keeps of it); the answer is keyed the same way.

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
    /// The site it claims to come from (its name), if it names one.
    pub site: Option<String>,
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
                        Some(l) => Some(crate::Name::new(l).ok()?.to_string()),
                        None => None,
                    };
                    Some((crate::Name::new(id).ok()?.to_string(), link))
                });
            match parsed {
                _ if req.integrity.is_none() => {
                    req.unusable_auth = true;
                    req.bad_request = true;
                }
                Some((site, link)) => {
                    req.site = Some(site);
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
#[derive(Debug)]
pub struct Writer(Vec<u8>);

impl Writer {
    pub fn new(kind: u16, transaction: &[u8; 12]) -> Self {
        let mut b = Vec::with_capacity(96);
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(transaction);
        Self(b)
    }

    pub fn attr(&mut self, t: u16, value: &[u8]) {
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
    pub fn integrity(&mut self, key: &[u8]) {
        let at = self.0.len();
        let mac = integrity(&self.0, at, key).finalize().into_bytes();
        self.attr(ATTR_MESSAGE_INTEGRITY_SHA256, &mac);
    }

    /// FINGERPRINT, last.
    pub fn finish(mut self) -> Vec<u8> {
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
    /// The site's name.
    pub site: &'a str,
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
