//! The flow table: open addressing with linear probing over 64-byte, cache-line-aligned
//! slots, each holding a flow's key *and* its cached decision.
//!
//! A lookup that hits reads one cache line (a general-purpose hash map reads its control bytes
//! and then the entry, two dependent random accesses). Each dependent random read into a table
//! larger than the L2 cache has its own chance to stall; `patronus bench path-select` reports
//! what one such read costs on the machine at hand next to what a cache hit costs.
//!
//! Deletion uses backward shifting (Knuth, TAOCP vol. 3, 6.4, algorithm R), so there are no
//! tombstones and lookups never degrade. The table is made at its full size, at least twice the
//! configured number of flows, so it is never more than half full and never rehashes: a table
//! that doubled as it filled stalled the one packet that made it grow, 9 ms at 65,536 flows on
//! the machine the README describes (`patronus bench path-select` saw it as the slowest miss).
//! Its memory is held from the start (32 MiB for the default 262,144 flows). Expiry walks it a
//! bounded run of slots at a time ([`FlowTable::retain_run`]), so no pass over the whole table
//! stalls a packet either.

use std::hash::Hasher;

use crate::packet::FlowKey;
use crate::{Decision, DropReason, PathId, PeerId};

const OCCUPIED: u8 = 1;
const V6: u8 = 2;
const PORTS: u8 = 16;
const KIND_SHIFT: u8 = 2;
const KIND_MASK: u8 = 3;
const KIND_SEND: u8 = 0;
const KIND_DUPLICATE: u8 = 1;
const KIND_NO_PATH: u8 = 2;
const KIND_SLA: u8 = 3;
const MIN_SLOTS: usize = 64;

/// A cached flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flow {
    pub peer: PeerId,
    pub profile: u16,
    pub decision: Decision,
    /// The peer's epoch when the decision was last made or confirmed.
    pub epoch: u32,
    /// The configuration generation the flow was classified under (low 16 bits).
    pub cfg_gen: u16,
    /// Whole seconds since the engine's epoch.
    pub last_seen: u32,
}

#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Slot {
    src: [u64; 2],
    dst: [u64; 2],
    peer: u32,
    primary: u32,
    secondary: u32,
    epoch: u32,
    last_seen: u32,
    sport: u16,
    dport: u16,
    profile: u16,
    cfg_gen: u16,
    proto: u8,
    flags: u8,
}

const EMPTY: Slot = Slot {
    src: [0; 2],
    dst: [0; 2],
    peer: 0,
    primary: 0,
    secondary: 0,
    epoch: 0,
    last_seen: 0,
    sport: 0,
    dport: 0,
    profile: 0,
    cfg_gen: 0,
    proto: 0,
    flags: 0,
};

impl Slot {
    fn occupied(&self) -> bool {
        self.flags & OCCUPIED != 0
    }

    fn holds(&self, k: &FlowKey) -> bool {
        self.occupied()
            && self.src == k.src_words()
            && self.dst == k.dst_words()
            && self.sport == k.sport()
            && self.dport == k.dport()
            && self.proto == k.proto()
            && (self.flags & V6 != 0) == k.is_ipv6()
            && (self.flags & PORTS != 0) == k.has_ports()
    }

    fn key(&self) -> FlowKey {
        FlowKey::from_words(
            self.src,
            self.dst,
            self.proto,
            (self.sport, self.dport),
            self.flags & V6 != 0,
            self.flags & PORTS != 0,
        )
    }

    fn flow(&self) -> Flow {
        let decision = match (self.flags >> KIND_SHIFT) & KIND_MASK {
            KIND_SEND => Decision::Send(PathId(self.primary)),
            KIND_DUPLICATE => Decision::Duplicate {
                primary: PathId(self.primary),
                secondary: PathId(self.secondary),
            },
            KIND_NO_PATH => Decision::Drop(DropReason::NoPath),
            _ => Decision::Drop(DropReason::SlaUnavailable),
        };
        Flow {
            peer: PeerId(self.peer),
            profile: self.profile,
            decision,
            epoch: self.epoch,
            cfg_gen: self.cfg_gen,
            last_seen: self.last_seen,
        }
    }

    fn set_flow(&mut self, f: &Flow) {
        let (kind, primary, secondary) = match f.decision {
            Decision::Send(p) => (KIND_SEND, p.0, 0),
            Decision::Duplicate { primary, secondary } => (KIND_DUPLICATE, primary.0, secondary.0),
            Decision::Drop(DropReason::SlaUnavailable) => (KIND_SLA, 0, 0),
            // NoRoute is never cached; treat it as NoPath should it ever be.
            Decision::Drop(_) => (KIND_NO_PATH, 0, 0),
        };
        self.peer = f.peer.0;
        self.primary = primary;
        self.secondary = secondary;
        self.epoch = f.epoch;
        self.last_seen = f.last_seen;
        self.profile = f.profile;
        self.cfg_gen = f.cfg_gen;
        self.flags = (self.flags & (OCCUPIED | V6 | PORTS)) | (kind << KIND_SHIFT);
    }
}

fn hash(k: &FlowKey) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    let [s0, s1] = k.src_words();
    let [d0, d1] = k.dst_words();
    h.write_u64(s0);
    h.write_u64(s1);
    h.write_u64(d0);
    h.write_u64(d1);
    h.write_u64(
        u64::from(k.sport())
            | u64::from(k.dport()) << 16
            | u64::from(k.proto()) << 32
            | u64::from(k.is_ipv6()) << 40,
    );
    // Fibonacci hashing: the index is taken from the high bits, which the multiply mixes best.
    h.finish().wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[derive(Debug)]
pub(crate) struct FlowTable {
    slots: Vec<Slot>,
    /// log2(slots.len())
    bits: u32,
    len: usize,
    max: usize,
}

impl FlowTable {
    /// A table for at most `max` flows, at its full size.
    pub fn new(max: usize) -> Self {
        let n = max
            .saturating_mul(2)
            .checked_next_power_of_two()
            .unwrap_or(1 << (usize::BITS - 1))
            .max(MIN_SLOTS);
        Self {
            slots: vec![EMPTY; n],
            bits: n.trailing_zeros(),
            len: 0,
            max: max.min(n / 2),
        }
    }

    /// Slots in the table (the unit of [`FlowTable::retain_run`]).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Memory held by the slots.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.max
    }

    fn home(&self, k: &FlowKey) -> usize {
        (hash(k) >> (64 - self.bits)) as usize
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot holding `k`, if any.
    pub fn find(&self, k: &FlowKey) -> Option<usize> {
        let mut i = self.home(k);
        loop {
            let s = &self.slots[i];
            if !s.occupied() {
                return None;
            }
            if s.holds(k) {
                return Some(i);
            }
            i = (i + 1) & self.mask();
        }
    }

    pub fn get(&self, k: &FlowKey) -> Option<Flow> {
        self.find(k).map(|i| self.slots[i].flow())
    }

    /// Reads what the fast path needs from slot `i`: (peer, epoch, cfg_gen).
    pub fn freshness(&self, i: usize) -> (u32, u32, u16) {
        let s = &self.slots[i];
        (s.peer, s.epoch, s.cfg_gen)
    }

    /// The policy profile of the flow in slot `i`.
    pub fn profile(&self, i: usize) -> u16 {
        self.slots[i].profile
    }

    /// Marks slot `i` seen and returns its decision.
    pub fn touch(&mut self, i: usize, now_secs: u32) -> Decision {
        let s = &mut self.slots[i];
        s.last_seen = now_secs;
        s.flow().decision
    }

    /// Inserts or replaces. Returns false (and changes nothing) when the table is full.
    pub fn insert(&mut self, k: &FlowKey, f: &Flow) -> bool {
        if let Some(i) = self.find(k) {
            self.slots[i].set_flow(f);
            return true;
        }
        if self.is_full() {
            return false;
        }
        let mut i = self.home(k);
        while self.slots[i].occupied() {
            i = (i + 1) & self.mask();
        }
        let s = &mut self.slots[i];
        *s = Slot {
            src: k.src_words(),
            dst: k.dst_words(),
            sport: k.sport(),
            dport: k.dport(),
            proto: k.proto(),
            flags: OCCUPIED
                | if k.is_ipv6() { V6 } else { 0 }
                | if k.has_ports() { PORTS } else { 0 },
            ..EMPTY
        };
        s.set_flow(f);
        self.len += 1;
        true
    }

    pub fn remove(&mut self, k: &FlowKey) -> Option<Flow> {
        let i = self.find(k)?;
        let f = self.slots[i].flow();
        self.remove_at(i);
        Some(f)
    }

    /// Empties slot `i` and shifts back the entries of its cluster that would no longer be
    /// reachable from their home slot.
    fn remove_at(&mut self, i: usize) {
        let mask = self.mask();
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            if !self.slots[j].occupied() {
                break;
            }
            let home = self.home(&self.slots[j].key());
            // Move j into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
    }

    /// Removes the flows `keep` refuses among the `count` slots from `start` on; returns where
    /// the next run starts (0 after the last slot). A flow that a removal shifts back across
    /// `start` waits for the next pass.
    pub fn retain_run(
        &mut self,
        start: usize,
        count: usize,
        mut keep: impl FnMut(&Flow) -> bool,
    ) -> usize {
        let end = start.saturating_add(count).min(self.slots.len());
        let mut i = start;
        while i < end {
            if self.slots[i].occupied() && !keep(&self.slots[i].flow()) {
                // Another entry may have shifted into slot i: look at it again.
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
        if end == self.slots.len() { 0 } else { end }
    }

    pub fn clear(&mut self) {
        self.slots.fill(EMPTY);
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn a_slot_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 64);
        assert_eq!(std::mem::align_of::<Slot>(), 64);
    }

    fn key(i: u32) -> FlowKey {
        FlowKey::new(
            IpAddr::V4(Ipv4Addr::from(i)),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            17,
            (i % 7) as u16,
            5004,
        )
    }

    fn flow(i: u32) -> Flow {
        Flow {
            peer: PeerId(i % 5),
            profile: (i % 3) as u16,
            decision: match i % 4 {
                0 => Decision::Send(PathId(i)),
                1 => Decision::Duplicate {
                    primary: PathId(i),
                    secondary: PathId(i + 1),
                },
                2 => Decision::Drop(DropReason::NoPath),
                _ => Decision::Drop(DropReason::SlaUnavailable),
            },
            epoch: i * 3,
            cfg_gen: i as u16,
            last_seen: i,
        }
    }

    /// The table against std's HashMap, over a long deterministic sequence of inserts, removes
    /// and sweeps on a small key space (so clusters form, wrap and get shifted).
    #[test]
    fn the_table_behaves_like_a_map_under_inserts_removes_and_sweeps() {
        let mut t = FlowTable::new(300);
        let mut model: HashMap<FlowKey, Flow> = HashMap::new();
        let mut rng = patronus_lab::stats::SplitMix64(12345);
        for step in 0..50_000u32 {
            let x = rng.next_u64();
            let i = (x % 400) as u32;
            match x % 10 {
                0..=5 => {
                    let inserted = t.insert(&key(i), &flow(step));
                    if inserted {
                        model.insert(key(i), flow(step));
                    } else {
                        assert!(model.len() >= 300 && !model.contains_key(&key(i)));
                    }
                }
                6..=8 => assert_eq!(t.remove(&key(i)), model.remove(&key(i))),
                _ => {
                    // Sweeps in runs of a few slots at a time, pass after pass, until a pass
                    // removes nothing (a flow shifted back across a run's start waits for the
                    // next pass): then exactly the model's flows remain.
                    let cut = step.saturating_sub(2_000);
                    let run = 1 + (x >> 20) as usize % 100;
                    loop {
                        let before = t.len();
                        let mut at = t.retain_run(0, run, |f| f.last_seen >= cut);
                        while at != 0 {
                            at = t.retain_run(at, run, |f| f.last_seen >= cut);
                        }
                        if t.len() == before {
                            break;
                        }
                    }
                    model.retain(|_, f| f.last_seen >= cut);
                }
            }
            assert_eq!(t.len(), model.len());
            if step % 1000 == 0 {
                for j in 0..400 {
                    assert_eq!(
                        t.get(&key(j)),
                        model.get(&key(j)).copied(),
                        "key {j} at step {step}"
                    );
                }
            }
        }
    }

    #[test]
    fn ipv4_and_ipv6_keys_with_the_same_bits_are_different_flows() {
        let v4 = FlowKey::new(
            "0.0.0.1".parse().unwrap(),
            "0.0.0.2".parse().unwrap(),
            6,
            1,
            2,
        );
        let v6 = FlowKey::new("::1".parse().unwrap(), "::2".parse().unwrap(), 6, 1, 2);
        let mut t = FlowTable::new(10);
        assert!(t.insert(&v4, &flow(0)));
        assert_eq!(t.get(&v6), None);
        assert!(t.insert(&v6, &flow(1)));
        assert_eq!(t.get(&v4), Some(flow(0)));
        assert_eq!(t.get(&v6), Some(flow(1)));
    }
}
