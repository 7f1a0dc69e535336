//! A `patronus controller` process for the benches that measure the controller apart from
//! their simulated edges: its memory and CPU are its own, and each process has its own
//! open-file limit (10,000 edges hold 10,000 sockets on each side).

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use super::progress;

/// A `patronus controller` process of this binary on loopback, in its own directory.
pub(super) struct ControllerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub password: String,
}

/// `s` as a TOML string, quoted and escaped.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl ControllerProcess {
    /// A controller with its data in `dir`, on `database` (a URL; none: `dir`'s SQLite file),
    /// its admin `bench@example.net` with `password` (none: one made for it, on an empty
    /// database).
    pub(super) fn start(
        dir: &std::path::Path,
        database: Option<&str>,
        password: Option<String>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("controller.toml");
        // The simulated edges all come from 127.0.0.1: the per-address limits of a
        // controller facing the Internet would refuse them.
        std::fs::write(
            &config,
            format!(
                "data_dir = {}\nlisten = \"127.0.0.1:0\"\nplain_http = true\n\
                 auth_rate_per_minute = 1000000\nmax_connections = 100000\n\
                 max_connections_per_address = 1000000\nlog_level = \"warn\"\n{}",
                toml_string(&dir.display().to_string()),
                database.map_or(String::new(), |d| format!(
                    "database = {}\n",
                    toml_string(d)
                )),
            ),
        )?;
        let password = match password {
            Some(p) => p,
            None => super::admin_password()?,
        };
        let mut child = Command::new(std::env::current_exe()?)
            .args(["controller", "--config"])
            .arg(&config)
            .env("PATRONUS_ADMIN_EMAIL", "bench@example.net")
            .env("PATRONUS_ADMIN_PASSWORD", &password)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting `patronus controller`")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the controller's log to its end (so that it never blocks on a full pipe), and
        // passes on the address it listens on.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on http://").nth(1)
                    && let Some(t) = tx.take()
                {
                    let _ = t.send(rest.split('/').next().unwrap_or("").to_owned());
                } else if !line.contains("listening on") {
                    progress(format_args!("controller: {line}"));
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse().context("the controller's address")?,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the controller did not say where it listens within 60 s");
            }
        };
        Ok(Self {
            child,
            addr,
            password,
        })
    }

    /// Resident and peak memory (MB) and CPU time (s, user + system) so far.
    pub(super) fn usage(&self) -> (Option<f64>, Option<f64>, Option<f64>) {
        let pid = self.child.id();
        let kb = |key: &str| super::proc_status_kb(Some(pid), key).map(|v| v as f64 / 1024.0);
        (kb("VmRSS:"), kb("VmHWM:"), super::cpu_s(pid))
    }

    pub(super) fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
