//! A running lab: namespaces, veth pairs, addresses, routes, the WAN emulator, and the processes
//! started in it, all removed by [`Lab::down`] or when the [`Lab`] is dropped (also during a panic).
//!
//! # Names
//!
//! Every lab has a run id (`[a-z0-9]{6}`); its namespaces are `patronus-<run>-<node>` and its
//! state lives in `/run/patronus-lab/<run>/` (`state.json`, the control socket, logs). Interface
//! names only need to be unique inside their namespace, so no interface is ever created in the
//! root namespace: two labs never collide. A lab whose owner process died (SIGKILL, power cut) is
//! removed by [`clean`], which [`Lab::up`] also runs first; it only touches namespaces with the
//! `patronus-` prefix whose run has no live owner.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::emulator::{Dir, EmuLink, Emulator, EmulatorStatus};
use crate::impair::Impairment;
use crate::netns::{self, NetnsError, ip_batch};
use crate::topology::{Plan, Topology, TopologyError};

/// Parent of every lab's state directory.
pub const RUN_ROOT: &str = "/run/patronus-lab";
/// Prefix of every namespace a lab creates.
pub const NS_PREFIX: &str = "patronus-";

/// Routing table in the wan namespace holding the real routes to each link (used for packets the
/// emulator wrote back).
const DELIVER_TABLE: u32 = 200;
/// `UPLINK_TABLE_BASE + k` sends packets arriving from link `k` to its TUN.
const UPLINK_TABLE_BASE: u32 = 1000;
/// `EDGE_TABLE_BASE + j` in an edge namespace: the default route of its `j`th link.
const EDGE_TABLE_BASE: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Emulator(#[from] crate::emulator::EmulatorError),
    #[error(transparent)]
    Impair(#[from] crate::impair::ImpairError),
    #[error("cannot build a lab: {0}")]
    Privilege(String),
    #[error("no node {0:?} in this lab (nodes: {1})")]
    NoNode(String, String),
    #[error("no link {0:?} in this lab (links: {1})")]
    NoLink(String, String),
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{0}")]
    Other(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |error| LabError::Io { what, error }
}

/// How to build a lab.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Route every site's LAN prefixes through the WAN over the site's first link, with no
    /// tunnel: LAN hosts reach each other in the clear (a baseline; the Internet routes no
    /// private prefixes, so this is off by default and the edges' tunnels do it instead).
    pub plain_routing: bool,
    /// Use this run id instead of a fresh one (the `lab up` parent picks it for its child).
    pub run_id: Option<String>,
    /// Seed for the emulator's random draws; a fixed seed gives the same loss pattern.
    pub seed: Option<u64>,
}

/// What `state.json` holds: enough for another process to find and address the lab.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LabState {
    pub run_id: String,
    pub owner_pid: i32,
    pub topology: Topology,
    pub plan: Plan,
    pub plain_routing: bool,
    pub ready: bool,
}

impl LabState {
    pub fn ns(&self, node: &str) -> Result<String, LabError> {
        ns_for(&self.run_id, &self.plan, node)
    }
}

fn ns_name(run: &str, node: &str) -> String {
    format!("{NS_PREFIX}{run}-{}", node.replace('/', "."))
}

fn ns_for(run: &str, plan: &Plan, node: &str) -> Result<String, LabError> {
    let nodes = plan.nodes();
    if nodes.iter().any(|n| n == node) {
        Ok(ns_name(run, node))
    } else {
        Err(LabError::NoNode(node.into(), nodes.join(", ")))
    }
}

pub fn run_dir(run: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(run)
}

/// Creates a lab's run directory, readable by root only: its control socket changes the network.
pub fn create_private_dir(dir: &Path) -> Result<(), LabError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("restricting {}", dir.display())))
}

/// Length of a run id.
pub const RUN_ID_LEN: usize = 6;

/// True for what [`new_run_id`] makes: six lowercase letters or digits. Only namespaces and
/// directories named with a valid id are ever touched by [`clean`].
pub fn valid_run_id(run: &str) -> bool {
    run.len() == RUN_ID_LEN
        && run
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A fresh run id: 6 characters of base 36 from the clock and the PID.
pub fn new_run_id() -> String {
    let mut x = crate::emulator::now_ns() ^ ((std::process::id() as u64) << 32);
    x = crate::stats::SplitMix64(x).next_u64();
    (0..6)
        .map(|_| {
            let d = (x % 36) as u32;
            x /= 36;
            char::from_digit(d, 36).unwrap_or('0')
        })
        .collect()
}

/// A lab that exists until it is dropped.
#[derive(Debug)]
pub struct Lab {
    state: LabState,
    /// Links given a new IPv4 address since the start ([`Lab::renumber`]), by index.
    renumbered: Mutex<std::collections::HashMap<usize, std::net::Ipv4Addr>>,
    emulator: Mutex<Option<Emulator>>,
    children: Mutex<Vec<Child>>,
    torn_down: AtomicBool,
}

impl Lab {
    /// Builds the lab described by `topology`. On any error, everything built so far is removed.
    pub fn up(topology: &Topology, opts: LabOptions) -> Result<Lab, LabError> {
        if let Some(p) = netns::privilege_problem() {
            return Err(LabError::Privilege(p));
        }
        let plan = topology.plan()?;
        // Plain routing sends a site's LAN through its first link's address: behind a NAT that
        // is the NAT's, which has no way to the LAN.
        if opts.plain_routing {
            if let Some(s) = plan.sites.iter().find(|s| s.links[0].nat.is_some()) {
                return Err(LabError::Other(format!(
                    "--plain-routing: site {}'s first link is behind a NAT, which does not route \
                     its LAN; put a link without NAT first",
                    s.name
                )));
            }
        }
        // Remains of crashed labs go first; what cannot be removed is reported, not fatal.
        for e in clean(false)?.errors {
            eprintln!("lab: cleaning up an old lab: {e}");
        }
        let run_id = opts.run_id.clone().unwrap_or_else(new_run_id);
        if !valid_run_id(&run_id) {
            return Err(LabError::Other(format!(
                "run id {run_id:?} must be {RUN_ID_LEN} lowercase letters or digits"
            )));
        }
        let dir = run_dir(&run_id);
        create_private_dir(&dir)?;
        let mut lab = Lab {
            state: LabState {
                run_id,
                owner_pid: std::process::id() as i32,
                topology: topology.clone(),
                plan,
                plain_routing: opts.plain_routing,
                ready: false,
            },
            renumbered: Mutex::new(std::collections::HashMap::new()),
            emulator: Mutex::new(None),
            children: Mutex::new(Vec::new()),
            torn_down: AtomicBool::new(false),
        };
        // Written before anything exists, so that a crash during setup leaves a trace `clean` finds.
        lab.write_state()?;
        lab.build(opts.seed.unwrap_or_else(crate::emulator::now_ns))?;
        lab.state.ready = true;
        lab.write_state()?;
        Ok(lab)
    }

    fn write_state(&self) -> Result<(), LabError> {
        let path = run_dir(&self.state.run_id).join("state.json");
        let tmp = path.with_extension("json.tmp");
        // The plan as it is now: with the renumbered links' addresses.
        let mut state = self.state.clone();
        {
            let renumbered = self.renumbered.lock().unwrap_or_else(|e| e.into_inner());
            let links = state
                .plan
                .sites
                .iter_mut()
                .flat_map(|s| s.links.iter_mut())
                .chain(state.plan.controller.iter_mut());
            for l in links {
                if let Some(a) = renumbered.get(&l.index) {
                    l.addr4 = *a;
                }
            }
        }
        let text = serde_json::to_string_pretty(&state)
            .map_err(|e| LabError::Other(format!("serialising lab state: {e}")))?;
        // Written whole and renamed, so a reader never sees half a state.
        std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io(format!("writing {}", path.display())))
    }

    fn build(&mut self, seed: u64) -> Result<(), LabError> {
        let run = self.state.run_id.clone();
        let plan = self.state.plan.clone();
        let plain = self.state.plain_routing;
        let ns = |node: &str| ns_name(&run, node);
        let wan = ns("wan");

        let mut nodes = plan.nodes();
        nodes.sort();
        ip_batch(
            &[],
            &nodes
                .iter()
                .map(|n| format!("netns add {}", ns(n)))
                .collect::<Vec<_>>(),
        )?;

        // No DAD: addresses are usable at once, and a lab has no duplicates to detect.
        let base: &[(&str, &str)] = &[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
        ];
        let router: Vec<(&str, &str)> = base
            .iter()
            .copied()
            .chain([
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
            ])
            .collect();
        for n in &nodes {
            let is_router = n == "wan" || plan.site(n).is_some() || n.ends_with("/nat");
            netns::sysctls(&ns(n), if is_router { &router } else { base })?;
        }

        // veth pairs, created directly in their namespaces.
        let mut veths = Vec::new();
        for (owner, l) in plan.links() {
            match l.nat_node(owner) {
                // The edge's link into its NAT, and the NAT's `out` into the WAN.
                Some(nat) => {
                    veths.push(format!(
                        "link add name {} mtu {} netns {} type veth peer name in mtu {} netns {}",
                        l.name,
                        l.mtu,
                        ns(owner),
                        l.mtu,
                        ns(&nat)
                    ));
                    veths.push(format!(
                        "link add name out mtu {} netns {} type veth peer name l{} mtu {} netns {wan}",
                        l.mtu,
                        ns(&nat),
                        l.index,
                        l.mtu
                    ));
                }
                None => veths.push(format!(
                    "link add name {} mtu {} netns {} type veth peer name l{} mtu {} netns {wan}",
                    l.name,
                    l.mtu,
                    ns(owner),
                    l.index,
                    l.mtu
                )),
            }
        }
        for s in &plan.sites {
            for (j, h) in s.hosts.iter().enumerate() {
                veths.push(format!(
                    "link add name eth0 netns {} type veth peer name h{} netns {}",
                    ns(&format!("{}/{}", s.name, h.name)),
                    j + 1,
                    ns(s.name.as_str())
                ));
            }
        }
        ip_batch(&[], &veths)?;

        // The emulator creates its TUN devices before anything routes to them.
        let emu_links = plan
            .links()
            .map(|(owner, l)| {
                let mut prefixes = vec![l.prefix4, l.prefix6];
                if plain {
                    if let Some(s) = plan.site(owner).filter(|s| s.links[0].index == l.index) {
                        prefixes.extend([s.lan4, s.lan6]);
                    }
                }
                EmuLink {
                    name: format!("{owner}/{}", l.name),
                    index: l.index,
                    emulated: l.emulated,
                    prefixes,
                    impairment: l.impairment.clone(),
                    mtu: l.mtu,
                }
            })
            .collect::<Vec<_>>();
        *self.emulator_slot() = Some(Emulator::start(&wan, emu_links, seed)?);

        // The wan namespace: gateways, TUNs, and the policy routing described in emulator.rs.
        let (mut v4, mut v6) = (vec!["link set lo up".to_string()], Vec::new());
        for (owner, l) in plan.links() {
            let k = l.index;
            v4.push(format!("addr add {}/24 dev l{k} noprefixroute", l.gw4));
            v4.push(format!(
                "addr add {}/64 dev l{k} nodad noprefixroute",
                l.gw6
            ));
            v4.push(format!("link set l{k} up"));
            let lans: Vec<String> = plan
                .site(owner)
                .filter(|s| plain && s.links[0].index == k)
                .map(|s| {
                    vec![
                        format!("{} via {}", s.lan4, l.addr4),
                        format!("{} via {}", s.lan6, l.addr6),
                    ]
                })
                .unwrap_or_default();
            for (prefix, fam) in [
                (l.prefix4.to_string(), &mut v4),
                (l.prefix6.to_string(), &mut v6),
            ] {
                fam.push(format!("route add {prefix} dev l{k} table {DELIVER_TABLE}"));
            }
            for lan in &lans {
                let fam = if lan.contains(':') { &mut v6 } else { &mut v4 };
                fam.push(format!("route add {lan} dev l{k} table {DELIVER_TABLE}"));
            }
            if l.emulated {
                v4.push(format!("link set t{k} up"));
                let t = UPLINK_TABLE_BASE + k as u32;
                for fam in [&mut v4, &mut v6] {
                    fam.push(format!("rule add iif t{k} lookup {DELIVER_TABLE} pref 100"));
                    fam.push(format!("rule add iif l{k} lookup {t} pref 200"));
                }
                v4.push(format!("route add default dev t{k} table {t}"));
                v6.push(format!("route add default dev t{k} table {t}"));
                v4.push(format!("route add {} dev t{k}", l.prefix4));
                v6.push(format!("route add {} dev t{k}", l.prefix6));
                for lan in &lans {
                    let prefix = lan.split(' ').next().unwrap_or_default();
                    let fam = if lan.contains(':') { &mut v6 } else { &mut v4 };
                    fam.push(format!("route add {prefix} dev t{k}"));
                }
            } else {
                v4.push(format!("route add {} dev l{k}", l.prefix4));
                v6.push(format!("route add {} dev l{k}", l.prefix6));
                for lan in &lans {
                    let fam = if lan.contains(':') { &mut v6 } else { &mut v4 };
                    fam.push(format!("route add {lan} dev l{k}"));
                }
            }
        }
        ip_batch(&["-n", &wan], &v4)?;
        ip_batch(&["-6", "-n", &wan], &v6)?;

        // NATs: the public address outside, the edge's gateway inside, and the rules.
        for (owner, l) in plan.links() {
            let (Some(node), Some(n)) = (l.nat_node(owner), l.nat.as_ref()) else {
                continue;
            };
            let nns = ns(&node);
            ip_batch(
                &["-n", &nns],
                &[
                    "link set lo up".into(),
                    format!("addr add {}/24 dev in", n.gw_inside4),
                    "link set in up".into(),
                    format!("addr add {}/24 dev out", l.addr4),
                    "link set out up".into(),
                    format!("route add default via {}", l.gw4),
                ],
            )?;
            crate::nat::load(&nns, &crate::nat::ruleset(n))?;
            let timeouts = crate::nat::timeouts(n.timeout_s);
            netns::sysctls(
                &nns,
                &timeouts
                    .iter()
                    .map(|(k, v)| (*k, v.as_str()))
                    .collect::<Vec<_>>(),
            )?;
        }

        // Edges: LAN bridge, WAN links with a default route each (metric by order, and a table
        // per link for traffic sourced from its address).
        for s in &plan.sites {
            let (mut v4, mut v6) = (
                vec![
                    "link set lo up".to_string(),
                    "link add lan type bridge".to_string(),
                    format!("addr add {}/{} dev lan", s.edge_lan4, s.lan4.prefix_len()),
                    format!(
                        "addr add {}/{} dev lan nodad",
                        s.edge_lan6,
                        s.lan6.prefix_len()
                    ),
                    "link set lan up".to_string(),
                ],
                Vec::new(),
            );
            for j in 1..=s.hosts.len() {
                v4.push(format!("link set h{j} master lan"));
                v4.push(format!("link set h{j} up"));
            }
            for (j, l) in s.links.iter().enumerate() {
                let t = EDGE_TABLE_BASE + j as u32;
                let metric = 100 + j;
                // Behind a NAT: its private address and gateway, and no IPv6.
                let (addr4, gw4) = match &l.nat {
                    Some(n) => (n.inside4, n.gw_inside4),
                    None => (l.addr4, l.gw4),
                };
                v4.push(format!("addr add {addr4}/24 dev {}", l.name));
                v4.push(format!("link set {} up", l.name));
                v4.push(format!(
                    "route add default via {gw4} dev {} metric {metric}",
                    l.name
                ));
                v4.push(format!(
                    "route add default via {gw4} dev {} table {t}",
                    l.name
                ));
                v4.push(format!("rule add from {addr4} lookup {t} pref 100"));
                if l.nat.is_some() {
                    continue;
                }
                v4.push(format!("addr add {}/64 dev {} nodad", l.addr6, l.name));
                v6.push(format!(
                    "route add default via {} dev {} metric {metric}",
                    l.gw6, l.name
                ));
                v6.push(format!(
                    "route add default via {} dev {} table {t}",
                    l.gw6, l.name
                ));
                v6.push(format!("rule add from {} lookup {t} pref 100", l.addr6));
            }
            ip_batch(&["-n", &ns(s.name.as_str())], &v4)?;
            ip_batch(&["-6", "-n", &ns(s.name.as_str())], &v6)?;
            for h in &s.hosts {
                let hns = ns(&format!("{}/{}", s.name, h.name));
                ip_batch(
                    &["-n", &hns],
                    &[
                        "link set lo up".into(),
                        format!("addr add {}/{} dev eth0", h.addr4, s.lan4.prefix_len()),
                        format!(
                            "addr add {}/{} dev eth0 nodad",
                            h.addr6,
                            s.lan6.prefix_len()
                        ),
                        "link set eth0 up".into(),
                        format!("route add default via {}", s.edge_lan4),
                    ],
                )?;
                ip_batch(
                    &["-6", "-n", &hns],
                    &[format!("route add default via {}", s.edge_lan6)],
                )?;
            }
        }
        if let Some(l) = &plan.controller {
            ip_batch(
                &["-n", &ns("controller")],
                &[
                    "link set lo up".into(),
                    format!("addr add {}/24 dev {}", l.addr4, l.name),
                    format!("addr add {}/64 dev {} nodad", l.addr6, l.name),
                    format!("link set {} up", l.name),
                    format!("route add default via {}", l.gw4),
                ],
            )?;
            ip_batch(
                &["-6", "-n", &ns("controller")],
                &[format!("route add default via {}", l.gw6)],
            )?;
        }
        Ok(())
    }

    pub fn run_id(&self) -> &str {
        &self.state.run_id
    }

    pub fn state(&self) -> &LabState {
        &self.state
    }

    pub fn plan(&self) -> &Plan {
        &self.state.plan
    }

    /// The namespace of `node` (`wan`, a site, `site/hN`, `controller`).
    pub fn ns(&self, node: &str) -> Result<String, LabError> {
        self.state.ns(node)
    }

    /// Every namespace of this lab.
    pub fn namespaces(&self) -> Vec<String> {
        self.state
            .plan
            .nodes()
            .iter()
            .map(|n| ns_name(&self.state.run_id, n))
            .collect()
    }

    /// The IPv4 or IPv6 address of `node` as the rest of the lab reaches it.
    pub fn addr(&self, node: &str, v6: bool) -> Result<IpAddr, LabError> {
        self.state
            .plan
            .addr(node, v6)
            .ok_or_else(|| LabError::NoNode(node.into(), self.state.plan.nodes().join(", ")))
    }

    /// A command that runs `program` inside `node`'s namespace.
    pub fn command(&self, node: &str, program: &str) -> Result<Command, LabError> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(node)?, program]);
        Ok(c)
    }

    /// Runs a command in `node` to completion and returns its output.
    pub fn exec<S: AsRef<str>>(
        &self,
        node: &str,
        argv: &[S],
    ) -> Result<std::process::Output, LabError> {
        let (first, rest) = argv
            .split_first()
            .ok_or_else(|| LabError::Other("exec: empty command".into()))?;
        let mut c = self.command(node, first.as_ref())?;
        c.args(rest.iter().map(|s| s.as_ref())).stdin(Stdio::null());
        let out = c
            .output()
            .map_err(io(format!("running {} in {node}", first.as_ref())))?;
        // `ip netns exec` reports a program it could not start as a failed run of it: say
        // what is missing, rather than let a caller take it for the command's own failure.
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && stderr.starts_with("exec of \"") {
            return Err(LabError::Other(format!(
                "`{}` could not be started in {node} ({}): install it (.ci/deps installs \
                 what the lab uses)",
                first.as_ref(),
                stderr.trim()
            )));
        }
        Ok(out)
    }

    /// Starts a process in `node` that the lab kills when it is torn down.
    pub fn spawn(&self, node: &str, cmd: Command) -> Result<u32, LabError> {
        self.spawn_with(node, cmd, None)
    }

    /// Like [`Lab::spawn`], with the process's stdout and stderr going to `log`.
    pub fn spawn_logged(
        &self,
        node: &str,
        cmd: Command,
        log: std::fs::File,
    ) -> Result<u32, LabError> {
        self.spawn_with(node, cmd, Some(log))
    }

    fn spawn_with(
        &self,
        node: &str,
        cmd: Command,
        log: Option<std::fs::File>,
    ) -> Result<u32, LabError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_os_string()).collect();
        let mut c = self.command(node, &program)?;
        c.args(args);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        if let Some(log) = log {
            let err = log.try_clone().map_err(io("duplicating a log file"))?;
            c.stdout(log).stderr(err);
        }
        let child = c
            .stdin(Stdio::null())
            .spawn()
            .map_err(io(format!("starting {program} in {node}")))?;
        let pid = child.id();
        self.children
            .lock()
            .map_err(|_| LabError::Other("lab child list poisoned".into()))?
            .push(child);
        Ok(pid)
    }

    /// Stops a process started with [`Lab::spawn`]: SIGTERM, then SIGKILL after 2 s.
    pub fn stop(&self, pid: u32) -> Result<(), LabError> {
        let mut children = self
            .children
            .lock()
            .map_err(|_| LabError::Other("lab child list poisoned".into()))?;
        let Some(i) = children.iter().position(|c| c.id() == pid) else {
            return Err(LabError::Other(format!(
                "no process {pid} was started by this lab"
            )));
        };
        let c = children.swap_remove(i);
        terminate(&mut [c]);
        Ok(())
    }

    fn emulator_slot(&self) -> MutexGuard<'_, Option<Emulator>> {
        self.emulator.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the emulator, if the lab still has one.
    fn with_emulator<T>(
        &self,
        f: impl FnOnce(&Emulator) -> Result<T, crate::emulator::EmulatorError>,
    ) -> Result<T, LabError> {
        match self.emulator_slot().as_ref() {
            Some(e) => Ok(f(e)?),
            None => Err(LabError::Other("the lab has been torn down".into())),
        }
    }

    fn link_index(&self, site_link: &str) -> Result<usize, LabError> {
        self.state
            .plan
            .link(site_link)
            .map(|(_, l)| l.index)
            .ok_or_else(|| {
                let all: Vec<String> = self
                    .state
                    .plan
                    .links()
                    .map(|(o, l)| format!("{o}/{}", l.name))
                    .collect();
                LabError::NoLink(site_link.into(), all.join(", "))
            })
    }

    /// The IPv4 address of `site/link` now: the plan's, or the one [`Lab::renumber`] gave it
    /// (on a link behind a NAT, the NAT's public address).
    pub fn link_addr4(&self, site_link: &str) -> Result<std::net::Ipv4Addr, LabError> {
        let k = self.link_index(site_link)?;
        let renumbered = self.renumbered.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match renumbered.get(&k) {
            Some(a) => *a,
            None => self
                .state
                .plan
                .links()
                .find(|(_, l)| l.index == k)
                .map(|(_, l)| l.addr4)
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        })
    }

    /// Gives `site/link` a new IPv4 address in its /24, as a new DHCP lease or a modem restart
    /// would, while everything runs: the edge's own address on a link without NAT (what is
    /// bound to the old one stops working), the NAT's public address on a link with one (every
    /// mapping it held is gone with it). Returns the old address and the new one. The plan
    /// ([`Lab::plan`]) keeps the addresses the lab started with; [`Lab::link_addr4`] and
    /// `patronus lab status` show the new one.
    pub fn renumber(
        &self,
        site_link: &str,
    ) -> Result<(std::net::Ipv4Addr, std::net::Ipv4Addr), LabError> {
        let (owner, l) = self
            .state
            .plan
            .link(site_link)
            .ok_or_else(|| LabError::NoLink(site_link.into(), String::new()))?;
        let old = self.link_addr4(site_link)?;
        let new = crate::nat::next_address(old);
        let (node, lines) = match l.nat_node(owner) {
            Some(nat) => (
                nat,
                crate::nat::move_address_lines("out", old, new, l.gw4, None, None),
            ),
            None => {
                let j = self
                    .state
                    .plan
                    .site(owner)
                    .and_then(|s| s.links.iter().position(|x| x.index == l.index));
                let dev = l.name.to_string();
                let lines = match j {
                    Some(j) => crate::nat::move_address_lines(
                        &dev,
                        old,
                        new,
                        l.gw4,
                        Some(100 + j),
                        Some(EDGE_TABLE_BASE + j as u32),
                    ),
                    // The controller's uplink: one default route.
                    None => crate::nat::move_address_lines(&dev, old, new, l.gw4, None, None),
                };
                (owner.to_owned(), lines)
            }
        };
        ip_batch(&["-n", &self.ns(&node)?], &lines)?;
        self.renumbered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(l.index, new);
        self.write_state()?;
        Ok((old, new))
    }

    /// The current impairment of one direction of `site/link`.
    pub fn impairment(&self, site_link: &str, dir: Dir) -> Result<Impairment, LabError> {
        let status = self.link_status(site_link)?;
        Ok(match dir {
            Dir::Down => status.down,
            _ => status.up,
        })
    }

    /// Sets the impairment of `site/link` in direction `dir`.
    pub fn set_link(&self, site_link: &str, dir: Dir, imp: Impairment) -> Result<(), LabError> {
        let k = self.link_index(site_link)?;
        self.with_emulator(|e| e.set(k, dir, imp))
    }

    /// Applies a link command as the CLI spells it: `set key=value...` (with optional `dir=`),
    /// `cut`, `restore` (undo `cut`), or `clear` (remove every impairment). Returns the link's
    /// status after the change.
    pub fn link_command<S: AsRef<str>>(
        &self,
        site_link: &str,
        args: &[S],
    ) -> Result<crate::emulator::LinkStatus, LabError> {
        let k = self.link_index(site_link)?;
        let (verb, rest) = args
            .split_first()
            .map(|(v, r)| (v.as_ref(), r))
            .unwrap_or(("show", &[]));
        let mut dir = Dir::Both;
        let mut settings = Vec::new();
        for a in rest {
            match a.as_ref().strip_prefix("dir=") {
                Some(d) => dir = d.parse().map_err(LabError::Other)?,
                None => settings.push(a.as_ref().to_string()),
            }
        }
        let status = self.link_status(site_link)?;
        let dirs: Vec<(Dir, Impairment)> = match dir {
            Dir::Up => vec![(Dir::Up, status.up)],
            Dir::Down => vec![(Dir::Down, status.down)],
            Dir::Both => vec![(Dir::Up, status.up), (Dir::Down, status.down)],
        };
        for (d, mut imp) in dirs {
            match verb {
                "show" => {}
                "set" => imp.apply(&settings)?,
                "cut" => imp.cut = true,
                "restore" => imp.cut = false,
                "clear" => imp = Impairment::default(),
                _ => {
                    return Err(LabError::Other(format!(
                        "link command {verb:?}: expected set, cut, restore, clear or show"
                    )));
                }
            }
            if verb != "show" {
                self.with_emulator(|e| e.set(k, d, imp))?;
            }
        }
        self.link_status(site_link)
    }

    pub fn link_status(&self, site_link: &str) -> Result<crate::emulator::LinkStatus, LabError> {
        self.link_index(site_link)?;
        self.with_emulator(|e| e.status())?
            .links
            .into_iter()
            .find(|l| l.name == site_link)
            .ok_or_else(|| LabError::NoLink(site_link.into(), String::new()))
    }

    /// Starts copying the next `count` packets that enter the WAN from `site/link`.
    pub fn capture(&self, site_link: &str, count: usize) -> Result<(), LabError> {
        let k = self.link_index(site_link)?;
        self.with_emulator(|e| e.capture(k, count))
    }

    /// The packets captured on `site/link` so far (whole IP packets); ends the capture.
    pub fn take_capture(&self, site_link: &str) -> Result<Vec<Vec<u8>>, LabError> {
        let k = self.link_index(site_link)?;
        self.with_emulator(|e| e.take_capture(k))
    }

    pub fn emulator_status(&self) -> Result<EmulatorStatus, LabError> {
        self.with_emulator(|e| e.status())
    }

    /// Removes everything the lab created. Called by `Drop`; call it directly to see errors.
    pub fn down(self) -> Result<(), LabError> {
        self.teardown()
    }

    /// Like [`Lab::down`], for a lab shared with other threads; the first call does the work.
    pub fn teardown(&self) -> Result<(), LabError> {
        if self.torn_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let Ok(mut children) = self.children.lock() {
            terminate(&mut children);
        }
        *self.emulator_slot() = None; // joins the thread; its TUN devices go with it
        let mut first_err = None;
        for n in self.namespaces() {
            if let Err(e) = netns::destroy(&n) {
                first_err.get_or_insert(e);
            }
        }
        let _ = std::fs::remove_dir_all(run_dir(&self.state.run_id));
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("lab {}: teardown: {e}", self.state.run_id);
        }
    }
}

/// Stops processes: SIGTERM to all, so that they can remove what they made, then SIGKILL to
/// whatever still runs 2 s later; reaps them all.
fn terminate(children: &mut [Child]) {
    for c in children.iter() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for c in children.iter_mut() {
        while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Reads the state of every lab under [`RUN_ROOT`], by run id.
pub fn runs() -> BTreeMap<String, Result<LabState, String>> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(RUN_ROOT) else {
        return out;
    };
    for e in dir.flatten() {
        let run = e.file_name().to_string_lossy().into_owned();
        if !valid_run_id(&run) {
            continue;
        }
        let path = e.path().join("state.json");
        let state = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("{}: {e}", path.display())));
        out.insert(run, state);
    }
    out
}

/// What [`clean`] removed, and what it could not.
#[derive(Debug, Default, serde::Serialize)]
pub struct Cleaned {
    pub runs: Vec<String>,
    pub namespaces: Vec<String>,
    pub processes: usize,
    pub errors: Vec<String>,
}

/// Removes labs whose owner process is gone (or every lab, with `all`, after asking their owners
/// to stop): their processes, namespaces and state. Only namespaces named
/// `patronus-<valid run id>-...` are touched. Keeps going past errors and reports them.
pub fn clean(all: bool) -> Result<Cleaned, LabError> {
    let states = runs();
    let mut cleaned = Cleaned::default();
    if all {
        // Ask running owners to tear down their own labs, and give them the time to.
        let owners: Vec<i32> = states
            .values()
            .flatten()
            .map(|s| s.owner_pid)
            .filter(|&p| p != std::process::id() as i32 && netns::alive(p))
            .collect();
        for &p in &owners {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        netns::wait_exit(&owners, std::time::Duration::from_secs(30));
    }
    let states = runs();
    // A run is live while its owner runs. A run directory without a readable state is a lab
    // being created (`lab up` makes the directory before its child writes the state): it is
    // left alone for a minute.
    let live = |run: &str| match states.get(run) {
        Some(Ok(s)) => netns::alive(s.owner_pid),
        Some(Err(_)) => std::fs::metadata(run_dir(run))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|e| e.as_secs() < 60)),
        None => false,
    };
    let note = |cleaned: &mut Cleaned, run: &str| {
        if !cleaned.runs.iter().any(|r| r == run) {
            cleaned.runs.push(run.to_string());
        }
    };
    for ns in netns::list() {
        let Some((run, _)) = ns.strip_prefix(NS_PREFIX).and_then(|r| r.split_once('-')) else {
            continue;
        };
        if !valid_run_id(run) || (!all && live(run)) {
            continue;
        }
        match netns::destroy(&ns) {
            Ok(n) => {
                cleaned.processes += n;
                cleaned.namespaces.push(ns.clone());
                note(&mut cleaned, run);
            }
            Err(e) => cleaned.errors.push(e.to_string()),
        }
    }
    for run in states.keys() {
        if all || !live(run) {
            if let Err(e) = std::fs::remove_dir_all(run_dir(run)) {
                cleaned
                    .errors
                    .push(format!("removing {}: {e}", run_dir(run).display()));
            }
            note(&mut cleaned, run);
        }
    }
    Ok(cleaned)
}
