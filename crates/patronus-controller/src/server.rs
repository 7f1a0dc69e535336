//! Start-up and serving: the data directory, the database, the signing key, the first admin,
//! the TLS certificate, then HTTPS (or HTTP) until SIGTERM or Ctrl-C, finishing the requests in
//! flight.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::app::{AppState, router};
use crate::auth::{self, Role};
use crate::config::Config;
use crate::routes::users::{NewUser, add_user};
use crate::store::settings::KeyClaim;
use crate::store::{Actor, Store, create_private_dir};

/// Opens everything the API needs, creating it on first start.
pub async fn prepare(config: Config, env: &[(String, String)]) -> anyhow::Result<AppState> {
    create_private_dir(&config.data_dir)?;
    let store = Store::connect(&config.database).await?;
    let key = auth::load_or_create_key(&config.jwt_key_file)?;
    check_signing_key(&store, &config, &key, env).await?;
    bootstrap_admin(&store, &config.data_dir, env).await?;
    let webhook_tls = crate::webhooks::tls_client(&config).map_err(anyhow::Error::msg)?;
    // A backup destination that cannot work (no credentials for the object store) stops the
    // start, not the first scheduled backup hours later.
    let destination = crate::backup::Destination::from_config(&config, env)
        .context("backup_url (scheduled backups)")?;
    let tls = crate::https::ServerTls::from_config(&config)?;
    let state = AppState::new(config, store, &key, webhook_tls);
    if let Some(tls) = tls {
        let _ = state.tls.set(tls);
    }
    state
        .backups
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .destination = Some(destination);
    Ok(state)
}

/// The signing key must be the one every controller over the database uses: the first to start
/// records its fingerprint, and one started with another key stops here, saying so, unless
/// `PATRONUS_REPLACE_SIGNING_KEY=1` (the operator gave every controller a new key: access
/// tokens signed with the old one are refused from then on).
async fn check_signing_key(
    store: &Store,
    config: &Config,
    key: &[u8],
    env: &[(String, String)],
) -> anyhow::Result<()> {
    let replace = env
        .iter()
        .any(|(k, v)| k == "PATRONUS_REPLACE_SIGNING_KEY" && v == "1");
    let fingerprint = auth::key_fingerprint(key);
    let mut tx = store.begin().await?;
    let claim = crate::store::settings::claim_signing_key(
        &mut tx,
        &fingerprint,
        replace,
        crate::store::now_s(),
    )
    .await?;
    tx.commit().await?;
    match claim {
        KeyClaim::Other(other) => anyhow::bail!(
            "jwt_key_file {}: this is not the key the controllers over this database sign access \
             tokens with (this one's fingerprint is {fingerprint}, theirs {other}): give every \
             controller the same key file (mode 0600), or, to replace the key on all of them, \
             start with PATRONUS_REPLACE_SIGNING_KEY=1",
            config.jwt_key_file.display()
        ),
        KeyClaim::Replaced => tracing::warn!(
            %fingerprint,
            "PATRONUS_REPLACE_SIGNING_KEY: this controller's signing key is now the one; access tokens signed with the old one are refused; a controller still running with it takes the new key from its jwt_key_file within seconds, and until it has it signs and accepts no token"
        ),
        KeyClaim::Same | KeyClaim::Recorded => {}
    }
    Ok(())
}

/// With an empty database, `PATRONUS_ADMIN_EMAIL` (and `PATRONUS_ADMIN_PASSWORD`, or else a
/// generated password written 0600 to `<data_dir>/initial-admin-password`) create the first
/// admin. There is no other way in over the network.
async fn bootstrap_admin(
    store: &Store,
    data_dir: &std::path::Path,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    if store.user_count().await? > 0 {
        return Ok(());
    }
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(email) = get("PATRONUS_ADMIN_EMAIL") else {
        if get("PATRONUS_ADMIN_PASSWORD").is_some() {
            anyhow::bail!("PATRONUS_ADMIN_PASSWORD is set without PATRONUS_ADMIN_EMAIL");
        }
        tracing::warn!(
            "the database has no users: nobody can log in. Set PATRONUS_ADMIN_EMAIL (and \
             PATRONUS_ADMIN_PASSWORD, or one is generated) and restart, or run \
             `patronus controller add-user`"
        );
        return Ok(());
    };
    let (password, file) = match get("PATRONUS_ADMIN_PASSWORD") {
        Some(p) => (p, None),
        None => {
            // 144 random bits, and the four character classes the strength rule asks for.
            let p = format!("{}-Aa1", auth::b64url(&auth::random_bytes::<18>()));
            let path = data_dir.join("initial-admin-password");
            write_private(&path, &p)?;
            (p, Some(path))
        }
    };
    let actor = Actor {
        id: None,
        name: "bootstrap".into(),
        source: "environment".into(),
    };
    let u = add_user(
        store,
        &actor,
        NewUser {
            email,
            name: "Administrator".into(),
            role: Role::Admin,
            password,
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "creating the first admin from PATRONUS_ADMIN_EMAIL and PATRONUS_ADMIN_PASSWORD: {}",
            e.message
        )
    })?;
    match file {
        Some(path) => tracing::info!(
            email = %u.email,
            password_file = %path.display(),
            "created the first admin; the generated password is in the file (0600): log in, \
             change it, delete the file"
        ),
        None => tracing::info!(email = %u.email, "created the first admin"),
    }
    Ok(())
}

/// Writes a new file readable by its owner only; refuses to overwrite one.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

/// How many connections the kernel may hold for the controller before it accepts them (capped
/// by `net.core.somaxconn`, 4096 by default since Linux 5.4). Edges come in herds: when a
/// controller dies or restarts, every edge it held reconnects within a second, and with the
/// 1024 that tokio's `bind` asks for, a thousand simulated edges connecting at once overflowed
/// the queue here: the SYNs dropped were retried a second later (`bench push` then saw edges
/// 250-460 ms behind the rest, and `nstat` 1,200 `ListenOverflows` per run).
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as `bind` sets it,
/// so that a restarted controller binds its port while old connections linger in TIME_WAIT).
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Where the controller serves, once it does.
#[derive(Debug, Clone)]
pub struct Listening {
    pub addr: SocketAddr,
    /// The served certificate's fingerprint (`sha256:…`), unless `plain_http`.
    pub fingerprint: Option<String>,
    /// Where the STUN responder answers (UDP), unless `stun_port = 0`.
    pub stun: Option<SocketAddr>,
}

impl Listening {
    /// The API's base URL: `https://addr` (or `http://` with `plain_http`).
    pub fn url(&self) -> String {
        let scheme = if self.fingerprint.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }
}

/// Serves until `shutdown` completes, then finishes the requests in flight (for at most the
/// request timeout) and closes the store; with the background work of a controller
/// (webhooks, scheduled backups, housekeeping, following the signing key and the TLS
/// certificate files).
pub async fn serve(
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(&Listening),
) -> anyhow::Result<()> {
    let addr = state.config.listen;
    let listener = listen(addr).with_context(|| format!("listening on {addr}"))?;
    let tls = state.tls.get().cloned();
    if let Some(tls) = &tls {
        // Installed before the listener is announced: a SIGHUP from then on reloads the
        // certificate instead of ending the process.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("watching SIGHUP")?;
        tokio::spawn(crate::https::watch(
            tls.clone(),
            Some(hup),
            crate::https::LOOK_EVERY,
        ));
    }
    let local = listener.local_addr()?;
    let stun_port = match state.config.stun_port {
        crate::config::StunPort::Api => Some(local.port()),
        crate::config::StunPort::Port(p) => Some(p),
        crate::config::StunPort::Off => None,
    };
    let stun = match stun_port {
        Some(p) => {
            let at = SocketAddr::new(local.ip(), p);
            let socket = match tokio::net::UdpSocket::bind(at).await {
                Ok(s) => s,
                // An API on a port the kernel chose (tests, benches): that number may be taken
                // for UDP; the responder then takes one the kernel chooses too (it says where).
                Err(_)
                    if state.config.listen.port() == 0
                        && state.config.stun_port == crate::config::StunPort::Api =>
                {
                    tokio::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0))
                        .await
                        .context("binding UDP for the STUN responder")?
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("stun_port: binding UDP {at} for the STUN responder")
                    });
                }
            };
            Some((socket.local_addr()?, socket))
        }
        None => None,
    };
    on_listening(&Listening {
        addr: local,
        fingerprint: tls.as_ref().map(|t| t.fingerprint()),
        stun: stun.as_ref().map(|(a, _)| *a),
    });
    if let Some((at, socket)) = stun {
        let _ = state.stun_port.set(at.port());
        tokio::spawn(crate::stun::serve(state.clone(), socket));
    }
    crate::webhooks::start(&state);
    tokio::spawn(crate::backup::schedule(state.clone()));
    tokio::spawn(housekeeping(state.store.clone()));
    tokio::spawn(watch_signing_key(state.clone(), SIGNING_KEY_LOOK));
    serve_connections(state, listener, shutdown).await
}

/// The connections of [`serve`], on `listener`, over TLS when the state has a certificate.
///
/// Connections are served here rather than by `axum::serve`, for what an exposed service needs
/// and it lacks: at most `max_connections` at once (and never more than the open-file limit
/// leaves room for), at most `max_connections_per_address` from one address, a header-read
/// timeout counted from a request's first byte (and one for the TLS handshake), and an idle
/// timeout for connections with no request in flight. A connection over a cap is closed at
/// once: a client that opens sockets and sends nothing cannot starve the others.
pub async fn serve_connections(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = state.store.clone();
    let tls = state.tls.get().cloned();
    let limits = Arc::new(Limits::new(&state.config));
    tracing::info!(
        max_connections = limits.total,
        per_address = limits.per_address,
        tls = tls.is_some(),
        "serving the API"
    );
    let timeouts = Timeouts {
        header: state.config.header_read_timeout,
        idle: state.config.idle_timeout,
    };
    let drain = state.config.request_timeout;
    let app = router(state.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: the connections already open are
                    // served; accepting resumes when one closes.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = limits.admit(peer.ip()) else {
            state.http.refused_connection();
            tracing::debug!(%peer, "connection refused: over the connection limit");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, stopped) = (app.clone(), stopped.clone());
        match &tls {
            None => {
                connections.spawn(serve_connection(app, stream, peer, slot, timeouts, stopped));
            }
            Some(tls) => {
                let (acceptor, state) = (tls.acceptor(), state.clone());
                connections.spawn(async move {
                    // The handshake has the header-read timeout: a client that connects and
                    // sends nothing (or half a handshake) holds its slot no longer than one
                    // that sends half a request.
                    match tokio::time::timeout(timeouts.header, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            serve_connection(app, tls, peer, slot, timeouts, stopped).await;
                        }
                        Ok(Err(e)) => {
                            state.http.failed_handshake();
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            state.http.failed_handshake();
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    state.stopping.send_replace(true);
    let _ = stop.send(true);
    if tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "requests still open after the drain time; closing them"
        );
        connections.abort_all();
    }
    // Closing the pool checkpoints the write-ahead log into the database file.
    store.close().await;
    Ok(())
}

/// Refused attempts kept in the audit log: the newest this many, and none older than
/// [`REFUSED_ATTEMPTS_DAYS`].
pub const REFUSED_ATTEMPTS_KEPT: i64 = 100_000;
/// How long refused attempts are kept in the audit log.
pub const REFUSED_ATTEMPTS_DAYS: i64 = 90;

/// What anyone can add to the store without logging in, held to its bound, and telemetry to
/// its retention: every minute, rate buckets full again, failure counts that lock nothing and
/// telemetry older than its retention are removed; every hour, refused attempts beyond what
/// the audit log keeps. (Each is a conditional delete: any number of controllers can run it.)
async fn housekeeping(store: crate::store::Store) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    let mut rounds: u64 = 0;
    loop {
        tick.tick().await;
        let now = crate::store::now_ms();
        // Each delete is atomic on its own: no write lock.
        let pruned = async {
            crate::store::throttle::prune(
                &mut *store.conn().await?,
                now - 60_000,
                now - auth::FAILURES_FORGOTTEN_MS,
                now,
            )
            .await
        };
        if let Err(e) = pruned.await {
            tracing::warn!(error = %e, "rate buckets and old login failures not removed");
        }
        let ended = async {
            crate::store::sessions::prune(&mut *store.conn().await?, crate::store::now_ms()).await
        };
        if let Err(e) = ended.await {
            tracing::warn!(error = %e, "ended dashboard sessions not removed");
        }
        // Traffic pending for a minute that no report came to keep (its edge went quiet).
        let flushed = async {
            let mut tx = store.begin().await?;
            let n = crate::store::telemetry::flush_traffic(
                &mut tx,
                crate::store::now_s() - crate::store::telemetry::TRAFFIC_EVERY_S,
            )
            .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(n)
        };
        if let Err(e) = flushed.await {
            tracing::warn!(error = %e, "pending traffic not kept");
        }
        // Telemetry beyond its retention, a batch at a time.
        let t = std::time::Instant::now();
        match crate::store::telemetry::sweep(&store, crate::store::now_s()).await {
            Ok(rows) if rows.iter().any(|(_, n)| *n > 0) => tracing::info!(
                ?rows,
                took_ms = t.elapsed().as_millis() as u64,
                "telemetry beyond its retention removed"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "telemetry beyond its retention not removed"),
        }
        rounds += 1;
        if rounds % 60 != 1 {
            continue;
        }
        let before = now - REFUSED_ATTEMPTS_DAYS * 86_400_000;
        match store
            .trim_refused_attempts(REFUSED_ATTEMPTS_KEPT, before)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                "old refused attempts removed from the audit log"
            ),
            Err(e) => tracing::warn!(error = %e, "refused attempts not trimmed"),
        }
    }
}

/// How often a controller checks that its signing key is still the one recorded.
const SIGNING_KEY_LOOK: Duration = Duration::from_secs(2);

/// Keeps this controller's signing key the one recorded in the database
/// (`patronus controller rotate-secrets`, or `PATRONUS_REPLACE_SIGNING_KEY` on another
/// controller, replaces it there): when the record changes, the controller reads its
/// `jwt_key_file` again and signs with it if it is the recorded key; if it is not (the new key
/// has not reached this machine yet), it accepts no access token and signs none (503 on login)
/// until it is, checking every `every`. Tokens signed with the old key are refused from then on.
pub async fn watch_signing_key(state: AppState, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        follow_signing_key(&state).await;
    }
}

/// One look of [`watch_signing_key`]; also taken before a login or a refresh signs a token,
/// so that none is signed with a key replaced since the last look.
pub async fn follow_signing_key(state: &AppState) {
    let recorded = match state.store.conn().await {
        Ok(mut c) => crate::store::settings::signing_key(&mut c).await,
        Err(e) => Err(e),
    };
    let Ok(Some(recorded)) = recorded else {
        return;
    };
    let ours = state.tokens.fingerprint();
    if recorded == ours && state.tokens.trusted() {
        return;
    }
    let file = &state.config.jwt_key_file;
    // The file as the controller would read it at start (0600, at least 32 bytes), but never
    // made here: a missing file is a missing key.
    let read = std::fs::metadata(file)
        .map_err(|error| crate::store::StoreError::Io {
            what: file.display().to_string(),
            error,
        })
        .and_then(|_| auth::load_or_create_key(file))
        .and_then(|key| {
            if auth::key_fingerprint(&key) == recorded {
                Ok(key)
            } else {
                Err(crate::store::StoreError::Io {
                    what: file.display().to_string(),
                    error: std::io::Error::other("it holds another key than the one recorded"),
                })
            }
        });
    match read {
        Ok(key) => {
            state.tokens.replace(&key);
            tracing::warn!(
                fingerprint = %recorded,
                "the signing key was replaced: signing with the new jwt_key_file; access tokens signed with the old key are refused"
            );
        }
        Err(e) if state.tokens.trusted() => {
            state.tokens.distrust();
            tracing::error!(
                ours = %ours,
                recorded = %recorded,
                error = %e,
                "the signing key was replaced and this controller's jwt_key_file is not the new key: it accepts no access token and signs none until the new key is in that file"
            );
        }
        Err(_) => {}
    }
}

/// The most connections the controller serves at once: `max_connections`, held below what the
/// open-file limit (`soft`, when known) leaves once the database, the log and outgoing webhook
/// connections have theirs.
pub fn connection_cap(max_connections: u32, soft: Option<u64>) -> u32 {
    /// Descriptors kept for everything but client connections.
    const RESERVE: u64 = 96;
    match soft {
        Some(soft) => {
            let room = soft.saturating_sub(RESERVE).max(16);
            max_connections.min(u32::try_from(room).unwrap_or(u32::MAX))
        }
        None => max_connections,
    }
}

/// The open-file soft limit, from `/proc/self/limits`.
fn open_file_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The connection caps and who holds what.
#[derive(Debug)]
struct Limits {
    total: u32,
    per_address: u32,
    trusted: Vec<patronus_api::Prefix>,
    open: Mutex<(u32, HashMap<IpAddr, u32>)>,
}

impl Limits {
    fn new(c: &crate::config::Config) -> Self {
        Self {
            total: connection_cap(c.max_connections, open_file_limit()),
            per_address: c.max_connections_per_address,
            trusted: c.trusted_proxies.clone(),
            open: Mutex::new((0, HashMap::new())),
        }
    }

    /// A place for a connection from `ip`, or `None` over a cap.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.total {
            return None;
        }
        let capped = !self.trusted.iter().any(|p| p.contains(ip));
        if capped {
            let n = open.1.entry(ip).or_insert(0);
            if *n >= self.per_address {
                return None;
            }
            *n += 1;
        }
        open.0 += 1;
        Some(Slot {
            limits: self.clone(),
            ip: capped.then_some(ip),
        })
    }
}

/// A connection's place under the caps, given back when it closes.
#[derive(Debug)]
struct Slot {
    limits: Arc<Limits>,
    /// The address it counts against, unless it is a trusted proxy's.
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(ip) = self.ip {
            if let Some(n) = open.1.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.1.remove(&ip);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
}

/// What a connection is doing, for its timeouts.
#[derive(Debug)]
struct Activity {
    /// Requests being answered.
    in_flight: u32,
    /// When the last request was answered (or the connection opened).
    idle_since: Instant,
    /// When the first byte of a request not yet handed to the router arrived.
    head_started: Option<Instant>,
}

type Shared = Arc<Mutex<Activity>>;

/// When the connection must close if nothing changes (`None` while a request is answered).
fn deadline(a: &Activity, t: Timeouts) -> Option<Instant> {
    if a.in_flight > 0 {
        return None;
    }
    Some(match a.head_started {
        Some(h) => h + t.header,
        None => a.idle_since + t.idle,
    })
}

/// Serves one connection until it closes, times out, or the server stops (then its request in
/// flight is finished and the connection closed).
async fn serve_connection<S>(
    app: axum::Router,
    stream: S,
    peer: SocketAddr,
    slot: Slot,
    t: Timeouts,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity: Shared = Arc::new(Mutex::new(Activity {
        in_flight: 0,
        idle_since: Instant::now(),
        head_started: None,
    }));
    let io = hyper_util::rt::TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            {
                let mut a = activity.lock().unwrap_or_else(|e| e.into_inner());
                a.in_flight += 1;
                a.head_started = None;
            }
            let done = InFlight(activity.clone());
            let mut app = app.clone();
            async move {
                // In flight until its body is sent, not just its head: an event stream (or a
                // large body to a slow reader) is not an idle connection.
                let r = tower::Service::call(&mut app, req).await;
                r.map(|resp| {
                    resp.map(|body| axum::body::Body::new(Answering { body, _done: done }))
                })
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let wake = {
            let a = activity.lock().unwrap_or_else(|e| e.into_inner());
            deadline(&a, t)
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                break;
            }
            _ = stopped.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = sleep_until(wake) => {
                let a = activity.lock().unwrap_or_else(|e| e.into_inner());
                if deadline(&a, t).is_some_and(|d| d <= Instant::now()) {
                    let why = if a.head_started.is_some() { "header read" } else { "idle" };
                    tracing::debug!(%peer, why, "connection timed out");
                    break;
                }
            }
        }
    }
    drop(slot);
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Marks a request answered when dropped (however its future ends).
struct InFlight(Shared);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut a = self.0.lock().unwrap_or_else(|e| e.into_inner());
        a.in_flight = a.in_flight.saturating_sub(1);
        a.idle_since = Instant::now();
    }
}

/// A response's body, holding its request [`InFlight`] until it is sent (or dropped).
struct Answering {
    body: axum::body::Body,
    _done: InFlight,
}

impl axum::body::HttpBody for Answering {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A client connection that notes when a request's first byte arrives.
struct Watched<S> {
    inner: S,
    activity: Shared,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let mut a = self.activity.lock().unwrap_or_else(|e| e.into_inner());
            if a.in_flight == 0 && a.head_started.is_none() {
                a.head_started = Some(Instant::now());
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A future that completes on SIGTERM or SIGINT. The handlers are installed now, before the
/// listener is announced, so that a signal sent as soon as the controller is up is caught, not
/// fatal. Call it inside the runtime.
pub fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: finishing requests in flight");
    })
}
