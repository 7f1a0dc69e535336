//! `patronus edge …`: run a site's data plane from a local configuration file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use patronus_api::EdgeConfig;
use patronus_edge::{Edge, PrivateKey};

#[derive(Debug, Subcommand)]
pub enum EdgeCmd {
    /// Run the edge (root: it creates a TUN device and routes): from a whole local
    /// configuration (`--config`), or from a controller (`--local`: this machine's links and
    /// the controller's URL; the rest comes from the controller).
    Run {
        /// The edge's whole TOML configuration (standalone).
        #[arg(long, conflicts_with_all = ["local", "token"], required_unless_present = "local")]
        config: Option<PathBuf>,
        /// This machine's part of the configuration (controller mode).
        #[arg(long)]
        local: Option<PathBuf>,
        /// A one-time enrolment token (`patronus site enroll-token`), for the first start;
        /// also PATRONUS_ENROLL_TOKEN.
        #[arg(long, requires = "local")]
        token: Option<String>,
        /// Trust only the controller certificate with this fingerprint (as with `enroll`).
        #[arg(long, requires = "local")]
        ca_fingerprint: Option<String>,
    },
    /// Enrol with a controller (generating this edge's key pair; only the public key is sent)
    /// without starting the data plane; `run --local` then starts it.
    Enroll {
        /// This machine's part of the configuration.
        #[arg(long)]
        local: PathBuf,
        /// The one-time token from `patronus site enroll-token`; also PATRONUS_ENROLL_TOKEN.
        #[arg(long)]
        token: Option<String>,
        /// Trust only the controller certificate with this SHA-256 fingerprint (printed by the
        /// controller at start), instead of any CA; kept in the state directory for the next
        /// starts (`ca_fingerprint` in the local file does the same).
        #[arg(long)]
        ca_fingerprint: Option<String>,
    },
    /// Print the edge's public key, generating its private key (0600) first if there is none.
    Pubkey {
        /// Where the private key is (or will be) stored.
        #[arg(long)]
        key: PathBuf,
    },
    /// Show a running edge's peers, paths and recent events (from its `metrics_listen` address).
    Status {
        #[arg(long, default_value = "127.0.0.1:9101")]
        addr: std::net::SocketAddr,
        /// Print the JSON snapshot instead of a table.
        #[arg(long)]
        json: bool,
        /// The edge's `metrics_token_file`, if it has one.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Answer Patronus path probes (STAMP, RFC 8762 layout) on a peer that does not run a Patronus
    /// edge, e.g. a stock WireGuard box: listen on its overlay address, port 862.
    Reflect {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Check a configuration file and print every problem in it.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

pub fn run(cmd: EdgeCmd) -> anyhow::Result<()> {
    match cmd {
        EdgeCmd::Pubkey { key } => {
            let k = PrivateKey::load_or_create(&key)?;
            outln!("{}", k.public());
            Ok(())
        }
        EdgeCmd::Status {
            addr,
            json,
            token_file,
        } => status(addr, json, token_file.as_deref()),
        EdgeCmd::Enroll {
            local,
            token,
            ca_fingerprint,
        } => {
            let token = token.or_else(|| std::env::var("PATRONUS_ENROLL_TOKEN").ok());
            let local_cfg = read_local(&local, ca_fingerprint.as_deref())?;
            enrol(&local_cfg, &via(&local_cfg), token)?;
            Ok(())
        }
        EdgeCmd::Reflect { listen } => reflect(listen),
        EdgeCmd::Check { config } => {
            load(&config)?;
            outln!("{}: ok", config.display());
            Ok(())
        }
        EdgeCmd::Run {
            config,
            local,
            token,
            ca_fingerprint,
        } => {
            // Shutdown signals are taken by one thread with sigwait, which stops the loop; the
            // TUN device (and with it every route through it) goes when the edge exits.
            let signals = crate::block_shutdown_signals()?;
            let (cfg, key, follow) = match (config, local) {
                (Some(config), _) => {
                    let cfg = load(&config)?;
                    let key = PrivateKey::load_or_create(&cfg.private_key_file)?;
                    (cfg, key, None)
                }
                (None, Some(local)) => {
                    let token = token.or_else(|| std::env::var("PATRONUS_ENROLL_TOKEN").ok());
                    let (cfg, key, follow) =
                        from_controller(&local, token, ca_fingerprint.as_deref())?;
                    (cfg, key, Some(follow))
                }
                (None, None) => bail!("give --config or --local"),
            };
            let mut edge = Edge::new(&cfg, &key).context("starting the edge")?;
            let stop = edge.stop_handle();
            if let Some(f) = follow {
                let status = edge.status_shared();
                let (urls, credential) = (f.local.controller.clone(), f.credential.clone());
                let via = f.via.clone();
                std::thread::Builder::new()
                    .name("telemetry".into())
                    .spawn(move || report(&via, &urls, &credential, &status))?;
                let inbox = edge.config_inbox();
                let status = edge.status_shared();
                std::thread::Builder::new()
                    .name("controller".into())
                    .spawn(move || f.run(inbox, status))?;
            }
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    if let Ok(sig) = signals.wait() {
                        eprintln!("edge: {sig:?}, stopping");
                    }
                    stop.stop();
                })?;
            eprintln!(
                "edge {} up: public key {}, {} links, {} peers, TUN MTU {}",
                cfg.site,
                key.public(),
                cfg.links.len(),
                cfg.peers.len(),
                edge.tun_mtu()
            );
            edge.run()?;
            Ok(())
        }
    }
}

/// How often the reporter looks for news (a failover, a path's change of state).
const NEWS_LOOK: std::time::Duration = std::time::Duration::from_millis(50);

/// The least time between two reports sent for news.
const NEWS_GAP: std::time::Duration = std::time::Duration::from_millis(200);

/// Every 5 s, the paths' measurements to the controller, and within [`NEWS_LOOK`] when there is a
/// failover or a path's change of state to tell, at most one such report per [`NEWS_GAP`] (a
/// flapping path's events go together); while the controller cannot be reached, every 5 s
/// (best effort: measurements that cannot be delivered are dropped, and the next report says
/// where things are; events are sent again until the controller has them).
fn report(
    via: &crate::api_client::Via,
    urls: &patronus_api::ControllerUrls,
    credential: &Credential,
    status: &patronus_edge::status::Shared,
) {
    use std::time::{Duration, Instant};
    let mut failing = false;
    // The last failover event the controller has.
    let mut reported = 0u64;
    // The last path event the controller has.
    let mut reported_paths = 0u64;
    let mut last = Instant::now();
    let mut last_news: Option<Instant> = None;
    loop {
        std::thread::sleep(NEWS_LOOK);
        let (snap, news) = {
            let Ok(s) = status.lock() else { return };
            let news = s.failover_events.iter().any(|e| e.seq > reported)
                || s.path_events.iter().any(|e| e.seq > reported_paths);
            let periodic = last.elapsed() >= Duration::from_secs(5);
            let news_due = news && !failing && last_news.is_none_or(|t| t.elapsed() >= NEWS_GAP);
            if !(periodic || news_due) {
                continue;
            }
            (s.clone(), news)
        };
        last = Instant::now();
        if news {
            last_news = Some(last);
        }
        let t = patronus_api::Telemetry {
            paths: snap
                .paths
                .iter()
                .map(|p| patronus_api::PathReport {
                    peer: p.peer.clone(),
                    local_link: p.local_link.clone(),
                    remote_link: p.remote_link.clone(),
                    state: p.state,
                    rtt_ms: p.rtt_ms,
                    jitter_ms: p.jitter_ms,
                    loss_pct: p.loss_pct,
                    tx_bytes: p.tx_bytes,
                    rx_bytes: p.rx_bytes,
                    tx_packets: p.tx_packets,
                    rx_packets: p.rx_packets,
                    relayed: p.relayed,
                })
                .collect(),
            classes: snap
                .classes
                .iter()
                .map(|c| patronus_api::ClassReport {
                    class: c.class.clone(),
                    tx_packets: c.tx_packets,
                    tx_bytes: c.tx_bytes,
                })
                .collect(),
            started_ms: snap.started_unix_ms,
            failovers: snap
                .failover_events
                .iter()
                .filter(|e| e.seq > reported)
                .cloned()
                .collect(),
            path_events: snap
                .path_events
                .iter()
                .filter(|e| e.seq > reported_paths)
                .cloned()
                .collect(),
        };
        let newest = t.failovers.iter().map(|e| e.seq).max();
        let newest_path = t.path_events.iter().map(|e| e.seq).max();
        let Ok(body) = serde_json::to_value(&t) else {
            continue;
        };
        let r = control(
            urls,
            via,
            "POST",
            "/api/v1/edge/telemetry",
            Some(&credential.get()),
            Some(&body),
            &[],
        );
        match r {
            Ok(r) if r.status == 204 => {
                failing = false;
                reported = newest.unwrap_or(reported);
                reported_paths = newest_path.unwrap_or(reported_paths);
            }
            other if !failing => {
                failing = true;
                let why = crate::api_client::failure_text(&other);
                eprintln!("edge: telemetry not delivered ({why}); retrying every 5 s");
            }
            _ => {}
        }
    }
}

/// The controller (of `urls`) this edge uses now: the last that answered.
static CURRENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One request to the controllers: to the one in use first, then, if it cannot be reached or
/// answers that it cannot serve (502, 503, 504), to each next one in turn. Giving up on the one
/// in use moves the control connection to the next at once, before that one answers (a long
/// poll there may take 25 s to), so the edge's other requests go there too; a move is logged
/// and counted (`patronus_edge_control_failovers_total`, `control` in `edge status`). A long
/// poll on a controller that dies fails at once (its connection is closed or reset), so the
/// edge is on the next controller within the time it takes to notice that.
///
/// A write (POST) moves on only if it never reached the controller (no connection) or the
/// controller said it could not serve it: one whose answer was lost may have been done, and
/// doing it again elsewhere would spend an enrolment token twice or count a report twice.
fn control(
    urls: &patronus_api::ControllerUrls,
    via: &crate::api_client::Via,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
    headers: &[(&str, &str)],
) -> anyhow::Result<crate::api_client::Response> {
    use std::sync::atomic::Ordering;
    let all = urls.urls();
    let n = all.len();
    let first = CURRENT.load(Ordering::Relaxed) % n;
    let mut last = None;
    for k in 0..n {
        let i = (first + k) % n;
        let r =
            crate::api_client::request_via(Some(via), &all[i], method, path, token, body, headers);
        let unavailable = match &r {
            Ok(r) => matches!(r.status, 502..=504),
            Err(e) => method == "GET" || never_reached(e),
        };
        if !unavailable {
            // Where it answered is where the next request goes (another request may have
            // moved elsewhere meanwhile).
            CURRENT.store(i, Ordering::Relaxed);
            patronus_edge::status::control_in_use(&all[i], n);
            return r;
        }
        // When none answers, the last one tried stays in use: the next request starts there
        // (and each move on the way was logged and counted: during an outage of them all,
        // the count grows with every request, as it should for an alert to see it).
        if k + 1 < n {
            let next = (i + 1) % n;
            // Only the first request to give up on `i` moves (and says so).
            if CURRENT
                .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                eprintln!(
                    "edge: the control connection moved from {} to {} ({})",
                    all[i],
                    all[next],
                    crate::api_client::failure_text(&r)
                );
                patronus_edge::status::control_moved(&all[next], n);
            }
        }
        last = Some(r);
    }
    last.unwrap_or_else(|| Err(anyhow::anyhow!("no controller URL")))
}

/// Whether a request failed before reaching the controller: no address, or no connection
/// (`api_client::request_via` says which step failed first).
fn never_reached(e: &anyhow::Error) -> bool {
    let m = e.to_string();
    m.starts_with("connecting to the controller") || m.starts_with("resolving")
}

/// This edge's site credential, shared by the threads that talk to the controller: replaced
/// when the edge enrols again.
#[derive(Debug, Clone)]
struct Credential(std::sync::Arc<std::sync::RwLock<String>>);

impl Credential {
    fn new(c: String) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(c)))
    }

    fn get(&self) -> String {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, c: String) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = c;
    }
}

/// The file an operator puts a new enrolment token in for an edge whose credential the
/// controller refuses (revoked after a breach: `patronus controller rotate-secrets
/// --revoke-site-credentials`): the running edge enrols again with it, with the key it has.
const ENROLL_TOKEN_FILE: &str = "enroll-token";

/// What the edge needs to keep following the controller once it runs.
struct Follow {
    local: patronus_api::EdgeLocal,
    /// The links' addresses, to reach the controller over whichever link works.
    via: std::sync::Arc<crate::api_client::Via>,
    credential: Credential,
    /// Key rotations asked for in the configuration last seen.
    key_rotation: u64,
    /// The version of the configuration in force and that configuration, which deltas apply
    /// to (none when it came from the cache).
    held: Option<(String, patronus_api::SiteConfig)>,
    /// The site's name, for endpoint discovery.
    site: String,
    /// The controller's STUN service as last told (its URL and UDP port), and the discovery
    /// the edge was given for it.
    stun: Option<(String, u16)>,
    discovery: Option<(String, u16, [u8; 32])>,
}

/// How many key rotations this edge has done (`<state>/key-rotations`).
fn rotations_done(local: &patronus_api::EdgeLocal) -> u64 {
    std::fs::read_to_string(local.state_dir.join("key-rotations"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Records that the key rotations asked for up to `n` are done.
fn set_rotations_done(state_dir: &Path, n: u64) -> anyhow::Result<()> {
    crate::api_client::write_private(&state_dir.join("key-rotations"), n.to_string().as_bytes())
}

/// One step of a key roll to the controller, retried while it is away; `Ok(false)` if it
/// says the key is already the site's (a step done before an answer was lost).
fn post_key(
    local: &patronus_api::EdgeLocal,
    via: &crate::api_client::Via,
    credential: &str,
    step: &serde_json::Value,
    patience: std::time::Duration,
) -> anyhow::Result<bool> {
    let started = std::time::Instant::now();
    loop {
        let r = control(
            &local.controller,
            via,
            "POST",
            "/api/v1/edge/key",
            Some(credential),
            Some(step),
            &[],
        );
        match r {
            Ok(r) if r.status == 204 => return Ok(true),
            Ok(r) if r.status == 422 && r.body["error"]["code"] == "key_is_current" => {
                return Ok(false);
            }
            // A connected site is rolling its key: ours waits for it.
            Ok(r) if r.status == 409 && r.body["error"]["code"] == "peer_rolling" => {
                if started.elapsed() > patience {
                    bail!("{}", crate::api_client::error_text(&r));
                }
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            Ok(r) if (400..500).contains(&r.status) => {
                bail!(
                    "the controller refused {step}: {}",
                    crate::api_client::error_text(&r)
                )
            }
            other => {
                if started.elapsed() > patience {
                    let why = crate::api_client::failure_text(&other);
                    bail!("the controller did not take {step}: {why}");
                }
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
        }
    }
}

/// Rolls this edge to a new key pair made here, without losing a packet: the controller
/// first tells the peers to accept the new key beside the old; the running edge then gives
/// every path a second session with it and sends on it once its handshake is done; when every
/// live path has moved (or 30 s have passed), the controller makes it the site's key and the
/// file becomes `private.key`.
fn roll_key(
    local: &patronus_api::EdgeLocal,
    via: &crate::api_client::Via,
    credential: &str,
    inbox: &patronus_edge::edge::ConfigInbox,
    status: &patronus_edge::status::Shared,
    rotation: u64,
) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let dir = &local.state_dir;
    let next_path = dir.join("private.key.next");
    let key = PrivateKey::load_or_create(&next_path)?;
    let public = key.public().to_string();
    let patience = Duration::from_secs(120);
    post_key(
        local,
        via,
        credential,
        &serde_json::json!({ "next": public }),
        patience,
    )?;
    eprintln!("edge: key rotation {rotation}: the peers are told to accept {public} too");
    // The peers take the change from their long polls at once; a second is plenty.
    std::thread::sleep(Duration::from_secs(1));
    inbox.roll(patronus_edge::edge::Roll::Begin(key));
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let r = status
            .lock()
            .ok()
            .and_then(|s| s.key_roll.clone())
            .unwrap_or_default();
        if r.live_paths > 0 && r.moved == r.live_paths {
            eprintln!(
                "edge: key rotation {rotation}: all {} live paths moved in {:.1} s",
                r.live_paths, r.since_s
            );
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "edge: key rotation {rotation}: {} of {} live paths moved in 30 s; the rest \
                 move now",
                r.moved, r.live_paths
            );
            break;
        }
    }
    post_key(
        local,
        via,
        credential,
        &serde_json::json!({ "commit": public }),
        patience,
    )?;
    std::fs::rename(&next_path, dir.join("private.key"))
        .with_context(|| format!("renaming {}", next_path.display()))?;
    inbox.roll(patronus_edge::edge::Roll::Commit);
    set_rotations_done(dir, rotation)
}

/// A key roll that a restart interrupted: the new key (`private.key.next`) is made the site's
/// and this edge's before it starts (its sessions are new anyway).
fn finish_interrupted_roll(
    local: &patronus_api::EdgeLocal,
    via: &crate::api_client::Via,
    credential: &str,
) -> anyhow::Result<()> {
    let dir = &local.state_dir;
    let next_path = dir.join("private.key.next");
    if !next_path.exists() {
        return Ok(());
    }
    let key = PrivateKey::load_or_create(&next_path)?;
    let public = key.public().to_string();
    eprintln!("edge: finishing an interrupted key roll to {public}");
    // Not long: with the controller away the edge starts on the key it has, and the roll is
    // finished (with this same next key) once the controller is back.
    let patience = std::time::Duration::from_secs(10);
    if post_key(
        local,
        via,
        credential,
        &serde_json::json!({ "next": public }),
        patience,
    )? {
        post_key(
            local,
            via,
            credential,
            &serde_json::json!({ "commit": public }),
            patience,
        )?;
    }
    std::fs::rename(&next_path, dir.join("private.key"))
        .with_context(|| format!("renaming {}", next_path.display()))?;
    Ok(())
}

impl Follow {
    /// Tells the edge where to ask how its links are seen (see
    /// `patronus_edge::edge::Discovery`): the controller that answered last, at the STUN port
    /// it gave, keyed with the credential; or to stop, if it gave none.
    fn discover(&mut self, inbox: &patronus_edge::edge::ConfigInbox) {
        let key = patronus_controller::auth::sha256(self.credential.get().as_bytes());
        let want = self.stun.clone().map(|(url, port)| (url, port, key));
        if want == self.discovery {
            return;
        }
        let d = match &want {
            Some((url, port, key)) => match crate::api_client::udp_addresses(url, *port) {
                Ok(servers) => Some(patronus_edge::edge::Discovery {
                    servers,
                    site: self.site.clone(),
                    key: *key,
                }),
                Err(e) => {
                    eprintln!("edge: endpoint discovery: {e:#}");
                    return;
                }
            },
            None => None,
        };
        inbox.discover(d);
        self.discovery = want;
    }

    /// Waits until an operator puts a new enrolment token in `<state_dir>/enroll-token`, then
    /// enrols again with it and this edge's key (the key does not change: the peers' sessions
    /// carry on), and takes the new credential. A token the controller refuses is moved to
    /// `enroll-token.refused`, and the wait goes on.
    ///
    /// Meanwhile, every 5 s, the credential it has is tried again: a site restored from a
    /// backup after it was deleted by mistake brings its credential back.
    fn enrol_again(&mut self) {
        let file = self.local.state_dir.join(ENROLL_TOKEN_FILE);
        let mut waited = 0u32;
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            waited += 1;
            if waited % 5 == 0 {
                let r = control(
                    &self.local.controller,
                    &self.via,
                    "GET",
                    "/api/v1/edge/config",
                    Some(&self.credential.get()),
                    None,
                    &[],
                );
                if matches!(r, Ok(ref r) if r.status == 200) {
                    eprintln!("edge: the controller accepts this edge's credential again");
                    return;
                }
            }
            let Ok(token) = std::fs::read_to_string(&file) else {
                continue;
            };
            let token = token.trim().to_owned();
            let attempt = PrivateKey::load_or_create(&self.local.state_dir.join("private.key"))
                .map_err(anyhow::Error::from)
                .and_then(|key| enrol_with(&self.local, &self.via, &token, &key));
            match attempt {
                Ok((c, _)) => {
                    self.credential.set(c);
                    let _ = std::fs::remove_file(&file);
                    eprintln!("edge: enrolled again with the token in {}", file.display());
                    return;
                }
                Err(e) if e.to_string().starts_with("enrolment refused") => {
                    eprintln!("edge: {e:#}; the token is moved to enroll-token.refused");
                    let _ = std::fs::rename(&file, file.with_extension("refused"));
                }
                Err(e) => eprintln!("edge: enrolling again: {e:#}; trying again"),
            }
        }
    }

    /// Waits for each new configuration (a long poll) and hands it to the running edge; keeps
    /// it on disk as the last good one. Retries with backoff while the controller is away;
    /// stops if the controller refuses the credential.
    fn run(
        mut self,
        inbox: std::sync::Arc<patronus_edge::edge::ConfigInbox>,
        status: patronus_edge::status::Shared,
    ) {
        let rolling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut backoff = std::time::Duration::from_secs(1);
        self.discover(&inbox);
        loop {
            // A key rotation asked for and not done yet: rolled on a thread of its own, while
            // configurations keep coming (the peers' included).
            if self.key_rotation > rotations_done(&self.local)
                && !rolling.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                let (local, via, credential) =
                    (self.local.clone(), self.via.clone(), self.credential.get());
                let (inbox, status, rolling) = (inbox.clone(), status.clone(), rolling.clone());
                let rotation = self.key_rotation;
                let _ = std::thread::Builder::new()
                    .name("key-roll".into())
                    .spawn(move || {
                        if let Err(e) =
                            roll_key(&local, &via, &credential, &inbox, &status, rotation)
                        {
                            eprintln!("edge: key rotation {rotation} failed: {e:#}");
                        }
                        rolling.store(false, std::sync::atomic::Ordering::SeqCst);
                    });
            }
            let mut headers = Vec::new();
            if let Some((e, _)) = &self.held {
                headers.push(("If-None-Match", e.as_str()));
            }
            // Holding a version the controller sent, the edge asks for what changed since;
            // otherwise (first start, or on the cached one) for the whole configuration.
            let delta = self.held.is_some();
            let path = if delta {
                "/api/v1/edge/config/delta?wait=25"
            } else {
                "/api/v1/edge/config?wait=25"
            };
            let r = control(
                &self.local.controller,
                &self.via,
                "GET",
                path,
                Some(&self.credential.get()),
                None,
                &headers,
            );
            if let Ok(r) = &r {
                if matches!(r.status, 200 | 304) {
                    self.stun = r.stun_port.map(|p| (r.url.clone(), p));
                    self.discover(&inbox);
                }
            }
            match r {
                Ok(r) if r.status == 304 => backoff = std::time::Duration::from_secs(1),
                Ok(r) if r.status == 409 && delta => {
                    // The controller no longer has our version: the whole configuration.
                    self.held = None;
                }
                Ok(r) if r.status == 200 => {
                    backoff = std::time::Duration::from_secs(1);
                    let parsed = match &self.held {
                        Some((_, base)) => {
                            serde_json::from_value::<patronus_api::ConfigDelta>(r.body)
                                .map(|d| d.apply(base))
                        }
                        None => serde_json::from_value::<patronus_api::SiteConfig>(r.body),
                    };
                    let site = match parsed {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("edge: the controller's configuration does not parse: {e}");
                            self.held = None;
                            std::thread::sleep(std::time::Duration::from_secs(5));
                            continue;
                        }
                    };
                    self.key_rotation = site.key_rotation;
                    match adopt(&self.local, &site) {
                        Ok(cfg) => {
                            eprintln!(
                                "edge: new configuration {}{}",
                                r.etag.as_deref().unwrap_or("?"),
                                if delta { " (a delta)" } else { "" }
                            );
                            inbox.send(cfg);
                            if let Some(e) = &r.etag {
                                patronus_edge::status::control_config(e);
                            }
                            self.held = r.etag.map(|e| (e, site));
                        }
                        Err(e) => eprintln!("edge: the new configuration is not used: {e:#}"),
                    }
                }
                Ok(r) if r.status == 401 => {
                    eprintln!(
                        "edge: the controller refused this edge's credential ({}); forwarding \
                         on the configuration it has; put a new enrolment token in {} to enrol \
                         again",
                        crate::api_client::error_text(&r),
                        self.local.state_dir.join(ENROLL_TOKEN_FILE).display()
                    );
                    self.enrol_again();
                }
                other => {
                    let why = crate::api_client::failure_text(&other);
                    eprintln!("edge: the controller is away ({why}); retrying in {backoff:?}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                }
            }
        }
    }
}

/// This machine's configuration from the controller's view of the site, if the edge would run
/// it whole: it fits this machine's links and passes the edge's and the path engine's checks.
fn fit(
    local: &patronus_api::EdgeLocal,
    site: &patronus_api::SiteConfig,
) -> anyhow::Result<EdgeConfig> {
    let (cfg, notes) = local
        .edge_config(site, local.state_dir.join("private.key"))
        .map_err(|e| anyhow::anyhow!("it does not fit this machine: {e}"))?;
    patronus_edge::edge::check(&cfg).map_err(|e| anyhow::anyhow!("the edge refuses it: {e}"))?;
    for n in notes {
        eprintln!("edge: {n}");
    }
    Ok(cfg)
}

/// Makes the controller's view of the site this machine's configuration, and keeps it as the
/// last good one (only if it fits: a configuration this machine cannot run is never kept).
fn adopt(
    local: &patronus_api::EdgeLocal,
    site: &patronus_api::SiteConfig,
) -> anyhow::Result<EdgeConfig> {
    let cfg = fit(local, site)?;
    crate::api_client::write_private(
        &local.state_dir.join("site-config.json"),
        serde_json::to_string_pretty(site)?.as_bytes(),
    )?;
    Ok(cfg)
}

fn from_controller(
    path: &Path,
    token: Option<String>,
    ca_fingerprint: Option<&str>,
) -> anyhow::Result<(EdgeConfig, PrivateKey, Follow)> {
    use patronus_api::SiteConfig;
    let local = read_local(path, ca_fingerprint)?;
    let via = std::sync::Arc::new(via(&local));
    let credential = enrol(&local, &via, token)?;
    let resumed = local.state_dir.join("private.key.next").exists();
    if let Err(e) = finish_interrupted_roll(&local, &via, &credential) {
        eprintln!("edge: {e:#}; running on the key in private.key");
    }
    let key = PrivateKey::load_or_create(&local.state_dir.join("private.key"))?;
    let cache = local.state_dir.join("site-config.json");
    let fetched = control(
        &local.controller,
        &via,
        "GET",
        "/api/v1/edge/config",
        Some(&credential),
        None,
        &[],
    );
    // The controller's configuration if it answers with one this edge would run; otherwise
    // (unreachable, or a configuration that does not parse or that the edge refuses) the
    // last good one it kept, so that a bad push cannot stop an edge at its restart.
    let stun_port = match &fetched {
        Ok(r) if r.status == 200 => r.stun_port.map(|p| (r.url.clone(), p)),
        _ => None,
    };
    let fresh: Result<(SiteConfig, EdgeConfig, Option<String>), String> = match fetched {
        Ok(r) if r.status == 200 => serde_json::from_value::<SiteConfig>(r.body)
            .map_err(|e| format!("its configuration does not parse: {e}"))
            .and_then(|site| {
                adopt(&local, &site)
                    .map(|cfg| (site, cfg, r.etag))
                    .map_err(|e| format!("its configuration is not used: {e:#}"))
            }),
        // Refused (revoked after a breach, or the site enrolled again elsewhere): the edge
        // runs on what it has and waits for a new enrolment token (see `Follow::enrol_again`).
        Ok(r) if r.status == 401 => Err(format!(
            "the controller refused this edge's credential ({})",
            crate::api_client::error_text(&r)
        )),
        other => Err(format!(
            "the controller is unreachable ({})",
            crate::api_client::failure_text(&other)
        )),
    };
    let (site, cfg, etag) = match fresh {
        Ok(f) => f,
        Err(why) => {
            let text = std::fs::read_to_string(&cache)
                .with_context(|| format!("{why}, and there is no earlier configuration from it"))?;
            eprintln!(
                "edge: {why}; running on the last good configuration ({})",
                cache.display()
            );
            let site: SiteConfig = serde_json::from_str(&text)
                .with_context(|| format!("{} is damaged", cache.display()))?;
            let cfg = fit(&local, &site).with_context(|| format!("{}", path.display()))?;
            (site, cfg, None)
        }
    };
    if resumed && !local.state_dir.join("private.key.next").exists() {
        set_rotations_done(&local.state_dir, site.key_rotation)?;
    }
    if let Some(e) = &etag {
        patronus_edge::status::control_config(e);
    }
    Ok((
        cfg,
        key,
        Follow {
            key_rotation: site.key_rotation,
            site: site.site.to_string(),
            stun: stun_port,
            discovery: None,
            held: etag.map(|e| (e, site)),
            local,
            via,
            credential: Credential::new(credential),
        },
    ))
}

/// The controller is reached from each link's address in turn.
fn via(local: &patronus_api::EdgeLocal) -> crate::api_client::Via {
    crate::api_client::Via::new(local.links.iter().map(|l| l.address).collect())
}

/// Where `--ca-fingerprint` is kept for the next starts.
const PIN_FILE: &str = "controller-fingerprint";

/// Reads this machine's part of the configuration, and sets how the controller's certificate
/// is trusted: `pin` (`--ca-fingerprint`, then kept in the state directory), else the local
/// file's `ca_fingerprint`, else the one kept at enrolment, else `ca_file` and the built-in
/// roots.
fn read_local(path: &Path, pin: Option<&str>) -> anyhow::Result<patronus_api::EdgeLocal> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let local: patronus_api::EdgeLocal =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Some(ca) = &local.ca_file {
        crate::api_client::set_ca_file(ca.clone());
    }
    for (i, f) in local.ca_fingerprint.iter().enumerate() {
        patronus_controller::tls::parse_fingerprint(f)
            .map_err(|e| anyhow::anyhow!("{}: ca_fingerprint[{i}]: {e}", path.display()))?;
    }
    let kept = local.state_dir.join(PIN_FILE);
    let pins = if let Some(fp) = pin {
        patronus_controller::tls::parse_fingerprint(fp)
            .map_err(|e| anyhow::anyhow!("--ca-fingerprint: {e}"))?;
        create_state_dir(&local.state_dir)?;
        crate::api_client::write_private(&kept, format!("{}\n", fp.trim()).as_bytes())?;
        vec![fp.trim().to_owned()]
    } else if !local.ca_fingerprint.is_empty() {
        local.ca_fingerprint.clone()
    } else {
        match std::fs::read_to_string(&kept) {
            Ok(t) => vec![t.trim().to_owned()],
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", kept.display())),
        }
    };
    if !pins.is_empty() {
        crate::api_client::pin(&pins).with_context(|| format!("{}", kept.display()))?;
    }
    Ok(local)
}

/// The state directory, 0700, made if missing.
fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Enrols with `token`, this edge's `key` and its links' public endpoints; writes the
/// credential the controller gives to `<state_dir>/credential` and returns it, with the
/// controller's answer.
fn enrol_with(
    local: &patronus_api::EdgeLocal,
    via: &crate::api_client::Via,
    token: &str,
    key: &PrivateKey,
) -> anyhow::Result<(String, serde_json::Value)> {
    let endpoints: serde_json::Map<String, serde_json::Value> = local
        .links
        .iter()
        .filter_map(|l| Some((l.name.to_string(), l.public_endpoint?.to_string().into())))
        .collect();
    let r = control(
        &local.controller,
        via,
        "POST",
        "/api/v1/enroll",
        None,
        Some(&serde_json::json!({
            "token": token,
            "public_key": key.public().to_string(),
            "endpoints": endpoints,
        })),
        &[],
    )?;
    // A token refused is a 4xx; a controller too busy (429) or failing (5xx) has not looked
    // at it, and the token is tried again, not put aside.
    if (400..500).contains(&r.status) && r.status != 429 && r.status != 408 {
        bail!("enrolment refused: {}", crate::api_client::error_text(&r));
    }
    if r.status != 200 {
        bail!(
            "the controller did not take the enrolment (HTTP {}): {}",
            r.status,
            crate::api_client::error_text(&r)
        );
    }
    let c = r.body["credential"]
        .as_str()
        .context("the controller's answer has no credential")?
        .to_owned();
    crate::api_client::write_private(&local.state_dir.join("credential"), c.as_bytes())?;
    Ok((c, r.body))
}

/// This edge's site credential: enrols first (with its key, made here if there is none) if it
/// has no credential yet.
fn enrol(
    local: &patronus_api::EdgeLocal,
    via: &crate::api_client::Via,
    token: Option<String>,
) -> anyhow::Result<String> {
    let dir = &local.state_dir;
    create_state_dir(dir)?;
    let key = PrivateKey::load_or_create(&dir.join("private.key"))?;
    let cred_path = dir.join("credential");
    let credential = match std::fs::read_to_string(&cred_path) {
        Ok(c) => {
            if token.is_some() {
                eprintln!(
                    "edge: already enrolled ({}); the token is not used (delete that file to \
                     enrol again)",
                    cred_path.display()
                );
            }
            c.trim().to_owned()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = token.context(
                "this edge has not enrolled yet: give --token (from `patronus site enroll-token`)",
            )?;
            let (c, body) = enrol_with(local, via, &token, &key)?;
            // Its key is new: the rotations asked for so far are done.
            set_rotations_done(dir, body["key_rotation"].as_u64().unwrap_or(0))?;
            eprintln!(
                "edge: enrolled as site {} with public key {}",
                body["site"].as_str().unwrap_or("?"),
                key.public()
            );
            c
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", cred_path.display())),
    };
    Ok(credential)
}

/// Reads and validates a configuration, naming every bad key.
fn load(path: &Path) -> anyhow::Result<EdgeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: EdgeConfig =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Err(e) = cfg.validate() {
        bail!("{}: {e}", path.display());
    }
    Ok(cfg)
}

fn status(addr: std::net::SocketAddr, json: bool, token_file: Option<&Path>) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let auth = match token_file {
        Some(f) => format!(
            "Authorization: Bearer {}\r\n",
            patronus_edge::status::read_token(f).map_err(anyhow::Error::msg)?
        ),
        None => String::new(),
    };
    let mut conn =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
            .with_context(|| format!("no edge answers on {addr} (is metrics_listen set?)"))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    conn.write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").as_bytes())?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp)?;
    if resp.starts_with("HTTP/1.1 401") {
        bail!(
            "the edge at {addr} asks for its metrics token: give its metrics_token_file with \
             --token-file"
        );
    }
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("the edge's answer has no body")?;
    if json {
        outln!("{body}");
        return Ok(());
    }
    let s: patronus_edge::status::EdgeStatus =
        serde_json::from_str(body).context("the edge's status is not what this version reads")?;
    outln!(
        "edge {} (key {}), {} MTU {}, up {:.0} s, {} flows",
        s.site,
        s.public_key,
        s.tun,
        s.tun_mtu,
        s.uptime_s,
        s.flows
    );
    outln!(
        "{:<24} {:<7} {:<9} {:>9} {:>9} {:>7} {:>6} {:>12} {:>12} {:>9}",
        "path",
        "via",
        "state",
        "rtt ms",
        "jitter ms",
        "loss %",
        "flows",
        "tx bytes",
        "rx bytes",
        "handshake"
    );
    for p in &s.paths {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        outln!(
            "{:<24} {:<7} {:<9} {:>9} {:>9.1} {:>7.1} {:>6} {:>12} {:>12} {:>9}",
            format!("{}:{}->{}", p.peer, p.local_link, p.remote_link),
            if p.relayed { "relay" } else { "direct" },
            p.state,
            opt(p.rtt_ms),
            p.jitter_ms,
            p.loss_pct,
            p.flows,
            p.tx_bytes,
            p.rx_bytes,
            p.last_handshake_s
                .map_or("-".to_string(), |v| format!("{v:.0}s ago"))
        );
    }
    if !s.failovers.is_empty() {
        let moves: Vec<String> = s
            .failovers
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        outln!("flow moves: {}", moves.join(", "));
    }
    let o = &s.failover_outages;
    if o.count > 0 {
        outln!(
            "paths down with flows on them: {}, silent {:.0} ms on average before their flows moved",
            o.count,
            o.sum_seconds / o.count as f64 * 1e3
        );
    }
    let breaches: Vec<String> = s
        .classes
        .iter()
        .filter(|c| c.sla_breaches > 0)
        .map(|c| format!("{} {}", c.class, c.sla_breaches))
        .collect();
    if !breaches.is_empty() {
        outln!("SLA breaches by class: {}", breaches.join(", "));
    }
    for e in s.events.iter().rev().take(10).rev() {
        outln!("  {} {}", e.unix_ms, e.text);
    }
    Ok(())
}

/// A stateless STAMP session-reflector: every well-formed request gets its reply, timestamped
/// on this host's clock (the sender's estimators need only differences of it).
fn reflect(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use patronus_core::probe::{NtpTime, reflect};
    let sock = std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    let epoch = std::time::Instant::now();
    let mut buf = [0u8; 2048];
    eprintln!("reflecting probes on {listen}");
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        let t2 = NtpTime::from_duration(epoch.elapsed());
        // Malformed requests are ignored: a reflector answers only what it can parse.
        if let Ok(reply) = reflect(&buf[..n], t2, NtpTime::from_duration(epoch.elapsed()), 0) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    /// A controller stand-in on loopback that answers every request with `status`; its URL.
    fn answering(status: u16) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let _ = write!(
                    c,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                );
            }
        });
        url
    }

    #[test]
    fn the_control_connection_moves_past_a_dead_or_unavailable_controller_and_stays() {
        // A port nobody listens on, a controller that cannot serve, one that answers.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let (unavailable, good) = (answering(503), answering(204));
        let urls = patronus_api::ControllerUrls::new(vec![
            dead.clone(),
            unavailable.clone(),
            good.clone(),
        ])
        .unwrap();
        let via = crate::api_client::Via::new(Vec::new());
        let call = || {
            super::control(&urls, &via, "GET", "/x", None, None, &[])
                .unwrap()
                .status
        };
        assert_eq!(call(), 204);
        // Two moves: past the dead one, then past the one that cannot serve.
        let c = patronus_edge::status::control_now().unwrap();
        assert_eq!(
            (c.controller.as_str(), c.controllers, c.failovers),
            (good.as_str(), 3, 2)
        );
        // The one that answered is tried first from then on: no new move.
        assert_eq!(call(), 204);
        assert_eq!(patronus_edge::status::control_now().unwrap().failovers, 2);
        // With every controller failing, the last failure is the answer.
        let all_bad = patronus_api::ControllerUrls::new(vec![dead, unavailable]).unwrap();
        let r = super::control(&all_bad, &via, "GET", "/x", None, None, &[]);
        assert!(r.is_err() || r.unwrap().status == 503);
    }
}
