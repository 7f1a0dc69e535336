//! What edges report (telemetry): path samples, failovers, path events, traffic counters and
//! samples, and their retention.

use std::collections::{BTreeSet, HashMap};

use patronus_api::{FailoverEvent, PathEvent, PathReport};
use serde::{Deserialize, Serialize};

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};
use crate::error::ApiError;

/// How long reported samples are kept.
pub const SAMPLE_RETENTION_S: i64 = 7 * 24 * 3600;
/// How long failovers are kept: rare, and what an operator looks back on after an incident.
pub const FAILOVER_RETENTION_S: i64 = 90 * 24 * 3600;

/// Counters as an edge reports them: totals since its run started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl Totals {
    /// Whether every counter fits the store's integers (at most 2^63 - 1).
    pub fn fits_store(&self) -> bool {
        [
            self.tx_packets,
            self.tx_bytes,
            self.rx_packets,
            self.rx_bytes,
        ]
        .iter()
        .all(|v| i64::try_from(*v).is_ok())
    }

    /// Both summed, each counter at most `u64::MAX`.
    pub fn saturating_add(&self, other: &Totals) -> Totals {
        Totals {
            tx_packets: self.tx_packets.saturating_add(other.tx_packets),
            tx_bytes: self.tx_bytes.saturating_add(other.tx_bytes),
            rx_packets: self.rx_packets.saturating_add(other.rx_packets),
            rx_bytes: self.rx_bytes.saturating_add(other.rx_bytes),
        }
    }

    /// What `self` counts beyond `earlier`, unless some counter of `self` is behind it.
    pub fn checked_sub(&self, earlier: &Totals) -> Option<Totals> {
        Some(Totals {
            tx_packets: self.tx_packets.checked_sub(earlier.tx_packets)?,
            tx_bytes: self.tx_bytes.checked_sub(earlier.tx_bytes)?,
            rx_packets: self.rx_packets.checked_sub(earlier.rx_packets)?,
            rx_bytes: self.rx_bytes.checked_sub(earlier.rx_bytes)?,
        })
    }
}

/// The ids of the links of the sites `names`, by (site name, link name).
pub async fn link_ids(
    conn: &mut Conn,
    names: &BTreeSet<&str>,
) -> Result<HashMap<(String, String), i64>, sqlx::Error> {
    let sql = format!(
        "SELECT l.id, l.name AS link, s.name AS site FROM links l JOIN sites s ON s.id = l.site_id
         WHERE s.name IN ({})",
        vec!["?"; names.len()].join(",")
    );
    let mut query = query(&sql);
    for n in names {
        query = query.bind(*n);
    }
    let mut ids = HashMap::new();
    for r in &query.fetch_all(&mut *conn).await? {
        ids.insert((r.try_get("site")?, r.try_get("link")?), r.try_get("id")?);
    }
    Ok(ids)
}

/// Keeps site `site_id`'s measurements `samples` (path id, report) at `now`: one statement per
/// 500 rows, not one per row (a hub reports thousands of paths at once).
pub async fn insert_samples(
    conn: &mut Conn,
    site_id: i64,
    now: i64,
    samples: &[(&str, &PathReport)],
) -> Result<(), sqlx::Error> {
    for chunk in samples.chunks(500) {
        let sql = format!(
            "INSERT INTO path_samples (path_id, site_id, at_s, state, rtt_ms, jitter_ms, loss_pct)
             VALUES {}",
            vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        let mut q = query(&sql);
        for (path_id, p) in chunk {
            q = q
                .bind(*path_id)
                .bind(site_id)
                .bind(now)
                .bind(p.state.as_str())
                .bind(p.rtt_ms)
                .bind(p.jitter_ms)
                .bind(p.loss_pct);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

fn encode(v: &impl serde::Serialize) -> Result<String, sqlx::Error> {
    serde_json::to_string(v).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// Keeps a failover site `site_id` reported (between the paths `from` and `to`, where known);
/// whether it is new (a report delivered twice is kept once, by its sequence number).
pub async fn insert_failover(
    conn: &mut Conn,
    site_id: i64,
    e: &FailoverEvent,
    (from, to): (&Option<String>, &Option<String>),
) -> Result<bool, sqlx::Error> {
    let r = query(
        "INSERT INTO failover_events
         (site_id, seq, at_ms, peer, from_path, to_path, detail, reason, flows)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(site_id)
    .bind(e.seq as i64)
    .bind(e.at_ms)
    .bind(&e.peer)
    .bind(from)
    .bind(to)
    .bind(encode(e)?)
    .bind(e.reason.as_str())
    .bind(i64::from(e.flows))
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Keeps a path event site `site_id` reported (on `path`, where known); whether it is new.
pub async fn insert_path_event(
    conn: &mut Conn,
    site_id: i64,
    e: &PathEvent,
    path: &Option<String>,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let r = query(
        "INSERT INTO path_events
         (site_id, seq, at_ms, path_id, kind, class, detail, received_s)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(site_id)
    .bind(e.seq as i64)
    .bind(e.at_ms)
    .bind(path)
    .bind(e.kind.as_str())
    .bind(&e.class)
    .bind(encode(e)?)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Rows deleted per statement by [`sweep`]: each delete is its own short write.
pub const SWEEP_BATCH: i64 = 5_000;

/// Deletes what is older than its retention at `now` (unix seconds), [`SWEEP_BATCH`] rows per
/// statement until none is left: the rows deleted, by table. Each batch is a write transaction
/// of its own ([`super::Store::begin`]: the writers' turn), so writers wait for one batch at
/// most, and any number of controllers can sweep at once.
pub async fn sweep(
    store: &super::Store,
    now: i64,
) -> Result<Vec<(&'static str, u64)>, sqlx::Error> {
    let mut out = Vec::new();
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
        // Each table has an index on the time it is swept by.
        let sql = format!(
            "DELETE FROM {table} WHERE id IN
               (SELECT id FROM {table} WHERE {column} < ? ORDER BY id LIMIT {SWEEP_BATCH})"
        );
        let mut deleted = 0;
        loop {
            let mut tx = store.begin().await?;
            let n = query(&sql)
                .bind(before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            deleted += n;
            if n < SWEEP_BATCH as u64 {
                break;
            }
        }
        out.push((table, deleted));
    }
    Ok(out)
}

/// Traffic is kept as one sample per path and class at most this often (seconds): what the
/// reports between say is summed in the counters (`pending`) until then.
pub const TRAFFIC_EVERY_S: i64 = 60;

/// What the store holds for one key (`path:<id>` or `class:<name>`) of a site: the running
/// totals last reported, from the edge run that started at `started_ms` (unix ms), and what was
/// sent since the last sample kept, since `pending_since` (unix s).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub started_ms: i64,
    pub totals: Totals,
    pub pending: Totals,
    pub pending_since: Option<i64>,
}

/// Site `site_id`'s counters, by key.
pub async fn counters(
    conn: &mut Conn,
    site_id: i64,
) -> Result<HashMap<String, Counter>, sqlx::Error> {
    let rows = query("SELECT * FROM traffic_counters WHERE site_id = ?")
        .bind(site_id)
        .fetch_all(&mut *conn)
        .await?;
    let mut before = HashMap::new();
    for r in &rows {
        let n = |k: &str| r.try_get::<i64, _>(k).map(|v| v as u64);
        before.insert(
            r.try_get("key")?,
            Counter {
                started_ms: r.try_get("started_ms")?,
                totals: Totals {
                    tx_packets: n("tx_packets")?,
                    tx_bytes: n("tx_bytes")?,
                    rx_packets: n("rx_packets")?,
                    rx_bytes: n("rx_bytes")?,
                },
                pending: Totals {
                    tx_packets: n("pending_tx_packets")?,
                    tx_bytes: n("pending_tx_bytes")?,
                    rx_packets: n("pending_rx_packets")?,
                    rx_bytes: n("pending_rx_bytes")?,
                },
                pending_since: r.try_get("pending_since")?,
            },
        );
    }
    Ok(before)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Site `site_id`'s counter for `key`.
pub async fn set_counter(
    conn: &mut Conn,
    site_id: i64,
    key: &str,
    c: &Counter,
) -> Result<(), sqlx::Error> {
    query(
        "INSERT INTO traffic_counters
         (site_id, key, started_ms, tx_packets, tx_bytes, rx_packets, rx_bytes,
          pending_tx_packets, pending_tx_bytes, pending_rx_packets, pending_rx_bytes,
          pending_since)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (site_id, key) DO UPDATE SET started_ms = excluded.started_ms,
           tx_packets = excluded.tx_packets, tx_bytes = excluded.tx_bytes,
           rx_packets = excluded.rx_packets, rx_bytes = excluded.rx_bytes,
           pending_tx_packets = excluded.pending_tx_packets,
           pending_tx_bytes = excluded.pending_tx_bytes,
           pending_rx_packets = excluded.pending_rx_packets,
           pending_rx_bytes = excluded.pending_rx_bytes,
           pending_since = excluded.pending_since",
    )
    .bind(site_id)
    .bind(key)
    .bind(c.started_ms)
    .bind(int(c.totals.tx_packets))
    .bind(int(c.totals.tx_bytes))
    .bind(int(c.totals.rx_packets))
    .bind(int(c.totals.rx_bytes))
    .bind(int(c.pending.tx_packets))
    .bind(int(c.pending.tx_bytes))
    .bind(int(c.pending.rx_packets))
    .bind(int(c.pending.rx_bytes))
    .bind(c.pending_since)
    .execute(&mut *conn)
    .await
    .map(|_| ())
}

/// The path id and class of a counter's key, as a sample holds them (SQL, over `key`).
const KEY_PATH: &str = "CASE WHEN key LIKE 'path:%' THEN substr(key, 6) END";
const KEY_CLASS: &str = "CASE WHEN key LIKE 'class:%' THEN substr(key, 7) END";

/// Keeps as samples the traffic pending since `before` (unix s) or earlier, of every site: what
/// edges that stopped reporting (or report nothing new) left in the counters. One transaction
/// (`tx`, a write): the rows written and emptied are the same. The samples kept.
pub async fn flush_traffic(tx: &mut Conn, before: i64) -> Result<u64, sqlx::Error> {
    let kept = query(&format!(
        "INSERT INTO traffic_samples
         (site_id, at_s, path_id, class, tx_packets, tx_bytes, rx_packets, rx_bytes)
         SELECT site_id, pending_since, {KEY_PATH}, {KEY_CLASS}, pending_tx_packets,
                pending_tx_bytes, pending_rx_packets, pending_rx_bytes
         FROM traffic_counters WHERE pending_since IS NOT NULL AND pending_since <= ?"
    ))
    .bind(before)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    query(
        "UPDATE traffic_counters SET pending_tx_packets = 0, pending_tx_bytes = 0,
           pending_rx_packets = 0, pending_rx_bytes = 0, pending_since = NULL
         WHERE pending_since IS NOT NULL AND pending_since <= ?",
    )
    .bind(before)
    .execute(&mut *tx)
    .await?;
    Ok(kept)
}

/// Keeps what site `site_id` sent since its previous report, on a path or in a class.
pub async fn insert_traffic(
    conn: &mut Conn,
    site_id: i64,
    now: i64,
    (path, class): (Option<&str>, Option<&str>),
    delta: &Totals,
) -> Result<(), sqlx::Error> {
    query(
        "INSERT INTO traffic_samples
         (site_id, at_s, path_id, class, tx_packets, tx_bytes, rx_packets, rx_bytes)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(site_id)
    .bind(now)
    .bind(path)
    .bind(class)
    .bind(int(delta.tx_packets))
    .bind(int(delta.tx_bytes))
    .bind(int(delta.rx_packets))
    .bind(int(delta.rx_bytes))
    .execute(&mut *conn)
    .await
    .map(|_| ())
}

/// What was sent (and, for paths and sites, received) in one bucket.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrafficBucket {
    /// Unix seconds at which the bucket starts.
    pub start: i64,
    pub site_id: i64,
    pub site: String,
    /// With `by=path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_id: Option<String>,
    /// With `by=class`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Sums over the bucket, summed as floating point so that no report can make them
    /// overflow: exact up to 2^53 (9 PB) per bucket, and never more than 2^64 - 1.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Not measured per class: `null` there.
    pub rx_packets: Option<u64>,
    pub rx_bytes: Option<u64>,
}

/// A page of traffic buckets (`bucket` seconds each, in `[from, to)`), `by` `class`, `path` or
/// `site`, of `site`, `path` or `class` if given, and how many there are.
pub async fn traffic(
    conn: &mut Conn,
    by: &str,
    (bucket, from, to): (i64, i64, i64),
    (site, path, class): (Option<i64>, Option<&str>, Option<&str>),
    (limit, offset): (i64, i64),
) -> Result<(Vec<TrafficBucket>, i64), ApiError> {
    let (key, kind) = match by {
        "class" => ("t.class", "t.class IS NOT NULL"),
        "path" => ("t.path_id", "t.path_id IS NOT NULL"),
        _ => ("NULL", "t.path_id IS NOT NULL"),
    };
    let grouped = format!(
        "SELECT (t.at_s / ?1) * ?1 AS start, t.site_id, s.name AS site, {key} AS k,
                {} AS tx_packets, {} AS tx_bytes, {} AS rx_packets, {} AS rx_bytes
         FROM (SELECT site_id, at_s, path_id, class, tx_packets, tx_bytes, rx_packets,
                      rx_bytes
               FROM traffic_samples
               UNION ALL
               SELECT site_id, pending_since, {KEY_PATH}, {KEY_CLASS}, pending_tx_packets,
                      pending_tx_bytes, pending_rx_packets, pending_rx_bytes
               FROM traffic_counters WHERE pending_since IS NOT NULL) t
         JOIN sites s ON s.id = t.site_id
         WHERE t.at_s >= ?2 AND t.at_s < ?3 AND {kind}
           AND (?4 IS NULL OR t.site_id = ?4)
           AND (?5 IS NULL OR t.path_id = ?5)
           AND (?6 IS NULL OR t.class = ?6)
         GROUP BY start, t.site_id, s.name, k",
        float_sum("t.tx_packets"),
        float_sum("t.tx_bytes"),
        float_sum("t.rx_packets"),
        float_sum("t.rx_bytes"),
    );
    let total: i64 = query_scalar(&format!("SELECT COUNT(*) FROM ({grouped}) AS g"))
        .bind(bucket)
        .bind(from)
        .bind(to)
        .bind(site)
        .bind(path)
        .bind(class)
        .fetch_one(&mut *conn)
        .await?;
    let rows = query(&format!(
        "{grouped} ORDER BY start, t.site_id, k LIMIT ?7 OFFSET ?8"
    ))
    .bind(bucket)
    .bind(from)
    .bind(to)
    .bind(site)
    .bind(path)
    .bind(class)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            let k: Option<String> = r.try_get("k")?;
            let per_class = by == "class";
            Ok(TrafficBucket {
                start: r.try_get("start")?,
                site_id: r.try_get("site_id")?,
                site: r.try_get("site")?,
                path_id: if by == "path" { k.clone() } else { None },
                class: if per_class { k } else { None },
                tx_packets: sum(r, "tx_packets")?,
                tx_bytes: sum(r, "tx_bytes")?,
                rx_packets: (!per_class).then(|| sum(r, "rx_packets")).transpose()?,
                rx_bytes: (!per_class).then(|| sum(r, "rx_bytes")).transpose()?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok((items, total))
}

/// The sum of integer column `col` as a float, 0 when there are no rows (SQLite's `TOTAL`,
/// written so that both backends run it).
fn float_sum(col: &str) -> String {
    format!("COALESCE(SUM(CAST({col} AS DOUBLE PRECISION)), 0.0)")
}

/// A [`float_sum`] column as a count: a float sum (SQLite's `SUM` of integers fails on overflow),
/// rounded, never negative, saturating at `u64::MAX`.
fn sum(r: &Row, column: &str) -> Result<u64, sqlx::Error> {
    let v: f64 = r.try_get(column)?;
    // `as` from f64 saturates (and maps NaN to 0).
    Ok(v.round().max(0.0) as u64)
}
