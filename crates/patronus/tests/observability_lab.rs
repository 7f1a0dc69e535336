//! The alert rules and dashboards of `deploy/` against a live lab scraped by a real Prometheus
//! (Debian's): a controller with TLS and scheduled backups, three edges enrolled through it,
//! traffic, a configuration change and a cut link. Every PromQL expression of every dashboard
//! and rule is evaluated and must return data (a query naming a metric nothing exports fails),
//! the cut makes the path-down alert fire within its `for` and a scrape, and `promtool check
//! metrics` reads the controller's and an edge's real `/metrics`. Runs on the lab's harness
//! (`patronus_lab::harness`): without root the test is counted as ignored, and
//! `PATRONUS_REQUIRE_LAB=1` makes that a failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use patronus_lab::edges;
use patronus_lab::{Lab, LabOptions, Topology};

mod lab_common;
use lab_common::{cli, create_sites, login_admin, patronus};

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "observability lab",
        vec![patronus_lab::lab_test!(
            prometheus_scrapes_the_lab_and_every_dashboard_and_rule_expression_has_data,
            needs "prometheus", "promtool", "curl"
        )],
    )
}

/// Scrape and rule evaluation interval of the test's Prometheus.
const STEP_S: u64 = 1;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Prometheus's HTTP API, asked from inside the controller's namespace.
struct Prom<'a> {
    lab: &'a Lab,
}

impl Prom<'_> {
    /// The answer, or why there is none (Prometheus not listening yet, a bad answer).
    fn try_get(&self, path: &str, query: Option<&str>) -> Result<serde_json::Value, String> {
        let mut cmd = self.lab.command("controller", "curl").unwrap();
        cmd.args(["-sS", "--max-time", "10", "-G"]);
        if let Some(q) = query {
            cmd.arg("--data-urlencode").arg(format!("query={q}"));
        }
        cmd.arg(format!("http://127.0.0.1:9090{path}"));
        let out = cmd.output().unwrap();
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "{path} {query:?}: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn get(&self, path: &str, query: Option<&str>) -> serde_json::Value {
        self.try_get(path, query).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The result of an instant query (panics on a query Prometheus refuses).
    fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let v = self.get("/api/v1/query", Some(q));
        assert_eq!(v["status"], "success", "{q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `q` returns data; the time it took.
    fn wait(&self, q: &str, patience: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if !self.query(q).is_empty() {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < patience,
                "no data for {q} in {patience:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Every metric a PromQL expression names (the identifiers the project or Prometheus exports).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    let mut in_braces = 0;
    let mut in_quotes = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if in_quotes {
            in_quotes = c != '"';
            continue;
        }
        match c {
            '"' => in_quotes = true,
            '{' => in_braces += 1,
            '}' => in_braces -= 1,
            _ => {}
        }
        if in_braces == 0 && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("patronus_") || word.starts_with("process_") || word == "up" {
            out.insert(std::mem::take(&mut word));
        }
        word.clear();
    }
    out
}

/// PromQL expressions, each with where it is.
type Exprs = Vec<(String, String)>;

/// Every PromQL expression of the dashboards (their panels' targets and variables' queries,
/// `$instance` for every edge), and of the alert rules, by where it is.
fn expressions() -> (Exprs, Exprs) {
    let mut dash = Vec::new();
    let dir = repo().join("deploy/grafana/dashboards");
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap().replace("$instance", ".+");
                dash.push((format!("{name}: {}", p["title"]), expr));
            }
        }
        for v in d["templating"]["list"].as_array().unwrap() {
            // label_values(METRIC, LABEL) is Grafana's: the metric must have the label.
            let q = v["query"]["query"].as_str().unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap();
            let (metric, label) = inner.rsplit_once(',').unwrap();
            dash.push((
                format!("{name}: variable {}", v["name"]),
                format!("count by ({}) ({metric})", label.trim()),
            ));
        }
    }
    // The rules: each `expr:` (one line, or the indented block under `expr: |`).
    let mut rules = Vec::new();
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let mut lines = text.lines().peekable();
    let mut alert = String::new();
    while let Some(l) = lines.next() {
        let t = l.trim();
        if let Some(a) = t.strip_prefix("- alert:") {
            alert = a.trim().to_owned();
        } else if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            let expr = if e == "|" {
                let mut block = String::new();
                while let Some(n) = lines.peek() {
                    if n.trim().is_empty()
                        || n.trim_start().starts_with("for:")
                        || n.trim_start().starts_with('#')
                    {
                        break;
                    }
                    block.push_str(n.trim());
                    block.push('\n');
                    lines.next();
                }
                block
            } else {
                e.to_owned()
            };
            rules.push((alert.clone(), expr));
        }
    }
    (dash, rules)
}

fn prometheus_scrapes_the_lab_and_every_dashboard_and_rule_expression_has_data() {
    let (dash, rules) = expressions();
    assert!(dash.len() >= 30 && rules.len() >= 15, "{dash:?} {rules:?}");

    let lab = Lab::up(&Topology::three_sites_mixed(), LabOptions::default()).unwrap();
    let run: PathBuf = patronus_lab::lab::run_dir(lab.run_id());
    let plan = lab.plan().clone();
    let ctl = lab.addr("controller", false).unwrap();
    let url = format!("https://{ctl}:8080");

    // The controller, with scheduled backups (their age is a dashboard panel and an alert).
    let state = run.join("controller");
    let identity = run.join("backup-identity");
    let out = Command::new(patronus())
        .args(["backup", "keygen", "--out"])
        .arg(&identity)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let recipient = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut cmd = Command::new(patronus());
    cmd.args([
        "controller",
        "--listen",
        &format!("{ctl}:8080"),
        "--data-dir",
    ])
    .arg(&state)
    .env("PATRONUS_ADMIN_EMAIL", "admin@example.net")
    .env("PATRONUS_BACKUP_DIR", run.join("backups"))
    .env("PATRONUS_BACKUP_RECIPIENTS", &recipient)
    .env("PATRONUS_BACKUP_INTERVAL_S", "3600");
    let log = std::fs::File::create(run.join("controller.log")).unwrap();
    lab.spawn_logged("controller", cmd, log).unwrap();
    let home = run.join("cli");
    let fp = login_admin(&lab, &home, &url, &state);
    create_sites(&lab, &home);

    // Each edge serves its metrics on its LTE link's address, where Prometheus (beside the
    // controller) reaches it over the lab's WAN (the link the test cuts is MPLS), to requests
    // with its metrics token.
    let prom_dir = run.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let edge_token = prom_dir.join("edge-token");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&edge_token)
            .unwrap();
        std::io::Write::write_all(&mut f, format!("{:032x}\n", rand_u128()).as_bytes()).unwrap();
    }
    let mut targets = Vec::new();
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
        let lte = s.links.iter().find(|l| l.name.as_str() == "lte").unwrap();
        let metrics = std::net::SocketAddr::from((lte.local4(), edges::STATUS_PORT));
        local.metrics_listen = Some(metrics);
        local.metrics_token_file = Some(edge_token.clone());
        targets.push(metrics.to_string());
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
    let b1 = lab.addr("branch1/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "hq/h1", b1, Duration::from_secs(30)).unwrap_or_else(|e| {
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

    // Prometheus, as an operator would run it: the shipped rules, the controller scraped over
    // TLS (its certificate as the CA) with a viewer's API key, the edges in the clear.
    let (ok, key, err) = cli(
        &lab,
        &home,
        &["api-key", "create", "prometheus", "--role", "viewer"],
        "",
    );
    assert!(ok, "{err}");
    let key_file = prom_dir.join("api-key");
    std::fs::write(&key_file, key.trim()).unwrap();
    std::fs::copy(
        repo().join("deploy/prometheus/alerts.yml"),
        prom_dir.join("alerts.yml"),
    )
    .unwrap();
    let config = format!(
        "global:\n  scrape_interval: {STEP_S}s\n  evaluation_interval: {STEP_S}s\n\
         rule_files: [alerts.yml]\n\
         scrape_configs:\n\
         \x20 - job_name: patronus-controller\n    scheme: https\n\
         \x20   authorization: {{type: Bearer, credentials_file: {key}}}\n\
         \x20   tls_config: {{ca_file: {ca}}}\n\
         \x20   static_configs: [{{targets: [\"{ctl}:8080\"]}}]\n\
         \x20 - job_name: patronus-edge\n\
         \x20   authorization: {{type: Bearer, credentials_file: {edge_token}}}\n\
         \x20   static_configs: [{{targets: [{edges}]}}]\n",
        key = key_file.display(),
        edge_token = edge_token.display(),
        ca = state.join("tls/cert.pem").display(),
        edges = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", "),
    );
    std::fs::write(prom_dir.join("prometheus.yml"), &config).unwrap();
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(prom_dir.join("prometheus.yml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{config}\n{out:?}");
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        prom_dir.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        prom_dir.join("data").display()
    ))
    .arg("--web.listen-address=127.0.0.1:9090");
    let log = std::fs::File::create(prom_dir.join("prometheus.log")).unwrap();
    lab.spawn_logged("controller", cmd, log).unwrap();
    let prom = Prom { lab: &lab };
    let started = Instant::now();
    loop {
        let up = prom.try_get("/api/v1/query", Some("sum(up)")).ok();
        let n = up
            .as_ref()
            .and_then(|r| r["data"]["result"].get(0))
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok());
        if n == Some(4.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "targets not all up: {:?}\n{}",
            prom.try_get("/api/v1/targets", None),
            std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The container image's health check: `patronus controller ready` with the controller's
    // own configuration asks its /ready over the certificate it serves; where no controller
    // answers, it fails.
    let ready = |port: u16| {
        let mut cmd = lab
            .command("controller", patronus().to_str().unwrap())
            .unwrap();
        cmd.args(["controller", "ready", "--listen", &format!("{ctl}:{port}")])
            .arg("--data-dir")
            .arg(&state);
        cmd.output().unwrap()
    };
    let out = ready(8080);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ready",
        "{out:?}"
    );
    let out = ready(8081);
    assert!(!out.status.success(), "{out:?}");

    // `promtool check metrics` on what the controller and an edge really serve.
    let fetch = |args: &[&str]| {
        let mut cmd = lab.command("controller", "curl").unwrap();
        cmd.args(["-sSf", "--max-time", "10"]).args(args);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let ca = state.join("tls/cert.pem").display().to_string();
    let controller_metrics = fetch(&[
        "--cacert",
        &ca,
        "-H",
        &format!("Authorization: Bearer {}", key.trim()),
        &format!("{url}/metrics"),
    ]);
    patronus_lab::harness::promtool_accepts(&controller_metrics);
    let token = std::fs::read_to_string(&edge_token).unwrap();
    let edge_metrics = fetch(&[
        "-H",
        &format!("Authorization: Bearer {}", token.trim()),
        &format!("http://{}/metrics", targets[0]),
    ]);
    patronus_lab::harness::promtool_accepts(&edge_metrics);
    // Without the token, the edge answers nothing but 401.
    let mut cmd = lab.command("controller", "curl").unwrap();
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ])
    .arg(format!("http://{}/metrics", targets[0]));
    let code = cmd.output().unwrap();
    assert_eq!(String::from_utf8_lossy(&code.stdout), "401");

    // A configuration change the edges wait for (a push), and a stream on hq's MPLS path cut
    // under it (a failover; traffic counted per class).
    let (ok, _, err) = cli(
        &lab,
        &home,
        &[
            "policy",
            "create",
            r#"{"name":"voice","order":10,"class":"realtime","match":{"protocol":"udp"}}"#,
        ],
        "",
    );
    assert!(ok, "{err}");
    let (from_ns, to_ns) = (lab.ns("hq/h1").unwrap(), lab.ns("branch1/h1").unwrap());
    let path_down = "patronus_path_up{job=\"patronus-edge\",peer=\"branch1\",local_link=\"mpls\",remote_link=\"mpls\"} == 0";
    let (cut_at, true_after) = std::thread::scope(|sc| {
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
        let cut_at = Instant::now();
        // The path-down expression holds within a detection and a scrape...
        let true_after = prom.wait(path_down, Duration::from_secs(30));
        assert!(run.join().unwrap().received > 0);
        (cut_at, true_after)
    });
    // ...and the alert fires within its `for` (1 minute) after that, and a rule evaluation.
    let firing = "ALERTS{alertname=\"PatronusPathDown\",alertstate=\"firing\",peer=\"branch1\",local_link=\"mpls\"}";
    let fired_after = cut_at.elapsed() + prom.wait(firing, Duration::from_secs(120));
    eprintln!(
        "the cut of hq/mpls: the path-down expression true after {:.1} s, PatronusPathDown firing after {:.1} s (for: 60 s, scrape and evaluation every {STEP_S} s)",
        true_after.as_secs_f64(),
        fired_after.as_secs_f64()
    );
    assert!(
        fired_after <= true_after + Duration::from_secs(60 + 2 * STEP_S + 2),
        "fired {fired_after:?} after the cut, the expression true after {true_after:?}"
    );

    // Every dashboard query returns data (with hq's MPLS paths still down: a table shows the
    // paths down or degraded), and every metric every rule names is exported.
    let mut missing = Vec::new();
    for (what, expr) in &dash {
        if prom.query(expr).is_empty() {
            missing.push(format!("{what}: {expr}"));
        }
    }
    for (alert, expr) in &rules {
        // The expression is valid PromQL (empty while the alert is quiet)...
        prom.query(expr);
        // ...and names no metric that nothing exports.
        for m in metric_names(expr) {
            if prom
                .query(&format!("count({{__name__=\"{m}\"}})"))
                .is_empty()
            {
                missing.push(format!("{alert}: {m} (in {expr})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queries without data:\n{}\ncontroller metrics:\n{controller_metrics}",
        missing.join("\n")
    );
    eprintln!(
        "{} dashboard queries and the metrics of {} rules: all with data",
        dash.len(),
        rules.len()
    );
    lab.link_command("hq/mpls", &["restore"]).unwrap();
    lab.down().unwrap();
}

/// 128 random bits (the edges' metrics token).
fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    u128::from_le_bytes(b)
}
