//! The classifier: policies compiled into bit vectors, one lookup per header field.
//!
//! This is the bit-vector scheme of Lakshman and Stiliadis (SIGCOMM 1998). Each field (source
//! and destination address, per family; protocol; source and destination port; DSCP) is split
//! into elementary intervals, and each interval stores the set of rules that accept it, as a bit
//! vector in policy order. Classifying a packet finds its interval in each field (a binary
//! search for addresses and ports, a table index for protocol and DSCP), ANDs the six vectors,
//! and takes the lowest set bit, which is the first matching policy. The cost grows with
//! `log(intervals)` and `rules / 64`, not with the number of rules times fields.
//!
//! Semantics, as in [`patronus_api::Match`]: an empty list matches anything; a rule with port
//! ranges matches only packets that carry ports; a packet without ports (ICMP, say, or a later
//! fragment) matches only rules without port ranges.

use patronus_api::Match;

use crate::packet::PacketMeta;

/// Policies compiled for classification. Built once per policy change.
#[derive(Debug, Clone)]
pub struct Classifier {
    words: usize,
    rules: usize,
    src_v4: IntervalDim,
    dst_v4: IntervalDim,
    src_v6: IntervalDim,
    dst_v6: IntervalDim,
    sport: IntervalDim,
    dport: IntervalDim,
    /// Rules without port ranges, for packets without ports.
    portless: Vec<u64>,
    proto: Vec<u64>,
    dscp: Vec<u64>,
}

/// One field: sorted interval starts, and for each interval the bit vector of accepting rules.
#[derive(Debug, Clone)]
struct IntervalDim {
    starts: Vec<u128>,
    sets: Vec<u64>,
}

impl IntervalDim {
    /// `ranges[r]` is `None` when rule `r` does not constrain this field, or the inclusive
    /// ranges it accepts.
    fn build(words: usize, max: u128, ranges: &[Option<Vec<(u128, u128)>>]) -> Self {
        let mut starts = vec![0u128];
        for (lo, hi) in ranges.iter().flatten().flatten() {
            starts.push(*lo);
            if *hi < max {
                starts.push(hi + 1);
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let mut sets = vec![0u64; starts.len() * words];
        for (i, &start) in starts.iter().enumerate() {
            let set = &mut sets[i * words..(i + 1) * words];
            for (r, rule) in ranges.iter().enumerate() {
                let accepts = match rule {
                    None => true,
                    Some(rs) => rs.iter().any(|&(lo, hi)| lo <= start && start <= hi),
                };
                if accepts {
                    set[r / 64] |= 1 << (r % 64);
                }
            }
        }
        Self { starts, sets }
    }

    fn lookup(&self, words: usize, x: u128) -> &[u64] {
        // starts[0] == 0, so the partition point is at least 1.
        let i = self.starts.partition_point(|&s| s <= x).saturating_sub(1);
        &self.sets[i * words..(i + 1) * words]
    }
}

fn table(
    words: usize,
    size: usize,
    accepts: impl Fn(usize, usize) -> bool,
    rules: usize,
) -> Vec<u64> {
    let mut t = vec![0u64; size * words];
    for v in 0..size {
        for r in 0..rules {
            if accepts(r, v) {
                t[v * words + r / 64] |= 1 << (r % 64);
            }
        }
    }
    t
}

impl Classifier {
    /// Compiles rules given in priority order (first match wins).
    pub fn new(rules: &[&Match]) -> Self {
        let n = rules.len();
        let words = n.div_ceil(64).max(1);
        let prefixes = |pick: fn(&Match) -> &[patronus_api::Prefix], v4: bool| {
            rules
                .iter()
                .map(|m| {
                    let ps = pick(m);
                    (!ps.is_empty()).then(|| {
                        ps.iter()
                            .filter(|p| p.is_ipv4() == v4)
                            .map(|p| p.range())
                            .collect::<Vec<_>>()
                    })
                })
                .collect::<Vec<_>>()
        };
        let ports = |pick: fn(&Match) -> &[patronus_api::PortRange]| {
            rules
                .iter()
                .map(|m| {
                    let rs = pick(m);
                    (!rs.is_empty()).then(|| {
                        rs.iter()
                            .map(|r| (u128::from(r.start()), u128::from(r.end())))
                            .collect::<Vec<_>>()
                    })
                })
                .collect::<Vec<_>>()
        };
        let v4max = u128::from(u32::MAX);
        let mut portless = vec![0u64; words];
        for (r, m) in rules.iter().enumerate() {
            if m.src_ports.is_empty() && m.dst_ports.is_empty() {
                portless[r / 64] |= 1 << (r % 64);
            }
        }
        Self {
            words,
            rules: n,
            src_v4: IntervalDim::build(words, v4max, &prefixes(|m| &m.src, true)),
            dst_v4: IntervalDim::build(words, v4max, &prefixes(|m| &m.dst, true)),
            src_v6: IntervalDim::build(words, u128::MAX, &prefixes(|m| &m.src, false)),
            dst_v6: IntervalDim::build(words, u128::MAX, &prefixes(|m| &m.dst, false)),
            sport: IntervalDim::build(words, 65535, &ports(|m| &m.src_ports)),
            dport: IntervalDim::build(words, 65535, &ports(|m| &m.dst_ports)),
            portless,
            proto: table(
                words,
                256,
                |r, v| rules[r].protocol.is_none_or(|p| usize::from(p.0) == v),
                n,
            ),
            dscp: table(
                words,
                64,
                |r, v| {
                    rules[r].dscp.is_empty()
                        || rules[r].dscp.iter().any(|d| usize::from(d.value()) == v)
                },
                n,
            ),
        }
    }

    /// The number of rules compiled in.
    pub fn len(&self) -> usize {
        self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules == 0
    }

    /// The index (in the order given to [`Classifier::new`]) of the first rule matching the
    /// packet, or `None`.
    pub fn classify(&self, meta: &PacketMeta) -> Option<usize> {
        let w = self.words;
        let k = &meta.key;
        let (src, dst) = if k.is_ipv6() {
            (&self.src_v6, &self.dst_v6)
        } else {
            (&self.src_v4, &self.dst_v4)
        };
        let s = src.lookup(w, k.src_bits());
        let d = dst.lookup(w, k.dst_bits());
        let p = &self.proto[usize::from(k.proto()) * w..][..w];
        let q = &self.dscp[usize::from(meta.dscp & 63) * w..][..w];
        let (sp, dp) = if k.has_ports() {
            (
                self.sport.lookup(w, u128::from(k.sport())),
                self.dport.lookup(w, u128::from(k.dport())),
            )
        } else {
            (&self.portless[..], &self.portless[..])
        };
        for i in 0..w {
            let x = s[i] & d[i] & p[i] & q[i] & sp[i] & dp[i];
            if x != 0 {
                let r = i * 64 + x.trailing_zeros() as usize;
                return (r < self.rules).then_some(r);
            }
        }
        None
    }
}

/// Whether one rule matches a packet, evaluated directly from the rule. The classifier must
/// agree with this for every rule set and packet; it is the reference model its tests check.
pub fn matches(m: &Match, meta: &PacketMeta) -> bool {
    let k = &meta.key;
    let any_prefix =
        |ps: &[patronus_api::Prefix], ip| ps.is_empty() || ps.iter().any(|p| p.contains(ip));
    let any_port = |rs: &[patronus_api::PortRange], port| {
        rs.is_empty() || (k.has_ports() && rs.iter().any(|r| r.contains(port)))
    };
    any_prefix(&m.src, k.src())
        && any_prefix(&m.dst, k.dst())
        && m.protocol.is_none_or(|p| p.0 == k.proto())
        && any_port(&m.src_ports, k.sport())
        && any_port(&m.dst_ports, k.dport())
        && (m.dscp.is_empty() || m.dscp.iter().any(|d| d.value() == meta.dscp & 63))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::ipv4;
    use patronus_api::{Dscp, PortRange, Protocol};

    /// A match from `key=value` words: `proto=udp dport=5060-5061,16384 dscp=ef`.
    fn m(spec: &str) -> Match {
        let mut out = Match::default();
        for part in spec.split_whitespace() {
            let (k, v) = part.split_once('=').unwrap();
            match k {
                "src" => out.src = v.split(',').map(|p| p.parse().unwrap()).collect(),
                "dst" => out.dst = v.split(',').map(|p| p.parse().unwrap()).collect(),
                "proto" => out.protocol = Some(v.parse::<Protocol>().unwrap()),
                "sport" => {
                    out.src_ports = v
                        .split(',')
                        .map(|p| p.parse::<PortRange>().unwrap())
                        .collect()
                }
                "dport" => {
                    out.dst_ports = v
                        .split(',')
                        .map(|p| p.parse::<PortRange>().unwrap())
                        .collect()
                }
                "dscp" => out.dscp = v.split(',').map(|p| p.parse::<Dscp>().unwrap()).collect(),
                _ => panic!("{k}"),
            }
        }
        out
    }

    fn pkt(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, dscp: u8) -> PacketMeta {
        PacketMeta::parse(&ipv4(src, dst, proto, sport, dport, dscp)).unwrap()
    }

    #[test]
    fn the_first_matching_policy_wins() {
        let rules = [
            m("proto=udp dport=5060-5061,16384-32767 dscp=ef"),
            m("dst=10.2.0.0/16 proto=tcp dport=443"),
            m("dst=10.0.0.0/8"),
            m(""),
        ];
        let c = Classifier::new(&rules.iter().collect::<Vec<_>>());
        assert_eq!(
            c.classify(&pkt([10, 1, 0, 1], [10, 2, 0, 1], 17, 4000, 20000, 46)),
            Some(0)
        );
        assert_eq!(
            c.classify(&pkt([10, 1, 0, 1], [10, 2, 0, 1], 17, 4000, 20000, 0)),
            Some(2)
        );
        assert_eq!(
            c.classify(&pkt([10, 1, 0, 1], [10, 2, 0, 1], 6, 4000, 443, 0)),
            Some(1)
        );
        assert_eq!(
            c.classify(&pkt([10, 1, 0, 1], [10, 3, 0, 1], 6, 4000, 443, 0)),
            Some(2)
        );
        assert_eq!(
            c.classify(&pkt([10, 1, 0, 1], [192, 0, 2, 1], 6, 4000, 443, 0)),
            Some(3)
        );
    }

    #[test]
    fn port_rules_never_match_packets_without_ports() {
        let rules = [m("dport=0-65535"), m("proto=icmp")];
        let c = Classifier::new(&rules.iter().collect::<Vec<_>>());
        assert_eq!(
            c.classify(&pkt([1, 1, 1, 1], [2, 2, 2, 2], 1, 0, 0, 0)),
            Some(1)
        );
        assert_eq!(
            c.classify(&pkt([1, 1, 1, 1], [2, 2, 2, 2], 17, 0, 0, 0)),
            Some(0)
        );
    }

    #[test]
    fn a_later_fragment_matches_no_port_rule_even_one_covering_port_zero() {
        let rules = [m("proto=udp dport=0-100"), m("proto=udp")];
        let c = Classifier::new(&rules.iter().collect::<Vec<_>>());
        let mut frag = ipv4([1, 1, 1, 1], [2, 2, 2, 2], 17, 5, 6, 0);
        frag[7] = 1; // fragment offset 8 bytes: no UDP header here
        let meta = PacketMeta::parse(&frag).unwrap();
        assert_eq!(c.classify(&meta), Some(1));
        assert!(!matches(&rules[0], &meta));
        assert_eq!(
            c.classify(&pkt([1, 1, 1, 1], [2, 2, 2, 2], 17, 5, 6, 0)),
            Some(0)
        );
    }

    #[test]
    fn an_ipv6_only_rule_never_matches_ipv4() {
        let rules = [m("src=2001:db8::/32"), m("src=10.0.0.0/8,2001:db8::/32")];
        let c = Classifier::new(&rules.iter().collect::<Vec<_>>());
        assert_eq!(
            c.classify(&pkt([10, 1, 1, 1], [2, 2, 2, 2], 6, 1, 2, 0)),
            Some(1)
        );
        assert_eq!(
            c.classify(&pkt([11, 1, 1, 1], [2, 2, 2, 2], 6, 1, 2, 0)),
            None
        );
    }

    #[test]
    fn more_than_sixty_four_rules_keep_their_order() {
        let mut rules: Vec<Match> = (0..130u16)
            .map(|i| m(&format!("proto=tcp dport={}", 1000 + i)))
            .collect();
        rules.push(m("proto=tcp"));
        let c = Classifier::new(&rules.iter().collect::<Vec<_>>());
        assert_eq!(c.len(), 131);
        for i in [0u16, 63, 64, 127, 128, 129] {
            assert_eq!(
                c.classify(&pkt([1, 1, 1, 1], [2, 2, 2, 2], 6, 9, 1000 + i, 0)),
                Some(usize::from(i))
            );
        }
        assert_eq!(
            c.classify(&pkt([1, 1, 1, 1], [2, 2, 2, 2], 6, 9, 999, 0)),
            Some(130)
        );
        assert_eq!(
            Classifier::new(&[]).classify(&pkt([1, 1, 1, 1], [2, 2, 2, 2], 6, 9, 999, 0)),
            None
        );
    }
}
