//! `patronus lab demo`: the whole system on one machine, in one command.
//!
//! It builds the `three-sites-mixed` lab (hq with MPLS, broadband and LTE; branch1 with MPLS
//! and LTE; branch2 with broadband and LTE, each link with its own emulated delay), starts a
//! controller in the lab's controller namespace, and then does what an operator would, through
//! the API: creates the sites and links, two traffic policies (voice in the `realtime` class,
//! bulk in `bulk`), a webhook for every event, and one enrolment token per site, with which
//! each edge enrols (its key pair made on its own machine). Then UDP streams run between the
//! sites' LAN hosts, and on a schedule a link is cut and restored, another degraded beyond the
//! voice SLA and repaired; the live view shows every path that carries flows or is not up,
//! the streams' losses, and each event as the controller's webhook tells it.
//!
//! The API and the dashboard (`/ui/`) stay reachable on `--listen` (a forwarder into the
//! controller's namespace), with the admin's credentials printed, so that a user can log in and
//! look, or cut links with `patronus lab link` (`--no-schedule` leaves that to them). Ctrl-C
//! removes everything.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patronus_edge::status::EdgeStatus;
use patronus_lab::edges::{self, STATUS_PORT};
use patronus_lab::lab::run_dir;
use patronus_lab::webhook::Receiver;
use patronus_lab::{Dir, Lab, LabOptions, Topology, netns, stream};
use serde_json::{Value, json};

use crate::{api_client, demo_view, terminal};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the controller's API is reachable from this machine.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Stop after this many rounds of the schedule (cut, restore, degrade, repair: 80 s each);
    /// without it, the demo runs until Ctrl-C.
    #[arg(long)]
    cycles: Option<u32>,
    /// No scheduled cuts or degradations: the links change only when you change them
    /// (`patronus lab link`), say while you watch the dashboard.
    #[arg(long, conflicts_with = "cycles")]
    no_schedule: bool,
}

const ADMIN: &str = "admin@example.net";
/// One round of the schedule.
const CYCLE: Duration = Duration::from_secs(80);

/// A scheduled step: seconds into the cycle, what, and the lab command.
const SCHEDULE: &[(u64, &str, &str, &[&str])] = &[
    (15, "cut", "hq/mpls", &["cut"]),
    (30, "restore", "hq/mpls", &["restore"]),
    (
        45,
        "degrade",
        "branch1/mpls",
        &["set", "delay=20ms", "jitter=10ms", "loss=4%"],
    ),
    (65, "repair", "branch1/mpls", &[]),
];

/// The streams: (name, from, to, UDP port, packets/s).
const STREAMS: &[(&str, &str, &str, u16, u32)] = &[
    ("voice", "hq/h1", "branch1/h1", 5004, 100),
    ("bulk", "hq/h1", "branch1/h1", 9000, 500),
    ("voice", "branch1/h1", "branch2/h1", 5006, 100),
    ("voice", "hq/h1", "branch2/h1", 5008, 100),
];

/// What the streams have seen.
#[derive(Debug, Default, Clone)]
struct StreamTally {
    sent: u64,
    lost: u64,
    last_outage_ms: f64,
}

/// The view's event log: one line per event, in the order the view learned of them, each
/// with the time it happened (counted from the start of the streams) and, when it reached the
/// view a second or more later, how much later.
#[derive(Debug)]
struct Log {
    /// The start of the streams, Unix ms.
    t0_ms: i64,
    lines: VecDeque<String>,
    /// Lines not yet printed (without a terminal, lines are printed as they come).
    unprinted: Vec<String>,
}

/// Lines the log keeps.
const LOG_LINES: usize = 500;

impl Log {
    fn new(t0_ms: i64) -> Self {
        Self {
            t0_ms,
            lines: VecDeque::new(),
            unprinted: Vec::new(),
        }
    }

    /// Adds what happened at `at_ms` (Unix ms); `late_ms`: how long after that the view
    /// learned of it.
    fn push(&mut self, at_ms: i64, text: &str, late_ms: Option<i64>) {
        let t = at_ms - self.t0_ms;
        let sign = if t < 0 { "-" } else { "" };
        let t = t.unsigned_abs();
        let mut line = format!(
            "{sign}{:02}:{:02}.{:03}  {text}",
            t / 60_000,
            t / 1000 % 60,
            t % 1000
        );
        if let Some(late) = late_ms.filter(|&l| l >= 1000) {
            line.push_str(&format!(" [+{:.1} s]", late as f64 / 1e3));
        }
        self.lines.push_back(line.clone());
        self.unprinted.push(line);
        while self.lines.len() > LOG_LINES {
            self.lines.pop_front();
        }
    }
}

fn now_ms() -> i64 {
    patronus_controller::store::now_ms()
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    // Shutdown signals go to one thread that sets `stop`; the main loop then removes the lab.
    let signals = crate::block_shutdown_signals()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.wait().is_ok() {
                    stop.store(true, Ordering::SeqCst);
                }
            })?;
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let listener = TcpListener::bind(a.listen).with_context(|| {
        format!(
            "listening on {} for the API (is a controller already running? choose another \
             address with --listen)",
            a.listen
        )
    })?;
    say("building the lab: 3 sites, 7 WAN links, a controller namespace");
    let lab = Arc::new(Lab::up(
        &Topology::three_sites_mixed(),
        LabOptions::default(),
    )?);
    crate::lab_cmd::serve_control(&lab)?;
    let result = demo(&a, &lab, &exe, listener, &stop);
    if let Err(e) = &result {
        eprintln!("demo: {e:#}");
        eprintln!(
            "(logs in {} until the lab is removed)",
            run_dir(lab.run_id()).display()
        );
    }
    say("removing the lab");
    lab.teardown()?;
    result
}

fn say(s: &str) {
    outln!("demo: {s}");
}

fn demo(
    a: &DemoArgs,
    lab: &Arc<Lab>,
    exe: &Path,
    listener: TcpListener,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let run = run_dir(lab.run_id());
    let plan = lab.plan().clone();
    let ctl = lab.addr("controller", false)?;
    let inside = format!("https://{ctl}:8080");
    let url = format!("https://{}", listener.local_addr()?);

    say("starting the controller");
    let state = run.join("controller");
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "controller",
        "--listen",
        &format!("{ctl}:8080"),
        "--data-dir",
    ])
    .arg(&state)
    .env("PATRONUS_ADMIN_EMAIL", ADMIN)
    // The demo's webhook receiver listens beside the controller, on the lab's private
    // addresses.
    .env("PATRONUS_WEBHOOK_ALLOWED_NETWORKS", format!("{ctl}/32"))
    .env("RUST_LOG", "warn");
    let log = std::fs::File::create(run.join("controller.log"))?;
    lab.spawn_logged("controller", cmd, log)?;
    let ns = lab.ns("controller")?;
    {
        let ns = ns.clone();
        let to = SocketAddr::new(ctl, 8080);
        std::thread::Builder::new()
            .name("api-forwarder".into())
            .spawn(move || forward(&listener, &ns, to))?;
    }
    // The controller makes a self-signed certificate on first start: the demo, the edges and
    // the operator's CLI pin its fingerprint.
    let fingerprint = controller_fingerprint(&state, Duration::from_secs(30))?;
    api_client::pin(std::slice::from_ref(&fingerprint))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (password, token) = loop {
        let password = std::fs::read_to_string(state.join("initial-admin-password"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        if !password.is_empty() {
            let r = api_client::request(
                &url,
                "POST",
                "/api/v1/auth/login",
                None,
                Some(&json!({ "email": ADMIN, "password": password })),
            );
            if let Ok(r) = r {
                if r.status == 200 {
                    let t = r.body["access_token"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    break (password, t);
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the controller did not come up in 30 s; its log:\n{}",
                std::fs::read_to_string(run.join("controller.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let api = |method: &str, path: &str, body: Option<Value>| -> anyhow::Result<Value> {
        let r = api_client::request(&url, method, path, Some(&token), body.as_ref())?;
        if !(200..300).contains(&r.status) {
            bail!("{method} {path}: {}", crate::api_client::error_text(&r));
        }
        Ok(r.body)
    };

    say("creating the sites, their links, two policies and a webhook through the API");
    let mut site_ids = Vec::new();
    for s in &plan.sites {
        let v = api(
            "POST",
            "/api/v1/sites",
            Some(json!({
                "name": s.name.as_str(),
                "lan_prefixes": [s.lan4.to_string(), s.lan6.to_string()],
                "description": "lab demo",
            })),
        )?;
        let id = v["id"].as_i64().context("the site has no id")?;
        for l in &s.links {
            api(
                "POST",
                &format!("/api/v1/sites/{id}/links"),
                Some(json!({ "name": l.name.as_str(), "kind": l.kind.as_str() })),
            )?;
        }
        site_ids.push(id);
    }
    api(
        "POST",
        "/api/v1/policies",
        Some(json!({ "name": "voice", "order": 10, "class": "realtime",
                     "steering": "best-quality",
                     "match": { "protocol": "udp", "dst_ports": ["5004-5009"] } })),
    )?;
    api(
        "POST",
        "/api/v1/policies",
        Some(json!({ "name": "bulk", "order": 20, "class": "bulk",
                     "steering": "lowest-cost",
                     "match": { "protocol": "udp", "dst_ports": [9000] } })),
    )?;
    let hook = Receiver::start_in(&ns, SocketAddr::new(ctl, 0))?;
    api(
        "POST",
        "/api/v1/webhooks",
        Some(json!({
            "url": hook.url(),
            "events": ["site.online", "site.offline", "path.down", "path.up",
                       "sla.violated", "failover", "config.changed"],
            "description": "the demo's live view",
        })),
    )?;

    say("enrolling each edge with a one-time token (keys are made on the edges)");
    let mut locals = Vec::new();
    for (i, (s, id)) in plan.sites.iter().zip(&site_ids).enumerate() {
        let t = api(
            "POST",
            &format!("/api/v1/sites/{id}/enrollment-tokens"),
            Some(json!({ "expires_in_minutes": 10 })),
        )?;
        let mut local = edges::local_config(
            &plan,
            i,
            &inside,
            edges::edge_dir(lab, s.name.as_str()).join("state"),
        );
        local.ca_fingerprint = vec![fingerprint.clone()];
        edges::controller_edge(
            lab,
            exe,
            s.name.as_str(),
            &local,
            "enroll",
            t["token"].as_str(),
        )?;
        locals.push(local);
    }
    for (s, local) in plan.sites.iter().zip(&locals) {
        edges::controller_edge(lab, exe, s.name.as_str(), local, "run", None)?;
    }
    for (from, to) in [
        ("hq/h1", "branch1/h1"),
        ("hq/h1", "branch2/h1"),
        ("branch1/h1", "branch2/h1"),
    ] {
        edges::wait_for_tunnel(lab, from, lab.addr(to, false)?, Duration::from_secs(30))?;
    }

    let start = Instant::now();
    let log = Arc::new(Mutex::new(Log::new(now_ms())));
    let tallies: Arc<Mutex<Vec<StreamTally>>> =
        Arc::new(Mutex::new(vec![StreamTally::default(); STREAMS.len()]));
    let streams_stop = Arc::new(AtomicBool::new(false));
    for (i, &(name, from, to, port, rate)) in STREAMS.iter().enumerate() {
        let (src, dst_ns, dst) = (lab.ns(from)?, lab.ns(to)?, lab.addr(to, false)?);
        let (log, tallies, streams_stop) = (log.clone(), tallies.clone(), streams_stop.clone());
        std::thread::Builder::new()
            .name(format!("stream-{i}"))
            .spawn(move || {
                let cfg = stream::StreamConfig {
                    rate_pps: rate,
                    duration: Duration::from_secs(5),
                    port,
                    linger: Duration::from_millis(500),
                    ..Default::default()
                };
                while !streams_stop.load(Ordering::SeqCst) {
                    let r = match stream::run(&src, &dst_ns, dst, &cfg) {
                        Ok(r) => r,
                        Err(e) => {
                            let line = format!("stream {name} {from} → {to}: {e}");
                            lock(&log).push(now_ms(), &line, None);
                            std::thread::sleep(Duration::from_secs(1));
                            continue;
                        }
                    };
                    let mut t = tallies.lock().unwrap_or_else(|e| e.into_inner());
                    t[i].sent += r.sent;
                    t[i].lost += r.lost;
                    if r.lost > 0 {
                        t[i].last_outage_ms = r.outage_ms;
                        let line = format!(
                            "stream {name} {from} → {to}: {} of {} lost in the last 5 s \
                             ({:.0} ms of outage)",
                            r.lost, r.sent, r.outage_ms
                        );
                        lock(&log).push(now_ms(), &line, None);
                    }
                }
            })?;
    }

    let tty = std::io::stdout().is_terminal();
    let password_file = state.join("initial-admin-password");
    let schedule = SCHEDULE
        .iter()
        .enumerate()
        .map(|(i, (at, what, link, _))| {
            if i > 0 && SCHEDULE[i - 1].2 == *link {
                format!("{at} {what}")
            } else {
                format!("{at} {what} {link}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let schedule = if a.no_schedule {
        "none (--no-schedule): cut links with patronus lab link".to_owned()
    } else {
        format!("each {} s: {schedule}", CYCLE.as_secs())
    };
    if !tty {
        outln!(
            "Patronus demo (lab {run_id}): a controller and 3 sites, enrolled with tokens\n\
             Dashboard {url}/ui/  (log in as the admin below)\n\
             API  {url}  (OpenAPI docs: {url}/docs)\n\
             \x20    admin {ADMIN}, password {password}\n\
             \x20    (the password is also in {file} while the demo runs)\n\
             \x20    certificate {fingerprint}\n\
             \x20    patronus login --url {url} --ca-fingerprint {fingerprint} --email {ADMIN}\n\
             \x20    (the password on stdin), then\n\
             \x20    patronus path list --site hq | patronus path failovers | patronus webhook list\n\
             Lab  patronus lab link hq/lte cut | patronus lab status | patronus lab exec hq -- ip route\n\
             Schedule {schedule}\n\
             Ctrl-C stops the demo and removes everything.",
            run_id = lab.run_id(),
            file = password_file.display(),
        );
    }
    let _screen = tty.then(Screen::enter);
    let mut seen_hooks = 0;
    let mut ups = Ups::default();
    let mut timings: Vec<Timing> = Vec::new();
    let mut steps: Vec<(i64, String)> = Vec::new();
    let mut last_status = Instant::now() - Duration::from_secs(10);
    let mut last_draw = Instant::now() - Duration::from_secs(10);
    let mut last_table = Instant::now();
    let mut size = (0, 0);
    let mut sites: Vec<demo_view::Site> = Vec::new();
    let mut saved: Option<(&str, patronus_lab::Impairment, patronus_lab::Impairment)> = None;
    let mut cycle = 0u32;
    let mut step = 0usize;
    let mut prev_tx: HashMap<String, (u64, Instant)> = HashMap::new();
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // The schedule.
        let in_cycle = start.elapsed().saturating_sub(CYCLE * cycle);
        if a.no_schedule {
            // Nothing scheduled: the events and the view only.
        } else if let Some(&(at, what, link, args)) = SCHEDULE.get(step) {
            if in_cycle >= Duration::from_secs(at) {
                if what == "degrade" {
                    saved = Some((
                        link,
                        lab.impairment(link, Dir::Up)?,
                        lab.impairment(link, Dir::Down)?,
                    ));
                }
                let at_ms = now_ms();
                if args.is_empty() {
                    if let Some((l, up, down)) = saved.take() {
                        lab.set_link(l, Dir::Up, up)?;
                        lab.set_link(l, Dir::Down, down)?;
                    }
                } else {
                    lab.link_command(link, args)?;
                }
                let detail = if args.len() > 1 {
                    format!(" ({})", args[1..].join(" "))
                } else {
                    String::new()
                };
                lock(&log).push(at_ms, &format!("lab: {what} {link}{detail}"), None);
                steps.push((at_ms, format!("{what} {link}")));
                step += 1;
            }
        } else if in_cycle >= CYCLE {
            cycle += 1;
            step = 0;
            if a.cycles.is_some_and(|n| cycle >= n) {
                break;
            }
        }
        // Events, as the controller's webhook delivers them.
        let got = hook.received();
        let received_ms = now_ms();
        let batch: Vec<Value> = got[seen_hooks..].iter().map(|r| r.json()).collect();
        seen_hooks = got.len();
        {
            let mut l = lock(&log);
            for e in describe(&batch, &mut ups) {
                l.push(e.at_ms, &e.text, Some(received_ms - e.at_ms));
            }
        }
        for e in batch.iter().filter(|e| e["type"] == "failover") {
            timings.push(Timing {
                event: e.clone(),
                controller_ms: e["at_ms"].as_i64().unwrap_or_default(),
                received_ms,
                shown_ms: None,
            });
        }
        // The view.
        let news = !lock(&log).unprinted.is_empty();
        if tty {
            let now_size = terminal::size();
            if last_status.elapsed() >= Duration::from_secs(1) {
                last_status = Instant::now();
                sites = paths(lab, &plan, &mut prev_tx);
            }
            if news || now_size != size || last_draw.elapsed() >= Duration::from_secs(1) {
                last_draw = Instant::now();
                size = now_size;
                let mut header = vec![
                    format!(
                        "Patronus demo (lab {}) · {} · {}",
                        lab.run_id(),
                        clock(start.elapsed()),
                        if a.no_schedule {
                            "no schedule".to_owned()
                        } else {
                            next_step(in_cycle, step)
                        }
                    ),
                    format!("dashboard {url}/ui/ · API {url} (/docs)"),
                    format!("login {ADMIN}"),
                    "Ctrl-C ends it".to_owned(),
                    format!("password {password}"),
                    format!("(also in {})", password_file.display()),
                    schedule.clone(),
                ];
                if size.1 >= 40 {
                    header.push(format!(
                        "try: patronus login --url {url} --ca-fingerprint {fingerprint} --email \
                         {ADMIN}; patronus path failovers; patronus lab link hq/lte cut"
                    ));
                }
                let frame = demo_view::Frame {
                    header,
                    sites: std::mem::take(&mut sites),
                    streams: stream_rows(&tallies),
                    events: lock(&log).lines.iter().cloned().collect(),
                };
                let lines = demo_view::render(&frame, size.0, size.1);
                sites = frame.sites;
                lock(&log).unprinted.clear();
                let mut out = String::from("\x1b[H");
                out.push_str(&lines.join("\x1b[K\r\n"));
                out.push_str("\x1b[K\x1b[J");
                let mut so = std::io::stdout().lock();
                if so
                    .write_all(out.as_bytes())
                    .and_then(|()| so.flush())
                    .is_err()
                {
                    break;
                }
                mark_shown(&mut timings);
            }
        } else {
            let new = std::mem::take(&mut lock(&log).unprinted);
            for line in new {
                outln!("{line}");
            }
            mark_shown(&mut timings);
            if last_table.elapsed() >= Duration::from_secs(20) {
                last_table = Instant::now();
                for l in demo_view::paths_lines(&paths(lab, &plan, &mut prev_tx)) {
                    outln!("{l}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(_screen);
    streams_stop.store(true, Ordering::SeqCst);
    let t = lock(&tallies).clone();
    outln!();
    for l in demo_view::streams_lines(&stream_rows(&tallies)) {
        outln!("{l}");
    }
    // What happened, for scripts (and the demo's test).
    let events: Vec<Value> = hook.received().iter().map(|r| r.json()).collect();
    let failovers: Vec<Value> = timings.iter().map(|t| t.json(&steps)).collect();
    // Each failover's way to the view, from the step of the schedule before it.
    for f in &failovers {
        if let Some(step) = f["after"].as_str() {
            outln!(
                "demo: {}'s failover to {} ({}) after `{step}`: edge +{} ms, controller +{} ms, \
                 webhook delivered +{} ms, view +{} ms",
                f["site"].as_str().unwrap_or("?"),
                f["peer"].as_str().unwrap_or("?"),
                f["reason"].as_str().unwrap_or("?"),
                f["edge_ms"],
                f["controller_ms"],
                f["received_ms"],
                f["shown_ms"]
            );
        }
    }
    let summary = json!({
        "run_id": lab.run_id(),
        "seconds": start.elapsed().as_secs(),
        "webhook_events": events.len(),
        "failovers": failovers,
        "streams": t.iter().zip(STREAMS).map(|(t, (name, from, to, port, rate))| json!({
            "name": name, "from": from, "to": to, "port": port, "rate_pps": rate,
            "sent": t.sent, "lost": t.lost,
        })).collect::<Vec<_>>(),
    });
    outln!("demo: summary {summary}");
    Ok(())
}

/// The terminal's alternate screen, with the cursor hidden, until dropped: the view draws over
/// itself there, and the shell's screen comes back as it was.
#[derive(Debug)]
struct Screen;

impl Screen {
    fn enter() -> Self {
        let mut so = std::io::stdout().lock();
        let _ = so
            .write_all(b"\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J")
            .and_then(|()| so.flush());
        Self
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut so = std::io::stdout().lock();
        let _ = so
            .write_all(b"\x1b[?25h\x1b[?1049l")
            .and_then(|()| so.flush());
    }
}

/// A failover as the view learned of it, to time its way from the edge to the view.
#[derive(Debug)]
struct Timing {
    /// The webhook's event.
    event: Value,
    /// When the controller queued it (the edge's report had just been stored), Unix ms.
    controller_ms: i64,
    /// When the view found its delivery (it looks every 100 ms), Unix ms.
    received_ms: i64,
    /// When the view first drew (or printed) it, Unix ms.
    shown_ms: Option<i64>,
}

impl Timing {
    /// The failover, and if it came after a step of the schedule, each moment in ms after it.
    fn json(&self, steps: &[(i64, String)]) -> Value {
        let d = &self.event["data"];
        let edge_ms = d["at_ms"].as_i64().unwrap_or_default();
        let mut v = json!({
            "site": d["site"], "peer": d["peer"], "reason": d["reason"], "flows": d["flows"],
            "from": d["from"], "to": d["to"], "at_ms": edge_ms,
        });
        if let Some((at, what)) = steps.iter().rev().find(|(at, _)| *at <= edge_ms) {
            v["after"] = what.as_str().into();
            v["edge_ms"] = (edge_ms - at).into();
            v["controller_ms"] = (self.controller_ms - at).into();
            v["received_ms"] = (self.received_ms - at).into();
            v["shown_ms"] = self.shown_ms.map(|s| s - at).into();
        }
        v
    }
}

fn mark_shown(timings: &mut [Timing]) {
    let now = now_ms();
    for t in timings.iter_mut().rev() {
        if t.shown_ms.is_some() {
            break;
        }
        t.shown_ms = Some(now);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `mm:ss`.
fn clock(d: Duration) -> String {
    format!("{:02}:{:02}", d.as_secs() / 60, d.as_secs() % 60)
}

fn next_step(in_cycle: Duration, step: usize) -> String {
    match SCHEDULE.get(step) {
        Some((at, what, link, _)) => format!(
            "next: {what} {link} in {} s",
            at.saturating_sub(in_cycle.as_secs())
        ),
        None => format!(
            "next: a new round in {} s",
            CYCLE.as_secs().saturating_sub(in_cycle.as_secs())
        ),
    }
}

/// The paths the view has seen go down, by (reporting site, its end, the other end): their
/// next `up` is "up again", while a path's first is just "up".
type Ups = HashSet<(String, String, String)>;

/// An event line: when it happened (Unix ms: the edge's moment for what an edge saw, else
/// the controller's) and what.
#[derive(Debug)]
struct Described {
    at_ms: i64,
    text: String,
}

/// Lines for a batch of webhook events. An edge's reports often carry several events of one
/// change: a path that breaks several SLA classes at once is one line naming the classes, and
/// flows moved together from one path to another (reported as they each moved) are one line
/// with their sum.
fn describe(batch: &[Value], ups: &mut Ups) -> Vec<Described> {
    let s = |d: &Value, k: &str| d[k].as_str().unwrap_or("?").to_owned();
    let ms = |d: &Value, k: &str| {
        d[k].as_f64()
            .map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
    };
    // (grouping key, the first event of the group, SLA classes, flows)
    let mut groups: Vec<(String, &Value, Vec<String>, u64)> = Vec::new();
    for e in batch {
        let d = &e["data"];
        let key = match e["type"].as_str() {
            Some("sla.violated") => format!(
                "sla {} {} {} {}",
                s(d, "reported_by"),
                s(d, "from"),
                s(d, "to"),
                d["at_ms"]
            ),
            Some("failover") => format!(
                "failover {} {} {} {} {}",
                s(d, "site"),
                s(d, "peer"),
                s(d, "from"),
                s(d, "to"),
                s(d, "reason")
            ),
            _ => format!("#{}", groups.len()),
        };
        let flows = d["flows"].as_u64().unwrap_or(0);
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => {
                g.2.extend(d["class"].as_str().map(str::to_owned));
                g.3 += flows;
            }
            None => groups.push((
                key,
                e,
                d["class"].as_str().map(str::to_owned).into_iter().collect(),
                flows,
            )),
        }
    }
    let mut out = Vec::new();
    for (_, e, classes, flows) in groups {
        let d = &e["data"];
        let path = || (s(d, "reported_by"), s(d, "from"), s(d, "to"));
        let text = match e["type"].as_str() {
            Some("failover") => format!(
                "{}: failover to {}: {} ⇒ {} ({}, {flows} flow{})",
                s(d, "site"),
                s(d, "peer"),
                s(d, "from"),
                s(d, "to"),
                s(d, "reason"),
                if flows == 1 { "" } else { "s" }
            ),
            Some("path.down") => {
                let (by, from, to) = path();
                let text = format!("{by}: path {from} — {to} down");
                ups.insert((by, from, to));
                text
            }
            Some("path.up") => {
                let (by, from, to) = path();
                let again = if ups.contains(&(by.clone(), from.clone(), to.clone())) {
                    " again"
                } else {
                    ""
                };
                format!(
                    "{by}: path {from} — {to} up{again} (rtt {} ms)",
                    ms(d, "rtt_ms")
                )
            }
            Some("sla.violated") => {
                let (by, from, to) = path();
                let classes = if classes.is_empty() {
                    "an SLA class".to_owned()
                } else {
                    format!("SLA {}", classes.join(", "))
                };
                format!(
                    "{by}: path {from} — {to} breaks {classes} (rtt {} ms, jitter {} ms, loss {} %)",
                    ms(d, "rtt_ms"),
                    ms(d, "jitter_ms"),
                    ms(d, "loss_pct")
                )
            }
            Some("site.online") => {
                format!("{}: online (the controller hears its edge)", s(d, "site"))
            }
            Some("site.offline") => format!("{}: offline", s(d, "site")),
            Some("config.changed") => match (d["method"].as_str(), d["path"].as_str()) {
                (Some(m), Some(p)) => format!("controller: configuration changed ({m} {p})"),
                _ => "controller: configuration changed".to_owned(),
            },
            _ => continue,
        };
        let at_ms = d["at_ms"]
            .as_i64()
            .or_else(|| e["at_ms"].as_i64())
            .unwrap_or_else(now_ms);
        out.push(Described { at_ms, text });
    }
    out
}

/// Each site's paths that carry traffic or are not up, from the edges' own status, most
/// urgent first.
fn paths(
    lab: &Lab,
    plan: &patronus_lab::Plan,
    prev: &mut HashMap<String, (u64, Instant)>,
) -> Vec<demo_view::Site> {
    let mut sites = Vec::new();
    for s in &plan.sites {
        let name = s.name.as_str();
        let st = match edge_status(lab, name) {
            Ok(st) => st,
            Err(e) => {
                sites.push(demo_view::Site {
                    name: name.to_owned(),
                    summary: vec![format!("the edge's status does not answer ({e:#})")],
                    paths: Vec::new(),
                });
                continue;
            }
        };
        let mut rows = Vec::new();
        let up = st.paths.iter().filter(|p| p.state == "up").count();
        for p in &st.paths {
            let key = format!("{name}/{}/{}>{}", p.peer, p.local_link, p.remote_link);
            let now = Instant::now();
            let tx_kbps = prev
                .insert(key, (p.tx_bytes, now))
                .map(|(b, t)| {
                    p.tx_bytes.saturating_sub(b) as f64 * 8.0
                        / 1e3
                        / now.duration_since(t).as_secs_f64().max(1e-3)
                })
                .unwrap_or(0.0);
            if p.state == "up" && tx_kbps == 0.0 {
                continue;
            }
            rows.push(demo_view::PathRow {
                peer: p.peer.clone(),
                path: format!("{}>{}", p.local_link, p.remote_link),
                state: p.state.as_str().to_owned(),
                rtt_ms: p.rtt_ms,
                rtt_p99_ms: p.rtt_p99_ms,
                jitter_ms: p.jitter_ms,
                loss_pct: p.loss_pct,
                flows: p.flows,
                flaps: p.flaps,
                tx_kbps,
            });
        }
        let urgency = |state: &str| match state {
            "down" => 0,
            "degraded" => 1,
            _ => 2,
        };
        rows.sort_by(|a, b| {
            (urgency(&a.state), &a.peer, &a.path).cmp(&(urgency(&b.state), &b.peer, &b.path))
        });
        sites.push(demo_view::Site {
            name: name.to_owned(),
            summary: vec![
                format!("{up}/{} paths up", st.paths.len()),
                plural(st.failovers.values().sum::<u64>(), "failover"),
                format!(
                    "{} (idle ones 120 s)",
                    plural(st.flows as u64, "flow cached")
                ),
            ],
            paths: rows,
        });
    }
    sites
}

/// `1 failover`, `2 failovers`; `2 flows cached`.
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        return format!("1 {what}");
    }
    match what.split_once(' ') {
        Some((noun, rest)) => format!("{n} {noun}s {rest}"),
        None => format!("{n} {what}s"),
    }
}

fn stream_rows(t: &Mutex<Vec<StreamTally>>) -> Vec<demo_view::StreamRow> {
    lock(t)
        .iter()
        .zip(STREAMS)
        .map(|(t, &(name, from, to, port, rate))| demo_view::StreamRow {
            name: name.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            port,
            rate_pps: rate,
            sent: t.sent,
            lost: t.lost,
            last_outage_ms: t.last_outage_ms,
        })
        .collect()
}

/// The edge's `/status`, read inside its namespace.
fn edge_status(lab: &Lab, site: &str) -> anyhow::Result<EdgeStatus> {
    let ns = lab.ns(site)?;
    let r = netns::run_in::<_, anyhow::Error>(&ns, || {
        // The edge's own status on its loopback, not the controller: the controller's pin
        // (set by the demo for its API calls) does not apply to it.
        api_client::get_local_plain(&format!("http://127.0.0.1:{STATUS_PORT}"), "/status")
    })?;
    Ok(serde_json::from_value(r.body)?)
}

/// The fingerprint of the self-signed certificate a controller with its state in `data_dir`
/// made on first start, once it has (`<data_dir>/tls/fingerprint`), waiting up to `timeout`.
pub(crate) fn controller_fingerprint(data_dir: &Path, timeout: Duration) -> anyhow::Result<String> {
    let file = patronus_controller::https::fingerprint_path(data_dir);
    let deadline = Instant::now() + timeout;
    loop {
        // Written whole (beside, then renamed): present means complete.
        if let Ok(t) = std::fs::read_to_string(&file) {
            return Ok(t.trim().to_owned());
        }
        if Instant::now() > deadline {
            bail!(
                "the controller made no TLS certificate in {} s ({} is missing)",
                timeout.as_secs(),
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Forwards connections on `listener` to `to` inside namespace `ns`.
fn forward(listener: &TcpListener, ns: &str, to: SocketAddr) {
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let ns = ns.to_owned();
        let _ = std::thread::Builder::new()
            .name("api-forward".into())
            .spawn(move || {
                let Ok(server) = netns::run_in::<_, anyhow::Error>(&ns, || {
                    Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?)
                }) else {
                    return;
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    return;
                };
                let up = std::thread::spawn(move || pump(client, s2));
                pump(server, c2);
                let _ = up.join();
            });
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing side.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, data: Value) -> Value {
        json!({ "type": kind, "at_ms": 9_000, "data": data })
    }

    fn path(kind: &str, at_ms: i64, class: Option<&str>) -> Value {
        event(
            kind,
            json!({ "reported_by": "hq", "from": "hq/mpls", "to": "branch1/mpls",
                    "at_ms": at_ms, "class": class, "rtt_ms": 20.123, "jitter_ms": 1.0,
                    "loss_pct": 4.56 }),
        )
    }

    fn texts(batch: &[Value], ups: &mut Ups) -> Vec<String> {
        describe(batch, ups).into_iter().map(|d| d.text).collect()
    }

    #[test]
    fn a_paths_first_up_is_just_up_and_only_an_up_after_a_down_is_up_again() {
        let mut ups = Ups::default();
        let up = texts(&[path("path.up", 1, None)], &mut ups);
        assert_eq!(up, ["hq: path hq/mpls — branch1/mpls up (rtt 20.1 ms)"]);
        let down_up = texts(
            &[path("path.down", 2, None), path("path.up", 3, None)],
            &mut ups,
        );
        assert_eq!(
            down_up,
            [
                "hq: path hq/mpls — branch1/mpls down",
                "hq: path hq/mpls — branch1/mpls up again (rtt 20.1 ms)"
            ]
        );
    }

    #[test]
    fn classes_broken_at_once_are_one_line_that_names_them() {
        let batch = [
            path("sla.violated", 5, Some("realtime")),
            path("sla.violated", 5, Some("business")),
            path("sla.violated", 6, Some("realtime")),
        ];
        let lines = describe(&batch, &mut Ups::default());
        let texts: Vec<&str> = lines.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "hq: path hq/mpls — branch1/mpls breaks SLA realtime, business (rtt 20.1 ms, \
                 jitter 1.0 ms, loss 4.6 %)",
                "hq: path hq/mpls — branch1/mpls breaks SLA realtime (rtt 20.1 ms, jitter 1.0 \
                 ms, loss 4.6 %)"
            ]
        );
        assert_eq!(
            (lines[0].at_ms, lines[1].at_ms),
            (5, 6),
            "the edge's moments"
        );
    }

    #[test]
    fn flows_moved_together_are_one_failover_line_with_their_sum() {
        let moved = |to: &str| {
            event(
                "failover",
                json!({ "site": "hq", "peer": "branch1", "from": "mpls>mpls", "to": to,
                        "reason": "path-down", "flows": 1, "at_ms": 7 }),
            )
        };
        let config = event(
            "config.changed",
            json!({ "method": "POST", "path": "/api/v1/policies" }),
        );
        let lines = describe(
            &[
                moved("inet>lte"),
                moved("inet>lte"),
                moved("lte>lte"),
                config,
            ],
            &mut Ups::default(),
        );
        let texts: Vec<&str> = lines.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "hq: failover to branch1: mpls>mpls ⇒ inet>lte (path-down, 2 flows)",
                "hq: failover to branch1: mpls>mpls ⇒ lte>lte (path-down, 1 flow)",
                "controller: configuration changed (POST /api/v1/policies)"
            ]
        );
        assert_eq!(lines[2].at_ms, 9_000, "the controller's moment");
    }
}
