//! `/api/v1/users`.

use super::harness::*;

#[tokio::test]
async fn users_validate_conflict_paginate_and_update_with_if_match() {
    let a = api().await;
    let admin = a.admin().await;
    // 422 naming every bad field.
    let r = a
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(json!({ "email": "not an email", "role": "viewer", "password": "short" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let fields: Vec<&str> = r.body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "password"]);
    // An unknown role or field, or a missing one: 422 naming it; broken JSON: 400.
    for (body, want) in [
        (
            json!({ "email": "a@b.c", "role": "god", "password": "Some-Password-9" }),
            "god",
        ),
        (
            json!({ "email": "a@b.c", "role": "viewer", "password": "Some-Password-9", "x": 1 }),
            "x",
        ),
        (json!({ "email": "a@b.c", "role": "viewer" }), "password"),
    ] {
        let r = a
            .call(Method::POST, "/api/v1/users", Some(&admin), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains(want),
            "{r:?}"
        );
    }
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/users")
        .header(header::AUTHORIZATION, format!("Bearer {admin}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"email\": "))
        .unwrap();
    let resp = a.send(req).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let headers = resp.headers().clone();
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    // The one error shape, and what the document says of a 400 here.
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    schema::check_response("post".into(), "/api/v1/users", 400, &headers, &body);

    let r = a
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(json!({ "email": "Bob@Example.net", "name": "Bob", "role": "operator", "password": "Some-Password-9" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let id = r.body["id"].as_i64().unwrap();
    assert_eq!(r.headers[header::LOCATION], format!("/api/v1/users/{id}"));
    assert_eq!(r.headers[header::ETAG], "\"1\"");
    // Email is case-insensitive: 409.
    let r = a
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(json!({ "email": "bob@example.net", "role": "viewer", "password": "Some-Password-9" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    for i in 0..5 {
        a.user(&admin, &format!("v{i}@example.net"), "viewer").await;
    }
    let r = a
        .call(
            Method::GET,
            "/api/v1/users?role=viewer&limit=2&offset=1&sort=-email",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["total"], 5);
    let emails: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails, ["v3@example.net", "v2@example.net"]);
    let r = a
        .call(Method::GET, "/api/v1/users?q=bob", Some(&admin), None)
        .await;
    assert_eq!(r.body["total"], 1);
    for bad in [
        "limit=0",
        "limit=501",
        "offset=-1",
        "sort=password_hash",
        "limit=x",
        "role=god",
    ] {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/users?{bad}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {r:?}");
    }

    // Optimistic concurrency.
    let path = format!("/api/v1/users/{id}");
    let r = a
        .call_with(
            Method::PATCH,
            &path,
            Some(&admin),
            Some(json!({ "name": "Robert" })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.body["version"].as_i64()),
        (StatusCode::OK, Some(2)),
        "{r:?}"
    );
    let r = a
        .call_with(
            Method::PATCH,
            &path,
            Some(&admin),
            Some(json!({ "name": "Rob" })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{r:?}");
    let r = a.call(Method::GET, &path, Some(&admin), None).await;
    assert_eq!(r.body["name"], "Robert");
    // 404s.
    for p in ["/api/v1/users/9999", "/api/v1/users/abc"] {
        let r = a.call(Method::GET, p, Some(&admin), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{p}");
    }
}

#[tokio::test]
async fn the_last_admin_stays_and_a_disabled_user_is_out_at_once() {
    let a = api().await;
    let admin = a.admin().await;
    let me = a
        .call(Method::GET, "/api/v1/auth/me", Some(&admin), None)
        .await;
    let admin_id = me.body["id"].as_i64().unwrap();
    let path = format!("/api/v1/users/{admin_id}");
    let r = a
        .call(
            Method::PATCH,
            &path,
            Some(&admin),
            Some(json!({ "role": "viewer" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    let r = a.call(Method::DELETE, &path, Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    let (id, op) = a.user(&admin, "op@example.net", "operator").await;
    let r = a
        .call(Method::GET, "/api/v1/auth/me", Some(&op), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/users/{id}"),
            Some(&admin),
            Some(json!({ "disabled": true })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(Method::GET, "/api/v1/auth/me", Some(&op), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = a.login("op@example.net", "Some-Password-9").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn changing_a_password_needs_the_current_one_and_ends_sessions() {
    let a = api().await;
    let admin = a.admin().await;
    let (id, op) = a.user(&admin, "op@example.net", "operator").await;
    let refresh = a.login("op@example.net", "Some-Password-9").await.body["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/users/{id}/password");
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&op),
            Some(json!({ "new_password": "Brand-New-Pass-1" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&op),
            Some(json!({ "current_password": "Wrong-Password-9", "new_password": "Brand-New-Pass-1" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&op),
            Some(json!({ "current_password": "Some-Password-9", "new_password": "weak" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&op),
            Some(json!({ "current_password": "Some-Password-9", "new_password": "Brand-New-Pass-1" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.login("op@example.net", "Some-Password-9").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        a.login("op@example.net", "Brand-New-Pass-1").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_wrong_current_password_counts_as_a_failed_login_and_locks_the_account() {
    let a = api_with(|c| c.lockout_after_failures = 3).await;
    let admin = a.admin().await;
    let (id, op) = a.user(&admin, "op@example.net", "operator").await;
    let path = format!("/api/v1/users/{id}/password");
    let guess = |n: usize| json!({ "current_password": format!("Guess-Number-{n}"), "new_password": "Brand-New-Pass-1" });
    // A stolen access token guesses the password: each wrong guess is a failed login.
    for n in 0..3 {
        let r = a.call(Method::POST, &path, Some(&op), Some(guess(n))).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    }
    // Locked: the next guess is refused unchecked, and so is the login with the right password.
    let r = a.call(Method::POST, &path, Some(&op), Some(guess(3))).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    let r = a.login("op@example.net", "Some-Password-9").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    // The right current password is refused too while the account is locked.
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&op),
            Some(json!({ "current_password": "Some-Password-9", "new_password": "Brand-New-Pass-1" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    // Each guess and the lockout are in the audit log, with where they came from.
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=user.password_failed",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 3, "{r:?}");
    assert_eq!(r.body["items"][0]["target"], format!("user/{id}"));
    assert_eq!(r.body["items"][0]["source"], "127.0.0.7");
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=auth.locked",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");
    assert_eq!(r.body["items"][0]["details"]["email"], "op@example.net");
}

#[tokio::test]
async fn password_changes_are_rate_limited_per_client_like_logins() {
    let a = api_with(|c| c.auth_rate_per_minute = 3).await;
    // The admin's login takes one of the three.
    let admin = a.admin().await;
    let me = a
        .call(Method::GET, "/api/v1/auth/me", Some(&admin), None)
        .await;
    let path = format!("/api/v1/users/{}/password", me.body["id"]);
    let wrong =
        json!({ "current_password": "Wrong-Password-1", "new_password": "Brand-New-Pass-1" });
    for _ in 0..2 {
        let r = a
            .call(Method::POST, &path, Some(&admin), Some(wrong.clone()))
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    }
    let r = a.call(Method::POST, &path, Some(&admin), Some(wrong)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
}
