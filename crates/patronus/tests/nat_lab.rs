//! Sites behind NAT, in the lab: the edges learn how their links are seen from outside through
//! the controller's STUN responder, their peers are given those endpoints with the
//! configuration, and the paths form, fail over and follow a new address like any other. Runs
//! on the lab's harness (`patronus_lab::harness`): without root the test is counted as ignored,
//! and `PATRONUS_REQUIRE_LAB=1` makes that a failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use patronus_lab::edges;
use patronus_lab::{Lab, LabOptions, Topology};

mod lab_common;
use lab_common::{cli, create_sites, login_admin, patronus};

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "nat lab",
        vec![
            patronus_lab::lab_test!(
                a_site_behind_nat_on_every_link_reaches_a_hub_fails_over_and_follows_a_new_address
            ),
            patronus_lab::lab_test!(
                a_site_behind_open_nat_on_every_link_forms_every_path_directly_and_fails_over
            ),
            patronus_lab::lab_test!(
                two_sites_behind_carrier_grade_nat_punch_through_and_idle_past_the_mapping_timeout
            ),
            patronus_lab::lab_test!(
                two_sites_behind_symmetric_nat_relay_through_the_controller_and_fail_over
            ),
        ],
    )
}

/// A controller in the lab's `controller` namespace, an admin logged in at `home`, and the
/// lab's sites and links created through the CLI; the URL and the certificate's fingerprint.
fn controller(lab: &Lab, run: &Path, home: &Path) -> (String, String) {
    let ctl = lab.addr("controller", false).unwrap();
    let url = format!("https://{ctl}:8080");
    let state = run.join("controller");
    let mut cmd = Command::new(patronus());
    cmd.args([
        "controller",
        "--listen",
        &format!("{ctl}:8080"),
        "--data-dir",
    ])
    .arg(&state)
    .env("PATRONUS_ADMIN_EMAIL", "admin@example.net");
    let log = std::fs::File::create(run.join("controller.log")).unwrap();
    lab.spawn_logged("controller", cmd, log).unwrap();
    let fp = login_admin(lab, home, &url, &state);
    create_sites(lab, home);
    (url, fp)
}

/// `site`'s edge's status; `Null` while it does not answer (starting).
fn try_status(lab: &Lab, site: &str) -> serde_json::Value {
    let out = lab
        .exec(
            site,
            &[patronus().to_str().unwrap(), "edge", "status", "--json"],
        )
        .unwrap();
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap()
}

fn edge_status(lab: &Lab, site: &str) -> serde_json::Value {
    let s = try_status(lab, site);
    assert!(!s.is_null(), "{site}'s edge does not answer\n{}", logs(lab));
    s
}

/// Every edge's log, for a failure's message.
fn logs(lab: &Lab) -> String {
    lab.plan()
        .sites
        .iter()
        .map(|s| {
            let log =
                std::fs::read_to_string(edges::edge_dir(lab, s.name.as_str()).join("edge.log"))
                    .unwrap_or_default();
            format!("--- {} ---\n{log}\n", s.name)
        })
        .collect()
}

/// Waits until every one of `site`'s paths is up and `ok` holds for each; how long it took.
fn paths_up(
    lab: &Lab,
    site: &str,
    count: usize,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    paths_in(lab, site, count, within, |p| p["state"] == "up" && ok(p))
}

/// Waits until every one of `site`'s paths is alive (up, or degraded: replies arrive) and `ok`
/// holds for each; how long it took.
fn paths_alive(
    lab: &Lab,
    site: &str,
    count: usize,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    paths_in(lab, site, count, within, |p| p["state"] != "down" && ok(p))
}

fn paths_in(
    lab: &Lab,
    site: &str,
    count: usize,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let s = try_status(lab, site);
        let paths = s["paths"].as_array().cloned().unwrap_or_default();
        if paths.len() == count && paths.iter().all(&ok) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{site}'s paths not all up within {within:?}: {:#}\n{}",
            s["paths"],
            logs(lab)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The controller, the lab's sites created through it, and every site's edge enrolled with a
/// token and running (WireGuard keepalive `keepalive_s`); when the edges were started. The
/// sites' links behind a NAT, and those named in `discovered` (`site/link`), have no endpoint
/// in their local configuration or enrolment: the controller gives peers what it observes.
fn system(lab: &Lab, keepalive_s: u16, discovered: &[&str]) -> (Instant, PathBuf) {
    let run: PathBuf = patronus_lab::lab::run_dir(lab.run_id());
    let plan = lab.plan().clone();
    let home = run.join("cli");
    let (url, fp) = controller(lab, &run, &home);
    let mut locals = Vec::new();
    for (i, s) in plan.sites.iter().enumerate() {
        let (ok, token, err) = cli(lab, &home, &["site", "enroll-token", s.name.as_str()], "");
        assert!(ok, "{err}");
        let mut local = edges::local_config(
            &plan,
            i,
            &url,
            edges::edge_dir(lab, s.name.as_str()).join("state"),
        );
        local.ca_fingerprint = vec![fp.clone()];
        local.keepalive_s = keepalive_s;
        for (l, lp) in local.links.iter_mut().zip(&s.links) {
            assert_eq!(l.public_endpoint.is_none(), lp.nat.is_some(), "{}", l.name);
            if discovered.contains(&format!("{}/{}", s.name, l.name).as_str()) {
                l.public_endpoint = None;
            }
        }
        edges::controller_edge(
            lab,
            patronus(),
            s.name.as_str(),
            &local,
            "enroll",
            Some(token.trim()),
        )
        .unwrap();
        locals.push(local);
    }
    for (s, local) in plan.sites.iter().zip(&locals) {
        edges::controller_edge(lab, patronus(), s.name.as_str(), local, "run", None).unwrap();
    }
    (Instant::now(), home)
}

/// How `site/link` (behind a NAT) is seen from outside: its NAT's public address (now) and
/// the port the NAT keeps for the edge's.
fn public(lab: &Lab, link: &str) -> SocketAddr {
    let l = lab.plan().link(link).unwrap().1.clone();
    SocketAddr::new(
        lab.link_addr4(link).unwrap().into(),
        l.nat.as_ref().unwrap().public_port,
    )
}

/// The median of `v`.
fn p50(v: &[f64]) -> f64 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Waits until all four paths of `a` and of `b` are up, each of b's meeting `ok_b`; asserts
/// that took less than 5 s from `started` (when the edges were started).
fn formed(lab: &Lab, started: Instant, ok_b: impl Fn(&serde_json::Value) -> bool) {
    let a_up = paths_up(lab, "a", 4, Duration::from_secs(20), |_| true);
    let b_up = paths_up(lab, "b", 4, Duration::from_secs(20), ok_b);
    let formed = started.elapsed();
    let _ = writeln!(
        std::io::stderr(),
        "paths formed {formed:?} after start (a {a_up:?}, b {b_up:?})"
    );
    assert!(formed < Duration::from_secs(5), "{formed:?}\n{}", logs(lab));
}

/// A stream from a's LAN to b's, and four hard cuts of the link of a's it is on: their
/// median outage within 100 ms.
fn failover(lab: &Lab) {
    let r = edges::failover_trials(lab, "a/h1", "b/h1", "a", 4, 1000).unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "failover outages {:?} ms (cut {:?})",
        r.outages_ms,
        r.cut
    );
    assert!(
        p50(&r.outages_ms) <= 100.0,
        "{:?}\n{}",
        r.outages_ms,
        logs(lab)
    );
}

/// Asserts that each edge reports every path direct, but LTE to LTE relayed if `lte_relayed`.
fn assert_via(lab: &Lab, lte_relayed: bool) {
    for site in ["a", "b"] {
        for p in edge_status(lab, site)["paths"].as_array().unwrap() {
            let relayed = lte_relayed && p["local_link"] == "lte" && p["remote_link"] == "lte";
            assert_eq!(p["relayed"], relayed, "{site}: {p}");
        }
    }
}

/// Renumbers `link` (`site/link`) with every path up, and asserts that `peer`'s paths to it
/// come back within 3 s: replies arrive again (the loss of the moment may leave a path
/// degraded until its measurements forget it) and they send to the new address; then the
/// other end's paths are alive too. The new address.
fn renumber(lab: &Lab, link: &str, peer: &str) -> std::net::Ipv4Addr {
    let (site, name) = link.split_once('/').unwrap();
    paths_up(lab, "a", 4, Duration::from_secs(20), |_| true);
    paths_up(lab, "b", 4, Duration::from_secs(20), |_| true);
    let (old, new) = lab.renumber(link).unwrap();
    let renumbered = Instant::now();
    let back = paths_alive(lab, peer, 4, Duration::from_secs(20), |p| {
        p["remote_link"] != name
            || p["endpoint"]
                .as_str()
                .is_some_and(|e| e.starts_with(&format!("{new}:")))
    });
    let _ = writeln!(
        std::io::stderr(),
        "{link} renumbered {old} -> {new}: {peer}'s paths to it back in {back:?}"
    );
    assert!(
        renumbered.elapsed() < Duration::from_secs(3),
        "{back:?}\n{}",
        logs(lab)
    );
    paths_alive(lab, site, 4, Duration::from_secs(3), |_| true);
    new
}

/// Site `a` has all its links behind NAT (an "open" one and a carrier-grade one, whose filter
/// lets in only what answers what went out); the hub `b` has public links. Neither `a`'s
/// configuration nor its enrolment names an endpoint for its links: `a`'s edge asks the
/// controller (STUN from each link's socket), the controller gives `b` what it saw, and every
/// path forms within 5 s of both edges running. A stream between the LAN hosts fails over a
/// cut of `a`'s active link within the usual figures. Then the NAT of `a`'s LTE link gets a new
/// public address (a modem restart): its paths come back within 3 s (replies arrive again, b
/// sending to the new address). Then b's internet link, whose endpoint b leaves to discovery,
/// gets a new address of its own: its paths come back within 3 s too. Neither edge restarted.
fn a_site_behind_nat_on_every_link_reaches_a_hub_fails_over_and_follows_a_new_address() {
    let topology: Topology = toml::from_str(
        r#"
        name = "nat-hub"
        controller = true
        [[sites]]
        name = "a"
        links = [
            { name = "inet", kind = "broadband", nat = "open" },
            { name = "lte", kind = "lte", nat = "cgnat" },
        ]
        [[sites]]
        name = "b"
        links = [{ name = "mpls", kind = "mpls" }, { name = "inet", kind = "broadband" }]
        "#,
    )
    .unwrap();
    let lab = Lab::up(&topology, LabOptions::default()).unwrap();
    let (started, _) = system(&lab, 25, &["b/inet"]);

    // Every path up on both ends, b's towards a's links at their public endpoints.
    formed(&lab, started, |p| {
        p["endpoint"].as_str()
            == Some(&public(&lab, &format!("a/{}", p["remote_link"].as_str().unwrap())).to_string())
    });
    assert_via(&lab, false);
    // a knows how the controller sees each link.
    let s = edge_status(&lab, "a");
    for l in s["links"].as_array().unwrap() {
        let name = format!("a/{}", l["name"].as_str().unwrap());
        assert_eq!(l["observed"], public(&lab, &name).to_string(), "{l}");
    }

    failover(&lab);
    // The LTE NAT's public address changes: every mapping it held is gone with it.
    renumber(&lab, "a/lte", "b");
    // b's internet link gets a new address of its own (a new DHCP lease): b's edge rebinds the
    // link's sockets to it and asks the controller how the link is seen now; a is given that
    // and sends there, which also opens its carrier-grade NAT for b's answers.
    let new = renumber(&lab, "b/inet", "a");
    let link = edge_status(&lab, "b")["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "inet")
        .cloned()
        .unwrap();
    assert_eq!(
        link["address"],
        new.to_string(),
        "{link}\n{:#}\n{}",
        edge_status(&lab, "a")["paths"],
        logs(&lab)
    );
    // No edge restarted: each still runs its first process.
    for site in ["a", "b"] {
        let s = edge_status(&lab, site);
        assert!(
            s["uptime_s"].as_f64().unwrap() > started.elapsed().as_secs_f64() - 1.0,
            "{site}"
        );
    }
}

/// Both sites have their LTE link behind a carrier-grade NAT (endpoint-independent mapping,
/// address-and-port-dependent filtering): LTE to LTE forms only by hole punching, each side's
/// initiation opening its own NAT for the other's. Every path forms within 5 s of start; a
/// stream fails over a cut of a's active link within the usual figures. The keepalive is off
/// and the NATs forget a mapping after 30 s without traffic: 35 s later no path has gone down
/// (the probes that run in every path's session, at least once a second, hold the mappings; the
/// keepalive is for when they stop).
fn two_sites_behind_carrier_grade_nat_punch_through_and_idle_past_the_mapping_timeout() {
    let topology: Topology = toml::from_str(
        r#"
        name = "nat-cgnat"
        controller = true
        [[sites]]
        name = "a"
        links = [
            { name = "mpls", kind = "mpls" },
            { name = "lte", kind = "lte", nat = "cgnat", nat_timeout_s = 30 },
        ]
        [[sites]]
        name = "b"
        links = [
            { name = "mpls", kind = "mpls" },
            { name = "lte", kind = "lte", nat = "cgnat", nat_timeout_s = 30 },
        ]
        "#,
    )
    .unwrap();
    let lab = Lab::up(&topology, LabOptions::default()).unwrap();
    let (started, _) = system(&lab, 0, &[]);
    formed(&lab, started, |_| true);
    // LTE to LTE goes NAT to NAT, each end at the other's public mapping.
    for (site, peer) in [("a", "b"), ("b", "a")] {
        let s = edge_status(&lab, site);
        let p = s["paths"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["local_link"] == "lte" && p["remote_link"] == "lte")
            .cloned()
            .unwrap();
        assert_eq!(
            p["endpoint"],
            public(&lab, &format!("{peer}/lte")).to_string(),
            "{p}"
        );
    }

    assert_via(&lab, false);
    failover(&lab);

    // Idle past the mappings' timeout, keepalive off: nothing goes down.
    paths_up(&lab, "a", 4, Duration::from_secs(20), |_| true);
    paths_up(&lab, "b", 4, Duration::from_secs(20), |_| true);
    let downs = |site: &str| edge_status(&lab, site)["path_downs"].as_u64().unwrap();
    let before = (downs("a"), downs("b"));
    // Time past the mappings' timeout is the point here; the counters say what it did.
    std::thread::sleep(Duration::from_secs(35));
    assert_eq!((downs("a"), downs("b")), before, "{}", logs(&lab));
    paths_alive(&lab, "a", 4, Duration::from_secs(1), |_| true);
    paths_alive(&lab, "b", 4, Duration::from_secs(1), |_| true);
}

/// Both sites have their LTE link behind a symmetric NAT (a new public port for every
/// destination, filtering by address and port): LTE to LTE cannot form directly, since neither
/// end can know the port the other's NAT will use for it; it goes through the relay on the
/// controller's UDP port, still WireGuard end to end, and both ends say so (status and
/// metrics, and the controller's API from their reports). LTE to a public MPLS link forms directly: the public end follows the NAT's port
/// from the authenticated handshake. Every path forms within 5 s; a stream fails over cuts of
/// a's active link within the usual figures, relayed path or not.
fn two_sites_behind_symmetric_nat_relay_through_the_controller_and_fail_over() {
    let topology: Topology = toml::from_str(
        r#"
        name = "nat-symmetric"
        controller = true
        [[sites]]
        name = "a"
        links = [
            { name = "mpls", kind = "mpls" },
            { name = "lte", kind = "lte", nat = "symmetric" },
        ]
        [[sites]]
        name = "b"
        links = [
            { name = "mpls", kind = "mpls" },
            { name = "lte", kind = "lte", nat = "symmetric" },
        ]
        "#,
    )
    .unwrap();
    let lab = Lab::up(&topology, LabOptions::default()).unwrap();
    let (started, home) = system(&lab, 25, &[]);
    formed(&lab, started, |_| true);
    assert_via(&lab, true);
    let ctl = lab.addr("controller", false).unwrap();
    for site in ["a", "b"] {
        let s = edge_status(&lab, site);
        for p in s["paths"].as_array().unwrap() {
            let both_lte = p["local_link"] == "lte" && p["remote_link"] == "lte";
            let at_controller = p["endpoint"]
                .as_str()
                .is_some_and(|e| e.starts_with(&format!("{ctl}:")));
            assert_eq!(at_controller, both_lte, "{site}: {p}");
        }
        let metrics = patronus_lab::netns::run_in::<_, patronus_lab::netns::NetnsError>(
            &lab.ns(site).unwrap(),
            || {
                use std::io::Read;
                let mut c = std::net::TcpStream::connect(("127.0.0.1", edges::STATUS_PORT))?;
                c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
                let mut body = String::new();
                c.read_to_string(&mut body)?;
                Ok(body)
            },
        )
        .unwrap();
        let peer = if site == "a" { "b" } else { "a" };
        assert!(
            metrics.contains(&format!(
                "patronus_path_relayed{{peer=\"{peer}\",local_link=\"lte\",remote_link=\"lte\"}} 1"
            )),
            "{metrics}"
        );
    }

    // The controller's API says the same, from the edges' reports.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, err) = cli(&lab, &home, &["path", "list", "--output", "json"], "");
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let items = v["items"].as_array().unwrap().clone();
        if items.len() == 4 && items.iter().all(|p| p["relayed"].is_boolean()) {
            for p in &items {
                let both_lte = p["a"]["link"] == "lte" && p["b"]["link"] == "lte";
                assert_eq!(p["relayed"], both_lte, "{p}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "no report of every path: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }

    failover(&lab);
}

/// Site `a` has both its links behind "open" NATs (endpoint-independent mapping and filtering,
/// a public port of their own), its endpoints left to discovery; `b`'s links are public. Every
/// path forms within 5 s, directly, b's at a's public ports; a stream fails over cuts of a's
/// active link within the usual figures.
fn a_site_behind_open_nat_on_every_link_forms_every_path_directly_and_fails_over() {
    let topology: Topology = toml::from_str(
        r#"
        name = "nat-open"
        controller = true
        [[sites]]
        name = "a"
        links = [
            { name = "mpls", kind = "mpls", nat = "open" },
            { name = "inet", kind = "broadband", nat = "open" },
        ]
        [[sites]]
        name = "b"
        links = [{ name = "mpls", kind = "mpls" }, { name = "inet", kind = "broadband" }]
        "#,
    )
    .unwrap();
    let lab = Lab::up(&topology, LabOptions::default()).unwrap();
    let (started, _) = system(&lab, 25, &[]);
    formed(&lab, started, |p| {
        p["endpoint"].as_str()
            == Some(&public(&lab, &format!("a/{}", p["remote_link"].as_str().unwrap())).to_string())
    });
    assert_via(&lab, false);
    failover(&lab);
}
