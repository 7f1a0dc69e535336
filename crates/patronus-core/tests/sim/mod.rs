//! A deterministic simulated network for driving several engines: a virtual clock, sites with
//! WAN links, and per-link impairments (delay, jitter, random loss, blackhole) as test knobs.
//!
//! Every packet an engine asks to send crosses the egress of the local link and the ingress of
//! the remote link; each applies its own impairment. Time jumps from event to event (packet
//! arrivals, engine deadlines, stream sends), so a test of a minute runs in milliseconds and
//! always the same way for the same seed. Only the network is simulated: the engines under test
//! are the real ones, exchanging real probe bytes.
#![allow(dead_code)] // each test binary uses part of the harness
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use patronus_api::{Link, LinkKind, Name, Prefix};
use patronus_core::packet::ipv4_header;
use patronus_core::{Decision, Engine, EngineConfig, Event, PacketMeta, PathId, PeerId};

pub const MS: Duration = Duration::from_millis(1);

/// What a link does to the packets crossing it in one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impair {
    /// This link's share of the one-way delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within ±jitter (packets may reorder).
    pub jitter: Duration,
    /// Probability that a packet is dropped.
    pub loss: f64,
    /// Drop everything.
    pub blackhole: bool,
}

/// The lab's seeded PRNG (SplitMix64): one generator for every test and benchmark.
pub use patronus_lab::stats::SplitMix64 as Rng;

pub struct SiteSpec {
    pub name: &'static str,
    pub lan: &'static str,
    pub links: Vec<Link>,
}

pub fn link(name: &str, kind: LinkKind) -> Link {
    Link::new(Name::new(name).unwrap(), kind)
}

struct Site {
    name: &'static str,
    lan: Prefix,
    links: Vec<Link>,
    engine: Engine,
    peers: HashMap<usize, PeerId>,
    /// path → (peer site, local link index, remote link index)
    paths: HashMap<PathId, (usize, usize, usize)>,
    by_links: HashMap<(usize, usize, usize), PathId>,
    /// The site's process is stopped until then: what arrives waits in its socket, nothing
    /// runs (see [`Net::stall`]).
    stalled_until: Option<Instant>,
    /// Packets that arrived while stalled, with their arrival time (the kernel's timestamp).
    backlog: Vec<InFlight>,
}

#[derive(Debug, Clone)]
enum Payload {
    Probe(Vec<u8>),
    Reply(Vec<u8>),
    Data { stream: usize, seq: u64, len: usize },
}

#[derive(Debug, Clone)]
struct InFlight {
    at: Instant,
    order: u64,
    from: usize,
    from_link: usize,
    to: usize,
    to_link: usize,
    payload: Payload,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

/// A constant-rate stream of packets of one flow between LAN hosts of two sites.
pub struct Stream {
    pub from: usize,
    pub to: usize,
    pub meta: PacketMeta,
    pub interval: Duration,
    pub len: usize,
    next_at: Instant,
    pub stop_at: Option<Instant>,
    seq: u64,
    /// (sent at, decision) per sequence number.
    pub sent: Vec<(Instant, Decision)>,
    /// First arrival per sequence number.
    pub arrived: Vec<Option<Instant>>,
    pub duplicates: u64,
}

/// What a stream saw, RFC 6412-style: loss-derived outage is lost packets × send interval.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamReport {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub outage: Duration,
}

pub struct Net {
    pub start: Instant,
    pub now: Instant,
    sites: Vec<Site>,
    impair: HashMap<(usize, usize), [Impair; 2]>,
    queue: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    rng: Rng,
    pub streams: Vec<Stream>,
    /// Every event of every engine: (time, site, event).
    pub log: Vec<(Instant, usize, Event)>,
    /// Every reported change of every engine (`poll_report`): (time, site, event).
    pub reports: Vec<(Instant, usize, Event)>,
    /// Every probe reply the engines accepted: (time, site, path).
    pub replies: Vec<(Instant, usize, PathId)>,
    pub rejected_replies: u64,
}

const EGRESS: usize = 0;
const INGRESS: usize = 1;

impl Net {
    /// Sites in a full mesh: every site has a path from each of its links to each link of
    /// every other site. Every link starts with `delay` in each direction, no loss.
    pub fn new(config: &EngineConfig, sites: Vec<SiteSpec>, delay: Duration, seed: u64) -> Self {
        let start = Instant::now();
        let mut built: Vec<Site> = sites
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let mut cfg = config.clone();
                cfg.instance = 1000 + i as u32;
                Site {
                    name: s.name,
                    lan: s.lan.parse().unwrap(),
                    links: s.links,
                    engine: Engine::new(cfg, start).unwrap(),
                    peers: HashMap::new(),
                    paths: HashMap::new(),
                    by_links: HashMap::new(),
                    stalled_until: None,
                    backlog: Vec::new(),
                }
            })
            .collect();
        let n = built.len();
        let mut impair = HashMap::new();
        for a in 0..n {
            for l in 0..built[a].links.len() {
                let i = Impair {
                    delay,
                    ..Impair::default()
                };
                impair.insert((a, l), [i, i]);
            }
            for b in 0..n {
                if a == b {
                    continue;
                }
                let (name, lan, remote_links) =
                    (built[b].name, built[b].lan, built[b].links.clone());
                let site = &mut built[a];
                let peer = site.engine.add_peer(name, &[lan]).unwrap();
                site.peers.insert(b, peer);
                for (li, local) in site.links.clone().iter().enumerate() {
                    for (ri, remote) in remote_links.iter().enumerate() {
                        let id = site.engine.add_path(peer, local, remote, start).unwrap();
                        site.paths.insert(id, (b, li, ri));
                        site.by_links.insert((b, li, ri), id);
                    }
                }
            }
        }
        Net {
            start,
            now: start,
            sites: built,
            impair,
            queue: BinaryHeap::new(),
            order: 0,
            rng: Rng(seed),
            streams: Vec::new(),
            log: Vec::new(),
            reports: Vec::new(),
            replies: Vec::new(),
            rejected_replies: 0,
        }
    }

    pub fn site(&self, name: &str) -> usize {
        self.sites.iter().position(|s| s.name == name).unwrap()
    }

    fn link_index(&self, site: usize, link: &str) -> usize {
        self.sites[site]
            .links
            .iter()
            .position(|l| l.name.as_str() == link)
            .unwrap()
    }

    pub fn engine(&self, site: &str) -> &Engine {
        &self.sites[self.site(site)].engine
    }

    pub fn engine_mut(&mut self, site: &str) -> &mut Engine {
        let i = self.site(site);
        &mut self.sites[i].engine
    }

    /// The path of `site` from its link `local` to `peer`'s link `remote`.
    pub fn path(&self, site: &str, local: &str, peer: &str, remote: &str) -> PathId {
        let (s, p) = (self.site(site), self.site(peer));
        let (l, r) = (self.link_index(s, local), self.link_index(p, remote));
        self.sites[s].by_links[&(p, l, r)]
    }

    /// "local>remote" names of a path of a site.
    pub fn path_name(&self, site: &str, path: PathId) -> String {
        let s = self.site(site);
        let (p, l, r) = self.sites[s].paths[&path];
        format!(
            "{}>{}",
            self.sites[s].links[l].name, self.sites[p].links[r].name
        )
    }

    /// Changes a link's impairment in both directions.
    pub fn impair(&mut self, site: &str, link: &str, f: impl Fn(&mut Impair)) {
        let s = self.site(site);
        let l = self.link_index(s, link);
        let both = self.impair.get_mut(&(s, l)).unwrap();
        f(&mut both[EGRESS]);
        f(&mut both[INGRESS]);
    }

    /// Changes a link's impairment for packets leaving the site only.
    pub fn impair_egress(&mut self, site: &str, link: &str, f: impl Fn(&mut Impair)) {
        let s = self.site(site);
        let l = self.link_index(s, link);
        f(&mut self.impair.get_mut(&(s, l)).unwrap()[EGRESS]);
    }

    pub fn cut(&mut self, site: &str, link: &str) {
        self.impair(site, link, |i| i.blackhole = true);
    }

    pub fn restore(&mut self, site: &str, link: &str) {
        self.impair(site, link, |i| i.blackhole = false);
    }

    /// Starts a stream of `pps` packets per second from a host of `from` to a host of `to`.
    pub fn stream(
        &mut self,
        from: &str,
        to: &str,
        proto: u8,
        dport: u16,
        dscp: u8,
        pps: u32,
    ) -> usize {
        let (f, t) = (self.site(from), self.site(to));
        let host = |p: Prefix, n: u8| match p.addr() {
            std::net::IpAddr::V4(a) => {
                let o = a.octets();
                [o[0], o[1], o[2], n]
            }
            std::net::IpAddr::V6(_) => panic!("the harness builds IPv4 streams only"),
        };
        let src = host(self.sites[f].lan, 10);
        let dst = host(self.sites[t].lan, 20);
        let sport = 40_000 + self.streams.len() as u16;
        let meta = PacketMeta::parse(&ipv4_header(src, dst, proto, sport, dport, dscp)).unwrap();
        self.streams.push(Stream {
            from: f,
            to: t,
            meta,
            interval: Duration::from_secs(1) / pps,
            len: 200,
            next_at: self.now,
            stop_at: None,
            seq: 0,
            sent: Vec::new(),
            arrived: Vec::new(),
            duplicates: 0,
        });
        self.streams.len() - 1
    }

    fn send(&mut self, from: usize, path: PathId, payload: Payload) {
        let Some(&(to, from_link, to_link)) = self.sites[from].paths.get(&path) else {
            return;
        };
        let e = self.impair[&(from, from_link)][EGRESS];
        let i = self.impair[&(to, to_link)][INGRESS];
        let mut delay = Duration::ZERO;
        for imp in [e, i] {
            if imp.blackhole || (imp.loss > 0.0 && self.rng.next_f64() < imp.loss) {
                return;
            }
            let j = imp.jitter.as_secs_f64() * (2.0 * self.rng.next_f64() - 1.0);
            delay += Duration::from_secs_f64((imp.delay.as_secs_f64() + j).max(0.0));
        }
        self.order += 1;
        self.queue.push(Reverse(InFlight {
            at: self.now + delay,
            order: self.order,
            from,
            from_link,
            to,
            to_link,
            payload,
        }));
    }

    /// Stops `site`'s process for `d` from now, as SIGSTOP would: its engine is not called,
    /// its streams do not send, and what arrives for it waits in its socket until the stall
    /// ends; then it reads the backlog (with each packet's arrival time, as the kernel stamps
    /// it) before running its timers.
    pub fn stall(&mut self, site: &str, d: Duration) {
        let s = self.site(site);
        self.sites[s].stalled_until = Some(self.now + d);
    }

    fn stalled(&self, site: usize) -> bool {
        self.sites[site].stalled_until.is_some_and(|t| t > self.now)
    }

    fn deliver(&mut self, p: InFlight) {
        if self.stalled(p.to) {
            self.sites[p.to].backlog.push(p);
            return;
        }
        let to = p.to;
        // The receiver's path is the same link pair seen from its side.
        let Some(&path) = self.sites[to]
            .by_links
            .get(&(p.from, p.to_link, p.from_link))
        else {
            return;
        };
        let (now, arrived) = (self.now, p.at);
        match p.payload {
            Payload::Probe(bytes) => {
                if let Ok(reply) = self.sites[to]
                    .engine
                    .handle_probe_request(path, &bytes, 64, arrived, now)
                {
                    self.send(to, path, Payload::Reply(reply.to_vec()));
                }
            }
            Payload::Reply(bytes) => {
                match self.sites[to]
                    .engine
                    .handle_probe_reply(path, &bytes, arrived)
                {
                    Ok(()) => self.replies.push((arrived, to, path)),
                    Err(_) => self.rejected_replies += 1,
                }
            }
            Payload::Data { stream, seq, len } => {
                self.sites[to]
                    .engine
                    .handle_data_received(path, len, arrived);
                let st = &mut self.streams[stream];
                let slot = &mut st.arrived[seq as usize];
                if slot.is_some() {
                    st.duplicates += 1;
                } else {
                    *slot = Some(arrived);
                }
            }
        }
    }

    fn drain(&mut self, site: usize) {
        while let Some(t) = self.sites[site].engine.poll_transmit() {
            self.send(site, t.path, Payload::Probe(t.payload.to_vec()));
        }
        self.drain_events(site);
    }

    /// Advances virtual time to `self.now + d`, running everything due on the way.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let mut next = end;
            if let Some(Reverse(p)) = self.queue.peek() {
                next = next.min(p.at);
            }
            for s in &mut self.sites {
                match s.stalled_until {
                    Some(t) if t > self.now => next = next.min(t),
                    _ => {
                        if let Some(t) = s.engine.poll_timeout() {
                            next = next.min(t);
                        }
                    }
                }
            }
            for st in &self.streams {
                if st.stop_at.is_none_or(|s| st.next_at < s) && !self.stalled(st.from) {
                    next = next.min(st.next_at);
                }
            }
            self.now = self.now.max(next);
            let now = self.now;
            while self.queue.peek().is_some_and(|Reverse(p)| p.at <= now) {
                let Reverse(p) = self.queue.pop().unwrap();
                self.deliver(p);
            }
            for s in 0..self.sites.len() {
                if self.stalled(s) {
                    continue;
                }
                if self.sites[s].stalled_until.take().is_some() {
                    for p in std::mem::take(&mut self.sites[s].backlog) {
                        self.deliver(p);
                    }
                }
                if self.sites[s]
                    .engine
                    .poll_timeout()
                    .is_some_and(|t| t <= now)
                {
                    self.sites[s].engine.handle_timeout(now);
                }
                self.drain(s);
            }
            for i in 0..self.streams.len() {
                let st = &self.streams[i];
                if st.next_at > now
                    || st.stop_at.is_some_and(|s| st.next_at >= s)
                    || self.stalled(st.from)
                {
                    continue;
                }
                let (from, meta, len, seq) = (st.from, st.meta, st.len, st.seq);
                let d = self.sites[from].engine.decide(&meta, len, now);
                let st = &mut self.streams[i];
                st.sent.push((now, d));
                st.arrived.push(None);
                st.seq += 1;
                st.next_at += st.interval;
                for path in d.paths() {
                    self.send(
                        from,
                        path,
                        Payload::Data {
                            stream: i,
                            seq,
                            len,
                        },
                    );
                }
                self.drain(from);
            }
            if now >= end {
                break;
            }
        }
    }

    /// The site a path of `site` leads to.
    pub fn peer_site_of(&self, site: &str, path: PathId) -> Option<&'static str> {
        let s = self.site(site);
        self.sites[s]
            .paths
            .get(&path)
            .map(|(p, _, _)| self.sites[*p].name)
    }

    pub fn site_name(&self, i: usize) -> &'static str {
        self.sites[i].name
    }

    /// Decides one more packet of a stream now, outside its schedule (nothing is sent).
    pub fn decide_now(&mut self, stream: usize) -> Decision {
        let (from, meta, len) = {
            let st = &self.streams[stream];
            (st.from, st.meta, st.len)
        };
        let now = self.now;
        let d = self.sites[from].engine.decide(&meta, len, now);
        self.drain_events(from);
        d
    }

    fn drain_events(&mut self, site: usize) {
        while let Some((at, e)) = self.sites[site].engine.poll_event() {
            self.log.push((at, site, e));
        }
        while let Some((at, e)) = self.sites[site].engine.poll_report() {
            self.reports.push((at, site, e));
        }
    }

    /// Reported changes of one site, with their time since the start of the run.
    pub fn reported(&self, site: &str) -> Vec<(Duration, Event)> {
        let s = self.site(site);
        self.reports
            .iter()
            .filter(|(_, i, _)| *i == s)
            .map(|(t, _, e)| (*t - self.start, e.clone()))
            .collect()
    }

    /// Events of one site, with their time since the start of the run.
    pub fn events(&self, site: &str) -> Vec<(Duration, Event)> {
        let s = self.site(site);
        self.log
            .iter()
            .filter(|(_, i, _)| *i == s)
            .map(|(t, _, e)| (*t - self.start, e.clone()))
            .collect()
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The loss report of a stream over the packets sent in [from, to) (since the start), counting
    /// only packets old enough to have arrived.
    pub fn report(&self, stream: usize, from: Duration, to: Duration) -> StreamReport {
        let st = &self.streams[stream];
        let mut r = StreamReport {
            sent: 0,
            received: 0,
            lost: 0,
            duplicates: st.duplicates,
            outage: Duration::ZERO,
        };
        for (i, (at, _)) in st.sent.iter().enumerate() {
            let t = *at - self.start;
            if t < from || t >= to {
                continue;
            }
            r.sent += 1;
            if st.arrived[i].is_some() {
                r.received += 1;
            } else {
                r.lost += 1;
            }
        }
        r.outage = st.interval * r.lost as u32;
        r
    }

    /// The primary path a stream's packets took at each send, deduplicated into runs:
    /// (first send time since start, path).
    pub fn path_runs(&self, stream: usize) -> Vec<(Duration, Option<PathId>)> {
        let mut runs: Vec<(Duration, Option<PathId>)> = Vec::new();
        for (at, d) in &self.streams[stream].sent {
            let p = d.primary();
            if runs.last().is_none_or(|(_, last)| *last != p) {
                runs.push((*at - self.start, p));
            }
        }
        runs
    }
}
