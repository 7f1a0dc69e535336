//! Webhooks: what happens in the network, told to the URLs admins registered.
//!
//! An event (a site coming online or going offline, a path going down or up, a path breaking an
//! SLA, a failover, a change of the desired state) becomes one delivery per webhook that asked
//! for its kind, written to the database before anyone is told: a delivery survives a restart
//! of the controller. A worker posts each one; anything but a 2xx answer within
//! [`ATTEMPT_TIMEOUT`] is retried with exponential backoff (1 s, 2 s, 4 s, ... at most
//! [`MAX_BACKOFF_MS`] apart, ±20 %), until [`MAX_ATTEMPTS`]; then the delivery is `failed` (an
//! admin can ask for it again). Every delivery's status, attempts and last answer are in the API.
//!
//! Each request is signed: `X-Patronus-Signature: t=<unix seconds>,v1=<hex>`, where `<hex>` is
//! HMAC-SHA256, keyed with the webhook's secret (shown once, when it is created), of
//! `"<t>." + body`. A receiver recomputes it, compares in constant time, and refuses a `t` too
//! far from its clock (a replayed request). `X-Patronus-Event` is the kind, `X-Patronus-Delivery`
//! the delivery's id; the body's `id` is the event's, the same on every retry, to drop
//! duplicates.
//!
//! `https://` URLs are verified against the Mozilla roots compiled in (`webpki-roots`) and
//! the CA certificates of the `webhook_ca_file` setting; `http://` ones are for receivers on a
//! trusted network.
//!
//! The controller posts only to public addresses unless the operator allowed more: a URL whose
//! host is (or, at each delivery, resolves to) a loopback, link-local (cloud metadata at
//! 169.254.169.254), private, shared (CGNAT), unique-local, multicast or reserved address is
//! refused, unless that address lies in `webhook_allowed_networks`. The check runs on the
//! addresses the name resolves to at each delivery, and the connection goes to the address that
//! was checked, so a name that changes its answer cannot steer a delivery inward. A webhook
//! cannot make the controller a scanner of its own network.

use std::sync::Arc;
use std::time::Duration;

use axum::http::Uri;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::app::AppState;
use crate::store::webhooks::{self as store, Due};
use crate::store::{Actor, Tx, now_ms};

/// What a webhook can ask to hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum EventKind {
    /// A site's edge got in touch (after starting, or after being offline).
    #[serde(rename = "site.online")]
    SiteOnline,
    /// A site's edge has not been heard from for [`crate::store::presence::ONLINE_WITHIN_MS`].
    #[serde(rename = "site.offline")]
    SiteOffline,
    /// An edge reports a path down (no probe answered).
    #[serde(rename = "path.down")]
    PathDown,
    /// An edge reports a path that was down alive again.
    #[serde(rename = "path.up")]
    PathUp,
    /// An edge reports a path alive but breaking an SLA class (degraded).
    #[serde(rename = "sla.violated")]
    SlaViolated,
    /// An edge moved flows from one path to another.
    #[serde(rename = "failover")]
    Failover,
    /// The desired state changed (an acknowledged write to sites, links, topology, policies...).
    #[serde(rename = "config.changed")]
    ConfigChanged,
    /// Asked for by an admin, to test a webhook; sent whatever the webhook's events.
    #[serde(rename = "ping")]
    Ping,
    /// A scheduled backup of the controller's state failed (it is tried again in 5 minutes).
    #[serde(rename = "backup.failed")]
    BackupFailed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SiteOnline => "site.online",
            Self::SiteOffline => "site.offline",
            Self::PathDown => "path.down",
            Self::PathUp => "path.up",
            Self::SlaViolated => "sla.violated",
            Self::Failover => "failover",
            Self::ConfigChanged => "config.changed",
            Self::Ping => "ping",
            Self::BackupFailed => "backup.failed",
        }
    }
}

/// Attempts before a delivery is given up (`failed`).
pub const MAX_ATTEMPTS: i64 = 10;
/// The longest wait between two attempts.
pub const MAX_BACKOFF_MS: i64 = 5 * 60 * 1000;
/// How long one attempt may take, connection included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries in flight at once.
const CONCURRENCY: usize = 16;
/// How long a claimed delivery is not due again: longer than an attempt can take.
const LEASE_MS: i64 = ATTEMPT_TIMEOUT.as_millis() as i64 + 5_000;
/// The most of a receiver's answer that is read (and dropped).
const MAX_ANSWER: usize = 64 * 1024;
/// How long finished deliveries are kept.
pub const RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// Why a URL cannot be a webhook's.
pub fn check_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}): give https://host[:port]/path"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must start with https:// (or http://)".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if url.len() > 2000 {
        return Err("is longer than 2000 characters".into());
    }
    Ok(uri)
}

/// Why the controller does not post to `ip` unless an operator allowed it: the kind of
/// internal or special address it is, or `None` for a public one.
pub fn internal(ip: std::net::IpAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    let v4 = |a: std::net::Ipv4Addr| -> Option<&'static str> {
        let [o0, o1, o2, _] = a.octets();
        Some(match (o0, o1, o2) {
            _ if a.is_loopback() => "loopback",
            _ if a.is_link_local() => "link-local",
            _ if a.is_private() => "private",
            _ if a.is_multicast() => "multicast",
            _ if a.is_broadcast() => "broadcast",
            (0, _, _) => "this-network",
            (100, 64..=127, _) => "shared (carrier-grade NAT)",
            (192, 0, 0) => "IETF protocol assignment",
            (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
            (198, 18..=19, _) => "benchmarking",
            (240..=255, _, _) => "reserved",
            _ => return None,
        })
    };
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => {
            let s = a.segments();
            if let Some(m) = a.to_ipv4_mapped() {
                return v4(m).or(Some("IPv4-mapped"));
            }
            // NAT64 (RFC 6052): the IPv4 address it stands for decides.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = a.octets();
                return v4(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            Some(match s[0] {
                _ if a.is_loopback() => "loopback",
                _ if a.is_unspecified() => "unspecified",
                0xfe80..=0xfebf => "link-local",
                0xfc00..=0xfdff => "unique-local",
                0xff00..=0xffff => "multicast",
                0x2001 if s[1] == 0x0db8 => "documentation",
                0x0100 if s[1..4] == [0, 0, 0] => "discard-only",
                // Other IPv4-compatible or reserved low addresses.
                0 => "reserved",
                _ => return None,
            })
        }
    }
}

/// `Err` with the reason if the controller must not post to `ip`: internal (see [`internal`])
/// and in none of the networks the operator allowed.
pub fn check_destination(
    ip: std::net::IpAddr,
    allowed: &[patronus_api::Prefix],
) -> Result<(), String> {
    let ip = match ip {
        std::net::IpAddr::V6(a) => a
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(a), std::net::IpAddr::V4),
        v4 => v4,
    };
    match internal(ip) {
        Some(kind) if !allowed.iter().any(|p| p.contains(ip)) => Err(format!(
            "{ip} is a {kind} address: the controller posts to internal addresses only in \
             webhook_allowed_networks"
        )),
        _ => Ok(()),
    }
}

/// Queues `kind` for every enabled webhook that asked for it (`only`: for that webhook alone,
/// whatever it asked for) and wakes the worker. Returns the event's id, if anyone will hear it.
pub async fn emit(
    state: &AppState,
    kind: EventKind,
    data: Value,
    only: Option<i64>,
) -> Result<Option<String>, sqlx::Error> {
    Ok(emit_all(state, vec![(kind, data)], only)
        .await?
        .pop()
        .flatten())
}

/// [`emit`] for several events at once: the webhooks are read once and every delivery is
/// written in one transaction. Returns each event's id, if anyone will hear it.
pub async fn emit_all(
    state: &AppState,
    events: Vec<(EventKind, Value)>,
    only: Option<i64>,
) -> Result<Vec<Option<String>>, sqlx::Error> {
    let mut tx = state.store.begin().await?;
    let ids = queue(&mut tx, events, only).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Queues events in `tx`: their deliveries commit (and the worker wakes) with the rest of the
/// transaction, or not at all. Returns each event's id, if anyone will hear it.
pub async fn queue(
    tx: &mut Tx,
    events: Vec<(EventKind, Value)>,
    only: Option<i64>,
) -> Result<Vec<Option<String>>, sqlx::Error> {
    let hooks = store::enabled(tx).await?;
    let now = now_ms();
    let mut ids = Vec::with_capacity(events.len());
    for (kind, data) in events {
        let to: Vec<i64> = hooks
            .iter()
            .filter(|(id, wants)| only.map_or(wants.contains(&kind), |o| o == *id))
            .map(|(id, _)| *id)
            .collect();
        // Every event but a test sent to one webhook is kept for the event stream.
        let streamed = only.is_none();
        if to.is_empty() && !streamed {
            ids.push(None);
            continue;
        }
        let id = format!(
            "evt_{}",
            crate::auth::b64url(&crate::auth::random_bytes::<12>())
        );
        let payload = json!({ "id": id, "type": kind, "at_ms": now, "data": data }).to_string();
        if streamed {
            store::record_event(tx, (&id, kind, &payload), now).await?;
            tx.events_recorded();
        }
        if to.is_empty() {
            ids.push(None);
            continue;
        }
        for hook in to {
            store::queue(tx, hook, (&id, kind, &payload), now).await?;
        }
        tx.deliveries_queued();
        ids.push(Some(id));
    }
    Ok(ids)
}

/// A write in `tx` changes what some edge runs: the configuration generation is bumped and
/// `config.changed` queued, both in `tx`, so that an edge learns of a change and a webhook
/// hears of it exactly when the change commits.
pub async fn config_changed(
    tx: &mut Tx,
    actor: &Actor,
    action: &str,
    target: &str,
    touches: crate::store::Touches,
) -> Result<i64, sqlx::Error> {
    let generation = tx.config_changed_touching(touches).await?;
    let data = json!({
        "generation": generation,
        "action": action,
        "target": target,
        "actor": actor.name,
        "request_id": crate::app::current_request_id(),
    });
    queue(tx, vec![(EventKind::ConfigChanged, data)], None).await?;
    Ok(generation)
}

/// Starts the delivery worker and the presence writer (which announces sites online and
/// offline). Call once, inside the runtime.
pub fn start(state: &AppState) {
    tokio::spawn(deliver_forever(state.clone()));
    tokio::spawn(crate::presence::run(state.clone()));
}

async fn deliver_forever(state: AppState) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut last_cleanup = 0;
    loop {
        let now = now_ms();
        if now - last_cleanup > 3_600_000 {
            last_cleanup = now;
            let r = match state.store.conn().await {
                Ok(mut c) => store::prune(&mut c, now - RETENTION_MS).await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "old webhook deliveries not removed");
            }
        }
        let due = match due(&state, now).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading webhook deliveries");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        for d in due {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            // Claimed in the database: the row is not due again until this attempt is over
            // (or could not have lasted longer), so it is never posted twice at once, and a
            // row that changed since it was read (done, or rescheduled) is left alone.
            let claimed = match state.store.conn().await {
                Ok(mut c) => {
                    let now = now_ms();
                    store::claim(&mut c, &d, now, now + LEASE_MS).await
                }
                Err(e) => Err(e),
            }
            .unwrap_or(false);
            if !claimed {
                continue;
            }
            let state = state.clone();
            tokio::spawn(async move {
                attempt(&state, d).await;
                drop(permit);
                state.store.webhook_wake().notify_one();
            });
        }
        // Until the next one is due (at most a second), or something new is queued.
        let next = match state.store.conn().await {
            Ok(mut c) => store::next_due(&mut c).await.ok().flatten(),
            Err(_) => None,
        };
        let wait = next.map_or(1000, |n| (n - now_ms()).clamp(10, 1000));
        tokio::select! {
            _ = state.store.webhook_wake().notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
        }
    }
}

async fn due(state: &AppState, now: i64) -> Result<Vec<Due>, sqlx::Error> {
    store::due(&mut *state.store.conn().await?, now).await
}

/// One attempt at a delivery, and its outcome written down.
async fn attempt(state: &AppState, d: Due) {
    let t = crate::store::now_s();
    let signature = format!("t={t},v1={}", sign(&d.secret, t, d.payload.as_bytes()));
    let headers = [
        ("content-type", "application/json".to_owned()),
        (
            "user-agent",
            format!("patronus/{}", env!("CARGO_PKG_VERSION")),
        ),
        ("x-patronus-event", d.event.clone()),
        ("x-patronus-delivery", d.id.to_string()),
        ("x-patronus-signature", signature),
    ];
    let outcome = match tokio::time::timeout(
        ATTEMPT_TIMEOUT,
        post(
            &state.webhook_tls,
            &state.config.webhook_allowed_networks,
            &d.url,
            &headers,
            d.payload.clone().into_bytes(),
        ),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())),
    };
    let attempts = d.attempts + 1;
    let now = now_ms();
    let (code, error) = match outcome {
        Ok(code) if (200..300).contains(&code) => (Some(code), None),
        Ok(code) => (Some(code), Some(format!("answered HTTP {code}"))),
        Err(e) => (None, Some(e)),
    };
    let (status, next) = match error {
        None => ("delivered", now),
        Some(_) if attempts >= MAX_ATTEMPTS => ("failed", now),
        Some(_) => ("pending", now + backoff_ms(attempts)),
    };
    state.webhook_attempts[match status {
        "delivered" => 0,
        "pending" => 1,
        _ => 2,
    }]
    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let outcome = store::Outcome {
        status,
        next_ms: next,
        code: code.map(i64::from),
        error: error.as_deref(),
    };
    let r = match state.store.conn().await {
        Ok(mut c) => store::record(&mut c, &d, &outcome, now).await,
        Err(e) => Err(e),
    };
    if let Err(e) = r {
        tracing::warn!(delivery = d.id, error = %e, "webhook delivery outcome not recorded");
    }
    match (status, error) {
        ("failed", Some(e)) => tracing::warn!(
            delivery = d.id,
            event = %d.event,
            attempts,
            error = %e,
            "webhook delivery failed for good"
        ),
        (_, Some(e)) => tracing::info!(
            delivery = d.id,
            event = %d.event,
            attempts,
            error = %e,
            "webhook delivery will be retried"
        ),
        _ => {}
    }
}

/// The wait after the `attempts`-th failed attempt: 1 s doubling, at most [`MAX_BACKOFF_MS`],
/// ±20 % so that deliveries failed together are not retried together.
pub fn backoff_ms(attempts: i64) -> i64 {
    let base = 1000i64
        .saturating_mul(1 << (attempts - 1).clamp(0, 20))
        .min(MAX_BACKOFF_MS);
    let r = i64::from(u16::from_le_bytes(crate::auth::random_bytes::<2>()));
    base + base * (r - 32_768) / 163_840
}

/// `HMAC-SHA256(secret, "<t>." + body)`, in lower-case hex.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    crate::auth::hex(&crate::auth::hmac_sha256(
        secret.as_bytes(),
        &[format!("{t}.").as_bytes(), body],
    ))
}

/// The TLS client of `https://` webhooks: the Mozilla roots compiled in, and the CA
/// certificates of `webhook_ca_file`. A file that cannot be read or holds no certificate is an
/// error at start, not a silent fallback.
pub fn tls_client(
    config: &crate::config::Config,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    crate::tls::client_config(config.webhook_ca_file.as_deref(), "webhook_ca_file")
}

/// One `POST` over a fresh HTTP/1.1 connection (TLS for `https://`); the answer's status code.
async fn post(
    tls: &std::sync::Arc<rustls::ClientConfig>,
    allowed: &[patronus_api::Prefix],
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<u16, String> {
    let uri = check_url(url)?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    // Every address the name has now is checked; the connection goes to one that passed.
    let mut refused = None;
    let mut addr = None;
    for a in tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
    {
        match check_destination(a.ip(), allowed) {
            Ok(()) => {
                addr = Some(a);
                break;
            }
            Err(e) => refused = refused.or(Some(e)),
        }
    }
    let addr = match (addr, refused) {
        (Some(a), _) => a,
        (None, Some(why)) => return Err(format!("refused: {host}: {why}")),
        (None, None) => return Err(format!("{host} has no address")),
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    if !https {
        return exchange(stream, &uri, headers, body).await;
    }
    let name = rustls::pki_types::ServerName::try_from(bare.to_owned())
        .map_err(|e| format!("{host} cannot be checked against a certificate: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS with {host} ({addr}): {e}"))?;
    exchange(stream, &uri, headers, body).await
}

/// The request and its answer's status, over an open connection.
async fn exchange<S>(
    io: S,
    uri: &Uri,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Full};
    let host = uri.host().unwrap_or_default();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP with {host}: {e}"))?;
    tokio::spawn(conn);
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let mut req = axum::http::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", authority);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req
        .body(Full::new(hyper::body::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP with {host}: {e}"))?;
    let status = resp.status().as_u16();
    // Read (and drop) what it says, so that the connection closes cleanly.
    let _ = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: Python's hmac.new(b"whsec_test", b'1700000000.{"id":"evt_1"}',
        // hashlib.sha256).hexdigest().
        assert_eq!(
            sign("whsec_test", 1_700_000_000, br#"{"id":"evt_1"}"#),
            "c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925"
        );
        // The timestamp is part of what is signed.
        assert_ne!(sign("k", 1, b"x"), sign("k", 2, b"x"));
    }

    #[test]
    fn backoff_doubles_within_twenty_percent_and_is_capped() {
        for attempts in 1..=12 {
            let base = (1000i64 << (attempts - 1)).min(MAX_BACKOFF_MS);
            for _ in 0..50 {
                let b = backoff_ms(attempts);
                assert!(b >= base * 8 / 10 && b <= base * 12 / 10, "{attempts}: {b}");
            }
        }
    }

    #[test]
    fn internal_addresses_are_refused_unless_their_network_is_allowed() {
        let refused = [
            "127.0.0.1",
            "127.8.9.10",
            "169.254.169.254",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
        ];
        for ip in refused {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let e = check_destination(ip, &[]).unwrap_err();
            assert!(e.contains("webhook_allowed_networks"), "{ip}: {e}");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "64:ff9b::101:101",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(check_destination(ip, &[]), Ok(()), "{ip}");
        }
        let allowed: Vec<patronus_api::Prefix> = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(
            check_destination("127.0.0.1".parse().unwrap(), &allowed),
            Ok(())
        );
        assert_eq!(
            check_destination("::ffff:127.0.0.1".parse().unwrap(), &allowed),
            Ok(())
        );
        assert!(check_destination("10.0.0.1".parse().unwrap(), &allowed).is_err());
    }

    #[test]
    fn only_http_and_https_urls_with_a_host() {
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("http://[::1]:9000/").is_ok());
        assert!(check_url("https://example.net/hooks/patronus").is_ok());
        assert!(check_url("ftp://example.net/").is_err());
        assert!(check_url("not a url").is_err());
        assert!(check_url("/relative").is_err());
    }
}
