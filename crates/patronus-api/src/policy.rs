use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use crate::{FieldErrors, LinkKind, Name, Prefix, SlaClass};

/// A traffic class rule: packets that match are carried as `class`, steered by `steering`, over
/// links allowed by `links`. Policies are evaluated in ascending `order`; the first match wins.
/// A packet no policy matches gets the engine's default class.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: Name,
    /// Evaluation order, lowest first. Unique across the policies of a deployment.
    pub order: u32,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, rename = "match")]
    pub matches: Match,
    /// The SLA class (by name) this traffic must get.
    pub class: Name,
    #[serde(default)]
    pub steering: SteeringMode,
    #[serde(default)]
    pub links: LinkPreference,
    /// When no path meets the class's SLA: `false` (default) carries the flow on the least-bad
    /// live path; `true` drops it instead.
    #[serde(default)]
    pub strict: bool,
}

fn yes() -> bool {
    true
}

/// What a policy matches. Each list is "any of"; an empty list matches everything; all given
/// fields must match. Port ranges match only packets that carry ports (TCP, UDP, SCTP, UDP-Lite).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct Match {
    pub src: Vec<Prefix>,
    pub dst: Vec<Prefix>,
    pub protocol: Option<Protocol>,
    pub src_ports: Vec<PortRange>,
    pub dst_ports: Vec<PortRange>,
    pub dscp: Vec<Dscp>,
}

/// How flows of a class are spread over the paths to their destination site.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum SteeringMode {
    /// The path with the best score for the class.
    #[default]
    BestQuality,
    /// The cheapest path that meets the SLA: unmetered before metered, then lowest price per GB,
    /// then link priority, then link kind.
    LowestCost,
    /// New flows spread over the paths that meet the SLA, in proportion to path capacity.
    LoadBalance,
    /// Every packet on the two best paths, on link-disjoint paths when there are some; the
    /// receiver keeps the first copy.
    Duplicate,
}

impl SteeringMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SteeringMode::BestQuality => "best-quality",
            SteeringMode::LowestCost => "lowest-cost",
            SteeringMode::LoadBalance => "load-balance",
            SteeringMode::Duplicate => "duplicate",
        }
    }
}

impl FromStr for SteeringMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            SteeringMode::BestQuality,
            SteeringMode::LowestCost,
            SteeringMode::LoadBalance,
            SteeringMode::Duplicate,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| {
            format!(
                "unknown steering mode {s:?} (best-quality, lowest-cost, load-balance, duplicate)"
            )
        })
    }
}

/// Which links a class may use. A path has two ends (the local and the remote link); `only`
/// needs both ends to be of a listed kind, `avoid` demotes a path when either end is, `prefer`
/// promotes a path when both ends are.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct LinkPreference {
    pub prefer: Vec<LinkKind>,
    pub avoid: Vec<LinkKind>,
    pub only: Vec<LinkKind>,
    pub metered: MeteredUse,
}

/// Whether a class may use a metered link (either end metered makes the path metered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum MeteredUse {
    #[default]
    Allow,
    /// Only when no unmetered path is available in the same SLA tier.
    Avoid,
    Never,
}

/// An IP protocol number. Written as a name (`tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, `gre`,
/// `esp`, `ah`, `udplite`) or a number 0..=255; serialized as the name when there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(pub u8);

const PROTOCOL_NAMES: [(&str, u8); 9] = [
    ("icmp", 1),
    ("tcp", 6),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("icmpv6", 58),
    ("sctp", 132),
    ("udplite", 136),
];

impl Protocol {
    pub const ICMP: Protocol = Protocol(1);
    pub const TCP: Protocol = Protocol(6);
    pub const UDP: Protocol = Protocol(17);
    pub const ICMPV6: Protocol = Protocol(58);
    pub const SCTP: Protocol = Protocol(132);
    pub const UDPLITE: Protocol = Protocol(136);

    /// True for protocols whose first four bytes are a source and a destination port.
    pub fn has_ports(self) -> bool {
        matches!(self.0, 6 | 17 | 132 | 136)
    }

    pub fn name(self) -> Option<&'static str> {
        PROTOCOL_NAMES
            .iter()
            .find(|(_, n)| *n == self.0)
            .map(|(s, _)| *s)
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        if let Some((_, n)) = PROTOCOL_NAMES.iter().find(|(name, _)| *name == lower) {
            return Ok(Protocol(*n));
        }
        s.parse::<u8>().map(Protocol).map_err(|_| {
            format!("unknown protocol {s:?}: use a name (tcp, udp, icmp, icmpv6, sctp, gre, esp, ah, udplite) or a number 0..=255")
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", self.0),
        }
    }
}

/// An inclusive range of ports, written `"443"`, `"8000-8080"` or as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    pub fn new(start: u16, end: u16) -> Result<Self, String> {
        if start > end {
            return Err(format!("port range {start}-{end} ends before it starts"));
        }
        Ok(Self { start, end })
    }

    pub fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    pub fn start(&self) -> u16 {
        self.start
    }

    pub fn end(&self) -> u16 {
        self.end
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port (0..=65535)"))
        };
        match s.split_once('-') {
            Some((a, b)) => Self::new(port(a)?, port(b)?),
            None => Ok(Self::single(port(s)?)),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// A DiffServ code point, 0..=63. Written as a number or a standard name (`ef`, `af41`, `cs3`,
/// `le`, `va`, `default`); serialized as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dscp(u8);

impl Dscp {
    pub const EF: Dscp = Dscp(46);

    pub fn new(v: u8) -> Result<Self, String> {
        if v > 63 {
            return Err(format!("DSCP {v} is out of range 0..=63"));
        }
        Ok(Self(v))
    }

    pub fn value(self) -> u8 {
        self.0
    }
}

impl FromStr for Dscp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        let named = match lower.as_str() {
            "default" | "df" | "be" => Some(0),
            "le" => Some(1),
            "ef" => Some(46),
            "va" => Some(44),
            _ => None,
        };
        if let Some(v) = named {
            return Ok(Dscp(v));
        }
        if let Some(n) = lower.strip_prefix("cs") {
            if let Ok(c @ 0..=7) = n.parse::<u8>() {
                return Ok(Dscp(c << 3));
            }
        }
        if let Some(n) = lower.strip_prefix("af") {
            let b = n.as_bytes();
            if let [c @ b'1'..=b'4', d @ b'1'..=b'3'] = b {
                return Ok(Dscp(((c - b'0') << 3) | ((d - b'0') << 1)));
            }
        }
        match s.parse::<u8>() {
            Ok(v) => Dscp::new(v),
            Err(_) => Err(format!(
                "unknown DSCP {s:?}: use 0..=63 or a name (ef, va, le, default, cs0..cs7, af11..af43)"
            )),
        }
    }
}

/// Serde for the small value types: accept a string or a number, emit the canonical form.
mod serde_impls {
    use super::*;
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    struct StrOrNum<T>(std::marker::PhantomData<T>, &'static str);

    impl<T> Visitor<'_> for StrOrNum<T>
    where
        T: FromStr<Err = String>,
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.1)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            v.parse().map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            v.to_string().parse().map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            v.to_string().parse().map_err(E::custom)
        }
    }

    macro_rules! str_or_num {
        ($t:ty, $expecting:literal, |$s:ident, $ser:ident| $body:expr) => {
            impl<'de> serde::Deserialize<'de> for $t {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    d.deserialize_any(StrOrNum::<$t>(std::marker::PhantomData, $expecting))
                }
            }
            impl serde::Serialize for $t {
                fn serialize<S: Serializer>(&self, $ser: S) -> Result<S::Ok, S::Error> {
                    let $s = self;
                    $body
                }
            }
        };
    }

    str_or_num!(
        Protocol,
        "a protocol name or number",
        |p, s| match p.name() {
            Some(n) => s.serialize_str(n),
            None => s.serialize_u8(p.0),
        }
    );
    str_or_num!(
        PortRange,
        "a port or a port range like \"8000-8080\"",
        |r, s| s.serialize_str(&r.to_string())
    );
    str_or_num!(Dscp, "a DSCP value 0..=63 or name", |d, s| s
        .serialize_u8(d.0));
}

impl Policy {
    /// Checks what deserialization cannot: ports only with protocols that have them, link
    /// preferences that do not contradict each other, and a class that exists.
    pub fn validate(&self, classes: &[SlaClass]) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        let m = &self.matches;
        if let Some(p) = m.protocol {
            let has_port_ranges = !(m.src_ports.is_empty() && m.dst_ports.is_empty());
            if !p.has_ports() && has_port_ranges {
                errs.push(
                    "match.protocol",
                    format!("{p} has no ports, but the policy matches ports"),
                );
            }
        }
        if !classes.iter().any(|c| c.name == self.class) {
            errs.push(
                "class",
                format!("no SLA class named {:?}", self.class.as_str()),
            );
        }
        let l = &self.links;
        let avoid: BTreeSet<_> = l.avoid.iter().collect();
        if let Some(k) = l.prefer.iter().find(|k| avoid.contains(k)) {
            errs.push(
                "links",
                format!("{} is both preferred and avoided", k.as_str()),
            );
        }
        if !l.only.is_empty() {
            if let Some(k) = l.prefer.iter().find(|k| !l.only.contains(k)) {
                errs.push(
                    "links.prefer",
                    format!("{} is preferred but not in `only`", k.as_str()),
                );
            }
        }
        errs.into_result()
    }
}

/// The most policies a deployment may have.
pub const MAX_POLICIES: usize = 10_000;

/// Validates a policy set: each policy on its own, plus unique names and unique orders (so that
/// "first match" is never ambiguous), and at most [`crate::MAX_POLICIES`].
pub fn validate_policies(policies: &[Policy], classes: &[SlaClass]) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    if policies.len() > MAX_POLICIES {
        errs.push(
            "policies",
            format!("at most {MAX_POLICIES} policies, got {}", policies.len()),
        );
    }
    let mut orders: BTreeMap<u32, &Name> = BTreeMap::new();
    let mut names = BTreeSet::new();
    for (i, p) in policies.iter().enumerate() {
        if let Err(e) = p.validate(classes) {
            errs.extend_prefixed(&format!("policies[{i}]"), e);
        }
        if let Some(other) = orders.insert(p.order, &p.name) {
            errs.push(
                format!("policies[{i}].order"),
                format!("order {} is also used by policy {other}", p.order),
            );
        }
        if !names.insert(&p.name) {
            errs.push(
                format!("policies[{i}].name"),
                format!("another policy is named {}", p.name),
            );
        }
    }
    errs.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voice_policy_document_parses_with_names_and_numbers() {
        let p: Policy = serde_json::from_str(
            r#"{
                "name": "voice", "order": 10, "class": "realtime", "steering": "duplicate",
                "match": {"protocol": "udp", "dst_ports": ["5060-5061", 16384, "10000-20000"],
                          "dscp": ["ef", 34], "dst": ["10.2.0.0/16"]},
                "links": {"avoid": ["lte"], "metered": "avoid"}
            }"#,
        )
        .unwrap();
        assert_eq!(p.matches.protocol, Some(Protocol::UDP));
        assert_eq!(p.matches.dst_ports[0], PortRange::new(5060, 5061).unwrap());
        assert_eq!(p.matches.dst_ports[1], PortRange::single(16384));
        assert_eq!(p.matches.dscp, [Dscp::EF, Dscp::new(34).unwrap()]);
        assert_eq!(p.steering, SteeringMode::Duplicate);
        assert!(p.enabled);
        p.validate(&SlaClass::builtins()).unwrap();
        let back: Policy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn dscp_names_map_to_their_code_points() {
        for (s, v) in [
            ("ef", 46),
            ("af41", 34),
            ("AF11", 10),
            ("cs6", 48),
            ("default", 0),
            ("le", 1),
            ("63", 63),
        ] {
            assert_eq!(s.parse::<Dscp>().unwrap().value(), v, "{s}");
        }
        for bad in ["64", "af44", "cs8", "voice"] {
            assert!(bad.parse::<Dscp>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_ranges_and_protocols_are_refused_by_name() {
        assert!(
            "2000-1000"
                .parse::<PortRange>()
                .unwrap_err()
                .contains("ends before")
        );
        assert!("70000".parse::<PortRange>().is_err());
        assert_eq!("ICMP".parse::<Protocol>().unwrap(), Protocol::ICMP);
        assert_eq!("200".parse::<Protocol>().unwrap(), Protocol(200));
        assert!("tcpp".parse::<Protocol>().is_err());
        let err = serde_json::from_str::<Match>(r#"{"dst_ports":["80-x"]}"#).unwrap_err();
        assert!(err.to_string().contains("\"x\" is not a port"), "{err}");
    }

    #[test]
    fn policy_sets_report_every_problem_with_its_path() {
        let json = r#"[
            {"name":"a","order":1,"class":"realtime","match":{"protocol":"icmp","dst_ports":[80]}},
            {"name":"a","order":1,"class":"nope","links":{"prefer":["lte"],"avoid":["lte"]}}
        ]"#;
        let ps: Vec<Policy> = serde_json::from_str(json).unwrap();
        let errs = validate_policies(&ps, &SlaClass::builtins()).unwrap_err();
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "policies[0].match.protocol",
                "policies[1].class",
                "policies[1].links",
                "policies[1].order",
                "policies[1].name"
            ]
        );
    }
}
