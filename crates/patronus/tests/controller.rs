//! The controller as a process: killed with SIGKILL in the middle of a stream of writes, it
//! loses none that it acknowledged and starts again cleanly; its logs hold no secret; its state
//! is private.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ADMIN: &str = "root@example.net";
const PASSWORD: &str = "Unguessable-Pass-42";

fn patronus() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_patronus"))
}

/// A running controller, its address, and everything it wrote to stderr so far.
struct Controller {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    /// Reads stderr into `log` until the process closes it.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Controller {
    /// Stops the controller with `signal`, waits until it has exited and its stderr is read to
    /// the end, and returns all it wrote: a log that can prove what is not in it.
    fn finish(mut self, signal: nix::sys::signal::Signal) -> String {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "still running 30 s after {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Controller {
    start_with(
        dir,
        &[
            ("PATRONUS_ADMIN_EMAIL", ADMIN),
            ("PATRONUS_ADMIN_PASSWORD", PASSWORD),
        ],
    )
}

fn start_with(dir: &Path, env: &[(&str, &str)]) -> Controller {
    start_under(Command::new(patronus()), dir, env)
}

/// Starts the controller as `program`'s command (the binary itself, or a wrapper such as
/// `prlimit ... patronus` that runs it). These tests speak raw HTTP/1.1 to it, so it serves
/// plain HTTP on loopback unless `env` says `PATRONUS_PLAIN_HTTP=false` (the TLS tests).
fn start_under(mut program: Command, dir: &Path, env: &[(&str, &str)]) -> Controller {
    let mut child = program
        .args(["controller", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("PATRONUS_PLAIN_HTTP", "true")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            // Kept before the address is announced: the test reads the line next.
            {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
                let addr = rest.split('/').next().unwrap_or("").to_owned();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the controller did not start: {}", log.lock().unwrap()))
        .parse()
        .unwrap();
    Controller {
        child,
        addr,
        log,
        reader: Some(reader),
    }
}

/// One HTTP/1.1 request on its own connection; (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn login(addr: SocketAddr) -> serde_json::Value {
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&format!(r#"{{"email":"{ADMIN}","password":"{PASSWORD}"}}"#)),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    json(&body)
}

#[test]
fn a_controller_killed_mid_write_loses_no_acknowledged_write_and_logs_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = start(&state);
    let tokens = login(c.addr);
    let token = tokens["access_token"].as_str().unwrap().to_owned();

    // A stream of writes from one client; SIGKILL lands in the middle of it.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (acked, addr, token) = (acked.clone(), c.addr, token.clone());
        std::thread::spawn(move || {
            for i in 0.. {
                let name = format!("site-{i}");
                let body = format!(
                    r#"{{"name":"{name}","lan_prefixes":["10.{}.{}.0/24"]}}"#,
                    i / 250,
                    i % 250
                );
                match http(addr, "POST", "/api/v1/sites", Some(&token), Some(&body)) {
                    Ok((201, _)) => acked.lock().unwrap().push(name),
                    Ok((status, body)) => panic!("{status} {body}"),
                    // The controller is gone.
                    Err(_) => return i,
                }
            }
            unreachable!()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 40 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let first_log = c.finish(nix::sys::signal::Signal::SIGKILL);
    let attempted = writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 40,
        "only {} writes before the kill",
        acked.len()
    );

    // It starts again on the same state, and every acknowledged write is there.
    let c = start(&state);
    let (status, body) = http(c.addr, "GET", "/ready", None, None).unwrap();
    assert_eq!(status, 200, "{body}");
    let token2 = login(c.addr)["access_token"].as_str().unwrap().to_owned();
    let (_, body) = http(
        c.addr,
        "GET",
        "/api/v1/sites?limit=500",
        Some(&token2),
        None,
    )
    .unwrap();
    let stored: Vec<String> = json(&body)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    for name in &acked {
        assert!(stored.contains(name), "{name} was acknowledged and is gone");
    }
    // At most the one request in flight at the kill may have landed unacknowledged.
    assert!(stored.len() <= attempted + 1 && stored.len() >= acked.len());
    eprintln!(
        "{} writes acknowledged before SIGKILL, {} stored after restart",
        acked.len(),
        stored.len()
    );

    // An API key, to look for in the logs too.
    let (status, body) = http(
        c.addr,
        "POST",
        "/api/v1/api-keys",
        Some(&token2),
        Some(r#"{"name":"ci","role":"viewer"}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let key = json(&body)["key"].as_str().unwrap().to_owned();
    let (status, _) = http(c.addr, "GET", "/api/v1/sites", Some(&key), None).unwrap();
    assert_eq!(status, 200);
    // An enrolment token, spent by an edge for its site credential, which it then uses; the
    // same token tried again; a webhook's signing secret.
    let (_, body) = http(c.addr, "GET", "/api/v1/sites?limit=1", Some(&token2), None).unwrap();
    let site = json(&body)["items"][0]["id"].as_i64().unwrap();
    let (status, body) = http(
        c.addr,
        "POST",
        &format!("/api/v1/sites/{site}/enrollment-tokens"),
        Some(&token2),
        Some("{}"),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let enrol_token = json(&body)["token"].as_str().unwrap().to_owned();
    let enrol = format!(
        r#"{{"token":"{enrol_token}","public_key":"{}"}}"#,
        patronus_api::key_to_base64(&[9; 32])
    );
    let (status, body) = http(c.addr, "POST", "/api/v1/enroll", None, Some(&enrol)).unwrap();
    assert_eq!(status, 200, "{body}");
    let credential = json(&body)["credential"].as_str().unwrap().to_owned();
    let (status, _) = http(
        c.addr,
        "GET",
        "/api/v1/edge/config",
        Some(&credential),
        None,
    )
    .unwrap();
    assert_eq!(status, 200);
    let (status, _) = http(c.addr, "POST", "/api/v1/enroll", None, Some(&enrol)).unwrap();
    assert_eq!(status, 401);
    let (status, body) = http(
        c.addr,
        "POST",
        "/api/v1/webhooks",
        Some(&token2),
        Some(r#"{"url":"http://93.184.216.34:9/hook","events":["failover"]}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let webhook_secret = json(&body)["secret"].as_str().unwrap().to_owned();
    // A failed login with a password-like string.
    let (status, _) = http(
        c.addr,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&format!(
            r#"{{"email":"{ADMIN}","password":"{PASSWORD}-wrong"}}"#
        )),
    )
    .unwrap();
    assert_eq!(status, 401);
    // Private state, while the controller runs (a clean stop removes the WAL file).
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    for f in ["controller.db", "controller.db-wal", "jwt.key"] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    // All that the second run wrote, to its end.
    let log = first_log + &c.finish(nix::sys::signal::Signal::SIGTERM);
    let jwt_key = std::fs::read(state.join("jwt.key")).unwrap();
    let hex: String = jwt_key.iter().map(|b| format!("{b:02x}")).collect();
    for secret in [
        PASSWORD,
        &token,
        &token2,
        tokens["refresh_token"].as_str().unwrap(),
        &key,
        &hex,
        &enrol_token,
        &credential,
        &webhook_secret,
    ] {
        assert!(!log.contains(secret), "a secret is in the log:\n{log}");
    }
    assert!(log.contains("request"), "the log has request lines: {log}");
}

#[test]
fn sigterm_finishes_cleanly_and_a_bad_configuration_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = start(&dir.path().join("state"));
    let (status, _) = http(c.addr, "GET", "/health", None, None).unwrap();
    assert_eq!(status, 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = c.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.log.lock().unwrap().contains("shutting down"));

    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "listen = \"nowhere\"\nrequest_timeout_s = 0\nlisten_port = 1\n",
    )
    .unwrap();
    let out = Command::new(patronus())
        .args(["controller", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for key in [
        "listen (",
        "request_timeout_s",
        "listen_port",
        "unknown key",
    ] {
        assert!(err.contains(key), "{key} in {err}");
    }
}

/// Runs the CLI with its config directory in `home`, `stdin` on its standard input.
fn cli(home: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    cli_env(home, args, stdin, &[])
}

fn cli_env(
    home: &Path,
    args: &[&str],
    stdin: &str,
    env: &[(&str, &Path)],
) -> (bool, String, String) {
    let mut child = Command::new(patronus())
        .args(args)
        .env("XDG_CONFIG_HOME", home)
        .env_remove("PATRONUS_CA_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_admin_cli_logs_in_keeps_its_session_private_and_manages_sites_and_links() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("state"));
    let home = dir.path().join("home");
    let url = format!("http://{}", c.addr);
    let (ok, _, err) = cli(
        &home,
        &["login", "--url", &url, "--email", ADMIN],
        "wrong\n",
    );
    assert!(!ok && err.contains("wrong email or password"), "{err}");
    let (ok, out, err) = cli(
        &home,
        &["login", "--url", &url, "--email", ADMIN],
        &format!("{PASSWORD}\n"),
    );
    assert!(ok, "{err}");
    assert!(out.contains("logged in"), "{out}");
    let creds = home.join("patronus/credentials.json");
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(home.join("patronus"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    let (ok, out, err) = cli(
        &home,
        &[
            "site",
            "create",
            "hq",
            "--lan",
            "10.1.0.0/16",
            "--location",
            "Lyon",
        ],
        "",
    );
    assert!(ok, "{err}");
    assert!(out.contains("hq") && out.contains("10.255.0.1"), "{out}");
    let (ok, _, err) = cli(&home, &["site", "create", "hq"], "");
    assert!(
        !ok && err.contains("409") && err.contains("exists"),
        "{err}"
    );
    let (ok, _, err) = cli(&home, &["site", "create", "b", "--lan", "10.1.2.0/24"], "");
    assert!(!ok && err.contains("overlaps"), "{err}");
    let (ok, _, err) = cli(
        &home,
        &[
            "link",
            "add",
            "hq",
            "mpls",
            "--kind",
            "mpls",
            "--endpoint",
            "198.51.100.1:51820",
            "--up-kbps",
            "50000",
        ],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &home,
        &["link", "add", "hq", "sat", "--kind", "carrier-pigeon"],
        "",
    );
    assert!(!ok && err.contains("carrier-pigeon"), "{err}");
    let (ok, out, _) = cli(&home, &["site", "show", "hq"], "");
    assert!(
        ok && out.contains("mpls") && out.contains("198.51.100.1:51820"),
        "{out}"
    );
    let (ok, out, _) = cli(&home, &["site", "list", "--output", "json"], "");
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 1);
    let (ok, out, _) = cli(&home, &["policy", "list"], "");
    assert!(ok && out.starts_with("ID"), "{out}");

    // A lapsed access token is refreshed, and the new session kept.
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
    let old_refresh = saved["refresh_token"].clone();
    saved["access_token"] = "lapsed".into();
    std::fs::write(&creds, saved.to_string()).unwrap();
    let (ok, out, err) = cli(&home, &["link", "list", "hq"], "");
    assert!(ok && out.contains("mpls"), "{out}{err}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
    assert_ne!(saved["refresh_token"], old_refresh);

    let (ok, out, err) = cli(
        &home,
        &["site", "enroll-token", "hq", "--expires-in-minutes", "5"],
        "",
    );
    assert!(
        ok && out.trim().starts_with("pet_") && err.contains("usable once"),
        "{out}{err}"
    );
    let (status, body) = http(
        c.addr,
        "POST",
        "/api/v1/enroll",
        None,
        Some(&format!(
            r#"{{"token":"{}","public_key":"{}"}}"#,
            out.trim(),
            patronus_api::key_to_base64(&[3; 32])
        )),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let (ok, _, err) = cli(&home, &["link", "delete", "hq", "mpls"], "");
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&home, &["site", "delete", "hq"], "");
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&home, &["site", "show", "hq"], "");
    assert!(!ok && err.contains("no site named hq"), "{err}");
}

#[test]
fn without_a_given_password_the_first_admin_gets_a_generated_one_in_a_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = start_with(&state, &[("PATRONUS_ADMIN_EMAIL", ADMIN)]);
    let file = state.join("initial-admin-password");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let password = std::fs::read_to_string(&file).unwrap();
    assert!(password.trim().len() >= 24);
    let home = dir.path().join("home");
    let url = format!("http://{}", c.addr);
    let (ok, _, err) = cli(
        &home,
        &["login", "--url", &url, "--email", ADMIN],
        &password,
    );
    assert!(ok, "{err}");
    let log = c.finish(nix::sys::signal::Signal::SIGTERM);
    assert!(log.contains("initial-admin-password"), "{log}");
    assert!(!log.contains(password.trim()), "the password is in the log");
}

#[test]
fn add_user_puts_a_user_in_the_database_offline() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let add = |password: &str| {
        let mut child = Command::new(patronus())
            .args([
                "controller",
                "add-user",
                "--email",
                "ops@example.net",
                "--role",
                "operator",
                "--data-dir",
            ])
            .arg(&state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(password.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = add("weak\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12"));
    let out = add("Offline-Added-77\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ops@example.net (operator)"));
    // The controller starts on that database with no first admin to create, and the user logs in.
    let c = start_with(&state, &[]);
    let (status, body) = http(
        c.addr,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(r#"{"email":"ops@example.net","password":"Offline-Added-77"}"#),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(!state.join("initial-admin-password").exists());
}

/// A TLS-terminating proxy in front of `to`, as a controller beyond loopback is served: a
/// certificate for `localhost` that `issuer` signed. Its port.
fn tls_proxy(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, to: SocketAddr) -> u16 {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
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
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
    });
    port
}

fn ca() -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Patronus test CA");
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

#[test]
fn the_cli_reaches_a_tls_fronted_controller_and_refuses_a_certificate_it_cannot_trust() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("state"));
    let (ca_cert, issuer) = ca();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let port = tls_proxy(&issuer, c.addr);
    let url = format!("https://localhost:{port}");
    let home = dir.path().join("home");
    let trust = [("PATRONUS_CA_FILE", ca_file.as_path())];
    let (ok, _, err) = cli_env(
        &home,
        &["login", "--url", &url, "--email", ADMIN],
        PASSWORD,
        &trust,
    );
    assert!(ok, "{err}");
    let (ok, out, err) = cli_env(
        &home,
        &["site", "create", "hq", "--lan", "10.1.0.0/16"],
        "",
        &trust,
    );
    assert!(ok && out.contains("hq"), "{out} {err}");
    // Without the CA, the same proxy is refused before a byte of the request (or the password)
    // leaves; a CA file with no certificate is an error too, by name.
    let (ok, _, err) = cli(
        &dir.path().join("home2"),
        &["login", "--url", &url, "--email", ADMIN],
        PASSWORD,
    );
    assert!(!ok && err.contains("certificate"), "{err}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let (ok, _, err) = cli_env(
        &dir.path().join("home3"),
        &["login", "--url", &url, "--email", ADMIN],
        PASSWORD,
        &[("PATRONUS_CA_FILE", empty.as_path())],
    );
    assert!(!ok && err.contains("no PEM certificate"), "{err}");
}

/// A connection to the controller from `from`, another address of this host's loopback.
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

#[test]
fn with_256_file_descriptors_300_idle_connections_leave_the_api_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let mut limited = Command::new("prlimit");
    limited.arg("--nofile=256:256").arg(patronus());
    let c = start_under(
        limited,
        &dir.path().join("state"),
        &[
            ("PATRONUS_ADMIN_EMAIL", ADMIN),
            ("PATRONUS_ADMIN_PASSWORD", PASSWORD),
            ("PATRONUS_IDLE_TIMEOUT_S", "5"),
        ],
    );
    // 300 connections from one address that never send a byte.
    let mut idle: Vec<TcpStream> = (0..300)
        .map(|_| connect_from([127, 0, 0, 1], c.addr))
        .collect();
    // Others are still served, and the database still has its descriptors.
    let mut other = connect_from([127, 0, 0, 2], c.addr);
    other
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let login = format!(r#"{{"email":"{ADMIN}","password":"{PASSWORD}"}}"#);
    write!(
        other,
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{login}",
        login.len()
    )
    .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The idle ones that were let in are closed after the idle timeout; the rest were closed
    // at once. Every one ends.
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in &mut idle {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was not closed: {other:?}"),
        }
    }
    let log = c.finish(nix::sys::signal::Signal::SIGTERM);
    // It held its connections below what 256 descriptors allow.
    assert!(log.contains("max_connections=160"), "{log}");
    assert!(!log.contains("accepting a connection"), "{log}");
}

#[test]
fn the_controller_raises_its_open_file_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut limited = Command::new("prlimit");
    limited.arg("--nofile=100:4096").arg(patronus());
    let c = start_under(
        limited,
        &dir.path().join("state"),
        &[
            ("PATRONUS_ADMIN_EMAIL", ADMIN),
            ("PATRONUS_ADMIN_PASSWORD", PASSWORD),
        ],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", c.child.id())).unwrap();
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["4096", "4096"],
        "{files}"
    );
    let log = c.finish(nix::sys::signal::Signal::SIGTERM);
    assert!(log.contains("raised the open-file limit"), "{log}");
    assert!(log.contains("max_connections=4000"), "{log}");
}

/// What a pseudo-terminal's master side has read so far, filled by a thread.
struct Terminal {
    master: std::fs::File,
    seen: Arc<Mutex<Vec<u8>>>,
    /// The reader reached the end (the CLI exited and closed the terminal).
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Terminal {
    /// Runs the CLI with stdin, stdout and stderr on a new pseudo-terminal.
    fn run(home: &Path, args: &[&str]) -> (Child, Terminal) {
        let pty = nix::pty::openpty(None, None).unwrap();
        let child = {
            let slave = |fd: &std::os::fd::OwnedFd| Stdio::from(fd.try_clone().unwrap());
            let mut cmd = Command::new(patronus());
            cmd.args(args)
                .env("XDG_CONFIG_HOME", home)
                .env_remove("PATRONUS_CA_FILE")
                .stdin(slave(&pty.slave))
                .stdout(slave(&pty.slave))
                .stderr(slave(&pty.slave));
            cmd.spawn().unwrap()
            // The command and `pty.slave` drop here: the child holds the only copies, so the
            // master reads EIO once it has exited.
        };
        let master = std::fs::File::from(pty.master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut r, sink, end) = (master.try_clone().unwrap(), seen.clone(), closed.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            end.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        (
            child,
            Terminal {
                master,
                seen,
                closed,
            },
        )
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Waits until the terminal shows `what`.
    fn wait_for(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.text().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} in {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn echo_is_on(&self) -> bool {
        nix::sys::termios::tcgetattr(&self.master)
            .unwrap()
            .local_flags
            .contains(nix::sys::termios::LocalFlags::ECHO)
    }
}

fn wait_exit(child: &mut Child, term: &Terminal) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            // Everything the CLI wrote before it exited, its last error included, is read.
            while !term.closed.load(std::sync::atomic::Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "the terminal stays open");
                std::thread::sleep(Duration::from_millis(5));
            }
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the CLI is still running: {:?}",
            term.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn on_a_terminal_passwords_are_prompted_for_and_never_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("state"));
    let home = dir.path().join("home");
    let url = format!("http://{}", c.addr);
    let args = ["login", "--url", &url, "--email", ADMIN];

    let (mut child, term) = Terminal::run(&home, &args);
    term.wait_for(&format!("password for {ADMIN} at {url}: "));
    assert!(!term.echo_is_on(), "echo is on at the prompt");
    (&term.master)
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    let status = wait_exit(&mut child, &term);
    let shown = term.text();
    assert!(status.success(), "{shown}");
    assert!(shown.contains("logged in"), "{shown}");
    assert!(
        !shown.contains(PASSWORD),
        "the password was echoed: {shown:?}"
    );
    assert!(term.echo_is_on(), "echo stayed off");

    // A new password is typed twice, unseen; two that differ change nothing.
    let type_in = |term: &Terminal, prompt: &str, text: &str| {
        term.wait_for(prompt);
        assert!(!term.echo_is_on(), "echo is on at {prompt:?}");
        (&term.master)
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
    };
    let (mut child, term) = Terminal::run(&home, &["user", "password"]);
    type_in(&term, "current password: ", PASSWORD);
    type_in(&term, "new password: ", "Typed-Twice-Pass-77");
    type_in(&term, "again: ", "Typed-Twice-Pass-78");
    let status = wait_exit(&mut child, &term);
    let shown = term.text();
    assert!(!status.success() && shown.contains("differ"), "{shown}");
    assert!(
        !shown.contains("Typed-Twice") && !shown.contains(PASSWORD),
        "{shown:?}"
    );
    let (status, _) = http(
        c.addr,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&format!(r#"{{"email":"{ADMIN}","password":"{PASSWORD}"}}"#)),
    )
    .unwrap();
    assert_eq!(status, 200, "the password changed");

    // Interrupted at the prompt, it puts the terminal back as it was.
    let (mut child, term) = Terminal::run(&home, &args);
    term.wait_for("password for");
    assert!(!term.echo_is_on());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_exit(&mut child, &term);
    assert_eq!(status.code(), Some(130), "{}", term.text());
    assert!(term.echo_is_on(), "echo stayed off after Ctrl-C");
}

/// Whether `text` holds an RFC 3339 UTC time (`2026-12-01T14:06:02Z`, milliseconds or not).
fn has_rfc3339(text: &str) -> bool {
    text.split_whitespace().any(|w| {
        let b = w.as_bytes();
        b.len() >= 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && w.ends_with('Z')
            && w[..4].parse::<u32>().is_ok()
    })
}

#[test]
fn the_cli_manages_users_their_passwords_and_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("state"));
    let url = format!("http://{}", c.addr);
    let admin = dir.path().join("admin");
    let ops = dir.path().join("ops");
    let login = |home: &Path, email: &str, password: &str| {
        cli(
            home,
            &["login", "--url", &url, "--email", email],
            &format!("{password}\n"),
        )
    };
    let (ok, _, err) = login(&admin, ADMIN, PASSWORD);
    assert!(ok, "{err}");

    // Created with a password from stdin; a weak one is refused with the rule.
    let (ok, _, err) = cli(
        &admin,
        &["user", "create", "ops@example.net", "--role", "operator"],
        "short\n",
    );
    assert!(!ok && err.contains("password"), "{err}");
    let (ok, out, err) = cli(
        &admin,
        &[
            "user",
            "create",
            "ops@example.net",
            "--role",
            "operator",
            "--name",
            "Ops",
        ],
        "Operator-Pass-123\n",
    );
    assert!(ok && out.contains("operator"), "{out}{err}");
    let (ok, out, _) = cli(&admin, &["user", "list"], "");
    assert!(
        ok && out.contains(ADMIN) && out.contains("ops@example.net"),
        "{out}"
    );
    assert!(out.starts_with("ID") && has_rfc3339(&out), "{out}");
    let (ok, out, _) = cli(&admin, &["user", "list", "--output", "json"], "");
    assert!(ok);
    let created = json(&out)["items"][1]["created_at"].clone();
    assert!(created.is_i64(), "json keeps the API's values: {out}");
    let (ok, _, err) = login(&ops, "ops@example.net", "Operator-Pass-123");
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&ops, &["site", "create", "s1", "--lan", "10.9.0.0/24"], "");
    assert!(ok, "{err}");

    // A role change takes effect on the user's next request.
    let (ok, out, err) = cli(
        &admin,
        &["user", "set-role", "ops@example.net", "viewer"],
        "",
    );
    assert!(ok && out.contains("viewer"), "{out}{err}");
    let (ok, _, err) = cli(&ops, &["site", "create", "s2", "--lan", "10.9.1.0/24"], "");
    assert!(!ok && err.contains("403"), "{err}");

    // Disabled: locked out; enabled: back in.
    let (ok, out, err) = cli(&admin, &["user", "disable", "ops@example.net"], "");
    assert!(ok && out.contains("disabled"), "{out}{err}");
    let (ok, _, _) = cli(&ops, &["site", "list"], "");
    assert!(!ok);
    let (ok, _, _) = login(&ops, "ops@example.net", "Operator-Pass-123");
    assert!(!ok);
    let (ok, _, err) = cli(&admin, &["user", "enable", "ops@example.net"], "");
    assert!(ok, "{err}");
    let (ok, _, err) = login(&ops, "ops@example.net", "Operator-Pass-123");
    assert!(ok, "{err}");

    // An admin sets another user's password; the old one stops working.
    let (ok, _, err) = cli(
        &admin,
        &["user", "password", "ops@example.net"],
        "Second-Operator-Pass-456\n",
    );
    assert!(ok, "{err}");
    let (ok, _, _) = login(&ops, "ops@example.net", "Operator-Pass-123");
    assert!(!ok);
    let (ok, _, err) = login(&ops, "ops@example.net", "Second-Operator-Pass-456");
    assert!(ok, "{err}");

    // A user changes their own: the current one first (a wrong one changes nothing), and the
    // session goes on with the new one.
    let (ok, _, err) = cli(
        &ops,
        &["user", "password"],
        "Not-The-Current-Pass-1\nThird-Operator-Pass-789\n",
    );
    assert!(!ok && err.contains("current_password"), "{err}");
    let (ok, out, err) = cli(
        &ops,
        &["user", "password"],
        "Second-Operator-Pass-456\nThird-Operator-Pass-789\n",
    );
    assert!(ok && out.contains("this one continues"), "{out}{err}");
    let (ok, out, err) = cli(&ops, &["site", "list"], "");
    assert!(ok && out.contains("s1"), "{out}{err}");
    let (ok, _, err) = login(
        &dir.path().join("ops2"),
        "ops@example.net",
        "Third-Operator-Pass-789",
    );
    assert!(ok, "{err}");

    // An API key: printed once, alone on stdout; listed by hint only; revoked by name.
    let (ok, out, err) = cli(
        &admin,
        &[
            "api-key",
            "create",
            "ci",
            "--role",
            "viewer",
            "--expires-in-days",
            "7",
        ],
        "",
    );
    assert!(ok && err.contains("shown this once"), "{out}{err}");
    let key = out.trim().to_owned();
    assert!(
        key.starts_with("pak_") && !key.contains(char::is_whitespace),
        "{out}"
    );
    let (status, _) = http(c.addr, "GET", "/api/v1/sites", Some(&key), None).unwrap();
    assert_eq!(status, 200);
    let (ok, out, _) = cli(&admin, &["api-key", "list"], "");
    assert!(
        ok && out.contains("ci") && out.contains(&key[..10]),
        "{out}"
    );
    assert!(!out.contains(&key) && has_rfc3339(&out), "{out}");
    let (ok, _, err) = cli(&admin, &["api-key", "revoke", "nosuch"], "");
    assert!(!ok && err.contains("no API key named nosuch"), "{err}");
    let (ok, _, err) = cli(&admin, &["api-key", "revoke", "ci"], "");
    assert!(ok, "{err}");
    let (status, _) = http(c.addr, "GET", "/api/v1/sites", Some(&key), None).unwrap();
    assert_eq!(status, 401);
    // Only admins manage users.
    let (ok, _, err) = cli(&ops, &["user", "list"], "");
    assert!(!ok && err.contains("403"), "{err}");
}

#[test]
fn migrate_moves_a_controller_from_sqlite_to_postgres_without_a_password_in_sight() {
    let pg = patronus_lab::postgres::Postgres::start().unwrap();
    pg.create_database("patronus").unwrap();
    let url = pg.url("patronus");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = start(&state);
    let token = login(c.addr)["access_token"].as_str().unwrap().to_owned();
    let (status, body) = http(
        c.addr,
        "POST",
        "/api/v1/sites",
        Some(&token),
        Some(r#"{"name":"hq","lan_prefixes":["10.1.0.0/16"],"links":[{"name":"mpls","kind":"mpls"}]}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    c.finish(nix::sys::signal::Signal::SIGTERM);

    // The target's URL (with its password) comes from the environment, never the arguments.
    let migrate = || {
        Command::new(patronus())
            .args(["controller", "migrate", "--data-dir"])
            .arg(&state)
            .env("PATRONUS_MIGRATE_TO", &url)
            .output()
            .unwrap()
    };
    let out = migrate();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("sites ") && l.ends_with(" 1 rows")),
        "{stdout}"
    );
    assert!(stdout.contains(":***@127.0.0.1"), "{stdout}");
    assert!(!format!("{stdout}{stderr}").contains(pg.password()));
    // Again, over the database now in use: refused, and nothing changed.
    let out = migrate();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds 1 users and 1 sites"));

    // The controller on PostgreSQL: the same data directory (its signing key), so the token
    // issued on SQLite is good, and the site is there.
    let c = start_with(&state, &[("PATRONUS_DATABASE", &url)]);
    let (status, body) = http(c.addr, "GET", "/api/v1/sites", Some(&token), None).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["items"][0]["name"], "hq", "{body}");
    let log = c.finish(nix::sys::signal::Signal::SIGTERM);
    assert!(!log.contains(pg.password()), "{log}");
}

/// What a webhook receiver saw: every POST (its delivery id and event id, in arrival order),
/// how many it is holding unanswered, and how many it has answered.
#[derive(Default)]
struct Seen {
    posts: Vec<(String, String)>,
    open: usize,
    answered: usize,
}

/// A webhook receiver on loopback that holds each POST `hold` before answering 200.
fn slow_receiver(hold: Duration) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let sink = sink.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let (mut delivery, mut length) = (String::new(), 0usize);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        match k.to_ascii_lowercase().as_str() {
                            "x-patronus-delivery" => delivery = v.trim().to_owned(),
                            "content-length" => length = v.trim().parse().unwrap_or(0),
                            _ => {}
                        }
                    }
                }
                let mut body = vec![0; length];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                let event = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                {
                    let mut s = sink.lock().unwrap();
                    s.posts.push((delivery, event));
                    s.open += 1;
                }
                std::thread::sleep(hold);
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                let mut s = sink.lock().unwrap();
                s.open -= 1;
                s.answered += 1;
            });
        }
    });
    (addr, seen)
}

#[test]
fn a_controller_killed_mid_burst_leaves_every_webhook_event_delivered_by_the_others() {
    let pg = patronus_lab::postgres::Postgres::start().unwrap();
    pg.create_database("patronus").unwrap();
    let url = pg.url("patronus");
    let dir = tempfile::tempdir().unwrap();
    // One data directory (one signing key) for three controllers over one PostgreSQL.
    let state = dir.path().join("state");
    let env = [
        ("PATRONUS_ADMIN_EMAIL", ADMIN),
        ("PATRONUS_ADMIN_PASSWORD", PASSWORD),
        ("PATRONUS_DATABASE", url.as_str()),
        ("PATRONUS_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8"),
    ];
    let a = start_with(&state, &env);
    let b = start_with(&state, &env);
    let _c = start_with(&state, &env);
    let token = login(a.addr)["access_token"].as_str().unwrap().to_owned();
    let (receiver, seen) = slow_receiver(Duration::from_millis(400));
    let (status, body) = http(
        a.addr,
        "POST",
        "/api/v1/webhooks",
        Some(&token),
        Some(&format!(
            r#"{{"url":"http://{receiver}/hook","events":["config.changed"]}}"#
        )),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let hook = json(&body)["id"].as_i64().unwrap();

    // A burst of 40 changes (40 events): the first on A until A has deliveries in flight,
    // then A is killed and the rest go to B.
    const EVENTS: usize = 40;
    let mut on = a.addr;
    let mut killed = None;
    let mut a = Some(a);
    for i in 0..EVENTS {
        let site = format!(
            r#"{{"name":"s{i}","lan_prefixes":["10.{i}.0.0/16"],"links":[{{"name":"mpls","kind":"mpls"}}]}}"#
        );
        let (status, body) = http(on, "POST", "/api/v1/sites", Some(&token), Some(&site)).unwrap();
        assert_eq!(status, 201, "{body}");
        if killed.is_none() && i >= 9 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while seen.lock().unwrap().open < 3 {
                assert!(Instant::now() < deadline, "A delivers nothing");
                std::thread::sleep(Duration::from_millis(5));
            }
            let answered = seen.lock().unwrap().answered;
            a.take().unwrap().finish(nix::sys::signal::Signal::SIGKILL);
            // Posted by the time A was dead and not answered before it was killed: the only
            // deliveries a receiver can see twice (A may have died before recording them).
            killed = Some(seen.lock().unwrap().posts.len() - answered);
            on = b.addr;
        }
    }
    let in_flight = killed.expect("A was never killed with deliveries in flight");

    // Every delivery is marked delivered (by B or C), within the lease of those A held.
    let path = format!("/api/v1/webhooks/{hook}/deliveries?limit=100");
    let deadline = Instant::now() + Duration::from_secs(90);
    let deliveries = loop {
        let (status, body) = http(b.addr, "GET", &path, Some(&token), None).unwrap();
        assert_eq!(status, 200, "{body}");
        let v = json(&body);
        let items = v["items"].as_array().unwrap().clone();
        if items.len() == EVENTS && items.iter().all(|d| d["status"] == "delivered") {
            break items;
        }
        assert!(Instant::now() < deadline, "not all delivered: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };

    // At the receiver: every event, each under one delivery (one per webhook, not one per
    // controller), and a second POST of a delivery only for those A had in flight.
    let s = seen.lock().unwrap();
    let mut by_event: std::collections::HashMap<&str, std::collections::HashSet<&str>> =
        std::collections::HashMap::new();
    for (delivery, event) in &s.posts {
        by_event.entry(event).or_default().insert(delivery);
    }
    for d in &deliveries {
        let event = d["event_id"].as_str().unwrap();
        let ids = by_event
            .get(event)
            .unwrap_or_else(|| panic!("{event} never arrived"));
        assert_eq!(
            ids.iter().copied().collect::<Vec<_>>(),
            [d["id"].to_string().as_str()],
            "{event}"
        );
    }
    assert_eq!(by_event.len(), EVENTS);
    let again = s.posts.len() - EVENTS;
    assert!(
        again <= in_flight,
        "{again} posted twice, {in_flight} in flight when A was killed"
    );
    eprintln!(
        "{EVENTS} events, {} posts: {again} posted again after A was killed with {in_flight} in flight",
        s.posts.len()
    );
}

/// The backup commands against a controller as an operator runs them: an identity made
/// (0600), a backup taken while the controller serves, listed and verified; a site deleted by
/// mistake and brought back alone (`restore --site`) while it serves; deleted again, the
/// controller stopped and the whole backup restored (only with `--replace` over a database in
/// use); started again, the site is back and the session of before still works.
/// Then the database file is damaged: the controller refuses to start, naming the file and
/// `patronus restore`; with the file moved aside, a restore into a fresh one brings it back.
#[test]
fn backups_are_taken_while_serving_and_a_restore_brings_back_a_deleted_site_or_a_damaged_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();
    let env = [
        ("PATRONUS_ADMIN_EMAIL", ADMIN),
        ("PATRONUS_ADMIN_PASSWORD", PASSWORD),
    ];
    let c = start_with(&state, &env);
    let token = login(c.addr)["access_token"].as_str().unwrap().to_owned();
    let site =
        r#"{"name":"hq","lan_prefixes":["10.1.0.0/16"],"links":[{"name":"mpls","kind":"mpls"}]}"#;
    let (status, body) = http(c.addr, "POST", "/api/v1/sites", Some(&token), Some(site)).unwrap();
    assert_eq!(status, 201, "{body}");
    let id = json(&body)["id"].as_i64().unwrap();

    let home = dir.path().join("home");
    let identity = dir.path().join("identity.txt");
    let id_arg = identity.to_str().unwrap();
    let (ok, recipient, err) = cli(&home, &["backup", "keygen", "--out", id_arg], "");
    assert!(ok, "{err}");
    assert!(recipient.trim().starts_with("age1"), "{recipient}");
    assert_eq!(
        std::fs::metadata(&identity).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let backup = |args: &[&str]| {
        let mut all = vec!["backup"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--data-dir", state_arg]);
        cli(&home, &all, "")
    };
    let (ok, out, err) = backup(&["create", "--recipient", recipient.trim()]);
    assert!(ok, "{err}");
    assert!(out.contains("backup patronus-"), "{out}");
    let (ok, out, err) = backup(&["list", "--output", "json"]);
    assert!(ok, "{err}");
    let list = json(&out);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let (ok, out, err) = backup(&["verify", "--identity", id_arg]);
    assert!(ok, "{err}");
    assert!(out.contains("is whole"), "{out}");

    // The mistake, undone alone while the controller serves.
    let delete = || {
        let (status, body) = http(
            c.addr,
            "DELETE",
            &format!("/api/v1/sites/{id}"),
            Some(&token),
            None,
        )
        .unwrap();
        assert_eq!(status, 204, "{body}");
    };
    delete();
    let restore = |extra: &[&str]| {
        let mut all = vec!["restore", "--identity", id_arg, "--data-dir", state_arg];
        all.extend_from_slice(extra);
        cli(&home, &all, "")
    };
    let (ok, out, err) = restore(&["--site", "hq"]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("(id {id})")), "{out}");
    let path = format!("/api/v1/sites/{id}");
    let (status, body) = http(c.addr, "GET", &path, Some(&token), None).unwrap();
    assert_eq!(status, 200, "restored while serving: {body}");
    // The same mistake again, then the whole backup restored with the controller stopped.
    delete();
    c.finish(nix::sys::signal::Signal::SIGTERM);
    let (ok, _, err) = restore(&[]);
    assert!(!ok && err.contains("--replace"), "{err}");
    let (ok, out, err) = restore(&["--replace"]);
    assert!(ok, "{err}");
    assert!(out.contains("restored patronus-"), "{out}");
    let c = start_with(&state, &env);
    let (status, body) = http(
        c.addr,
        "GET",
        &format!("/api/v1/sites/{id}"),
        Some(&token),
        None,
    )
    .unwrap();
    assert_eq!(status, 200, "the deleted site is back: {body}");
    c.finish(nix::sys::signal::Signal::SIGTERM);

    // The database file damaged: refused at start, naming the file and the way back.
    let db = state.join("controller.db");
    {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&[0xA5; 8192]).unwrap();
    }
    let out = Command::new(patronus())
        .args([
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            state_arg,
        ])
        .env("PATRONUS_PLAIN_HTTP", "true")
        .envs(env)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("{}: the database is damaged", db.display()))
            && err.contains("patronus restore"),
        "{err}"
    );
    for f in ["controller.db", "controller.db-wal", "controller.db-shm"] {
        let _ = std::fs::rename(state.join(f), state.join(format!("{f}.damaged")));
    }
    let (ok, _, err) = restore(&[]);
    assert!(ok, "{err}");
    let c = start_with(&state, &env);
    let (status, body) = http(c.addr, "GET", "/api/v1/sites", Some(&token), None).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["total"], 1, "{body}");
    c.finish(nix::sys::signal::Signal::SIGTERM);
}

/// `patronus login` to `url` as the admin, pinning the certificate fingerprint `pin`.
fn login_pinned(home: &Path, url: &str, pin: &str) -> (bool, String, String) {
    cli(
        home,
        &[
            "login",
            "--url",
            url,
            "--ca-fingerprint",
            pin,
            "--email",
            ADMIN,
        ],
        PASSWORD,
    )
}

/// A TLS connection to `addr` that trusts only the certificate with fingerprint `pin`, its
/// handshake done (so that a certificate refused shows here, before any request is written).
fn tls_connect(
    addr: SocketAddr,
    pin: &str,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let pin = patronus_controller::tls::parse_fingerprint(pin).unwrap();
    let config = patronus_controller::tls::pinned_client_config(vec![pin]).unwrap();
    let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap())
        .map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// Writes one request (`Connection: close`) on `s`.
fn send(
    s: &mut impl Write,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(head.as_bytes()).unwrap();
    s.flush().unwrap();
}

/// Reads a whole response (to the connection's close): (status, head, body).
fn receive(s: &mut impl Read) -> (u16, String, String) {
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        // A close without close_notify after the whole answer.
        assert!(
            e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty(),
            "{e}"
        );
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    (status, head.to_owned(), body.to_owned())
}

/// One request over a connection pinned to `pin`: (status, head, body).
fn https(
    addr: SocketAddr,
    pin: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, String, String) {
    let mut s = tls_connect(addr, pin).unwrap();
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    send(&mut s, method, path, &headers, body.as_ref());
    receive(&mut s)
}

/// The fingerprint the controller printed in its "listening" line.
fn printed_fingerprint(c: &Controller) -> String {
    let log = c.log.lock().unwrap().clone();
    let line = log
        .lines()
        .find(|l| l.contains("listening on https://"))
        .unwrap_or_else(|| panic!("no https listening line: {log}"));
    let at = line.find("certificate sha256:").unwrap() + "certificate ".len();
    line[at..at + 71].to_owned()
}

/// A self-signed certificate for `localhost` written to `cert` and its key (0600) to `key`,
/// each replaced whole (written beside, then renamed), as a certificate renewal would;
/// returns its fingerprint.
fn write_certificate(cert: &Path, key: &Path) -> String {
    use std::os::unix::fs::OpenOptionsExt;
    let k = rcgen::KeyPair::generate().unwrap();
    let c = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&k)
        .unwrap();
    for (path, text, mode) in [(key, k.serialize_pem(), 0o600), (cert, c.pem(), 0o644)] {
        let tmp = path.with_extension("new");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    patronus_controller::tls::fingerprint(c.der())
}

#[test]
fn by_default_the_controller_serves_https_with_its_own_certificate_that_the_cli_pins() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let env = [
        ("PATRONUS_ADMIN_EMAIL", ADMIN),
        ("PATRONUS_ADMIN_PASSWORD", PASSWORD),
        ("PATRONUS_PLAIN_HTTP", "false"),
    ];
    let c = start_with(&state, &env);
    let fp = printed_fingerprint(&c);
    // The certificate and its key are in the data directory, the key and the directory
    // private; the fingerprint file says what the log said.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state.join("tls")), 0o700);
    assert_eq!(mode(&state.join("tls/key.pem")), 0o600);
    assert_eq!(
        std::fs::read_to_string(state.join("tls/fingerprint"))
            .unwrap()
            .trim(),
        fp
    );
    let url = format!("https://{}", c.addr);
    let home = dir.path().join("home");

    // Plain HTTP to the TLS port gets no answer (and is counted).
    assert!(http(c.addr, "GET", "/health", None, None).is_err());

    // The CLI with the pin logs in, keeps the pin with the session, and works.
    let (ok, _, err) = login_pinned(&home, &url, &fp);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&home, &["site", "create", "hq", "--lan", "10.1.0.0/16"], "");
    assert!(ok && out.contains("hq"), "{out} {err}");
    // In openssl's form (upper case, colons) the pin is the same.
    let colons: String = fp.as_bytes()["sha256:".len()..]
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let (ok, _, err) = login_pinned(&dir.path().join("home-openssl"), &url, &colons);
    assert!(ok, "{err}");

    // Another pin, or none (no CA vouches for a self-signed certificate): refused at the
    // handshake, before the request (and the password in it) is written, saying why.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (ok, _, err) = login_pinned(&dir.path().join("home2"), &url, &wrong);
    assert!(
        !ok && err.contains(&format!(
            "has fingerprint {fp}, which is not the pinned one"
        )),
        "{err}"
    );
    let (ok, _, err) = cli(
        &dir.path().join("home3"),
        &["login", "--url", &url, "--email", ADMIN],
        PASSWORD,
    );
    assert!(!ok && err.contains("certificate"), "{err}");
    let (ok, _, err) = cli(
        &dir.path().join("home4"),
        &[
            "login",
            "--url",
            &url,
            "--ca-fingerprint",
            "sha256:nothex",
            "--email",
            ADMIN,
        ],
        PASSWORD,
    );
    assert!(
        !ok && err.contains("--ca-fingerprint") && err.contains("not a SHA-256"),
        "{err}"
    );
    // Each refused handshake is counted.
    let token = json(
        &https(
            c.addr,
            &fp,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(serde_json::json!({ "email": ADMIN, "password": PASSWORD })),
        )
        .2,
    )["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _, metrics) = https(c.addr, &fp, "GET", "/metrics", Some(&token), None);
    assert_eq!(status, 200);
    let failed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("patronus_http_tls_handshakes_failed_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(failed >= 3, "{failed}");

    // The certificate is kept: a restart serves the same one.
    c.finish(nix::sys::signal::Signal::SIGTERM);
    let c = start_with(&state, &env);
    assert_eq!(printed_fingerprint(&c), fp);
    c.finish(nix::sys::signal::Signal::SIGTERM);

    // Plain HTTP beyond loopback is refused, by key; so are half a certificate and a key
    // everyone can read.
    let out = Command::new(patronus())
        .args(["controller", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(&state)
        .env("PATRONUS_PLAIN_HTTP", "true")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("PATRONUS_PLAIN_HTTP: plain HTTP on 0.0.0.0:0"),
        "{err}"
    );
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    write_certificate(&cert, &key);
    let out = Command::new(patronus())
        .args(["controller", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&state)
        .env("PATRONUS_TLS_CERT_FILE", &cert)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("PATRONUS_TLS_CERT_FILE: needs tls_key_file"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(patronus())
        .args(["controller", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&state)
        .env("PATRONUS_TLS_CERT_FILE", &cert)
        .env("PATRONUS_TLS_KEY_FILE", &key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("readable by every user"),
        "{err}"
    );
}

#[test]
fn a_new_certificate_is_served_to_new_connections_on_sighup_and_a_held_long_poll_survives_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let first = write_certificate(&cert, &key);
    let c = start_with(
        &dir.path().join("state"),
        &[
            ("PATRONUS_ADMIN_EMAIL", ADMIN),
            ("PATRONUS_ADMIN_PASSWORD", PASSWORD),
            ("PATRONUS_PLAIN_HTTP", "false"),
            ("PATRONUS_TLS_CERT_FILE", cert.to_str().unwrap()),
            ("PATRONUS_TLS_KEY_FILE", key.to_str().unwrap()),
        ],
    );
    assert_eq!(printed_fingerprint(&c), first);
    let login = |pin: &str| {
        let (status, _, body) = https(
            c.addr,
            pin,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(serde_json::json!({ "email": ADMIN, "password": PASSWORD })),
        );
        assert_eq!(status, 200, "{body}");
        json(&body)["access_token"].as_str().unwrap().to_owned()
    };
    let admin = login(&first);

    // An edge's credential, and its configuration's ETag.
    let (status, _, body) = https(
        c.addr,
        &first,
        "POST",
        "/api/v1/sites",
        Some(&admin),
        Some(serde_json::json!({
            "name": "hq",
            "lan_prefixes": ["10.1.0.0/16"],
            "links": [{ "name": "mpls", "kind": "mpls", "endpoint": "198.51.100.1:51820" }]
        })),
    );
    assert_eq!(status, 201, "{body}");
    let site = json(&body)["id"].as_i64().unwrap();
    let (_, _, body) = https(
        c.addr,
        &first,
        "POST",
        &format!("/api/v1/sites/{site}/enrollment-tokens"),
        Some(&admin),
        Some(serde_json::json!({})),
    );
    let token = json(&body)["token"].as_str().unwrap().to_owned();
    let (status, _, body) = https(
        c.addr,
        &first,
        "POST",
        "/api/v1/enroll",
        None,
        Some(
            serde_json::json!({ "token": token, "public_key": patronus_api::key_to_base64(&[7; 32]) }),
        ),
    );
    assert_eq!(status, 200, "{body}");
    let credential = json(&body)["credential"].as_str().unwrap().to_owned();
    let (status, head, _) = https(
        c.addr,
        &first,
        "GET",
        "/api/v1/edge/config",
        Some(&credential),
        None,
    );
    assert_eq!(status, 200);
    let etag = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("etag: ")
                .or_else(|| l.strip_prefix("ETag: "))
        })
        .unwrap()
        .to_owned();

    // The long poll, held by the controller (its gauge says so) on a connection made with the
    // first certificate.
    let long_polls = |pin: &str, token: &str| -> u64 {
        let (_, _, m) = https(c.addr, pin, "GET", "/metrics", Some(token), None);
        m.lines()
            .find_map(|l| l.strip_prefix("patronus_edge_config_long_polls "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap() as u64
    };
    let mut held = tls_connect(c.addr, &first).unwrap();
    let auth = format!("Bearer {credential}");
    send(
        &mut held,
        "GET",
        "/api/v1/edge/config?wait=25",
        &[
            ("Authorization", auth.as_str()),
            ("If-None-Match", etag.as_str()),
        ],
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while long_polls(&first, &admin) == 0 {
        assert!(Instant::now() < deadline, "the long poll was never held");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The certificate renewed in place, then SIGHUP: new connections get the new one.
    let second = write_certificate(&cert, &key);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tls_connect(c.addr, &second).is_err() {
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served: {}",
            c.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = tls_connect(c.addr, &first).map(|_| ()).unwrap_err();
    assert_eq!(
        patronus_controller::tls::not_pinned(&err).map(|p| p.seen.as_str()),
        Some(second.as_str()),
        "{err}"
    );
    // The held poll is still held, and a change answers it on its old connection.
    let admin = login(&second);
    assert_eq!(long_polls(&second, &admin), 1);
    let (status, _, body) = https(
        c.addr,
        &second,
        "POST",
        &format!("/api/v1/sites/{site}/links"),
        Some(&admin),
        Some(serde_json::json!({ "name": "lte", "kind": "lte" })),
    );
    assert_eq!(status, 201, "{body}");
    let (status, head, body) = receive(&mut held);
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(body.contains("lte"), "{body}");

    // A renewal that leaves a key not matching the certificate is not served: the last good
    // certificate stays, and the log says why.
    let k = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("other.pem"), k.serialize_pem()).unwrap();
    std::fs::set_permissions(
        dir.path().join("other.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::rename(dir.path().join("other.pem"), &key).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.log.lock().unwrap().contains("cannot be used") {
        assert!(Instant::now() < deadline, "{}", c.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(tls_connect(c.addr, &second).is_ok());
    // A good pair written without a signal is found by the look every 5 s.
    let third = write_certificate(&cert, &key);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tls_connect(c.addr, &third).is_err() {
        assert!(
            Instant::now() < deadline,
            "the changed files were not read: {}",
            c.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.finish(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn an_edge_with_a_wrong_pinned_fingerprint_refuses_to_enrol_and_keeps_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let c = start_with(
        &dir.path().join("state"),
        &[
            ("PATRONUS_ADMIN_EMAIL", ADMIN),
            ("PATRONUS_ADMIN_PASSWORD", PASSWORD),
            ("PATRONUS_PLAIN_HTTP", "false"),
        ],
    );
    let fp = printed_fingerprint(&c);
    let url = format!("https://{}", c.addr);
    let home = dir.path().join("home");
    let (ok, _, err) = login_pinned(&home, &url, &fp);
    assert!(ok, "{err}");
    for args in [
        &["site", "create", "hq", "--lan", "10.1.0.0/16"][..],
        &["link", "add", "hq", "mpls", "--kind", "mpls"],
    ] {
        let (ok, out, err) = cli(&home, args, "");
        assert!(ok, "{out} {err}");
    }
    let (ok, token, err) = cli(&home, &["site", "enroll-token", "hq"], "");
    assert!(ok, "{err}");
    let state = dir.path().join("edge");
    let local = dir.path().join("local.toml");
    std::fs::write(
        &local,
        format!(
            "controller = \"{url}\"\nstate_dir = \"{}\"\n[[links]]\nname = \"mpls\"\naddress = \"127.0.0.1\"\n",
            state.display()
        ),
    )
    .unwrap();
    let enroll = |pin: &str| {
        Command::new(patronus())
            .args(["edge", "enroll", "--local"])
            .arg(&local)
            .args(["--ca-fingerprint", pin])
            .env("PATRONUS_ENROLL_TOKEN", token.trim())
            .output()
            .unwrap()
    };
    let wrong = format!("sha256:{}", "cd".repeat(32));
    let out = enroll(&wrong);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "has fingerprint {fp}, which is not the pinned one"
            )),
        "{err}"
    );
    // Nothing reached the controller: the token is still good, with the right pin, which the
    // edge keeps for its next starts.
    let out = enroll(&fp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(state.join("credential").exists());
    assert_eq!(
        std::fs::read_to_string(state.join("controller-fingerprint"))
            .unwrap()
            .trim(),
        fp
    );
    c.finish(nix::sys::signal::Signal::SIGTERM);
}

/// One STUN exchange from `socket` to `to`: the answer read as the request's, keyed with `key`
/// if given.
fn stun_exchange(
    socket: &std::net::UdpSocket,
    to: SocketAddr,
    request: &[u8],
    transaction: &[u8; 12],
    key: Option<&[u8]>,
) -> Option<patronus_controller::stun::Answer> {
    socket.send_to(request, to).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = socket.recv_from(&mut buf).unwrap();
    patronus_controller::stun::read_answer(&buf[..n], transaction, key)
}

/// A site created from `spec` (JSON) and enrolled with a key made of `key_byte`, over plain
/// HTTP: its id and its credential.
fn enrolled_site(addr: SocketAddr, token: &str, spec: &str, key_byte: u8) -> (i64, String) {
    let (status, body) = http(addr, "POST", "/api/v1/sites", Some(token), Some(spec)).unwrap();
    assert_eq!(status, 201, "{body}");
    let site = json(&body)["id"].as_i64().unwrap();
    let (_, body) = http(
        addr,
        "POST",
        &format!("/api/v1/sites/{site}/enrollment-tokens"),
        Some(token),
        Some("{}"),
    )
    .unwrap();
    let enrol = format!(
        r#"{{"token":"{}","public_key":"{}"}}"#,
        json(&body)["token"].as_str().unwrap(),
        patronus_api::key_to_base64(&[key_byte; 32])
    );
    let (status, body) = http(addr, "POST", "/api/v1/enroll", None, Some(&enrol)).unwrap();
    assert_eq!(status, 200, "{body}");
    (site, json(&body)["credential"].as_str().unwrap().to_owned())
}

/// The controller's `patronus_stun_requests_total` for `result`.
fn stun_count(addr: SocketAddr, token: &str, result: &str) -> u64 {
    let (_, text) = http(addr, "GET", "/metrics", Some(token), None).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "patronus_stun_requests_total{{result=\"{result}\"}} "
            ))
        })
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_controller_answers_stun_on_its_api_port_and_keys_its_answers_to_a_site() {
    use patronus_controller::stun::{self, Answer};
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("state"));
    // On the API's port number (unless the kernel gave that number to another UDP socket: the
    // test's controller listens on a port it chose).
    let stun_at: SocketAddr = c
        .log
        .lock()
        .unwrap()
        .lines()
        .find_map(|l| l.split("answering STUN Binding requests on udp ").nth(1))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(stun_at.ip(), c.addr.ip());
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let me = socket.local_addr().unwrap();

    // An independent client (coturn's) is answered with where it sends from.
    let out = Command::new("turnutils_stunclient")
        .args(["-p", &stun_at.port().to_string(), "127.0.0.1"])
        .output()
        .expect("turnutils_stunclient (Debian's coturn; .ci/deps installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("UDP reflexive addr: 127.0.0.1:"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Anonymous: the address, unkeyed.
    let t = [1u8; 12];
    assert_eq!(
        stun_exchange(&socket, stun_at, &stun::binding_request(&t, None), &t, None),
        Some(Answer::Mapped {
            addr: me,
            keyed: false
        })
    );

    // A site's: keyed with the hash of its credential, in both directions.
    let token = json(&login(c.addr).to_string())["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (site, credential) = enrolled_site(
        c.addr,
        &token,
        r#"{"name":"hq","lan_prefixes":["10.1.0.0/16"],"links":[{"name":"lte","kind":"lte"},
        {"name":"mpls","kind":"mpls","endpoint":"198.51.100.1:51820"}]}"#,
        9,
    );
    let key = patronus_controller::auth::sha256(credential.as_bytes());
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let auth = |site: &'static str, link: &'static str, time_ms: i64, key: &'static [u8]| {
        Some(stun::SiteAuth {
            site,
            link: Some(link),
            time_ms,
            key,
        })
    };
    let key: &'static [u8] = Box::leak(Box::new(key));
    let t = [2u8; 12];
    let signed = stun::binding_request(&t, auth("hq", "lte", now_ms(), key));
    assert_eq!(
        stun_exchange(&socket, stun_at, &signed, &t, Some(key)),
        Some(Answer::Mapped {
            addr: me,
            keyed: true
        })
    );
    // Sent again from the same address (a retransmission): the same answer. From elsewhere (a
    // replay): none, and counted as refused.
    assert_eq!(
        stun_exchange(&socket, stun_at, &signed, &t, Some(key)),
        Some(Answer::Mapped {
            addr: me,
            keyed: true
        })
    );
    let elsewhere = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let before = stun_count(c.addr, &token, "unauthorized");
    elsewhere.send_to(&signed, stun_at).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stun_count(c.addr, &token, "unauthorized") == before {
        assert!(Instant::now() < deadline, "the replay was not refused");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another key, another site, an old clock: 401; half of the authentication: 400.
    let t = [3u8; 12];
    let wrong = stun::binding_request(&t, auth("hq", "lte", now_ms(), &[0u8; 32]));
    assert_eq!(
        stun_exchange(&socket, stun_at, &wrong, &t, None),
        Some(Answer::Error(401))
    );
    let t = [4u8; 12];
    let other = stun::binding_request(&t, auth("nowhere", "lte", now_ms(), key));
    assert_eq!(
        stun_exchange(&socket, stun_at, &other, &t, None),
        Some(Answer::Error(401))
    );
    let t = [5u8; 12];
    let old = stun::binding_request(&t, auth("hq", "lte", now_ms() - 60_000, key));
    assert_eq!(
        stun_exchange(&socket, stun_at, &old, &t, None),
        Some(Answer::Error(401))
    );
    // Garbage gets no answer: the counter says it was dropped.
    let before = stun_count(c.addr, &token, "dropped");
    socket
        .send_to(b"not stun at all, just bytes", stun_at)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stun_count(c.addr, &token, "dropped") == before {
        assert!(Instant::now() < deadline, "the garbage was not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(stun_count(c.addr, &token, "unauthorized"), 4);
    assert_eq!(stun_count(c.addr, &token, "site"), 2);

    // Where hq's LTE link was seen from is recorded, and a peer is given it as that link's
    // endpoint; MPLS, with a configured endpoint, keeps that one for the peers.
    let t = [6u8; 12];
    let mpls = stun::binding_request(&t, auth("hq", "mpls", now_ms(), key));
    assert!(matches!(
        stun_exchange(&socket, stun_at, &mpls, &t, Some(key)),
        Some(Answer::Mapped { keyed: true, .. })
    ));
    assert_eq!(stun_count(c.addr, &token, "site"), 3);
    let (_, body) = http(
        c.addr,
        "GET",
        &format!("/api/v1/sites/{site}"),
        Some(&token),
        None,
    )
    .unwrap();
    let links = json(&body)["links"].as_array().unwrap().clone();
    for l in &links {
        assert_eq!(l["observed_endpoint"], me.to_string(), "{l}");
        assert!(l["observed_since"].as_i64().unwrap() > 0, "{l}");
    }
    let (_, b_credential) = enrolled_site(
        c.addr,
        &token,
        r#"{"name":"b","lan_prefixes":["10.2.0.0/16"],"links":[{"name":"inet","kind":"broadband"}]}"#,
        10,
    );
    let (status, body) = http(
        c.addr,
        "GET",
        "/api/v1/edge/config",
        Some(&b_credential),
        None,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let config = json(&body);
    let hq = config["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "hq")
        .unwrap()
        .clone();
    let endpoint = |name: &str| {
        hq["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()["endpoint"]
            .clone()
    };
    assert_eq!(endpoint("lte"), me.to_string(), "{hq}");
    assert_eq!(endpoint("mpls"), "198.51.100.1:51820", "{hq}");
    assert!(stun_count(c.addr, &token, "anonymous") >= 2);
    c.finish(nix::sys::signal::Signal::SIGTERM);
}
