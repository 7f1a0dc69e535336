//! `/api/v1/edge/telemetry`: what an edge measured, its events and its traffic counters.

use axum::extract::State;
use axum::http::StatusCode;
use patronus_api::PathEventKind;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::error::{ApiError, extract};
use crate::routes::edge::SiteCaller;
use crate::store::now_s;
use crate::store::telemetry::{self, Totals};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(edge_telemetry))
}

pub use crate::store::telemetry::{FAILOVER_RETENTION_S, SAMPLE_RETENTION_S};

#[utoipa::path(
    post,
    path = "/api/v1/edge/telemetry",
    tag = "enrolment",
    summary = "The calling edge reports its paths' measurements (site credential).",
    request_body = patronus_api::Telemetry,
    security(("site" = [])),
    responses((status = 204, description = "Recorded"))
)]
async fn edge_telemetry(
    State(s): State<AppState>,
    site: SiteCaller,
    headers: axum::http::HeaderMap,
    extract::Json(t): extract::Json<patronus_api::Telemetry>,
) -> Result<StatusCode, ApiError> {
    let _heard = s.heard_from(site.site_id);
    if t.paths.len() > 4096 {
        return Err(ApiError::field("paths", "at most 4096 paths per report"));
    }
    if t.classes.len() > 256 {
        return Err(ApiError::field("classes", "at most 256 classes per report"));
    }
    if t.path_events.len() > 1024 {
        return Err(ApiError::field(
            "path_events",
            "at most 1024 events per report",
        ));
    }
    if t.failovers.len() > 1024 {
        return Err(ApiError::field(
            "failovers",
            "at most 1024 events per report",
        ));
    }
    // Link ids by (site name, link name), of the reporter and the peers it names only.
    let mut names: std::collections::BTreeSet<&str> =
        t.paths.iter().map(|p| p.peer.as_str()).collect();
    names.extend(t.failovers.iter().map(|e| e.peer.as_str()));
    names.extend(t.path_events.iter().map(|e| e.peer.as_str()));
    names.insert(site.site.as_str());
    let ids = telemetry::link_ids(&mut *s.store.conn().await?, &names).await?;
    // The id of the path between this site's `local` link and `peer`'s `remote` link, if the
    // controller knows both (a report may name a configuration it no longer has).
    let path_of = |local: &str, peer: &str, remote: &str| {
        Some(crate::routes::topology::path_id(
            *ids.get(&(site.site.clone(), local.to_owned()))?,
            *ids.get(&(peer.to_owned(), remote.to_owned()))?,
        ))
    };
    let now = now_s();
    // Counters must fit the store's integers: a count beyond them is a broken edge, not traffic.
    let mut e = patronus_api::FieldErrors::default();
    let big = |v: u64| i64::try_from(v).is_err();
    for (i, p) in t.paths.iter().enumerate() {
        for (name, v) in [
            ("tx_bytes", p.tx_bytes),
            ("rx_bytes", p.rx_bytes),
            ("tx_packets", p.tx_packets),
            ("rx_packets", p.rx_packets),
        ] {
            if big(v) {
                e.push(format!("paths[{i}].{name}"), "must be at most 2^63 - 1");
            }
        }
    }
    for (i, c) in t.classes.iter().enumerate() {
        for (name, v) in [("tx_bytes", c.tx_bytes), ("tx_packets", c.tx_packets)] {
            if big(v) {
                e.push(format!("classes[{i}].{name}"), "must be at most 2^63 - 1");
            }
        }
    }
    for (i, ev) in t.failovers.iter().enumerate() {
        if big(ev.seq) {
            e.push(format!("failovers[{i}].seq"), "must be at most 2^63 - 1");
        }
    }
    for (i, ev) in t.path_events.iter().enumerate() {
        if big(ev.seq) {
            e.push(format!("path_events[{i}].seq"), "must be at most 2^63 - 1");
        }
    }
    e.into_result().map_err(ApiError::validation)?;
    let mut samples = Vec::new();
    for (i, p) in t.paths.iter().enumerate() {
        let finite = |v: f64| v.is_finite() && v >= 0.0;
        if !finite(p.jitter_ms) || !finite(p.loss_pct) || p.rtt_ms.is_some_and(|r| !finite(r)) {
            return Err(ApiError::field(
                &format!("paths[{i}]"),
                "measurements must be finite and >= 0",
            ));
        }
        // A path of a configuration the controller no longer has: not an error.
        if let Some(id) = path_of(&p.local_link, &p.peer, &p.remote_link) {
            samples.push((id, p));
        }
    }
    let mut events = Vec::new();
    {
        let mut live = s.live.lock().unwrap_or_else(|e| e.into_inner());
        for (id, p) in &samples {
            live.insert(
                id.clone(),
                crate::app::LivePath {
                    state: p.state,
                    rtt_ms: p.rtt_ms,
                    jitter_ms: p.jitter_ms,
                    loss_pct: p.loss_pct,
                    relayed: p.relayed,
                    at: now,
                },
            );
        }
    }
    // The history keeps what says something new (see `crate::sampling`); the live view above
    // has every report.
    let keep = s.sampler.select(site.site_id, now, &samples);
    let kept: Vec<_> = samples
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|((id, p), _)| (id.as_str(), *p))
        .collect();
    let mut tx = s.store.begin().await?;
    telemetry::insert_samples(&mut tx, site.site_id, now, &kept).await?;
    for e in &t.failovers {
        // A report delivered twice (an answer lost on the way back) is kept once.
        let (from, to) = (
            path_of(&e.from_local_link, &e.peer, &e.from_remote_link),
            path_of(&e.to_local_link, &e.peer, &e.to_remote_link),
        );
        let new = telemetry::insert_failover(&mut tx, site.site_id, e, (&from, &to)).await?;
        if new {
            events.push((
                crate::webhooks::EventKind::Failover,
                json!({
                    "site": site.site,
                    "peer": e.peer,
                    "at_ms": e.at_ms,
                    "reason": e.reason,
                    "flows": e.flows,
                    "from": format!("{}>{}", e.from_local_link, e.from_remote_link),
                    "to": format!("{}>{}", e.to_local_link, e.to_remote_link),
                    "from_path_id": from,
                    "to_path_id": to,
                }),
            ));
        }
    }
    // Each end's view of a path changing, at the moment it saw it: kept once (a report may
    // come twice), and told to webhooks (down, up again, breaking an SLA).
    for e in &t.path_events {
        let path = path_of(&e.local_link, &e.peer, &e.remote_link);
        let new = telemetry::insert_path_event(&mut tx, site.site_id, e, &path, now).await?;
        let kind = match e.kind {
            PathEventKind::Down => crate::webhooks::EventKind::PathDown,
            PathEventKind::Up => crate::webhooks::EventKind::PathUp,
            PathEventKind::SlaViolated => crate::webhooks::EventKind::SlaViolated,
            PathEventKind::SlaRestored | PathEventKind::Unknown => continue,
        };
        if new {
            events.push((
                kind,
                json!({
                    "path_id": path,
                    "reported_by": site.site,
                    "at_ms": e.at_ms,
                    "from": format!("{}/{}", site.site, e.local_link),
                    "to": format!("{}/{}", e.peer, e.remote_link),
                    "class": e.class,
                    "rtt_ms": e.rtt_ms,
                    "jitter_ms": e.jitter_ms,
                    "loss_pct": e.loss_pct,
                    "silent_ms": e.silent_ms,
                    "flows": e.flows,
                }),
            ));
        }
    }
    record_traffic(&mut tx, site.site_id, now, &t, &samples).await?;
    // Told to webhooks with the same transaction that keeps them: an event is announced if and
    // only if it was kept.
    crate::webhooks::queue(&mut tx, events, None).await?;
    // The version of Patronus the edge runs, as its User-Agent says (kept for the sites' view).
    if let Some(v) = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::store::presence::version_of)
    {
        crate::store::presence::set_version(&mut tx, site.site_id, v).await?;
    }
    tx.commit().await?;
    s.sampler.kept(site.site_id, now, &samples, &keep);
    Ok(StatusCode::NO_CONTENT)
}

/// Turns the report's running totals into what was sent since the previous report (kept per
/// site and key in `traffic_counters`, so that a report delivered twice adds nothing and a
/// restarted controller loses nothing), sums it there, and keeps the sum as a sample once a
/// minute ([`telemetry::TRAFFIC_EVERY_S`]; the housekeeping keeps what edges that went quiet
/// left). Reads of the traffic add what is pending: nothing waits to be seen.
async fn record_traffic(
    tx: &mut crate::store::Tx,
    site_id: i64,
    now: i64,
    t: &patronus_api::Telemetry,
    samples: &[(String, &patronus_api::PathReport)],
) -> Result<(), ApiError> {
    let mut current: Vec<(String, Option<&str>, Option<&str>, Totals)> = Vec::new();
    for (id, p) in samples {
        current.push((
            format!("path:{id}"),
            Some(id.as_str()),
            None,
            Totals {
                tx_packets: p.tx_packets,
                tx_bytes: p.tx_bytes,
                rx_packets: p.rx_packets,
                rx_bytes: p.rx_bytes,
            },
        ));
    }
    for c in &t.classes {
        current.push((
            format!("class:{}", c.class),
            None,
            Some(c.class.as_str()),
            Totals {
                tx_packets: c.tx_packets,
                tx_bytes: c.tx_bytes,
                ..Totals::default()
            },
        ));
    }
    if current.is_empty() {
        return Ok(());
    }
    let before = telemetry::counters(tx, site_id).await?;
    let mut seen = std::collections::HashSet::new();
    let zero = Totals::default();
    for (key, path, class, cur) in current {
        // A key named twice in one report counts once.
        if !seen.insert(key.clone()) {
            continue;
        }
        let prev = before.get(&key).copied().unwrap_or_default();
        let known = before.contains_key(&key);
        // What was sent since the totals kept, and the totals to keep.
        let (delta, started_ms, totals) = if known && prev.started_ms == t.started_ms {
            match cur.checked_sub(&prev.totals) {
                // The same run: what it sent since.
                Some(d) => (d, t.started_ms, cur),
                // A late report, older than the totals kept: it adds nothing.
                None => (zero, prev.started_ms, prev.totals),
            }
        } else {
            // A new run of the edge (or the first report): all of it is new.
            (cur, t.started_ms, cur)
        };
        // Summed with what is pending (from this run or the one before: nothing is lost when
        // the edge restarts), and kept as a sample once a minute.
        let mut c = telemetry::Counter {
            started_ms,
            totals,
            pending: prev.pending.saturating_add(&delta),
            pending_since: prev.pending_since.or((delta != zero).then_some(now)),
        };
        // A sum beyond the store's integers: what was pending is kept first, on its own.
        if !c.pending.fits_store() {
            if let Some(since) = prev.pending_since {
                telemetry::insert_traffic(tx, site_id, since, (path, class), &prev.pending).await?;
            }
            c.pending = delta;
            c.pending_since = (delta != zero).then_some(now);
        }
        let due = c
            .pending_since
            .filter(|since| now - since >= telemetry::TRAFFIC_EVERY_S);
        if let Some(since) = due {
            telemetry::insert_traffic(tx, site_id, since, (path, class), &c.pending).await?;
            c.pending = zero;
            c.pending_since = None;
        }
        if !known || c != prev {
            telemetry::set_counter(tx, site_id, &key, &c).await?;
        }
    }
    Ok(())
}
