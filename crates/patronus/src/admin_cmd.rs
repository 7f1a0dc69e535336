//! Admin commands that talk to the controller's API: `patronus login`, `site`, `link`,
//! `policy`, `class`, `failover`, `path`, `traffic`, `webhook`.

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::api_client::{self, Credentials, Session};
use crate::terminal;

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The controller's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long)]
    email: String,
}

/// Logs in (the password typed without echo on a terminal, else the first line of stdin) and
/// keeps the tokens 0600 in the user's config directory.
pub fn login(a: LoginArgs) -> anyhow::Result<()> {
    let password = terminal::read_secret(&format!("password for {} at {}: ", a.email, a.url))
        .context("the password")?;
    let r = api_client::request(
        &a.url,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&json!({ "email": a.email, "password": password })),
    )?;
    if r.status != 200 {
        bail!("login failed: {}", api_client::error_text(&r));
    }
    let creds = Credentials {
        url: a.url.trim_end_matches('/').to_owned(),
        email: a.email,
        access_token: r.body["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        refresh_token: r.body["refresh_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    let path = api_client::save(&creds)?;
    outln!(
        "logged in to {} as {} (session kept in {})",
        creds.url,
        creds.email,
        path.display()
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum SiteCmd {
    /// All sites.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// One site (by name or id), with its links.
    Show {
        site: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    Create {
        name: String,
        /// A LAN prefix (repeat for more).
        #[arg(long = "lan")]
        lan: Vec<String>,
        #[arg(long, default_value = "")]
        location: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Deletes a site and its links.
    Delete { site: String },
    /// Changes a site's status: `active` sites have paths, `planned` and `disabled` ones none.
    SetStatus {
        site: String,
        /// active, planned or disabled.
        status: String,
    },
    /// A one-time, expiring token for the site's edge to enrol with (printed once).
    EnrollToken {
        site: String,
        /// 1 to 10080.
        #[arg(long, default_value_t = 60)]
        expires_in_minutes: u32,
    },
    /// Asks the site's edge to roll to a new key pair, made on the edge; its peers accept both
    /// keys until every session has moved, so no traffic is lost. `site show` gives the key.
    RotateKey { site: String },
}

#[derive(Debug, Subcommand)]
pub enum LinkCmd {
    /// The links of a site.
    List {
        site: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Adds a WAN link to a site.
    Add {
        site: String,
        name: String,
        /// mpls, broadband, lte, satellite or other.
        #[arg(long)]
        kind: String,
        /// The link's public ip:port, if it has a fixed one.
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long)]
        up_kbps: Option<u64>,
        #[arg(long)]
        down_kbps: Option<u64>,
        #[arg(long)]
        metered: bool,
        #[arg(long)]
        priority: Option<u8>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    Delete {
        site: String,
        link: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PathCmd {
    /// Failovers the edges reported, newest first.
    Failovers {
        /// Only those of this site's edge (name or id).
        #[arg(long)]
        site: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// A path's changes of state as its edges saw them (down, up with its first round trip,
    /// an SLA class broken or met again), oldest first.
    Events {
        /// The path's id, as `path list` shows it (the two link ids, lower first: 3-7).
        id: String,
        /// Only down, up, sla-violated or sla-restored.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// The paths the topology gives, with what their edges last measured.
    List {
        /// Only paths with this site (name or id) at one end.
        #[arg(long)]
        site: Option<String>,
        /// up, degraded, down or unknown.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

pub fn path(cmd: PathCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    match cmd {
        PathCmd::Failovers { site, output } => {
            let mut q = String::from("/api/v1/failover/events?limit=500");
            if let Some(site) = site {
                let id = site_id(&mut s, &site)?;
                q.push_str(&format!("&site={id}"));
            }
            let v = s.call("GET", &q, None)?;
            print(
                output,
                &v,
                &[
                    ("AT MS", "at_ms"),
                    ("SITE", "site"),
                    ("PEER", "peer"),
                    ("FROM", "from"),
                    ("TO", "to"),
                    ("REASON", "reason"),
                    ("FLOWS", "flows"),
                ],
            );
        }
        PathCmd::Events { id, kind, output } => {
            let mut q = format!("/api/v1/paths/{}/events?limit=500", urlencode(&id));
            if let Some(k) = kind {
                q.push_str(&format!("&kind={}", urlencode(&k)));
            }
            let v = s.call("GET", &q, None)?;
            print(
                output,
                &v,
                &[
                    ("AT MS", "at_ms"),
                    ("SITE", "site"),
                    ("KIND", "kind"),
                    ("CLASS", "class"),
                    ("RTT MS", "/detail/rtt_ms"),
                    ("JIT MS", "/detail/jitter_ms"),
                    ("LOSS %", "/detail/loss_pct"),
                    ("SILENT MS", "/detail/silent_ms"),
                    ("FLOWS", "/detail/flows"),
                ],
            );
        }
        PathCmd::List {
            site,
            state,
            output,
        } => {
            let mut q = String::from("/api/v1/paths?limit=500");
            if let Some(site) = site {
                let id = site_id(&mut s, &site)?;
                q.push_str(&format!("&site={id}"));
            }
            if let Some(st) = state {
                q.push_str(&format!("&state={}", urlencode(&st)));
            }
            let mut v = s.call("GET", &q, None)?;
            // Flatten the two ends for the table.
            if let Some(items) = v["items"].as_array_mut() {
                for p in items {
                    let end = |e: &Value| {
                        format!(
                            "{}/{}",
                            e["site"].as_str().unwrap_or("?"),
                            e["link"].as_str().unwrap_or("?")
                        )
                    };
                    let (a, b) = (end(&p["a"]), end(&p["b"]));
                    p["from"] = a.into();
                    p["to"] = b.into();
                }
            }
            print(
                output,
                &v,
                &[
                    ("ID", "id"),
                    ("FROM", "from"),
                    ("TO", "to"),
                    ("STATE", "state"),
                    ("RTT MS", "rtt_ms"),
                    ("JITTER MS", "jitter_ms"),
                    ("LOSS %", "loss_pct"),
                ],
            );
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// All policies, in evaluation order.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Creates a policy from its JSON (as `GET /api/v1/policies/{id}` shows one), e.g.
    /// '{"name":"voice","order":10,"class":"realtime","match":{"protocol":"udp"}}'.
    Create {
        json: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// A site's id, from its id or name.
fn site_id(s: &mut Session, site: &str) -> anyhow::Result<i64> {
    if let Ok(id) = site.parse() {
        return Ok(id);
    }
    let r = s.call(
        "GET",
        &format!("/api/v1/sites?name={}", urlencode(site)),
        None,
    )?;
    r["items"][0]["id"]
        .as_i64()
        .with_context(|| format!("no site named {site}"))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn print(output: Output, v: &Value, columns: &[(&str, &str)]) {
    match output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => {
            let rows: Vec<&Value> = match v.get("items") {
                Some(Value::Array(a)) => a.iter().collect(),
                _ => vec![v],
            };
            table(&rows, columns);
        }
    }
}

/// Aligned columns: (header, JSON key, or a JSON pointer such as `/detail/rtt_ms` for a
/// nested field).
fn table(rows: &[&Value], columns: &[(&str, &str)]) {
    let field = |r: &'_ Value, k: &str| -> Value {
        if k.starts_with('/') {
            r.pointer(k).cloned().unwrap_or(Value::Null)
        } else {
            r[k].clone()
        }
    };
    let cell = |r: &Value, k: &str| match &field(r, k) {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, k)| cell(r, k)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|c| c[i].len())
                .max()
                .unwrap_or(0)
                .max(h.len())
        })
        .collect();
    let line = |c: Vec<String>| {
        c.iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    outln!(
        "{}",
        line(columns.iter().map(|(h, _)| h.to_string()).collect())
    );
    for c in cells {
        outln!("{}", line(c));
    }
}

const SITE_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("STATUS", "status"),
    ("OVERLAY", "overlay_address"),
    ("LAN", "lan_prefixes"),
    ("LOCATION", "location"),
];

const LINK_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("KIND", "kind"),
    ("ENDPOINT", "endpoint"),
    ("UP KBPS", "up_kbps"),
    ("DOWN KBPS", "down_kbps"),
    ("METERED", "metered"),
    ("PRIORITY", "priority"),
];

pub fn site(cmd: SiteCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    match cmd {
        SiteCmd::List { output } => {
            let v = s.call("GET", "/api/v1/sites?limit=500", None)?;
            print(output, &v, SITE_COLUMNS);
        }
        SiteCmd::Show { site, output } => {
            let id = site_id(&mut s, &site)?;
            let v = s.call("GET", &format!("/api/v1/sites/{id}"), None)?;
            print(output, &v, SITE_COLUMNS);
            if let (Output::Table, Some(links)) = (output, v["links"].as_array()) {
                outln!();
                table(&links.iter().collect::<Vec<_>>(), LINK_COLUMNS);
            }
        }
        SiteCmd::Create {
            name,
            lan,
            location,
            description,
            output,
        } => {
            let v = s.call(
                "POST",
                "/api/v1/sites",
                Some(&json!({
                    "name": name, "lan_prefixes": lan, "location": location,
                    "description": description
                })),
            )?;
            print(output, &v, SITE_COLUMNS);
        }
        SiteCmd::Delete { site } => {
            let id = site_id(&mut s, &site)?;
            s.call("DELETE", &format!("/api/v1/sites/{id}"), None)?;
            outln!("deleted site {site}");
        }
        SiteCmd::SetStatus { site, status } => {
            let id = site_id(&mut s, &site)?;
            s.call(
                "PATCH",
                &format!("/api/v1/sites/{id}"),
                Some(&json!({ "status": status })),
            )?;
            outln!("site {site} is {status}");
        }
        SiteCmd::EnrollToken {
            site,
            expires_in_minutes,
        } => {
            let id = site_id(&mut s, &site)?;
            let v = s.call(
                "POST",
                &format!("/api/v1/sites/{id}/enrollment-tokens"),
                Some(&json!({ "expires_in_minutes": expires_in_minutes })),
            )?;
            // The token alone on stdout, for scripts; what it is on stderr.
            eprintln!(
                "enrolment token for site {site}, valid {expires_in_minutes} min, usable once:"
            );
            outln!("{}", v["token"].as_str().unwrap_or_default());
        }
        SiteCmd::RotateKey { site } => {
            let id = site_id(&mut s, &site)?;
            let v = s.call("POST", &format!("/api/v1/sites/{id}/rotate-key"), None)?;
            outln!(
                "key rotation {} asked of site {site}'s edge: it makes a new key pair and rolls \
                 to it; `patronus site show {site}` shows the key in use",
                v["key_rotation"]
            );
        }
    }
    Ok(())
}

pub fn link(cmd: LinkCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    match cmd {
        LinkCmd::List { site, output } => {
            let id = site_id(&mut s, &site)?;
            let v = s.call("GET", &format!("/api/v1/sites/{id}/links"), None)?;
            print(output, &v, LINK_COLUMNS);
        }
        LinkCmd::Add {
            site,
            name,
            kind,
            endpoint,
            up_kbps,
            down_kbps,
            metered,
            priority,
            output,
        } => {
            let id = site_id(&mut s, &site)?;
            let mut body = json!({ "name": name, "kind": kind, "metered": metered });
            for (k, v) in [
                ("endpoint", endpoint.map(Value::from)),
                ("up_kbps", up_kbps.map(Value::from)),
                ("down_kbps", down_kbps.map(Value::from)),
                ("priority", priority.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let v = s.call("POST", &format!("/api/v1/sites/{id}/links"), Some(&body))?;
            print(output, &v, LINK_COLUMNS);
        }
        LinkCmd::Delete { site, link } => {
            let id = site_id(&mut s, &site)?;
            let link_id = match link.parse::<i64>() {
                Ok(l) => l,
                Err(_) => {
                    let v = s.call("GET", &format!("/api/v1/sites/{id}/links"), None)?;
                    v["items"]
                        .as_array()
                        .and_then(|a| a.iter().find(|l| l["name"] == link.as_str()))
                        .and_then(|l| l["id"].as_i64())
                        .with_context(|| format!("site {site} has no link named {link}"))?
                }
            };
            s.call(
                "DELETE",
                &format!("/api/v1/sites/{id}/links/{link_id}"),
                None,
            )?;
            outln!("deleted link {link} of site {site}");
        }
    }
    Ok(())
}

pub fn policy(cmd: PolicyCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    let columns = [
        ("ID", "id"),
        ("ORDER", "order"),
        ("NAME", "name"),
        ("CLASS", "class"),
        ("STEERING", "steering"),
        ("ENABLED", "enabled"),
    ];
    match cmd {
        PolicyCmd::Create { json, output } => {
            let body: Value = serde_json::from_str(&json).context("the policy is not JSON")?;
            let v = s.call("POST", "/api/v1/policies", Some(&body))?;
            print(output, &v, &columns);
        }
        PolicyCmd::List { output } => {
            let v = s.call("GET", "/api/v1/policies?limit=500", None)?;
            print(output, &v, &columns);
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum WebhookCmd {
    /// Registered webhooks.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Registers a URL for events; prints the signing secret (shown this once).
    Create {
        /// `http://host[:port]/path`.
        url: String,
        /// An event to post (repeat): site.online, site.offline, path.down, path.up,
        /// sla.violated, failover, config.changed.
        #[arg(long = "event", required = true)]
        events: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    Delete {
        id: i64,
    },
    /// Sends the webhook a `ping` event now.
    Ping {
        id: i64,
    },
    /// A webhook's deliveries, newest first: status, attempts, last answer.
    Deliveries {
        id: i64,
        /// pending, delivered or failed.
        #[arg(long)]
        status: Option<String>,
        /// Only this kind of event.
        #[arg(long)]
        event: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

pub fn webhook(cmd: WebhookCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    let columns = [
        ("ID", "id"),
        ("URL", "url"),
        ("EVENTS", "events"),
        ("ENABLED", "enabled"),
        ("DESCRIPTION", "description"),
    ];
    match cmd {
        WebhookCmd::List { output } => {
            let v = s.call("GET", "/api/v1/webhooks?limit=500", None)?;
            print(output, &v, &columns);
        }
        WebhookCmd::Create {
            url,
            events,
            description,
            output,
        } => {
            let body = json!({ "url": url, "events": events, "description": description });
            let v = s.call("POST", "/api/v1/webhooks", Some(&body))?;
            match output {
                Output::Json => print(output, &v, &columns),
                Output::Table => {
                    print(output, &v, &columns);
                    outln!(
                        "signing secret (shown once; verify X-Patronus-Signature with it): {}",
                        v["secret"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        WebhookCmd::Delete { id } => {
            s.call("DELETE", &format!("/api/v1/webhooks/{id}"), None)?;
            outln!("deleted webhook {id}");
        }
        WebhookCmd::Ping { id } => {
            let v = s.call("POST", &format!("/api/v1/webhooks/{id}/ping"), None)?;
            outln!(
                "ping {} queued: see `patronus webhook deliveries {id}`",
                v["event_id"].as_str().unwrap_or_default()
            );
        }
        WebhookCmd::Deliveries {
            id,
            status,
            event,
            output,
        } => {
            let mut q = format!("/api/v1/webhooks/{id}/deliveries?limit=100");
            for (k, v) in [("status", status), ("event", event)] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={}", urlencode(&v)));
                }
            }
            let v = s.call("GET", &q, None)?;
            print(
                output,
                &v,
                &[
                    ("ID", "id"),
                    ("EVENT", "event"),
                    ("STATUS", "status"),
                    ("ATTEMPTS", "attempts"),
                    ("HTTP", "last_status"),
                    ("ERROR", "last_error"),
                    ("CREATED_MS", "created_ms"),
                ],
            );
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum ClassCmd {
    /// The SLA classes.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Changes a class with a JSON merge patch, e.g. `class update realtime '{"max_loss_pct":0.5}'`
    /// (`null` removes a bound); running edges apply it at once.
    Update {
        /// The class's name or id.
        class: String,
        patch: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

const CLASS_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("LATENCY_MS", "max_latency_ms"),
    ("JITTER_MS", "max_jitter_ms"),
    ("LOSS_%", "max_loss_pct"),
    ("DESCRIPTION", "description"),
];

pub fn class(cmd: ClassCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    match cmd {
        ClassCmd::List { output } => {
            let v = s.call("GET", "/api/v1/sla-classes?limit=500", None)?;
            print(output, &v, CLASS_COLUMNS);
        }
        ClassCmd::Update {
            class,
            patch,
            output,
        } => {
            let patch: Value = serde_json::from_str(&patch).context("the patch is not JSON")?;
            let id = match class.parse::<i64>() {
                Ok(id) => id,
                Err(_) => {
                    let v = s.call("GET", "/api/v1/sla-classes?limit=500", None)?;
                    v["items"]
                        .as_array()
                        .and_then(|a| a.iter().find(|c| c["name"] == class.as_str()))
                        .and_then(|c| c["id"].as_i64())
                        .with_context(|| format!("no SLA class named {class}"))?
                }
            };
            let v = s.call("PATCH", &format!("/api/v1/sla-classes/{id}"), Some(&patch))?;
            print(output, &v, CLASS_COLUMNS);
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum FailoverCmd {
    /// The failover settings (probe cadences, down detection, hold-down, margin).
    Show {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Changes them with a JSON merge patch, e.g. `failover update '{"hold_down_ms":5000}'`
    /// (admin); running edges apply it at once.
    Update {
        patch: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

pub fn failover(cmd: FailoverCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    let (v, output) = match cmd {
        FailoverCmd::Show { output } => (s.call("GET", "/api/v1/failover", None)?, output),
        FailoverCmd::Update { patch, output } => {
            let patch: Value = serde_json::from_str(&patch).context("the patch is not JSON")?;
            (s.call("PATCH", "/api/v1/failover", Some(&patch))?, output)
        }
    };
    match output {
        Output::Json => print(output, &v, &[]),
        Output::Table => {
            if let Some(o) = v.as_object() {
                for (k, x) in o {
                    outln!("{k:<28} {x}");
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum TrafficCmd {
    /// What the edges sent (and received), per SLA class, path or site, in time buckets.
    Stats {
        /// class, path or site.
        #[arg(long, default_value = "class")]
        by: String,
        /// Only this site (name or id).
        #[arg(long)]
        site: Option<String>,
        /// The last this many minutes.
        #[arg(long, default_value_t = 60)]
        minutes: i64,
        /// Seconds per bucket.
        #[arg(long, default_value_t = 60)]
        bucket: i64,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

pub fn traffic(cmd: TrafficCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    let TrafficCmd::Stats {
        by,
        site,
        minutes,
        bucket,
        output,
    } = cmd;
    let now = patronus_controller::store::now_s();
    let mut q = format!(
        "/api/v1/traffic/stats?limit=500&by={}&bucket={bucket}&from={}",
        urlencode(&by),
        now - minutes * 60
    );
    if let Some(site) = site {
        let id = site_id(&mut s, &site)?;
        q.push_str(&format!("&site={id}"));
    }
    let v = s.call("GET", &q, None)?;
    print(
        output,
        &v,
        &[
            ("START", "start"),
            ("SITE", "site"),
            ("CLASS", "class"),
            ("PATH", "path_id"),
            ("TX_PACKETS", "tx_packets"),
            ("TX_BYTES", "tx_bytes"),
            ("RX_PACKETS", "rx_packets"),
            ("RX_BYTES", "rx_bytes"),
        ],
    );
    Ok(())
}
