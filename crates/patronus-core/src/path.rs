//! One path (local link × remote link to one peer): its probes, estimators, state and health.
//!
//! # Model
//!
//! A path is `Down` until a reply to one of its probes arrives: only a reply proves that both
//! directions work, so **a path is never Up without a reply**. A live path is `Up` when it meets
//! every class's SLA and `Degraded` when it breaks at least one (see [`crate::score`]).
//!
//! **Liveness** is BFD-like, and each piece of evidence must prove *both* directions: a valid
//! probe reply, or a probe request from the peer saying it heard from us recently (the request's
//! `heard` field, see [`crate::probe`]): then what we sent (data, probes, replies) reached it,
//! and its request reached us. Data or requests merely arriving prove only the peer-to-us
//! direction, so they are not evidence: an edge whose sending direction died while the peer's
//! traffic still arrives detects it as fast as a hard cut. The evidence a `heard` field gives
//! is dated at the moment our packet reached the peer, less half a round trip for its request's
//! way back. A path is declared Down when no evidence arrived for
//!
//! ```text
//! detection time = down_after_misses × probe interval + 4 × RTTVAR (+ the edge's lateness)
//! ```
//!
//! counted from the last evidence, or from one smoothed RTT after the probe interval last
//! changed, whichever is later. The RTTVAR term keeps a jittery path from being declared Down by
//! its own jitter; on a steady path it is close to zero. A sudden delay increase larger than the
//! detection time looks like an outage and is treated as one.
//!
//! **The edge's own lateness is not held against a path**: when the engine runs its timers late
//! (the host was busy, the process was stopped) by more than [`LATE`], every path's detection
//! time is extended by that lateness until the path next shows evidence (see
//! [`crate::Engine::handle_timeout`]). A real cut during the stall is detected one detection
//! time after it ends.
//!
//! **A silence the whole peer shares is the peer's, not the path's**: when a path's detection
//! time runs out and no other path to the same peer has shown evidence since the reply to this
//! path's first unanswered probe was due,
//! the peer (its host stalled, its site offline) or this edge is the silent party, and moving
//! flows to another path to that peer would gain nothing. The path is then held Up and every
//! path to the peer is probed at once. When another path to the peer answers, the held path
//! goes Down at once, unless the answer shows that the peer held it (its host stalled: STAMP's
//! T3 - T2): then the held path gets one detection time from then to answer too (what a
//! stalled peer held comes back on each path after that path's delay). After
//! [`PEER_SILENCE_GRACE`] past its deadline it goes Down anyway. Verdicts on its probes wait
//! likewise, and a reply the peer held while stalled (its STAMP T2 and T3 say so) is not counted
//! lost. A path whose reply is overdue has the peer's other paths probed at once (at most once per
//! detection time of the active cadence), so that by its deadline they have shown whether the
//! peer still answers: a real cut still ends at the detection time.
//!
//! **Cadence**: a path that carries traffic (flows are assigned to it, or data arrived on it
//! in the last second) is probed every `active_probe_interval`; an idle or Down path every
//! `standby_probe_interval`. **A Down path keeps being probed**, so it can come back. When a path
//! becomes active, a probe goes out at once.
//!
//! **Health per class**: each class tracks whether the path meets it. A path that failed a class
//! (broke its SLA, or went Down) must meet it continuously for the hold-down before it is
//! *eligible* again, that is before it attracts flows that are elsewhere; until then it is used
//! only when nothing eligible meets the class.
//!
//! **Flap damping**: each failure episode (going Down, or breaking some class's SLA) adds 1 to a
//! penalty that halves every `flap_half_life`; the hold-down is multiplied by
//! `2^(penalty - 1)` (at least 1, at most `max_hold_down`). A path that fails once waits the
//! plain hold-down; one that keeps failing waits longer each time.
//!
//! **Reported state** (the events an operator, the controller and its webhooks see) changes
//! with hysteresis, while steering reacts to every change at once. A path is reported Down the
//! first time it goes Down, and reported Up again only once it has stayed up for its (damped)
//! hold-down, the moment it is trusted with flows again; its first Up is reported at once. A
//! class is reported broken the first time the path breaks it, and met again only once the path
//! is eligible for it (met continuously for the damped hold-down). So a path that flaps or keeps
//! breaking an SLA is reported once per episode, and its episodes grow further apart with each
//! failure (the damping): a link at 30 % loss for a minute reports a handful of changes, not
//! hundreds. The internal transitions remain in [`crate::Engine::poll_event`], for steering logs
//! and tests.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use patronus_api::{FailoverSettings, LinkKind};

use crate::estimate::{Jitter, LossWindow, RttEstimator};
use crate::probe::{NtpTime, PROBE_LEN, ProbeError, ProbeReply, ProbeRequest};
use crate::score::{Metrics, SlaBounds};
use crate::select::Tier;
use crate::{ClassId, Event, PathId, PathState, PeerId};

/// How long after data last arrived on a path it still counts as active.
pub const ACTIVE_GRACE: Duration = Duration::from_secs(1);
/// How long a probe's record is kept after it was sent, to recognise late replies.
const LATE_REPLY_WINDOW: Duration = Duration::from_secs(3);
/// Bounds of the waiting time after which an unanswered probe counts as lost (RFC 7680's Tmax).
const MIN_WAIT: Duration = Duration::from_millis(100);
const MAX_WAIT: Duration = Duration::from_secs(2);
/// Waiting time before the path has an RTT estimate.
const INITIAL_WAIT: Duration = Duration::from_secs(1);
/// The most probe records kept; beyond this the oldest are resolved (as lost if unanswered).
const MAX_PENDING: usize = 1024;
/// Lateness of the engine's timers below this is ordinary scheduling noise: not excused, not
/// counted.
pub const LATE: Duration = Duration::from_millis(10);
/// How long past its deadline a path whose silence the whole peer shares is held Up (see the
/// module docs). Longer than any stall a busy host causes; short against an outage's length.
pub const PEER_SILENCE_GRACE: Duration = Duration::from_secs(1);

/// How long a probe was waited for before it counted as lost, in nanoseconds.
fn waited_ns(p: &Pending) -> i64 {
    i64::try_from(p.deadline.saturating_duration_since(p.sent).as_nanos()).unwrap_or(i64::MAX)
}

/// What a path's changes produce: the transitions steering acts on at once, and the reported
/// ones (with hysteresis: see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Events {
    pub internal: Vec<Event>,
    pub reported: Vec<Event>,
}

/// What changed in a path, so the engine knows whether flows must reconsider it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Change(u8);

impl Change {
    pub const NONE: Change = Change(0);
    pub const STATE: Change = Change(1);
    pub const COMPLIANCE: Change = Change(2);
    pub const ELIGIBILITY: Change = Change(4);
    /// The path's silence is shared by its whole peer: every path to the peer should probe now.
    pub const PEER_SILENT: Change = Change(8);
    /// A reply on the path is overdue: every path to the peer should probe now.
    pub const PROBE_PEER: Change = Change(16);

    /// Whether flows must reconsider the path.
    pub fn any(self) -> bool {
        self.0 & !(Self::PEER_SILENT.0 | Self::PROBE_PEER.0) != 0
    }

    pub fn contains(self, other: Change) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Change {
    type Output = Change;
    fn bitor(self, rhs: Change) -> Change {
        Change(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Change {
    fn bitor_assign(&mut self, rhs: Change) {
        self.0 |= rhs.0;
    }
}

/// What the engine lends a path to act: settings, SLA classes and the probe clock.
pub(crate) struct Ctx<'a> {
    pub settings: &'a FailoverSettings,
    pub classes: &'a [SlaBounds],
    pub instance: u32,
    pub epoch: Instant,
    /// What each peer as a whole has shown, by peer id.
    pub life: &'a [PeerLife],
}

/// What the engine knows of a peer as a whole, to tell a path's silence from its peer's (see
/// the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PeerLife {
    /// The latest evidence of life on any of its paths.
    pub evidence: Option<Instant>,
    /// When a reply last showed that the peer held it for more than [`LATE`] (STAMP's T3 - T2):
    /// its host was stalled.
    pub stalled: Option<Instant>,
    /// When all its paths were last probed at once (a path's reply was overdue).
    pub probed: Option<Instant>,
}

impl Ctx<'_> {
    /// What `peer` as a whole has shown.
    fn peer(&self, peer: PeerId) -> PeerLife {
        self.life.get(peer.0 as usize).copied().unwrap_or_default()
    }

    fn ntp(&self, now: Instant) -> NtpTime {
        NtpTime::from_duration(now.saturating_duration_since(self.epoch))
    }
}

/// One end of a path: a WAN link and what steering needs to know about it.
#[derive(Debug, Clone)]
pub(crate) struct LinkEnd {
    /// Interned link id: unique per local link on this edge, per remote link within a peer.
    pub id: u16,
    pub name: patronus_api::Name,
    pub kind: LinkKind,
    pub metered: bool,
    pub cost_per_gb: f64,
    pub priority: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Waiting,
    Received,
    Lost,
    /// Lost (no reply within the waiting time), then answered late: still lost for the loss
    /// estimate, and a second late reply is a duplicate.
    LateReceived,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u32,
    sent: Instant,
    t1: NtpTime,
    deadline: Instant,
    outcome: Outcome,
    /// Its record in the loss window, once recorded.
    recorded: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ClassHealth {
    pub compliant: bool,
    /// The path failed this class and has not yet been compliant for a full hold-down.
    pub failed: bool,
    /// When the hold-down ends (set while compliant and `failed`).
    pub eligible_at: Option<Instant>,
    /// When the path last broke this class's SLA.
    pub violated_at: Option<Instant>,
    /// The peer epoch at which the path last became eligible for this class (met it, out of
    /// hold-down); see [`Path::stamp`].
    pub eligible_epoch: Option<u32>,
    /// Became eligible, not yet stamped with the epoch of that change.
    unstamped: bool,
    /// The class is reported broken (an `SlaViolated` was reported, no `SlaRestored` since).
    reported_broken: bool,
}

/// Traffic and probe counters of a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounters {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub probes_sent: u64,
    pub probes_received: u64,
    pub probes_lost: u64,
    pub probes_late: u64,
    pub replies_rejected: u64,
    /// Probe requests from the peer answered on this path.
    pub probes_reflected: u64,
}

#[derive(Debug)]
pub(crate) struct Path {
    pub id: PathId,
    pub peer: PeerId,
    pub local: LinkEnd,
    pub remote: LinkEnd,
    /// Capacity in kbit/s in the sending direction (local up, remote down), 0 if unknown.
    pub capacity_kbps: u64,
    state: PathState,
    interval: Duration,
    /// When data last arrived on the path.
    last_rx: Option<Instant>,
    /// When anything (data, a probe, a reply) last arrived from the peer on the path.
    last_heard: Option<Instant>,
    /// The peer reads the `heard` field of our requests (a packet of it said so).
    peer_reads_heard: bool,
    /// Lateness of this edge excused since the last evidence (see [`LATE`]), and when it was
    /// last excused.
    excused: Duration,
    excused_at: Option<Instant>,
    /// The detection time ran out while the whole peer was silent: held Up (see the module docs).
    held: bool,
    /// A reply was overdue and the peer's other paths were asked (see `suspect_at`).
    suspect: bool,
    /// When the peer, silent as a whole while this path was held, spoke again on another path:
    /// this path's detection time counts from then.
    peer_resumed: Option<Instant>,
    /// The verdict on the oldest unresolved probe waits until then: the whole peer is silent
    /// (see `record_outcomes`).
    deferred: Option<Instant>,
    /// After such a silence: probes sent before the first moment are judged no earlier than
    /// the second, a waiting time after the peer spoke again.
    reprieve: Option<(Instant, Instant)>,
    /// The path is reported live (reported Up since its last reported Down).
    reported_live: bool,
    /// Anything was reported about the path's liveness yet.
    ever_reported: bool,
    /// When the path, up since, is reported Up (its damped hold-down then ends).
    report_up_at: Option<Instant>,
    pub up_since: Option<Instant>,
    pub down_since: Option<Instant>,
    last_evidence: Option<Instant>,
    cadence_changed: Instant,
    next_probe_at: Instant,
    next_seq: u32,
    pending: VecDeque<Pending>,
    /// Records before this index are resolved.
    cursor: usize,
    rtt: RttEstimator,
    fwd: Jitter,
    rev: Jitter,
    loss: LossWindow,
    pub metrics: Metrics,
    pub classes: Vec<ClassHealth>,
    penalty: f64,
    penalty_at: Instant,
    pub flaps: u64,
    pub flows: u32,
    /// Every counter but the transmit ones, which the engine keeps (see `Engine::decide`).
    counters: PathCounters,
    /// Timer bookkeeping for the engine's heap.
    pub timer_gen: u32,
    pub scheduled: Option<Instant>,
}

impl Path {
    #[allow(clippy::too_many_arguments)] // a constructor of a record with this many parts
    pub fn new(
        id: PathId,
        peer: PeerId,
        local: LinkEnd,
        remote: LinkEnd,
        capacity_kbps: u64,
        classes: usize,
        loss_window: usize,
        settings: &FailoverSettings,
        now: Instant,
    ) -> Self {
        Self {
            id,
            peer,
            local,
            remote,
            capacity_kbps,
            state: PathState::Down,
            interval: settings.standby_probe_interval(),
            last_rx: None,
            last_heard: None,
            peer_reads_heard: false,
            excused: Duration::ZERO,
            excused_at: None,
            held: false,
            suspect: false,
            peer_resumed: None,
            deferred: None,
            reprieve: None,
            reported_live: false,
            ever_reported: false,
            report_up_at: None,
            up_since: None,
            down_since: None,
            last_evidence: None,
            cadence_changed: now,
            next_probe_at: now,
            next_seq: 0,
            pending: VecDeque::new(),
            cursor: 0,
            rtt: RttEstimator::default(),
            fwd: Jitter::default(),
            rev: Jitter::default(),
            loss: LossWindow::new(loss_window),
            metrics: Metrics::default(),
            classes: vec![ClassHealth::default(); classes],
            penalty: 0.0,
            penalty_at: now,
            flaps: 0,
            flows: 0,
            counters: PathCounters::default(),
            timer_gen: 0,
            scheduled: None,
        }
    }

    pub fn state(&self) -> PathState {
        self.state
    }

    /// The current probe interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The path's counters; the transmit ones are the engine's (`tx_packets`, `tx_bytes`).
    pub fn counters(&self, tx_packets: u64, tx_bytes: u64) -> PathCounters {
        PathCounters {
            tx_packets,
            tx_bytes,
            ..self.counters
        }
    }

    pub fn count_rejected_reply(&mut self) {
        self.counters.replies_rejected += 1;
    }

    pub fn count_reflected(&mut self) {
        self.counters.probes_reflected += 1;
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.rtt.srtt()
    }

    pub fn rtt_percentile(&self, q: f64) -> Option<Duration> {
        self.rtt.percentile(q)
    }

    pub fn loss_samples(&self) -> u32 {
        self.loss.resolved()
    }

    /// How the path serves the class; `None` when Down.
    pub fn tier(&self, class: ClassId, now: Instant) -> Option<Tier> {
        if self.state == PathState::Down {
            return None;
        }
        let h = self.classes.get(usize::from(class.0))?;
        Some(if !h.compliant {
            Tier::Breaks
        } else if !h.failed || h.eligible_at.is_some_and(|t| t <= now) {
            Tier::Eligible
        } else {
            Tier::HoldDown
        })
    }

    /// The peer epoch at which the path became eligible for the class, if it is eligible now
    /// and the engine has stamped that change.
    pub fn eligible_epoch(&self, class: ClassId, now: Instant) -> Option<u32> {
        if self.tier(class, now) != Some(Tier::Eligible) {
            return None;
        }
        self.classes.get(usize::from(class.0))?.eligible_epoch
    }

    /// Records the peer epoch that the change which made classes eligible produced. Flows
    /// whose decision is older than that epoch have not yet considered this path for them.
    pub fn stamp(&mut self, epoch: u32) {
        for h in &mut self.classes {
            if h.unstamped {
                h.eligible_epoch = Some(epoch);
                h.unstamped = false;
            }
        }
    }

    fn is_active(&self, now: Instant) -> bool {
        self.state != PathState::Down
            && (self.flows > 0
                || self
                    .last_rx
                    .is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_GRACE))
    }

    /// Data arrived on the path: activity, and something heard from the peer. Not evidence of
    /// life: it proves only the peer-to-us direction (see the module docs).
    pub fn on_data_received(
        &mut self,
        len: usize,
        now: Instant,
        settings: &FailoverSettings,
    ) -> bool {
        self.counters.rx_packets += 1;
        self.counters.rx_bytes += len as u64;
        self.last_rx = Some(self.last_rx.map_or(now, |t| t.max(now)));
        self.heard(now);
        self.speed_up(now, settings)
    }

    fn heard(&mut self, at: Instant) {
        self.last_heard = Some(self.last_heard.map_or(at, |t| t.max(at)));
    }

    /// Evidence of life (both directions) dated `at`. Evidence from before this edge's last
    /// late run (read from the backlog it left) does not end the excuse of that lateness.
    fn evidence(&mut self, at: Instant) {
        if self.last_evidence.is_none_or(|t| t < at) {
            self.last_evidence = Some(at);
            self.held = false;
            self.suspect = false;
            self.peer_resumed = None;
            if self.excused_at.is_none_or(|t| at >= t) {
                self.excused = Duration::ZERO;
            }
        }
    }

    /// The latest evidence of life, if the path is live.
    pub fn last_evidence(&self) -> Option<Instant> {
        if self.state == PathState::Down {
            None
        } else {
            self.last_evidence
        }
    }

    /// A probe request from the peer arrived on the path at `arrived`. It proves the peer-to-us
    /// direction; its `heard` field, when it says the peer received something of ours, proves
    /// ours too. True if that was evidence.
    pub fn on_request(&mut self, request: &ProbeRequest, arrived: Instant) -> bool {
        self.heard(arrived);
        self.peer_reads_heard |= request.reads_heard;
        let Some(heard) = request.heard else {
            return false;
        };
        // Our packet reached the peer `heard` before it sent this request, which then took
        // about half a round trip to come here.
        let back = self.rtt.srtt().unwrap_or_default() / 2;
        let Some(at) = arrived.checked_sub(heard + back) else {
            return false;
        };
        if self.state == PathState::Down || self.up_since.is_none_or(|u| at < u) {
            return false;
        }
        let fresher = self.last_evidence.is_none_or(|t| t < at);
        self.evidence(at);
        fresher
    }

    /// The moment after which evidence from another path to the peer shows this path's silence
    /// is its own: the reply to its first probe still unanswered since `anchor` was due then
    /// (sent, plus a round trip and its variation). Another path's last evidence may be later
    /// than this one's merely by their probe phases; that proves nothing.
    fn overdue_after(&self, anchor: Instant) -> Instant {
        self.first_overdue(anchor).unwrap_or(anchor)
    }

    /// When the reply to the first probe still unanswered since `anchor` was due, if there is
    /// such a probe.
    fn first_overdue(&self, anchor: Instant) -> Option<Instant> {
        let srtt = self.rtt.srtt().unwrap_or_default();
        let since = anchor.checked_sub(srtt).unwrap_or(anchor);
        let mut first = None;
        for p in self.pending.iter().rev() {
            if p.sent <= since {
                break;
            }
            if matches!(p.outcome, Outcome::Waiting | Outcome::Lost) {
                first = Some(p.sent);
            }
        }
        first.map(|sent| sent + srtt + self.rtt.rttvar() * 4)
    }

    /// A live path whose reply is overdue and that has not yet asked: the moment to probe the
    /// peer's other paths, so that by this path's deadline they have shown whether the peer
    /// still answers (see the module docs).
    fn suspect_at(&self) -> Option<Instant> {
        if self.state == PathState::Down || self.suspect || self.held {
            return None;
        }
        self.first_overdue(self.last_evidence.or(self.up_since)?)
    }

    /// This edge ran its timers `late`: the silence that caused is not held against the path.
    pub fn excuse(&mut self, late: Duration, now: Instant) {
        if self.state != PathState::Down {
            self.excused += late;
            self.excused_at = Some(now);
        }
    }

    /// The path is held Up, or defers a probe's verdict, while its whole peer is silent: the
    /// peer's next evidence should wake it.
    pub fn is_held(&self) -> bool {
        self.held || self.deferred.is_some()
    }

    /// Switches a live path to the active cadence, probing at once.
    pub fn speed_up(&mut self, now: Instant, settings: &FailoverSettings) -> bool {
        let active = settings.active_probe_interval();
        if self.state == PathState::Down || self.interval == active {
            return false;
        }
        self.interval = active;
        self.cadence_changed = now;
        self.next_probe_at = self.next_probe_at.min(now);
        true
    }

    fn waiting_time(&self) -> Duration {
        match self.rtt.srtt() {
            Some(srtt) => (srtt * 2 + self.rtt.rttvar() * 4).clamp(MIN_WAIT, MAX_WAIT),
            None => INITIAL_WAIT,
        }
    }

    fn down_deadline(&self, settings: &FailoverSettings) -> Option<Instant> {
        if self.state == PathState::Down {
            return None;
        }
        let evidence = self.last_evidence.or(self.up_since)?;
        let after_cadence = self.cadence_changed + self.rtt.srtt().unwrap_or_default();
        let mut anchor = evidence.max(after_cadence);
        if let Some(t) = self.peer_resumed {
            anchor = anchor.max(t);
        }
        Some(
            anchor
                + self.interval * settings.down_after_misses
                + self.rtt.rttvar() * 4
                + self.excused,
        )
    }

    /// The earliest moment the path has something to do.
    pub fn next_wake(&self, settings: &FailoverSettings) -> Instant {
        let mut wake = self.next_probe_at;
        if let Some(p) = self.pending.get(self.cursor) {
            let mut verdict = p.deadline;
            if let Some(d) = self.deferred {
                verdict = verdict.max(d);
            }
            if let Some((_, until)) = self.reprieve.filter(|(b, _)| p.sent < *b) {
                verdict = verdict.max(until);
            }
            wake = wake.min(verdict);
        }
        if let Some(d) = self.down_deadline(settings) {
            wake = wake.min(if self.held { d + PEER_SILENCE_GRACE } else { d });
        }
        if let Some(t) = self.report_up_at {
            wake = wake.min(t);
        }
        if let Some(t) = self.suspect_at() {
            wake = wake.min(t);
        }
        for h in &self.classes {
            if h.compliant && h.failed {
                if let Some(t) = h.eligible_at {
                    wake = wake.min(t);
                }
            }
        }
        wake
    }

    /// Runs whatever is due: losses, Down detection, hold-down ends, and the next probe.
    pub fn on_timeout(
        &mut self,
        now: Instant,
        ctx: &Ctx<'_>,
        events: &mut Events,
    ) -> (Change, Option<[u8; PROBE_LEN]>) {
        let mut change = self.resolve(now, ctx, events);
        if self.suspect_at().is_some_and(|t| now >= t) {
            self.suspect = true;
            change |= Change::PROBE_PEER;
        }
        if let Some(deadline) = self.down_deadline(ctx.settings).filter(|d| now >= *d) {
            let anchor = self.last_evidence.or(self.up_since).unwrap_or(now);
            let peer_heard_since = ctx
                .peer(self.peer)
                .evidence
                .is_some_and(|t| t > self.overdue_after(anchor));
            let peer_was_stalled = ctx.peer(self.peer).stalled.is_some_and(|t| t > anchor);
            if self.held && peer_heard_since && peer_was_stalled {
                // The peer speaks again on another path, and its replies say it was stalled
                // (held them). This one gets a detection time from now to show life too: what
                // the peer held comes back on each path after that path's own delay.
                self.held = false;
                self.peer_resumed = Some(now);
            } else if peer_heard_since || now >= deadline + PEER_SILENCE_GRACE {
                change |= self.go_down(now, ctx, events);
            } else if !self.held {
                self.held = true;
                change |= Change::PEER_SILENT;
            }
        }
        if self
            .report_up_at
            .is_some_and(|t| t <= now && self.state != PathState::Down)
        {
            self.report_up_at = None;
            self.reported_live = true;
            events.reported.push(Event::PathUp {
                path: self.id,
                rtt: self.rtt.srtt().unwrap_or_default(),
            });
        }
        for (i, h) in self.classes.iter_mut().enumerate() {
            if h.compliant && h.failed && h.eligible_at.is_some_and(|t| t <= now) {
                h.failed = false;
                h.eligible_at = None;
                h.unstamped = true;
                change |= Change::ELIGIBILITY;
                if std::mem::take(&mut h.reported_broken) {
                    events.reported.push(Event::SlaRestored {
                        path: self.id,
                        class: ClassId(i as u8),
                    });
                }
            }
        }
        let probe = (now >= self.next_probe_at).then(|| self.make_probe(now, ctx));
        (change, probe)
    }

    fn make_probe(&mut self, now: Instant, ctx: &Ctx<'_>) -> [u8; PROBE_LEN] {
        let interval = if self.is_active(now) {
            ctx.settings.active_probe_interval()
        } else {
            ctx.settings.standby_probe_interval()
        };
        if interval != self.interval {
            self.interval = interval;
            self.cadence_changed = now;
        }
        let mut next = self.next_probe_at + self.interval;
        if next <= now {
            next = now + self.interval;
        }
        self.next_probe_at = next;

        if self.pending.len() >= MAX_PENDING {
            if self.cursor == 0 {
                if let Some(p) = self.pending.front_mut() {
                    if p.outcome == Outcome::Waiting {
                        p.outcome = Outcome::Lost;
                        self.counters.probes_lost += 1;
                    }
                    p.recorded = Some(self.loss.record(p.outcome != Outcome::Received));
                }
                self.cursor = 1;
            }
            self.pending.pop_front();
            self.cursor -= 1;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let t1 = ctx.ntp(now);
        let mut deadline = now + self.waiting_time();
        if let Some(last) = self.pending.back() {
            deadline = deadline.max(last.deadline);
        }
        self.pending.push_back(Pending {
            seq,
            sent: now,
            t1,
            deadline,
            outcome: Outcome::Waiting,
            recorded: None,
        });
        self.counters.probes_sent += 1;
        ProbeRequest {
            seq,
            t1,
            path: self.id.0,
            instance: ctx.instance,
            heard: self
                .last_heard
                .filter(|_| self.peer_reads_heard)
                .map(|t| now.saturating_duration_since(t)),
            reads_heard: true,
        }
        .encode()
    }

    /// Resolves probe records in send order: replied ones as received, expired ones as lost;
    /// forgets records too old for a late reply.
    fn resolve(&mut self, now: Instant, ctx: &Ctx<'_>, events: &mut Events) -> Change {
        if self.record_outcomes(now, ctx.peer(self.peer).evidence) && self.state != PathState::Down
        {
            self.evaluate(now, ctx, events, false)
        } else {
            Change::NONE
        }
    }

    /// Records resolved probes in the loss window in send order (expiring those past their
    /// waiting time) and forgets records too old for a late reply. True if anything was
    /// recorded.
    ///
    /// A probe whose waiting time ran out while nothing at all came from the peer since its
    /// reply was due (`peer_evidence`, on any of its paths) is not judged yet: the whole peer
    /// is silent, which says nothing about this path's loss (see the module docs). Its verdict
    /// waits for the peer's next sign of life (a reply the reflector held, STAMP's T2 and T3
    /// show) or for [`PEER_SILENCE_GRACE`].
    fn record_outcomes(&mut self, now: Instant, peer_evidence: Option<Instant>) -> bool {
        let mut recorded = false;
        let heard = peer_evidence.max(self.last_evidence);
        let srtt = self.rtt.srtt().unwrap_or_default();
        let waiting = self.waiting_time();
        let mut was_deferring = self.deferred.take().is_some();
        while let Some(p) = self.pending.get_mut(self.cursor) {
            if p.outcome == Outcome::Waiting && p.deadline <= now && self.state != PathState::Down {
                // Silent since the reply was due.
                let peer_silent = heard.is_none_or(|t| t < p.sent + srtt);
                if peer_silent && now < p.deadline + PEER_SILENCE_GRACE {
                    self.deferred = Some(p.deadline + PEER_SILENCE_GRACE);
                    break;
                }
                if std::mem::take(&mut was_deferring) {
                    // The peer speaks again: replies it held may still come, for every probe
                    // sent before now.
                    self.reprieve = Some((now, now + waiting));
                }
                if self
                    .reprieve
                    .is_some_and(|(before, until)| p.sent < before && now < until)
                {
                    break;
                }
            }
            let lost = match p.outcome {
                Outcome::Waiting if p.deadline <= now => {
                    p.outcome = Outcome::Lost;
                    self.counters.probes_lost += 1;
                    true
                }
                Outcome::Waiting => break,
                Outcome::Received => false,
                Outcome::Lost | Outcome::LateReceived => true,
            };
            p.recorded = Some(self.loss.record(lost));
            recorded = true;
            self.cursor += 1;
        }
        while self.cursor > 0
            && self
                .pending
                .front()
                .is_some_and(|p| p.sent + LATE_REPLY_WINDOW <= now)
        {
            self.pending.pop_front();
            self.cursor -= 1;
        }
        recorded
    }

    /// Takes a reply that arrived on this path at `now`.
    pub fn on_reply(
        &mut self,
        reply: &ProbeReply,
        now: Instant,
        ctx: &Ctx<'_>,
        events: &mut Events,
    ) -> Result<Change, ProbeError> {
        let r = &reply.request;
        if r.path != self.id.0 {
            return Err(ProbeError::WrongPath {
                expected: self.id.0,
                got: r.path,
            });
        }
        if r.instance != ctx.instance {
            return Err(ProbeError::WrongInstance {
                expected: ctx.instance,
                got: r.instance,
            });
        }
        let front = self.pending.front().ok_or(ProbeError::Stale(r.seq))?.seq;
        let idx = r.seq.wrapping_sub(front) as usize;
        let p = self.pending.get_mut(idx).ok_or(ProbeError::Stale(r.seq))?;
        if p.t1 != r.t1 {
            return Err(ProbeError::EchoMismatch(r.seq));
        }
        let rtt_ns =
            i64::try_from(now.saturating_duration_since(p.sent).as_nanos()).unwrap_or(i64::MAX);
        let dwell_ns = reply.t3.nanos_since(reply.t2);
        if dwell_ns < 0 || dwell_ns > rtt_ns {
            return Err(ProbeError::BadTimestamps { dwell_ns, rtt_ns });
        }
        match p.outcome {
            Outcome::Received | Outcome::LateReceived => return Err(ProbeError::Duplicate(r.seq)),
            Outcome::Lost => {
                self.counters.probes_late += 1;
                if rtt_ns - dwell_ns <= waited_ns(p) {
                    // Late only because the reflector held it (its host stalled: STAMP's T2
                    // and T3 say so): the network lost nothing.
                    p.outcome = Outcome::Received;
                    self.counters.probes_lost = self.counters.probes_lost.saturating_sub(1);
                    if let Some(i) = p.recorded {
                        self.loss.amend(i);
                    }
                } else {
                    p.outcome = Outcome::LateReceived;
                }
            }
            Outcome::Waiting => p.outcome = Outcome::Received,
        }
        self.counters.probes_received += 1;
        self.heard(now);
        self.peer_reads_heard |= reply.reads_heard;

        let mut change = Change::NONE;
        let came_up = self.state == PathState::Down;
        if came_up {
            // Whatever was lost while the path was Down is the outage, already accounted for
            // by the Down event and the hold-down; the estimators start afresh.
            for p in self.pending.iter_mut().take(idx) {
                if p.outcome == Outcome::Waiting {
                    p.outcome = Outcome::Lost;
                    self.counters.probes_lost += 1;
                }
            }
            self.cursor = self.cursor.max(idx);
            self.loss.reset();
            self.rtt = RttEstimator::default();
            self.fwd = Jitter::default();
            self.rev = Jitter::default();
            self.state = PathState::Up;
            self.up_since = Some(now);
            self.down_since = None;
            self.cadence_changed = now;
            self.last_evidence = None;
            change |= Change::STATE;
        }
        self.evidence(now);
        let rtt_sample = rtt_ns - dwell_ns;
        self.rtt
            .on_sample(Duration::from_nanos(rtt_sample.unsigned_abs()));
        self.fwd.on_transit(reply.t2.nanos_since(r.t1), rtt_sample);
        self.rev
            .on_transit(ctx.ntp(now).nanos_since(reply.t3), rtt_sample);
        if came_up {
            let up = Event::PathUp {
                path: self.id,
                rtt: self.rtt.srtt().unwrap_or_default(),
            };
            events.internal.push(up.clone());
            if self.ever_reported {
                // Reported once the path has earned it (see the module docs).
                self.report_up_at = Some(now + self.hold_down(now, ctx.settings));
            } else {
                self.ever_reported = true;
                self.reported_live = true;
                events.reported.push(up);
            }
        }
        // Record this outcome (and any resolved before it) in the loss window.
        self.record_outcomes(now, ctx.peer(self.peer).evidence);
        change |= self.evaluate(now, ctx, events, came_up);
        Ok(change)
    }

    fn go_down(&mut self, now: Instant, ctx: &Ctx<'_>, events: &mut Events) -> Change {
        let silent_for =
            now.saturating_duration_since(self.last_evidence.or(self.up_since).unwrap_or(now));
        self.state = PathState::Down;
        self.up_since = None;
        self.down_since = Some(now);
        self.excused = Duration::ZERO;
        self.held = false;
        self.suspect = false;
        self.peer_resumed = None;
        self.report_up_at = None;
        self.interval = ctx.settings.standby_probe_interval();
        self.cadence_changed = now;
        for h in &mut self.classes {
            h.compliant = false;
            h.failed = true;
            h.eligible_at = None;
            h.eligible_epoch = None;
            h.unstamped = false;
        }
        self.add_penalty(now, ctx.settings);
        let down = Event::PathDown {
            path: self.id,
            silent_for,
            flows: self.flows,
        };
        events.internal.push(down.clone());
        self.ever_reported = true;
        if std::mem::take(&mut self.reported_live) {
            events.reported.push(down);
        }
        Change::STATE | Change::COMPLIANCE
    }

    fn add_penalty(&mut self, now: Instant, settings: &FailoverSettings) {
        self.penalty = self.penalty_now(now, settings) + 1.0;
        self.penalty_at = now;
        self.flaps += 1;
    }

    fn penalty_now(&self, now: Instant, settings: &FailoverSettings) -> f64 {
        let half_lives = now.saturating_duration_since(self.penalty_at).as_secs_f64()
            / settings.flap_half_life().as_secs_f64().max(1e-3);
        self.penalty * 0.5f64.powf(half_lives)
    }

    /// The hold-down a path that becomes healthy at `now` must wait: doubled for each point of
    /// damping penalty above 1, capped.
    pub fn hold_down(&self, now: Instant, settings: &FailoverSettings) -> Duration {
        let exp = (self.penalty_now(now, settings) - 1.0).max(0.0);
        let base = settings.hold_down().as_secs_f64();
        let damped = base * 2f64.powf(exp);
        Duration::from_secs_f64(damped.min(settings.max_hold_down().as_secs_f64().max(base)))
    }

    /// The SLA classes changed (`map[i]`: the old index of new class `i`, if it existed):
    /// a class that stays keeps its health (its hold-down, its failure) and is checked against
    /// its new bounds; a new one starts from what the path measures now, with no hold-down.
    /// Takes new probe cadences into account at once.
    pub fn reconfigure(
        &mut self,
        map: &[Option<usize>],
        now: Instant,
        ctx: &Ctx<'_>,
        events: &mut Events,
    ) -> Change {
        let alive = self.state != PathState::Down;
        let old = std::mem::take(&mut self.classes);
        self.classes = map
            .iter()
            .zip(ctx.classes)
            .map(|(m, sla)| match m.and_then(|i| old.get(i)) {
                Some(h) => h.clone(),
                None if alive => {
                    let compliant = !sla.violated_by(&self.metrics);
                    ClassHealth {
                        compliant,
                        failed: !compliant,
                        unstamped: compliant,
                        violated_at: (!compliant).then_some(now),
                        ..ClassHealth::default()
                    }
                }
                None => ClassHealth {
                    failed: true,
                    ..ClassHealth::default()
                },
            })
            .collect();
        // The cadence the settings now ask for, from the next probe on.
        let interval = if self.state == PathState::Down {
            ctx.settings.standby_probe_interval()
        } else {
            self.interval
        };
        if interval != self.interval {
            self.interval = interval;
            self.cadence_changed = now;
            self.next_probe_at = self.next_probe_at.min(now + interval);
        }
        let mut change = Change::COMPLIANCE;
        if alive {
            change |= self.evaluate(now, ctx, events, false);
        }
        change
    }

    /// Recomputes metrics and per-class compliance.
    fn evaluate(
        &mut self,
        now: Instant,
        ctx: &Ctx<'_>,
        events: &mut Events,
        initial: bool,
    ) -> Change {
        self.metrics = Metrics {
            rtt: self.rtt.srtt().unwrap_or_default(),
            jitter: self.fwd.get().max(self.rev.get()),
            loss: self.loss.fraction(),
        };
        let m = self.metrics;
        let hold_down = self.hold_down(now, ctx.settings);
        let mut change = Change::NONE;
        let mut violated = false;
        for (i, (h, sla)) in self.classes.iter_mut().zip(ctx.classes).enumerate() {
            let class = ClassId(i as u8);
            let now_compliant = if initial || !h.compliant {
                if initial {
                    !sla.violated_by(&m)
                } else {
                    sla.cleared_by(&m)
                }
            } else {
                !sla.violated_by(&m)
            };
            if now_compliant == h.compliant && !initial {
                continue;
            }
            change |= Change::COMPLIANCE;
            h.compliant = now_compliant;
            if now_compliant {
                h.eligible_at = h.failed.then_some(now + hold_down);
                h.unstamped = !h.failed;
                if !initial {
                    events.internal.push(Event::SlaRestored {
                        path: self.id,
                        class,
                    });
                }
            } else {
                h.failed = true;
                h.eligible_at = None;
                h.eligible_epoch = None;
                h.unstamped = false;
                h.violated_at = Some(now);
                violated = true;
                let e = Event::SlaViolated {
                    path: self.id,
                    class,
                    metrics: m,
                };
                if !std::mem::replace(&mut h.reported_broken, true) {
                    events.reported.push(e.clone());
                }
                events.internal.push(e);
            }
        }
        if violated && !initial {
            self.add_penalty(now, ctx.settings);
        }
        let state = if self.classes.iter().all(|h| h.compliant) {
            PathState::Up
        } else {
            PathState::Degraded
        };
        if state != self.state {
            self.state = state;
            change |= Change::STATE;
        }
        change
    }
}
