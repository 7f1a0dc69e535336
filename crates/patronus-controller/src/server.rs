//! Start-up and serving: the data directory, the database, the signing key, the first admin,
//! then HTTP until SIGTERM or Ctrl-C, finishing the requests in flight.

use std::net::SocketAddr;

use anyhow::Context;

use crate::app::{AppState, router};
use crate::auth::{self, Role};
use crate::config::Config;
use crate::routes::users::{NewUser, create_user};
use crate::store::{Actor, Store, create_private_dir};

/// Opens everything the API needs, creating it on first start.
pub async fn prepare(config: Config, env: &[(String, String)]) -> anyhow::Result<AppState> {
    create_private_dir(&config.data_dir)?;
    let store = Store::open(&config.database).await?;
    let key = auth::load_or_create_key(&config.jwt_key_file)?;
    bootstrap_admin(&store, env).await?;
    Ok(AppState::new(config, store, &key))
}

/// With an empty database, `PATRONUS_ADMIN_EMAIL` and `PATRONUS_ADMIN_PASSWORD` create the first
/// admin. There is no other way in over the network.
async fn bootstrap_admin(store: &Store, env: &[(String, String)]) -> anyhow::Result<()> {
    if store.user_count().await? > 0 {
        return Ok(());
    }
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match (get("PATRONUS_ADMIN_EMAIL"), get("PATRONUS_ADMIN_PASSWORD")) {
        (Some(email), Some(password)) => {
            let actor = Actor {
                id: None,
                name: "bootstrap".into(),
                source: "environment".into(),
            };
            let u = create_user(
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
            .map_err(|e| anyhow::anyhow!("creating the first admin from PATRONUS_ADMIN_EMAIL and PATRONUS_ADMIN_PASSWORD: {}", e.message))?;
            tracing::info!(email = %u.email, "created the first admin");
        }
        (None, None) => {
            tracing::warn!(
                "the database has no users: nobody can log in. Set PATRONUS_ADMIN_EMAIL and \
                 PATRONUS_ADMIN_PASSWORD and restart, or run `patronus controller add-user`"
            );
        }
        _ => anyhow::bail!(
            "set both PATRONUS_ADMIN_EMAIL and PATRONUS_ADMIN_PASSWORD to create the first admin"
        ),
    }
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
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving HTTP")
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}
