//! `patronus bench dr`: every disaster-recovery drill, run for real in the lab, with its
//! recovery time (RTO), what it lost (RPO) and the data plane's loss meanwhile.
//!
//! The lab is three sites (`three_sites_mixed`) and a controller namespace. The controller
//! runs there as an operator would run it (SQLite in its data directory, scheduled backups
//! every `--interval-s` encrypted to an age recipient whose identity is kept outside the data
//! directory, to an S3 bucket: moto's server, started in the same namespace); the sites are
//! created through the CLI, and each edge enrols with its own token. Then, one after another:
//!
//! 1. **controller killed**: SIGKILL, started again at once (as `Restart=always` would);
//! 2. **database corrupted** (just before the next scheduled backup is due, the worst case
//!    for what a restore loses): stopped, bytes of the database overwritten; the start that
//!    follows must refuse it, naming the file; the operator moves it aside, restores the
//!    newest backup from the bucket (`patronus restore`) and starts the controller;
//! 3. **machine lost** (as late in the backup interval): killed, its whole data directory
//!    deleted (signing key included);
//!    restored from the bucket with the identity, started with a new signing key;
//! 4. **site deleted by mistake**: `DELETE` of a site with a running edge; brought back alone
//!    with `patronus restore --site` while the controller serves;
//! 5. **edge machine lost**: the edge killed and its state deleted; `patronus site
//!    replace-edge` and a new machine (a new state directory, a new key) enrolled with the
//!    token;
//! 6. **secrets compromised**: `patronus controller rotate-secrets` with every option: a new
//!    signing key, every API key and site credential revoked, the edges enrolled again from
//!    the tokens the operator carries to them, and every edge's key rolled.
//!
//! From the first drill on, a writer changes a site once every 100 ms through the API (a write
//! is acknowledged when the API answered 200), stopped only at each failure. A drill's RPO is
//! the writes acknowledged before the failure and absent after it, and how old the oldest of
//! them was at the failure (for a restore: the time since the backup it went back to). Its RTO
//! runs from the failure to the API answering with every edge online, every path that was up
//! before reported up again since the failure (edges report every 5 s, and at once on a
//! change), and the drill's state back (the restored site, the new edge's key, the rolled
//! keys). A UDP
//! stream between the LAN hosts of two sites the drill does not touch (`hq/h1` to
//! `branch1/h1`) runs through each drill: its loss is the data plane's.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patronus_lab::{Lab, LabOptions, Topology, edges, stream};
use serde_json::{Value, json};

use super::progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The controller's scheduled backup interval, seconds (at least 60): the RPO bound of
    /// the drills that restore a backup.
    #[arg(long, default_value_t = 60)]
    interval_s: u64,
    /// The data-plane stream's rate, packets per second.
    #[arg(long, default_value_t = 200)]
    rate_pps: u32,
    /// How long a drill may take to recover before it is reported as failed, seconds.
    #[arg(long, default_value_t = 180)]
    patience_s: u64,
}

const EMAIL: &str = "admin@example.net";
const BUCKET: &str = "patronus-dr";
const SITES: [&str; 3] = ["hq", "branch1", "branch2"];

/// The lab, the controller and what the drills share.
struct World {
    lab: Lab,
    exe: PathBuf,
    run: PathBuf,
    url: String,
    /// The controller certificate's, which the edges pin.
    fingerprint: String,
    data: PathBuf,
    /// The CLI's home (its saved login).
    home: PathBuf,
    identity: PathBuf,
    password: String,
    /// The controller's environment: scheduled backups to the bucket.
    env: Vec<(String, String)>,
    controller: Option<u32>,
    /// Controller starts so far (each logs to its own file).
    starts: u32,
    token: Arc<Mutex<String>>,
    edge_pids: Vec<(String, u32)>,
    rpo_site: i64,
    /// Paths up when everything is well.
    paths_up: usize,
    patience: Duration,
    rate_pps: u32,
    interval: Duration,
    /// Each site's edge's state directory (a replaced edge has a new one).
    edge_state: Vec<(String, PathBuf)>,
    /// The S3 server (stopped with the world, before the lab goes).
    s3: Option<patronus_lab::s3::ObjectServer>,
    /// Every write acknowledged and not lost since the drills began: (number, when).
    acks: Arc<Mutex<Vec<(u64, Instant)>>>,
    /// The writer, while it runs.
    writer: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

/// One drill's figures.
struct Outcome {
    rto_s: Option<f64>,
    /// Writes acknowledged before the failure, and of them those absent after.
    acked: usize,
    lost: Vec<Instant>,
    failed_at: Instant,
    stream: Option<stream::StreamReport>,
    notes: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.interval_s >= 60,
        "--interval-s: the controller takes backups at most once a minute"
    );
    let mut w = World::up(args)?;
    let mut drills = Vec::new();
    // Each drill: its name, the seed's scenario and its targets (RTO, RPO; seconds), the run.
    type Drill = fn(&mut World) -> anyhow::Result<Outcome>;
    type Planned = (&'static str, &'static str, Option<f64>, Option<f64>, Drill);
    let plan: [Planned; 6] = [
        (
            "controller_killed",
            "single node failure",
            Some(900.0),
            Some(300.0),
            World::controller_killed,
        ),
        (
            "database_corrupted",
            "database corruption",
            Some(1800.0),
            Some(900.0),
            World::database_corrupted,
        ),
        (
            "machine_lost",
            "complete datacenter loss",
            Some(7200.0),
            Some(3600.0),
            World::machine_lost,
        ),
        (
            "site_deleted",
            "accidental configuration deletion",
            Some(1200.0),
            None,
            World::site_deleted,
        ),
        (
            "edge_replaced",
            "(edge machine lost)",
            None,
            None,
            World::edge_replaced,
        ),
        (
            "secrets_rotated",
            "security breach",
            Some(14400.0),
            Some(3600.0),
            World::secrets_rotated,
        ),
    ];
    for (name, seed, rto_target, rpo_target, drill) in plan {
        progress(format_args!("drill {name}"));
        let o = drill(&mut w).with_context(|| format!("drill {name}"))?;
        // How old the oldest lost write was at the failure.
        let rpo_s = o
            .lost
            .first()
            .map_or(0.0, |t| o.failed_at.duration_since(*t).as_secs_f64());
        let s = o.stream.as_ref();
        let report = json!({
            "drill": name,
            "seed_scenario": seed,
            "seed_target": { "rto_s": rto_target, "rpo_s": rpo_target },
            "rto_s": o.rto_s.map(|x| (x * 100.0).round() / 100.0),
            "rpo": {
                "writes_acked": o.acked,
                "writes_lost": o.lost.len(),
                "rpo_s": (rpo_s * 100.0).round() / 100.0,
            },
            "data_plane": {
                "stream": "hq/h1 -> branch1/h1",
                "rate_pps": args.rate_pps,
                "sent": s.map(|s| s.sent),
                "lost": s.map(|s| s.lost),
                "outage_ms": s.map(|s| s.outage_ms),
            },
            "notes": o.notes,
        });
        progress(format_args!("{report}"));
        drills.push(report);
    }
    let backups = w.backups().map(|b| b.len()).ok();
    Ok(json!({
        "bench": "dr",
        "machine": super::machine(),
        "parameters": {
            "topology": "three_sites_mixed",
            "backend": "sqlite",
            "backup_interval_s": args.interval_s,
            "backup_destination": "S3 (moto server in the controller's namespace)",
            "writes_every_ms": 100,
            "rate_pps": args.rate_pps,
        },
        "paths_up": w.paths_up,
        "backups_in_bucket": backups,
        "drills": drills,
    }))
}

pub fn summary(r: &Value) -> String {
    let mut out = format!(
        "{:<20} {:>10} {:>10} {:>14} {:>10} {:>12}\n",
        "drill", "RTO", "target", "RPO lost/s", "target", "packets lost"
    );
    let secs = |v: &Value| match v.as_f64() {
        Some(x) => format!("{x:.1} s"),
        None => "-".into(),
    };
    for d in r["drills"].as_array().into_iter().flatten() {
        let rpo = match d["rpo"]["writes_lost"].as_u64() {
            Some(n) => format!("{n} / {}", secs(&d["rpo"]["rpo_s"])),
            None => "-".into(),
        };
        let lost = match (
            d["data_plane"]["lost"].as_u64(),
            d["data_plane"]["sent"].as_u64(),
        ) {
            (Some(l), Some(s)) => format!("{l}/{s}"),
            _ => "no data".into(),
        };
        out.push_str(&format!(
            "{:<20} {:>10} {:>10} {:>14} {:>10} {:>12}\n",
            d["drill"].as_str().unwrap_or("?"),
            secs(&d["rto_s"]),
            secs(&d["seed_target"]["rto_s"]),
            rpo,
            secs(&d["seed_target"]["rpo_s"]),
            lost
        ));
    }
    out
}

fn kill(pid: u32) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Waits (30 s at most) until process `pid`, a child of the lab, has exited.
fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl World {
    fn up(args: &Args) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this program")?;
        progress(format_args!("lab up"));
        let lab = Lab::up(&Topology::three_sites_mixed(), LabOptions::default())?;
        let run = patronus_lab::lab::run_dir(lab.run_id());
        let ns = lab.ns("controller")?;
        let s3 = patronus_lab::s3::ObjectServer::start_in(Some(&ns))?;
        s3.create_bucket(BUCKET)?;
        let endpoint = s3.endpoint();
        let (identity_text, recipient) = patronus_controller::backup::keygen();
        let identity = run.join("backup-identity.txt");
        crate::api_client::write_private(&identity, identity_text.as_bytes())?;
        let ctl = lab.addr("controller", false)?;
        // The controller's certificate is the operator's, kept apart from its data directory
        // (as the backup identity is): a controller on a new machine serves the same one, and
        // the edges that pin it follow.
        let tls_dir = run.join("controller-tls");
        let fingerprint = patronus_controller::https::generate(&tls_dir, &[ctl.to_string()])?;
        let (cert, key) = patronus_controller::https::generated_paths(&tls_dir);
        crate::api_client::pin(std::slice::from_ref(&fingerprint))?;
        let env = vec![
            (
                "PATRONUS_TLS_CERT_FILE".into(),
                cert.to_string_lossy().into_owned(),
            ),
            (
                "PATRONUS_TLS_KEY_FILE".into(),
                key.to_string_lossy().into_owned(),
            ),
            ("PATRONUS_CA_FINGERPRINT".into(), fingerprint.clone()),
            ("PATRONUS_BACKUP_RECIPIENTS".into(), recipient),
            (
                "PATRONUS_BACKUP_INTERVAL_S".into(),
                args.interval_s.to_string(),
            ),
            (
                "PATRONUS_BACKUP_URL".into(),
                format!("s3://{BUCKET}/controller"),
            ),
            ("PATRONUS_BACKUP_S3_ENDPOINT".into(), endpoint),
            (
                "AWS_ACCESS_KEY_ID".into(),
                patronus_lab::s3::ACCESS_KEY_ID.into(),
            ),
            (
                "AWS_SECRET_ACCESS_KEY".into(),
                patronus_lab::s3::SECRET_ACCESS_KEY.into(),
            ),
            ("PATRONUS_ADMIN_EMAIL".into(), EMAIL.into()),
        ];
        let mut w = World {
            url: format!("https://{ctl}:8080"),
            fingerprint,
            data: run.join("controller"),
            home: run.join("cli"),
            identity,
            password: String::new(),
            env,
            controller: None,
            starts: 0,
            token: Arc::new(Mutex::new(String::new())),
            edge_pids: Vec::new(),
            rpo_site: 0,
            paths_up: 0,
            patience: Duration::from_secs(args.patience_s),
            rate_pps: args.rate_pps,
            interval: Duration::from_secs(args.interval_s),
            edge_state: Vec::new(),
            s3: Some(s3),
            acks: Arc::new(Mutex::new(Vec::new())),
            writer: None,
            exe,
            run,
            lab,
        };
        w.start_controller(&[])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(p) = std::fs::read_to_string(w.data.join("initial-admin-password")) {
                w.password = p.trim().to_owned();
                if w.login().is_ok() {
                    break;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the controller did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        progress(format_args!("sites, links, enrolment"));
        let plan = w.lab.plan().clone();
        for s in &plan.sites {
            let (lan4, lan6) = (s.lan4.to_string(), s.lan6.to_string());
            w.cli(&[
                "site",
                "create",
                s.name.as_str(),
                "--lan",
                &lan4,
                "--lan",
                &lan6,
            ])?;
            for l in &s.links {
                w.cli(&[
                    "link",
                    "add",
                    s.name.as_str(),
                    l.name.as_str(),
                    "--kind",
                    l.kind.as_str(),
                ])?;
            }
        }
        w.cli(&["site", "create", "rpo-probe", "--lan", "10.250.0.0/24"])?;
        w.cli(&["site", "set-status", "rpo-probe", "planned"])?;
        let sites = w.get("/api/v1/sites?limit=100")?;
        w.rpo_site = sites["items"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "rpo-probe"))
            .and_then(|s| s["id"].as_i64())
            .context("the rpo-probe site")?;
        for (i, s) in plan.sites.iter().enumerate() {
            let token = w.cli(&["site", "enroll-token", s.name.as_str()])?;
            let state = edges::edge_dir(&w.lab, s.name.as_str()).join("state");
            let mut local = edges::local_config(&plan, i, &w.url, state.clone());
            local.ca_fingerprint = vec![w.fingerprint.clone()];
            w.edge_state.push((s.name.to_string(), state));
            let pid = edges::controller_edge(
                &w.lab,
                &w.exe,
                s.name.as_str(),
                &local,
                "run",
                Some(token.trim()),
            )?;
            w.edge_pids.push((s.name.to_string(), pid));
        }
        // Every path up (as far as they come up) and a first backup in the bucket.
        progress(format_args!("waiting for every path and a first backup"));
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut stable = 0;
        loop {
            let total = w.get("/api/v1/paths?limit=500")?["items"]
                .as_array()
                .map_or(0, Vec::len);
            let up = w.up_paths(0)?;
            if up == total && total > 0 && w.all_online()? {
                stable += 1;
            } else {
                stable = 0;
            }
            if stable >= 5 {
                w.paths_up = up;
                break;
            }
            if Instant::now() > deadline {
                bail!("not every path came up in 90 s ({up} of {total} up)");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // A scheduled backup of the whole network (taken after every site is in), which the
        // drills that restore one go back to: up to one interval.
        let all_in = patronus_controller::store::now_ms();
        progress(format_args!(
            "{} paths up; waiting for the next scheduled backup",
            w.paths_up
        ));
        let deadline = Instant::now() + Duration::from_secs(args.interval_s + 60);
        while !w
            .backups()?
            .iter()
            .any(|b| b["created_ms"].as_i64().is_some_and(|t| t >= all_in))
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no scheduled backup within the interval"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        progress(format_args!("drills start"));
        w.start_writer(1)?;
        Ok(w)
    }

    fn state_dir(&self, site: &str) -> anyhow::Result<PathBuf> {
        self.edge_state
            .iter()
            .find(|(s, _)| s == site)
            .map(|(_, d)| d.clone())
            .with_context(|| format!("no edge for {site}"))
    }

    /// Starts the controller with the drill environment and `extra`.
    fn start_controller(&mut self, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        self.starts += 1;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["controller", "--listen"])
            .arg(self.url.trim_start_matches("https://"))
            .arg("--data-dir")
            .arg(&self.data);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.envs(extra.iter().copied());
        let log = std::fs::File::create(self.run.join(format!("controller-{}.log", self.starts)))?;
        self.controller = Some(self.lab.spawn_logged("controller", cmd, log)?);
        Ok(())
    }

    fn kill_controller(&mut self) {
        self.stop_controller(nix::sys::signal::Signal::SIGKILL);
    }

    /// Sends `sig` to the controller and waits until it has exited (its port free for the
    /// next start).
    fn stop_controller(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.controller.take() {
            signal(pid, sig);
            wait_gone(pid);
        }
    }

    /// A command of this program in the controller's namespace, with the drill environment.
    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut c = self
            .lab
            .command("controller", &self.exe.to_string_lossy())?;
        c.args(args)
            .env("XDG_CONFIG_HOME", &self.home)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        Ok(c)
    }

    /// Runs the CLI to completion; its stdout, or an error with its stderr.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args)?.output()?;
        if !out.status.success() {
            bail!(
                "patronus {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Logs the CLI and the drill's own requests in.
    fn login(&self) -> anyhow::Result<()> {
        let mut c = self.command(&["login", "--url", &self.url, "--email", EMAIL])?;
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn()?;
        if let Some(mut i) = child.stdin.take() {
            use std::io::Write;
            i.write_all(self.password.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "login: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let (url, password) = (self.url.clone(), self.password.clone());
        let creds = patronus_lab::netns::run_in(&self.lab.ns("controller")?, move || {
            crate::api_client::login(&url, EMAIL, &password, None)
        })?;
        *self.token.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = creds.access_token;
        Ok(())
    }

    fn token(&self) -> String {
        self.token.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// One request from the controller's namespace.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<crate::api_client::Response> {
        let (url, token) = (self.url.clone(), self.token());
        let (method, path) = (method.to_owned(), path.to_owned());
        patronus_lab::netns::run_in(&self.lab.ns("controller")?, move || {
            crate::api_client::request(&url, &method, &path, Some(&token), body.as_ref())
        })
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self.request("GET", path, None)?;
        anyhow::ensure!(r.status == 200, "GET {path}: {}", r.status);
        Ok(r.body)
    }

    /// Paths up, as reported after `since` (unix s; 0: ever).
    fn up_paths(&self, since: i64) -> anyhow::Result<usize> {
        Ok(self.get("/api/v1/paths?state=up&limit=500")?["items"]
            .as_array()
            .map_or(0, |a| {
                a.iter()
                    .filter(|p| p["last_report"].as_i64().is_some_and(|t| t > since))
                    .count()
            }))
    }

    fn all_online(&self) -> anyhow::Result<bool> {
        let sites = self.get("/api/v1/sites?limit=100")?;
        Ok(SITES.iter().all(|n| {
            sites["items"]
                .as_array()
                .and_then(|a| a.iter().find(|s| s["name"] == *n))
                .is_some_and(|s| s["online"] == true)
        }))
    }

    /// Whether the API answers with every edge online and every path that was up before up
    /// again, as the edges reported after `since` (unix s: a report in the second of the
    /// failure does not count, so a recovery reads up to a second late rather than early).
    fn recovered(&self, since: i64) -> bool {
        self.all_online().unwrap_or(false) && self.up_paths(since).is_ok_and(|n| n >= self.paths_up)
    }

    /// Waits until [`World::recovered`] and `also`; the time since `from`, or `None` (said in
    /// `notes`) if that takes longer than the patience.
    fn wait_recovered(
        &self,
        from: Instant,
        notes: &mut Vec<String>,
        also: &dyn Fn(&World) -> bool,
    ) -> Option<f64> {
        let since = patronus_controller::store::now_s() - from.elapsed().as_secs() as i64;
        loop {
            if self.recovered(since) && also(self) {
                return Some(from.elapsed().as_secs_f64());
            }
            if from.elapsed() > self.patience {
                notes.push(format!("not recovered within {:?}", self.patience));
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `patronus restore` of the newest backup in the bucket, with `extra`: what it said.
    fn restore(&self, extra: &[&str]) -> anyhow::Result<String> {
        let (data, identity) = (
            self.data.to_string_lossy().into_owned(),
            self.identity.to_string_lossy().into_owned(),
        );
        let mut args = vec!["restore", "--data-dir", &data, "--identity", &identity];
        args.extend_from_slice(extra);
        Ok(self.cli(&args)?.trim().to_owned())
    }

    /// Whether `from` gets an answer from `to` through the tunnels (one ping, 300 ms).
    fn reaches(&self, from: &str, to: &str) -> bool {
        let Ok(addr) = self.lab.addr(to, false) else {
            return false;
        };
        self.lab
            .exec(from, &["ping", "-c", "1", "-W", "0.3", &addr.to_string()])
            .is_ok_and(|o| o.status.success())
    }

    fn backups(&self) -> anyhow::Result<Vec<Value>> {
        let out = self.cli(&[
            "backup",
            "list",
            "--data-dir",
            &self.data.to_string_lossy(),
            "--output",
            "json",
        ])?;
        Ok(serde_json::from_str::<Vec<Value>>(&out)?)
    }

    /// The last write to the probe site that survived.
    fn surviving(&self) -> anyhow::Result<u64> {
        let s = self.get(&format!("/api/v1/sites/{}", self.rpo_site))?;
        Ok(s["description"]
            .as_str()
            .and_then(|d| d.strip_prefix("write "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    /// Starts the writer: one change of the probe site every 100 ms, numbered from `next`,
    /// each acknowledged one recorded in `acks`. It runs between drills, so a drill that
    /// restores a backup loses what was written since.
    fn start_writer(&mut self, next: u64) -> anyhow::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, acked) = (stop.clone(), self.acks.clone());
        let (url, token, site) = (self.url.clone(), self.token.clone(), self.rpo_site);
        let ns = self.lab.ns("controller")?;
        let handle = std::thread::spawn(move || {
            let _ = patronus_lab::netns::run_in(&ns, || {
                let mut n = next;
                while !flag.load(Ordering::Acquire) {
                    let t = token.lock().map(|t| t.clone()).unwrap_or_default();
                    let r = crate::api_client::request(
                        &url,
                        "PATCH",
                        &format!("/api/v1/sites/{site}"),
                        Some(&t),
                        Some(&json!({ "description": format!("write {n}") })),
                    );
                    if matches!(r, Ok(ref r) if r.status == 200) {
                        if let Ok(mut a) = acked.lock() {
                            a.push((n, Instant::now()));
                        }
                        n += 1;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                anyhow::Ok(())
            });
        });
        self.writer = Some((stop, handle));
        Ok(())
    }

    /// Stops the writer: how many writes it has had acknowledged, all drills together.
    fn stop_writer(&mut self) -> usize {
        if let Some((stop, handle)) = self.writer.take() {
            stop.store(true, Ordering::Release);
            let _ = handle.join();
        }
        self.acks.lock().map_or(0, |a| a.len())
    }

    /// Starts the data-plane stream.
    fn start_stream(&self) -> anyhow::Result<Stream> {
        let control = Arc::new(stream::Control::default());
        let cfg = stream::StreamConfig {
            rate_pps: self.rate_pps,
            duration: Duration::from_secs(1800),
            size: 200,
            port: 0,
            linger: Duration::from_secs(1),
        };
        let (src, dst) = (self.lab.ns("hq/h1")?, self.lab.ns("branch1/h1")?);
        let to = self.lab.addr("branch1/h1", false)?;
        let c = control.clone();
        let handle = std::thread::spawn(move || stream::run_until(&src, &dst, to, &cfg, &c));
        // Flowing before the drill starts.
        let deadline = Instant::now() + Duration::from_secs(5);
        while control.sent() < u64::from(self.rate_pps / 2) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Stream {
            control,
            handle: Some(handle),
        })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_writer();
        self.kill_controller();
        self.s3.take();
    }
}

/// A drill's data-plane stream.
struct Stream {
    control: Arc<stream::Control>,
    handle: Option<std::thread::JoinHandle<Result<stream::StreamReport, stream::StreamError>>>,
}

impl Stream {
    /// Stops the stream: its report.
    fn stop(&mut self) -> Option<stream::StreamReport> {
        self.control.stop();
        self.handle.take()?.join().ok()?.ok()
    }
}

impl World {
    /// The common shape of a drill: the stream on, the writer stopped at the failure, `fail`
    /// (the failure and the operator's response), recovery waited for with `also`, the
    /// writes that did not survive counted, the stream stopped, the writer started again.
    fn drill(
        &mut self,
        fail: &mut dyn FnMut(&mut World, &mut Vec<String>) -> anyhow::Result<()>,
        also: &dyn Fn(&World) -> bool,
    ) -> anyhow::Result<Outcome> {
        let mut stream = self.start_stream()?;
        let acked = self.stop_writer();
        let failed_at = Instant::now();
        let mut notes = Vec::new();
        fail(self, &mut notes)?;
        let rto_s = self.wait_recovered(failed_at, &mut notes, also);
        let surviving = self.surviving()?;
        let lost: Vec<Instant> = {
            let mut a = self.acks.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let lost = a
                .iter()
                .filter(|(n, _)| *n > surviving)
                .map(|(_, t)| *t)
                .collect();
            a.retain(|(n, _)| *n <= surviving);
            lost
        };
        // The stream runs a second past the recovery: late packets count.
        std::thread::sleep(Duration::from_secs(1));
        let report = stream.stop();
        if report.is_none() {
            notes.push("the stream reported nothing".into());
        }
        self.start_writer(surviving + 1)?;
        Ok(Outcome {
            rto_s,
            acked,
            lost,
            failed_at,
            stream: report,
            notes,
        })
    }

    /// Waits until the newest backup is 3 s short of the interval old: a failure then is the
    /// worst case for the drills that go back to a backup (all but 3 s of an interval of
    /// writes since it), and the measured RPO shows the bound, not a lucky moment.
    fn just_before_the_next_backup(&self) -> anyhow::Result<()> {
        let newest = self
            .backups()?
            .iter()
            .filter_map(|b| b["created_ms"].as_i64())
            .max()
            .context("no backup")?;
        let at = newest + self.interval.as_millis() as i64 - 3000;
        let wait = at - patronus_controller::store::now_ms();
        if wait > 0 {
            progress(format_args!(
                "waiting {:.1} s: the failure comes just before the next scheduled backup",
                wait as f64 / 1000.0
            ));
            std::thread::sleep(Duration::from_millis(wait as u64));
        }
        Ok(())
    }

    fn controller_killed(&mut self) -> anyhow::Result<Outcome> {
        self.drill(
            &mut |w, _| {
                w.kill_controller();
                w.start_controller(&[])
            },
            &|_| true,
        )
    }

    fn database_corrupted(&mut self) -> anyhow::Result<Outcome> {
        self.just_before_the_next_backup()?;
        self.drill(
            &mut |w, notes| {
                // Stopped (its log written back into the file), then bytes of the file
                // overwritten, as a disk gone bad would.
                w.stop_controller(nix::sys::signal::Signal::SIGTERM);
                let db = w.data.join("controller.db");
                corrupt(&db)?;
                // The start refuses it, naming the file and the way back.
                let mut c = w.command(&["controller", "--listen"])?;
                c.arg(w.url.trim_start_matches("https://"))
                    .arg("--data-dir")
                    .arg(&w.data)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let mut child = c.spawn()?;
                let deadline = Instant::now() + Duration::from_secs(30);
                while child.try_wait()?.is_none() {
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        bail!("the controller started on a corrupted database");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let out = child.wait_with_output()?;
                let err = String::from_utf8_lossy(&out.stderr);
                anyhow::ensure!(
                    !out.status.success()
                        && err.contains("controller.db")
                        && err.contains("patronus restore"),
                    "the start on a corrupted database did not say so: {err}"
                );
                notes.push(
                    "detected at start: the error names the file and `patronus restore`".into(),
                );
                for ext in ["", "-wal", "-shm"] {
                    let f = PathBuf::from(format!("{}{ext}", db.display()));
                    if f.exists() {
                        std::fs::rename(&f, format!("{}.damaged", f.display()))?;
                    }
                }
                notes.push(w.restore(&[])?);
                w.start_controller(&[])
            },
            &|_| true,
        )
    }

    fn machine_lost(&mut self) -> anyhow::Result<Outcome> {
        self.just_before_the_next_backup()?;
        self.drill(
            &mut |w, notes| {
                w.kill_controller();
                std::fs::remove_dir_all(&w.data)?;
                notes.push(w.restore(&[])?);
                // The signing key was on the lost machine: a new one, every session ends.
                w.start_controller(&[("PATRONUS_REPLACE_SIGNING_KEY", "1")])?;
                let deadline = Instant::now() + Duration::from_secs(30);
                while w.login().is_err() {
                    anyhow::ensure!(Instant::now() < deadline, "no login after the restore");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            },
            &|_| true,
        )
    }

    fn site_deleted(&mut self) -> anyhow::Result<Outcome> {
        self.drill(
            &mut |w, notes| {
                let sites = w.get("/api/v1/sites?limit=100")?;
                let id = sites["items"]
                    .as_array()
                    .and_then(|a| a.iter().find(|s| s["name"] == "branch2"))
                    .and_then(|s| s["id"].as_i64())
                    .context("branch2")?;
                let r = w.request("DELETE", &format!("/api/v1/sites/{id}"), None)?;
                anyhow::ensure!(r.status == 204, "DELETE branch2: {}", r.status);
                notes.push(w.restore(&["--site", "branch2"])?);
                Ok(())
            },
            // hq reaches branch2's LAN again.
            &|w| w.reaches("hq/h1", "branch2/h1"),
        )
    }

    fn edge_replaced(&mut self) -> anyhow::Result<Outcome> {
        let old_key = self.keys()?[2].clone();
        self.drill(
            &mut |w, notes| {
                let i = w
                    .edge_pids
                    .iter()
                    .position(|(s, _)| s == "branch2")
                    .context("branch2's edge")?;
                kill(w.edge_pids[i].1);
                std::fs::remove_dir_all(w.state_dir("branch2")?)?;
                let asked = Instant::now();
                let token = w.cli(&["site", "replace-edge", "branch2"])?;
                let plan = w.lab.plan().clone();
                let state = edges::edge_dir(&w.lab, "branch2").join("state-new");
                let mut local = edges::local_config(&plan, 2, &w.url, state.clone());
                local.ca_fingerprint = vec![w.fingerprint.clone()];
                if let Some(e) = w.edge_state.iter_mut().find(|(s, _)| s == "branch2") {
                    e.1 = state;
                }
                let pid = edges::controller_edge(
                    &w.lab,
                    &w.exe,
                    "branch2",
                    &local,
                    "run",
                    Some(token.trim()),
                )?;
                w.edge_pids[i].1 = pid;
                notes.push(format!(
                    "replace-edge answered in {:.2} s; the new machine enrolled with its own key",
                    asked.elapsed().as_secs_f64()
                ));
                Ok(())
            },
            // The new machine's key is the site's, and hq reaches branch2's LAN through it.
            &|w| {
                w.keys().is_ok_and(|k| !k[2].is_empty() && k[2] != old_key)
                    && w.reaches("hq/h1", "branch2/h1")
            },
        )
    }

    fn secrets_rotated(&mut self) -> anyhow::Result<Outcome> {
        let keys_before = self.keys()?;
        self.drill(
            &mut |w, notes| {
                let tokens = w.run.join("rotation-tokens.txt");
                let log = std::fs::File::create(w.run.join("rotate-secrets.log"))?;
                let mut c = w.command(&[
                    "controller",
                    "rotate-secrets",
                    "--data-dir",
                    &w.data.to_string_lossy(),
                    "--revoke-api-keys",
                    "--revoke-site-credentials",
                    "--tokens-out",
                    &tokens.to_string_lossy(),
                    "--roll-edge-keys",
                    "--patience-s",
                    "120",
                ])?;
                c.stdout(log.try_clone()?).stderr(log);
                let mut child = c.spawn()?;
                // The operator carries each site's token to its edge.
                let deadline = Instant::now() + Duration::from_secs(60);
                let lines = loop {
                    let text = std::fs::read_to_string(&tokens).unwrap_or_default();
                    let lines: Vec<(String, String)> = text
                        .lines()
                        .filter_map(|l| l.split_once(' '))
                        .map(|(s, t)| (s.to_owned(), t.to_owned()))
                        .collect();
                    if lines.len() == SITES.len() {
                        break lines;
                    }
                    if let Some(status) = child.try_wait()? {
                        bail!("rotate-secrets ended early ({status}): see rotate-secrets.log");
                    }
                    anyhow::ensure!(Instant::now() < deadline, "no tokens from rotate-secrets");
                    std::thread::sleep(Duration::from_millis(20));
                };
                for (site, token) in lines {
                    crate::api_client::write_private(
                        &w.state_dir(&site)?.join("enroll-token"),
                        token.as_bytes(),
                    )?;
                }
                // Every session ended: the operator logs in again.
                let deadline = Instant::now() + Duration::from_secs(30);
                while w.login().is_err() {
                    anyhow::ensure!(Instant::now() < deadline, "no login after the rotation");
                    std::thread::sleep(Duration::from_millis(100));
                }
                let status = child.wait()?;
                anyhow::ensure!(
                    status.success(),
                    "rotate-secrets failed ({status}): see rotate-secrets.log"
                );
                notes.push(
                    "signing key replaced, sessions ended, API keys and site credentials \
                     revoked, edges enrolled again from their tokens, every edge's key rolled"
                        .into(),
                );
                Ok(())
            },
            &|w| {
                w.keys()
                    .is_ok_and(|k| k.iter().zip(&keys_before).all(|(a, b)| a != b))
            },
        )
    }

    /// The three sites' public keys.
    fn keys(&self) -> anyhow::Result<Vec<String>> {
        let sites = self.get("/api/v1/sites?limit=100")?;
        Ok(SITES
            .iter()
            .map(|n| {
                sites["items"]
                    .as_array()
                    .and_then(|a| a.iter().find(|s| s["name"] == *n))
                    .and_then(|s| s["public_key"].as_str())
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect())
    }
}

/// Overwrites every page of the database file but the first (its header) with a pattern:
/// bytes on a disk gone bad.
fn corrupt(db: &Path) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(db)?.len();
    let mut f = std::fs::OpenOptions::new().write(true).open(db)?;
    let from = 4096;
    f.seek(SeekFrom::Start(from))?;
    let junk = vec![0x5a_u8; (len - from.min(len)) as usize];
    f.write_all(&junk)?;
    f.sync_all()?;
    Ok(())
}
