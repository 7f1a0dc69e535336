//! Webhooks and their deliveries: the routes' reads and writes, and the delivery worker's
//! queue (`crate::webhooks`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};
use super::docs::WriteError;
use crate::error::ApiError;
use crate::webhooks::EventKind;

/// What a webhook is: where to post, and which events.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// An `https` URL (or `http`, on a trusted network). Its host must be public, unless its
    /// network is in the controller's `webhook_allowed_networks`.
    #[schema(max_length = 2000)]
    pub url: String,
    /// The kinds of event to post (at least one; `ping` is sent on request, not subscribed to).
    #[schema(min_items = 1)]
    pub events: Vec<EventKind>,
    #[serde(default)]
    #[schema(max_length = 500)]
    pub description: String,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookView {
    pub id: i64,
    #[serde(flatten)]
    pub spec: WebhookSpec,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
    /// The signing key: only in the response that creates the webhook.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub id: i64,
    pub webhook_id: i64,
    pub event_id: String,
    pub event: String,
    /// `pending` (queued, or waiting for its next attempt), `delivered` or `failed` (every
    /// attempt failed).
    pub status: String,
    pub attempts: i64,
    /// Unix ms of the next attempt, while pending.
    pub next_attempt_ms: Option<i64>,
    /// The HTTP status of the last answer, if there was one.
    pub last_status: Option<i64>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub delivered_ms: Option<i64>,
    /// The body posted.
    pub payload: Value,
}

fn view(r: &Row) -> Result<WebhookView, ApiError> {
    Ok(WebhookView {
        id: r.try_get("id")?,
        spec: WebhookSpec {
            url: r.try_get("url")?,
            events: serde_json::from_str(r.str("events")?).map_err(ApiError::internal)?,
            description: r.try_get("description")?,
            enabled: r.try_get::<i64, _>("enabled")? != 0,
        },
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        secret: None,
    })
}

/// Webhook `id` (without its secret), if there is one.
pub async fn get(conn: &mut Conn, id: i64) -> Result<Option<WebhookView>, ApiError> {
    query("SELECT * FROM webhooks WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(view)
        .transpose()
}

/// A page of webhooks in id order, and how many there are.
pub async fn page(
    conn: &mut Conn,
    (limit, offset): (i64, i64),
) -> Result<(Vec<WebhookView>, i64), ApiError> {
    let total: i64 = query_scalar("SELECT COUNT(*) FROM webhooks")
        .fetch_one(&mut *conn)
        .await?;
    let items = query("SELECT * FROM webhooks ORDER BY id LIMIT ? OFFSET ?")
        .bind(limit)
        .bind(offset)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((items, total))
}

fn events_json(events: &[EventKind]) -> Result<String, sqlx::Error> {
    serde_json::to_string(events).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// Stores a new webhook with its signing secret; its id.
pub async fn insert(
    conn: &mut Conn,
    spec: &WebhookSpec,
    secret: &str,
    now: i64,
) -> Result<i64, sqlx::Error> {
    let r = query_scalar::<i64>(
        "INSERT INTO webhooks (url, events, description, secret, enabled, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(&spec.url)
    .bind(events_json(&spec.events)?)
    .bind(&spec.description)
    .bind(secret)
    .bind(i64::from(spec.enabled))
    .bind(now)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    Ok(r)
}

/// Writes webhook `id` as its next version, if it is still at `version`.
pub async fn update(
    conn: &mut Conn,
    (id, version): (i64, i64),
    spec: &WebhookSpec,
    now: i64,
) -> Result<(), WriteError> {
    let r = query(
        "UPDATE webhooks SET url = ?, events = ?, description = ?, enabled = ?,
         version = version + 1, updated_at = ? WHERE id = ? AND version = ?",
    )
    .bind(&spec.url)
    .bind(events_json(&spec.events)?)
    .bind(&spec.description)
    .bind(i64::from(spec.enabled))
    .bind(now)
    .bind(id)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    super::one_row_changed(r)
}

/// Deletes webhook `id` and its deliveries (ON DELETE CASCADE).
pub async fn delete(conn: &mut Conn, id: i64) -> Result<(), sqlx::Error> {
    super::delete_by_id(conn, "webhooks", id).await
}

/// A page of webhook `id`'s deliveries (of `status` and `event`, if given), newest first, and
/// how many there are.
pub async fn deliveries(
    conn: &mut Conn,
    id: i64,
    (status, event): (Option<&str>, Option<&str>),
    (limit, offset): (i64, i64),
) -> Result<(Vec<DeliveryView>, i64), ApiError> {
    let filter = "webhook_id = ?1 AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR event = ?3)";
    let total: i64 = query_scalar(&format!(
        "SELECT COUNT(*) FROM webhook_deliveries WHERE {filter}"
    ))
    .bind(id)
    .bind(status)
    .bind(event)
    .fetch_one(&mut *conn)
    .await?;
    let rows = query(&format!(
        "SELECT * FROM webhook_deliveries WHERE {filter} ORDER BY id DESC LIMIT ?4 OFFSET ?5"
    ))
    .bind(id)
    .bind(status)
    .bind(event)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            let status: String = r.try_get("status")?;
            Ok(DeliveryView {
                id: r.try_get("id")?,
                webhook_id: r.try_get("webhook_id")?,
                event_id: r.try_get("event_id")?,
                event: r.try_get("event")?,
                next_attempt_ms: (status == "pending")
                    .then(|| r.try_get("next_attempt_ms"))
                    .transpose()?,
                status,
                attempts: r.try_get("attempts")?,
                last_status: r.try_get("last_status")?,
                last_error: r.try_get("last_error")?,
                created_ms: r.try_get("created_ms")?,
                delivered_ms: r.try_get("delivered_ms")?,
                payload: serde_json::from_str(r.str("payload")?).unwrap_or(Value::Null),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok((items, total))
}

/// The status of delivery `delivery` of webhook `id`, if there is one.
pub async fn delivery_status(
    conn: &mut Conn,
    id: i64,
    delivery: i64,
) -> Result<Option<String>, sqlx::Error> {
    query_scalar("SELECT status FROM webhook_deliveries WHERE id = ? AND webhook_id = ?")
        .bind(delivery)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
}

/// Makes delivery `delivery` pending again, due now, its attempts starting over.
pub async fn retry(conn: &mut Conn, delivery: i64, now_ms: i64) -> Result<(), sqlx::Error> {
    query(
        "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_ms = ?
         WHERE id = ?",
    )
    .bind(now_ms)
    .bind(delivery)
    .execute(&mut *conn)
    .await
    .map(|_| ())
}

// ----- the delivery worker's queue -----

/// The enabled webhooks and the events each wants (unreadable lists want nothing).
pub async fn enabled(conn: &mut Conn) -> Result<Vec<(i64, Vec<EventKind>)>, sqlx::Error> {
    let rows = query("SELECT id, events FROM webhooks WHERE enabled = 1")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            let wants: Vec<EventKind> = serde_json::from_str(r.str("events")?).unwrap_or_default();
            Ok((r.try_get("id")?, wants))
        })
        .collect()
}

/// Queues event `event_id` (`kind`, its body `payload`) for webhook `hook`, due now.
pub async fn queue(
    conn: &mut Conn,
    hook: i64,
    (event_id, kind, payload): (&str, EventKind, &str),
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    query(
        "INSERT INTO webhook_deliveries
         (webhook_id, event_id, event, payload, status, next_attempt_ms, created_ms)
         VALUES (?, ?, ?, ?, 'pending', ?, ?)",
    )
    .bind(hook)
    .bind(event_id)
    .bind(kind.as_str())
    .bind(payload)
    .bind(now_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await
    .map(|_| ())
}

/// Forgets finished deliveries, and events, created before `before_ms`.
pub async fn prune(conn: &mut Conn, before_ms: i64) -> Result<(), sqlx::Error> {
    query("DELETE FROM webhook_deliveries WHERE status != 'pending' AND created_ms < ?")
        .bind(before_ms)
        .execute(&mut *conn)
        .await?;
    query("DELETE FROM events WHERE at_ms < ?")
        .bind(before_ms)
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

// ----- the event stream -----

/// Keeps event `event_id` for the event stream; its number (in commit order: writers take
/// turns) is what a subscriber resumes after.
pub async fn record_event(
    conn: &mut Conn,
    (event_id, kind, payload): (&str, EventKind, &str),
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    query("INSERT INTO events (event_id, kind, at_ms, payload) VALUES (?, ?, ?, ?)")
        .bind(event_id)
        .bind(kind.as_str())
        .bind(at_ms)
        .bind(payload)
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

/// One kept event: its number, kind and body (the webhook payload).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: i64,
    pub kind: String,
    pub payload: String,
}

/// Up to `limit` events numbered after `after`, in order.
pub async fn events_after(
    conn: &mut Conn,
    after: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = query("SELECT id, kind, payload FROM events WHERE id > ? ORDER BY id LIMIT ?")
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    stored_events(&rows)
}

fn stored_events(rows: &[Row]) -> Result<Vec<StoredEvent>, sqlx::Error> {
    rows.iter()
        .map(|r| {
            Ok(StoredEvent {
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                payload: r.try_get("payload")?,
            })
        })
        .collect()
}

/// Up to `limit` events numbered before `before`, newest first.
pub async fn events_before(
    conn: &mut Conn,
    before: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = query("SELECT id, kind, payload FROM events WHERE id < ? ORDER BY id DESC LIMIT ?")
        .bind(before)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    stored_events(&rows)
}

/// The numbers of the oldest and the newest event kept (0 when there is none).
pub async fn event_bounds(conn: &mut Conn) -> Result<(i64, i64), sqlx::Error> {
    let r = query("SELECT COALESCE(MIN(id), 0) AS lo, COALESCE(MAX(id), 0) AS hi FROM events")
        .fetch_one(&mut *conn)
        .await?;
    Ok((r.try_get("lo")?, r.try_get("hi")?))
}

/// A delivery that is due, with where and how to post it.
#[derive(Debug)]
pub struct Due {
    pub id: i64,
    pub url: String,
    pub secret: String,
    pub event: String,
    pub payload: String,
    pub attempts: i64,
}

/// Up to 64 deliveries due at `now_ms` (of enabled webhooks), the longest due first.
pub async fn due(conn: &mut Conn, now_ms: i64) -> Result<Vec<Due>, sqlx::Error> {
    let rows = query(
        "SELECT d.id, d.event, d.payload, d.attempts, w.url, w.secret
         FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
         WHERE d.status = 'pending' AND d.next_attempt_ms <= ? AND w.enabled = 1
         ORDER BY d.next_attempt_ms, d.id LIMIT 64",
    )
    .bind(now_ms)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Due {
                id: r.try_get("id")?,
                url: r.try_get("url")?,
                secret: r.try_get("secret")?,
                event: r.try_get("event")?,
                payload: r.try_get("payload")?,
                attempts: r.try_get("attempts")?,
            })
        })
        .collect()
}

/// Claims delivery `d` for one attempt: it is not due again until `until_ms`. False if the row
/// changed since it was read (done, or rescheduled, or claimed by someone else).
pub async fn claim(
    conn: &mut Conn,
    d: &Due,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, sqlx::Error> {
    let r = query(
        "UPDATE webhook_deliveries SET next_attempt_ms = ?
         WHERE id = ? AND status = 'pending' AND attempts = ? AND next_attempt_ms <= ?",
    )
    .bind(until_ms)
    .bind(d.id)
    .bind(d.attempts)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// When the next pending delivery of an enabled webhook is due (unix ms), if any.
pub async fn next_due(conn: &mut Conn) -> Result<Option<i64>, sqlx::Error> {
    query_scalar(
        "SELECT MIN(d.next_attempt_ms) FROM webhook_deliveries d
         JOIN webhooks w ON w.id = d.webhook_id WHERE d.status = 'pending' AND w.enabled = 1",
    )
    .fetch_one(&mut *conn)
    .await
}

/// What one attempt at a delivery came to.
#[derive(Debug)]
pub struct Outcome<'a> {
    /// `delivered`, `failed` or `pending` (to be tried again at `next_ms`).
    pub status: &'a str,
    pub next_ms: i64,
    /// The HTTP status of the answer, if there was one.
    pub code: Option<i64>,
    pub error: Option<&'a str>,
}

/// Writes down the outcome of attempt `d.attempts + 1` of delivery `d` (not if the row moved on
/// meanwhile).
pub async fn record(
    conn: &mut Conn,
    d: &Due,
    o: &Outcome<'_>,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    query(
        "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_ms = ?,
         last_status = ?, last_error = ?,
         delivered_ms = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_ms END
         WHERE id = ? AND attempts = ?",
    )
    .bind(o.status)
    .bind(d.attempts + 1)
    .bind(o.next_ms)
    .bind(o.code)
    .bind(o.error)
    .bind(o.status)
    .bind(now_ms)
    .bind(d.id)
    .bind(d.attempts)
    .execute(&mut *conn)
    .await
    .map(|_| ())
}
