//! Which site a destination address belongs to: longest-prefix match over the LAN prefixes of
//! the peers. One hash map per prefix length present, probed from the longest length down, so a
//! lookup costs one hash probe per distinct length in use (typically two or three).

use patronus_api::Prefix;
use rustc_hash::FxHashMap;

use crate::PeerId;

#[derive(Debug, Clone, Default)]
pub(crate) struct RouteTable {
    v4: Vec<(u8, FxHashMap<u128, PeerId>)>,
    v6: Vec<(u8, FxHashMap<u128, PeerId>)>,
}

impl RouteTable {
    /// Adds a prefix for a peer. Returns the peer that already owns exactly this prefix, if any
    /// (and changes nothing then).
    pub fn insert(&mut self, prefix: Prefix, peer: PeerId) -> Result<(), PeerId> {
        let table = if prefix.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        let pos = match table
            .iter()
            .position(|(len, _)| *len == prefix.prefix_len())
        {
            Some(i) => i,
            None => {
                table.push((prefix.prefix_len(), FxHashMap::default()));
                table.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
                table
                    .iter()
                    .position(|(len, _)| *len == prefix.prefix_len())
                    .unwrap_or_default()
            }
        };
        let key = prefix.range().0;
        match table[pos].1.get(&key) {
            Some(&owner) if owner != peer => Err(owner),
            _ => {
                table[pos].1.insert(key, peer);
                Ok(())
            }
        }
    }

    pub fn remove_peer(&mut self, peer: PeerId) {
        for (_, m) in self.v4.iter_mut().chain(self.v6.iter_mut()) {
            m.retain(|_, p| *p != peer);
        }
        self.v4.retain(|(_, m)| !m.is_empty());
        self.v6.retain(|(_, m)| !m.is_empty());
    }

    /// The peer owning the longest prefix containing the address (`bits` as in `FlowKey`).
    pub fn lookup(&self, bits: u128, v6: bool) -> Option<PeerId> {
        let (table, width) = if v6 {
            (&self.v6, 128u32)
        } else {
            (&self.v4, 32)
        };
        table.iter().find_map(|(len, m)| {
            let host_bits = width - u32::from(*len);
            let masked = bits
                .checked_shr(host_bits)
                .and_then(|x| x.checked_shl(host_bits))
                .unwrap_or(0);
            m.get(&masked).copied()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &str) -> (u128, bool) {
        match s.parse::<std::net::IpAddr>().unwrap() {
            std::net::IpAddr::V4(a) => (u128::from(u32::from(a)), false),
            std::net::IpAddr::V6(a) => (u128::from(a), true),
        }
    }

    #[test]
    fn the_longest_prefix_wins_and_families_stay_apart() {
        let mut t = RouteTable::default();
        t.insert("10.0.0.0/8".parse().unwrap(), PeerId(1)).unwrap();
        t.insert("10.2.0.0/16".parse().unwrap(), PeerId(2)).unwrap();
        t.insert("0.0.0.0/0".parse().unwrap(), PeerId(0)).unwrap();
        t.insert("2001:db8:2::/48".parse().unwrap(), PeerId(2))
            .unwrap();
        let (b, v6) = bits("10.2.3.4");
        assert_eq!(t.lookup(b, v6), Some(PeerId(2)));
        let (b, v6) = bits("10.3.3.4");
        assert_eq!(t.lookup(b, v6), Some(PeerId(1)));
        let (b, v6) = bits("192.0.2.1");
        assert_eq!(t.lookup(b, v6), Some(PeerId(0)));
        let (b, v6) = bits("2001:db8:2::9");
        assert_eq!(t.lookup(b, v6), Some(PeerId(2)));
        let (b, v6) = bits("2001:db8:3::9");
        assert_eq!(t.lookup(b, v6), None);
        assert_eq!(
            t.insert("10.2.0.0/16".parse().unwrap(), PeerId(3)),
            Err(PeerId(2))
        );
        t.remove_peer(PeerId(2));
        let (b, v6) = bits("10.2.3.4");
        assert_eq!(t.lookup(b, v6), Some(PeerId(1)));
    }
}
