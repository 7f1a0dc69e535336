//! Start-up and serving: the data directory, the database, the signing key, the first admin,
//! then HTTP until SIGTERM or Ctrl-C, finishing the requests in flight.

use std::net::SocketAddr;

use anyhow::Context;

use crate::app::{AppState, router};
use crate::auth::{self, Role};
use crate::config::Config;
use crate::routes::users::{NewUser, add_user};
use crate::store::{Actor, Store, create_private_dir};

/// Opens everything the API needs, creating it on first start.
pub async fn prepare(config: Config, env: &[(String, String)]) -> anyhow::Result<AppState> {
    create_private_dir(&config.data_dir)?;
    let store = Store::open(&config.database).await?;
    let key = auth::load_or_create_key(&config.jwt_key_file)?;
    bootstrap_admin(&store, &config.data_dir, env).await?;
    let webhook_tls = crate::webhooks::tls_client(&config).map_err(anyhow::Error::msg)?;
    Ok(AppState::new(config, store, &key, webhook_tls))
}

/// With an empty database, `PATRONUS_ADMIN_EMAIL` (and `PATRONUS_ADMIN_PASSWORD`, or else a
/// generated password written 0600 to `<data_dir>/initial-admin-password`) create the first
/// admin. There is no other way in over the network.
async fn bootstrap_admin(
    store: &Store,
    data_dir: &std::path::Path,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    if store.user_count().await? > 0 {
        return Ok(());
    }
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(email) = get("PATRONUS_ADMIN_EMAIL") else {
        if get("PATRONUS_ADMIN_PASSWORD").is_some() {
            anyhow::bail!("PATRONUS_ADMIN_PASSWORD is set without PATRONUS_ADMIN_EMAIL");
        }
        tracing::warn!(
            "the database has no users: nobody can log in. Set PATRONUS_ADMIN_EMAIL (and \
             PATRONUS_ADMIN_PASSWORD, or one is generated) and restart, or run \
             `patronus controller add-user`"
        );
        return Ok(());
    };
    let (password, file) = match get("PATRONUS_ADMIN_PASSWORD") {
        Some(p) => (p, None),
        None => {
            // 144 random bits, and the four character classes the strength rule asks for.
            let p = format!("{}-Aa1", auth::b64url(&auth::random_bytes::<18>()));
            let path = data_dir.join("initial-admin-password");
            write_private(&path, &p)?;
            (p, Some(path))
        }
    };
    let actor = Actor {
        id: None,
        name: "bootstrap".into(),
        source: "environment".into(),
    };
    let u = add_user(
        store,
        &actor,
        NewUser {
            email,
            name: "Administrator".into(),
            role: Role::Admin,
            password,
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "creating the first admin from PATRONUS_ADMIN_EMAIL and PATRONUS_ADMIN_PASSWORD: {}",
            e.message
        )
    })?;
    match file {
        Some(path) => tracing::info!(
            email = %u.email,
            password_file = %path.display(),
            "created the first admin; the generated password is in the file (0600): log in, \
             change it, delete the file"
        ),
        None => tracing::info!(email = %u.email, "created the first admin"),
    }
    Ok(())
}

/// Writes a new file readable by its owner only; refuses to overwrite one.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

/// Serves until `shutdown` completes, then finishes the requests in flight.
pub async fn serve(
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let addr = state.config.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    on_listening(listener.local_addr()?);
    let store = state.store.clone();
    crate::webhooks::start(&state);
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving HTTP")?;
    // Closing the pool checkpoints the write-ahead log into the database file.
    store.pool().close().await;
    Ok(())
}

/// A future that completes on SIGTERM or SIGINT. The handlers are installed now, before the
/// listener is announced, so that a signal sent as soon as the controller is up is caught, not
/// fatal. Call it inside the runtime.
pub fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: finishing requests in flight");
    })
}
