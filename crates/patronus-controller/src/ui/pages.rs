//! The dashboard's pages and forms. Each page reads what it shows from the API as its viewer
//! ([`Viewer::get`]); a write form posts to `/ui/do/{action}`, which checks the session's CSRF
//! token, turns the form into the API's JSON and calls the API: its answer, success or the
//! API's own error messages, is what the person sees.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use maud::{DOCTYPE, Markup, html};
use serde_json::{Value, json};

use super::{Answer, PageId, Ui, Viewer, forged, page_response, redirect, same, svg};
use crate::auth as a;
use crate::store::now_s;

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A time for people: `HH:MM:SS` UTC (the script shows it in the browser's zone), with the
/// date when it is not today.
pub fn when(ms: i64) -> Markup {
    let s = ms.div_euclid(1000);
    let (days, secs) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    let (y, m, d) = crate::backup::civil(days);
    let today = now_s().div_euclid(86_400) == days;
    let clock = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    let text = if today {
        format!("{clock} UTC")
    } else {
        format!("{y:04}-{m:02}-{d:02} {clock} UTC")
    };
    let iso = format!("{y:04}-{m:02}-{d:02}T{clock}Z");
    html! { time datetime=(iso) data-ms=(ms) { (text) } }
}

/// "12 s ago", "3 min ago", ...
fn ago(unix_s: i64) -> String {
    let d = (now_s() - unix_s).max(0);
    match d {
        0..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=172_799 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "–".to_owned(), |x| format!("{x:.digits$}"))
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut x = n;
    let mut u = 0;
    while x >= 1000.0 && u < UNITS.len() - 1 {
        x /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{x:.0} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// A path's state as the pages name it: `up`, `degraded`, `down`, or `unknown` (no recent
/// report).
pub fn state_of(p: &Value) -> &str {
    p["state"].as_str().unwrap_or("unknown")
}

fn items(v: &Option<Value>) -> Vec<Value> {
    v.as_ref()
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

/// Every page's `head`: the stylesheet, the icon, and (for pages with a session) the script.
fn head(title: &str, script: bool) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Patronus" }
            link rel="stylesheet" href="/ui/assets/app.css";
            link rel="icon" href="/ui/assets/icon.svg" type="image/svg+xml";
            @if script { script src="/ui/assets/app.js" defer {} }
        }
    }
}

/// The page around every page's content.
fn layout(v: &Viewer, title: &str, active: &str, body: Markup) -> Markup {
    let nav = [
        ("/ui/", "Overview"),
        ("/ui/topology", "Topology"),
        ("/ui/events", "Events"),
        ("/ui/config", "Policies & classes"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, true))
            body data-role=(v.role.as_str()) {
                header.top {
                    a.brand href="/ui/" { "Patronus" }
                    nav {
                        @for (href, name) in nav {
                            a href=(href) aria-current=[(href == active).then_some("page")] { (name) }
                        }
                    }
                    span #live .live data-state="off" title="Live updates" { "not live" }
                    span.who { (v.user.email) " · " (v.role.as_str()) }
                    form.logout method="post" action="/ui/logout" {
                        input type="hidden" name="csrf" value=(v.csrf);
                        button type="submit" { "Log out" }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

/// A page without a session (the login, errors).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, false))
            body.bare {
                main #main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// What a form's post left to say: the API's error, or nothing.
#[derive(Debug, Default)]
pub struct Notice {
    /// The form it is about (its `action`).
    pub action: String,
    pub lines: Vec<String>,
    /// What was typed, to fill the form again.
    pub values: HashMap<String, String>,
}

impl Notice {
    fn value<'a>(&'a self, action: &str, field: &str, default: &'a str) -> &'a str {
        if self.action == action {
            self.values.get(field).map_or(default, String::as_str)
        } else {
            default
        }
    }
}

fn notice_for(n: Option<&Notice>, action: &str) -> Markup {
    html! {
        @if let Some(n) = n.filter(|n| n.action == action) {
            div.error role="alert" {
                strong { "The controller refused this:" }
                ul { @for l in &n.lines { li { (l) } } }
            }
        }
    }
}

/// The hidden fields every write form carries.
fn form_head(v: &Viewer, back: &str) -> Markup {
    html! {
        input type="hidden" name="csrf" value=(v.csrf);
        input type="hidden" name="back" value=(back);
    }
}

// ----- login -----

#[derive(Debug, serde::Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

pub async fn login_page(State(ui): State<Ui>, Query(q): Query<LoginQuery>) -> Response {
    login_form(
        StatusCode::OK,
        None,
        q.next.as_deref(),
        "",
        ui.app.tls.get().is_some(),
    )
}

/// The login form, with a fresh CSRF token in it and in its cookie.
pub fn login_form(
    status: StatusCode,
    error: Option<&str>,
    next: Option<&str>,
    email: &str,
    tls: bool,
) -> Response {
    let token = a::b64url(&a::random_bytes::<24>());
    let next = super::after_login(next);
    let mut r = page_response(
        status,
        bare(
            "Log in",
            html! {
                form.login method="post" action="/ui/login" {
                    @if let Some(e) = error { div.error role="alert" { (e) } }
                    input type="hidden" name="csrf" value=(token);
                    input type="hidden" name="next" value=(next);
                    label { "Email" input type="email" name="email" value=(email) autocomplete="username" required autofocus; }
                    label { "Password" input type="password" name="password" autocomplete="current-password" required; }
                    button type="submit" { "Log in" }
                }
                p.hint { "The accounts and roles of the controller's API." }
            },
        ),
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        super::set_cookie(super::LOGIN_COOKIE, &token, 3600, tls),
    );
    r
}

// ----- overview -----

pub async fn overview(State(ui): State<Ui>, v: Viewer) -> Response {
    overview_page(&ui, &v, None).await
}

async fn overview_page(ui: &Ui, v: &Viewer, notice: Option<&Notice>) -> Response {
    let (sites, paths, traffic, failovers, breaches, version, ready) = tokio::join!(
        v.get(ui, "/api/v1/sites?limit=500"),
        v.get(ui, "/api/v1/paths?limit=500"),
        v.get(ui, "/api/v1/traffic/stats?by=class&limit=500"),
        v.get(ui, "/api/v1/failover/events?limit=10"),
        v.get(ui, "/api/v1/events?kind=sla.violated&limit=10"),
        v.get(ui, "/api/v1/version"),
        v.call(ui, Method::GET, "/ready", None, None),
    );
    let sites = items(&sites);
    let paths = items(&paths);
    let online = sites.iter().filter(|s| s["online"] == true).count();
    let mut by_state: [(&str, usize); 4] =
        [("up", 0), ("degraded", 0), ("down", 0), ("unknown", 0)];
    for p in &paths {
        let st = state_of(p);
        if let Some(e) = by_state.iter_mut().find(|(k, _)| *k == st) {
            e.1 += 1;
        }
    }
    let classes = by_class(&traffic);
    let empty = Notice::default();
    let body = html! {
        h1 { "Overview" }
        section #summary .cards data-live {
            div.card data-kind="sites" {
                h2 { "Sites online" }
                p.big { (online) " / " (sites.len()) }
            }
            div.card {
                h2 { "Paths" }
                ul.states {
                    @for (k, n) in by_state {
                        li data-state=(k) { span.dot {} (k) ": " strong { (n) } }
                    }
                }
            }
            div.card {
                h2 { "Controller" }
                p {
                    @if ready.ok() { span.ok { "database ready" } } @else { span.bad { "database not answering" } }
                }
                @if let Some(ver) = &version {
                    p.small { "version " (ver["version"].as_str().unwrap_or("?")) ", schema " (ver["schema_version"]) }
                }
            }
        }
        section #sites data-live {
            h2 { "Sites" }
            div.scroll {
                table {
                    thead { tr { th { "Site" } th { "Edge" } th { "Last contact" } th { "Version" } th { "Links" } th { "Paths up" } } }
                    tbody {
                        @for s in &sites {
                            @let id = s["id"].as_i64().unwrap_or(0);
                            @let name = s["name"].as_str().unwrap_or("?");
                            @let mine: Vec<&Value> = paths.iter().filter(|p| p["a"]["site_id"] == id || p["b"]["site_id"] == id).collect();
                            @let up = mine.iter().filter(|p| state_of(p) == "up").count();
                            tr data-site=(name) {
                                td { a href={ "/ui/sites/" (id) } { (name) } }
                                td { @if s["online"] == true { span.ok { "online" } } @else { span.bad { "offline" } } }
                                td { @match s["last_seen"].as_i64() { Some(t) => (ago(t)), None => "never" } }
                                td { (s["edge_version"].as_str().unwrap_or("–")) }
                                td { (s["links"].as_array().map_or(0, Vec::len)) }
                                td { (up) " / " (mine.len()) }
                            }
                        }
                        @if sites.is_empty() { tr { td colspan="6" { "No sites yet." } } }
                    }
                }
            }
        }
        section #traffic data-live {
            h2 { "Traffic by class, last hour" }
            @if classes.is_empty() {
                p.small { "No traffic reported in the last hour." }
            } @else {
                div.scroll { table {
                    thead { tr { th { "Class" } th.n { "Packets" } th.n { "Bytes" } } }
                    tbody { @for (c, p, b) in &classes { tr { td { (c) } td.n { (format!("{p:.0}")) } td.n { (bytes(*b)) } } } }
                } }
            }
        }
        section #recent .two data-live {
            div {
                h2 { "Recent failovers" }
                (failover_table(&items(&failovers)))
            }
            div {
                h2 { "Recent SLA breaches" }
                (event_list(&items(&breaches)))
            }
        }
        @if v.can_write() {
            section.write-area {
                h2 { "New site" }
                (notice_for(notice, "site-create"))
                form.write.grid method="post" action="/ui/do/site-create" {
                    (form_head(v, "/ui/"))
                    @let n = notice.unwrap_or(&empty);
                    label { "Name" input name="name" required value=(n.value("site-create", "name", "")); }
                    label { "LAN prefixes" input name="lan_prefixes" placeholder="10.1.0.0/24, fd00:1::/64" value=(n.value("site-create", "lan_prefixes", "")); }
                    label { "Location" input name="location" value=(n.value("site-create", "location", "")); }
                    label { "Description" input name="description" value=(n.value("site-create", "description", "")); }
                    button type="submit" { "Create site" }
                }
            }
        }
    };
    let status = notice.map_or(StatusCode::OK, |_| StatusCode::UNPROCESSABLE_ENTITY);
    page_response(status, layout(v, "Overview", "/ui/", body))
}

/// Traffic buckets (`/traffic/stats?by=class`) summed per class: (class, packets, bytes), the
/// busiest first.
fn by_class(traffic: &Option<Value>) -> Vec<(String, f64, f64)> {
    let mut classes: Vec<(String, f64, f64)> = Vec::new();
    for b in items(traffic) {
        let class = b["class"].as_str().unwrap_or("?").to_owned();
        let (p, by) = (
            b["tx_packets"].as_f64().unwrap_or(0.0),
            b["tx_bytes"].as_f64().unwrap_or(0.0),
        );
        match classes.iter_mut().find(|c| c.0 == class) {
            Some(c) => {
                c.1 += p;
                c.2 += by;
            }
            None => classes.push((class, p, by)),
        }
    }
    classes.sort_by(|a, b| b.2.total_cmp(&a.2));
    classes
}

fn failover_table(list: &[Value]) -> Markup {
    html! {
        @if list.is_empty() {
            p.small { "None kept." }
        } @else {
            div.scroll { table {
                thead { tr { th { "When" } th { "Site" } th { "From → to" } th { "Why" } th.n { "Flows" } } }
                tbody {
                    @for f in list {
                        tr {
                            td { (when(f["at_ms"].as_i64().unwrap_or(0))) }
                            td { (f["site"].as_str().unwrap_or("?")) " → " (f["peer"].as_str().unwrap_or("?")) }
                            td { (f["from"].as_str().unwrap_or("?")) " → " (f["to"].as_str().unwrap_or("?")) }
                            td { (f["reason"].as_str().unwrap_or("?")) }
                            td.n { (f["flows"]) }
                        }
                    }
                }
            } }
        }
    }
}

/// What an event says, in a line.
fn event_text(e: &Value) -> String {
    let d = &e["data"];
    let s = |k: &str| d[k].as_str().unwrap_or("?").to_owned();
    match e["type"].as_str().unwrap_or("") {
        "path.down" => format!(
            "{} → {} down (silent {} ms)",
            s("from"),
            s("to"),
            num(&d["silent_ms"], 0)
        ),
        "path.up" => format!("{} → {} up", s("from"), s("to")),
        "sla.violated" => format!(
            "{} → {} breaks {} (RTT {} ms, jitter {} ms, loss {} %)",
            s("from"),
            s("to"),
            d["class"].as_str().unwrap_or("a class"),
            num(&d["rtt_ms"], 1),
            num(&d["jitter_ms"], 1),
            num(&d["loss_pct"], 1)
        ),
        "failover" => format!(
            "{}: {} flows to {} moved {} → {} ({})",
            s("site"),
            d["flows"],
            s("peer"),
            s("from"),
            s("to"),
            s("reason")
        ),
        "site.online" => format!("{} online", s("site")),
        "site.offline" => format!("{} offline", s("site")),
        "config.changed" => format!(
            "configuration {} ({})",
            d["generation"],
            d["action"].as_str().unwrap_or("changed")
        ),
        "backup.failed" => format!("backup failed: {}", d["error"].as_str().unwrap_or("?")),
        other => other.to_owned(),
    }
}

fn event_list(list: &[Value]) -> Markup {
    html! {
        @if list.is_empty() {
            p.small { "None kept." }
        } @else {
            ul.events {
                @for e in list {
                    li data-kind=(e["type"].as_str().unwrap_or("")) {
                        (when(e["at_ms"].as_i64().unwrap_or(0))) " "
                        span.kind { (e["type"].as_str().unwrap_or("?")) } " "
                        @if let Some(p) = e["data"]["path_id"].as_str() {
                            a href={ "/ui/paths/" (p) } { (event_text(e)) }
                        } @else {
                            (event_text(e))
                        }
                    }
                }
            }
        }
    }
}

// ----- topology -----

pub async fn topology(State(ui): State<Ui>, v: Viewer) -> Response {
    let (topo, sites, paths) = tokio::join!(
        v.get(&ui, "/api/v1/topology"),
        v.get(&ui, "/api/v1/sites?limit=500"),
        v.get(&ui, "/api/v1/paths?limit=500"),
    );
    let (sites, paths) = (items(&sites), items(&paths));
    let topo = topo.unwrap_or(Value::Null);
    let body = html! {
        h1 { "Topology" }
        section #topology data-live {
            p.small {
                (topo["mode"].as_str().unwrap_or("?").replace('-', " "))
                @if let Some(h) = topo["hubs"].as_array().filter(|h| !h.is_empty()) {
                    ", hubs: " (h.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                }
                " · " (sites.len()) " sites, " (paths.len()) " paths"
            }
            (svg::topology(&topo, &sites, &paths))
            ul.legend {
                @for (k, t) in [("up", "up: meets every SLA class"), ("degraded", "degraded: breaks a class's SLA"), ("down", "down"), ("unknown", "no recent report")] {
                    li data-state=(k) { span.dot {} (t) }
                }
            }
            div.scroll { table.paths {
                thead { tr { th { "Path" } th { "State" } th.n { "RTT ms" } th.n { "Jitter ms" } th.n { "Loss %" } } }
                tbody {
                    @for p in &paths {
                        @let id = p["id"].as_str().unwrap_or("");
                        tr data-path=(id) data-state=(state_of(p)) {
                            td { a href={ "/ui/paths/" (id) } { (path_name(p)) } }
                            td { span.dot {} (state_of(p)) @if p["relayed"] == true { " (relayed)" } }
                            td.n { (num(&p["rtt_ms"], 1)) }
                            td.n { (num(&p["jitter_ms"], 1)) }
                            td.n { (num(&p["loss_pct"], 2)) }
                        }
                    }
                }
            } }
        }
    };
    page_response(StatusCode::OK, layout(&v, "Topology", "/ui/topology", body))
}

/// `hq/mpls ↔ branch1/lte`.
pub fn path_name(p: &Value) -> String {
    format!(
        "{}/{} ↔ {}/{}",
        p["a"]["site"].as_str().unwrap_or("?"),
        p["a"]["link"].as_str().unwrap_or("?"),
        p["b"]["site"].as_str().unwrap_or("?"),
        p["b"]["link"].as_str().unwrap_or("?")
    )
}

// ----- a site -----

pub async fn site(State(ui): State<Ui>, v: Viewer, PageId(id): PageId) -> Response {
    site_page(&ui, &v, id, None).await
}

async fn site_page(ui: &Ui, v: &Viewer, id: i64, notice: Option<&Notice>) -> Response {
    let Some(s) = v.get(ui, &format!("/api/v1/sites/{id}")).await else {
        return page_response(
            StatusCode::NOT_FOUND,
            layout(
                v,
                "Not found",
                "",
                html! { h1 { "No such site" } p { a href="/ui/" { "Back to the overview" } } },
            ),
        );
    };
    let now = now_s();
    let (u1, u2, u3) = (
        format!("/api/v1/paths?site={id}&limit=500"),
        format!("/api/v1/traffic/stats?by=class&site={id}&limit=500"),
        format!("/api/v1/failover/events?site={id}&limit=10"),
    );
    let (paths, traffic, failovers) = tokio::join!(v.get(ui, &u1), v.get(ui, &u2), v.get(ui, &u3));
    let paths = items(&paths);
    let mut charts = Vec::new();
    for p in &paths {
        let pid = p["id"].as_str().unwrap_or("");
        let m = v
            .get(
                ui,
                &format!(
                    "/api/v1/paths/{}/metrics?since={}&resolution=60&limit=500",
                    url_encode(pid),
                    now - 3600
                ),
            )
            .await;
        charts.push(items(&m));
    }
    let classes = by_class(&traffic);
    let name = s["name"].as_str().unwrap_or("?").to_owned();
    let version = s["version"].as_i64().unwrap_or(0);
    let back = format!("/ui/sites/{id}");
    let empty = Notice::default();
    let n = notice.unwrap_or(&empty);
    let prefixes = s["lan_prefixes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let body = html! {
        h1 { "Site " (name) }
        section #site-state .cards data-live {
            div.card {
                h2 { "Edge" }
                p { @if s["online"] == true { span.ok { "online" } } @else { span.bad { "offline" } } }
                p.small { "last contact: " @match s["last_seen"].as_i64() { Some(t) => { (ago(t)) }, None => "never" } }
                p.small { "runs Patronus " (s["edge_version"].as_str().unwrap_or("(not reported yet)")) }
            }
            div.card {
                h2 { "Addresses" }
                p.small { "LAN: " (prefixes) }
                p.small { "overlay: " (s["overlay_address"].as_str().unwrap_or("–")) }
                p.small { "key: " @match s["public_key"].as_str() { Some(k) => code { (k) }, None => "not enrolled" } }
            }
        }
        section #links {
            h2 { "Links" }
            div.scroll { table {
                thead { tr { th { "Link" } th { "Kind" } th { "Endpoint" } th.n { "Priority" } th { "Metered" } @if v.can_write() { th { "Change" } } } }
                tbody {
                    @for l in s["links"].as_array().into_iter().flatten() {
                        @let lid = l["id"].as_i64().unwrap_or(0);
                        tr {
                            td { (l["name"].as_str().unwrap_or("?")) }
                            td { (l["kind"].as_str().unwrap_or("?")) }
                            td { (l["endpoint"].as_str().or(l["observed_endpoint"].as_str()).unwrap_or("–")) }
                            td.n { (l["priority"]) }
                            td { @if l["metered"] == true { "yes" } @else { "no" } }
                            @if v.can_write() {
                                td {
                                    form.write.inline method="post" action="/ui/do/link-update" {
                                        (form_head(v, &back))
                                        input type="hidden" name="site" value=(id);
                                        input type="hidden" name="link" value=(lid);
                                        input type="hidden" name="version" value=(l["version"]);
                                        (kind_select(l["kind"].as_str().unwrap_or("other")))
                                        input.short name="priority" value=(l["priority"]) aria-label="priority";
                                        button type="submit" { "Save" }
                                    }
                                }
                            }
                        }
                    }
                }
            } }
            (notice_for(notice, "link-update"))
        }
        section #site-paths data-live {
            h2 { "Paths, last hour" }
            @if paths.is_empty() { p.small { "No paths: the site needs links and peers." } }
            div.charts {
                @for (p, m) in paths.iter().zip(&charts) {
                    @let pid = p["id"].as_str().unwrap_or("");
                    div.chart data-path=(pid) data-state=(state_of(p)) {
                        h3 { span.dot {} a href={ "/ui/paths/" (pid) } { (path_name(p)) } }
                        p.small {
                            (state_of(p)) " · RTT " (num(&p["rtt_ms"], 1)) " ms · jitter "
                            (num(&p["jitter_ms"], 1)) " ms · loss " (num(&p["loss_pct"], 2)) " %"
                        }
                        (svg::chart(m, now - 3600, now, "rtt_ms", "RTT ms"))
                    }
                }
            }
        }
        section #site-traffic data-live {
            h2 { "Traffic by class, last hour" }
            @if classes.is_empty() { p.small { "None reported." } } @else {
                div.scroll { table {
                    thead { tr { th { "Class" } th.n { "Packets" } th.n { "Bytes" } } }
                    tbody { @for (c, p, b) in &classes { tr { td { (c) } td.n { (format!("{p:.0}")) } td.n { (bytes(*b)) } } } }
                } }
            }
            h2 { "Recent failovers" }
            (failover_table(&items(&failovers)))
        }
        @if v.can_write() {
            section.write-area {
                h2 { "Change the site" }
                (notice_for(notice, "site-update"))
                form.write.grid method="post" action="/ui/do/site-update" {
                    (form_head(v, &back))
                    input type="hidden" name="site" value=(id);
                    input type="hidden" name="version" value=(version);
                    label { "LAN prefixes" input name="lan_prefixes" value=(n.value("site-update", "lan_prefixes", &prefixes)); }
                    label { "Location" input name="location" value=(n.value("site-update", "location", s["location"].as_str().unwrap_or(""))); }
                    label { "Description" input name="description" value=(n.value("site-update", "description", s["description"].as_str().unwrap_or(""))); }
                    button type="submit" { "Save" }
                }
                h2 { "New link" }
                (notice_for(notice, "link-create"))
                form.write.grid method="post" action="/ui/do/link-create" {
                    (form_head(v, &back))
                    input type="hidden" name="site" value=(id);
                    label { "Name" input name="name" required value=(n.value("link-create", "name", "")); }
                    label { "Kind" (kind_select(n.value("link-create", "kind", "broadband"))) }
                    label { "Endpoint (ip:port, optional)" input name="endpoint" value=(n.value("link-create", "endpoint", "")); }
                    button type="submit" { "Add link" }
                }
            }
        }
    };
    let status = notice.map_or(StatusCode::OK, |_| StatusCode::UNPROCESSABLE_ENTITY);
    page_response(status, layout(v, &format!("Site {name}"), "", body))
}

fn kind_select(current: &str) -> Markup {
    html! {
        select name="kind" aria-label="kind" {
            @for k in patronus_api::LinkKind::ALL {
                option value=(k.as_str()) selected[k.as_str() == current] { (k.as_str()) }
            }
        }
    }
}

// ----- a path -----

pub async fn path(
    State(ui): State<Ui>,
    v: Viewer,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id.len() > 64 || !id.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return page_response(
            StatusCode::NOT_FOUND,
            layout(&v, "Not found", "", html! { h1 { "No such path" } }),
        );
    }
    let Some(p) = v.get(&ui, &format!("/api/v1/paths/{id}")).await else {
        return page_response(
            StatusCode::NOT_FOUND,
            layout(&v, "Not found", "", html! { h1 { "No such path" } }),
        );
    };
    let now = now_s();
    let (u1, u2) = (
        format!(
            "/api/v1/paths/{id}/metrics?since={}&resolution=30&limit=500",
            now - 3600
        ),
        format!(
            "/api/v1/paths/{id}/events?since_ms={}&limit=500",
            (now - 3600) * 1000
        ),
    );
    let (m, events) = tokio::join!(v.get(&ui, &u1), v.get(&ui, &u2));
    let m = items(&m);
    let body = html! {
        h1 { "Path " (path_name(&p)) }
        section #path-now .cards data-live {
            div.card data-path=(id) data-state=(state_of(&p)) {
                h2 { "Now" }
                p.big { span.dot {} (state_of(&p)) }
                p.small { "RTT " (num(&p["rtt_ms"], 1)) " ms · jitter " (num(&p["jitter_ms"], 1)) " ms · loss " (num(&p["loss_pct"], 2)) " %" }
                p.small { @match p["last_report"].as_i64() { Some(t) => { "reported " (ago(t)) }, None => "no recent report" } }
            }
        }
        section #path-history data-live {
            h2 { "Last hour" }
            div.charts {
                div.chart { h3 { "RTT, ms" } (svg::chart(&m, now - 3600, now, "rtt_ms", "ms")) }
                div.chart { h3 { "Jitter, ms" } (svg::chart(&m, now - 3600, now, "jitter_ms", "ms")) }
                div.chart { h3 { "Loss, %" } (svg::chart(&m, now - 3600, now, "loss_pct", "%")) }
            }
            h2 { "State changes, last hour (newest first)" }
            @let ev: Vec<Value> = items(&events).into_iter().rev().take(50).collect();
            @if ev.is_empty() { p.small { "None kept." } } @else {
                div.scroll { table {
                    thead { tr { th { "When" } th { "Seen by" } th { "What" } th { "Class" } th.n { "RTT ms" } th.n { "Loss %" } } }
                    tbody {
                        @for e in &ev {
                            tr data-kind=(e["kind"].as_str().unwrap_or("")) {
                                td { (when(e["at_ms"].as_i64().unwrap_or(0))) }
                                td { (e["site"].as_str().unwrap_or("?")) }
                                td { (e["kind"].as_str().unwrap_or("?")) }
                                td { (e["class"].as_str().unwrap_or("–")) }
                                td.n { (num(&e["detail"]["rtt_ms"], 1)) }
                                td.n { (num(&e["detail"]["loss_pct"], 2)) }
                            }
                        }
                    }
                } }
            }
        }
    };
    page_response(StatusCode::OK, layout(&v, "Path", "", body))
}

// ----- events -----

#[derive(Debug, serde::Deserialize)]
pub struct EventsQuery {
    kind: Option<String>,
    site: Option<String>,
    before: Option<i64>,
}

const KINDS: [&str; 8] = [
    "path.down",
    "path.up",
    "sla.violated",
    "failover",
    "site.online",
    "site.offline",
    "config.changed",
    "backup.failed",
];

pub async fn events(State(ui): State<Ui>, v: Viewer, Query(q): Query<EventsQuery>) -> Response {
    let kind = q.kind.filter(|k| KINDS.contains(&k.as_str()));
    let site = q.site.filter(|s| !s.is_empty() && s.len() <= 64);
    let mut uri = String::from("/api/v1/events?limit=100");
    if let Some(k) = &kind {
        uri.push_str(&format!("&kind={k}"));
    }
    if let Some(s) = &site {
        uri.push_str(&format!("&site={}", url_encode(s)));
    }
    if let Some(b) = q.before {
        uri.push_str(&format!("&before={b}"));
    }
    let (list, sites, hooks, audit) = tokio::join!(
        v.get(&ui, &uri),
        v.get(&ui, "/api/v1/sites?limit=500"),
        v.get(&ui, "/api/v1/webhooks?limit=50"),
        v.get(&ui, "/api/v1/audit?limit=50"),
    );
    let mut deliveries = Vec::new();
    for h in items(&hooks) {
        let hid = h["id"].as_i64().unwrap_or(0);
        let d = v
            .get(&ui, &format!("/api/v1/webhooks/{hid}/deliveries?limit=10"))
            .await;
        deliveries.push((h, items(&d)));
    }
    let next = list.as_ref().and_then(|l| l["next_before"].as_i64());
    let body = html! {
        h1 { "Events" }
        form.filter method="get" action="/ui/events" {
            label { "Kind" select name="kind" {
                option value="" { "any" }
                @for k in KINDS { option value=(k) selected[kind.as_deref() == Some(k)] { (k) } }
            } }
            label { "Site" select name="site" {
                option value="" { "any" }
                @for s in items(&sites) {
                    @let n = s["name"].as_str().unwrap_or("");
                    option value=(n) selected[site.as_deref() == Some(n)] { (n) }
                }
            } }
            button type="submit" { "Filter" }
        }
        section #event-list data-live[q.before.is_none()] {
            (event_list(&items(&list)))
            @if let Some(b) = next {
                p { a href={ "/ui/events?before=" (b)
                    @if let Some(k) = &kind { "&kind=" (k) }
                    @if let Some(s) = &site { "&site=" (url_encode(s)) } } { "Older events" } }
            }
        }
        @if hooks.is_some() {
            section #deliveries data-live {
                h2 { "Webhook deliveries" }
                @if deliveries.is_empty() { p.small { "No webhooks." } }
                @for (h, ds) in &deliveries {
                    h3 { (h["url"].as_str().unwrap_or("?")) }
                    @if ds.is_empty() { p.small { "No deliveries kept." } } @else {
                        div.scroll { table {
                            thead { tr { th { "Created" } th { "Event" } th { "Status" } th.n { "Attempts" } th { "Last error" } } }
                            tbody { @for d in ds {
                                tr {
                                    td { (when(d["created_ms"].as_i64().unwrap_or(0))) }
                                    td { (d["event"].as_str().or(d["kind"].as_str()).unwrap_or("?")) }
                                    td { (d["status"].as_str().unwrap_or("?")) }
                                    td.n { (d["attempts"]) }
                                    td { (d["last_error"].as_str().unwrap_or("")) }
                                }
                            } }
                        } }
                    }
                }
            }
        }
        @if let Some(audit) = &audit {
            section #audit data-live {
                h2 { "Audit log" }
                div.scroll { table {
                    thead { tr { th { "When" } th { "Who" } th { "Action" } th { "Target" } th { "From" } } }
                    tbody { @for r in items(&Some(audit.clone())) {
                        tr {
                            td { (when(r["at_ms"].as_i64().unwrap_or(0))) }
                            td { (r["actor"].as_str().unwrap_or("?")) }
                            td { (r["action"].as_str().unwrap_or("?")) }
                            td { (r["target"].as_str().unwrap_or("")) }
                            td { (r["source"].as_str().unwrap_or("")) }
                        }
                    } }
                } }
            }
        }
    };
    page_response(StatusCode::OK, layout(&v, "Events", "/ui/events", body))
}

// ----- policies and SLA classes -----

pub async fn config(State(ui): State<Ui>, v: Viewer) -> Response {
    config_page(&ui, &v, None).await
}

async fn config_page(ui: &Ui, v: &Viewer, notice: Option<&Notice>) -> Response {
    let (classes, policies) = tokio::join!(
        v.get(ui, "/api/v1/sla-classes?limit=500"),
        v.get(ui, "/api/v1/policies?limit=500"),
    );
    let (classes, policies) = (items(&classes), items(&policies));
    let empty = Notice::default();
    let n = notice.unwrap_or(&empty);
    let back = "/ui/config";
    let class_names: Vec<&str> = classes.iter().filter_map(|c| c["name"].as_str()).collect();
    let body = html! {
        h1 { "Policies & SLA classes" }
        section #classes {
            h2 { "SLA classes" }
            div.scroll { table {
                thead { tr { th { "Class" } th.n { "Max RTT ms" } th.n { "Max jitter ms" } th.n { "Max loss %" } th { "Description" } @if v.can_write() { th { "Change" } } } }
                tbody { @for c in &classes {
                    tr {
                        td { (c["name"].as_str().unwrap_or("?")) }
                        td.n { (num(&c["max_latency_ms"], 0)) }
                        td.n { (num(&c["max_jitter_ms"], 0)) }
                        td.n { (num(&c["max_loss_pct"], 2)) }
                        td { (c["description"].as_str().unwrap_or("")) }
                        @if v.can_write() {
                            td { form.write.inline method="post" action="/ui/do/class-update" {
                                (form_head(v, back))
                                input type="hidden" name="id" value=(c["id"]);
                                input type="hidden" name="version" value=(c["version"]);
                                input.short name="max_latency_ms" value=(opt(&c["max_latency_ms"])) aria-label="max RTT ms";
                                input.short name="max_jitter_ms" value=(opt(&c["max_jitter_ms"])) aria-label="max jitter ms";
                                input.short name="max_loss_pct" value=(opt(&c["max_loss_pct"])) aria-label="max loss %";
                                button type="submit" { "Save" }
                            } }
                        }
                    }
                } }
            } }
            (notice_for(notice, "class-update"))
        }
        section #policies {
            h2 { "Traffic policies" }
            div.scroll { table {
                thead { tr { th.n { "Order" } th { "Policy" } th { "Match" } th { "Class" } th { "Steering" } th { "Enabled" } @if v.can_write() { th { "Change" } } } }
                tbody { @for p in &policies {
                    tr {
                        td.n { (p["order"]) }
                        td { (p["name"].as_str().unwrap_or("?")) }
                        td { code { (p["match"].to_string()) } }
                        td { (p["class"].as_str().unwrap_or("?")) }
                        td { (p["steering"].as_str().unwrap_or("?")) }
                        td { @if p["enabled"] == false { "no" } @else { "yes" } }
                        @if v.can_write() {
                            td { form.write.inline method="post" action="/ui/do/policy-update" {
                                (form_head(v, back))
                                input type="hidden" name="id" value=(p["id"]);
                                input type="hidden" name="version" value=(p["version"]);
                                input.short name="order" value=(p["order"]) aria-label="order";
                                (class_select(&class_names, p["class"].as_str().unwrap_or("")))
                                (steering_select(p["steering"].as_str().unwrap_or("best-quality")))
                                button type="submit" { "Save" }
                            } }
                        }
                    }
                } }
            } }
            (notice_for(notice, "policy-update"))
        }
        @if v.can_write() {
            section.write-area {
                h2 { "New SLA class" }
                (notice_for(notice, "class-create"))
                form.write.grid method="post" action="/ui/do/class-create" {
                    (form_head(v, back))
                    label { "Name" input name="name" required value=(n.value("class-create", "name", "")); }
                    label { "Max RTT, ms" input name="max_latency_ms" value=(n.value("class-create", "max_latency_ms", "")); }
                    label { "Max jitter, ms" input name="max_jitter_ms" value=(n.value("class-create", "max_jitter_ms", "")); }
                    label { "Max loss, %" input name="max_loss_pct" value=(n.value("class-create", "max_loss_pct", "")); }
                    label { "Description" input name="description" value=(n.value("class-create", "description", "")); }
                    button type="submit" { "Create class" }
                }
                h2 { "New policy" }
                (notice_for(notice, "policy-create"))
                form.write.grid method="post" action="/ui/do/policy-create" {
                    (form_head(v, back))
                    label { "Name" input name="name" required value=(n.value("policy-create", "name", "")); }
                    label { "Order" input name="order" value=(n.value("policy-create", "order", "100")); }
                    label { "Class" (class_select(&class_names, n.value("policy-create", "class", ""))) }
                    label { "Steering" (steering_select(n.value("policy-create", "steering", "best-quality"))) }
                    label { "Protocol (tcp, udp, a number; empty: any)" input name="protocol" value=(n.value("policy-create", "protocol", "")); }
                    label { "Destination ports (5060, 10000-20000)" input name="dst_ports" value=(n.value("policy-create", "dst_ports", "")); }
                    label { "Destination prefixes" input name="dst" value=(n.value("policy-create", "dst", "")); }
                    label { "DSCP (46, ...)" input name="dscp" value=(n.value("policy-create", "dscp", "")); }
                    button type="submit" { "Create policy" }
                }
            }
        }
    };
    let status = notice.map_or(StatusCode::OK, |_| StatusCode::UNPROCESSABLE_ENTITY);
    page_response(status, layout(v, "Policies & classes", "/ui/config", body))
}

fn opt(v: &Value) -> String {
    if v.is_null() {
        String::new()
    } else {
        v.to_string()
    }
}

fn class_select(names: &[&str], current: &str) -> Markup {
    html! {
        select name="class" aria-label="class" {
            @for c in names { option value=(c) selected[*c == current] { (c) } }
        }
    }
}

fn steering_select(current: &str) -> Markup {
    html! {
        select name="steering" aria-label="steering" {
            @for s in ["best-quality", "lowest-cost", "load-balance", "duplicate"] {
                option value=(s) selected[s == current] { (s) }
            }
        }
    }
}

// ----- forms -----

/// A form field as the API's JSON: a number when it reads as one, `null` when empty, the text
/// otherwise (so that the API's own validation names what is wrong with it).
fn number(f: &HashMap<String, String>, k: &str) -> Value {
    match f.get(k).map(|s| s.trim()) {
        None | Some("") => Value::Null,
        Some(s) => s
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| s.parse::<f64>().map(Value::from))
            .unwrap_or_else(|_| Value::from(s)),
    }
}

fn text(f: &HashMap<String, String>, k: &str) -> Value {
    Value::from(f.get(k).map_or("", |s| s.trim()))
}

/// A comma- or space-separated list; numbers as numbers.
fn list(f: &HashMap<String, String>, k: &str) -> Value {
    Value::Array(
        f.get(k)
            .map_or("", String::as_str)
            .split([',', ' '])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .take(256)
            .map(|s| {
                s.parse::<i64>()
                    .map_or_else(|_| Value::from(s), Value::from)
            })
            .collect(),
    )
}

fn id_of(f: &HashMap<String, String>, k: &str) -> Option<i64> {
    f.get(k).and_then(|s| s.trim().parse().ok())
}

/// Fields a form posts at most, and the size of each: a post is bounded before it is read.
const MAX_FIELDS: usize = 32;
const MAX_FIELD: usize = 4096;

/// A write form's post: CSRF first, then the API as the session's user.
pub async fn act(
    State(ui): State<Ui>,
    v: Viewer,
    axum::extract::Path(action): axum::extract::Path<String>,
    axum::Form(f): axum::Form<Vec<(String, String)>>,
) -> Response {
    let token = f.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v.as_str());
    if !token.is_some_and(|t| same(t, &v.csrf)) {
        return forged();
    }
    if f.len() > MAX_FIELDS || f.iter().any(|(k, v)| k.len() > 64 || v.len() > MAX_FIELD) {
        return page_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            bare(
                "Refused",
                html! { p { "This form is larger than any of the dashboard's." } },
            ),
        );
    }
    let f: HashMap<String, String> = f.into_iter().collect();
    let site = id_of(&f, "site");
    let version = id_of(&f, "version");
    let (method, uri, body): (Method, String, Value) = match action.as_str() {
        "site-create" => (
            Method::POST,
            "/api/v1/sites".into(),
            json!({ "name": text(&f, "name"), "lan_prefixes": list(&f, "lan_prefixes"),
                    "location": text(&f, "location"), "description": text(&f, "description") }),
        ),
        "site-update" => (
            Method::PATCH,
            format!("/api/v1/sites/{}", site.unwrap_or(0)),
            json!({ "lan_prefixes": list(&f, "lan_prefixes"), "location": text(&f, "location"),
                    "description": text(&f, "description") }),
        ),
        "link-create" => {
            let mut b = json!({ "name": text(&f, "name"), "kind": text(&f, "kind") });
            if f.get("endpoint").is_some_and(|e| !e.trim().is_empty()) {
                b["endpoint"] = text(&f, "endpoint");
            }
            (
                Method::POST,
                format!("/api/v1/sites/{}/links", site.unwrap_or(0)),
                b,
            )
        }
        "link-update" => (
            Method::PATCH,
            format!(
                "/api/v1/sites/{}/links/{}",
                site.unwrap_or(0),
                id_of(&f, "link").unwrap_or(0)
            ),
            json!({ "kind": text(&f, "kind"), "priority": number(&f, "priority") }),
        ),
        "class-create" => (
            Method::POST,
            "/api/v1/sla-classes".into(),
            json!({ "name": text(&f, "name"), "description": text(&f, "description"),
                    "max_latency_ms": number(&f, "max_latency_ms"),
                    "max_jitter_ms": number(&f, "max_jitter_ms"),
                    "max_loss_pct": number(&f, "max_loss_pct") }),
        ),
        "class-update" => (
            Method::PATCH,
            format!("/api/v1/sla-classes/{}", id_of(&f, "id").unwrap_or(0)),
            json!({ "max_latency_ms": number(&f, "max_latency_ms"),
                    "max_jitter_ms": number(&f, "max_jitter_ms"),
                    "max_loss_pct": number(&f, "max_loss_pct") }),
        ),
        "policy-create" => {
            let mut m = serde_json::Map::new();
            if f.get("protocol").is_some_and(|p| !p.trim().is_empty()) {
                m.insert("protocol".into(), number(&f, "protocol"));
            }
            for k in ["dst_ports", "dst", "dscp"] {
                let l = list(&f, k);
                if l.as_array().is_some_and(|a| !a.is_empty()) {
                    m.insert(k.into(), l);
                }
            }
            (
                Method::POST,
                "/api/v1/policies".into(),
                json!({ "name": text(&f, "name"), "order": number(&f, "order"),
                        "class": text(&f, "class"), "steering": text(&f, "steering"),
                        "match": m }),
            )
        }
        "policy-update" => (
            Method::PATCH,
            format!("/api/v1/policies/{}", id_of(&f, "id").unwrap_or(0)),
            json!({ "order": number(&f, "order"), "class": text(&f, "class"),
                    "steering": text(&f, "steering") }),
        ),
        _ => {
            return page_response(
                StatusCode::NOT_FOUND,
                layout(&v, "Not found", "", html! { h1 { "No such form" } }),
            );
        }
    };
    let answer: Answer = v
        .call(
            &ui,
            method.clone(),
            &uri,
            Some(&body),
            version.filter(|_| method == Method::PATCH),
        )
        .await;
    if answer.ok() {
        let to = match action.as_str() {
            "site-create" => format!("/ui/sites/{}", answer.body["id"].as_i64().unwrap_or(0)),
            _ => super::after_login(f.get("back").map(String::as_str)).to_owned(),
        };
        return redirect(&to);
    }
    let status = answer.status;
    let notice = Notice {
        action: action.clone(),
        lines: answer.error_lines(),
        values: f,
    };
    let mut r = match action.as_str() {
        "site-create" => overview_page(&ui, &v, Some(&notice)).await,
        "site-update" | "link-create" | "link-update" => {
            site_page(&ui, &v, site.unwrap_or(0), Some(&notice)).await
        }
        _ => config_page(&ui, &v, Some(&notice)).await,
    };
    // The API's status: a viewer's post is 403 here as it is there.
    *r.status_mut() = status;
    r
}
