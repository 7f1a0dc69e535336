//! `/api/v1/sites` and their links.

use super::harness::*;

#[tokio::test]
async fn sites_with_links_are_created_read_by_viewers_and_written_by_operators() {
    let a = api().await;
    let admin = a.admin().await;
    let (_, op) = a.user(&admin, "op@example.net", "operator").await;
    let (_, viewer) = a.user(&admin, "viewer@example.net", "viewer").await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&viewer),
            Some(site("hq", &["10.1.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("hq", &["10.1.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let id = r.body["id"].as_i64().unwrap();
    assert_eq!(r.headers[header::LOCATION], format!("/api/v1/sites/{id}"));
    assert_eq!(r.body["links"][0]["kind"], "mpls");
    assert_eq!(r.body["links"][0]["mtu"], 1500, "defaults filled in");
    assert_eq!(r.body["links"][1]["monthly_cost"], 40.0);
    assert_eq!(r.body["status"], "active");
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{id}"),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.body["name"].as_str()),
        (StatusCode::OK, Some("hq"))
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("hq", &["10.2.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "same name");
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("branch", &["10.1.128.0/24"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("site hq"),
        "{r:?}"
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("branch", &["10.2.0.0/24"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let r = a
        .call(
            Method::GET,
            "/api/v1/sites?sort=-name&limit=1",
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(
        (
            r.body["total"].as_i64(),
            r.body["items"][0]["name"].as_str()
        ),
        (Some(2), Some("hq"))
    );
    assert_eq!(r.body["items"][0]["links"].as_array().unwrap().len(), 2);
    let r = a
        .call(Method::GET, "/api/v1/sites?q=bran", Some(&viewer), None)
        .await;
    assert_eq!(r.body["total"], 1);
    let r = a
        .call(
            Method::GET,
            "/api/v1/sites?status=disabled",
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 0);
}

#[tokio::test]
async fn bad_sites_and_links_are_422_naming_the_field() {
    let a = api().await;
    let admin = a.admin().await;
    for (body, field) in [
        (site("a", &["10.0.0.0/33"]), "lan_prefixes"),
        (site("a", &["10.0.0.1/8x"]), "lan_prefixes"),
        (site("bad name", &[]), "name"),
        (json!({ "name": "a", "latitude": 45.0 }), "latitude"),
        (
            json!({ "name": "a", "latitude": 95.0, "longitude": 0.0 }),
            "latitude",
        ),
        (
            json!({ "name": "a", "lan_prefixes": ["10.0.0.0/8", "10.9.0.0/16"] }),
            "lan_prefixes[1]",
        ),
        (
            json!({ "name": "a", "links": [{ "name": "x", "kind": "lte", "mtu": 100 }] }),
            "links[0].mtu",
        ),
        (
            json!({ "name": "a", "links": [{ "name": "x", "kind": "lte" }, { "name": "x", "kind": "mpls" }] }),
            "links[1].name",
        ),
        (
            json!({ "name": "a", "links": [{ "name": "x", "kind": "carrier-pigeon" }] }),
            "carrier-pigeon",
        ),
        (json!({ "name": "a", "colour": "red" }), "colour"),
    ] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/sites",
                Some(&admin),
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {r:?}");
        assert!(
            r.body["error"].to_string().contains(field),
            "{field} in {r:?}"
        );
    }
}

#[tokio::test]
async fn sites_and_links_update_by_merge_patch_with_if_match_and_delete_together() {
    let a = api().await;
    let op = a.admin().await;
    let hq = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("hq", &["10.1.0.0/16"])),
        )
        .await;
    let id = hq.body["id"].as_i64().unwrap();
    a.call(
        Method::POST,
        "/api/v1/sites",
        Some(&op),
        Some(site("branch", &["10.2.0.0/16"])),
    )
    .await;
    let path = format!("/api/v1/sites/{id}");
    let r = a
        .call_with(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "description": "head office", "latitude": 45.75, "longitude": 4.85 })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.body["version"].as_i64()),
        (StatusCode::OK, Some(2)),
        "{r:?}"
    );
    assert_eq!(r.body["location"], "Lyon", "untouched keys stay");
    let r = a
        .call_with(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "description": "x" })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = a
        .call(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "latitude": null, "longitude": null })),
        )
        .await;
    assert_eq!(
        (r.status, &r.body["latitude"]),
        (StatusCode::OK, &Value::Null)
    );
    let r = a
        .call(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "lan_prefixes": ["10.2.5.0/24"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "overlaps branch");
    let r = a
        .call(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "links": [] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    // Links.
    let links = format!("{path}/links");
    let r = a
        .call(
            Method::POST,
            &links,
            Some(&op),
            Some(json!({ "name": "lte", "kind": "lte", "metered": true })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let lte = r.body["id"].as_i64().unwrap();
    let r = a
        .call(
            Method::POST,
            &links,
            Some(&op),
            Some(json!({ "name": "lte", "kind": "lte" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(
            Method::POST,
            &links,
            Some(&op),
            Some(json!({ "name": "sat", "kind": "satellite", "up_kbps": 0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"][0]["field"], "up_kbps", "{r:?}");
    let r = a
        .call_with(
            Method::PATCH,
            &format!("{links}/{lte}"),
            Some(&op),
            Some(json!({ "priority": 10 })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["priority"].as_i64(),
            r.body["metered"].as_bool()
        ),
        (StatusCode::OK, Some(10), Some(true)),
        "{r:?}"
    );
    let r = a.call(Method::GET, &links, Some(&op), None).await;
    assert_eq!(r.body["total"], 3);
    // A link is reached only through its own site.
    let other = format!("/api/v1/sites/{}/links/{lte}", id + 1);
    assert_eq!(
        a.call(Method::GET, &other, Some(&op), None).await.status,
        StatusCode::NOT_FOUND
    );
    let r = a
        .call(Method::DELETE, &format!("{links}/{lte}"), Some(&op), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    let mpls = hq.body["links"][0]["id"].as_i64().unwrap();
    let r = a.call(Method::DELETE, &path, Some(&op), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        a.call(Method::GET, &path, Some(&op), None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.call(Method::GET, &format!("{links}/{mpls}"), Some(&op), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=site.delete",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(r.body["items"][0]["details"]["links"], 2);
}

#[tokio::test]
async fn concurrent_updates_without_if_match_all_apply_and_only_a_stale_one_is_412() {
    let a = api().await;
    let t = a.admin().await;
    let id = sites(&a, &t, &["hq"]).await[0];
    let path = format!("/api/v1/sites/{id}");
    // Eight writers, five updates each, on one site, with no precondition: last writer wins,
    // and every update is applied.
    let writers = (0..8).map(|w| {
        let (a, t, path) = (&a, &t, &path);
        async move {
            for n in 0..5 {
                let body = json!({ "description": format!("writer {w} update {n}") });
                let r = a.call(Method::PATCH, path, Some(t), Some(body)).await;
                assert_eq!(r.status, StatusCode::OK, "writer {w}: {r:?}");
            }
        }
    });
    futures_join_all(writers).await;
    let r = a.call(Method::GET, &path, Some(&t), None).await;
    assert_eq!(r.body["version"], 41, "{r:?}");
    // With If-Match, a stale version is 412 and changes nothing.
    let r = a
        .call_with(
            Method::PATCH,
            &path,
            Some(&t),
            Some(json!({ "description": "stale" })),
            &[("if-match", "\"40\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{r:?}");
    let r = a.call(Method::GET, &path, Some(&t), None).await;
    assert_eq!(r.body["version"], 41);
    assert_ne!(r.body["description"], "stale");
}

#[tokio::test]
async fn a_delete_with_a_stale_if_match_is_412_and_deletes_nothing() {
    let a = api().await;
    let t = a.admin().await;
    let id = sites(&a, &t, &["hq"]).await[0];
    let path = format!("/api/v1/sites/{id}");
    let r = a
        .call(
            Method::PATCH,
            &path,
            Some(&t),
            Some(json!({ "location": "Paris" })),
        )
        .await;
    assert_eq!(r.headers[header::ETAG], "\"2\"");
    let r = a
        .call_with(
            Method::DELETE,
            &path,
            Some(&t),
            None,
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{r:?}");
    assert_eq!(
        a.call(Method::GET, &path, Some(&t), None).await.status,
        StatusCode::OK
    );
    let r = a
        .call_with(
            Method::DELETE,
            &path,
            Some(&t),
            None,
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
}

/// Runs the futures concurrently, on this task, until all are done.
async fn futures_join_all<F: std::future::Future<Output = ()>>(fs: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = fs.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}
