use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 prefix in canonical form: the bits after the prefix length are zero, so
/// `10.1.0.0/16` is a prefix and `10.1.2.3/16` is refused (with a hint) rather than silently
/// meaning something the operator may not have meant. A bare address is a host prefix (/32, /128).
///
/// Serialized as the usual text form, `"10.1.0.0/16"` or `"2001:db8::/32"`.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
    #[error("{0:?} is not a prefix length")]
    BadLength(String),
    #[error("prefix length {len} is longer than the {max} bits of the address")]
    TooLong { len: u8, max: u8 },
    #[error("{given} has bits set after the prefix length; did you mean {canonical}?")]
    HostBitsSet { given: String, canonical: String },
}

impl Prefix {
    /// A prefix from an address and a length; refuses host bits after the length.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let max = max_len(addr);
        if len > max {
            return Err(PrefixError::TooLong { len, max });
        }
        let canonical = Self::truncating(addr, len);
        if canonical.addr != addr {
            return Err(PrefixError::HostBitsSet {
                given: format!("{addr}/{len}"),
                canonical: canonical.to_string(),
            });
        }
        Ok(canonical)
    }

    /// The prefix of length `len` that contains `addr` (host bits cleared). `len` is clamped to
    /// the address width.
    pub fn truncating(addr: IpAddr, len: u8) -> Self {
        let len = len.min(max_len(addr));
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(len))),
        };
        Self { addr, len }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// True for `0.0.0.0/0` and `::/0`.
    pub fn is_default(&self) -> bool {
        self.len == 0
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => u32::from(a) & mask32(self.len) == u32::from(p),
            (IpAddr::V6(p), IpAddr::V6(a)) => u128::from(a) & mask128(self.len) == u128::from(p),
            _ => false,
        }
    }

    /// True when some address is in both prefixes (one contains the other).
    pub fn overlaps(&self, other: &Prefix) -> bool {
        let shorter = if self.len <= other.len { self } else { other };
        let longer = if self.len <= other.len { other } else { self };
        shorter.contains(longer.addr)
    }

    /// The first and last address of the prefix as integers in the address family's own width
    /// (IPv4 addresses fit in the low 32 bits).
    pub fn range(&self) -> (u128, u128) {
        match self.addr {
            IpAddr::V4(a) => {
                let lo = u32::from(a);
                (u128::from(lo), u128::from(lo | !mask32(self.len)))
            }
            IpAddr::V6(a) => {
                let lo = u128::from(a);
                (lo, lo | !mask128(self.len))
            }
        }
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask32(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| PrefixError::BadAddress(addr.to_owned()))?;
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .map_err(|_| PrefixError::BadLength(l.to_owned()))?,
            None => max_len(addr),
        };
        Self::new(addr, len)
    }
}

impl TryFrom<String> for Prefix {
    type Error = PrefixError;
    fn try_from(s: String) -> Result<Self, PrefixError> {
        s.parse()
    }
}

impl From<Prefix> for String {
    fn from(p: Prefix) -> String {
        p.to_string()
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn canonical_prefixes_parse_and_print_back() {
        for s in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "192.0.2.1/32",
            "2001:db8::/32",
            "::/0",
        ] {
            assert_eq!(p(s).to_string(), s);
        }
        assert_eq!(p("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(p("2001:db8::1").to_string(), "2001:db8::1/128");
    }

    #[test]
    fn host_bits_after_the_length_are_refused_with_the_canonical_form() {
        let err = "10.1.2.3/16".parse::<Prefix>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "10.1.2.3/16 has bits set after the prefix length; did you mean 10.1.0.0/16?"
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Prefix>(),
            Err(PrefixError::TooLong { .. })
        ));
        assert!(matches!(
            "10.0.0/8".parse::<Prefix>(),
            Err(PrefixError::BadAddress(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<Prefix>(),
            Err(PrefixError::BadLength(_))
        ));
    }

    #[test]
    fn containment_and_overlap_respect_the_address_family() {
        assert!(p("10.0.0.0/8").contains("10.200.1.1".parse().unwrap()));
        assert!(!p("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(!p("0.0.0.0/0").contains("::1".parse().unwrap()));
        assert!(p("::/0").contains("2001:db8::1".parse().unwrap()));
        assert!(p("10.0.0.0/8").overlaps(&p("10.1.0.0/16")));
        assert!(p("10.1.0.0/16").overlaps(&p("10.0.0.0/8")));
        assert!(!p("10.1.0.0/16").overlaps(&p("10.2.0.0/16")));
        assert!(!p("0.0.0.0/0").overlaps(&p("::/0")));
    }

    #[test]
    fn ranges_cover_exactly_the_prefix() {
        assert_eq!(p("10.0.0.0/8").range(), (0x0a00_0000, 0x0aff_ffff));
        assert_eq!(p("0.0.0.0/0").range(), (0, 0xffff_ffff));
        assert_eq!(p("::/0").range(), (0, u128::MAX));
    }

    #[test]
    fn prefixes_serialize_as_strings() {
        let json = serde_json::to_string(&p("10.1.0.0/16")).unwrap();
        assert_eq!(json, "\"10.1.0.0/16\"");
        let err = serde_json::from_str::<Prefix>("\"10.1.0.1/16\"").unwrap_err();
        assert!(
            err.to_string().contains("did you mean 10.1.0.0/16"),
            "{err}"
        );
    }
}
