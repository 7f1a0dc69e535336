//! `/api/v1/edge/telemetry`: what an edge measured, its events and its traffic counters.

use axum::extract::State;
use axum::http::StatusCode;
use patronus_api::PathEventKind;
use serde_json::json;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::error::{ApiError, extract};
use crate::routes::edge::SiteCaller;
use crate::store::now_s;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(edge_telemetry))
}

/// How long reported samples are kept.
pub const SAMPLE_RETENTION_S: i64 = 7 * 24 * 3600;
/// How long failovers are kept: rare, and what an operator looks back on after an incident.
pub const FAILOVER_RETENTION_S: i64 = 90 * 24 * 3600;

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
    extract::Json(t): extract::Json<patronus_api::Telemetry>,
) -> Result<StatusCode, ApiError> {
    let _heard = s.heard_from(site.site_id, &site.site);
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
    let sql = format!(
        "SELECT l.id, l.name AS link, s.name AS site FROM links l JOIN sites s ON s.id = l.site_id
         WHERE s.name IN ({})",
        vec!["?"; names.len()].join(",")
    );
    let mut query = sqlx::query(&sql);
    for n in &names {
        query = query.bind(*n);
    }
    let rows = query.fetch_all(s.store.pool()).await?;
    let mut ids: std::collections::HashMap<(String, String), i64> = Default::default();
    for r in &rows {
        ids.insert((r.try_get("site")?, r.try_get("link")?), r.try_get("id")?);
    }
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
                    at: now,
                },
            );
        }
    }
    let mut tx = s.store.begin().await?;
    for (id, p) in &samples {
        sqlx::query(
            "INSERT INTO path_samples (path_id, site_id, at_s, state, rtt_ms, jitter_ms, loss_pct)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(site.site_id)
        .bind(now)
        .bind(p.state.as_str())
        .bind(p.rtt_ms)
        .bind(p.jitter_ms)
        .bind(p.loss_pct)
        .execute(&mut *tx)
        .await?;
    }
    for e in &t.failovers {
        // A report delivered twice (an answer lost on the way back) is kept once.
        let (from, to) = (
            path_of(&e.from_local_link, &e.peer, &e.from_remote_link),
            path_of(&e.to_local_link, &e.peer, &e.to_remote_link),
        );
        let new = sqlx::query(
            "INSERT OR IGNORE INTO failover_events
             (site_id, seq, at_ms, peer, from_path, to_path, detail, reason, flows)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(site.site_id)
        .bind(e.seq as i64)
        .bind(e.at_ms)
        .bind(&e.peer)
        .bind(&from)
        .bind(&to)
        .bind(serde_json::to_string(e).map_err(ApiError::internal)?)
        .bind(e.reason.as_str())
        .bind(i64::from(e.flows))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
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
        let new = sqlx::query(
            "INSERT OR IGNORE INTO path_events
             (site_id, seq, at_ms, path_id, kind, class, detail, received_s)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(site.site_id)
        .bind(e.seq as i64)
        .bind(e.at_ms)
        .bind(&path)
        .bind(e.kind.as_str())
        .bind(&e.class)
        .bind(serde_json::to_string(e).map_err(ApiError::internal)?)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
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
    // Retention: what is older goes, a little at a time.
    for (table, column, before) in [
        ("path_samples", "at_s", now - SAMPLE_RETENTION_S),
        ("traffic_samples", "at_s", now - SAMPLE_RETENTION_S),
        ("path_events", "received_s", now - SAMPLE_RETENTION_S),
        (
            "failover_events",
            "at_ms",
            (now - FAILOVER_RETENTION_S) * 1000,
        ),
    ] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE id IN
               (SELECT id FROM {table} WHERE {column} < ? ORDER BY id LIMIT 1000)"
        ))
        .bind(before)
        .execute(&mut *tx)
        .await?;
    }
    // Told to webhooks with the same transaction that keeps them: an event is announced if and
    // only if it was kept.
    crate::webhooks::queue(&mut tx, events, None).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Counters as an edge reports them: totals since its run started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
}

impl Totals {
    /// What `self` counts beyond `earlier`, unless some counter of `self` is behind it.
    fn checked_sub(&self, earlier: &Totals) -> Option<Totals> {
        Some(Totals {
            tx_packets: self.tx_packets.checked_sub(earlier.tx_packets)?,
            tx_bytes: self.tx_bytes.checked_sub(earlier.tx_bytes)?,
            rx_packets: self.rx_packets.checked_sub(earlier.rx_packets)?,
            rx_bytes: self.rx_bytes.checked_sub(earlier.rx_bytes)?,
        })
    }
}

/// Turns the report's running totals into what was sent since the previous report (kept per
/// site and key in `traffic_counters`, so that a report delivered twice adds nothing and a
/// restarted controller loses nothing), and keeps the differences that are not zero as
/// samples.
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
    let rows = sqlx::query("SELECT * FROM traffic_counters WHERE site_id = ?")
        .bind(site_id)
        .fetch_all(&mut **tx)
        .await?;
    let mut before: std::collections::HashMap<String, (i64, Totals)> = Default::default();
    for r in &rows {
        let n = |k: &str| r.try_get::<i64, _>(k).map(|v| v as u64);
        before.insert(
            r.try_get("key")?,
            (
                r.try_get("started_ms")?,
                Totals {
                    tx_packets: n("tx_packets")?,
                    tx_bytes: n("tx_bytes")?,
                    rx_packets: n("rx_packets")?,
                    rx_bytes: n("rx_bytes")?,
                },
            ),
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (key, path, class, cur) in current {
        // A key named twice in one report counts once.
        if !seen.insert(key.clone()) {
            continue;
        }
        // The totals counted so far in this same run of the edge, if any.
        let counted = before
            .get(&key)
            .filter(|(started, _)| *started == t.started_ms)
            .map(|(_, b)| b);
        let delta = match counted {
            // The same run: what it sent since; nothing, from a late report older than that.
            Some(b) => match cur.checked_sub(b) {
                Some(d) if d != Totals::default() => d,
                _ => continue,
            },
            // A new run of the edge (or the first report): all of it is new.
            None => cur,
        };
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO traffic_counters
             (site_id, key, started_ms, tx_packets, tx_bytes, rx_packets, rx_bytes)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (site_id, key) DO UPDATE SET started_ms = excluded.started_ms,
               tx_packets = excluded.tx_packets, tx_bytes = excluded.tx_bytes,
               rx_packets = excluded.rx_packets, rx_bytes = excluded.rx_bytes",
        )
        .bind(site_id)
        .bind(&key)
        .bind(t.started_ms)
        .bind(i(cur.tx_packets))
        .bind(i(cur.tx_bytes))
        .bind(i(cur.rx_packets))
        .bind(i(cur.rx_bytes))
        .execute(&mut **tx)
        .await?;
        if delta == Totals::default() {
            continue;
        }
        sqlx::query(
            "INSERT INTO traffic_samples
             (site_id, at_s, path_id, class, tx_packets, tx_bytes, rx_packets, rx_bytes)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(site_id)
        .bind(now)
        .bind(path)
        .bind(class)
        .bind(i(delta.tx_packets))
        .bind(i(delta.tx_bytes))
        .bind(i(delta.rx_packets))
        .bind(i(delta.rx_bytes))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
