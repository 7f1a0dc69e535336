//! The shared harness: a controller on a real SQLite file in a temporary directory (or a
//! PostgreSQL database of its own: `api_postgres`), served over HTTPS on loopback with the
//! self-signed certificate it makes on first start, which the harness's client pins; and
//! helpers that build the objects tests need. Every request comes from 127.0.0.7, on a
//! connection of its own.

pub use std::net::SocketAddr;
pub use std::os::unix::fs::PermissionsExt;

pub use axum::Router;
pub use axum::body::Body;
pub use axum::http::{HeaderMap, Method, Request, StatusCode, header};
pub use http_body_util::BodyExt;
pub use patronus_controller::AppState;
pub use patronus_controller::auth::{Role, Tokens};
pub use patronus_controller::config::Config;
pub use serde_json::{Value, json};

pub(crate) use super::schema;

/// What a webhook receiver got: each request's headers and body.
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(HeaderMap, String)>>>;

pub const ADMIN: &str = "admin@example.net";
pub const ADMIN_PW: &str = "Correct-Horse-Battery-1";

pub struct Api {
    pub state: AppState,
    pub dir: tempfile::TempDir,
    /// The controller's HTTPS client.
    pub client: Client,
    /// Stops the server when dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The address every request of the harness comes from.
pub const CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 7);

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

/// The database a test's controller gets: a file in its temporary directory, or on
/// PostgreSQL (the suite's `api_postgres` run) a fresh database of its own on the process's
/// one throwaway server ([`patronus_lab::postgres::shared`]).
fn database(dir: &std::path::Path) -> patronus_controller::config::Database {
    use patronus_controller::config::Database;
    match crate::BACKEND {
        "postgres" => {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let pg = patronus_lab::postgres::shared()
                .unwrap_or_else(|e| panic!("the API suite on PostgreSQL needs a server: {e}"));
            let name = format!(
                "api_{}",
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            pg.create_database(&name).unwrap();
            Database::Postgres(pg.url(&name))
        }
        _ => Database::Sqlite(dir.join("state").join("controller.db")),
    }
}

pub async fn api_with(tune: impl FnOnce(&mut Config)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path().join("state"));
    config.database = database(dir.path());
    config.auth_rate_per_minute = 10_000;
    // The tests' webhook receivers listen on loopback.
    config.webhook_allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
    tune(&mut config);
    api_on(config, dir).await
}

/// A controller with `config` (its state where `config` says; `dir` is kept with it).
pub async fn api_on(config: Config, dir: tempfile::TempDir) -> Api {
    let env = vec![
        ("PATRONUS_ADMIN_EMAIL".to_string(), ADMIN.to_string()),
        ("PATRONUS_ADMIN_PASSWORD".to_string(), ADMIN_PW.to_string()),
    ];
    let state = patronus_controller::server::prepare(config, &env)
        .await
        .unwrap();
    let fingerprint = state
        .tls
        .get()
        .expect("the controller serves TLS by default")
        .fingerprint();
    let pin = patronus_controller::tls::parse_fingerprint(&fingerprint).unwrap();
    let tls = patronus_controller::tls::pinned_client_config(vec![pin]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(patronus_controller::server::serve_connections(
        state.clone(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    Api {
        state,
        dir,
        client: Client { addr, tls },
        _stop: stop,
    }
}

/// A client of one test's controller: where it serves HTTPS, and the TLS configuration that
/// trusts its certificate (pinned).
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl Api {
    /// Sends `req` to the controller over a TLS connection of its own, from [`CLIENT`].
    pub async fn send(&self, req: Request<Body>) -> axum::http::Response<hyper::body::Incoming> {
        self.client.send(req).await
    }
}

impl Client {
    /// Sends `req` to the controller over a TLS connection of its own, from [`CLIENT`].
    pub async fn send(&self, req: Request<Body>) -> axum::http::Response<hyper::body::Incoming> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((CLIENT, 0))).unwrap();
        let tcp = socket.connect(self.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts
            .headers
            .entry(header::HOST)
            .or_insert(header::HeaderValue::from_static("localhost"));
        sender
            .send_request(Request::from_parts(parts, body))
            .await
            .unwrap()
    }
}

impl Api {
    /// Everything the database holds, as stored: the SQLite file and its write-ahead log, or
    /// a data-only `pg_dump` of the test's PostgreSQL database (bytes shown in hex).
    pub async fn stored(&self) -> Vec<Vec<u8>> {
        use patronus_controller::config::Database;
        match &self.state.config.database {
            Database::Sqlite(path) => {
                let mut wal = path.clone().into_os_string();
                wal.push("-wal");
                vec![
                    std::fs::read(path).unwrap(),
                    std::fs::read(wal).unwrap_or_default(),
                ]
            }
            Database::Postgres(url) => {
                let db = url.rsplit('/').next().unwrap();
                let pg = patronus_lab::postgres::shared().unwrap();
                vec![pg.dump(db).unwrap().into_bytes()]
            }
        }
    }
}

pub async fn api() -> Api {
    api_with(|_| {}).await
}

impl Api {
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        self.call_with(method, path, token, body, &[]).await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let method_name = method.as_str().to_lowercase();
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = self.send(req).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            // Text (the metrics) as a JSON string; everything else must be JSON.
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                assert!(status.is_success(), "{status}: {e}");
                Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        // Every response matches what the OpenAPI document says of it.
        schema::check_response(method_name, path, status.as_u16(), &headers, &body);
        // Every error has the one shape.
        if status.as_u16() >= 400 {
            assert!(body["error"]["code"].is_string(), "{status} {body}");
            assert!(body["error"]["message"].is_string(), "{status} {body}");
        }
        assert!(headers.contains_key("x-request-id"));
        // Every 401 says how to authenticate (RFC 7235, RFC 6750).
        if status == StatusCode::UNAUTHORIZED {
            let challenge = headers
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("401 without WWW-Authenticate: {body}"));
            assert!(
                challenge.starts_with("Bearer realm=\"patronus\""),
                "{challenge}"
            );
            if token.is_some() && !path.starts_with("/api/v1/auth/") {
                assert!(
                    challenge.contains("error=\"invalid_token\""),
                    "{path}: {challenge}"
                );
            }
        }
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn login(&self, email: &str, password: &str) -> Reply {
        self.call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({ "email": email, "password": password })),
        )
        .await
    }

    pub async fn token(&self, email: &str, password: &str) -> String {
        let r = self.login(email, password).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        r.body["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn admin(&self) -> String {
        self.token(ADMIN, ADMIN_PW).await
    }

    /// Creates a user with `role`; returns (id, access token).
    pub async fn user(&self, admin: &str, email: &str, role: &str) -> (i64, String) {
        let r = self
            .call(
                Method::POST,
                "/api/v1/users",
                Some(admin),
                Some(json!({ "email": email, "role": role, "password": "Some-Password-9" })),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        let id = r.body["id"].as_i64().unwrap();
        (id, self.token(email, "Some-Password-9").await)
    }
}

pub fn site(name: &str, prefixes: &[&str]) -> Value {
    json!({
        "name": name,
        "location": "Lyon",
        "lan_prefixes": prefixes,
        "links": [
            { "name": "mpls", "kind": "mpls", "endpoint": "198.51.100.1:51820", "up_kbps": 50000 },
            { "name": "inet", "kind": "broadband", "metered": false, "monthly_cost": 40.0 }
        ]
    })
}

/// Creates sites named `names`, each with `10.<i+1>.0.0/16` and two links; returns their ids.
pub async fn sites(a: &Api, token: &str, names: &[&str]) -> Vec<i64> {
    let mut ids = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let r = a
            .call(
                Method::POST,
                "/api/v1/sites",
                Some(token),
                Some(site(n, &[&format!("10.{}.0.0/16", i + 1)])),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        ids.push(r.body["id"].as_i64().unwrap());
    }
    ids
}

pub fn voice(name: &str, order: u32, class: &str) -> Value {
    json!({
        "name": name,
        "order": order,
        "match": { "protocol": "udp", "dst_ports": ["16384-32767"], "dscp": ["ef"] },
        "class": class,
        "steering": "duplicate",
        "links": { "avoid": ["lte"] }
    })
}

/// Enrols site `id` with a token and a key made of `key_byte`; returns its credential.
pub async fn enrolled(a: &Api, t: &str, id: i64, key_byte: u8) -> String {
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{id}/enrollment-tokens"),
            Some(t),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let key = patronus_api::key_to_base64(&[key_byte; 32]);
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(json!({ "token": r.body["token"], "public_key": key })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    r.body["credential"].as_str().unwrap().to_owned()
}

/// Gives site `id` a public key, as its edge's enrolment will.
pub async fn enrol(a: &Api, id: i64, key_byte: u8) {
    let key = patronus_api::key_to_base64(&[key_byte; 32]);
    patronus_controller::store::db::query("UPDATE sites SET public_key = ? WHERE id = ?")
        .bind(key)
        .bind(id)
        .execute(&mut *a.state.store.conn().await.unwrap())
        .await
        .unwrap();
}

/// A webhook receiver on loopback that answers 500 to its first `fail_first` requests, then 204.
pub async fn receiver(fail_first: usize) -> (String, Received) {
    let got: Received = Default::default();
    let seen = got.clone();
    let app = Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let seen = seen.clone();
            async move {
                let mut g = seen.lock().unwrap();
                g.push((headers, body));
                if g.len() <= fail_first {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

/// Waits until the receiver has a request whose body's `type` is `kind`; its body.
pub async fn wait_for(got: &Received, kind: &str) -> (HeaderMap, Value) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found = got.lock().unwrap().iter().find_map(|(h, b)| {
            let v: Value = serde_json::from_str(b).unwrap();
            (v["type"] == kind).then(|| (h.clone(), v))
        });
        if let Some(f) = found {
            return f;
        }
        let kinds: Vec<String> = got.lock().unwrap().iter().map(|(_, b)| b.clone()).collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {kind} delivered: {kinds:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Checks a request's signature as a receiver would, with the hmac crate directly.
pub fn signed_with(secret: &str, headers: &HeaderMap, body: &str) -> bool {
    use hmac::Mac;
    let sig = headers["x-patronus-signature"].to_str().unwrap();
    let (t, v1) = sig.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let age = patronus_controller::store::now_s() - t.parse::<i64>().unwrap();
    want == v1 && (0..60).contains(&age)
}

/// A TLS webhook receiver on loopback with a certificate for `localhost` that `issuer`
/// signed; it answers 204 to one request per connection and keeps the bodies.
pub async fn tls_receiver(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then Content-Length bytes of body.
                loop {
                    let Ok(n) = tls.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&buf[end + 4..]).into_owned());
                        let _ = tls
                            .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        let _ = tls.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (port, got)
}

/// The controller's `/metrics` as an admin reads it.
pub async fn metrics_text(a: &Api, t: &str) -> String {
    let req = Request::get("/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {t}"))
        .body(Body::empty())
        .unwrap();
    let r = a.send(req).await;
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// Starts edge `cred`'s long poll (`wait=20`, holding `etag`) on `a` and returns once it is
/// waiting (open in site `site`'s presence and counted among the controller's long polls), so
/// that what answers it is a change, not the first look; the task gives the answer's status,
/// ETag and how long it took.
pub async fn waiting_poll(
    a: &Api,
    site: i64,
    cred: &str,
    etag: &str,
) -> tokio::task::JoinHandle<(StatusCode, header::HeaderValue, std::time::Duration)> {
    let client = a.client.clone();
    let polls = || {
        a.state
            .long_polls
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = polls();
    let (c2, e2) = (cred.to_owned(), etag.to_owned());
    let waiting = tokio::spawn(async move {
        let req = Request::get("/api/v1/edge/config?wait=20")
            .header(header::AUTHORIZATION, format!("Bearer {c2}"))
            .header(header::IF_NONE_MATCH, e2)
            .body(Body::empty())
            .unwrap();
        let started = std::time::Instant::now();
        let resp = client.send(req).await;
        (
            resp.status(),
            resp.headers()[header::ETAG].clone(),
            started.elapsed(),
        )
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while a
        .state
        .presence
        .lock()
        .unwrap()
        .get(&site)
        .is_none_or(|p| p.open == 0)
        || polls() <= before
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the long poll never waited"
        );
        tokio::task::yield_now().await;
    }
    waiting
}

/// The id of hq's MPLS path to b1 (link ids, lower first).
pub async fn v_path_id(a: &Api, t: &str) -> String {
    let r = a
        .call(Method::GET, "/api/v1/paths?limit=500", Some(t), None)
        .await;
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["a"]["site"] == "hq"
                && p["a"]["link"] == "mpls"
                && p["b"]["site"] == "b1"
                && p["b"]["link"] == "mpls"
        })
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no hq/mpls - b1/mpls path: {r:?}"))
}
