//! Whether each site's edge is online: what this controller hears of its own edges, written to
//! the database every few seconds ([`run`]), where every controller over it reads it and makes
//! the `site.online` and `site.offline` announcements once ([`crate::store::presence`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use crate::app::AppState;
use crate::store::presence::{self as store, ONLINE_WITHIN_MS};
use crate::store::{Conn, now_ms};
use crate::webhooks::EventKind;

/// How often a controller writes what it heard and looks for announcements due.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// An edge holding a request open is written again once that is this much newer than what was
/// written: at most this plus [`FLUSH_EVERY`] (7 s) behind in the database, well inside
/// [`ONLINE_WITHIN_MS`], and a thousand long-polling edges cost 200 rows a second, not a write
/// per request. An edge with nothing open has its last contact written as it was.
pub const REWRITE_AFTER_MS: i64 = 5_000;

/// What this controller has heard of a site's edge since it started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heard {
    /// Unix ms.
    pub last_seen: i64,
    /// Requests in progress (a waiting long poll is one).
    pub open: u32,
    /// The `last_seen` last written to the database.
    written: i64,
}

impl Heard {
    /// When the edge was last heard from: now, while one of its requests is open.
    fn at(&self, now: i64) -> i64 {
        if self.open > 0 { now } else { self.last_seen }
    }
}

impl AppState {
    /// Records that site `id`'s edge is in touch; the guard marks the end of its request. A
    /// site this controller had not heard from lately is written at once, so that it is
    /// announced online without waiting for the next round.
    pub fn heard_from(&self, id: i64) -> HeardGuard {
        let now = now_ms();
        let mut p = self.presence.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(id).or_default();
        let fresh = e.open == 0 && now - e.last_seen > ONLINE_WITHIN_MS;
        e.last_seen = now;
        e.open += 1;
        drop(p);
        if fresh {
            self.presence_wake.notify_one();
        }
        HeardGuard {
            state: self.clone(),
            id,
        }
    }

    /// Whether each of `ids`' edges is online, and when it was last heard from (unix s), by
    /// this controller or any other over the database. A site never heard from is absent.
    pub async fn presence_of(
        &self,
        conn: &mut Conn,
        ids: &[i64],
    ) -> Result<HashMap<i64, (bool, i64)>, sqlx::Error> {
        let mut seen = store::last_seen(conn, ids).await?;
        // In the database's time, as what other controllers wrote.
        let offset = self.clock_offset_ms.load(Ordering::Relaxed);
        let local_now = now_ms();
        let now = local_now + offset;
        {
            let p = self.presence.lock().unwrap_or_else(|e| e.into_inner());
            for id in ids {
                if let Some(h) = p.get(id) {
                    let at = h.at(local_now) + offset;
                    let e = seen.entry(*id).or_insert(at);
                    *e = (*e).max(at);
                }
            }
        }
        Ok(seen
            .into_iter()
            .map(|(id, at)| (id, (now - at <= ONLINE_WITHIN_MS, at / 1000)))
            .collect())
    }

    /// What this controller heard since it last wrote, to be written now.
    fn unwritten(&self, now: i64) -> Vec<(i64, i64)> {
        let mut p = self.presence.lock().unwrap_or_else(|e| e.into_inner());
        let out = p
            .iter_mut()
            .filter_map(|(id, h)| {
                let at = h.at(now);
                // First heard; heard on, and far enough ahead of the database; or gone quiet
                // (nothing open) since the last write, whose last contact is written as it was.
                let due = h.written == 0
                    || at >= h.written + REWRITE_AFTER_MS
                    || (h.open == 0 && h.last_seen > h.written);
                due.then(|| {
                    h.written = at;
                    (*id, at)
                })
            })
            .collect();
        // Edges gone quiet here (written, nothing open, long past): the database has all there
        // is to say of them.
        p.retain(|_, h| h.open > 0 || now - h.last_seen <= 2 * ONLINE_WITHIN_MS);
        out
    }
}

/// Ends an edge's request in [`AppState::heard_from`]'s count (however the request ends).
#[derive(Debug)]
pub struct HeardGuard {
    state: AppState,
    id: i64,
}

impl Drop for HeardGuard {
    fn drop(&mut self) {
        let mut p = self
            .state
            .presence
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = p.get_mut(&self.id) {
            e.open = e.open.saturating_sub(1);
            e.last_seen = now_ms();
        }
    }
}

/// Every [`FLUSH_EVERY`] (sooner for an edge newly heard from): what this controller heard is
/// written, and the announcements due are made, each by one controller. Call once, inside the
/// runtime.
pub async fn run(state: AppState) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.presence_wake.notified() => {}
        }
        if let Err(e) = flush(&state).await {
            tracing::warn!(error = %e, "edge presence not written");
        }
    }
}

/// One round of [`run`]: returns the announcements it made. Times are written and compared in
/// the database's clock, so that controllers whose clocks disagree still agree on who is
/// online.
pub async fn flush(state: &AppState) -> Result<usize, sqlx::Error> {
    let local_now = now_ms();
    let now = state.store.clock_ms().await?;
    let offset = now - local_now;
    state.clock_offset_ms.store(offset, Ordering::Relaxed);
    let heard: Vec<(i64, i64)> = state
        .unwritten(local_now)
        .into_iter()
        .map(|(id, at)| (id, at + offset))
        .collect();
    // The contacts, in one statement on their own: each row moves forward atomically, so this
    // takes no write lock (a thousand edges' refreshes hold up no one's writes).
    if !heard.is_empty() {
        let written = async { store::record(&mut *state.store.conn().await?, &heard).await }.await;
        if let Err(e) = written {
            // Written next round instead.
            let mut p = state.presence.lock().unwrap_or_else(|e| e.into_inner());
            for (id, _) in &heard {
                if let Some(h) = p.get_mut(id) {
                    h.written = 0;
                }
            }
            return Err(e);
        }
    }
    // The announcements, under the write lock with the events they queue, only when some are
    // due (a read finds out).
    if !store::any_due(&mut *state.store.conn().await?, now).await? {
        return Ok(0);
    }
    let mut tx = state.store.begin().await?;
    let changed = store::transitions(&mut tx, now).await?;
    let events = changed
        .iter()
        .map(|t| {
            if t.online {
                (
                    EventKind::SiteOnline,
                    json!({ "site_id": t.site_id, "site": t.site }),
                )
            } else {
                (
                    EventKind::SiteOffline,
                    json!({ "site_id": t.site_id, "site": t.site, "last_seen": t.last_seen }),
                )
            }
        })
        .collect();
    crate::webhooks::queue(&mut tx, events, None).await?;
    tx.commit().await?;
    Ok(changed.len())
}
