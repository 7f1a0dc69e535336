//! After a breach: `patronus controller rotate-secrets` (see the README's "After a breach").
//!
//! [`rotate`] replaces the access-token signing key (every running controller takes the new
//! key from its `jwt_key_file` within seconds, or refuses every token until it has it: see
//! [`crate::server::watch_signing_key`]) and ends every session; on request it revokes every
//! API key, and every site credential with every unused enrolment token, making one new
//! one-time token per enrolled site for its edge to enrol again with (the operator carries it
//! to the edge: `<state_dir>/enroll-token`). [`roll_edge_keys`] then asks every edge to roll
//! its WireGuard key, the zero-loss roll, connected sites never at the same time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::auth;
use crate::store::db::{query, query_as, query_scalar};
use crate::store::{Actor, Store, StoreError, enrollment, now_s};

/// What to rotate beyond the signing key and the sessions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rotation {
    pub revoke_api_keys: bool,
    pub revoke_site_credentials: bool,
    /// How long the new enrolment tokens are valid (minutes).
    pub token_minutes: u32,
}

/// What [`rotate`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rotated {
    /// The new signing key's fingerprint.
    pub fingerprint: String,
    pub sessions_ended: u64,
    pub api_keys_revoked: u64,
    pub credentials_revoked: u64,
    pub tokens_expired: u64,
    /// A new one-time enrolment token per enrolled site (site name, token), if credentials
    /// were revoked.
    #[serde(skip)]
    pub tokens: Vec<(String, String)>,
    /// The rotation committed but the new key could not be moved into place: why, and where
    /// it is (the operator moves it; until then the controllers sign nothing).
    pub key_not_in_place: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Api(String),
    #[error("{path}: {error}")]
    Io {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// Rotates: a new signing key in `key_file` (written beside it, recorded as the one in the
/// database, then renamed into place), every session ended, and what `what` asks, in one
/// transaction, audited as `controller.rotate_secrets` (nothing secret in the record).
pub async fn rotate(
    store: &Store,
    key_file: &Path,
    what: Rotation,
    actor: &Actor,
) -> Result<Rotated, RotateError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| RotateError::Io { path, error }
    };
    let key = auth::random_bytes::<32>();
    let fingerprint = auth::key_fingerprint(&key);
    let next = key_file.with_extension("next");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = key_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::store::create_private_dir(dir)?;
        }
        let _ = std::fs::remove_file(&next);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&next)
            .map_err(io(&next))?;
        f.write_all(&key)
            .and_then(|()| f.sync_all())
            .map_err(io(&next))?;
        // Owned as the key it replaces (the controller's user), not as whoever runs this:
        // root running it for a controller that runs as its own user.
        if let Ok(old) = std::fs::metadata(key_file) {
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::chown(&next, Some(old.uid()), Some(old.gid())).map_err(io(&next))?;
        }
    }
    let now = now_s();
    let mut tx = store.begin().await?;
    crate::store::settings::claim_signing_key(&mut tx, &fingerprint, true, now).await?;
    let sessions_ended = query("UPDATE refresh_tokens SET revoked = 1 WHERE revoked = 0")
        .execute(&mut *tx)
        .await?
        .rows_affected()
        + crate::store::sessions::end_all(&mut tx, None).await?;
    let mut done = Rotated {
        fingerprint: fingerprint.clone(),
        sessions_ended,
        api_keys_revoked: 0,
        credentials_revoked: 0,
        tokens_expired: 0,
        tokens: Vec::new(),
        key_not_in_place: None,
    };
    if what.revoke_api_keys {
        done.api_keys_revoked = query("UPDATE api_keys SET revoked = 1 WHERE revoked = 0")
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    if what.revoke_site_credentials {
        done.credentials_revoked = enrollment::revoke_credentials(&mut tx, None).await?;
        // A new token for every site with an edge, and for every site that had a token
        // waiting (a machine being enrolled or replaced): read before those expire.
        let enrolled: Vec<(i64, String)> = query_as(
            "SELECT id, name FROM sites WHERE public_key IS NOT NULL OR id IN
                 (SELECT site_id FROM enrollment_tokens WHERE used_at IS NULL AND expires_at >= ?)
             ORDER BY name",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        done.tokens_expired = enrollment::expire_tokens(&mut tx, None, now).await?;
        let minutes = what.token_minutes.clamp(1, 10_080);
        for (id, name) in enrolled {
            let (token, _) =
                crate::routes::sites::enrollment_tokens::mint(&mut tx, id, minutes, actor.id)
                    .await
                    .map_err(|e| RotateError::Api(e.message))?;
            done.tokens.push((name, token));
        }
    }
    Store::audit(
        &mut tx,
        actor,
        "controller.rotate_secrets",
        "controller",
        json!({
            "signing_key_fingerprint": fingerprint,
            "sessions_ended": done.sessions_ended,
            "api_keys_revoked": done.api_keys_revoked,
            "credentials_revoked": done.credentials_revoked,
            "enrolment_tokens_expired": done.tokens_expired,
            "enrolment_tokens_made": done.tokens.len(),
        }),
    )
    .await?;
    tx.commit().await?;
    // Committed: whatever happens to the file now, what was done is returned (the new tokens
    // exist only here), with what is left for the operator.
    if let Err(e) = std::fs::rename(&next, key_file) {
        done.key_not_in_place = Some(format!(
            "the new key is in {} and could not be moved to {} ({e}): move it there (mode 0600, \
             owned by the controller's user); until then the controllers sign and accept no \
             token",
            next.display(),
            key_file.display()
        ));
        return Ok(done);
    }
    let dir = key_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(done)
}

/// What [`roll_edge_keys`] did with each enrolled site.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Rolled {
    /// Sites whose edge rolled to a new key.
    pub rolled: Vec<String>,
    /// Sites whose edge did not finish in time (offline, or not enrolled again after its
    /// credential was revoked), with why.
    pub not_rolled: Vec<(String, String)>,
    /// Rounds of sites rolled at once.
    pub rounds: usize,
}

/// Asks every enrolled site's edge to roll its WireGuard key (the zero-loss roll: peers accept
/// both keys until every session has moved), in rounds of sites no two of which are connected
/// (two connected sites must not roll at once), each round waited for until its edges have
/// committed their new keys or `patience` has passed. A site whose credential is revoked waits
/// (within `patience`) for its edge to enrol again first. `progress` is told each step.
pub async fn roll_edge_keys(
    store: &Store,
    actor: &Actor,
    patience: Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Rolled, RotateError> {
    let mut out = Rolled::default();
    let mut pending: BTreeSet<i64> = query_scalar::<i64>(
        "SELECT id FROM sites WHERE public_key IS NOT NULL AND status = 'active'",
    )
    .fetch_all(&mut *store.conn().await?)
    .await?
    .into_iter()
    .collect();
    let started = Instant::now();
    while !pending.is_empty() {
        let mut conn = store.conn().await?;
        let t = crate::routes::topology::load(&mut conn)
            .await
            .map_err(|e| RotateError::Api(e.message))?;
        let sites = crate::routes::sites::load_sites(&mut conn)
            .await
            .map_err(|e| RotateError::Api(e.message))?;
        // Sites with a working credential (an edge that can take the request).
        let live: BTreeSet<i64> =
            query_scalar::<i64>("SELECT DISTINCT site_id FROM site_credentials WHERE revoked = 0")
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .collect();
        let name = |id: i64| {
            sites
                .iter()
                .find(|s| s.id == id)
                .map_or_else(|| format!("site {id}"), |s| s.name.to_string())
        };
        // Gone meanwhile, or never going to be reachable: said and dropped.
        pending.retain(|id| sites.iter().any(|s| s.id == *id));
        let ready: Vec<i64> = pending
            .iter()
            .copied()
            .filter(|id| live.contains(id))
            .collect();
        if ready.is_empty() {
            if started.elapsed() > patience {
                for id in std::mem::take(&mut pending) {
                    out.not_rolled
                        .push((name(id), "its edge did not enrol again".into()));
                }
                break;
            }
            drop(conn);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // A round: greedily, sites not connected to one chosen already.
        let mut round: Vec<i64> = Vec::new();
        for id in ready {
            let Some(me) = sites.iter().find(|s| s.id == id) else {
                continue;
            };
            let clash = round.iter().any(|r| {
                sites
                    .iter()
                    .find(|s| s.id == *r)
                    .is_some_and(|o| crate::routes::topology::connected(&t, me, o))
            });
            if !clash {
                round.push(id);
            }
        }
        drop(conn);
        out.rounds += 1;
        let names: Vec<String> = round.iter().map(|id| name(*id)).collect();
        progress(&format!(
            "round {}: rolling {} ({} left after)",
            out.rounds,
            names.join(", "),
            pending.len() - round.len()
        ));
        let mut before: BTreeMap<i64, Option<String>> = BTreeMap::new();
        let mut tx = store.begin().await?;
        for id in &round {
            let (key, _) = crate::store::sites::keys(&mut tx, *id).await?;
            before.insert(*id, key);
            crate::store::sites::ask_rotation(&mut tx, *id, now_s()).await?;
            crate::routes::audit_config(
                &mut tx,
                actor,
                "site.rotate_key",
                &format!("site/{id}"),
                json!({ "site": name(*id), "why": "rotate-secrets" }),
            )
            .await
            .map_err(|e| RotateError::Api(e.message))?;
        }
        tx.commit().await?;
        let round_started = Instant::now();
        loop {
            let mut conn = store.conn().await?;
            let mut waiting = Vec::new();
            for (id, old) in &before {
                if !pending.contains(id) {
                    continue;
                }
                let (key, next) = crate::store::sites::keys(&mut conn, *id).await?;
                if key.is_some() && key != *old && next.is_none() {
                    pending.remove(id);
                    out.rolled.push(name(*id));
                } else {
                    waiting.push(*id);
                }
            }
            drop(conn);
            if waiting.is_empty() {
                break;
            }
            if round_started.elapsed() > patience {
                for id in waiting {
                    pending.remove(&id);
                    out.not_rolled.push((
                        name(id),
                        format!("its edge did not finish the roll in {patience:?}"),
                    ));
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(out)
}
