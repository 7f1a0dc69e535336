//! A lab whose sites are enrolled through a real controller, for the benches that run the
//! whole system (`failover-storm`, `soak`): the controller in its own namespace with TLS (its
//! certificate pinned by the edges and the bench), an admin, every site created and enrolled
//! through the API with a one-time token, and a webhook receiver beside the controller.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use patronus_lab::{Lab, LabOptions, Topology, edges};
use serde_json::{Value, json};

use super::progress;

const EMAIL: &str = "admin@example.net";

/// A lab whose sites are enrolled through a real controller (TLS, its own namespace), and a
/// logged-in API client in the controller's namespace.
pub(super) struct World {
    pub lab: Lab,
    pub url: String,
    token: String,
    password: String,
    /// The controller's command line, to start it again.
    exe: PathBuf,
    data: PathBuf,
    env: Vec<(String, String)>,
    starts: u32,
    pub controller: u32,
    /// Each site's edge: (site, pid).
    pub edges: Vec<(String, u32)>,
    /// When the first site was created through the API (the controller up and empty).
    pub api_started: Instant,
}

impl World {
    /// Starts the controller (again), logging to a file of its own.
    pub fn start_controller(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let ctl = self.url.trim_start_matches("https://").to_owned();
        let mut cmd = Command::new(&self.exe);
        cmd.args(["controller", "--listen", &ctl, "--data-dir"])
            .arg(&self.data)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let run = patronus_lab::lab::run_dir(self.lab.run_id());
        let log = std::fs::File::create(run.join(format!("controller-{}.log", self.starts)))?;
        self.controller = self.lab.spawn_logged("controller", cmd, log)?;
        Ok(())
    }

    /// How many times the controller was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Stops the controller (SIGTERM) and waits until it has exited.
    pub fn stop_controller(&mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.controller as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while nix::sys::signal::kill(pid, None).is_ok() {
            // A child of this process: reaped here, or it stays a zombie.
            let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            anyhow::ensure!(
                Instant::now() < deadline,
                "the controller did not stop in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Logs in as the admin (waiting up to 30 s for the controller to answer).
    pub fn login(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (u, p) = (self.url.clone(), self.password.clone());
            match patronus_lab::netns::run_in(&self.lab.ns("controller")?, move || {
                crate::api_client::login(&u, EMAIL, &p, None)
            }) {
                Ok(c) => {
                    self.token = c.access_token;
                    return Ok(());
                }
                Err(e) => {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "the controller did not answer: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    pub fn request(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let (url, token) = (self.url.clone(), self.token.clone());
        let (m, p) = (method.to_owned(), path.to_owned());
        let r = patronus_lab::netns::run_in(&self.lab.ns("controller")?, move || {
            crate::api_client::request(&url, &m, &p, Some(&token), body.as_ref())
        })?;
        anyhow::ensure!(
            (200..300).contains(&r.status),
            "{method} {path}: {} {}",
            r.status,
            r.body
        );
        Ok(r.body)
    }

    /// Waits until the API shows `want` paths up, three reads in a row.
    pub fn wait_paths(&self, want: usize, patience: Duration) -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut stable = 0;
        loop {
            let up = self.request("GET", "/api/v1/paths?state=up&limit=1", None)?["total"]
                .as_u64()
                .unwrap_or(0) as usize;
            stable = if up >= want { stable + 1 } else { 0 };
            if stable >= 3 {
                return Ok(t.elapsed().as_secs_f64());
            }
            anyhow::ensure!(
                t.elapsed() < patience,
                "{up} of {want} paths up after {} s",
                patience.as_secs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for pid in self
            .edges
            .iter()
            .map(|(_, p)| p)
            .chain(std::iter::once(&self.controller))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// A full mesh of `n` sites `site1..`, each with `links` (name, kind, impairment), and a
/// controller namespace.
pub(super) fn full_mesh(
    n: usize,
    links: &[(&str, patronus_api::LinkKind, Option<String>)],
) -> Topology {
    use patronus_lab::topology::{LinkSpec, SiteSpec};
    Topology {
        name: format!("full-mesh-{n}"),
        controller: true,
        sites: (1..=n)
            .map(|i| SiteSpec {
                name: format!("site{i}").parse().expect("a valid site name"),
                lan: None,
                lan6: None,
                hosts: 1,
                links: links
                    .iter()
                    .map(|(name, kind, impair)| LinkSpec {
                        name: name.parse().expect("a valid link name"),
                        kind: *kind,
                        emulated: true,
                        impair: impair.clone(),
                        mtu: None,
                        nat: None,
                        nat_timeout_s: None,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The lab of `topology` up, its controller started, every site created and enrolled (the
/// first site the hub of a hub-and-spoke topology when `hub_spoke`), and a webhook receiver
/// beside the controller registered for `events`.
pub(super) fn up(
    topology: &Topology,
    hub_spoke: bool,
    events: &[&str],
) -> anyhow::Result<(World, patronus_lab::webhook::Receiver)> {
    let exe = std::env::current_exe().context("finding this program")?;
    let lab = Lab::up(topology, LabOptions::default())?;
    let run: PathBuf = patronus_lab::lab::run_dir(lab.run_id());
    let ctl = lab.addr("controller", false)?;
    let url = format!("https://{ctl}:8080");
    let tls_dir = run.join("controller-tls");
    let fingerprint = patronus_controller::https::generate(&tls_dir, &[ctl.to_string()])?;
    let (cert, key) = patronus_controller::https::generated_paths(&tls_dir);
    crate::api_client::pin(std::slice::from_ref(&fingerprint))?;
    let password = super::admin_password()?;
    let env = vec![
        (
            "PATRONUS_TLS_CERT_FILE".to_owned(),
            cert.display().to_string(),
        ),
        (
            "PATRONUS_TLS_KEY_FILE".to_owned(),
            key.display().to_string(),
        ),
        ("PATRONUS_ADMIN_EMAIL".to_owned(), EMAIL.to_owned()),
        ("PATRONUS_ADMIN_PASSWORD".to_owned(), password.clone()),
        // The webhook receiver listens beside the controller, on the lab's private address.
        (
            "PATRONUS_WEBHOOK_ALLOWED_NETWORKS".to_owned(),
            format!("{ctl}/32"),
        ),
    ];
    let mut world = World {
        lab,
        url: url.clone(),
        token: String::new(),
        password,
        exe: exe.clone(),
        data: run.join("controller"),
        env,
        starts: 0,
        controller: 0,
        edges: Vec::new(),
        api_started: Instant::now(),
    };
    world.start_controller()?;
    world.login()?;
    let mut storm = world;
    storm.api_started = Instant::now();
    progress(format_args!("sites, topology, enrolment"));
    let plan = storm.lab.plan().clone();
    let mut ids = Vec::new();
    for s in &plan.sites {
        let links: Vec<Value> = s
            .links
            .iter()
            .map(|l| json!({ "name": l.name.as_str(), "kind": l.kind.as_str() }))
            .collect();
        let site = storm.request(
            "POST",
            "/api/v1/sites",
            Some(json!({
                "name": s.name.as_str(),
                "lan_prefixes": [s.lan4.to_string(), s.lan6.to_string()],
                "links": links,
            })),
        )?;
        ids.push(site["id"].as_i64().context("a site id")?);
    }
    let hub = ids[0];
    if hub_spoke {
        let (url_t, token_t) = (storm.url.clone(), storm.token.clone());
        let topo = patronus_lab::netns::run_in(&storm.lab.ns("controller")?, move || {
            crate::api_client::request(&url_t, "GET", "/api/v1/topology", Some(&token_t), None)
        })?;
        let (url_t, token_t) = (storm.url.clone(), storm.token.clone());
        let etag = topo.etag.context("the topology's ETag")?;
        let r = patronus_lab::netns::run_in(&storm.lab.ns("controller")?, move || {
            crate::api_client::request_via(
                None,
                &url_t,
                "PATCH",
                "/api/v1/topology",
                Some(&token_t),
                Some(&json!({ "mode": "hub-spoke", "hubs": [hub] })),
                &[("If-Match", &etag)],
            )
        })?;
        anyhow::ensure!(r.status == 200, "PATCH /topology: {} {}", r.status, r.body);
    }
    let receiver = patronus_lab::webhook::Receiver::start_in(
        &storm.lab.ns("controller")?,
        std::net::SocketAddr::new(ctl, 0),
    )?;
    storm.request(
        "POST",
        "/api/v1/webhooks",
        Some(json!({ "url": receiver.url(), "events": events })),
    )?;
    for (i, (s, id)) in plan.sites.iter().zip(&ids).enumerate() {
        let t = storm.request(
            "POST",
            &format!("/api/v1/sites/{id}/enrollment-tokens"),
            Some(json!({})),
        )?;
        let mut local = edges::local_config(
            &plan,
            i,
            &url,
            edges::edge_dir(&storm.lab, s.name.as_str()).join("state"),
        );
        local.ca_fingerprint = vec![fingerprint.clone()];
        let pid = edges::controller_edge(
            &storm.lab,
            &exe,
            s.name.as_str(),
            &local,
            "run",
            Some(t["token"].as_str().context("a token")?),
        )?;
        storm.edges.push((s.name.to_string(), pid));
    }
    Ok((storm, receiver))
}
