//! Users and API keys through the controller's API: `patronus user ...` and
//! `patronus api-key ...`. Passwords are prompted for without echo on a terminal and read from
//! stdin otherwise; an API key's secret is printed once, when it is made.

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::admin_cmd::{Col, Fmt, Output, print, urlencode};
use crate::api_client::Session;
use crate::terminal;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    /// Manages users, API keys and settings, reads the audit log, and all an operator does.
    Admin,
    /// Writes network objects (sites, links, topology, SLA classes, policies), and reads.
    Operator,
    /// Reads.
    Viewer,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Viewer => "viewer",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Every user (admin).
    List {
        #[arg(long, value_enum)]
        role: Option<Role>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Creates a user (admin). The password (12 characters or more, mixing three kinds) is
    /// typed twice without echo on a terminal, else read from the first line of stdin.
    Create {
        email: String,
        #[arg(long, value_enum)]
        role: Role,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Changes a user's role (admin); the user's sessions end.
    SetRole {
        /// The user's email or id.
        user: String,
        #[arg(value_enum)]
        role: Role,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Disables a user (admin): their sessions end and they cannot log in.
    Disable {
        /// The user's email or id.
        user: String,
    },
    /// Enables a disabled user again (admin).
    Enable {
        /// The user's email or id.
        user: String,
    },
    /// Changes a password. Without USER, your own: the current password is asked for first,
    /// then the new one twice (without echo); from stdin, the current one on the first line
    /// and the new one on the second. With USER (admin), that user's new password only; their
    /// sessions end.
    Password {
        /// The user's email or id.
        user: Option<String>,
    },
}

const USER_COLUMNS: &[Col] = &[
    ("ID", "id", Fmt::Raw),
    ("EMAIL", "email", Fmt::Raw),
    ("NAME", "name", Fmt::Raw),
    ("ROLE", "role", Fmt::Raw),
    ("DISABLED", "disabled", Fmt::Raw),
    ("CREATED (UTC)", "created_at", Fmt::UnixS),
];

pub fn user(cmd: UserCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    match cmd {
        UserCmd::List { role, output } => {
            let mut q = String::from("/api/v1/users?limit=500");
            if let Some(r) = role {
                q.push_str(&format!("&role={}", r.as_str()));
            }
            let v = s.call("GET", &q, None)?;
            print(output, &v, USER_COLUMNS);
        }
        UserCmd::Create {
            email,
            role,
            name,
            output,
        } => {
            let password = terminal::read_new_secret(&format!("password for {email}: "))
                .context("the new user's password")?;
            let v = s.call(
                "POST",
                "/api/v1/users",
                Some(&json!({
                    "email": email, "name": name, "role": role.as_str(), "password": password
                })),
            )?;
            print(output, &v, USER_COLUMNS);
        }
        UserCmd::SetRole { user, role, output } => {
            let id = user_id(&mut s, &user)?;
            let v = s.call(
                "PATCH",
                &format!("/api/v1/users/{id}"),
                Some(&json!({ "role": role.as_str() })),
            )?;
            print(output, &v, USER_COLUMNS);
        }
        UserCmd::Disable { user } => set_disabled(&mut s, &user, true)?,
        UserCmd::Enable { user } => set_disabled(&mut s, &user, false)?,
        UserCmd::Password { user } => password(&mut s, user.as_deref())?,
    }
    Ok(())
}

fn set_disabled(s: &mut Session, user: &str, disabled: bool) -> anyhow::Result<()> {
    let id = user_id(s, user)?;
    s.call(
        "PATCH",
        &format!("/api/v1/users/{id}"),
        Some(&json!({ "disabled": disabled })),
    )?;
    if disabled {
        outln!("user {user} is disabled: their sessions have ended and they cannot log in");
    } else {
        outln!("user {user} is enabled");
    }
    Ok(())
}

fn password(s: &mut Session, user: Option<&str>) -> anyhow::Result<()> {
    let me = s.call("GET", "/api/v1/auth/me", None)?;
    let my_id = me["id"].as_i64();
    let id = match user {
        Some(u) => user_id(s, u)?,
        None => {
            my_id.context("this session is not a user's: name the user whose password to set")?
        }
    };
    let own = Some(id) == my_id;
    let mut body = json!({});
    if own {
        body["current_password"] = terminal::read_secret("current password: ")
            .context("your current password")?
            .into();
    }
    let new = terminal::read_new_secret("new password: ").context("the new password")?;
    body["new_password"] = new.as_str().into();
    s.call("POST", &format!("/api/v1/users/{id}/password"), Some(&body))?;
    if !own {
        outln!(
            "password of user {} changed; their sessions have ended",
            user.unwrap_or_default()
        );
        return Ok(());
    }
    // Changing it ended every session of this user, this one's refresh token included: log in
    // again with the new password, so that the next command works.
    let email = me["email"].as_str().unwrap_or_default();
    match s.login(email, &new) {
        Ok(path) => outln!(
            "password changed; your other sessions have ended, this one continues (kept in {})",
            path.display()
        ),
        Err(e) => outln!("password changed; every session has ended, log in again with it ({e:#})"),
    }
    Ok(())
}

/// A user's id, from their id or email.
fn user_id(s: &mut Session, user: &str) -> anyhow::Result<i64> {
    if let Ok(id) = user.parse() {
        return Ok(id);
    }
    let v = s.call(
        "GET",
        &format!("/api/v1/users?limit=500&q={}", urlencode(user)),
        None,
    )?;
    v["items"]
        .as_array()
        .and_then(|a| {
            a.iter().find(|u| {
                u["email"]
                    .as_str()
                    .is_some_and(|e| e.eq_ignore_ascii_case(user))
            })
        })
        .and_then(|u| u["id"].as_i64())
        .with_context(|| format!("no user with email {user}"))
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCmd {
    /// Every API key, never the keys themselves (admin).
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Issues an API key with a role (admin). The key is printed once, alone on stdout (what
    /// it is goes to stderr); the controller keeps only its hash. Use it as a bearer token.
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        /// 1 to 365.
        #[arg(long, default_value_t = 90)]
        expires_in_days: u32,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revokes an API key (by id, or by name if one key has it); it stops working at once.
    Revoke { key: String },
}

const KEY_COLUMNS: &[Col] = &[
    ("ID", "id", Fmt::Raw),
    ("NAME", "name", Fmt::Raw),
    ("ROLE", "role", Fmt::Raw),
    ("HINT", "hint", Fmt::Raw),
    ("CREATED (UTC)", "created_at", Fmt::UnixS),
    ("EXPIRES (UTC)", "expires_at", Fmt::UnixS),
    ("LAST USED (UTC)", "last_used_at", Fmt::UnixS),
    ("REVOKED", "revoked", Fmt::Raw),
];

pub fn api_key(cmd: ApiKeyCmd) -> anyhow::Result<()> {
    let mut s = Session::open()?;
    match cmd {
        ApiKeyCmd::List { output } => {
            let v = s.call("GET", "/api/v1/api-keys?limit=500", None)?;
            print(output, &v, KEY_COLUMNS);
        }
        ApiKeyCmd::Create {
            name,
            role,
            expires_in_days,
            output,
        } => {
            let v = s.call(
                "POST",
                "/api/v1/api-keys",
                Some(&json!({
                    "name": name, "role": role.as_str(), "expires_in_days": expires_in_days
                })),
            )?;
            let key = v["key"].as_str().context("the controller sent no key")?;
            match output {
                Output::Json => print(output, &v, &[]),
                Output::Table => {
                    eprintln!(
                        "API key {} ({name}, {}), valid {expires_in_days} days; shown this once, \
                         keep it now (Authorization: Bearer KEY):",
                        v["id"],
                        role.as_str()
                    );
                    outln!("{key}");
                }
            }
        }
        ApiKeyCmd::Revoke { key } => {
            let id = match key.parse::<i64>() {
                Ok(id) => id,
                Err(_) => key_id(&mut s, &key)?,
            };
            s.call("DELETE", &format!("/api/v1/api-keys/{id}"), None)?;
            outln!("API key {key} revoked");
        }
    }
    Ok(())
}

/// The id of the one API key named `name`.
fn key_id(s: &mut Session, name: &str) -> anyhow::Result<i64> {
    let mut found: Vec<Value> = Vec::new();
    let mut offset = 0;
    loop {
        let v = s.call(
            "GET",
            &format!("/api/v1/api-keys?limit=500&offset={offset}"),
            None,
        )?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        offset += items.len();
        found.extend(items.into_iter().filter(|k| k["name"] == name));
        if offset as i64 >= v["total"].as_i64().unwrap_or(0) || offset == 0 {
            break;
        }
    }
    match found.as_slice() {
        [k] => k["id"].as_i64().context("the key has no id"),
        [] => bail!("no API key named {name}"),
        several => bail!(
            "{} API keys are named {name} (ids {}): give the id",
            several.len(),
            several
                .iter()
                .map(|k| k["id"].to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
