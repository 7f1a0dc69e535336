//! The controller over real sockets: its listen backlog, connection caps, header-read and idle
//! timeouts, a long poll that outlives the idle timeout, and a write whose client hung up still
//! logged.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use patronus_controller::config::Config;
use patronus_controller::{AppState, router};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tower::ServiceExt;

const ADMIN: &str = "admin@example.net";
const ADMIN_PW: &str = "Correct-Horse-Battery-1";

/// Everything the controller logged, for the tests that read its log.
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = buf.clone();
        let _ = tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::INFO)
                .with_ansi(false)
                .with_writer(move || LogWriter(writer.clone()))
                .finish(),
        );
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Running {
    addr: SocketAddr,
    state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap();
    }

    /// An API call through the router itself, for setting things up.
    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Value) -> Value {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let app = router(self.state.clone()).layer(axum::extract::connect_info::MockConnectInfo(
            SocketAddr::from(([127, 0, 0, 1], 1)),
        ));
        let resp = app.oneshot(req).await.unwrap();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    }

    async fn admin(&self) -> String {
        let r = self
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                json!({ "email": ADMIN, "password": ADMIN_PW }),
            )
            .await;
        r["access_token"].as_str().unwrap().to_owned()
    }
}

async fn start(tune: impl FnOnce(&mut Config)) -> Running {
    log();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path().join("state"));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.auth_rate_per_minute = 10_000;
    // These tests speak raw HTTP to the server; the TLS ones set `tls` themselves.
    config.tls = patronus_controller::config::Tls::Plain;
    tune(&mut config);
    let env = vec![
        ("PATRONUS_ADMIN_EMAIL".to_string(), ADMIN.to_string()),
        ("PATRONUS_ADMIN_PASSWORD".to_string(), ADMIN_PW.to_string()),
    ];
    let state = patronus_controller::server::prepare(config, &env)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let serving = state.clone();
    let done = tokio::spawn(async move {
        patronus_controller::server::serve(
            serving,
            async {
                let _ = stopped.await;
            },
            move |a: &patronus_controller::server::Listening| {
                let _ = tx.send(a.addr);
            },
        )
        .await
        .unwrap();
    });
    Running {
        addr: rx.await.unwrap(),
        state,
        stop: Some(stop),
        done,
        _dir: dir,
    }
}

/// A TCP connection to the controller from `from` (any address of 127.0.0.0/8 is this host's).
async fn connect(to: SocketAddr, from: [u8; 4]) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// Waits until the peer closes `s` (EOF or reset), at most `limit`; returns how long it took,
/// or `None` if it is still open.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// One request on `s`; the status and body of its answer (the body read by its
/// Content-Length).
async fn exchange(s: &mut TcpStream, request: &str) -> (u16, String) {
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before an answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                return (status, body[..len].to_owned());
            }
        }
    }
}

/// Whether the controller's end of the connection from `client_port` has nothing left unread
/// in its kernel buffer (`/proc/net/tcp`'s rx_queue), and the client's end nothing unsent.
fn read_by_server(server_port: u16, client_port: u16) -> bool {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next().unwrap_or(""), 16).ok();
    let mut server_end = None;
    let mut client_end = None;
    for line in tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, queues) = (port(f[1]), port(f[2]), f[4]);
        let (tx, rx) = queues.split_once(':').unwrap();
        let (tx, rx) = (
            u64::from_str_radix(tx, 16).unwrap(),
            u64::from_str_radix(rx, 16).unwrap(),
        );
        if local == Some(server_port) && remote == Some(client_port) {
            server_end = Some(rx);
        }
        if local == Some(client_port) && remote == Some(server_port) {
            client_end = Some(tx);
        }
    }
    server_end == Some(0) && client_end == Some(0)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: patronus\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_half_sent_connection_is_closed_and_an_idle_one_after_its_timeout() {
    let c = start(|c| {
        c.header_read_timeout = Duration::from_secs(1);
        c.idle_timeout = Duration::from_secs(2);
    })
    .await;
    // Nothing sent: idle, closed after the idle timeout (timers never fire early).
    let opened = Instant::now();
    let mut silent = connect(c.addr, [127, 0, 0, 1]).await;
    // Half a request: closed after the header-read timeout.
    let mut half = connect(c.addr, [127, 0, 0, 1]).await;
    half.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    // A request answered, then nothing: kept alive for the idle timeout, then closed.
    let mut kept = connect(c.addr, [127, 0, 0, 1]).await;
    let (status, _) = exchange(&mut kept, &get("/health")).await;
    let answered = Instant::now();
    assert_eq!(status, 200);
    let limit = Duration::from_secs(30);
    closed_within(&mut half, limit)
        .await
        .expect("half a header kept open");
    assert!(opened.elapsed() >= Duration::from_millis(900));
    closed_within(&mut silent, limit)
        .await
        .expect("a silent connection kept open");
    assert!(opened.elapsed() >= Duration::from_millis(1900));
    closed_within(&mut kept, limit)
        .await
        .expect("an idle connection kept open");
    assert!(answered.elapsed() >= Duration::from_millis(1900));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_outlives_the_idle_timeout_and_ends_at_shutdown() {
    let c = start(|c| c.idle_timeout = Duration::from_secs(1)).await;
    let t = c.admin().await;
    let site = c
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            json!({ "name": "hq", "links": [{ "name": "inet", "kind": "broadband" }] }),
        )
        .await;
    let id = site["id"].as_i64().unwrap();
    let token = c
        .call(
            Method::POST,
            &format!("/api/v1/sites/{id}/enrollment-tokens"),
            Some(&t),
            json!({}),
        )
        .await;
    let enrolled = c
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            json!({ "token": token["token"], "public_key": patronus_api::key_to_base64(&[9; 32]) }),
        )
        .await;
    let cred = enrolled["credential"].as_str().unwrap();
    let mut s = connect(c.addr, [127, 0, 0, 1]).await;
    let ask = |etag: &str| {
        format!(
            "GET /api/v1/edge/config?wait=3 HTTP/1.1\r\nhost: p\r\nauthorization: Bearer {cred}\r\n\
             if-none-match: {etag}\r\n\r\n"
        )
    };
    let (status, _) = exchange(&mut s, &ask("\"none\"")).await;
    assert_eq!(status, 200);
    let cfg = c
        .call(Method::GET, "/api/v1/edge/config", Some(cred), Value::Null)
        .await;
    assert!(cfg.is_object());
    // Held three times as long as the idle timeout, on the same connection, then answered.
    let etag = {
        let req = Request::builder()
            .uri("/api/v1/edge/config")
            .header("authorization", format!("Bearer {cred}"))
            .body(Body::empty())
            .unwrap();
        let app = router(c.state.clone()).layer(axum::extract::connect_info::MockConnectInfo(
            SocketAddr::from(([127, 0, 0, 1], 1)),
        ));
        let r = app.oneshot(req).await.unwrap();
        r.headers()["etag"].to_str().unwrap().to_owned()
    };
    let started = Instant::now();
    let (status, _) = exchange(&mut s, &ask(&etag)).await;
    assert_eq!(status, 304);
    assert!(started.elapsed() >= Duration::from_millis(2900));
    // At shutdown a held long poll is answered at once, so that its edge asks another
    // controller, not after its 25 s (which held a stopping controller that long).
    let long = format!(
        "GET /api/v1/edge/config?wait=25 HTTP/1.1\r\nhost: p\r\nauthorization: Bearer {cred}\r\n\
         if-none-match: {etag}\r\n\r\n"
    );
    let held = tokio::spawn(async move {
        let started = Instant::now();
        let (status, _) = exchange(&mut s, &long).await;
        (status, started.elapsed())
    });
    while c
        .state
        .long_polls
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.stop().await;
    let (status, took) = held.await.unwrap();
    assert_eq!(status, 304);
    assert!(took < Duration::from_secs(20), "held {took:?} at shutdown");
}

#[tokio::test]
async fn the_controller_queues_a_herd_of_reconnecting_edges_rather_than_dropping_their_syns() {
    let c = start(|_| {}).await;
    // What the kernel reports of the listening socket (`ss`: Send-Q is its backlog), against
    // what it allows at most: tokio's default of 1024 overflowed with 1000 edges at once.
    let ss = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", c.addr.port())])
        .output()
        .expect("ss (iproute2) is needed to read the listening socket");
    let out = String::from_utf8_lossy(&ss.stdout);
    let backlog: u32 = out
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listening socket on {} in {out:?}", c.addr));
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        backlog,
        patronus_controller::server::LISTEN_BACKLOG.min(somaxconn)
    );
    assert!(backlog > 1024 || somaxconn <= 1024, "{backlog}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_a_cap_are_closed_at_once_while_other_clients_are_served() {
    let c = start(|c| {
        c.max_connections = 16;
        c.max_connections_per_address = 4;
    })
    .await;
    // One address holds its four; its fifth is closed unserved.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(c.addr, [127, 0, 0, 1]).await);
    }
    let mut fifth = connect(c.addr, [127, 0, 0, 1]).await;
    assert!(
        closed_within(&mut fifth, Duration::from_secs(10))
            .await
            .is_some(),
        "a fifth connection from one address was kept"
    );
    // Another address is served meanwhile.
    let mut other = connect(c.addr, [127, 0, 0, 2]).await;
    assert_eq!(exchange(&mut other, &get("/health")).await.0, 200);
    drop(other);
    // Fill the total: 16 connections from four addresses; a seventeenth is closed.
    for from in 3..6u8 {
        for _ in 0..4 {
            held.push(connect(c.addr, [127, 0, 0, from]).await);
        }
    }
    let mut full = connect(c.addr, [127, 0, 0, 9]).await;
    assert!(
        closed_within(&mut full, Duration::from_secs(10))
            .await
            .is_some(),
        "a connection over the total cap was kept"
    );
    // One closes: a new client gets its place.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = connect(c.addr, [127, 0, 0, 9]).await;
        s.write_all(get("/health").as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "no place freed");
        tokio::task::yield_now().await;
    }
    let t = c.admin().await;
    let metrics = {
        let req = Request::builder()
            .uri("/metrics")
            .header("authorization", format!("Bearer {t}"))
            .body(Body::empty())
            .unwrap();
        let r = router(c.state.clone()).oneshot(req).await.unwrap();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    };
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("patronus_http_connections_refused_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 2.0, "{refused}");
    drop(held);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_client_hung_up_still_commits_and_leaves_its_log_line() {
    let c = start(|_| {}).await;
    let t = c.admin().await;
    // Creating a user hashes its password (argon2): the client is gone long before the answer.
    let body =
        json!({ "email": "late@example.net", "role": "viewer", "password": "Some-Password-9" })
            .to_string();
    let request = format!(
        "POST /api/v1/users HTTP/1.1\r\nhost: p\r\nauthorization: Bearer {t}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nx-request-id: hung-up-1\r\n\r\n{body}",
        body.len()
    );
    // Closed with a reset, not a FIN: the controller's next read on the connection fails at
    // once, as when a client process dies.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_zero_linger().unwrap();
    let mut s = socket.connect(c.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    // A reset discards what the controller's kernel holds unread: wait until the controller has
    // read the whole request, so that the reset cuts the request's handling, not its arrival.
    let client_port = s.local_addr().unwrap().port();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_by_server(c.addr.port(), client_port) {
        assert!(
            Instant::now() < deadline,
            "the controller never read the request"
        );
        tokio::task::yield_now().await;
    }
    drop(s);
    // The audit record proves the write committed; its log line follows it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let audited: i64 = patronus_controller::store::db::query_scalar(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'user.create' AND request_id = 'hung-up-1'",
        )
        .fetch_one(&mut *c.state.store.conn().await.unwrap())
        .await
        .unwrap();
        let logged = String::from_utf8_lossy(&log().lock().unwrap()).contains("hung-up-1");
        if audited == 1 && logged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "audited {audited}, logged {logged}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.stop().await;
}
