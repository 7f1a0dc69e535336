//! The engine: peers, their paths, the flow table and the timers, behind the verb set of a
//! sans-IO state machine (`decide`, `handle_*`, `poll_*`).
//!
//! # Flow table
//!
//! A flow (5-tuple) is classified and routed once, on its first packet; its decision is cached
//! with its peer's *epoch*. Every packet of the flow then costs one flow-table lookup (one
//! 64-byte slot holds the key and the decision) and one integer compare (the fast path). A
//! peer's epoch changes whenever something about its paths changes
//! that could move a flow: a path goes Up or Down, starts or stops meeting a class's SLA, ends a
//! hold-down, is added or removed. The next packet of each flow of that peer then reconsiders its
//! decision under the move rule of [`crate::select`]. A policy change reclassifies every flow on
//! its next packet the same way. So a failover moves every flow on the dead path the moment
//! each sends its next packet, and costs nothing for flows of other peers.
//!
//! The table is bounded (`flow_capacity`) and made at its full size. Flows idle for
//! `flow_idle_timeout` are forgotten by a sweep that passes over the table once every quarter of
//! the timeout (at most once a second), a run of 8192 slots at a time spread over that quarter;
//! an expired flow is simply decided afresh on its next packet. When the table is full, new
//! flows are still decided and forwarded, just not cached (counted in
//! [`EngineStats::flow_table_full`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use patronus_api::{
    FailoverSettings, FieldErrors, Link, Name, Policy, Prefix, SlaClass, SteeringMode,
    validate_policies,
};

use crate::classify::Classifier;
use crate::flow_table::{Flow, FlowTable};
use crate::packet::{FlowKey, PacketMeta};
use crate::path::{Change, Ctx, Events, LinkEnd, Path, PathCounters, PeerLife};
use crate::probe::{self, NtpTime, PROBE_LEN, ProbeError, ProbeReply};
use crate::route::RouteTable;
use crate::score::{SlaBounds, score};
use crate::select::{self, Cand, Profile};
use crate::{ClassId, Decision, DropReason, Event, MoveReason, PathId, PathState, PeerId};

/// Events kept for `poll_event` before the oldest are dropped (and counted).
const MAX_QUEUED_EVENTS: usize = 65_536;
/// Flow-table slots the idle-flow sweep looks at per call (8192 x 64 bytes = 512 KiB).
const SWEEP_RUN: usize = 8192;

/// Everything the engine is configured with. The same types the controller stores.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub failover: FailoverSettings,
    pub classes: Vec<SlaClass>,
    pub policies: Vec<Policy>,
    /// The class of traffic no policy matches.
    pub default_class: Name,
    pub default_steering: SteeringMode,
    /// Most flows cached at once. Each costs about 100 bytes.
    pub flow_capacity: usize,
    /// A flow with no packet for this long is forgotten (and decided afresh if it returns).
    pub flow_idle_timeout: Duration,
    /// Resolved probes the loss estimate is computed over (2 s of an active path at the default
    /// cadence, 10 s of a standby one). Longer is steadier, shorter reacts faster.
    pub loss_window: usize,
    /// Tags this run's probes so that replies to a previous run are refused; pick it at random
    /// when the edge starts.
    pub instance: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            failover: FailoverSettings::default(),
            classes: SlaClass::builtins(),
            policies: Vec::new(),
            default_class: Name::new("business").expect("a valid name"),
            default_steering: SteeringMode::BestQuality,
            flow_capacity: 262_144,
            flow_idle_timeout: Duration::from_secs(120),
            loss_window: 100,
            instance: 0,
        }
    }
}

impl EngineConfig {
    /// Every problem, by key.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        if let Err(e) = self.failover.validate() {
            errs.extend_prefixed("failover", e);
        }
        if self.classes.is_empty() || self.classes.len() > 64 {
            errs.push(
                "classes",
                format!("need 1 to 64 classes, got {}", self.classes.len()),
            );
        }
        for (i, c) in self.classes.iter().enumerate() {
            if let Err(e) = c.validate() {
                errs.extend_prefixed(&format!("classes[{i}]"), e);
            }
            if self.classes[..i].iter().any(|o| o.name == c.name) {
                errs.push(
                    format!("classes[{i}].name"),
                    format!("another class is named {}", c.name),
                );
            }
        }
        if let Err(e) = validate_policies(&self.policies, &self.classes) {
            errs.0.extend(e.0);
        }
        if !self.classes.iter().any(|c| c.name == self.default_class) {
            errs.push(
                "default_class",
                format!("no SLA class named {:?}", self.default_class.as_str()),
            );
        }
        if !(10..=1000).contains(&self.loss_window) {
            errs.push(
                "loss_window",
                format!("must be within 10..=1000, got {}", self.loss_window),
            );
        }
        if self.flow_capacity == 0 {
            errs.push("flow_capacity", "must be at least 1");
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&self.flow_idle_timeout)
        {
            errs.push("flow_idle_timeout", "must be within 1 s ..= 24 h");
        }
        errs.into_result()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(#[from] FieldErrors),
    #[error("prefix {prefix} already belongs to peer {owner}")]
    PrefixTaken { prefix: Prefix, owner: String },
    #[error("no peer {0:?}")]
    UnknownPeer(PeerId),
    #[error("peer {peer} already has a path from local link {local} to remote link {remote}")]
    DuplicatePath {
        peer: String,
        local: Name,
        remote: Name,
    },
    #[error("a peer may have at most 65536 links and an edge at most 65536 local links")]
    TooManyLinks,
}

/// A probe to send: the payload of a UDP datagram to the peer's STAMP port, inside the tunnel
/// of `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub path: PathId,
    pub payload: [u8; PROBE_LEN],
}

/// Engine-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub reconsidered: u64,
    pub dropped_no_route: u64,
    pub dropped_no_path: u64,
    pub dropped_sla: u64,
    pub flow_table_full: u64,
    pub flows_expired: u64,
    pub events_dropped: u64,
    pub probe_requests_rejected: u64,
    pub replies_rejected: u64,
    /// Times the engine's timers ran late by more than [`crate::path::LATE`] (the host was
    /// busy or the process stopped): that lateness was excused to every path.
    pub late_wakeups: u64,
    /// The total and the largest of those latenesses.
    pub late_total: Duration,
    pub late_max: Duration,
    /// Times a path's detection time ran out while its whole peer was silent (held Up).
    pub peer_silences: u64,
    /// Times a path went Down as steering sees it (each reported or not: see
    /// [`Engine::poll_report`]).
    pub paths_down: u64,
    /// How long each path that went Down with flows on it had been silent: the outage its
    /// flows saw at this end before they moved (each moves at its next packet).
    pub failover_outages: Outages,
}

/// The upper bounds (seconds) of [`Outages`]' buckets, below a last one for the rest.
pub const OUTAGE_BOUNDS_S: [f64; 11] =
    [0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0];

/// A histogram of outages: how many fell in each bucket of [`OUTAGE_BOUNDS_S`] (not
/// cumulative; the last bucket is beyond the last bound), their count and their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outages {
    pub buckets: [u64; OUTAGE_BOUNDS_S.len() + 1],
    pub count: u64,
    pub sum: Duration,
}

impl Outages {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = OUTAGE_BOUNDS_S
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(OUTAGE_BOUNDS_S.len());
        self.buckets[i] += 1;
        self.count += 1;
        self.sum += d;
    }
}

impl EngineStats {
    /// Packets decided: every decision is a hit, a miss or a reconsideration.
    pub fn packets(&self) -> u64 {
        self.cache_hits + self.cache_misses + self.reconsidered
    }
}

/// A path as export and status see it.
#[derive(Debug, Clone, PartialEq)]
pub struct PathSnapshot {
    pub id: PathId,
    pub peer: PeerId,
    pub peer_name: String,
    pub local_link: Name,
    pub remote_link: Name,
    pub state: PathState,
    pub up_since: Option<Instant>,
    /// Smoothed RTT, and percentiles over the last [`crate::estimate::RTT_WINDOW`] samples.
    pub rtt: Option<Duration>,
    pub rtt_p50: Option<Duration>,
    pub rtt_p90: Option<Duration>,
    pub rtt_p99: Option<Duration>,
    pub jitter: Duration,
    /// Loss fraction over the window, and how many resolved probes the window holds.
    pub loss: f64,
    pub loss_samples: u32,
    pub probe_interval: Duration,
    pub flows: u32,
    pub flaps: u64,
    pub counters: PathCounters,
    pub classes: Vec<ClassHealthSnapshot>,
}

/// How a path stands for one class.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassHealthSnapshot {
    pub class: ClassId,
    pub name: Name,
    /// The score (see [`crate::score`]); `None` when the path is Down.
    pub score: Option<f64>,
    pub meets_sla: bool,
    /// Meets the SLA and is out of hold-down: may attract flows.
    pub eligible: bool,
}

#[derive(Debug)]
struct Peer {
    name: String,
    paths: Vec<PathId>,
    remote_links: Vec<Name>,
}

/// What the engine counts for each path on the packet path, kept apart from the path so that a
/// flow-cache hit touches 16 bytes of it.
#[derive(Debug, Clone, Copy, Default)]
struct TxCount {
    packets: u64,
    bytes: u64,
}

/// The path engine of one edge. See the crate documentation for how to drive it.
#[derive(Debug)]
pub struct Engine {
    settings: FailoverSettings,
    margin: f64,
    classes: Vec<SlaClass>,
    bounds: Vec<SlaBounds>,
    default_class: Name,
    default_steering: SteeringMode,
    classifier: Classifier,
    /// One per enabled policy in evaluation order, then the default.
    profiles: Vec<Profile>,
    profile_names: Vec<Option<Name>>,
    routes: RouteTable,
    peers: Vec<Peer>,
    /// Each peer's epoch (see the module documentation), apart from `peers` so the fast path
    /// reads a small dense array.
    epochs: Vec<u32>,
    /// What each peer as a whole has shown (see [`PeerLife`]).
    life: Vec<PeerLife>,
    /// The `now` of the last `handle_timeout`.
    last_timeout: Option<Instant>,
    paths: Vec<Option<Path>>,
    /// Transmit counters per path id.
    tx: Vec<TxCount>,
    /// Transmit counters per SLA class (by class id): what each class of traffic sent.
    class_tx: Vec<TxCount>,
    /// Times a path stopped meeting each class's SLA (internal transitions, each counted),
    /// by class id: off the packet path, so not in `class_tx`.
    class_breaches: Vec<u64>,
    local_links: Vec<Name>,
    flows: FlowTable,
    flow_idle: Duration,
    loss_window: usize,
    instance: u32,
    epoch: Instant,
    cfg_gen: u16,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    next_sweep: Instant,
    /// Where the next run of the idle-flow sweep starts.
    sweep_at: usize,
    transmits: VecDeque<Transmit>,
    events: VecDeque<(Instant, Event)>,
    reports: VecDeque<(Instant, Event)>,
    scratch_events: Events,
    scratch_cands: Vec<Cand>,
    scratch_due: Vec<(u32, u32)>,
    stats: EngineStats,
}

fn compile(
    policies: &[Policy],
    classes: &[SlaClass],
    default_class: &Name,
    default_steering: SteeringMode,
) -> (Classifier, Vec<Profile>, Vec<Option<Name>>) {
    let class_id = |n: &Name| ClassId(classes.iter().position(|c| &c.name == n).unwrap_or(0) as u8);
    let mut active: Vec<&Policy> = policies.iter().filter(|p| p.enabled).collect();
    active.sort_by_key(|p| p.order);
    let classifier = Classifier::new(&active.iter().map(|p| &p.matches).collect::<Vec<_>>());
    let mut profiles: Vec<Profile> = active
        .iter()
        .map(|p| Profile {
            class: class_id(&p.class),
            mode: p.steering,
            only: select::kinds(&p.links.only),
            avoid: select::kinds(&p.links.avoid),
            prefer: select::kinds(&p.links.prefer),
            metered: p.links.metered,
            strict: p.strict,
        })
        .collect();
    let mut names: Vec<Option<Name>> = active.iter().map(|p| Some(p.name.clone())).collect();
    profiles.push(Profile {
        class: class_id(default_class),
        mode: default_steering,
        only: 0,
        avoid: 0,
        prefer: 0,
        metered: patronus_api::MeteredUse::Allow,
        strict: false,
    });
    names.push(None);
    (classifier, profiles, names)
}

/// Schedules a path's next wake-up, unless an earlier one is already in the heap (an early
/// wake-up finds nothing due and reschedules).
fn reschedule(
    timers: &mut BinaryHeap<Reverse<(Instant, u32, u32)>>,
    p: &mut Path,
    settings: &FailoverSettings,
) {
    let wake = p.next_wake(settings);
    if p.scheduled.is_none_or(|s| wake < s) {
        p.timer_gen = p.timer_gen.wrapping_add(1);
        p.scheduled = Some(wake);
        timers.push(Reverse((wake, p.id.0, p.timer_gen)));
    }
}

/// Schedules a path's next wake-up at `now`, replacing whatever was scheduled.
fn wake_now(timers: &mut BinaryHeap<Reverse<(Instant, u32, u32)>>, p: &mut Path, now: Instant) {
    p.timer_gen = p.timer_gen.wrapping_add(1);
    p.scheduled = Some(now);
    timers.push(Reverse((now, p.id.0, p.timer_gen)));
}

/// Queues an event, dropping the oldest (and counting it) when the queue is full.
fn push_bounded(queue: &mut VecDeque<(Instant, Event)>, dropped: &mut u64, now: Instant, e: Event) {
    if queue.len() >= MAX_QUEUED_EVENTS {
        queue.pop_front();
        *dropped += 1;
    }
    queue.push_back((now, e));
}

/// Advances a peer's epoch: every cached decision for it is reconsidered on its next packet.
/// Returns the new epoch.
fn bump(epochs: &mut [u32], peer: PeerId) -> u32 {
    match epochs.get_mut(peer.0 as usize) {
        Some(e) => {
            *e = e.wrapping_add(1);
            *e
        }
        None => 0,
    }
}

/// Whole seconds since the engine's epoch: the flow table's clock (136 years before it wraps).
fn secs_since(epoch: Instant, now: Instant) -> u32 {
    u32::try_from(now.saturating_duration_since(epoch).as_secs()).unwrap_or(u32::MAX)
}

fn release(paths: &mut [Option<Path>], d: Decision) {
    for id in d.paths() {
        if let Some(Some(p)) = paths.get_mut(id.0 as usize) {
            p.flows = p.flows.saturating_sub(1);
        }
    }
}

impl Engine {
    pub fn new(config: EngineConfig, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let (classifier, profiles, profile_names) = compile(
            &config.policies,
            &config.classes,
            &config.default_class,
            config.default_steering,
        );
        Ok(Self {
            margin: f64::from(config.failover.min_improvement_pct) / 100.0,
            settings: config.failover,
            bounds: config.classes.iter().map(SlaBounds::from_class).collect(),
            class_tx: vec![TxCount::default(); config.classes.len()],
            class_breaches: vec![0; config.classes.len()],
            classes: config.classes,
            default_class: config.default_class,
            default_steering: config.default_steering,
            classifier,
            profiles,
            profile_names,
            routes: RouteTable::default(),
            peers: Vec::new(),
            epochs: Vec::new(),
            life: Vec::new(),
            last_timeout: None,
            paths: Vec::new(),
            tx: Vec::new(),
            local_links: Vec::new(),
            flows: FlowTable::new(config.flow_capacity),
            flow_idle: config.flow_idle_timeout,
            loss_window: config.loss_window,
            instance: config.instance,
            epoch: now,
            cfg_gen: 0,
            timers: BinaryHeap::new(),
            next_sweep: now + config.flow_idle_timeout / 4,
            sweep_at: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            reports: VecDeque::new(),
            scratch_events: Events::default(),
            scratch_cands: Vec::new(),
            scratch_due: Vec::new(),
            stats: EngineStats::default(),
        })
    }

    /// Replaces the policies. Every flow is reclassified on its next packet; a flow whose class
    /// and path stay acceptable keeps its path.
    pub fn set_policies(&mut self, policies: Vec<Policy>) -> Result<(), ConfigError> {
        validate_policies(&policies, &self.classes)?;
        let (classifier, profiles, names) = compile(
            &policies,
            &self.classes,
            &self.default_class,
            self.default_steering,
        );
        self.classifier = classifier;
        self.profiles = profiles;
        self.profile_names = names;
        self.config_changed();
        Ok(())
    }

    /// Replaces the SLA classes, the failover settings, the default class and steering, and
    /// the policies (which name the classes), in a running engine: nothing is checked half.
    /// A path keeps its measurements, sessions and hold-downs; each class that stays keeps its
    /// health and is checked against its new bounds at once (a path that now breaks it is
    /// Degraded, with an `SlaViolated` event); new probe cadences apply from the next probe.
    /// Every flow is classified and placed again on its next packet, keeping its path if that
    /// still fits.
    pub fn reconfigure(
        &mut self,
        failover: FailoverSettings,
        classes: Vec<SlaClass>,
        default_class: Name,
        default_steering: SteeringMode,
        policies: Vec<Policy>,
        now: Instant,
    ) -> Result<(), ConfigError> {
        EngineConfig {
            failover: failover.clone(),
            classes: classes.clone(),
            policies: policies.clone(),
            default_class: default_class.clone(),
            default_steering,
            flow_capacity: 1,
            flow_idle_timeout: self.flow_idle,
            loss_window: self.loss_window,
            instance: self.instance,
        }
        .validate()?;
        let map: Vec<Option<usize>> = classes
            .iter()
            .map(|c| self.classes.iter().position(|o| o.name == c.name))
            .collect();
        self.class_tx = map
            .iter()
            .map(|m| {
                m.and_then(|i| self.class_tx.get(i).copied())
                    .unwrap_or_default()
            })
            .collect();
        self.class_breaches = map
            .iter()
            .map(|m| {
                m.and_then(|i| self.class_breaches.get(i).copied())
                    .unwrap_or(0)
            })
            .collect();
        self.margin = f64::from(failover.min_improvement_pct) / 100.0;
        self.settings = failover;
        self.bounds = classes.iter().map(SlaBounds::from_class).collect();
        self.classes = classes;
        self.default_class = default_class;
        self.default_steering = default_steering;
        let (classifier, profiles, names) = compile(
            &policies,
            &self.classes,
            &self.default_class,
            self.default_steering,
        );
        self.classifier = classifier;
        self.profiles = profiles;
        self.profile_names = names;
        for p in self.paths.iter_mut().flatten() {
            let ctx = Ctx {
                settings: &self.settings,
                classes: &self.bounds,
                instance: self.instance,
                epoch: self.epoch,
                life: &self.life,
            };
            let change = p.reconfigure(&map, now, &ctx, &mut self.scratch_events);
            if change.any() {
                p.stamp(bump(&mut self.epochs, p.peer));
            }
            p.scheduled = None;
            reschedule(&mut self.timers, p, &self.settings);
        }
        self.config_changed();
        self.flush_events(now);
        Ok(())
    }

    /// Policies or routes changed: every cached flow is classified and routed again on its
    /// next packet (and keeps its path if that still fits).
    fn config_changed(&mut self) {
        self.cfg_gen = self.cfg_gen.wrapping_add(1);
        if self.cfg_gen == 0 {
            // The generation wrapped: a flow idle through 65536 changes could look current.
            self.flows.clear();
            for p in self.paths.iter_mut().flatten() {
                p.flows = 0;
            }
        }
    }

    /// Adds a peer site and the LAN prefixes behind it.
    pub fn add_peer(&mut self, name: &str, lan_prefixes: &[Prefix]) -> Result<PeerId, ConfigError> {
        let id = PeerId(self.peers.len() as u32);
        for (i, prefix) in lan_prefixes.iter().enumerate() {
            if let Err(owner) = self.routes.insert(*prefix, id) {
                // Undo this peer's earlier prefixes; the table is as it was.
                if i > 0 {
                    self.routes.remove_peer(id);
                }
                return Err(ConfigError::PrefixTaken {
                    prefix: *prefix,
                    owner: self.peers[owner.0 as usize].name.clone(),
                });
            }
        }
        self.peers.push(Peer {
            name: name.to_owned(),
            paths: Vec::new(),
            remote_links: Vec::new(),
        });
        self.epochs.push(0);
        self.life.push(PeerLife::default());
        // The new prefixes may be more specific than ones other peers own.
        self.config_changed();
        Ok(id)
    }

    /// Adds the path from one of our links to one of the peer's links. It starts Down and is
    /// probed at once.
    pub fn add_path(
        &mut self,
        peer: PeerId,
        local: &Link,
        remote: &Link,
        now: Instant,
    ) -> Result<PathId, ConfigError> {
        let p = self
            .peers
            .get_mut(peer.0 as usize)
            .ok_or(ConfigError::UnknownPeer(peer))?;
        // Interned link ids: the position of the name, or the next one. Checked for room
        // before anything is recorded, so a refused path leaves no trace.
        let slot =
            |names: &[Name], n: &Name| names.iter().position(|x| x == n).unwrap_or(names.len());
        let (remote_id, local_id) = (
            slot(&p.remote_links, &remote.name),
            slot(&self.local_links, &local.name),
        );
        let (Ok(remote_id), Ok(local_id)) = (u16::try_from(remote_id), u16::try_from(local_id))
        else {
            return Err(ConfigError::TooManyLinks);
        };
        let duplicate = p.paths.iter().any(|id| {
            self.paths[id.0 as usize]
                .as_ref()
                .is_some_and(|q| q.local.id == local_id && q.remote.id == remote_id)
        });
        if duplicate {
            return Err(ConfigError::DuplicatePath {
                peer: p.name.clone(),
                local: local.name.clone(),
                remote: remote.name.clone(),
            });
        }
        let end = |id, l: &Link| LinkEnd {
            id,
            name: l.name.clone(),
            kind: l.kind,
            metered: l.metered,
            cost_per_gb: l.cost_per_gb.unwrap_or(0.0),
            priority: l.priority,
        };
        let capacity = match (local.up_kbps, remote.down_kbps) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => 0,
        };
        if usize::from(remote_id) == p.remote_links.len() {
            p.remote_links.push(remote.name.clone());
        }
        if usize::from(local_id) == self.local_links.len() {
            self.local_links.push(local.name.clone());
        }
        let id = PathId(self.paths.len() as u32);
        let mut path = Path::new(
            id,
            peer,
            end(local_id, local),
            end(remote_id, remote),
            capacity,
            self.classes.len(),
            self.loss_window,
            &self.settings,
            now,
        );
        reschedule(&mut self.timers, &mut path, &self.settings);
        self.paths.push(Some(path));
        self.tx.push(TxCount::default());
        p.paths.push(id);
        bump(&mut self.epochs, peer);
        Ok(id)
    }

    /// Removes a path; its flows move on their next packet.
    pub fn remove_path(&mut self, id: PathId) {
        let Some(slot) = self.paths.get_mut(id.0 as usize) else {
            return;
        };
        if let Some(p) = slot.take() {
            if let Some(peer) = self.peers.get_mut(p.peer.0 as usize) {
                peer.paths.retain(|x| *x != id);
            }
            bump(&mut self.epochs, p.peer);
        }
    }

    /// Removes a peer: its paths and the prefixes routed to it. Its flows are routed again on
    /// their next packet (to nowhere, unless another peer owns their destination); other
    /// peers' flows keep their paths. The id is not used again.
    pub fn remove_peer(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get(peer.0 as usize) else {
            return;
        };
        for id in p.paths.clone() {
            self.remove_path(id);
        }
        self.routes.remove_peer(peer);
        self.config_changed();
    }

    /// Decides what to do with a packet from the LAN: the per-packet fast path.
    pub fn decide(&mut self, meta: &PacketMeta, len: usize, now: Instant) -> Decision {
        if let Some(i) = self.flows.find(&meta.key) {
            let (peer, epoch, cfg_gen) = self.flows.freshness(i);
            if cfg_gen == self.cfg_gen && self.epochs.get(peer as usize) == Some(&epoch) {
                let d = self.flows.touch(i, secs_since(self.epoch, now));
                self.stats.cache_hits += 1;
                self.count_tx(d, len);
                self.count_class(self.flows.profile(i), d, len);
                return d;
            }
        }
        self.decide_slow(meta, len, now)
    }

    /// Counts a forwarded packet for its class (once, however many paths carry it).
    fn count_class(&mut self, profile: u16, d: Decision, len: usize) {
        if matches!(d, Decision::Drop(_)) {
            return;
        }
        let class = self.profiles.get(usize::from(profile)).map(|p| p.class.0);
        if let Some(t) = class.and_then(|c| self.class_tx.get_mut(usize::from(c))) {
            t.packets += 1;
            t.bytes += len as u64;
        }
    }

    fn count_tx(&mut self, d: Decision, len: usize) {
        for id in d.paths() {
            if let Some(t) = self.tx.get_mut(id.0 as usize) {
                t.packets += 1;
                t.bytes += len as u64;
            }
        }
    }

    /// Counts a flow on the paths of its decision; a path that gets its first flow switches to
    /// the active probe cadence at once.
    fn acquire(&mut self, d: Decision, now: Instant) {
        for id in d.paths() {
            if let Some(Some(p)) = self.paths.get_mut(id.0 as usize) {
                p.flows += 1;
                if p.speed_up(now, &self.settings) {
                    reschedule(&mut self.timers, p, &self.settings);
                }
            }
        }
    }

    fn decide_slow(&mut self, meta: &PacketMeta, len: usize, now: Instant) -> Decision {
        let key = meta.key;
        let existing = self.flows.get(&key);
        match existing {
            Some(_) => self.stats.reconsidered += 1,
            None => self.stats.cache_misses += 1,
        }
        let classified = existing
            .filter(|f| f.cfg_gen == self.cfg_gen)
            .map(|f| (f.peer, f.profile));
        let (peer, profile_idx) = match classified {
            Some(x) => x,
            None => {
                let Some(peer) = self.routes.lookup(key.dst_bits(), key.is_ipv6()) else {
                    if let Some(f) = existing {
                        self.flows.remove(&key);
                        release(&mut self.paths, f.decision);
                    }
                    self.stats.dropped_no_route += 1;
                    return Decision::Drop(DropReason::NoRoute);
                };
                let default = self.profiles.len() - 1;
                (
                    peer,
                    self.classifier.classify(meta).unwrap_or(default) as u16,
                )
            }
        };
        let profile = &self.profiles[profile_idx as usize];
        let Some(peer_ref) = self.peers.get(peer.0 as usize) else {
            return Decision::Drop(DropReason::NoRoute);
        };
        let mut cands = std::mem::take(&mut self.scratch_cands);
        select::candidates(
            &peer_ref.paths,
            &self.paths,
            &self.bounds,
            profile,
            now,
            &mut cands,
        );
        let (decision, moved) = match existing {
            Some(f) if f.peer == peer => {
                let paths = &self.paths;
                let r =
                    select::reconsider(&cands, profile, f.decision, f.epoch, self.margin, |id| {
                        match paths.get(id.0 as usize) {
                            Some(Some(p)) if p.state() == PathState::Down => MoveReason::PathDown,
                            Some(Some(_)) => MoveReason::PolicyChanged,
                            _ => MoveReason::PathRemoved,
                        }
                    });
                (r.decision, r.moved)
            }
            Some(_) => (
                select::choose(&cands, profile),
                Some(MoveReason::PolicyChanged),
            ),
            None => (select::choose(&cands, profile), None),
        };
        self.scratch_cands = cands;

        if let (Some(reason), Some(f)) = (moved, existing) {
            if let (Some(from), Some(to)) = (f.decision.primary(), decision.primary()) {
                if from != to {
                    self.push_event(
                        now,
                        Event::FlowMoved {
                            flow: key,
                            from,
                            to,
                            reason,
                        },
                    );
                }
            }
        }
        match decision {
            Decision::Drop(DropReason::NoPath) => self.stats.dropped_no_path += 1,
            Decision::Drop(DropReason::SlaUnavailable) => self.stats.dropped_sla += 1,
            _ => {}
        }
        let flow = Flow {
            peer,
            profile: profile_idx,
            decision,
            epoch: self.epochs[peer.0 as usize],
            cfg_gen: self.cfg_gen,
            last_seen: secs_since(self.epoch, now),
        };
        let cached = match existing {
            Some(old) => {
                if old.decision != decision {
                    release(&mut self.paths, old.decision);
                    self.acquire(decision, now);
                }
                true
            }
            None => {
                // A full table waits for the periodic sweep: sweeping here would walk the whole
                // table on every packet of every uncached flow.
                if !self.flows.is_full() {
                    self.acquire(decision, now);
                    true
                } else {
                    // Not cached, still forwarded; its paths must still be probed as active.
                    self.stats.flow_table_full += 1;
                    for id in decision.paths() {
                        if let Some(Some(p)) = self.paths.get_mut(id.0 as usize) {
                            if p.speed_up(now, &self.settings) {
                                reschedule(&mut self.timers, p, &self.settings);
                            }
                        }
                    }
                    false
                }
            }
        };
        if cached {
            self.flows.insert(&key, &flow);
        }
        self.count_tx(decision, len);
        self.count_class(profile_idx, decision, len);
        decision
    }

    /// The peer that owns `addr`: the longest configured prefix containing it. The edge checks
    /// a decrypted packet's source against it (WireGuard's cryptokey routing): a peer may only
    /// send from addresses routed to it.
    pub fn peer_for(&self, addr: std::net::IpAddr) -> Option<PeerId> {
        match addr {
            std::net::IpAddr::V4(a) => self.routes.lookup(u128::from(u32::from(a)), false),
            std::net::IpAddr::V6(a) => self.routes.lookup(u128::from(a), true),
        }
    }

    /// A probe reply arrived on `path`. Refused replies change nothing but a counter.
    pub fn handle_probe_reply(
        &mut self,
        path: PathId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(), ProbeError> {
        self.take_reply(path, ProbeReply::decode(bytes), now)
    }

    /// An ICMP echo reply arrived on `path`, carrying `bytes`: one of our probe requests, sent
    /// as an echo request to a peer that has no STAMP reflector (a stock WireGuard host, whose
    /// IP stack echoes the data back unchanged). It is checked like any reply (path, run, sequence
    /// and T1 must be ours) and taken as one the peer stamped nothing in: T2 and T3 read as the
    /// moment it arrived, so the round trip and loss are measured as with STAMP, and the round
    /// trip's whole variation counts as the forward direction's jitter (the reverse reads 0).
    /// That is an upper bound of either direction's jitter, never an underestimate.
    pub fn handle_echo_reply(
        &mut self,
        path: PathId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(), ProbeError> {
        let t = self.ntp(now);
        let reply = probe::ProbeRequest::decode(bytes).map(|request| ProbeReply {
            request,
            t2: t,
            t3: t,
            sender_ttl: 0,
            // An IP stack echoing bytes reads nothing in them.
            reads_heard: false,
        });
        self.take_reply(path, reply, now)
    }

    /// `now` on the probes' clock (the engine's epoch), as [`Ctx`] reads it too.
    fn ntp(&self, now: Instant) -> NtpTime {
        NtpTime::from_duration(now.saturating_duration_since(self.epoch))
    }

    fn take_reply(
        &mut self,
        path: PathId,
        result: Result<ProbeReply, ProbeError>,
        now: Instant,
    ) -> Result<(), ProbeError> {
        let Some(Some(p)) = self.paths.get_mut(path.0 as usize) else {
            self.stats.replies_rejected += 1;
            return Err(result.err().unwrap_or(ProbeError::UnknownPath(path.0)));
        };
        // A reply the reflector held longer than a late loop would: its host was stalled.
        let held_ns = result.as_ref().map_or(0, |r| r.t3.nanos_since(r.t2));
        if held_ns > crate::path::LATE.as_nanos() as i64 {
            if let Some(life) = self.life.get_mut(p.peer.0 as usize) {
                life.stalled = Some(now);
            }
        }
        let ctx = Ctx {
            settings: &self.settings,
            classes: &self.bounds,
            instance: self.instance,
            epoch: self.epoch,
            life: &self.life,
        };
        let outcome =
            result.and_then(|reply| p.on_reply(&reply, now, &ctx, &mut self.scratch_events));
        match outcome {
            Ok(change) => {
                if change.any() {
                    p.stamp(bump(&mut self.epochs, p.peer));
                }
                reschedule(&mut self.timers, p, &self.settings);
                self.note_evidence(path, now);
                self.flush_events(now);
                Ok(())
            }
            Err(e) => {
                p.count_rejected_reply();
                self.stats.replies_rejected += 1;
                Err(e)
            }
        }
    }

    /// A probe request arrived on `path` at `arrived` (with the IP TTL or hop limit it arrived
    /// with, 0 if unknown): returns the reply to send back on the same path now, stamped with
    /// both moments (STAMP's T2 and T3: the sender subtracts the time it waited here, so an edge
    /// that reads its socket late does not inflate its peer's round trip). A request proves the
    /// peer-to-us direction only; what it says it heard from us may prove ours (see
    /// [`crate::path`]).
    pub fn handle_probe_request(
        &mut self,
        path: PathId,
        bytes: &[u8],
        ttl: u8,
        arrived: Instant,
        now: Instant,
    ) -> Result<[u8; PROBE_LEN], ProbeError> {
        let arrived = arrived.min(now);
        let request = match probe::ProbeRequest::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.stats.probe_requests_rejected += 1;
                return Err(e);
            }
        };
        let reply = ProbeReply {
            request,
            t2: self.ntp(arrived),
            t3: self.ntp(now),
            sender_ttl: ttl,
            reads_heard: true,
        }
        .encode();
        if let Some(Some(p)) = self.paths.get_mut(path.0 as usize) {
            p.count_reflected();
            if p.on_request(&request, arrived) {
                reschedule(&mut self.timers, p, &self.settings);
                self.note_evidence(path, now);
            }
        }
        Ok(reply)
    }

    /// Path `path` showed evidence of life: its peer's latest evidence moves on, and paths to
    /// that peer held while the whole peer seemed silent are looked at again now (the silence
    /// was theirs alone: see [`crate::path`]).
    fn note_evidence(&mut self, path: PathId, now: Instant) {
        let Some(Some(p)) = self.paths.get(path.0 as usize) else {
            return;
        };
        let (peer, Some(at)) = (p.peer, p.last_evidence()) else {
            return;
        };
        let Some(life) = self.life.get_mut(peer.0 as usize) else {
            return;
        };
        if life.evidence.is_some_and(|t| t >= at) {
            return;
        }
        life.evidence = Some(at);
        let Some(peer_paths) = self.peers.get(peer.0 as usize).map(|p| p.paths.clone()) else {
            return;
        };
        for id in peer_paths {
            if let Some(Some(q)) = self.paths.get_mut(id.0 as usize) {
                if q.is_held() {
                    wake_now(&mut self.timers, q, now);
                }
            }
        }
    }

    /// A data packet of `len` bytes arrived from the peer on `path`.
    pub fn handle_data_received(&mut self, path: PathId, len: usize, now: Instant) {
        if let Some(Some(p)) = self.paths.get_mut(path.0 as usize) {
            if p.on_data_received(len, now, &self.settings) {
                reschedule(&mut self.timers, p, &self.settings);
            }
        }
    }

    /// Runs everything due at `now`: probes, loss and Down detection, hold-down ends, flow
    /// expiry. Call it when [`Engine::poll_timeout`] is reached (calling it early is harmless).
    ///
    /// When the earliest timer due is more than [`crate::path::LATE`] in the past, the caller
    /// ran late (a busy host, a stopped process): that lateness is excused to every path before
    /// anything is declared Down, and counted ([`EngineStats::late_wakeups`]). Read what the
    /// sockets hold before calling this after a stall, so replies that came meanwhile count.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(&Reverse((at, _, _))) = self.timers.peek() {
            // Late since the timer was due, or since the previous call if it came due before
            // that (something scheduled it in the past meanwhile: a packet read late, which
            // is this call's lateness at most).
            let due = self.last_timeout.map_or(at, |t| at.max(t));
            let late = now.saturating_duration_since(due);
            if late > crate::path::LATE {
                self.stats.late_wakeups += 1;
                self.stats.late_total += late;
                self.stats.late_max = self.stats.late_max.max(late);
                for p in self.paths.iter_mut().flatten() {
                    p.excuse(late, now);
                }
            }
        }
        self.last_timeout = Some(self.last_timeout.map_or(now, |t| t.max(now)));
        let mut due = std::mem::take(&mut self.scratch_due);
        due.clear();
        while let Some(&Reverse((at, idx, tgen))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            due.push((idx, tgen));
        }
        for &(idx, tgen) in &due {
            let Some(Some(p)) = self.paths.get_mut(idx as usize) else {
                continue;
            };
            if p.timer_gen != tgen {
                continue;
            }
            p.scheduled = None;
            let ctx = Ctx {
                settings: &self.settings,
                classes: &self.bounds,
                instance: self.instance,
                epoch: self.epoch,
                life: &self.life,
            };
            let (change, probe) = p.on_timeout(now, &ctx, &mut self.scratch_events);
            if let Some(payload) = probe {
                self.transmits.push_back(Transmit {
                    path: p.id,
                    payload,
                });
            }
            if change.any() {
                p.stamp(bump(&mut self.epochs, p.peer));
            }
            reschedule(&mut self.timers, p, &self.settings);
            if change.contains(Change::PEER_SILENT) {
                self.stats.peer_silences += 1;
            }
            if change.contains(Change::PEER_SILENT) || change.contains(Change::PROBE_PEER) {
                let (peer, id) = (p.peer, p.id);
                self.probe_peer_now(peer, id, now);
            }
        }
        self.scratch_due = due;
        if now >= self.next_sweep {
            self.sweep(now);
        }
        self.flush_events(now);
    }

    fn sweep(&mut self, now: Instant) {
        let idle = u32::try_from(self.flow_idle.as_secs())
            .unwrap_or(u32::MAX)
            .max(1);
        let now_s = secs_since(self.epoch, now);
        let paths = &mut self.paths;
        let before = self.flows.len();
        // One run of the table per call, so that a full pass takes `period` and no call
        // holds up a packet for long (a run is 512 KiB of slots).
        self.sweep_at = self.flows.retain_run(self.sweep_at, SWEEP_RUN, |f| {
            let keep = now_s.saturating_sub(f.last_seen) < idle;
            if !keep {
                release(paths, f.decision);
            }
            keep
        });
        self.stats.flows_expired += (before - self.flows.len()) as u64;
        let period = (self.flow_idle / 4).max(Duration::from_secs(1));
        let runs = u32::try_from(self.flows.slots().div_ceil(SWEEP_RUN)).unwrap_or(u32::MAX);
        self.next_sweep = now + period / runs.max(1);
    }

    /// Every other live path to `peer` probes now (path `silent` stopped answering: do they
    /// still?), at most once per detection time of the active cadence per peer.
    fn probe_peer_now(&mut self, peer: PeerId, silent: PathId, now: Instant) {
        let every = self.settings.active_probe_interval() * self.settings.down_after_misses;
        match self.life.get_mut(peer.0 as usize) {
            Some(life) if life.probed.is_none_or(|t| now >= t + every) => life.probed = Some(now),
            _ => return,
        }
        let Some(peer_paths) = self.peers.get(peer.0 as usize).map(|p| p.paths.clone()) else {
            return;
        };
        for id in peer_paths.into_iter().filter(|id| *id != silent) {
            if let Some(Some(q)) = self.paths.get_mut(id.0 as usize) {
                if q.speed_up(now, &self.settings) {
                    wake_now(&mut self.timers, q, now);
                }
            }
        }
    }

    /// When the engine next needs [`Engine::handle_timeout`]. Drain `poll_transmit` and
    /// `poll_event` first.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((_, idx, tgen))) = self.timers.peek() {
            let live = matches!(self.paths.get(idx as usize), Some(Some(p)) if p.timer_gen == tgen);
            if live {
                break;
            }
            self.timers.pop();
        }
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let sweep = (!self.flows.is_empty()).then_some(self.next_sweep);
        match (timer, sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next probe to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event, with the time it happened: every change steering acted on (paths going
    /// Down and Up, SLAs broken and met, flows moved), at once.
    pub fn poll_event(&mut self) -> Option<(Instant, Event)> {
        self.events.pop_front()
    }

    /// The next reported change of a path (`PathUp`, `PathDown`, `SlaViolated`, `SlaRestored`),
    /// with the time it happened: the path's state with hysteresis, for operators, telemetry
    /// and webhooks (see [`crate::path`]).
    pub fn poll_report(&mut self) -> Option<(Instant, Event)> {
        self.reports.pop_front()
    }

    fn push_event(&mut self, now: Instant, e: Event) {
        push_bounded(&mut self.events, &mut self.stats.events_dropped, now, e);
    }

    fn flush_events(&mut self, now: Instant) {
        let mut evs = std::mem::take(&mut self.scratch_events);
        for e in evs.internal.drain(..) {
            match &e {
                Event::PathDown {
                    silent_for, flows, ..
                } => {
                    self.stats.paths_down += 1;
                    if *flows > 0 {
                        self.stats.failover_outages.observe(*silent_for);
                    }
                }
                Event::SlaViolated { class, .. } => {
                    if let Some(n) = self.class_breaches.get_mut(usize::from(class.0)) {
                        *n += 1;
                    }
                }
                _ => {}
            }
            self.push_event(now, e);
        }
        for e in evs.reported.drain(..) {
            push_bounded(&mut self.reports, &mut self.stats.events_dropped, now, e);
        }
        self.scratch_events = evs;
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Memory held by the flow table (64 bytes per slot; the table is at most half full).
    pub fn flow_table_bytes(&self) -> usize {
        self.flows.bytes()
    }

    /// The cached decision of a flow, if it is in the table.
    pub fn flow_decision(&self, key: &FlowKey) -> Option<Decision> {
        self.flows.get(key).map(|f| f.decision)
    }

    /// The class and policy name (None for the default) a cached flow was classified into.
    pub fn flow_class(&self, key: &FlowKey) -> Option<(ClassId, Option<&Name>)> {
        let f = self.flows.get(key)?;
        let i = usize::from(f.profile);
        Some((
            self.profiles.get(i)?.class,
            self.profile_names.get(i)?.as_ref(),
        ))
    }

    pub fn class_id(&self, name: &str) -> Option<ClassId> {
        self.classes
            .iter()
            .position(|c| c.name.as_str() == name)
            .map(|i| ClassId(i as u8))
    }

    /// What each SLA class's traffic sent since the engine started, and how many times a path
    /// stopped meeting the class's SLA (a class that was removed and added again starts over):
    /// (class, packets, bytes, SLA breaches).
    pub fn class_counters(&self) -> impl Iterator<Item = (&Name, u64, u64, u64)> + '_ {
        self.classes
            .iter()
            .zip(self.class_tx.iter().zip(&self.class_breaches))
            .map(|(c, (t, b))| (&c.name, t.packets, t.bytes, *b))
    }

    pub fn class_name(&self, id: ClassId) -> Option<&Name> {
        self.classes.get(usize::from(id.0)).map(|c| &c.name)
    }

    pub fn peer_paths(&self, peer: PeerId) -> &[PathId] {
        self.peers
            .get(peer.0 as usize)
            .map(|p| &p.paths[..])
            .unwrap_or(&[])
    }

    pub fn path_ids(&self) -> impl Iterator<Item = PathId> + '_ {
        self.paths.iter().flatten().map(|p| p.id)
    }

    /// The state of a path as export and status see it.
    pub fn path(&self, id: PathId, now: Instant) -> Option<PathSnapshot> {
        let p = self.paths.get(id.0 as usize)?.as_ref()?;
        let live = p.state() != PathState::Down;
        Some(PathSnapshot {
            id,
            peer: p.peer,
            peer_name: self
                .peers
                .get(p.peer.0 as usize)
                .map(|x| x.name.clone())
                .unwrap_or_default(),
            local_link: p.local.name.clone(),
            remote_link: p.remote.name.clone(),
            state: p.state(),
            up_since: p.up_since,
            rtt: if live { p.srtt() } else { None },
            rtt_p50: p.rtt_percentile(0.5),
            rtt_p90: p.rtt_percentile(0.9),
            rtt_p99: p.rtt_percentile(0.99),
            jitter: p.metrics.jitter,
            loss: p.metrics.loss,
            loss_samples: p.loss_samples(),
            probe_interval: p.interval(),
            flows: p.flows,
            flaps: p.flaps,
            counters: {
                let t = self.tx.get(id.0 as usize).copied().unwrap_or_default();
                p.counters(t.packets, t.bytes)
            },
            classes: self
                .classes
                .iter()
                .zip(&self.bounds)
                .enumerate()
                .map(|(i, (c, b))| {
                    let class = ClassId(i as u8);
                    ClassHealthSnapshot {
                        class,
                        name: c.name.clone(),
                        score: live.then(|| score(&p.metrics, b)),
                        meets_sla: live && p.classes[i].compliant,
                        eligible: p.tier(class, now) == Some(select::Tier::Eligible),
                    }
                })
                .collect(),
        })
    }

    /// The hold-down a path that became healthy now would serve (flap damping included).
    pub fn hold_down(&self, id: PathId, now: Instant) -> Option<Duration> {
        let p = self.paths.get(id.0 as usize)?.as_ref()?;
        Some(p.hold_down(now, &self.settings))
    }
}
