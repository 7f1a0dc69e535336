//! Path selection: which path (or pair of paths) a flow of a class takes to its peer, and when
//! a flow that already has a path moves.
//!
//! # Ranking
//!
//! Candidates are the peer's live paths that the class's link preferences admit (`only`, and
//! `metered = never`, exclude; Down paths are never candidates). They are ranked by, in order:
//!
//! 1. **tier** ([`Tier`]): `Eligible` meets the class's SLA and is out of hold-down;
//!    `HoldDown` meets it but is in hold-down; `Breaks` is live but breaks it;
//! 2. **fate** ([`Fate`]): `Doomed` when the path shares its local or remote link with another
//!    path of the same peer that went Down in the last [`FATE_WINDOW`], `Dented` when it shares
//!    one with a path that broke this class's SLA then, `Clear` otherwise. The other paths over a
//!    cut or impaired link are about to be found Down or degraded too, but an idle path is
//!    probed slowly and its estimators lag; failing over onto it would cost a second outage or a
//!    second move. So among the paths that meet the SLA (`Eligible` and `HoldDown`), a `Doomed`
//!    one ranks after every other, even one still in hold-down: a recovered path is a better bet
//!    than the sibling of a dead one. Fate only steers where a flow goes when it must move: it
//!    never moves a flow off a path that meets its SLA;
//! 3. **preference**: 0 preferred link kinds at both ends, 2 an avoided kind (or a metered
//!    link when the class avoids metered links) at either end, 1 otherwise;
//! 4. among paths that meet the SLA, the mode's own order: `lowest-cost` by cost (unmetered
//!    first, then price per GB, then link priority, then link kind), then score; the other modes
//!    by score (see [`crate::score`]), then cost. Among paths that break it always by score:
//!    with no path meeting the SLA, the least-bad path wins whatever the mode;
//! 5. the path id, so that equal paths always rank the same way.
//!
//! # Modes
//!
//! - `best-quality` and `lowest-cost`: the top-ranked path.
//! - `load-balance`: among the paths ranked equal to the best on (tier, fate, preference), the
//!   one with the fewest flows per unit of capacity, so flows spread in proportion to capacity
//!   (equally when some path's capacity is unknown). Counts flows, not bytes.
//! - `duplicate`: the top-ranked path and the best path sharing the fewest links with it.
//!   Each packet is encrypted once, under the WireGuard session of the first path, and the same
//!   ciphertext is sent on both paths; the receiver finds the session by the receiver index in
//!   the packet, whichever path it came on, so the second copy to arrive fails WireGuard's replay
//!   check and is dropped there. No extra header, no extra state.
//!
//! # The move rule (stickiness and hysteresis)
//!
//! A flow that has a path keeps it while the path meets the flow's SLA: needless moves reorder
//! packets. It moves:
//!
//! - when its path is Down, removed, or no longer admitted by its policy: at once, to the
//!   top-ranked path;
//! - when its path breaks its SLA: to a path that meets it, or, if none does, to the least-bad
//!   path only if that is better by the margin;
//! - while its path meets its SLA, only to a path that became `Eligible` since the
//!   flow's decision was last made or confirmed (a path back from a failure and out of its
//!   hold-down, or a new one), and only if that path ranks ahead by link preference, or is
//!   cheaper (`lowest-cost`), or scores better by the margin (`best-quality`, `duplicate`).
//!   Metrics drifting on paths the flow already passed over never move it; new flows take the
//!   best path of the moment. `load-balance` flows stay while their path meets the SLA; new
//!   flows fill the other paths.
//!
//! The margin: `candidate + max(2 % of the budget, min_improvement × current) < current`.
//! Flows reconsider only when something about their peer's paths changed (state, compliance,
//! end of a hold-down), never on every probe.

use std::cmp::Ordering;
use std::time::{Duration, Instant};

use patronus_api::{LinkKind, MeteredUse, SteeringMode};

use crate::path::Path;
use crate::score::{SlaBounds, score};
use crate::{ClassId, Decision, DropReason, MoveReason, PathId};

/// How long after a path went Down (or broke a class's SLA) the paths sharing a link with it
/// rank behind the others (for that class). Long enough for an idle path, probed ten times a
/// second, to show the same fault in its own estimators.
pub const FATE_WINDOW: Duration = Duration::from_secs(5);
/// The smallest score improvement that moves a flow off a path meeting its SLA.
pub const MIN_IMPROVEMENT_FLOOR: f64 = 0.02;

/// How a live path serves a class, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Meets the class's SLA and is out of hold-down.
    Eligible,
    /// Meets the class's SLA but serves its hold-down.
    HoldDown,
    /// Breaks the class's SLA.
    Breaks,
}

/// What happened lately to a path's siblings (the peer's other paths over its local or remote
/// link), best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    /// None went Down or broke the class's SLA in the last [`FATE_WINDOW`].
    Clear,
    /// One broke the class's SLA.
    Dented,
    /// One went Down.
    Doomed,
}

/// What a policy (or the default) asks of selection, compiled.
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    pub class: ClassId,
    pub mode: SteeringMode,
    pub only: u8,
    pub avoid: u8,
    pub prefer: u8,
    pub metered: MeteredUse,
    pub strict: bool,
}

pub(crate) fn kinds(ks: &[LinkKind]) -> u8 {
    ks.iter().fold(0, |acc, k| acc | kind_bit(*k))
}

fn kind_bit(k: LinkKind) -> u8 {
    1 << LinkKind::ALL.iter().position(|x| *x == k).unwrap_or(0)
}

impl Profile {
    fn admits(&self, p: &Path) -> bool {
        let (a, b) = (kind_bit(p.local.kind), kind_bit(p.remote.kind));
        let metered = p.local.metered || p.remote.metered;
        (self.only == 0 || (self.only & a != 0 && self.only & b != 0))
            && !(metered && self.metered == MeteredUse::Never)
    }

    fn preference(&self, p: &Path) -> u8 {
        let (a, b) = (kind_bit(p.local.kind), kind_bit(p.remote.kind));
        let metered = p.local.metered || p.remote.metered;
        if self.avoid & (a | b) != 0 || (metered && self.metered == MeteredUse::Avoid) {
            2
        } else if self.prefer & a != 0 && self.prefer & b != 0 {
            0
        } else {
            1
        }
    }
}

/// (metered, price per GB in thousandths, priority, worst kind rank): lower is cheaper.
pub(crate) type CostKey = (u8, u64, u16, u8);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Cand {
    pub id: PathId,
    pub tier: Tier,
    pub fate: Fate,
    pub pref: u8,
    pub cost: CostKey,
    pub score: f64,
    /// The peer epoch at which the path became eligible for the class (`Eligible` only).
    pub eligible_epoch: Option<u32>,
    local: u16,
    remote: u16,
    flows: u32,
    capacity: u64,
}

pub(crate) fn cost_key(p: &Path) -> CostKey {
    let per_gb = (p.local.cost_per_gb + p.remote.cost_per_gb) * 1000.0;
    (
        u8::from(p.local.metered || p.remote.metered),
        per_gb as u64,
        u16::from(p.local.priority) + u16::from(p.remote.priority),
        p.local.kind.cost_rank().max(p.remote.kind.cost_rank()),
    )
}

/// Fills `out` with the candidate paths among `peer_paths` for a profile.
pub(crate) fn candidates(
    peer_paths: &[PathId],
    paths: &[Option<Path>],
    classes: &[SlaBounds],
    profile: &Profile,
    now: Instant,
    out: &mut Vec<Cand>,
) {
    out.clear();
    let get = |id: &PathId| paths.get(id.0 as usize).and_then(Option::as_ref);
    let recent =
        |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < FATE_WINDOW);
    let class = usize::from(profile.class.0);
    let fate = |p: &Path| {
        let siblings = || {
            peer_paths.iter().filter_map(get).filter(|q| {
                q.id != p.id && (q.local.id == p.local.id || q.remote.id == p.remote.id)
            })
        };
        if siblings().any(|q| recent(q.down_since)) {
            Fate::Doomed
        } else if siblings().any(|q| recent(q.classes.get(class).and_then(|h| h.violated_at))) {
            Fate::Dented
        } else {
            Fate::Clear
        }
    };
    let Some(sla) = classes.get(usize::from(profile.class.0)) else {
        return;
    };
    for p in peer_paths.iter().filter_map(get) {
        let Some(tier) = p.tier(profile.class, now) else {
            continue;
        };
        if !profile.admits(p) {
            continue;
        }
        out.push(Cand {
            id: p.id,
            tier,
            fate: fate(p),
            pref: profile.preference(p),
            cost: cost_key(p),
            score: score(&p.metrics, sla),
            eligible_epoch: p.eligible_epoch(profile.class, now),
            local: p.local.id,
            remote: p.remote.id,
            flows: p.flows,
            capacity: p.capacity_kbps,
        });
    }
}

/// The ranking key before the mode's own order: SLA-meeting paths first, among them the ones
/// not doomed by a dead sibling, then tier, fate and preference (see the module doc).
fn rank(c: &Cand) -> (bool, bool, Tier, Fate, u8) {
    (
        c.tier == Tier::Breaks,
        c.fate == Fate::Doomed,
        c.tier,
        c.fate,
        c.pref,
    )
}

/// The ranking order of two candidates under a mode (`Less` ranks first).
pub(crate) fn order(a: &Cand, b: &Cand, mode: SteeringMode) -> Ordering {
    let by_score = || a.score.total_cmp(&b.score).then(a.cost.cmp(&b.cost));
    let by_cost = || a.cost.cmp(&b.cost).then(a.score.total_cmp(&b.score));
    // Equal ranks have equal tiers: `a`'s tells for both.
    let meets = a.tier != Tier::Breaks;
    rank(a)
        .cmp(&rank(b))
        .then_with(|| match mode {
            SteeringMode::LowestCost if meets => by_cost(),
            SteeringMode::LowestCost
            | SteeringMode::BestQuality
            | SteeringMode::LoadBalance
            | SteeringMode::Duplicate => by_score(),
        })
        .then(a.id.cmp(&b.id))
}

fn best(cands: &[Cand], mode: SteeringMode) -> Option<&Cand> {
    cands.iter().min_by(|a, b| order(a, b, mode))
}

/// The second path of a duplicated flow: the best-ranked one sharing the fewest links with
/// the first.
fn secondary(cands: &[Cand], first: &Cand) -> Option<PathId> {
    let shared = |c: &Cand| u8::from(c.local == first.local) + u8::from(c.remote == first.remote);
    cands
        .iter()
        .filter(|c| c.id != first.id)
        .min_by(|a, b| {
            shared(a)
                .cmp(&shared(b))
                .then_with(|| order(a, b, SteeringMode::BestQuality))
        })
        .map(|c| c.id)
}

/// Where a new flow goes.
pub(crate) fn choose(cands: &[Cand], profile: &Profile) -> Decision {
    let Some(top) = best(cands, profile.mode) else {
        return Decision::Drop(DropReason::NoPath);
    };
    if profile.strict && top.tier == Tier::Breaks {
        return Decision::Drop(DropReason::SlaUnavailable);
    }
    match profile.mode {
        SteeringMode::BestQuality | SteeringMode::LowestCost => Decision::Send(top.id),
        SteeringMode::LoadBalance => {
            let group = |c: &&Cand| rank(c) == rank(top);
            let weighted = cands.iter().filter(group).all(|c| c.capacity > 0);
            let load = |c: &Cand| {
                if weighted {
                    // (flows + 1) / capacity, compared by cross-multiplication.
                    (u128::from(c.flows) + 1, u128::from(c.capacity))
                } else {
                    (u128::from(c.flows) + 1, 1)
                }
            };
            let pick = cands
                .iter()
                .filter(group)
                .min_by(|a, b| {
                    let ((fa, ca), (fb, cb)) = (load(a), load(b));
                    (fa * cb)
                        .cmp(&(fb * ca))
                        .then_with(|| order(a, b, profile.mode))
                })
                .unwrap_or(top);
            Decision::Send(pick.id)
        }
        SteeringMode::Duplicate => match secondary(cands, top) {
            Some(second) => Decision::Duplicate {
                primary: top.id,
                secondary: second,
            },
            None => Decision::Send(top.id),
        },
    }
}

fn improves(candidate: f64, current: f64, margin: f64) -> bool {
    candidate + MIN_IMPROVEMENT_FLOOR.max(margin * current) < current
}

/// Whether a flow on `cur`, last decided at peer epoch `decided`, moves to `top` (the
/// best-ranked candidate), and why.
pub(crate) fn should_move(
    cur: &Cand,
    top: &Cand,
    mode: SteeringMode,
    margin: f64,
    decided: u32,
) -> Option<MoveReason> {
    if cur.id == top.id {
        return None;
    }
    if cur.tier == Tier::Breaks {
        return (top.tier != Tier::Breaks || improves(top.score, cur.score, margin))
            .then_some(MoveReason::SlaViolated);
    }
    // Epochs wrap; "after" is judged over half the u32 range.
    let newly_eligible = top.tier == Tier::Eligible
        && top
            .eligible_epoch
            .is_some_and(|e| (e.wrapping_sub(decided) as i32) > 0);
    if !newly_eligible {
        return None;
    }
    // Ahead on the mode's own keys, or level on them and better by the margin.
    let ahead = |keys: Ordering| match keys {
        Ordering::Less => true,
        Ordering::Greater => false,
        Ordering::Equal => improves(top.score, cur.score, margin),
    };
    let moves = match mode {
        SteeringMode::BestQuality | SteeringMode::Duplicate => ahead(top.pref.cmp(&cur.pref)),
        SteeringMode::LowestCost => ahead(top.pref.cmp(&cur.pref).then(top.cost.cmp(&cur.cost))),
        // New flows fill the other paths.
        SteeringMode::LoadBalance => false,
    };
    moves.then_some(MoveReason::Better)
}

/// The outcome of reconsidering a flow that already has a decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Reconsidered {
    pub decision: Decision,
    pub moved: Option<MoveReason>,
}

/// Reconsiders a flow's decision. `gone` says why the current primary path is not a
/// candidate (Down, removed, or excluded by the policy).
pub(crate) fn reconsider(
    cands: &[Cand],
    profile: &Profile,
    current: Decision,
    decided: u32,
    margin: f64,
    gone: impl Fn(PathId) -> MoveReason,
) -> Reconsidered {
    let fresh = choose(cands, profile);
    let Some(cur_id) = current.primary() else {
        return Reconsidered {
            decision: fresh,
            moved: None,
        };
    };
    let (Some(cur), Some(top)) = (
        cands.iter().find(|c| c.id == cur_id),
        best(cands, profile.mode),
    ) else {
        let moved = fresh.primary().map(|_| gone(cur_id));
        return Reconsidered {
            decision: fresh,
            moved,
        };
    };
    if profile.strict && top.tier == Tier::Breaks {
        return Reconsidered {
            decision: Decision::Drop(DropReason::SlaUnavailable),
            moved: None,
        };
    }
    match should_move(cur, top, profile.mode, margin, decided) {
        Some(reason) => Reconsidered {
            decision: fresh,
            moved: Some(reason),
        },
        None => {
            let decision = match profile.mode {
                SteeringMode::Duplicate => match secondary(cands, cur) {
                    Some(second) => Decision::Duplicate {
                        primary: cur.id,
                        secondary: second,
                    },
                    None => Decision::Send(cur.id),
                },
                SteeringMode::BestQuality
                | SteeringMode::LowestCost
                | SteeringMode::LoadBalance => Decision::Send(cur.id),
            };
            Reconsidered {
                decision,
                moved: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The epoch at which the flows of these tests were last decided.
    const DECIDED: u32 = 10;

    /// A candidate of tier 0 (`Eligible`), 1 (`HoldDown`) or 2 (`Breaks`); if `Eligible`, it
    /// became so after the flow was last decided.
    fn cand(id: u32, tier: u8, score: f64) -> Cand {
        let tier = [Tier::Eligible, Tier::HoldDown, Tier::Breaks][usize::from(tier)];
        Cand {
            id: PathId(id),
            tier,
            fate: Fate::Clear,
            pref: 1,
            cost: (0, 0, 200, 0),
            score,
            eligible_epoch: (tier == Tier::Eligible).then_some(DECIDED + 1),
            local: id as u16,
            remote: 0,
            flows: 0,
            capacity: 0,
        }
    }

    /// A profile for class 0 with no link preferences.
    fn plain(mode: SteeringMode) -> Profile {
        Profile {
            class: ClassId(0),
            mode,
            only: 0,
            avoid: 0,
            prefer: 0,
            metered: MeteredUse::Allow,
            strict: false,
        }
    }

    /// The hysteresis rule as a table: (current, best, mode) → move?
    #[test]
    fn the_move_rule_table() {
        use MoveReason::*;
        use SteeringMode::*;
        let m = 0.2;
        let cheap = |mut c: Cand| {
            c.cost = (0, 0, 100, 0);
            c
        };
        let avoided = |mut c: Cand| {
            c.pref = 2;
            c
        };
        let shared = |mut c: Cand| {
            c.fate = Fate::Dented;
            c
        };
        let old = |mut c: Cand| {
            c.eligible_epoch = Some(DECIDED);
            c
        };
        let rows: &[(Cand, Cand, SteeringMode, Option<MoveReason>, &str)] = &[
            (
                cand(1, 0, 0.50),
                cand(2, 0, 0.45),
                BestQuality,
                None,
                "10 % better is within the 20 % margin",
            ),
            (
                cand(1, 0, 0.50),
                cand(2, 0, 0.39),
                BestQuality,
                Some(Better),
                "22 % better beats the margin",
            ),
            (
                cand(1, 0, 0.05),
                cand(2, 0, 0.035),
                BestQuality,
                None,
                "tiny scores: the 0.02 floor applies",
            ),
            (
                cand(1, 0, 0.50),
                cand(2, 1, 0.01),
                BestQuality,
                None,
                "a path in hold-down attracts no flow",
            ),
            (
                cand(1, 2, 1.50),
                cand(2, 1, 0.90),
                BestQuality,
                Some(SlaViolated),
                "breaking the SLA: any compliant path",
            ),
            (
                cand(1, 2, 1.50),
                cand(2, 2, 1.40),
                BestQuality,
                None,
                "nothing compliant: stay unless better by the margin",
            ),
            (
                cand(1, 2, 1.50),
                cand(2, 2, 1.10),
                BestQuality,
                Some(SlaViolated),
                "nothing compliant: least-bad by the margin",
            ),
            (
                cand(1, 0, 0.50),
                cheap(cand(2, 0, 0.90)),
                LowestCost,
                Some(Better),
                "cheaper and eligible attracts",
            ),
            (
                cheap(cand(1, 0, 0.90)),
                cand(2, 0, 0.10),
                LowestCost,
                None,
                "dearer never attracts in lowest-cost",
            ),
            (
                cand(1, 0, 0.50),
                cand(2, 0, 0.10),
                LoadBalance,
                None,
                "load-balance flows stay while compliant",
            ),
            (
                avoided(cand(1, 0, 0.10)),
                cand(2, 0, 0.90),
                BestQuality,
                Some(Better),
                "leaving an avoided link kind",
            ),
            (
                shared(cand(1, 0, 0.50)),
                cand(2, 0, 0.49),
                BestQuality,
                None,
                "fate never moves a compliant flow",
            ),
            (
                cand(1, 0, 0.50),
                old(cand(2, 0, 0.10)),
                BestQuality,
                None,
                "a path the flow already passed over never attracts it",
            ),
            (
                cand(1, 2, 1.50),
                old(cand(2, 0, 0.90)),
                BestQuality,
                Some(SlaViolated),
                "but takes it when its path breaks the SLA",
            ),
            (
                cand(1, 0, 0.10),
                cand(1, 0, 0.10),
                BestQuality,
                None,
                "already on the best path",
            ),
        ];
        for (cur, top, mode, want, why) in rows {
            assert_eq!(should_move(cur, top, *mode, m, DECIDED), *want, "{why}");
        }
    }

    /// What the table leaves out: each mode's own keys, and the epoch wrapping.
    #[test]
    fn the_move_rule_beyond_the_table() {
        use MoveReason::*;
        use SteeringMode::*;
        let m = 0.2;
        let cheap = |mut c: Cand| {
            c.cost = (0, 0, 100, 0);
            c
        };
        let avoided = |mut c: Cand| {
            c.pref = 2;
            c
        };
        let rows: &[(Cand, Cand, SteeringMode, Option<MoveReason>, &str)] = &[
            (
                cand(1, 0, 0.50),
                avoided(cand(2, 0, 0.10)),
                BestQuality,
                None,
                "an avoided link kind never attracts, however good",
            ),
            (
                cand(1, 0, 0.50),
                cand(2, 0, 0.39),
                Duplicate,
                Some(Better),
                "duplicate moves its primary as best-quality does",
            ),
            (
                cand(1, 0, 0.50),
                cand(2, 0, 0.45),
                Duplicate,
                None,
                "and stays within the margin",
            ),
            (
                cand(1, 0, 0.50),
                cand(2, 0, 0.39),
                LowestCost,
                Some(Better),
                "as cheap and better by the margin attracts in lowest-cost",
            ),
            (
                cand(1, 0, 0.50),
                cand(2, 0, 0.45),
                LowestCost,
                None,
                "as cheap and within the margin does not",
            ),
            (
                cand(1, 0, 0.50),
                avoided(cheap(cand(2, 0, 0.10))),
                LowestCost,
                None,
                "preference comes before cost",
            ),
            (
                cand(1, 2, 1.50),
                cand(2, 0, 0.90),
                LoadBalance,
                Some(SlaViolated),
                "load-balance flows leave a path that breaks their SLA",
            ),
        ];
        for (cur, top, mode, want, why) in rows {
            assert_eq!(should_move(cur, top, *mode, m, DECIDED), *want, "{why}");
        }
        // Epochs wrap: one past u32::MAX is still after.
        let mut top = cand(2, 0, 0.10);
        top.eligible_epoch = Some(1);
        let cur = cand(1, 0, 0.50);
        assert_eq!(
            should_move(&cur, &top, BestQuality, m, u32::MAX - 1),
            Some(Better)
        );
        assert_eq!(should_move(&cur, &top, BestQuality, m, 2), None);
    }

    #[test]
    fn lowest_cost_ranks_paths_that_meet_the_sla_by_cost_and_the_other_modes_by_score() {
        let good = cand(1, 0, 0.1);
        let mut cheap = cand(2, 0, 0.9);
        cheap.cost = (0, 0, 100, 0);
        assert_eq!(
            order(&cheap, &good, SteeringMode::LowestCost),
            Ordering::Less
        );
        for mode in [
            SteeringMode::BestQuality,
            SteeringMode::LoadBalance,
            SteeringMode::Duplicate,
        ] {
            assert_eq!(order(&good, &cheap, mode), Ordering::Less, "{mode:?}");
        }
        // Equal in everything but the id: the lower id, both ways round.
        let twin = cand(3, 0, 0.1);
        assert_eq!(
            order(&good, &twin, SteeringMode::BestQuality),
            Ordering::Less
        );
        assert_eq!(
            order(&twin, &good, SteeringMode::BestQuality),
            Ordering::Greater
        );
    }

    #[test]
    fn tiers_then_fates_rank_paths_before_any_score() {
        let mode = SteeringMode::BestQuality;
        let with = |c: Cand, fate: Fate| Cand { fate, ..c };
        // Best first; each beats every later one whatever the scores say.
        let ranked = [
            with(cand(1, 0, 0.9), Fate::Clear),
            with(cand(2, 0, 0.1), Fate::Dented),
            with(cand(3, 1, 0.1), Fate::Clear),
            with(cand(4, 1, 0.1), Fate::Dented),
            with(cand(5, 0, 0.1), Fate::Doomed),
            with(cand(6, 1, 0.1), Fate::Doomed),
            with(cand(7, 2, 1.9), Fate::Clear),
            with(cand(8, 2, 1.1), Fate::Dented),
            with(cand(9, 2, 1.1), Fate::Doomed),
        ];
        for (i, a) in ranked.iter().enumerate() {
            for b in &ranked[i + 1..] {
                assert_eq!(order(a, b, mode), Ordering::Less, "{:?} {:?}", a.id, b.id);
            }
        }
    }

    #[test]
    fn a_strict_flow_is_dropped_when_no_path_meets_its_sla_and_nothing_is_no_path() {
        let mut profile = plain(SteeringMode::BestQuality);
        profile.strict = true;
        let breaking = [cand(1, 2, 1.5)];
        assert_eq!(
            choose(&breaking, &profile),
            Decision::Drop(DropReason::SlaUnavailable)
        );
        let r = reconsider(
            &breaking,
            &profile,
            Decision::Send(PathId(1)),
            DECIDED,
            0.2,
            |_| MoveReason::PathDown,
        );
        assert_eq!(
            (r.decision, r.moved),
            (Decision::Drop(DropReason::SlaUnavailable), None)
        );
        assert_eq!(choose(&[], &profile), Decision::Drop(DropReason::NoPath));
    }

    #[test]
    fn a_reconsidered_flow_stays_moves_for_the_reason_given_or_takes_a_first_path() {
        let profile = plain(SteeringMode::BestQuality);
        let cands = [cand(1, 0, 0.5), cand(2, 0, 0.45)];
        let stay = reconsider(
            &cands,
            &profile,
            Decision::Send(PathId(1)),
            DECIDED,
            0.2,
            |_| unreachable!("path 1 is a candidate"),
        );
        assert_eq!(
            (stay.decision, stay.moved),
            (Decision::Send(PathId(1)), None)
        );
        // Its path is gone from the candidates: the caller says why.
        let gone = reconsider(
            &cands,
            &profile,
            Decision::Send(PathId(9)),
            DECIDED,
            0.2,
            |id| {
                assert_eq!(id, PathId(9));
                MoveReason::PathRemoved
            },
        );
        assert_eq!(
            (gone.decision, gone.moved),
            (Decision::Send(PathId(2)), Some(MoveReason::PathRemoved))
        );
        // A flow that was dropped is no move when it gets a path.
        let first = reconsider(
            &cands,
            &profile,
            Decision::Drop(DropReason::NoPath),
            DECIDED,
            0.2,
            |_| unreachable!("no path to leave"),
        );
        assert_eq!(
            (first.decision, first.moved),
            (Decision::Send(PathId(2)), None)
        );
    }

    #[test]
    fn a_duplicated_flow_that_stays_gets_a_second_path_disjoint_from_its_own() {
        let profile = plain(SteeringMode::Duplicate);
        // Path 1 (local 7) carries the flow; path 2 is better but within the margin and
        // shares local link 7; path 3 is on local link 8.
        let mut cands = vec![cand(1, 0, 0.5), cand(2, 0, 0.45), cand(3, 0, 0.9)];
        cands[0].local = 7;
        cands[1].local = 7;
        cands[2].local = 8;
        let r = reconsider(
            &cands,
            &profile,
            Decision::Send(PathId(1)),
            DECIDED,
            0.2,
            |_| unreachable!("path 1 is a candidate"),
        );
        assert_eq!(
            (r.decision, r.moved),
            (
                Decision::Duplicate {
                    primary: PathId(1),
                    secondary: PathId(3)
                },
                None
            )
        );
        // Alone, a path carries the flow by itself.
        assert_eq!(choose(&cands[..1], &profile), Decision::Send(PathId(1)));
    }

    #[test]
    fn load_balance_spreads_flows_equally_while_a_capacity_is_unknown() {
        let profile = plain(SteeringMode::LoadBalance);
        let mut cands = vec![cand(1, 0, 0.1), cand(2, 0, 0.2)];
        cands[0].capacity = 100_000;
        for _ in 0..100 {
            let Decision::Send(id) = choose(&cands, &profile) else {
                panic!()
            };
            cands.iter_mut().find(|c| c.id == id).unwrap().flows += 1;
        }
        assert_eq!((cands[0].flows, cands[1].flows), (50, 50));
    }

    #[test]
    fn the_least_bad_path_wins_in_tier_two_whatever_the_mode() {
        let a = cand(1, 2, 3.0);
        let mut b = cand(2, 2, 1.5);
        b.cost = (1, 9000, 400, 4);
        assert_eq!(order(&b, &a, SteeringMode::LowestCost), Ordering::Less);
        assert_eq!(
            order(&cand(3, 0, 0.9), &a, SteeringMode::BestQuality),
            Ordering::Less
        );
    }

    #[test]
    fn a_path_in_hold_down_beats_the_sibling_of_a_path_that_just_went_down() {
        // The flow's path died; path 2 shares its link (fate 2), path 3 is recovering from an
        // earlier failure (tier 1). Regression: the sibling used to win on tier, went Down a
        // detection time later, and the flow lost packets twice.
        let mut sibling = cand(2, 0, 0.1);
        sibling.fate = Fate::Doomed;
        let recovering = cand(3, 1, 0.5);
        assert_eq!(
            choose(&[sibling, recovering], &plain(SteeringMode::BestQuality)),
            Decision::Send(PathId(3))
        );
        // A path that breaks the SLA does not beat it, though: the sibling may well be fine
        // (the dead path may have died at its other end).
        let breaking = cand(4, 2, 1.5);
        assert_eq!(
            choose(&[sibling, breaking], &plain(SteeringMode::BestQuality)),
            Decision::Send(PathId(2))
        );
        // Sharing a link with a path that broke the SLA (fate 1) only orders within a tier.
        let mut dented = cand(5, 0, 0.1);
        dented.fate = Fate::Dented;
        assert_eq!(
            choose(&[dented, recovering], &plain(SteeringMode::BestQuality)),
            Decision::Send(PathId(5))
        );
    }

    #[test]
    fn load_balance_fills_paths_in_proportion_to_capacity() {
        let profile = plain(SteeringMode::LoadBalance);
        let mut cands = vec![cand(1, 0, 0.1), cand(2, 0, 0.2)];
        cands[0].capacity = 100_000;
        cands[1].capacity = 50_000;
        for _ in 0..300 {
            let Decision::Send(id) = choose(&cands, &profile) else {
                panic!()
            };
            cands.iter_mut().find(|c| c.id == id).unwrap().flows += 1;
        }
        assert_eq!((cands[0].flows, cands[1].flows), (200, 100));
    }

    #[test]
    fn duplicate_picks_a_link_disjoint_second_path() {
        let profile = plain(SteeringMode::Duplicate);
        // Paths 1 and 2 share local link 7; path 3 is on local link 8.
        let mut cands = vec![cand(1, 0, 0.1), cand(2, 0, 0.2), cand(3, 0, 0.6)];
        cands[0].local = 7;
        cands[1].local = 7;
        cands[1].remote = 1;
        cands[2].local = 8;
        cands[2].remote = 1;
        assert_eq!(
            choose(&cands, &profile),
            Decision::Duplicate {
                primary: PathId(1),
                secondary: PathId(3)
            }
        );
    }
}
