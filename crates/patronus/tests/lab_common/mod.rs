//! What the lab tests that run a controller share: the binary, the admin CLI in the
//! controller's namespace, the controller's certificate fingerprint, the lab's sites created
//! through the CLI.
// Each test binary that includes this uses some of it.
#![allow(dead_code)]

pub mod demo;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use patronus_lab::Lab;

pub fn patronus() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_patronus"))
}

/// Runs the admin CLI inside the controller's namespace; (ok, stdout, stderr).
pub fn cli(lab: &Lab, home: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut c = lab
        .command("controller", patronus().to_str().unwrap())
        .unwrap();
    c.args(args)
        .env("XDG_CONFIG_HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
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

/// Creates the lab's sites and their links through the CLI (logged in at `home`), as an
/// operator would enter them.
pub fn create_sites(lab: &Lab, home: &Path) {
    for s in &lab.plan().sites {
        let (lan4, lan6) = (s.lan4.to_string(), s.lan6.to_string());
        let (ok, _, err) = cli(
            lab,
            home,
            &[
                "site",
                "create",
                s.name.as_str(),
                "--lan",
                &lan4,
                "--lan",
                &lan6,
            ],
            "",
        );
        assert!(ok, "{err}");
        for l in &s.links {
            let (ok, _, err) = cli(
                lab,
                home,
                &[
                    "link",
                    "add",
                    s.name.as_str(),
                    l.name.as_str(),
                    "--kind",
                    l.kind.as_str(),
                ],
                "",
            );
            assert!(ok, "{err}");
        }
    }
}

/// The fingerprint of the self-signed certificate the controller with its state in `state`
/// made on first start, once it has (30 s at most).
pub fn fingerprint(state: &Path) -> String {
    let file = patronus_controller::https::fingerprint_path(state);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = std::fs::read_to_string(&file) {
            return t.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "no {}", file.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Logs the first admin in at `home` (the password the controller with data directory `state`
/// generated) with `url`, pinning the certificate that controller made, once it serves; that
/// certificate's fingerprint.
pub fn login_admin(lab: &Lab, home: &Path, url: &str, state: &Path) -> String {
    let fp = fingerprint(state);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let password =
            std::fs::read_to_string(state.join("initial-admin-password")).unwrap_or_default();
        let (ok, _, err) = cli(
            lab,
            home,
            &[
                "login",
                "--url",
                url,
                "--ca-fingerprint",
                &fp,
                "--email",
                "admin@example.net",
            ],
            &password,
        );
        if ok {
            return fp;
        }
        assert!(Instant::now() < deadline, "{url} does not serve: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
