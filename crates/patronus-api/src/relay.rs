//! The relay's framing: how an edge sends a WireGuard datagram through the controller's UDP
//! port (the STUN responder's, `patronus_controller::stun`) to a peer's link it cannot reach
//! directly (both ends behind endpoint-dependent, "symmetric", NAT), and how the peer receives
//! it. The datagram itself is WireGuard, end-to-end encrypted with the peer's key: the relay
//! sees which sites talk and how much, nothing else.
//!
//! A frame is a header and the datagram:
//!
//! ```text
//! 0xFF 'P' | version (1) | kind (1: to, 2: from) | site length | site | link length | link | datagram
//! ```
//!
//! An edge sends kind 1, naming the peer's site and link; the relay forwards kind 2 to that
//! link's registered address, naming the sender's site and link as its own registration says
//! (never as the sender claims). The first byte tells a frame from STUN (whose first two bits
//! are 0) and from WireGuard (types 1-4).

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = [0xFF, b'P'];
pub const VERSION: u8 = 1;
/// An edge's frame to the relay: the header names the destination.
pub const TO: u8 = 1;
/// The relay's frame to an edge: the header names the source.
pub const FROM: u8 = 2;
/// The longest site or link name a header carries (a [`crate::Name`] is shorter).
pub const MAX_NAME: usize = 63;

/// A frame's header: `kind` ([`TO`] or [`FROM`]), a site and a link; empty if a name is empty
/// or longer than [`MAX_NAME`].
pub fn header(kind: u8, site: &str, link: &str) -> Vec<u8> {
    header_for(kind, &names(site, link))
}

/// A site and a link as a header carries them (each its length, then its bytes): what
/// [`Frame::names`] gives back, and a key that needs no parsing to look a frame up by. Empty if
/// a name is empty or longer than [`MAX_NAME`].
pub fn names(site: &str, link: &str) -> Vec<u8> {
    if site.is_empty() || link.is_empty() || site.len() > MAX_NAME || link.len() > MAX_NAME {
        return Vec::new();
    }
    let mut n = Vec::with_capacity(2 + site.len() + link.len());
    n.push(site.len() as u8);
    n.extend_from_slice(site.as_bytes());
    n.push(link.len() as u8);
    n.extend_from_slice(link.as_bytes());
    n
}

/// A frame's header of `kind` for `names` (see [`names`]); empty if `names` is.
pub fn header_for(kind: u8, names: &[u8]) -> Vec<u8> {
    if names.is_empty() {
        return Vec::new();
    }
    let mut h = Vec::with_capacity(4 + names.len());
    h.extend_from_slice(&MAGIC);
    h.push(VERSION);
    h.push(kind);
    h.extend_from_slice(names);
    h
}

/// A frame, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub site: &'a str,
    pub link: &'a str,
    /// The site and the link as the header carries them (see [`names`]).
    pub names: &'a [u8],
    /// Where the datagram starts.
    pub at: usize,
}

/// Whether `d` starts like a frame (checked no further).
pub fn is_frame(d: &[u8]) -> bool {
    d.starts_with(&MAGIC)
}

/// Reads `d` as a frame of this version carrying a datagram; `None` for anything else.
pub fn parse(d: &[u8]) -> Option<Frame<'_>> {
    if !is_frame(d) || *d.get(2)? != VERSION {
        return None;
    }
    let kind = *d.get(3)?;
    if kind != TO && kind != FROM {
        return None;
    }
    let name = |at: usize| -> Option<(&str, usize)> {
        let n = usize::from(*d.get(at)?);
        if n == 0 || n > MAX_NAME {
            return None;
        }
        let s = std::str::from_utf8(d.get(at + 1..at + 1 + n)?).ok()?;
        Some((s, at + 1 + n))
    };
    let (site, at) = name(4)?;
    let (link, at) = name(at)?;
    (at < d.len()).then_some(Frame {
        kind,
        site,
        link,
        names: &d[4..at],
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_reads_back_and_garbage_does_not() {
        let mut f = header(TO, "branch-1", "lte");
        f.extend_from_slice(&[4, 0, 0, 0, 9, 9]);
        let r = parse(&f).unwrap();
        assert_eq!((r.kind, r.site, r.link), (TO, "branch-1", "lte"));
        assert_eq!(r.names, names("branch-1", "lte"));
        assert_eq!(&f[r.at..], &[4, 0, 0, 0, 9, 9]);
        // Without a datagram, truncated anywhere, another version or kind: none.
        let h = header(FROM, "a", "b");
        assert_eq!(parse(&h), None);
        for n in 0..f.len() - 6 {
            assert_eq!(parse(&f[..n]), None, "{n}");
        }
        let mut v = f.clone();
        v[2] = 2;
        assert_eq!(parse(&v), None);
        let mut k = f.clone();
        k[3] = 3;
        assert_eq!(parse(&k), None);
        assert!(header(TO, "", "lte").is_empty());
        assert!(header(TO, &"x".repeat(64), "lte").is_empty());
        // Neither STUN nor WireGuard looks like one.
        assert!(!is_frame(&[0x00, 0x01, 0, 0]) && !is_frame(&[1, 0, 0, 0]));
    }
}
