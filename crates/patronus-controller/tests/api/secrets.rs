//! Disaster recovery for edges and secrets: a lost edge replaced by a new machine
//! (`/api/v1/sites/{id}/replace-edge`), and the rotation after a breach
//! (`patronus_controller::secrets`, `patronus controller rotate-secrets`) taken up by a running
//! controller from its key file, or refused by one whose key file is not the new key.

use std::time::{Duration, Instant};

use patronus_controller::secrets::{self, Rotation};
use patronus_controller::store::Actor;

use super::harness::*;

fn key(byte: u8) -> String {
    patronus_api::key_to_base64(&[byte; 32])
}

/// Waits (10 s at most) until `cond` holds, checking every 20 ms: state, not a fixed sleep.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_lost_edge_is_cut_off_and_a_new_machine_enrols_with_a_key_of_its_own() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let (hq, b1) = (ids[0], ids[1]);
    let old = enrolled(&a, &t, hq, 5).await;
    let peer = enrolled(&a, &t, b1, 6).await;
    let config_of = |cred: String| {
        let a = &a;
        async move {
            a.call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
                .await
        }
    };
    assert!(
        config_of(peer.clone())
            .await
            .body
            .to_string()
            .contains(&key(5))
    );

    // A planned swap: the current machine keeps working until the new one enrols.
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{hq}/replace-edge"),
            Some(&t),
            Some(json!({ "keep_current": true })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["cut_off"], false);
    assert_eq!(config_of(old.clone()).await.status, StatusCode::OK);

    // A token handed out earlier (perhaps with the machine that is now lost).
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{hq}/enrollment-tokens"),
            Some(&t),
            Some(json!({})),
        )
        .await;
    let earlier = r.body["token"].as_str().unwrap().to_owned();
    // The machine is lost: cut off now, its key gone from its peers' configuration.
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{hq}/replace-edge"),
            Some(&t),
            Some(json!({ "expires_in_minutes": 30 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["cut_off"], true);
    let token = r.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("pet_"));
    assert_eq!(
        config_of(old.clone()).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = a
        .call(Method::GET, &format!("/api/v1/sites/{hq}"), Some(&t), None)
        .await;
    assert!(r.body["public_key"].is_null(), "{r:?}");
    let seen = config_of(peer.clone()).await;
    assert_eq!(seen.status, StatusCode::OK);
    assert!(!seen.body.to_string().contains(&key(5)), "{seen:?}");

    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(json!({ "token": earlier, "public_key": key(8) })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    assert!(r.body.to_string().contains("expired"), "{r:?}");
    // The new machine enrols with its own key; its peers get that key.
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(json!({ "token": token, "public_key": key(7) })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let new = r.body["credential"].as_str().unwrap().to_owned();
    assert_eq!(config_of(new).await.status, StatusCode::OK);
    assert!(config_of(peer).await.body.to_string().contains(&key(7)));
    // Audited, and a viewer may not do it.
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=site.replace_edge",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2, "{r:?}");
    let (_, viewer) = a.user(&t, "v@example.net", "viewer").await;
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{b1}/replace-edge"),
            Some(&viewer),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn rotating_secrets_ends_every_session_and_a_controller_without_the_new_key_signs_nothing() {
    let a = api().await;
    let t = a.admin().await;
    let login = a.login(ADMIN, ADMIN_PW).await;
    let refresh = login.body["refresh_token"].as_str().unwrap().to_owned();
    let r = a
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Some(&t),
            Some(json!({ "name": "ci", "role": "viewer", "expires_in_days": 30 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let api_key = r.body["key"].as_str().unwrap().to_owned();
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;

    // A second controller over the same database, on another machine: its own copy of the
    // key file.
    let dir_b = tempfile::tempdir().unwrap();
    let mut config_b =
        patronus_controller::config::Config::with_data_dir(dir_b.path().join("state"));
    config_b.database = a.state.config.database.clone();
    std::fs::create_dir_all(dir_b.path().join("state")).unwrap();
    std::fs::copy(&a.state.config.jwt_key_file, &config_b.jwt_key_file).unwrap();
    let b = api_on(config_b, dir_b).await;
    let tb = b.admin().await;
    // A backup from before the rotation, restored after it, must not bring the old key back.
    let work = tempfile::tempdir().unwrap();
    let (recipients, ids, _) = super::backup::keys(work.path());
    let before =
        patronus_controller::backup::create(&a.state.store, &work.path().join("b"), &recipients)
            .await
            .unwrap();

    let actor = Actor {
        id: None,
        name: "cli".into(),
        source: "test".into(),
    };
    let done = secrets::rotate(
        &a.state.store,
        &a.state.config.jwt_key_file,
        Rotation {
            revoke_api_keys: true,
            revoke_site_credentials: true,
            token_minutes: 60,
        },
        &actor,
    )
    .await
    .unwrap();
    assert!(done.sessions_ended >= 2 && done.api_keys_revoked == 1);
    assert_eq!(done.credentials_revoked, 1);
    assert_eq!(done.tokens.len(), 1, "one token per enrolled site");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&a.state.config.jwt_key_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // At once, before any periodic look: the next request with the old key's token is
    // refused, and controller a now signs with the new key from its file.
    let r = a.call(Method::GET, "/api/v1/users", Some(&t), None).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "signed with the old key"
    );
    assert!(a.state.tokens.fingerprint() == done.fingerprint && a.state.tokens.trusted());
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    let r = a
        .call(Method::GET, "/api/v1/sites", Some(&api_key), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    let r = b.call(Method::GET, "/api/v1/users", Some(&tb), None).await;
    // b's file still holds the old key: b trusts no token and signs none.
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "b accepts nothing");
    assert!(!b.state.tokens.trusted());
    let r = b.login(ADMIN, ADMIN_PW).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(r.body["error"]["code"], "signing_key_replaced");

    // Logging in again works on a; the edge enrols again with its token and its own key.
    let t2 = a.admin().await;
    let r = a.call(Method::GET, "/api/v1/users", Some(&t2), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(json!({ "token": done.tokens[0].1, "public_key": key(5) })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(done.tokens[0].0, "hq");
    let cred2 = r.body["credential"].as_str().unwrap().to_owned();
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred2), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // The new key reaches b's machine: b's periodic look takes it, and a's tokens work there.
    std::fs::copy(&a.state.config.jwt_key_file, &b.state.config.jwt_key_file).unwrap();
    tokio::spawn(patronus_controller::server::watch_signing_key(
        b.state.clone(),
        Duration::from_millis(20),
    ));
    until("b takes the new key", || b.state.tokens.trusted()).await;
    let r = b.call(Method::GET, "/api/v1/users", Some(&t2), None).await;
    assert_eq!(r.status, StatusCode::OK);
    // Nothing secret in the audit record.
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=controller.rotate_secrets",
            Some(&t2),
            None,
        )
        .await;
    let record = r.body["items"][0].to_string();
    assert!(record.contains(&done.fingerprint), "{record}");
    assert!(!record.contains(&done.tokens[0].1));

    // The backup from before is restored: the key recorded stays the new one (a's tokens keep
    // working), though what was revoked since is back (restore says so).
    patronus_controller::backup::restore(
        &a.state.store,
        &work.path().join("b"),
        &before,
        &ids,
        &actor,
        true,
    )
    .await
    .unwrap();
    let recorded = patronus_controller::store::settings::signing_key(
        &mut *a.state.store.conn().await.unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(recorded.as_deref(), Some(done.fingerprint.as_str()));
    let r = a.call(Method::GET, "/api/v1/users", Some(&t2), None).await;
    assert_eq!(r.status, StatusCode::OK);
}
