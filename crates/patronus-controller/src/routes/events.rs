//! `GET /api/v1/events/stream`: the events webhooks are sent (path down and up, SLA breaches,
//! failovers, sites online and offline, configuration changes), live, as server-sent events.
//!
//! Every event is kept in the store, numbered in commit order, in the transaction that made it
//! ([`crate::webhooks::queue`]); a stream reads them in that order. Its `id:` is that number,
//! so a client that reconnects with `Last-Event-ID` (browsers' `EventSource` does it by
//! itself) gets every event it missed, as long as the store keeps them
//! ([`crate::webhooks::RETENTION_MS`]); when it no longer does, an `event: gap` says so first.
//! One reader per controller (the tail) reads new events from the store when this controller
//! commits some, and every second anyway (those of other controllers on the same PostgreSQL),
//! prepares each once (its frame for admins, its frame for the others, the sites it concerns)
//! and hands it to every stream; a stream reads the store itself only to catch up (from
//! `Last-Event-ID`, or when it fell more than [`TAIL_CAPACITY`] events behind). A stream ends
//! after [`MAX_STREAM`] (the client reconnects with its credentials, still valid or not) and
//! when the controller stops.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{AppState, Principal};
use crate::auth::Role;
use crate::error::{ApiError, extract};
use crate::store::webhooks::{StoredEvent, event_bounds, events_after};
use crate::webhooks::EventKind;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(stream))
}

/// How long one stream lasts before the controller ends it (the client reconnects, and is
/// authenticated again).
pub const MAX_STREAM: Duration = Duration::from_secs(300);
/// A comment line after this long without an event, so that proxies and clients see the
/// connection alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often a stream reads the store without being woken (events of other controllers).
const RECHECK: Duration = Duration::from_secs(1);
/// Streams one controller serves at once.
pub const MAX_STREAMS: usize = 1024;
/// Events read from the store at a time.
const BATCH: i64 = 256;
/// Events the tail holds for streams that have not taken them yet; a stream further behind
/// catches up from the store.
pub const TAIL_CAPACITY: usize = 1024;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Only these kinds, comma-separated (`path.down,path.up,sla.violated,failover,
    /// site.online,site.offline,config.changed,backup.failed`).
    pub kind: Option<String>,
    /// Only events about this site (either end of a path, the site of a failover or of a
    /// presence change).
    pub site: Option<String>,
    /// Resume after this event number, as `Last-Event-ID` does (which wins when both are
    /// given).
    pub after: Option<i64>,
}

/// What a stream sends.
struct Filter {
    kinds: Option<Vec<EventKind>>,
    site: Option<String>,
    admin: bool,
}

/// What the tail hands to the streams.
#[derive(Debug)]
pub enum Tail {
    Event(Prepared),
    /// The store's newest event is older than the tail's position: the store was restored
    /// (its events numbered anew). Streams end; their clients reconnect and are told of the gap.
    WentBack,
}

/// One event as the streams send it, prepared once for all of them.
#[derive(Debug)]
pub struct Prepared {
    id: i64,
    kind: EventKind,
    /// The frame for admins, and the one for the others (without who made a change: the audit
    /// log's, which only admins read).
    full: Bytes,
    redacted: Bytes,
    /// The sites the event is about.
    sites: Vec<String>,
}

impl Prepared {
    /// `None` for an event this build cannot read (a newer controller's kind).
    fn new(e: &StoredEvent) -> Option<Self> {
        let kind: EventKind = serde_json::from_value(Value::String(e.kind.clone())).ok()?;
        let mut payload: Value = serde_json::from_str(&e.payload).ok()?;
        let frame = |p: &Value| {
            Bytes::from(format!(
                "id: {}\nevent: {}\ndata: {p}\n\n",
                e.id,
                kind.as_str()
            ))
        };
        let full = frame(&payload);
        let sites = sites_of(&payload["data"]);
        redact(&mut payload);
        Some(Self {
            id: e.id,
            kind,
            full,
            redacted: frame(&payload),
            sites,
        })
    }
}

/// The sites an event's data is about.
fn sites_of(data: &Value) -> Vec<String> {
    let mut sites = Vec::new();
    for k in ["site", "reported_by", "peer"] {
        if let Some(v) = data[k].as_str() {
            sites.push(v.to_owned());
        }
    }
    for k in ["from", "to"] {
        if let Some((site, _)) = data[k].as_str().and_then(|v| v.split_once('/')) {
            sites.push(site.to_owned());
        }
    }
    sites
}

/// An event's payload as those who do not read the audit log see it: without who made a change.
fn redact(payload: &mut Value) {
    if let Some(d) = payload["data"].as_object_mut() {
        d.remove("actor");
        d.remove("request_id");
    }
}

impl Filter {
    /// `kind` and `site` of a request, checked (422 naming the parameter).
    fn parse(kind: Option<&str>, site: Option<String>, admin: bool) -> Result<Self, ApiError> {
        let kinds = match kind {
            None => None,
            Some(list) => Some(
                list.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .take(16)
                    .map(|k| {
                        serde_json::from_value::<EventKind>(Value::String(k.to_owned()))
                            .ok()
                            .filter(|k| *k != EventKind::Ping)
                            .ok_or_else(|| {
                                ApiError::field("kind", format!("{k:?} is not an event kind"))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        if let Some(site) = &site {
            if site.is_empty() || site.len() > 64 {
                return Err(ApiError::field(
                    "site",
                    "a site's name (1 to 64 characters)",
                ));
            }
        }
        Ok(Self { kinds, site, admin })
    }

    /// A kept event as the list shows it to this caller (its number as `seq`), or `None`.
    fn item(&self, e: &StoredEvent) -> Option<Value> {
        let kind: EventKind = serde_json::from_value(Value::String(e.kind.clone())).ok()?;
        if self.kinds.as_ref().is_some_and(|k| !k.contains(&kind)) {
            return None;
        }
        if !self.admin && kind == EventKind::BackupFailed {
            return None;
        }
        let mut payload: Value = serde_json::from_str(&e.payload).ok()?;
        if self
            .site
            .as_ref()
            .is_some_and(|s| !sites_of(&payload["data"]).contains(s))
        {
            return None;
        }
        if !self.admin {
            redact(&mut payload);
        }
        payload["seq"] = Value::from(e.id);
        Some(payload)
    }

    /// The event as sent to this subscriber, or `None` if it is not for it.
    fn frame(&self, e: &Prepared) -> Option<Bytes> {
        if self.kinds.as_ref().is_some_and(|k| !k.contains(&e.kind)) {
            return None;
        }
        // What the admins alone read (backups' errors name their storage).
        if !self.admin && e.kind == EventKind::BackupFailed {
            return None;
        }
        if self.site.as_ref().is_some_and(|s| !e.sites.contains(s)) {
            return None;
        }
        Some(if self.admin {
            e.full.clone()
        } else {
            e.redacted.clone()
        })
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only these kinds, comma-separated (as the stream's `kind`).
    pub kind: Option<String>,
    /// Only events about this site.
    pub site: Option<String>,
    /// Events numbered before this one (the previous page's `next_before`); the newest
    /// without it.
    pub before: Option<i64>,
    /// At most this many (1 to 500, 50 by default).
    pub limit: Option<i64>,
}

/// A page of kept events, newest first.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct EventPage {
    /// Webhook payloads (`id`, `type`, `at_ms`, `data`), each with its number as `seq`.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<Value>,
    /// Pass as `before` for the next page; absent at the oldest event kept.
    pub next_before: Option<i64>,
}

/// Events looked at for one page at most: a filter that matches little answers with what it
/// found in them and where to go on (`next_before`), not with a scan of every event kept.
const LIST_SCAN: i64 = 5_000;

#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "webhooks",
    summary = "The events kept (7 days), newest first: what the stream sends, for a page of \
               history. Pages go back with `before`.",
    params(ListQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = EventPage))
)]
async fn list(
    State(s): State<AppState>,
    p: Principal,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<axum::Json<EventPage>, ApiError> {
    let filter = Filter::parse(q.kind.as_deref(), q.site, p.role >= Role::Admin)?;
    let limit = q.limit.unwrap_or(super::DEFAULT_LIMIT);
    if !(1..=super::MAX_LIMIT).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be between 1 and {}", super::MAX_LIMIT),
        ));
    }
    let mut before = q.before.unwrap_or(i64::MAX);
    if before < 0 {
        return Err(ApiError::field("before", "an event number"));
    }
    let mut items = Vec::new();
    let mut scanned = 0;
    let mut conn = s.store.conn().await?;
    loop {
        let batch = crate::store::webhooks::events_before(&mut conn, before, BATCH).await?;
        let last = batch.len() < BATCH as usize;
        for e in &batch {
            before = e.id;
            scanned += 1;
            if let Some(item) = filter.item(e) {
                items.push(item);
                if items.len() as i64 == limit {
                    break;
                }
            }
        }
        if items.len() as i64 == limit || scanned >= LIST_SCAN {
            break;
        }
        if last {
            return Ok(axum::Json(EventPage {
                items,
                next_before: None,
            }));
        }
    }
    Ok(axum::Json(EventPage {
        items,
        next_before: Some(before),
    }))
}

#[utoipa::path(
    get,
    path = "/api/v1/events/stream",
    tag = "webhooks",
    summary = "The events webhooks are sent, live, as server-sent events (`text/event-stream`): \
               `id:` is the event's number (send it back as `Last-Event-ID` to resume without \
               losing any), `event:` its kind, `data:` the webhook payload. A comment every 15 s \
               keeps the connection alive; the stream ends after 5 minutes (reconnect); \
               `event: gap` says events were missed (older than the store keeps).",
    params(StreamQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event")),
    security(("bearer" = ["viewer"])),
    responses((status = 200, content_type = "text/event-stream", body = String))
)]
async fn stream(
    State(s): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    extract::Query(q): extract::Query<StreamQuery>,
) -> Result<Response, ApiError> {
    let filter = Filter::parse(q.kind.as_deref(), q.site, p.role >= Role::Admin)?;
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::field("Last-Event-ID", "an event number this stream sent")
                })?,
        ),
        None => q.after,
    };
    if resume.is_some_and(|n| n < 0) {
        return Err(ApiError::field("after", "an event number this stream sent"));
    }
    let guard = StreamSlot::take(&s).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("this controller serves {MAX_STREAMS} event streams already"),
        )
    })?;
    let (lo, hi) = event_bounds(&mut *s.store.conn().await?).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    // The start: the reconnection delay asked of clients, then a gap if the client's last event
    // is no longer kept (or is not one of this store's: a restore), then what came after it.
    let mut first = String::from("retry: 2000\n\n");
    let after = match resume {
        None => hi,
        Some(n) if n > hi || (n + 1 < lo && lo > 0) => {
            first.push_str(&format!(
                "event: gap\ndata: {{\"after\":{n},\"oldest\":{lo},\"newest\":{hi}}}\n\n"
            ));
            if n > hi { hi } else { lo - 1 }
        }
        Some(n) => n,
    };
    let _ = tx.try_send(Bytes::from(first));
    tokio::spawn(follow(s.clone(), filter, after, tx, guard));
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    }));
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies that buffer (nginx) would hold the events back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

/// Sends the events after `after` to `tx`, then each as it commits, until the client goes, the
/// stream's time is up or the controller stops.
async fn follow(
    s: AppState,
    filter: Filter,
    mut after: i64,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    _slot: StreamSlot,
) {
    // The tail starts where the first stream does: at or before what any stream reads from the
    // store, so that no event falls between a stream's catch-up and what the tail hands on.
    s.event_tail_started
        .call_once(|| drop(tokio::spawn(tail(s.clone(), after))));
    // Subscribed before catching up: an event the tail hands on after this is in `live`; one it
    // handed on before is in the store already, where the catch-up reads it.
    let mut live = s.event_tail.subscribe();
    let mut stopping = s.stopping.subscribe();
    let end = tokio::time::Instant::now() + MAX_STREAM;
    let mut quiet_since = tokio::time::Instant::now();
    let mut behind = true;
    loop {
        if behind {
            // From the store, up to the newest event.
            let batch = match s.store.conn().await {
                Ok(mut c) => events_after(&mut c, after, BATCH).await,
                Err(e) => Err(e),
            };
            let batch = batch.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the event stream could not read the events");
                Vec::new()
            });
            behind = batch.len() as i64 == BATCH;
            for e in &batch {
                after = e.id;
                if let Some(frame) = Prepared::new(e).and_then(|p| filter.frame(&p)) {
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                    quiet_since = tokio::time::Instant::now();
                }
            }
            if behind {
                continue;
            }
        }
        let keep_alive = quiet_since + KEEP_ALIVE;
        // What woke the stream, acted on after the select (whose futures hold borrows).
        let frame = tokio::select! {
            r = live.recv() => match r.as_deref() {
                Ok(Tail::Event(e)) if e.id > after => {
                    after = e.id;
                    filter.frame(e)
                }
                Ok(Tail::Event(_)) => None,
                Ok(Tail::WentBack) => return,
                // More than the tail holds went by: caught up from the store.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    behind = true;
                    None
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep_until(keep_alive) => Some(Bytes::from_static(b": keep-alive\n\n")),
            _ = stopping.wait_for(|v| *v) => return,
            _ = tokio::time::sleep_until(end) => return,
            _ = tx.closed() => return,
        };
        if let Some(frame) = frame {
            if tx.send(frame).await.is_err() {
                return;
            }
            quiet_since = tokio::time::Instant::now();
        }
    }
}

/// The controller's one reader of new events: each read once, prepared once, handed to every
/// stream. Runs for the controller's life once a stream started it.
async fn tail(s: AppState, mut after: i64) {
    let mut woken = s.store.watch_events();
    let mut stopping = s.stopping.subscribe();
    loop {
        let read = async {
            let mut c = s.store.conn().await?;
            let batch = events_after(&mut c, after, BATCH).await?;
            // Nothing new: is the store behind the tail (restored under it)?
            let newest = if batch.is_empty() {
                Some(event_bounds(&mut c).await?.1)
            } else {
                None
            };
            Ok::<_, sqlx::Error>((batch, newest))
        };
        let full = match read.await {
            Ok((batch, newest)) => {
                if let Some(n) = newest.filter(|n| *n < after) {
                    tracing::info!(
                        newest = n,
                        was = after,
                        "the events were numbered anew (a restore): event streams restart"
                    );
                    after = n;
                    let _ = s.event_tail.send(std::sync::Arc::new(Tail::WentBack));
                }
                after = batch.last().map_or(after, |e| e.id);
                for e in &batch {
                    if let Some(p) = Prepared::new(e) {
                        // No stream listening is no error.
                        let _ = s.event_tail.send(std::sync::Arc::new(Tail::Event(p)));
                    }
                }
                batch.len() as i64 == BATCH
            }
            Err(e) => {
                tracing::warn!(error = %e, "the event tail could not read the events");
                false
            }
        };
        if full {
            continue;
        }
        tokio::select! {
            r = woken.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(RECHECK) => {}
            _ = stopping.wait_for(|v| *v) => return,
        }
    }
}

/// One of the [`MAX_STREAMS`] streams, counted in `patronus_event_streams` while it lasts.
struct StreamSlot(AppState);

impl StreamSlot {
    fn take(s: &AppState) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let n = s.event_streams.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_STREAMS {
            s.event_streams.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Self(s.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0
            .event_streams
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
