//! Admin commands that talk to the controller's API: `patronus login`, `site`, `link`,
//! `policy`, `class`, `failover`, `path`, `traffic`, `webhook`.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::api_client::{self, Session};
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
    #[arg(long, default_value = "https://127.0.0.1:8080")]
    url: String,
    #[arg(long)]
    email: String,
    /// Trust only the controller certificate with this SHA-256 fingerprint (the controller
    /// prints it at start; `sha256:…` or openssl's colon form), kept with the session; also
    /// PATRONUS_CA_FINGERPRINT. Without it, the controller's certificate must come from a
    /// trusted CA (the Mozilla roots, or PATRONUS_CA_FILE).
    #[arg(long)]
    ca_fingerprint: Option<String>,
}

/// Logs in (the password typed without echo on a terminal, else the first line of stdin) and
/// keeps the tokens 0600 in the user's config directory.
pub fn login(a: LoginArgs) -> anyhow::Result<()> {
    // Checked before the password is asked for; pinned before anything is sent.
    let fp = a
        .ca_fingerprint
        .clone()
        .or_else(api_client::env_fingerprints);
    if let Some(fp) = &fp {
        api_client::pin(std::slice::from_ref(fp)).context("--ca-fingerprint")?;
    }
    let password = terminal::read_secret(&format!("password for {} at {}: ", a.email, a.url))
        .context("the password")?;
    let creds = api_client::login(&a.url, &a.email, &password, fp.as_deref())?;
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
    /// The site's edge machine is lost (or being swapped): cuts the old machine off (its
    /// credential revoked, its key forgotten by its peers) and prints a one-time token for the
    /// new one (`patronus edge run --local edge.toml --token T`), which enrols with a key of
    /// its own.
    ReplaceEdge {
        site: String,
        /// 1 to 10080.
        #[arg(long, default_value_t = 60)]
        expires_in_minutes: u32,
        /// Leave the current machine working until the new one enrols (a planned swap).
        #[arg(long)]
        keep_current: bool,
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
                    ("AT (UTC)", "at_ms", Fmt::UnixMs),
                    ("SITE", "site", Fmt::Raw),
                    ("PEER", "peer", Fmt::Raw),
                    ("FROM", "from", Fmt::Raw),
                    ("TO", "to", Fmt::Raw),
                    ("REASON", "reason", Fmt::Raw),
                    ("FLOWS", "flows", Fmt::Raw),
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
                    ("AT (UTC)", "at_ms", Fmt::UnixMs),
                    ("SITE", "site", Fmt::Raw),
                    ("KIND", "kind", Fmt::Raw),
                    ("CLASS", "class", Fmt::Raw),
                    ("RTT MS", "/detail/rtt_ms", Fmt::Dec(1)),
                    ("JIT MS", "/detail/jitter_ms", Fmt::Dec(1)),
                    ("LOSS %", "/detail/loss_pct", Fmt::Dec(1)),
                    ("SILENT MS", "/detail/silent_ms", Fmt::Dec(0)),
                    ("FLOWS", "/detail/flows", Fmt::Raw),
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
                    ("ID", "id", Fmt::Raw),
                    ("FROM", "from", Fmt::Raw),
                    ("TO", "to", Fmt::Raw),
                    ("STATE", "state", Fmt::Raw),
                    ("RELAYED", "relayed", Fmt::Raw),
                    ("RTT MS", "rtt_ms", Fmt::Dec(1)),
                    ("JITTER MS", "jitter_ms", Fmt::Dec(1)),
                    ("LOSS %", "loss_pct", Fmt::Dec(1)),
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

pub(crate) fn urlencode(s: &str) -> String {
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

pub(crate) fn print(output: Output, v: &Value, columns: &[Col]) {
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

/// How a table shows a field; `--output json` keeps every value as the API sent it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fmt {
    /// As it comes: text, a number, a list joined with commas.
    Raw,
    /// Unix seconds, as RFC 3339 UTC.
    UnixS,
    /// Unix milliseconds, as RFC 3339 UTC to the millisecond.
    UnixMs,
    /// A measurement, rounded to this many decimals.
    Dec(usize),
}

/// A table column: its header, the JSON key (or a JSON pointer such as `/detail/rtt_ms` for a
/// nested field), and how its values are shown.
pub(crate) type Col = (&'static str, &'static str, Fmt);

/// Unix milliseconds as RFC 3339 UTC (`2026-11-26T14:05:09Z`, or `...09.123Z` with
/// `millis`); `None` outside the years 0 to 9999, which RFC 3339 cannot write.
fn rfc3339(unix_ms: i64, millis: bool) -> Option<String> {
    const MIN: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    if !(MIN..=MAX).contains(&unix_ms) {
        return None;
    }
    let secs = unix_ms.div_euclid(1000);
    let (days, day_s) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = patronus_controller::backup::civil(days);
    let time = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        day_s / 3600,
        day_s / 60 % 60,
        day_s % 60
    );
    Some(if millis {
        format!("{time}.{:03}Z", unix_ms.rem_euclid(1000))
    } else {
        format!("{time}Z")
    })
}

/// A value as a table cell.
fn cell(v: &Value, fmt: Fmt) -> String {
    let time = |ms: Option<i64>, millis| ms.and_then(|ms| rfc3339(ms, millis));
    let shown = match (fmt, v) {
        (_, Value::Null) => Some("-".to_owned()),
        (Fmt::UnixS, v) => time(v.as_i64().and_then(|s| s.checked_mul(1000)), false),
        (Fmt::UnixMs, v) => time(v.as_i64(), true),
        (Fmt::Dec(places), Value::Number(n)) => n.as_f64().map(|x| format!("{x:.places$}")),
        _ => None,
    };
    shown.unwrap_or_else(|| match v {
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
    })
}

/// Aligned columns.
fn table(rows: &[&Value], columns: &[Col]) {
    let field = |r: &'_ Value, k: &str| -> Value {
        if k.starts_with('/') {
            r.pointer(k).cloned().unwrap_or(Value::Null)
        } else {
            r[k].clone()
        }
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|&(_, k, fmt)| cell(&field(r, k), fmt))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _, _))| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(h.chars().count())
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
        line(columns.iter().map(|(h, _, _)| h.to_string()).collect())
    );
    for c in cells {
        outln!("{}", line(c));
    }
}

const SITE_COLUMNS: &[Col] = &[
    ("ID", "id", Fmt::Raw),
    ("NAME", "name", Fmt::Raw),
    ("STATUS", "status", Fmt::Raw),
    ("OVERLAY", "overlay_address", Fmt::Raw),
    ("LAN", "lan_prefixes", Fmt::Raw),
    ("LOCATION", "location", Fmt::Raw),
    ("ONLINE", "online", Fmt::Raw),
    ("LAST SEEN (UTC)", "last_seen", Fmt::UnixS),
];

const LINK_COLUMNS: &[Col] = &[
    ("ID", "id", Fmt::Raw),
    ("NAME", "name", Fmt::Raw),
    ("KIND", "kind", Fmt::Raw),
    ("ENDPOINT", "endpoint", Fmt::Raw),
    ("UP KBPS", "up_kbps", Fmt::Raw),
    ("DOWN KBPS", "down_kbps", Fmt::Raw),
    ("METERED", "metered", Fmt::Raw),
    ("PRIORITY", "priority", Fmt::Raw),
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
        SiteCmd::ReplaceEdge {
            site,
            expires_in_minutes,
            keep_current,
        } => {
            let id = site_id(&mut s, &site)?;
            let v = s.call(
                "POST",
                &format!("/api/v1/sites/{id}/replace-edge"),
                Some(&json!({
                    "expires_in_minutes": expires_in_minutes,
                    "keep_current": keep_current,
                })),
            )?;
            eprintln!(
                "{}; enrolment token for the new machine, valid {expires_in_minutes} min, usable \
                 once (patronus edge run --local edge.toml --token T):",
                if keep_current {
                    format!("site {site}'s current edge keeps working until the new one enrols")
                } else {
                    format!(
                        "site {site}'s old edge is cut off (credential revoked, key forgotten by \
                         its peers)"
                    )
                }
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
        ("ID", "id", Fmt::Raw),
        ("ORDER", "order", Fmt::Raw),
        ("NAME", "name", Fmt::Raw),
        ("CLASS", "class", Fmt::Raw),
        ("STEERING", "steering", Fmt::Raw),
        ("ENABLED", "enabled", Fmt::Raw),
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
        ("ID", "id", Fmt::Raw),
        ("URL", "url", Fmt::Raw),
        ("EVENTS", "events", Fmt::Raw),
        ("ENABLED", "enabled", Fmt::Raw),
        ("DESCRIPTION", "description", Fmt::Raw),
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
                    ("ID", "id", Fmt::Raw),
                    ("EVENT", "event", Fmt::Raw),
                    ("STATUS", "status", Fmt::Raw),
                    ("ATTEMPTS", "attempts", Fmt::Raw),
                    ("HTTP", "last_status", Fmt::Raw),
                    ("ERROR", "last_error", Fmt::Raw),
                    ("CREATED (UTC)", "created_ms", Fmt::UnixMs),
                    ("DELIVERED (UTC)", "delivered_ms", Fmt::UnixMs),
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

const CLASS_COLUMNS: &[Col] = &[
    ("ID", "id", Fmt::Raw),
    ("NAME", "name", Fmt::Raw),
    ("LATENCY_MS", "max_latency_ms", Fmt::Raw),
    ("JITTER_MS", "max_jitter_ms", Fmt::Raw),
    ("LOSS_%", "max_loss_pct", Fmt::Raw),
    ("DESCRIPTION", "description", Fmt::Raw),
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
            ("START (UTC)", "start", Fmt::UnixS),
            ("SITE", "site", Fmt::Raw),
            ("CLASS", "class", Fmt::Raw),
            ("PATH", "path_id", Fmt::Raw),
            ("TX_PACKETS", "tx_packets", Fmt::Raw),
            ("TX_BYTES", "tx_bytes", Fmt::Raw),
            ("RX_PACKETS", "rx_packets", Fmt::Raw),
            ("RX_BYTES", "rx_bytes", Fmt::Raw),
        ],
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_times_in_rfc_3339_utc_and_measurements_rounded() {
        let t = |ms, millis| rfc3339(ms, millis).unwrap();
        assert_eq!(t(0, false), "1970-01-01T00:00:00Z");
        assert_eq!(t(1_796_133_962_372, true), "2026-12-01T14:06:02.372Z");
        assert_eq!(t(951_782_400_000, false), "2000-02-29T00:00:00Z");
        assert_eq!(
            t(4_107_456_000_000 + 86_400_000, false),
            "2100-03-01T00:00:00Z"
        );
        assert_eq!(t(-1, true), "1969-12-31T23:59:59.999Z");
        assert_eq!(t(-62_167_219_200_000, false), "0000-01-01T00:00:00Z");
        assert_eq!(t(253_402_300_799_999, true), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(253_402_300_800_000, false), None);
        assert_eq!(rfc3339(i64::MIN, false), None);

        assert_eq!(
            cell(&json!(1_796_133_962_372_i64), Fmt::UnixMs),
            "2026-12-01T14:06:02.372Z"
        );
        assert_eq!(
            cell(&json!(1_796_133_962), Fmt::UnixS),
            "2026-12-01T14:06:02Z"
        );
        assert_eq!(cell(&json!(41.462661999999995), Fmt::Dec(1)), "41.5");
        assert_eq!(cell(&json!(0.0), Fmt::Dec(1)), "0.0");
        assert_eq!(cell(&json!(12), Fmt::Dec(0)), "12");
        assert_eq!(cell(&Value::Null, Fmt::UnixMs), "-");
        // What cannot be a time stays as the API sent it.
        assert_eq!(cell(&json!(i64::MAX), Fmt::UnixS), i64::MAX.to_string());
        assert_eq!(cell(&json!("soon"), Fmt::UnixMs), "soon");
        assert_eq!(cell(&json!(["a", 1]), Fmt::Raw), "a,1");
    }
}
