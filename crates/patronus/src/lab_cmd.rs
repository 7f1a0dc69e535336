//! `patronus lab …`: build, inspect, impair and tear down labs from the command line.
//!
//! `lab up` starts `lab run` as a background owner process that holds the lab (and its WAN
//! emulator) until `lab down` or a signal, then removes everything. Other commands find the lab
//! by its state file and talk to the owner over a Unix socket in the lab's run directory.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use nix::sys::signal::Signal;
use patronus_lab::lab::{self, LabState, run_dir};
use patronus_lab::stream::{self, StreamConfig};
use patronus_lab::{EmulatorStatus, Lab, LabOptions, LinkStatus, Topology, iperf, netns};

#[derive(Debug, Subcommand)]
pub enum LabCmd {
    /// The whole system in one command: a controller and three sites enrolled through its API,
    /// traffic, a live view of paths, flows and events, links cut and degraded on a schedule;
    /// the API stays reachable (on --listen) until Ctrl-C removes everything.
    Demo(crate::demo::DemoArgs),
    /// Build a lab and leave it running in the background (until `patronus lab down`).
    Up(UpArgs),
    /// Build a lab and hold it in the foreground; Ctrl-C removes it.
    Run(UpArgs),
    /// Show running labs: nodes, addresses, links, impairments and counters.
    Status {
        #[arg(long)]
        run: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a running lab.
    Down {
        #[arg(long)]
        run: Option<String>,
    },
    /// Run a command in a node's namespace: a site (its edge), `site/h1` (a LAN host), `wan` or
    /// `controller`.
    Exec {
        #[arg(long)]
        run: Option<String>,
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show or change a WAN link: `set delay=40ms jitter=5ms loss=2% [dir=up|down|both]`,
    /// `cut`, `restore` (undo cut), `clear` (no impairment), `show`, or `renumber` (a new IPv4
    /// address, as a new DHCP lease gives: the edge's, or its NAT's public one).
    ///
    /// Keys for set: delay, jitter, dist=normal|uniform, reorder=on|off, loss=N%,
    /// ge=P%:R%[:BAD%[:GOOD%]] (Gilbert-Elliott bursty loss), rate=10mbit|off, queue=50ms,
    /// cut=on|off. Delay and jitter are one-way, per direction.
    Link {
        #[arg(long)]
        run: Option<String>,
        /// `site/link`, e.g. `a/mpls`.
        link: String,
        #[arg(default_value = "show")]
        verb: String,
        settings: Vec<String>,
    },
    /// Remove what crashed labs left behind (namespaces, processes, state); `--all` also stops
    /// running labs.
    Clean {
        #[arg(long)]
        all: bool,
    },
    /// A constant-rate UDP stream between two nodes: loss, loss-derived outage, gaps, one-way
    /// delay and jitter, as JSON.
    Stream {
        #[command(flatten)]
        between: Between,
        /// Packets per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds to send.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// UDP payload bytes.
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Seconds to keep listening after the last packet.
        #[arg(long, default_value_t = 1.0)]
        linger: f64,
        /// Include every gap (run of lost packets) in the output.
        #[arg(long)]
        gaps: bool,
    },
    /// One TCP stream with iperf3 between two nodes, as JSON.
    Iperf {
        #[command(flatten)]
        between: Between,
        #[arg(long, default_value_t = 10)]
        seconds: u32,
    },
}

/// Two nodes of a lab, for the measurement commands.
#[derive(Debug, clap::Args)]
pub struct Between {
    #[arg(long)]
    run: Option<String>,
    /// Sending node (a site, `site/hN`, `controller`).
    #[arg(long)]
    from: String,
    /// Receiving node.
    #[arg(long)]
    to: String,
    /// Use IPv6 addresses.
    #[arg(long)]
    v6: bool,
}

impl Between {
    /// The lab, the sender's and receiver's namespaces, and the receiver's address.
    fn resolve(self) -> anyhow::Result<(String, String, std::net::IpAddr)> {
        let state = find(self.run)?;
        let dst = state.plan.addr(&self.to, self.v6).ok_or_else(|| {
            anyhow!(
                "no node {:?} (nodes: {})",
                self.to,
                state.plan.nodes().join(", ")
            )
        })?;
        Ok((state.ns(&self.from)?, state.ns(&self.to)?, dst))
    }
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// A named topology (two-sites-two-links, three-sites-mixed, hub-and-spokes N) or a TOML or
    /// JSON topology file.
    topology: String,
    /// Parameters of a named topology (the N of hub-and-spokes).
    params: Vec<String>,
    /// Route LAN prefixes through the WAN in the clear (no tunnels; a baseline).
    #[arg(long)]
    plain_routing: bool,
    /// Seed of the emulator's random draws.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, hide = true)]
    run_id: Option<String>,
}

pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    // Every lab command reads root-only state or enters namespaces.
    if let Some(p) = netns::privilege_problem() {
        bail!("patronus lab: {p}");
    }
    match cmd {
        LabCmd::Demo(a) => crate::demo::run(a),
        LabCmd::Up(a) => up(a),
        LabCmd::Run(a) => foreground(a),
        LabCmd::Status { run, json } => status(run, json),
        LabCmd::Down { run } => down(run),
        LabCmd::Exec { run, node, command } => exec(run, &node, &command),
        LabCmd::Link {
            run,
            link,
            verb,
            settings,
        } => {
            let state = find(run)?;
            if verb == "renumber" {
                let reply = request(&state, &serde_json::json!({ "renumber": link }))?;
                outln!(
                    "{link}: {} -> {}",
                    reply["old"].as_str().unwrap_or("?"),
                    reply["new"].as_str().unwrap_or("?")
                );
                return Ok(());
            }
            let mut args = vec![verb];
            args.extend(settings);
            let reply: LinkStatus = serde_json::from_value(request(
                &state,
                &serde_json::json!({ "link": link, "args": args }),
            )?)?;
            print_link(&reply);
            Ok(())
        }
        LabCmd::Clean { all } => {
            let c = lab::clean(all)?;
            outln!("{}", serde_json::to_string_pretty(&c)?);
            Ok(())
        }
        LabCmd::Stream {
            between,
            rate,
            duration,
            size,
            linger,
            gaps,
        } => {
            let (from, to, dst) = between.resolve()?;
            let cfg = StreamConfig {
                rate_pps: rate,
                duration: secs(duration, "--duration")?,
                size,
                port: 0,
                linger: secs(linger, "--linger")?,
            };
            let mut r = stream::run(&from, &to, dst, &cfg)?;
            if !gaps {
                r.gaps.clear();
            }
            outln!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        LabCmd::Iperf { between, seconds } => {
            let (from, to, dst) = between.resolve()?;
            let r = iperf::tcp(&to, &from, dst, None, seconds)?;
            outln!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
    }
}

fn secs(x: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(x).map_err(|_| anyhow!("{flag}: {x} is not a duration in seconds"))
}

fn topology(a: &UpArgs) -> anyhow::Result<Topology> {
    Ok(Topology::from_cli(&a.topology, &a.params)?)
}

/// `lab up`: the owner is this binary's `lab run`, detached, reporting readiness on its stdout.
fn up(a: UpArgs) -> anyhow::Result<()> {
    topology(&a)?.plan()?; // report a bad topology here, not in a log file
    if let Some(p) = netns::privilege_problem() {
        bail!("cannot build a lab: {p}");
    }
    let run_id = lab::new_run_id();
    let dir = run_dir(&run_id);
    lab::create_private_dir(&dir)?;
    let log_path = dir.join("owner.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["lab", "run", &a.topology])
        .args(&a.params)
        .args(["--run-id", &run_id]);
    if a.plain_routing {
        cmd.arg("--plain-routing");
    }
    if let Some(s) = a.seed {
        cmd.args(["--seed", &s.to_string()]);
    }
    // The owner removes the lab by itself if this process dies before reading its ready line.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0) // Ctrl-C in this terminal later must not reach the owner
        .spawn()
        .context("starting the lab owner")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    if line.trim().is_empty() {
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        bail!("the lab did not come up:\n{}", log.trim());
    }
    let state = find(Some(run_id))?;
    outln!("{}", summary(&state).trim_end());
    outln!(
        "\nlab {} is up (owner pid {}). `patronus lab status`, `patronus lab exec <node> -- <cmd>`, \
         `patronus lab link <site/link> set delay=40ms`, `patronus lab down`.",
        state.run_id,
        state.owner_pid
    );
    Ok(())
}

/// `lab run`: build, serve the control socket, wait for a signal, tear down.
fn foreground(a: UpArgs) -> anyhow::Result<()> {
    // Block the shutdown signals in every thread (threads inherit the mask) and take them with
    // sigwait below, so that teardown runs whichever signal arrives, even during setup.
    let signals = crate::block_shutdown_signals()?;
    let topo = topology(&a)?;
    let lab = Arc::new(Lab::up(
        &topo,
        LabOptions {
            plain_routing: a.plain_routing,
            run_id: a.run_id,
            seed: a.seed,
        },
    )?);
    let sock_path = serve_control(&lab)?;
    // The one line `lab up` waits for; nothing else goes to stdout, which `lab up` closes.
    // If `lab up` is gone (interrupted before the lab was ready), nobody will ever take this
    // lab down: remove it now rather than leave it behind.
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "{}", serde_json::json!({ "ready": lab.run_id() }))
        .and_then(|()| stdout.flush())
        .is_err()
    {
        eprintln!(
            "lab {}: nobody is waiting for it (lab up interrupted?): removing it",
            lab.run_id()
        );
        let _ = std::fs::remove_file(&sock_path);
        lab.teardown()?;
        return Ok(());
    }
    eprintln!(
        "{}\nlab {} is up; Ctrl-C (or `patronus lab down`) removes it.",
        summary(lab.state()).trim_end(),
        lab.run_id()
    );
    let sig = signals.wait()?;
    eprintln!("lab {}: {sig:?}, tearing down", lab.run_id());
    let _ = std::fs::remove_file(&sock_path);
    lab.teardown()?;
    Ok(())
}

/// Serves the lab's control socket (`patronus lab link`, `status`) on a thread; its path.
pub(crate) fn serve_control(lab: &Arc<Lab>) -> anyhow::Result<PathBuf> {
    let sock_path = run_dir(lab.run_id()).join("control.sock");
    let listener = UnixListener::bind(&sock_path)
        .with_context(|| format!("binding {}", sock_path.display()))?;
    let served = lab.clone();
    std::thread::Builder::new()
        .name("lab-control".into())
        .spawn(move || serve(&served, listener))?;
    Ok(sock_path)
}

fn serve(lab: &Lab, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let mut line = String::new();
        let mut reader = BufReader::new(&conn);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let reply = match handle(lab, &line) {
            Ok(v) => serde_json::json!({ "ok": v }),
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        };
        let mut w = &conn;
        let _ = writeln!(w, "{reply}");
    }
}

fn handle(lab: &Lab, line: &str) -> anyhow::Result<serde_json::Value> {
    let req: serde_json::Value = serde_json::from_str(line).context("bad request")?;
    if let Some(link) = req.get("link").and_then(|l| l.as_str()) {
        let args: Vec<String> = serde_json::from_value(req["args"].clone()).unwrap_or_default();
        return Ok(serde_json::to_value(lab.link_command(link, &args)?)?);
    }
    if let Some(link) = req.get("renumber").and_then(|l| l.as_str()) {
        let (old, new) = lab.renumber(link)?;
        return Ok(serde_json::json!({ "old": old.to_string(), "new": new.to_string() }));
    }
    if req.get("status").is_some() {
        return Ok(serde_json::to_value(lab.emulator_status()?)?);
    }
    bail!("unknown request {line:?}")
}

fn request(state: &LabState, req: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let path = run_dir(&state.run_id).join("control.sock");
    let mut conn = UnixStream::connect(&path).with_context(|| {
        format!(
            "lab {} has no running owner (pid {}); `patronus lab clean` removes its remains",
            state.run_id, state.owner_pid
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(conn, "{req}")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let mut reply: serde_json::Value =
        serde_json::from_str(&line).context("the lab owner gave no answer")?;
    if let Some(e) = reply.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    Ok(reply["ok"].take())
}

/// The lab named by `--run`, or the only one running.
fn find(run: Option<String>) -> anyhow::Result<LabState> {
    let runs = lab::runs();
    let pick = match run {
        Some(r) => r,
        None => {
            let ready: Vec<&String> = runs
                .iter()
                .filter(|(_, s)| matches!(s, Ok(s) if s.ready && netns::alive(s.owner_pid)))
                .map(|(r, _)| r)
                .collect();
            match ready.as_slice() {
                [] => bail!("no lab is running (`patronus lab up two-sites-two-links` starts one)"),
                [one] => (*one).clone(),
                many => bail!(
                    "several labs are running ({}); choose one with --run",
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    match runs.get(&pick) {
        Some(Ok(s)) => Ok(s.clone()),
        Some(Err(e)) => bail!("lab {pick}: {e}"),
        None => bail!("no lab {pick:?}"),
    }
}

fn summary(s: &LabState) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "lab {} ({}), owner pid {}, plain routing {}",
        s.run_id,
        s.topology.name,
        s.owner_pid,
        if s.plain_routing { "on" } else { "off" }
    );
    for site in &s.plan.sites {
        let _ = writeln!(o, "site {}: LAN {} {}", site.name, site.lan4, site.lan6);
        for h in &site.hosts {
            let _ = writeln!(
                o,
                "  host {}/{}: {} {}",
                site.name, h.name, h.addr4, h.addr6
            );
        }
        for l in &site.links {
            let _ = writeln!(
                o,
                "  link {}/{} ({}{}): {} {} via {} {}",
                site.name,
                l.name,
                l.kind.as_str(),
                if l.emulated { "" } else { ", bare veth" },
                l.addr4,
                l.addr6,
                l.gw4,
                l.gw6
            );
            if let Some(n) = &l.nat {
                let _ = writeln!(
                    o,
                    "    behind a {} NAT ({}/nat): the edge at {}, mappings live {} s{}",
                    n.kind.as_str(),
                    format_args!("{}/{}", site.name, l.name),
                    n.inside4,
                    n.timeout_s,
                    if n.kind == patronus_lab::topology::NatKind::Symmetric {
                        String::new()
                    } else {
                        format!(
                            ", its port {} is {}:{}",
                            patronus_lab::edges::EDGE_PORT,
                            l.addr4,
                            n.public_port
                        )
                    }
                );
            }
        }
    }
    if let Some(l) = &s.plan.controller {
        let _ = writeln!(o, "controller: {} {}", l.addr4, l.addr6);
    }
    o
}

fn print_link(l: &LinkStatus) {
    let d = |s: &patronus_lab::impair::DirStats| {
        format!(
            "{} pkts, {} forwarded, dropped {} cut / {} random / {} burst / {} queue",
            s.packets,
            s.forwarded,
            s.dropped_cut,
            s.dropped_random,
            s.dropped_burst,
            s.dropped_queue
        )
    };
    if !l.emulated {
        outln!("{}: bare veth (not emulated)", l.name);
        return;
    }
    outln!("{}", l.name);
    outln!("  up:   {}\n        {}", l.up, d(&l.up_stats));
    outln!("  down: {}\n        {}", l.down, d(&l.down_stats));
}

fn status(run: Option<String>, json: bool) -> anyhow::Result<()> {
    let runs: Vec<LabState> = match run {
        Some(r) => vec![find(Some(r))?],
        None => lab::runs().into_values().flatten().collect(),
    };
    let mut all = Vec::new();
    for s in &runs {
        let emu: Option<EmulatorStatus> = request(s, &serde_json::json!({ "status": true }))
            .ok()
            .and_then(|v| serde_json::from_value(v).ok());
        if json {
            all.push(serde_json::json!({ "lab": s, "emulator": emu }));
            continue;
        }
        outln!("{}", summary(s).trim_end());
        match &emu {
            Some(e) => {
                for l in &e.links {
                    print_link(l);
                }
                outln!(
                    "emulator: {} queued, {} unroutable, {} overflow, {} write errors",
                    e.queued,
                    e.unroutable,
                    e.overflow,
                    e.tx_errors
                );
            }
            None => outln!("(owner not answering: `patronus lab clean` removes a dead lab)"),
        }
        outln!();
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&all)?);
    } else if runs.is_empty() {
        outln!("no labs");
    }
    Ok(())
}

fn down(run: Option<String>) -> anyhow::Result<()> {
    let s = find(run)?;
    if netns::alive(s.owner_pid) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.owner_pid), Signal::SIGTERM)?;
        // Wait for the owner's own teardown; it finishes in well under a second per site.
        netns::wait_exit(&[s.owner_pid], Duration::from_secs(60));
        if netns::alive(s.owner_pid) {
            bail!(
                "lab {}: its owner (pid {}) is still tearing down after 60 s; see {}",
                s.run_id,
                s.owner_pid,
                run_dir(&s.run_id).join("owner.log").display()
            );
        }
    }
    // Whatever the owner could not remove (or if it was already dead).
    let c = lab::clean(false)?;
    let dir: PathBuf = run_dir(&s.run_id);
    if dir.exists() || c.runs.contains(&s.run_id) && !c.namespaces.is_empty() {
        eprintln!("lab {}: removed leftovers {:?}", s.run_id, c.namespaces);
    }
    outln!("lab {} is down", s.run_id);
    Ok(())
}

fn exec(run: Option<String>, node: &str, command: &[String]) -> anyhow::Result<()> {
    let s = find(run)?;
    let ns = s.ns(node)?;
    let err = Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(command)
        .exec();
    Err(anyhow!("running ip netns exec: {err}"))
}
