//! `patronus lab demo --no-schedule` as the tests that need a whole system run it: a child
//! process, its address, admin password, certificate and lab read from what it prints, stopped
//! with Ctrl-C (it removes its lab) when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The demo, stopped (Ctrl-C, as a person would) and waited for when dropped: it removes its lab.
pub struct Demo {
    child: Child,
    /// `https://127.0.0.1:PORT`: the API and the dashboard.
    pub url: String,
    pub password: String,
    /// The controller's certificate's fingerprint (`sha256:...`).
    pub fingerprint: String,
    /// The controller's data directory (its certificate is `tls/cert.pem` there).
    pub state: PathBuf,
    pub run_id: String,
    pub lines: mpsc::Receiver<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

pub fn start_demo() -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_patronus"))
        .args(["lab", "demo", "--no-schedule", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let (mut url, mut password, mut run_id) = (None, None, None);
    let (mut fingerprint, mut state) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(240);
    while url.is_none()
        || password.is_none()
        || run_id.is_none()
        || fingerprint.is_none()
        || state.is_none()
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("the demo did not come up: {e}"));
        eprintln!("{l}");
        if let Some(rest) = l.trim().strip_prefix("Dashboard ") {
            url = Some(
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .trim_end_matches("/ui/")
                    .to_owned(),
            );
        }
        if let Some((_, pw)) = l.split_once("admin@example.net, password ") {
            password = Some(pw.trim().to_owned());
        }
        if let Some(f) = l.trim().strip_prefix("certificate ") {
            fingerprint = Some(f.trim().to_owned());
        }
        if let Some(rest) = l.trim().strip_prefix("(the password is also in ") {
            let file = rest.split(" while").next().unwrap();
            state = Some(PathBuf::from(file).parent().unwrap().to_owned());
        }
        if let Some(rest) = l.strip_prefix("Patronus demo (lab ") {
            run_id = Some(rest.split(')').next().unwrap().to_owned());
        }
    }
    // The view reads each edge's own status: it must show their paths, not an error (it once
    // refused the edges' plain-HTTP status because the controller's pin was set).
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("the demo's view showed no edge's paths: {e}"));
        assert!(
            !l.contains("status does not answer"),
            "the demo's view: {l}"
        );
        if l.contains(" paths up · ") {
            break;
        }
    }
    Demo {
        child,
        url: url.unwrap(),
        password: password.unwrap(),
        run_id: run_id.unwrap(),
        fingerprint: fingerprint.unwrap(),
        state: state.unwrap(),
        lines,
    }
}

pub fn lab_link(d: &Demo, link: &str, verb: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_patronus"))
        .args(["lab", "link", "--run", &d.run_id, link, verb])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lab link {link} {verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
