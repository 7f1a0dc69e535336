//! Login, tokens, roles, rate limits, audit and API keys.

use super::harness::*;

#[tokio::test]
async fn login_refresh_rotation_reuse_and_logout() {
    let a = api().await;
    let r = a.login(ADMIN, ADMIN_PW).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 900);
    let access = r.body["access_token"].as_str().unwrap().to_owned();
    let refresh1 = r.body["refresh_token"].as_str().unwrap().to_owned();

    let me = a
        .call(Method::GET, "/api/v1/auth/me", Some(&access), None)
        .await;
    assert_eq!(
        (me.status, me.body["email"].as_str()),
        (StatusCode::OK, Some(ADMIN))
    );
    assert!(me.body.get("password_hash").is_none());

    // A refresh token is never an access token.
    let r = a
        .call(Method::GET, "/api/v1/auth/me", Some(&refresh1), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Rotation: the first refresh gives a new pair.
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh1 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let refresh2 = r.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(refresh1, refresh2);
    // Reusing the rotated token revokes the family: the new one dies too.
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh1 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used")
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh2 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Logout ends a session.
    let r = a.login(ADMIN, ADMIN_PW).await;
    let (access, refresh) = (
        r.body["access_token"].as_str().unwrap().to_owned(),
        r.body["refresh_token"].as_str().unwrap().to_owned(),
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/logout",
            Some(&access),
            Some(json!({ "refresh_token": refresh })),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // An ended session is not a replay: it says so, and no reuse is recorded.
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("the session was ended"), "{message}");
    let audit = a
        .call(
            Method::GET,
            "/api/v1/audit?action=auth.session_revoked",
            Some(&a.admin().await),
            None,
        )
        .await;
    assert_eq!(audit.body["total"], 1, "only the replay above: {audit:?}");
}

#[tokio::test]
async fn missing_bad_expired_and_foreign_tokens_are_401() {
    let a = api().await;
    let r = a.call(Method::GET, "/api/v1/users", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = a
        .call(Method::GET, "/api/v1/users", Some("not.a.token"), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let key = std::fs::read(a.dir.path().join("state/jwt.key")).unwrap();
    let t = Tokens::new(
        &key,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(60),
    );
    let now = patronus_controller::store::now_s();
    let expired = t.access(1, Role::Admin, now - 3600).unwrap();
    let r = a
        .call(Method::GET, "/api/v1/users", Some(&expired), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let valid = t.access(1, Role::Admin, now).unwrap();
    let r = a
        .call(Method::GET, "/api/v1/users", Some(&valid), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // Signed with another key (another controller's, or a guess).
    let other = Tokens::new(
        &[1; 32],
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(60),
    );
    let r = a
        .call(
            Method::GET,
            "/api/v1/users",
            Some(&other.access(1, Role::Admin, now).unwrap()),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Wrong password and unknown account: the same answer.
    let r1 = a.login(ADMIN, "Wrong-Password-1").await;
    let r2 = a.login("nobody@example.net", "Wrong-Password-1").await;
    assert_eq!(
        (r1.status, r2.status),
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED)
    );
    assert_eq!(r1.body, r2.body);
}

#[tokio::test]
async fn each_role_below_the_required_one_is_403() {
    let a = api().await;
    let admin = a.admin().await;
    let (op_id, op) = a.user(&admin, "op@example.net", "operator").await;
    let (_, viewer) = a.user(&admin, "viewer@example.net", "viewer").await;
    let (target, _) = a.user(&admin, "target@example.net", "viewer").await;
    let new_user =
        json!({ "email": "x#N@example.net", "role": "viewer", "password": "Some-Password-9" });
    // (method, path, body, least role that may)
    let other = format!("/api/v1/users/{target}");
    let cases: Vec<(Method, String, Option<Value>, Role)> = vec![
        (Method::GET, "/api/v1/users".into(), None, Role::Admin),
        (
            Method::POST,
            "/api/v1/users".into(),
            Some(new_user),
            Role::Admin,
        ),
        (Method::GET, other.clone(), None, Role::Admin),
        (
            Method::PATCH,
            other.clone(),
            Some(json!({ "name": "V" })),
            Role::Admin,
        ),
        (
            Method::POST,
            format!("{other}/password"),
            Some(json!({ "new_password": "Another-Password-7" })),
            Role::Admin,
        ),
        (Method::GET, "/api/v1/audit".into(), None, Role::Admin),
        (Method::GET, "/api/v1/auth/me".into(), None, Role::Viewer),
        (
            Method::GET,
            format!("/api/v1/users/{op_id}"),
            None,
            Role::Operator,
        ),
        (Method::GET, "/api/v1/sites".into(), None, Role::Viewer),
        (
            Method::POST,
            "/api/v1/sites".into(),
            Some(site("s#N", &["10.#N.0.0/16"])),
            Role::Operator,
        ),
        (Method::GET, "/api/v1/sites/1".into(), None, Role::Viewer),
        (
            Method::PATCH,
            "/api/v1/sites/1".into(),
            Some(json!({ "location": "Paris" })),
            Role::Operator,
        ),
        (
            Method::GET,
            "/api/v1/sites/1/links".into(),
            None,
            Role::Viewer,
        ),
        (
            Method::POST,
            "/api/v1/sites/1/links".into(),
            Some(json!({ "name": "lte#N", "kind": "lte" })),
            Role::Operator,
        ),
        (
            Method::GET,
            "/api/v1/sites/1/links/1".into(),
            None,
            Role::Viewer,
        ),
        (
            Method::PATCH,
            "/api/v1/sites/1/links/1".into(),
            Some(json!({ "priority": 5 })),
            Role::Operator,
        ),
        // Links 5 and 6 are the operator's and the admin's from the case above (1 to 4 came
        // with sites 1 and 2).
        (
            Method::DELETE,
            "/api/v1/sites/1/links/#L".into(),
            None,
            Role::Operator,
        ),
        (Method::GET, "/api/v1/topology".into(), None, Role::Viewer),
        (
            Method::PATCH,
            "/api/v1/topology".into(),
            Some(json!({ "mode": "full-mesh" })),
            Role::Operator,
        ),
        (Method::GET, "/api/v1/paths".into(), None, Role::Viewer),
        (
            Method::GET,
            "/api/v1/sla-classes".into(),
            None,
            Role::Viewer,
        ),
        (
            Method::POST,
            "/api/v1/sla-classes".into(),
            Some(json!({ "name": "c#N" })),
            Role::Operator,
        ),
        (
            Method::GET,
            "/api/v1/sla-classes/1".into(),
            None,
            Role::Viewer,
        ),
        (
            Method::PATCH,
            "/api/v1/sla-classes/1".into(),
            Some(json!({ "max_jitter_ms": 20 })),
            Role::Operator,
        ),
        (
            Method::POST,
            "/api/v1/policies".into(),
            Some(json!({ "name": "p#N", "order": "#O", "class": "realtime" })),
            Role::Operator,
        ),
        (Method::GET, "/api/v1/policies".into(), None, Role::Viewer),
        (Method::GET, "/api/v1/failover".into(), None, Role::Viewer),
        (
            Method::PATCH,
            "/api/v1/failover".into(),
            Some(json!({ "hold_down_ms": 6000 })),
            Role::Admin,
        ),
        (Method::GET, "/api/v1/api-keys".into(), None, Role::Admin),
        (
            Method::POST,
            "/api/v1/api-keys".into(),
            Some(json!({ "name": "k#N", "role": "viewer" })),
            Role::Admin,
        ),
        (Method::GET, "/metrics".into(), None, Role::Viewer),
        (Method::GET, "/api/v1/webhooks".into(), None, Role::Admin),
        (
            Method::POST,
            "/api/v1/webhooks".into(),
            Some(json!({ "url": "http://127.0.0.1:9/h#N", "events": ["failover"] })),
            Role::Admin,
        ),
        (Method::DELETE, other.clone(), None, Role::Admin),
    ];
    // `#N` in a path or body is the caller's number, `#L` that plus 4, `"#O"` that plus 1000 (a
    // number): each caller creates or deletes its own object, so that a case never fails for
    // what the one before did.
    for (method, path, body, least) in cases {
        let callers = [
            (Role::Viewer, &viewer),
            (Role::Operator, &op),
            (Role::Admin, &admin),
        ];
        for (n, (role, token)) in callers.into_iter().enumerate() {
            let fill = |t: &str| {
                t.replace("#N", &n.to_string())
                    .replace("#L", &(n + 4).to_string())
                    .replace("\"#O\"", &(1000 + n).to_string())
            };
            let path = fill(&path);
            let body = body
                .as_ref()
                .map(|b| serde_json::from_str(&fill(&b.to_string())).unwrap());
            let r = a.call(method.clone(), &path, Some(token), body).await;
            if role >= least {
                assert!(r.status.is_success(), "{method} {path} as {role:?}: {r:?}");
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::FORBIDDEN,
                    "{method} {path} as {role:?}: {r:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn logins_are_rate_limited_per_client_and_failures_lock_the_account() {
    let a = api_with(|c| {
        c.auth_rate_per_minute = 4;
        c.lockout_after_failures = 2;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            a.login(ADMIN, "Wrong-Password-1").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    // Locked: even the right password waits.
    let r = a.login(ADMIN, ADMIN_PW).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    assert_eq!(r.headers[header::RETRY_AFTER], "60");
    // The fourth request from this address in the minute is over the limit.
    let r = a.login("other@example.net", "x").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = a.login("other@example.net", "x").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    // Refreshing and enrolling count against the same allowance: guessing a refresh token or
    // an enrolment token is no cheaper than guessing a password.
    for (path, body) in [
        ("/api/v1/auth/refresh", json!({ "refresh_token": "guess" })),
        (
            "/api/v1/enroll",
            json!({ "token": "guess", "public_key": patronus_api::key_to_base64(&[7; 32]) }),
        ),
    ] {
        let r = a.call(Method::POST, path, None, Some(body)).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{path}: {r:?}");
        assert!(r.headers.contains_key(header::RETRY_AFTER), "{path}");
    }
}

#[tokio::test]
async fn writes_are_audited_with_who_and_from_where() {
    let a = api().await;
    let admin = a.admin().await;
    let (id, _) = a.user(&admin, "op@example.net", "operator").await;
    a.call(
        Method::PATCH,
        &format!("/api/v1/users/{id}"),
        Some(&admin),
        Some(json!({ "name": "Op" })),
    )
    .await;
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=user.update",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");
    let e = &r.body["items"][0];
    assert_eq!(e["actor"], ADMIN);
    assert_eq!(e["source"], "127.0.0.7");
    assert_eq!(e["target"], format!("user/{id}"));
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?order=asc&limit=1",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body["items"][0]["action"], "user.create");
    assert_eq!(r.body["items"][0]["actor"], "bootstrap");
}

#[tokio::test]
async fn api_keys_are_shown_once_work_as_bearer_tokens_with_their_role_and_die_when_revoked() {
    let a = api().await;
    let t = a.admin().await;
    let (_, op) = a.user(&t, "op@example.net", "operator").await;
    let body = json!({ "name": "ci", "role": "viewer", "expires_in_days": 30 });
    let r = a
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Some(&op),
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Some(&t),
            Some(json!({ "name": "x", "role": "viewer", "expires_in_days": 0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(Method::POST, "/api/v1/api-keys", Some(&t), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let key = r.body["key"].as_str().unwrap().to_owned();
    let id = r.body["id"].as_i64().unwrap();
    assert!(key.starts_with("pak_") && key.len() > 40);
    // Never shown again.
    let r = a
        .call(Method::GET, "/api/v1/api-keys", Some(&t), None)
        .await;
    assert!(r.body["items"][0].get("key").is_none());
    assert!(!r.body.to_string().contains(&key));
    // A viewer key reads, and writes nothing.
    let r = a.call(Method::GET, "/api/v1/sites", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&key),
            Some(site("x", &[])),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a
        .call(Method::GET, "/api/v1/auth/me", Some(&key), None)
        .await;
    assert_eq!(
        (r.body["role"].as_str(), r.body["api_key"]["name"].as_str()),
        (Some("viewer"), Some("ci"))
    );
    let r = a
        .call(Method::GET, "/api/v1/sites", Some("pak_guessed"), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.call(
            Method::DELETE,
            &format!("/api/v1/api-keys/{id}"),
            Some(&t),
            None
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    let r = a.call(Method::GET, "/api/v1/sites", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The database holds no key, only its hash.
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    for bytes in a.stored().await {
        assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()));
        assert!(!bytes.windows(hex.len()).any(|w| w == hex.as_bytes()));
    }
}

#[tokio::test]
async fn security_events_are_in_the_audit_log() {
    let a = api_with(|c| c.lockout_after_failures = 2).await;
    let admin = a.admin().await;
    let (id, _) = a.user(&admin, "op@example.net", "operator").await;
    // Failed logins, for an account that exists and one that does not, then a lockout.
    assert_eq!(
        a.login("nobody@example.net", "Wrong-Password-1")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    for _ in 0..2 {
        a.login("op@example.net", "Wrong-Password-1").await;
    }
    // A refresh token used twice: the session is revoked.
    let pair = a.login(ADMIN, ADMIN_PW).await;
    let refresh = pair.body["refresh_token"].as_str().unwrap().to_owned();
    let body = json!({ "refresh_token": refresh });
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(Method::POST, "/api/v1/auth/refresh", None, Some(body))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A password changed by an admin, and a disabled account's login.
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/users/{id}/password"),
            Some(&admin),
            Some(json!({ "new_password": "Brand-New-Pass-1" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = a
        .call_with(
            Method::PATCH,
            &format!("/api/v1/users/{id}"),
            Some(&admin),
            Some(json!({ "disabled": true })),
            &[("x-request-id", "disable-op-1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    a.login("a-second-admin@example.net", "x").await;

    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?order=asc&limit=500",
            Some(&admin),
            None,
        )
        .await;
    let events: Vec<(String, String)> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let has = |action: &str, target: &str| events.iter().any(|(a, t)| a == action && t == target);
    assert!(has("auth.login_failed", "auth"), "{events:?}");
    assert!(
        has("auth.login_failed", &format!("user/{id}")),
        "{events:?}"
    );
    assert!(has("auth.locked", &format!("user/{id}")), "{events:?}");
    assert!(has("auth.session_revoked", "user/1"), "{events:?}");
    assert!(has("user.password", &format!("user/{id}")), "{events:?}");
    // Each record names the request that made it, as the log line does.
    let disable = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "user.update")
        .unwrap();
    assert_eq!(disable["request_id"], "disable-op-1");
}

#[tokio::test]
async fn a_401_says_how_to_authenticate() {
    let a = api().await;
    let r = a.call(Method::GET, "/api/v1/sites", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers[header::WWW_AUTHENTICATE],
        "Bearer realm=\"patronus\""
    );
    let r = a
        .call(Method::GET, "/api/v1/sites", Some("not-a-token"), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers[header::WWW_AUTHENTICATE],
        "Bearer realm=\"patronus\", error=\"invalid_token\""
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_rate_limit_and_nobody_picks_one() {
    // The harness's requests come from 127.0.0.7: here, the TLS proxy in front.
    let a = api_with(|c| {
        c.auth_rate_per_minute = 2;
        c.trusted_proxies = vec!["127.0.0.7/32".parse().unwrap()];
    })
    .await;
    let login = |xff: &'static str| {
        let a = &a;
        async move {
            a.call_with(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({ "email": "x@example.net", "password": "Wrong-Password-1" })),
                &[("x-forwarded-for", xff)],
            )
            .await
            .status
        }
    };
    // Two clients behind the proxy: each has its own allowance.
    for _ in 0..2 {
        assert_eq!(login("198.51.100.1").await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(login("198.51.100.1").await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(login("198.51.100.2").await, StatusCode::UNAUTHORIZED);
    // A client that prepends its own X-Forwarded-For is still the address the proxy saw.
    assert_eq!(
        login("203.0.113.9, 198.51.100.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // RFC 7239's Forwarded is read too.
    let r = a
        .call_with(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({ "email": "x@example.net", "password": "Wrong-Password-1" })),
            &[("forwarded", "for=\"[2001:db8::5]:4711\";proto=https")],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The audit log records the client, not the proxy.
    let r = a
        .call_with(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({ "email": ADMIN, "password": ADMIN_PW })),
            &[("x-forwarded-for", "198.51.100.7")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let t = r.body["access_token"].as_str().unwrap().to_owned();
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=auth.login",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["items"][0]["source"], "198.51.100.7", "{r:?}");

    // Without the proxy trusted, what a client writes in the header is ignored.
    let b = api_with(|c| c.auth_rate_per_minute = 2).await;
    for (i, xff) in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
        .iter()
        .enumerate()
    {
        let r = b
            .call_with(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({ "email": "x@example.net", "password": "Wrong-Password-1" })),
                &[("x-forwarded-for", xff)],
            )
            .await;
        let want = if i < 2 {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        assert_eq!(r.status, want, "{xff}");
    }
}

#[tokio::test]
async fn refused_attempts_in_the_audit_log_are_bounded_and_the_rest_is_kept() {
    let a = api().await;
    let t = a.admin().await;
    for n in 0..8 {
        let r = a
            .login(&format!("guess{n}@example.net"), "Wrong-Password-1")
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let count = |action: &'static str| {
        let store = a.state.store.clone();
        async move {
            patronus_controller::store::db::query_scalar::<i64>(
                "SELECT COUNT(*) FROM audit_log WHERE action = ?",
            )
            .bind(action)
            .fetch_one(&mut *store.conn().await.unwrap())
            .await
            .unwrap()
        }
    };
    assert_eq!(count("auth.login_failed").await, 8);
    let logins = count("auth.login").await;
    // At most five kept: the newest.
    let removed = a.state.store.trim_refused_attempts(5, 0).await.unwrap();
    assert_eq!(removed, 3);
    assert_eq!(count("auth.login_failed").await, 5);
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=auth.login_failed&order=asc",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["items"][0]["details"]["email"], "guess3@example.net");
    // Older than the cutoff: gone, whatever the count; what signed-in callers did stays.
    let removed = a
        .state
        .store
        .trim_refused_attempts(100, i64::MAX)
        .await
        .unwrap();
    assert_eq!(removed, 5);
    assert_eq!(count("auth.login").await, logins);
}
