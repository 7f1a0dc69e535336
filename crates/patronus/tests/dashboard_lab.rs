//! The dashboard in a real browser against the real demo: `patronus lab demo --no-schedule`
//! (three sites, their edges enrolled, streams running), Debian's headless Chromium driven over
//! WebDriver (`browser`). Logs in, finds the three sites on the overview, cuts a link with
//! `patronus lab link` and waits for its paths to turn red on the topology page without a
//! reload (within 2 s), restores it, checks that a forged post is refused, that a viewer has
//! no write control and cannot post, that logout ends the session on the server, that the
//! pages fit a phone's width, and that the browser's console has no CSP violation or error.
//! Saves a screenshot of each page (`PATRONUS_SCREENSHOTS=docs/screenshots` writes the README's).
//! Runs on the lab's harness: without root it is counted as ignored, and
//! `PATRONUS_REQUIRE_LAB=1` makes that a failure.
#![allow(clippy::unwrap_used)]

mod browser;
mod lab_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use browser::Browser;
use lab_common::demo::{lab_link, start_demo};
use serde_json::{Value, json};

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "dashboard lab",
        vec![patronus_lab::lab_test!(
            the_dashboard_shows_the_lab_live_and_keeps_each_role_to_its_rights
        )],
    )
}

/// Where screenshots go: `PATRONUS_SCREENSHOTS` (the README's: `docs/screenshots`, from the
/// repository's root), or the test's own directory under `target/`.
fn shots_dir() -> PathBuf {
    let dir = match std::env::var_os("PATRONUS_SCREENSHOTS") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../..")
                    .join(d)
            }
        }
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn shot(b: &Browser, name: &str) {
    let png = b.screenshot().unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    let path = shots_dir().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

/// Nothing the console holds is a CSP violation or an error (a CSP violation is logged as an
/// error, "Refused to ... because it violates the following Content Security Policy").
/// `allowed`: the failures the test caused on purpose (its forged posts' 403s).
fn console_clean(b: &Browser, after: &str, allowed: &[&str]) {
    let entries = b.console().unwrap();
    let bad: Vec<&Value> = entries
        .iter()
        .filter(|e| {
            let m = e["message"].as_str().unwrap_or("");
            let csp = m.contains("Content Security Policy") || m.contains("Refused to");
            csp || (e["level"] == "SEVERE" && !allowed.iter().any(|a| m.contains(a)))
        })
        .collect();
    assert!(bad.is_empty(), "after {after}, the console says: {bad:?}");
}

fn login(b: &Browser, url: &str, email: &str, password: &str) {
    b.goto(&format!("{url}/ui/login")).unwrap();
    let e = b.find("input[name=email]").unwrap();
    b.type_into(&e, email).unwrap();
    let p = b.find("input[name=password]").unwrap();
    b.type_into(&p, password).unwrap();
    b.click(&b.find("form.login button").unwrap()).unwrap();
    b.wait_for(
        "return location.pathname === '/ui/' && document.readyState === 'complete'",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("login as {email}: {e}; at {}", b.url().unwrap()));
}

/// The script that tells whether every path with `link` at one end is in one of `states`,
/// on the topology's drawing and its table alike.
fn paths_of_link_are(link: &str, states: &[&str]) -> String {
    format!(
        "const rows = [...document.querySelectorAll('table.paths tr[data-path]')]
             .filter(r => r.cells[0].textContent.split(' ↔ ').includes({link:?}));
         if (rows.length === 0) return false;
         const ok = {states:?};
         return rows.every(r => {{
             const id = r.getAttribute('data-path');
             const drawn = [...document.querySelectorAll('svg.topology path.p')]
                 .filter(p => p.getAttribute('data-path') === id);
             return drawn.length === 1 && ok.includes(drawn[0].getAttribute('data-state'));
         }});"
    )
}

/// Waits until `script` returns true, loading the page again every 2 s while it does not.
fn wait_reloading(b: &Browser, script: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        if b.wait_for(script, Duration::from_secs(2)).is_ok() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "not true after {timeout:?}: {script}"
        );
        b.goto(&b.url().unwrap()).unwrap();
    }
}

/// `fetch` in the page: the status of a form post to `path` with `fields`.
fn post_status(b: &Browser, path: &str, fields: &Value) -> i64 {
    b.eval_async(
        "const done = arguments[arguments.length - 1];
         fetch(arguments[0], { method: 'POST', body: new URLSearchParams(arguments[1]),
                               credentials: 'same-origin', redirect: 'manual' })
           .then(r => done(r.status), e => done(String(e)));",
        &[json!(path), fields.clone()],
    )
    .unwrap()
    .as_i64()
    .unwrap_or(-1)
}

fn the_dashboard_shows_the_lab_live_and_keeps_each_role_to_its_rights() {
    let demo = start_demo();
    let url = demo.url.clone();
    let b = Browser::start(1280, 800).unwrap();

    // Log in; the overview lists the lab's three sites, and (once the edges report) all online.
    b.goto(&format!("{url}/ui/")).unwrap();
    assert_eq!(
        b.eval("return location.pathname", &[]).unwrap(),
        "/ui/login",
        "a page without a session goes to the login"
    );
    shot(&b, "login");
    login(&b, &url, "admin@example.net", &demo.password);
    let sites = b
        .eval(
            "return [...document.querySelectorAll('#sites tr[data-site]')].map(r => r.getAttribute('data-site')).sort()",
            &[],
        )
        .unwrap();
    assert_eq!(sites, json!(["branch1", "branch2", "hq"]));
    wait_reloading(
        &b,
        "return document.querySelector('#summary .big').textContent.trim() === '3 / 3'",
        Duration::from_secs(60),
    );
    b.wait_for(
        "return document.getElementById('live').getAttribute('data-state') === 'on'",
        Duration::from_secs(10),
    )
    .unwrap();
    shot(&b, "overview");
    console_clean(&b, "the overview", &[]);

    // The topology: hq's MPLS paths up (or degraded: meeting no class's SLA is still a
    // working path) before the cut.
    b.goto(&format!("{url}/ui/topology")).unwrap();
    b.wait_for(
        "return document.getElementById('live').getAttribute('data-state') === 'on'",
        Duration::from_secs(10),
    )
    .unwrap();
    // Until the edges have measured them (a reload now and then: the live updates are what
    // the cut below tests).
    wait_reloading(
        &b,
        &paths_of_link_are("hq/mpls", &["up", "degraded"]),
        Duration::from_secs(90),
    );
    b.wait_for(
        "return document.getElementById('live').getAttribute('data-state') === 'on'",
        Duration::from_secs(10),
    )
    .unwrap();
    shot(&b, "topology");
    // A mark on the page: it is still there after the cut if the page was not reloaded.
    b.eval("window.__mark = 'no reload'; return true", &[])
        .unwrap();

    let cut = Instant::now();
    lab_link(&demo, "hq/mpls", "cut");
    let red = b
        .wait_for(
            &paths_of_link_are("hq/mpls", &["down"]),
            Duration::from_secs(2).saturating_sub(cut.elapsed()),
        )
        .unwrap_or_else(|e| panic!("hq/mpls's paths not red within 2 s of the cut: {e}"));
    let red = cut.elapsed().max(red);
    eprintln!(
        "hq/mpls cut: its paths red on the topology {} ms after the cut",
        red.as_millis()
    );
    assert_eq!(
        b.eval("return window.__mark", &[]).unwrap(),
        "no reload",
        "the page was reloaded"
    );
    shot(&b, "topology-cut");

    lab_link(&demo, "hq/mpls", "restore");
    let back = Instant::now();
    b.wait_for(
        &paths_of_link_are("hq/mpls", &["up", "degraded"]),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("hq/mpls's paths not back after the restore: {e}"));
    eprintln!(
        "hq/mpls restored: its paths back on the topology {} ms after",
        back.elapsed().as_millis()
    );
    assert_eq!(b.eval("return window.__mark", &[]).unwrap(), "no reload");
    console_clean(&b, "the topology's live updates", &[]);

    // Every page, with a screenshot.
    let hq = b
        .eval(
            "return [...document.querySelectorAll('svg.topology a')].map(a => a.getAttribute('href')).find(h => h.startsWith('/ui/sites/'))",
            &[],
        )
        .unwrap();
    let site_page = hq.as_str().unwrap().to_owned();
    b.goto(&format!("{url}{site_page}")).unwrap();
    let charts = b
        .eval(
            "return document.querySelectorAll('svg.chart, p.nodata').length",
            &[],
        )
        .unwrap();
    assert!(
        charts.as_i64().unwrap() >= 1,
        "the site's paths have charts: {charts}"
    );
    shot(&b, "site");
    let path_page = b
        .eval(
            "return document.querySelector('.chart h3 a').getAttribute('href')",
            &[],
        )
        .unwrap();
    b.goto(&format!("{url}{}", path_page.as_str().unwrap()))
        .unwrap();
    b.wait_for(
        "return document.querySelectorAll('svg.chart').length === 3",
        Duration::from_secs(5),
    )
    .unwrap();
    shot(&b, "path");
    b.goto(&format!("{url}/ui/events")).unwrap();
    let kinds = b
        .eval(
            "return [...document.querySelectorAll('ul.events li')].map(l => l.getAttribute('data-kind'))",
            &[],
        )
        .unwrap();
    assert!(
        kinds.as_array().unwrap().iter().any(|k| k == "path.down"),
        "the cut is among the events: {kinds}"
    );
    assert!(
        b.eval("return document.getElementById('audit') !== null", &[])
            .unwrap()
            == true
    );
    shot(&b, "events");
    b.goto(&format!("{url}/ui/config")).unwrap();
    shot(&b, "config");
    console_clean(&b, "every page", &[]);

    // A forged post (a form of this origin without the session's token) is refused.
    let forged = post_status(
        &b,
        "/ui/do/site-create",
        &json!({ "name": "forged", "lan_prefixes": "10.99.0.0/24" }),
    );
    assert_eq!(forged, 403, "a post without the CSRF token");

    // A viewer, made through the API with the admin's token.
    let made = b
        .eval_async(
            "const done = arguments[arguments.length - 1];
             (async () => {
               const login = await fetch('/api/v1/auth/login', { method: 'POST',
                 headers: { 'content-type': 'application/json' },
                 body: JSON.stringify({ email: 'admin@example.net', password: arguments[0] }) });
               const t = (await login.json()).access_token;
               const r = await fetch('/api/v1/users', { method: 'POST',
                 headers: { 'content-type': 'application/json', authorization: 'Bearer ' + t },
                 body: JSON.stringify({ email: 'viewer@example.net', role: 'viewer',
                                        password: 'Watch-Only-Pass-42' }) });
               return r.status;
             })().then(done, e => done(String(e)));",
            &[json!(demo.password)],
        )
        .unwrap();
    assert_eq!(made, 201);

    // Logout ends the session on the server: the old cookie, put back, is refused.
    let old = b
        .cookies()
        .unwrap()
        .into_iter()
        .find(|c| c["name"] == "patronus_session")
        .unwrap();
    assert_eq!(old["httpOnly"], true);
    assert_eq!(old["secure"], true);
    assert_eq!(old["sameSite"], "Strict");
    b.click(&b.find("form.logout button").unwrap()).unwrap();
    b.wait_for(
        "return location.pathname === '/ui/login'",
        Duration::from_secs(10),
    )
    .unwrap();
    b.add_cookie(
        &json!({ "name": "patronus_session", "value": old["value"], "path": "/ui",
                          "secure": true, "httpOnly": true, "sameSite": "Strict" }),
    )
    .unwrap();
    b.goto(&format!("{url}/ui/")).unwrap();
    assert_eq!(
        b.eval("return location.pathname", &[]).unwrap(),
        "/ui/login",
        "the ended session still opens pages"
    );

    // The viewer: no write control anywhere, and their own valid token does not make a post
    // theirs to make.
    login(&b, &url, "viewer@example.net", "Watch-Only-Pass-42");
    for page in [
        "/ui/",
        "/ui/topology",
        site_page.as_str(),
        "/ui/events",
        "/ui/config",
    ] {
        b.goto(&format!("{url}{page}")).unwrap();
        let writes = b
            .eval(
                "return document.querySelectorAll('form.write, form[action^=\"/ui/do/\"]').length",
                &[],
            )
            .unwrap();
        assert_eq!(writes, 0, "{page} has a write control for a viewer");
        assert_eq!(
            b.eval("return document.getElementById('audit') === null", &[])
                .unwrap(),
            true,
            "{page}: the audit log is the admins'"
        );
    }
    let csrf = b
        .eval(
            "return document.querySelector('form.logout input[name=csrf]').value",
            &[],
        )
        .unwrap();
    let status = post_status(
        &b,
        "/ui/do/site-create",
        &json!({ "csrf": csrf, "name": "by-viewer", "lan_prefixes": "10.98.0.0/24" }),
    );
    assert_eq!(status, 403, "a viewer's post");

    // A phone's width: nothing wider than the screen.
    b.resize(390, 844).unwrap();
    for (page, name) in [
        ("/ui/", "overview-narrow"),
        ("/ui/topology", "topology-narrow"),
    ] {
        b.goto(&format!("{url}{page}")).unwrap();
        let fits = b
            .eval(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1",
                &[],
            )
            .unwrap();
        assert_eq!(fits, true, "{page} is wider than a phone");
        shot(&b, name);
    }
    console_clean(
        &b,
        "the viewer's pages",
        &[
            "/ui/do/site-create - Failed to load resource: the server responded with a status of 403",
        ],
    );
    drop(b);
    let run_id = demo.run_id.clone();
    while let Ok(l) = demo.lines.try_recv() {
        eprintln!("{l}");
    }
    drop(demo);
    assert!(
        !patronus_lab::netns::list()
            .iter()
            .any(|n| n.contains(&run_id)),
        "the demo left its namespaces"
    );
}
