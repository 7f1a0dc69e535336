//! Controller and edges as one system, in the lab: sites created through the controller's CLI,
//! edges enrolled with one-time tokens (their keys made on their own machines), configurations
//! from the controller, traffic through the tunnels. Runs on the lab's harness
//! (`patronus_lab::harness`): without root the test is counted as ignored, and
//! `PATRONUS_REQUIRE_LAB=1` makes that a failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use patronus_lab::edges;
use patronus_lab::{Lab, LabOptions, Topology};

mod lab_common;
use lab_common::{cli, create_sites, fingerprint, login_admin, patronus};

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "controller lab",
        vec![
            patronus_lab::lab_test!(
                three_sites_enrolled_with_tokens_through_the_controller_carry_traffic
            ),
            patronus_lab::lab_test!(
                edges_spread_over_three_controllers_follow_a_write_and_survive_their_controller_killed
            ),
            patronus_lab::lab_test!(every_disaster_recovery_drill_recovers_without_losing_a_packet),
        ],
    )
}

fn three_sites_enrolled_with_tokens_through_the_controller_carry_traffic() {
    let lab = Lab::up(&Topology::three_sites_mixed(), LabOptions::default()).unwrap();
    let run: PathBuf = patronus_lab::lab::run_dir(lab.run_id());
    let plan = lab.plan().clone();
    let ctl = lab.addr("controller", false).unwrap();
    let url = format!("https://{ctl}:8080");

    // The controller, in its own namespace, with a first admin whose password it generates
    // (and a self-signed certificate, whose fingerprint the CLI and the edges pin).
    let state = run.join("controller");
    let mut cmd = Command::new(patronus());
    cmd.args([
        "controller",
        "--listen",
        &format!("{ctl}:8080"),
        "--data-dir",
    ])
    .arg(&state)
    .env("PATRONUS_ADMIN_EMAIL", "admin@example.net")
    // The webhook receiver listens beside the controller, on the lab's private addresses.
    .env("PATRONUS_WEBHOOK_ALLOWED_NETWORKS", format!("{ctl}/32"));
    let log = std::fs::File::create(run.join("controller.log")).unwrap();
    let controller = lab.spawn_logged("controller", cmd, log).unwrap();
    let home = run.join("cli");
    let fp = login_admin(&lab, &home, &url, &state);

    // The sites and their links, as an operator would enter them.
    create_sites(&lab, &home);
    // Each edge enrols with its own token; the data planes start once all have enrolled.
    let mut locals = Vec::new();
    for (i, s) in plan.sites.iter().enumerate() {
        let (ok, token, err) = cli(&lab, &home, &["site", "enroll-token", s.name.as_str()], "");
        assert!(ok, "{err}");
        let mut local = edges::local_config(
            &plan,
            i,
            &url,
            edges::edge_dir(&lab, s.name.as_str()).join("state"),
        );
        local.ca_fingerprint = vec![fp.clone()];
        edges::controller_edge(
            &lab,
            patronus(),
            s.name.as_str(),
            &local,
            "enroll",
            Some(token.trim()),
        )
        .unwrap();
        // The token is spent.
        let err = edges::controller_edge(
            &lab,
            patronus(),
            "branch1",
            &patronus_api::EdgeLocal {
                ca_fingerprint: vec![fp.clone()],
                ..edges::local_config(&plan, 1, &url, run.join("intruder"))
            },
            "enroll",
            Some(token.trim()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("already used"), "{err}");
        locals.push(local);
    }
    let mut pids = Vec::new();
    for (s, local) in plan.sites.iter().zip(&locals) {
        pids.push(
            edges::controller_edge(&lab, patronus(), s.name.as_str(), local, "run", None).unwrap(),
        );
    }
    for (from, to) in [
        ("hq/h1", "branch1/h1"),
        ("hq/h1", "branch2/h1"),
        ("branch1/h1", "branch2/h1"),
    ] {
        let dst = lab.addr(to, false).unwrap();
        edges::wait_for_tunnel(&lab, from, dst, Duration::from_secs(20)).unwrap_or_else(|e| {
            let logs: String = plan
                .sites
                .iter()
                .map(|s| {
                    std::fs::read_to_string(edges::edge_dir(&lab, s.name.as_str()).join("edge.log"))
                        .unwrap_or_default()
                })
                .collect();
            panic!("{e}\n{logs}")
        });
    }
    // The edges report what they measure: the controller shows hq's MPLS path to branch1 up,
    // with a round trip near the emulated 20 ms.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, err) = cli(
            &lab,
            &home,
            &[
                "path", "list", "--site", "hq", "--state", "up", "--output", "json",
            ],
            "",
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let found = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                let end = |e: &serde_json::Value| format!("{}/{}", e["site"], e["link"]);
                let mut ends = [end(&p["a"]), end(&p["b"])];
                ends.sort();
                ends == [r#""branch1"/"mpls""#, r#""hq"/"mpls""#]
            })
            .cloned();
        if let Some(p) = found {
            let rtt = p["rtt_ms"].as_f64().unwrap();
            assert!((15.0..60.0).contains(&rtt), "{p}");
            // And the path came up with a first round trip that measured the path, not the
            // handshake its first probe might have waited behind.
            let id = p["id"].as_str().unwrap();
            let (ok, out, err) = cli(
                &lab,
                &home,
                &["path", "events", id, "--kind", "up", "--output", "json"],
                "",
            );
            assert!(ok, "{err}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let ups = v["items"].as_array().unwrap();
            assert!(!ups.is_empty(), "{out}");
            for e in ups {
                let rtt = e["detail"]["rtt_ms"].as_f64().unwrap();
                assert!((15.0..60.0).contains(&rtt), "{e}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no report of hq/mpls - branch1/mpls: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // An admin registers a webhook for failovers and paths going down; the receiver listens
    // beside the controller.
    let hook = patronus_lab::webhook::Receiver::start_in(
        &lab.ns("controller").unwrap(),
        std::net::SocketAddr::new(ctl, 0),
    )
    .unwrap();
    let (ok, out, err) = cli(
        &lab,
        &home,
        &[
            "webhook",
            "create",
            &hook.url(),
            "--event",
            "failover",
            "--event",
            "path.down",
            "--output",
            "json",
        ],
        "",
    );
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    let hook_id = created["id"].to_string();

    // A cut of the link carrying a stream shows up in the API as a failover of hq's edge, and
    // as a signed webhook delivery.
    let b1 = lab.addr("branch1/h1", false).unwrap();
    let (from_ns, to_ns) = (lab.ns("hq/h1").unwrap(), lab.ns("branch1/h1").unwrap());
    let r = std::thread::scope(|sc| {
        let run = sc.spawn(|| {
            let cfg = patronus_lab::stream::StreamConfig {
                rate_pps: 200,
                duration: Duration::from_secs(3),
                port: 46000,
                ..Default::default()
            };
            patronus_lab::stream::run(&from_ns, &to_ns, b1, &cfg).unwrap()
        });
        std::thread::sleep(Duration::from_secs(1));
        lab.link_command("hq/mpls", &["cut"]).unwrap();
        let r = run.join().unwrap();
        lab.link_command("hq/mpls", &["restore"]).unwrap();
        r
    });
    assert!(r.received > 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, err) = cli(
            &lab,
            &home,
            &["path", "failovers", "--site", "hq", "--output", "json"],
            "",
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let down = v["items"].as_array().unwrap().iter().any(|e| {
            e["reason"] == "path-down"
                && e["peer"] == "branch1"
                && e["from"].as_str().unwrap().starts_with("mpls>")
        });
        if down {
            break;
        }
        assert!(Instant::now() < deadline, "no failover reported: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let got = hook
        .wait_for(Duration::from_secs(20), |r| {
            let v = r.json();
            v["type"] == "failover"
                && v["data"]["site"] == "hq"
                && v["data"]["reason"] == "path-down"
                && v["data"]["from"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("mpls>")
        })
        .unwrap_or_else(|| panic!("no failover webhook: {:?}", hook.received()));
    let sig = got.header("x-patronus-signature").unwrap();
    assert!(sig.starts_with("t=") && sig.contains(",v1="), "{sig}");
    assert_eq!(got.header("x-patronus-event"), Some("failover"));
    assert!(
        hook.received()
            .iter()
            .any(|r| r.json()["type"] == "path.down")
    );
    // The receiver has the body; the controller records the answer right after.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = cli(
            &lab,
            &home,
            &[
                "webhook",
                "deliveries",
                &hook_id,
                "--event",
                "failover",
                "--output",
                "json",
            ],
            "",
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let delivered = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["status"] == "delivered" && d["payload"]["id"] == got.json()["id"]);
        if delivered {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The controller holds each edge's public key, the one the edge made and keeps.
    for s in &plan.sites {
        let (ok, out, _) = cli(
            &lab,
            &home,
            &["site", "show", s.name.as_str(), "--output", "json"],
            "",
        );
        assert!(ok);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let key_file = edges::edge_dir(&lab, s.name.as_str()).join("state/private.key");
        let out = Command::new(patronus())
            .args(["edge", "pubkey", "--key"])
            .arg(&key_file)
            .output()
            .unwrap();
        assert_eq!(
            v["public_key"].as_str().unwrap(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key_file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    // A policy written through the API reaches the running edges and moves traffic: this UDP
    // port may only use LTE links from now on. (1000 packets/s, so that the probes every path
    // carries are a small part of what the links count.)
    let forwarded = |l: &str| lab.link_status(l).unwrap().up_stats.forwarded;
    let stream = || {
        let dst = lab.addr("branch1/h1", false).unwrap();
        let cfg = patronus_lab::stream::StreamConfig {
            rate_pps: 1000,
            duration: Duration::from_secs(2),
            port: 45000,
            ..Default::default()
        };
        let (lte, mpls) = (forwarded("hq/lte"), forwarded("hq/mpls"));
        let r = patronus_lab::stream::run(
            &lab.ns("hq/h1").unwrap(),
            &lab.ns("branch1/h1").unwrap(),
            dst,
            &cfg,
        )
        .unwrap();
        assert_eq!(r.lost, 0, "{r:?}");
        (
            r.sent,
            forwarded("hq/lte") - lte,
            forwarded("hq/mpls") - mpls,
        )
    };
    // Not on LTE before the policy (on MPLS, or on broadband while MPLS serves its hold-down
    // after the cut above).
    let (sent, lte, mpls) = stream();
    assert!(
        lte < sent / 2,
        "before: sent {sent}, lte {lte}, mpls {mpls}"
    );
    let (ok, _, err) = cli(
        &lab,
        &home,
        &[
            "policy",
            "create",
            r#"{"name":"lte-only","order":10,"class":"bulk","match":{"protocol":"udp","dst_ports":[45000]},"links":{"only":["lte"]}}"#,
        ],
        "",
    );
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_secs(1));
    let (sent, lte, mpls) = stream();
    assert!(
        lte >= sent * 9 / 10 && mpls < sent / 2,
        "after: sent {sent}, lte {lte}, mpls {mpls}"
    );
    let hq_log = std::fs::read_to_string(edges::edge_dir(&lab, "hq").join("edge.log")).unwrap();
    assert!(hq_log.contains("new configuration"), "{hq_log}");

    // The edges' traffic counters reach the API: hq's bulk class (the LTE-only policy) sent
    // at least the 2000 packets of the stream above.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, err) = cli(
            &lab,
            &home,
            &["traffic", "stats", "--site", "hq", "--output", "json"],
            "",
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let bulk: i64 = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["class"] == "bulk")
            .map(|b| b["tx_packets"].as_i64().unwrap())
            .sum();
        if bulk >= 2000 {
            break;
        }
        assert!(Instant::now() < deadline, "no bulk traffic reported: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // SLA classes and failover settings reach the running edges too, and apply there at once.
    for args in [
        &["class", "update", "realtime", r#"{"max_loss_pct":0.5}"#][..],
        &["failover", "update", r#"{"hold_down_ms":4000}"#][..],
    ] {
        let (ok, _, err) = cli(&lab, &home, args, "");
        assert!(ok, "{err}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(edges::edge_dir(&lab, "hq").join("edge.log")).unwrap();
        if log.contains("SLA classes, the failover settings and") {
            assert!(!log.contains("were refused"), "{log}");
            break;
        }
        assert!(Instant::now() < deadline, "not applied live: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A site disabled through the API leaves the other edges' peers (its routes go), and comes
    // back, with new sessions, when it is active again; the other pairs are not disturbed.
    let b2 = lab.addr("branch2/h1", false).unwrap();
    let (ok, _, err) = cli(
        &lab,
        &home,
        &["site", "set-status", "branch2", "disabled"],
        "",
    );
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab
        .exec("hq/h1", &["ping", "-c", "1", "-W", "1", &b2.to_string()])
        .unwrap()
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "hq still reaches the disabled site"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (sent, ..) = stream();
    assert!(sent > 0, "hq still reaches branch1");
    let (ok, _, err) = cli(
        &lab,
        &home,
        &["site", "set-status", "branch2", "active"],
        "",
    );
    assert!(ok, "{err}");
    edges::wait_for_tunnel(&lab, "hq/h1", b2, Duration::from_secs(20)).unwrap();

    // A key rotation, under a stream that runs from before the roll is asked for until after it
    // has ended at the controller and in every edge: hq's edge makes a new key pair, its peers
    // accept both keys while each path's session moves to the new one, and nothing is lost.
    let key_of = |site: &str| {
        let out = Command::new(patronus())
            .args(["edge", "pubkey", "--key"])
            .arg(edges::edge_dir(&lab, site).join("state/private.key"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // An edge's recent events: (Unix ms, text).
    let events = |site: &str| -> Vec<(u64, String)> {
        let out = lab
            .exec(
                site,
                &[patronus().to_str().unwrap(), "edge", "status", "--json"],
            )
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["unix_ms"].as_u64().unwrap(),
                    e["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let at = |evs: &[(u64, String)], text: &str, nth: usize| {
        evs.iter()
            .filter(|(_, t)| t.contains(text))
            .nth(nth)
            .map(|(ms, _)| *ms)
    };
    let before = key_of("hq");
    let dst = lab.addr("branch1/h1", false).unwrap();
    let control = patronus_lab::stream::Control::default();
    let (hq_h1, b1_h1) = (lab.ns("hq/h1").unwrap(), lab.ns("branch1/h1").unwrap());
    let (r, roll) = std::thread::scope(|sc| {
        let run = sc.spawn(|| {
            let cfg = patronus_lab::stream::StreamConfig {
                rate_pps: 1000,
                // At most; stopped a second after the roll is over everywhere.
                duration: Duration::from_secs(120),
                port: 48000,
                ..Default::default()
            };
            patronus_lab::stream::run_until(&hq_h1, &b1_h1, dst, &cfg, &control).unwrap()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.sent() < 100 {
            assert!(Instant::now() < deadline, "the stream did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (ok, _, err) = cli(&lab, &home, &["site", "rotate-key", "hq"], "");
        assert!(ok, "{err}");
        // Over at the controller (the new key is the site's, no next key), in hq's edge
        // (committed) and in each peer's (the announcement of the next key, then the commit:
        // two rolls in place).
        let deadline = Instant::now() + Duration::from_secs(40);
        let roll = loop {
            let (ok, out, err) = cli(&lab, &home, &["site", "show", "hq", "--output", "json"], "");
            assert!(ok, "{err}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let after = key_of("hq");
            let committed = after != before
                && v["public_key"] == after.as_str()
                && v["next_public_key"].is_null();
            let hq = events("hq");
            let begun = at(&hq, "key roll: moving", 0);
            let done = at(&hq, "key roll: done", 0);
            let peers =
                ["branch1", "branch2"].map(|p| at(&events(p), "peers' keys rolled in place", 1));
            if let (true, Some(begun), Some(done), [Some(b1), Some(b2)]) =
                (committed, begun, done, peers)
            {
                break (begun, done.max(b1).max(b2));
            }
            assert!(
                Instant::now() < deadline,
                "the key did not roll: {out}\nhq: {hq:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        // A second more of the stream, for what was in flight when the last edge moved.
        let more = control.sent() + 1000;
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.sent() < more {
            assert!(Instant::now() < deadline, "the stream stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
        control.stop();
        (run.join().unwrap(), roll)
    });
    let (first, last) = (r.first_sent_unix_ms.unwrap(), r.last_sent_unix_ms.unwrap());
    eprintln!(
        "key roll: the stream ran {} ms before the roll began and {} ms after it ended \
         everywhere ({} ms of roll); {} sent, {} lost",
        roll.0 as i64 - first as i64,
        last as i64 - roll.1 as i64,
        roll.1 - roll.0,
        r.sent,
        r.lost
    );
    assert!(first < roll.0, "the stream began after the roll");
    assert!(
        last >= roll.1 + 500,
        "the stream ended {} ms after the roll",
        last as i64 - roll.1 as i64
    );
    assert_eq!(r.lost, 0, "{r:?}");
    let hq_log = std::fs::read_to_string(edges::edge_dir(&lab, "hq").join("edge.log")).unwrap();
    assert!(hq_log.contains("key roll: done"), "{hq_log}");
    assert!(hq_log.contains("live paths moved in"), "{hq_log}");
    let b1_log =
        std::fs::read_to_string(edges::edge_dir(&lab, "branch1").join("edge.log")).unwrap();
    assert!(b1_log.contains("peers' keys rolled in place"), "{b1_log}");
    eprintln!(
        "{}",
        hq_log
            .lines()
            .chain(b1_log.lines())
            .filter(|l| l.contains("key r") || l.contains("rolled"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for to in ["branch1/h1", "branch2/h1"] {
        edges::wait_for_tunnel(
            &lab,
            "hq/h1",
            lab.addr(to, false).unwrap(),
            Duration::from_secs(5),
        )
        .unwrap();
    }

    // A lossy link for a minute: 30 % loss each way on hq's MPLS link, under a stream each way
    // between hq and branch1. Steering reacts to every change of the paths over it (hundreds,
    // at this loss); what is reported, to the edges' status, the controller and its webhooks,
    // has hysteresis (`patronus_core::path`): per path, one `down`, one `sla.violated` per
    // class it breaks (restored only after the class is met for the damped hold-down, which
    // 30 % loss never allows), and two more per reported `up`, which comes a damped hold-down
    // after the path came back (4 s here, doubling with each point of penalty, which halves
    // every 30 s): at most three in a minute of failures (4 + 8 + 16 s of hold-down, and the
    // downs between), so at most 1 + C + 2 * 3 per path, C the SLA classes (a run with two ups
    // reported 8 changes for one path). The 8 paths over hq/mpls (4 from hq,
    // one from each of branch1's and branch2's links to it) stay within 8 times that.
    let (ok, out, err) = cli(&lab, &home, &["class", "list", "--output", "json"], "");
    assert!(ok, "{err}");
    let classes = serde_json::from_str::<serde_json::Value>(&out).unwrap()["items"]
        .as_array()
        .unwrap()
        .len();
    let per_path = 1 + classes + 2 * 3;
    let hook2 = patronus_lab::webhook::Receiver::start_in(
        &lab.ns("controller").unwrap(),
        std::net::SocketAddr::new(ctl, 0),
    )
    .unwrap();
    let (ok, _, err) = cli(
        &lab,
        &home,
        &[
            "webhook",
            "create",
            &hook2.url(),
            "--event",
            "path.down",
            "--event",
            "path.up",
            "--event",
            "sla.violated",
        ],
        "",
    );
    assert!(ok, "{err}");
    let on_lossy = |from: &str, to: &str| from == "hq/mpls" || to == "hq/mpls";
    // Packets each of hq's links carried out of and into the site.
    let counts = || {
        ["hq/mpls", "hq/inet", "hq/lte"].map(|l| {
            let s = lab.link_status(l).unwrap();
            (s.up_stats.packets, s.down_stats.forwarded)
        })
    };
    let (hq_ns, b1_ns) = (lab.ns("hq/h1").unwrap(), lab.ns("branch1/h1").unwrap());
    let (hq_addr, b1_addr) = (
        lab.addr("hq/h1", false).unwrap(),
        lab.addr("branch1/h1", false).unwrap(),
    );
    let lossy_from_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Until the loss ends: what comes after (the paths back up) is not the lossy minute's.
    let lossy_to_ms = std::cell::Cell::new(u64::MAX);
    let (ab, ba, moved) = std::thread::scope(|sc| {
        let stream = |from: &str, to: &str, dst, port| {
            let (from, to) = (from.to_owned(), to.to_owned());
            sc.spawn(move || {
                let cfg = patronus_lab::stream::StreamConfig {
                    rate_pps: 200,
                    duration: Duration::from_secs(62),
                    port,
                    ..Default::default()
                };
                patronus_lab::stream::run(&from, &to, dst, &cfg).unwrap()
            })
        };
        let ab = stream(&hq_ns, &b1_ns, b1_addr, 49000);
        let ba = stream(&b1_ns, &hq_ns, hq_addr, 49001);
        std::thread::sleep(Duration::from_secs(1));
        lab.link_command("hq/mpls", &["set", "loss=30%"]).unwrap();
        // Give the flows 10 s to leave, then count where they go for 50 s.
        std::thread::sleep(Duration::from_secs(10));
        let c0 = counts();
        std::thread::sleep(Duration::from_secs(50));
        let c1 = counts();
        lab.link_command("hq/mpls", &["set", "loss=0%"]).unwrap();
        lossy_to_ms.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
        );
        let (ab, ba) = (ab.join().unwrap(), ba.join().unwrap());
        let moved: Vec<(u64, u64)> = c0
            .iter()
            .zip(&c1)
            .map(|(a, b)| (b.0 - a.0, b.1 - a.1))
            .collect();
        eprintln!(
            "lossy minute: hq->branch1 {} sent {} lost, branch1->hq {} sent {} lost; packets \
             out of / into hq in the last 50 s on mpls, inet, lte: {moved:?}",
            ab.sent, ab.lost, ba.sent, ba.lost
        );
        (ab, ba, moved)
    });
    // Flows left the lossy link and stayed off: a stream that stayed, or came back, would have
    // lost 30 % of what it sent meanwhile; and the other links carried the streams' 10,000
    // packets each way in those 50 s (the lossy one carried probes: 8 paths' worth).
    for r in [&ab, &ba] {
        assert!(r.lost * 100 < r.sent, "{r:?}");
    }
    let elsewhere = (moved[1].0 + moved[2].0, moved[1].1 + moved[2].1);
    assert!(elsewhere.0 >= 10_000 && elsewhere.1 >= 10_000, "{moved:?}");
    // What the edges report about the paths over hq/mpls: each end's recent path events.
    let mut reported = std::collections::BTreeMap::<String, usize>::new();
    // Of those, the kinds a webhook is told of.
    let mut to_deliver = 0;
    for site in ["hq", "branch1", "branch2"] {
        let out = lab
            .exec(
                site,
                &[patronus().to_str().unwrap(), "edge", "status", "--json"],
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for e in v["path_events"].as_array().unwrap() {
            let at = e["at_ms"].as_u64().unwrap();
            let (from, to) = (
                format!("{site}/{}", e["local_link"].as_str().unwrap()),
                format!(
                    "{}/{}",
                    e["peer"].as_str().unwrap(),
                    e["remote_link"].as_str().unwrap()
                ),
            );
            if on_lossy(&from, &to) && at >= lossy_from_ms && at <= lossy_to_ms.get() {
                *reported.entry(format!("{from}>{to}")).or_default() += 1;
                if ["down", "up", "sla-violated"].contains(&e["kind"].as_str().unwrap()) {
                    to_deliver += 1;
                }
            }
        }
    }
    eprintln!("reported changes per path over hq/mpls (bound {per_path} each): {reported:?}");
    assert!(!reported.is_empty(), "30 % loss reported nothing");
    assert!(reported.len() <= 8, "{reported:?}");
    for (path, n) in &reported {
        assert!(*n <= per_path, "{path}: {n} reported changes");
    }
    // The webhooks: every reported down, up and broken SLA reaches the controller with the
    // edges' next telemetry and is delivered; no more than the bound.
    let lossy_hooks = || -> Vec<serde_json::Value> {
        hook2
            .received()
            .iter()
            .map(|r| r.json())
            .filter(|v| {
                on_lossy(
                    v["data"]["from"].as_str().unwrap_or(""),
                    v["data"]["to"].as_str().unwrap_or(""),
                )
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while lossy_hooks().len() < to_deliver {
        assert!(
            Instant::now() < deadline,
            "{} of {to_deliver} webhooks delivered",
            lossy_hooks().len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let hooks = lossy_hooks();
    let kinds: Vec<&str> = hooks.iter().map(|v| v["type"].as_str().unwrap()).collect();
    eprintln!(
        "webhooks about paths over hq/mpls: {} ({kinds:?})",
        hooks.len()
    );
    assert!(!hooks.is_empty());
    assert!(hooks.len() <= 8 * per_path, "{kinds:?}");

    // Headless for a minute: with the controller gone, a stream between branch1 and branch2
    // loses nothing for the whole minute, while hq's edge is restarted (it comes back on the
    // configuration it kept and forwards) and then fails over a cut on its own.
    // What the controller holds before it stops: after it moves to PostgreSQL, all of it is
    // there, the same.
    let json_of = |args: &[&str]| -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        let (ok, out, err) = cli(&lab, &home, &args, "");
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap()
    };
    let mpls_path = json_of(&["path", "list", "--site", "hq"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["from"] == "hq/mpls" && p["to"] == "branch1/mpls")
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .expect("no path hq/mpls - branch1/mpls");
    let history = |json_of: &dyn Fn(&[&str]) -> serde_json::Value| {
        [
            json_of(&["path", "failovers"]),
            json_of(&["path", "events", mpls_path.as_str()]),
            json_of(&["webhook", "list"]),
            json_of(&["policy", "list"]),
        ]
        .map(|v| v["items"].as_array().unwrap().clone())
    };
    let kept = history(&json_of);
    assert!(kept.iter().all(|items| !items.is_empty()), "{kept:?}");
    // Each site's id and version.
    let versions = |json_of: &dyn Fn(&[&str]) -> serde_json::Value| -> Vec<(i64, i64)> {
        json_of(&["site", "list"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["id"].as_i64().unwrap(), s["version"].as_i64().unwrap()))
            .collect()
    };
    let sites_before = versions(&json_of);

    lab.stop(controller).unwrap();
    let headless = Instant::now();
    let (b1_ns, b2_ns) = (lab.ns("branch1/h1").unwrap(), lab.ns("branch2/h1").unwrap());
    let b1 = lab.addr("branch1/h1", false).unwrap();
    let r = std::thread::scope(|sc| {
        let run = sc.spawn(|| {
            let cfg = patronus_lab::stream::StreamConfig {
                rate_pps: 200,
                duration: Duration::from_secs(60),
                port: 47000,
                ..Default::default()
            };
            patronus_lab::stream::run(&b1_ns, &b2_ns, b2, &cfg).unwrap()
        });
        std::thread::sleep(Duration::from_secs(5));
        lab.stop(pids[0]).unwrap();
        edges::controller_edge(&lab, patronus(), "hq", &locals[0], "run", None).unwrap();
        edges::wait_for_tunnel(&lab, "hq/h1", b1, Duration::from_secs(20)).unwrap();
        let log = std::fs::read_to_string(edges::edge_dir(&lab, "hq").join("edge.log")).unwrap();
        assert!(
            log.contains("running on the last good configuration"),
            "{log}"
        );
        lab.link_command("hq/mpls", &["cut"]).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let ping = lab
            .exec(
                "hq/h1",
                &["ping", "-c", "3", "-i", "0.2", "-W", "1", &b1.to_string()],
            )
            .unwrap();
        assert!(ping.status.success(), "hq does not fail over headless");
        lab.link_command("hq/mpls", &["restore"]).unwrap();
        run.join().unwrap()
    });
    assert!(headless.elapsed() >= Duration::from_secs(60));
    assert_eq!(r.lost, 0, "{r:?}");
    assert!(r.received >= 11_900, "{r:?}");

    // The installation moves up to PostgreSQL while the controller is down (`patronus
    // controller migrate`), and the controller comes back on it at the same address: the edges
    // find it by themselves and are online again.
    let pg = patronus_lab::postgres::Postgres::start().unwrap();
    pg.create_database("patronus").unwrap();
    let database = pg.socket_url("patronus");
    let out = Command::new(patronus())
        .args(["controller", "migrate", "--data-dir"])
        .arg(&state)
        .env("PATRONUS_MIGRATE_TO", &database)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = Command::new(patronus());
    cmd.args([
        "controller",
        "--listen",
        &format!("{ctl}:8080"),
        "--data-dir",
    ])
    .arg(&state)
    .env("PATRONUS_DATABASE", &database);
    let log = std::fs::File::create(run.join("controller-2.log")).unwrap();
    lab.spawn_logged("controller", cmd, log).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out, _) = cli(&lab, &home, &["site", "list", "--output", "json"], "");
        if ok {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let items = v["items"].as_array().unwrap();
            if items.len() == 3 && items.iter().all(|s| s["online"] == true) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the edges did not come back: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Everything from before is there, the same: the sites at their versions, every failover,
    // the path's history, the webhooks, the policies (with what was added since, such as the
    // failover hq made headless).
    let sites_after = versions(&json_of);
    assert_eq!(sites_after, sites_before);
    let now = history(&json_of);
    for (before, after) in kept.iter().zip(&now) {
        for item in before {
            let same = after.iter().find(|a| a["id"] == item["id"]);
            assert_eq!(same, Some(item), "lost or changed by the move");
        }
    }
    eprintln!(
        "moved to PostgreSQL: {} sites, {} failovers, {} events of {mpls_path}, {} webhooks, {} policies",
        sites_after.len(),
        now[0].len(),
        now[1].len(),
        now[2].len(),
        now[3].len()
    );
    lab.down().unwrap();
}

/// How many configurations edge `site` has taken from its controllers so far (its log).
fn configurations(lab: &Lab, site: &str) -> usize {
    std::fs::read_to_string(edges::edge_dir(lab, site).join("edge.log"))
        .unwrap_or_default()
        .matches("edge: new configuration")
        .count()
}

/// Edge `site`'s log lines saying its control connection moved, oldest first.
fn moves(lab: &Lab, site: &str) -> Vec<String> {
    std::fs::read_to_string(edges::edge_dir(lab, site).join("edge.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("control connection moved"))
        .map(str::to_owned)
        .collect()
}

/// Three controllers over one PostgreSQL (a throwaway server on a Unix socket, which every
/// namespace reaches), all serving; each edge lists the three, a different one first. A write
/// on the first controller reaches every edge, held by any of them; then the controller of
/// branch1's edge is killed outright (SIGKILL) in the middle of a stream through branch1: the
/// edge is on another controller within 5 s and the stream loses nothing; a second write
/// reaches every edge again. Then the controller branch2's edge (and now branch1's) is on is
/// killed the same way: both move to the last one, and a third write reaches all three. In
/// between, a fourth controller is killed in the middle of a burst of webhook events (see
/// [`webhook_burst_survives_its_deliverer_killed`]); before the sites are made, tokens and
/// sessions are shown to be shared ([`sessions_are_shared`]).
fn edges_spread_over_three_controllers_follow_a_write_and_survive_their_controller_killed() {
    let lab = Lab::up(&Topology::three_sites_mixed(), LabOptions::default()).unwrap();
    let run: PathBuf = patronus_lab::lab::run_dir(lab.run_id());
    let plan = lab.plan().clone();
    let ctl = lab.addr("controller", false).unwrap();
    let pg = patronus_lab::postgres::Postgres::start().unwrap();
    pg.create_database("patronus").unwrap();
    let database = pg.socket_url("patronus");
    // The edges' three, and a fourth that no edge lists: the webhook burst's.
    let urls: Vec<String> = (0..4)
        .map(|i| format!("https://{ctl}:{}", 8080 + i))
        .collect();

    // Four controllers, one data directory (the signing key) and one database; the first
    // makes the schema and the first admin.
    let state = run.join("controller");
    let mut controllers = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let mut cmd = Command::new(patronus());
        cmd.args([
            "controller",
            "--listen",
            url.trim_start_matches("https://"),
            "--data-dir",
        ])
        .arg(&state)
        .env("PATRONUS_DATABASE", &database)
        .env("PATRONUS_ADMIN_EMAIL", "admin@example.net")
        .env("PATRONUS_WEBHOOK_ALLOWED_NETWORKS", format!("{ctl}/32"));
        let log = std::fs::File::create(run.join(format!("controller{i}.log"))).unwrap();
        controllers.push(lab.spawn_logged("controller", cmd, log).unwrap());
        // Each logs in once it serves (the first also made the password, and the certificate
        // in the data directory that all four serve).
        let home = run.join(format!("cli{i}"));
        login_admin(&lab, &home, url, &state);
    }
    let home = run.join("cli0");
    let password = std::fs::read_to_string(state.join("initial-admin-password")).unwrap();
    let fp = fingerprint(&state);
    sessions_are_shared(&lab, &urls, &fp, password.trim());

    create_sites(&lab, &home);
    // Edge i lists controller i first (so each edge is held by a different one).
    for (i, s) in plan.sites.iter().enumerate() {
        let (ok, token, err) = cli(&lab, &home, &["site", "enroll-token", s.name.as_str()], "");
        assert!(ok, "{err}");
        let mut local = edges::local_config(
            &plan,
            i,
            &urls[i],
            edges::edge_dir(&lab, s.name.as_str()).join("state"),
        );
        local.controller =
            patronus_api::ControllerUrls::new((0..3).map(|k| urls[(i + k) % 3].clone()).collect())
                .unwrap();
        local.ca_fingerprint = vec![fp.clone()];
        edges::controller_edge(
            &lab,
            patronus(),
            s.name.as_str(),
            &local,
            "enroll",
            Some(token.trim()),
        )
        .unwrap();
        edges::controller_edge(&lab, patronus(), s.name.as_str(), &local, "run", None).unwrap();
    }
    for (from, to) in [
        ("hq/h1", "branch1/h1"),
        ("hq/h1", "branch2/h1"),
        ("branch1/h1", "branch2/h1"),
    ] {
        let dst = lab.addr(to, false).unwrap();
        edges::wait_for_tunnel(&lab, from, dst, Duration::from_secs(20)).unwrap();
    }

    // A write on the first controller (a link added to hq, which changes every site's
    // configuration) reaches every edge, whichever controller holds it.
    let write_reaches_all = |link: &str, what: &str| {
        let held = || -> Vec<usize> {
            plan.sites
                .iter()
                .map(|s| configurations(&lab, s.name.as_str()))
                .collect()
        };
        let before = held();
        let (ok, _, err) = cli(
            &lab,
            &home,
            &["link", "add", "hq", link, "--kind", "lte"],
            "",
        );
        assert!(ok, "{err}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = held();
            if now.iter().zip(&before).all(|(n, b)| n > b) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: configurations {before:?} -> {now:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    write_reaches_all("spare", "the first write");
    assert!(
        plan.sites
            .iter()
            .all(|s| moves(&lab, s.name.as_str()).is_empty())
    );

    webhook_burst_survives_its_deliverer_killed(&lab, &run, &home, controllers[3], ctl);

    // branch1's controller (the second) is killed in the middle of a stream through branch1.
    kill_under_stream(
        &lab,
        controllers[1],
        &urls[1],
        "branch1",
        &["branch1"],
        46100,
    );
    // The others stayed where they were; a second write reaches all three again.
    assert!(moves(&lab, "hq").is_empty() && moves(&lab, "branch2").is_empty());
    write_reaches_all("spare2", "the write after the kill");

    // Then the third, which holds branch2's edge and now branch1's too: both move (to the
    // first, the one left), a stream through branch2 loses nothing, and a write reaches all.
    kill_under_stream(
        &lab,
        controllers[2],
        &urls[2],
        "branch2",
        &["branch2", "branch1"],
        46200,
    );
    assert_eq!(moves(&lab, "branch1").len(), 2);
    assert_eq!(moves(&lab, "branch2").len(), 1);
    assert!(moves(&lab, "hq").is_empty());
    write_reaches_all("spare3", "the write after the second kill");

    // Every acknowledged write survived both kills, and the one controller left shows every
    // site online (the edges that moved kept them so; nothing announced them offline).
    let (ok, out, err) = cli(&lab, &home, &["link", "list", "hq", "--output", "json"], "");
    assert!(ok, "{err}");
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = links["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    for l in ["spare", "spare2", "spare3"] {
        assert!(names.contains(&l), "{l} lost: {names:?}");
    }
    let (ok, out, err) = cli(&lab, &home, &["site", "list", "--output", "json"], "");
    assert!(ok, "{err}");
    let sites: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        sites["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["online"] == true),
        "{sites}"
    );
}

/// One HTTP/1.1 request to the controller at `url` (in the lab's controller namespace), over
/// TLS trusting only the certificate with fingerprint `pin`: (status, JSON body or `Null`).
fn http_in(
    lab: &Lab,
    url: &str,
    pin: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let tcp = patronus_lab::netns::run_in(&lab.ns("controller").unwrap(), || {
        std::net::TcpStream::connect(addr).map_err(|e| patronus_lab::netns::NetnsError::Enter {
            name: "controller".into(),
            message: format!("connecting to {addr}: {e}"),
        })
    })
    .unwrap();
    let config = patronus_controller::tls::pinned_client_config(vec![
        patronus_controller::tls::parse_fingerprint(pin).unwrap(),
    ])
    .unwrap();
    let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        // A close without close_notify after the whole answer.
        assert!(
            e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty(),
            "{e}"
        );
    }
    let got = String::from_utf8_lossy(&raw);
    let status = got.split(' ').nth(1).unwrap().parse().unwrap();
    let json = got
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// A token issued by the first controller is good on the third; a refresh token rotated on
/// the first and replayed on the second ends the session on all of them.
fn sessions_are_shared(lab: &Lab, urls: &[String], pin: &str, password: &str) {
    let (status, login) = http_in(
        lab,
        &urls[0],
        pin,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(serde_json::json!({ "email": "admin@example.net", "password": password })),
    );
    assert_eq!(status, 200, "{login}");
    let access = login["access_token"].as_str().unwrap();
    let refresh1 = login["refresh_token"].as_str().unwrap();
    let (status, sites) = http_in(
        lab,
        &urls[2],
        pin,
        "GET",
        "/api/v1/sites",
        Some(access),
        None,
    );
    assert_eq!(status, 200, "a token from the first on the third: {sites}");
    let refresh = |url: &str, token: &str| {
        http_in(
            lab,
            url,
            pin,
            "POST",
            "/api/v1/auth/refresh",
            None,
            Some(serde_json::json!({ "refresh_token": token })),
        )
    };
    let (status, rotated) = refresh(&urls[0], refresh1);
    assert_eq!(status, 200, "{rotated}");
    let refresh2 = rotated["refresh_token"].as_str().unwrap();
    // The old one replayed on the second: refused, and the session it belongs to is over,
    // so the token it was rotated into is refused on the third.
    let (status, replay) = refresh(&urls[1], refresh1);
    assert_eq!(status, 401, "a replayed refresh token: {replay}");
    let (status, after) = refresh(&urls[2], refresh2);
    assert_eq!(status, 401, "the session after a replay: {after}");
}

/// A burst of 30 `ping` events for one webhook, asked of the fourth controller (its CLI home
/// `cli3`), at a receiver that holds each request 500 ms: once ten are asked and deliveries are
/// in flight, the fourth is killed (SIGKILL) and the rest are asked of the first. Every
/// controller delivers (each delivery claimed by one, with a lease): every event reaches the
/// receiver under its one delivery id (one per webhook, not one per controller), all are
/// recorded delivered, and only a delivery in flight when the controller died may be posted
/// twice (same delivery id: a receiver that keeps the ids it has seen gets each once).
fn webhook_burst_survives_its_deliverer_killed(
    lab: &Lab,
    run: &Path,
    home: &Path,
    fourth: u32,
    ctl: std::net::IpAddr,
) {
    const EVENTS: usize = 30;
    let receiver = patronus_lab::webhook::Receiver::start_holding(
        &lab.ns("controller").unwrap(),
        std::net::SocketAddr::new(ctl, 0),
        Duration::from_millis(500),
    )
    .unwrap();
    let (ok, out, err) = cli(
        lab,
        home,
        &[
            "webhook",
            "create",
            &receiver.url(),
            "--event",
            "failover",
            "--output",
            "json",
        ],
        "",
    );
    assert!(ok, "{err}");
    let hook = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].to_string();
    let mut on = run.join("cli3");
    let mut in_flight = None;
    for i in 0..EVENTS {
        let (ok, _, err) = cli(lab, &on, &["webhook", "ping", &hook], "");
        assert!(ok, "ping {i}: {err}");
        if in_flight.is_none() && i >= 9 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while receiver.in_flight() < 2 {
                assert!(Instant::now() < deadline, "nothing delivered in 30 s");
                std::thread::sleep(Duration::from_millis(5));
            }
            let answered = receiver.answered();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(fourth as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            // Posted by the time it was dead and not answered before: the only deliveries
            // the receiver may see twice.
            in_flight = Some(receiver.received().len() - answered);
            on = home.to_path_buf();
        }
    }
    let in_flight = in_flight.unwrap();

    // All recorded delivered, by the controllers left (within the lease of those the fourth
    // had claimed).
    let deadline = Instant::now() + Duration::from_secs(90);
    let deliveries = loop {
        let (ok, out, err) = cli(
            lab,
            home,
            &[
                "webhook",
                "deliveries",
                &hook,
                "--event",
                "ping",
                "--output",
                "json",
            ],
            "",
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let items = v["items"].as_array().unwrap().clone();
        if items.len() == EVENTS && items.iter().all(|d| d["status"] == "delivered") {
            break items;
        }
        assert!(Instant::now() < deadline, "not all delivered: {v}");
        std::thread::sleep(Duration::from_millis(500));
    };
    // Counted at the receiver (the pings: a failover meanwhile would be the webhook's too).
    let posts: Vec<_> = receiver
        .received()
        .into_iter()
        .filter(|p| p.json()["type"] == "ping")
        .collect();
    let mut by_event: std::collections::HashMap<String, std::collections::HashSet<String>> =
        std::collections::HashMap::new();
    for p in &posts {
        let event = p.json()["id"].as_str().unwrap_or_default().to_owned();
        let delivery = p
            .header("x-patronus-delivery")
            .unwrap_or_default()
            .to_owned();
        by_event.entry(event).or_default().insert(delivery);
    }
    assert_eq!(by_event.len(), EVENTS, "{by_event:?}");
    for d in &deliveries {
        let event = d["event_id"].as_str().unwrap();
        let ids = by_event
            .get(event)
            .unwrap_or_else(|| panic!("{event} never arrived"));
        assert_eq!(
            ids.iter().cloned().collect::<Vec<_>>(),
            [d["id"].to_string()],
            "{event}"
        );
    }
    let again = posts.len() - EVENTS;
    assert!(
        again <= in_flight,
        "{again} posted twice, {in_flight} in flight at the kill"
    );
    eprintln!(
        "webhook burst: {EVENTS} events, {} posts, {again} posted again after the kill with {in_flight} in flight",
        posts.len()
    );
}

/// Kills controller `pid` (at `url`; SIGKILL) one second into a stream from hq/h1 to `to`'s
/// host, then waits for each edge of `movers` to move its control connection off `url`
/// (within 5 s of the kill), and checks that the stream lost nothing from shortly before the
/// kill to its end.
fn kill_under_stream(lab: &Lab, pid: u32, url: &str, to: &str, movers: &[&str], port: u16) {
    let dst = lab.addr(&format!("{to}/h1"), false).unwrap();
    let (from_ns, to_ns) = (
        lab.ns("hq/h1").unwrap(),
        lab.ns(&format!("{to}/h1")).unwrap(),
    );
    let before: Vec<usize> = movers.iter().map(|m| moves(lab, m).len()).collect();
    let started = Instant::now();
    let (r, killed_after) = std::thread::scope(|sc| {
        let stream = sc.spawn(|| {
            let cfg = patronus_lab::stream::StreamConfig {
                rate_pps: 200,
                duration: Duration::from_secs(8),
                port,
                ..Default::default()
            };
            patronus_lab::stream::run(&from_ns, &to_ns, dst, &cfg).unwrap()
        });
        std::thread::sleep(Duration::from_secs(1));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let killed = Instant::now();
        for (m, n) in movers.iter().zip(&before) {
            loop {
                let now = moves(lab, m);
                if now.len() > *n {
                    let line = &now[*n];
                    assert!(line.contains(&format!("moved from {url} ")), "{line}");
                    eprintln!(
                        "{m}'s edge moved {:?} after the kill: {line}",
                        killed.elapsed()
                    );
                    break;
                }
                assert!(
                    killed.elapsed() < Duration::from_secs(5),
                    "{m}'s edge did not move within 5 s of its controller's kill"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        (stream.join().unwrap(), killed - started)
    });
    assert!(r.sent > 1000, "{r:?}");
    // Nothing lost from shortly before the kill to the end. (A loss in the stream's first
    // moments, right after the edges took a new configuration, is not the kill's: seen once,
    // 13 packets at the 5th, and none with the stream started 2 s later.)
    let kill_seq = killed_after.as_secs_f64() * 200.0;
    for g in &r.gaps {
        assert!(
            (g.first_seq + g.lost) as f64 <= kill_seq - 40.0,
            "lost around or after the kill (packet {kill_seq:.0}): {r:?}"
        );
    }
    if r.lost > 0 {
        eprintln!("lost before the kill: {:?}", r.gaps);
    }
}

/// `patronus bench dr` end to end (its own lab: a controller with scheduled backups to an S3
/// server, three sites, a writer and a stream): every drill recovers (the API answers with every
/// edge online and every path up again), the stream between the sites the drills do not touch
/// loses nothing, nothing acknowledged is lost but by the restores of a backup, and those lose
/// at most what the backup interval (60 s) and the scheduler's look (5 s) allow. Timings are
/// the bench's to report, not this test's to judge.
fn every_disaster_recovery_drill_recovers_without_losing_a_packet() {
    let out = Command::new(patronus())
        .args(["bench", "dr"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "bench dr failed");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let drills = r["drills"].as_array().unwrap();
    let names: Vec<&str> = drills
        .iter()
        .map(|d| d["drill"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "controller_killed",
            "database_corrupted",
            "machine_lost",
            "site_deleted",
            "edge_replaced",
            "secrets_rotated"
        ]
    );
    for d in drills {
        let name = d["drill"].as_str().unwrap();
        assert!(d["rto_s"].as_f64().is_some(), "{name} did not recover: {d}");
        let sent = d["data_plane"]["sent"].as_u64().unwrap();
        assert!(sent > 0, "{name}: no stream: {d}");
        assert_eq!(d["data_plane"]["lost"], 0, "{name} lost packets: {d}");
        let lost = d["rpo"]["writes_lost"].as_u64().unwrap();
        if matches!(name, "database_corrupted" | "machine_lost") {
            let rpo = d["rpo"]["rpo_s"].as_f64().unwrap();
            assert!(rpo <= 60.0 + 5.0 + 10.0, "{name}: RPO {rpo} s: {d}");
        } else {
            assert_eq!(lost, 0, "{name} lost acknowledged writes: {d}");
        }
    }
    assert!(r["backups_in_bucket"].as_u64().unwrap() >= 1);
}
