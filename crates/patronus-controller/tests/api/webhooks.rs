//! Webhooks: signed, retried, verified deliveries.

use super::harness::*;

#[tokio::test]
async fn webhooks_get_signed_events_retried_until_delivered_with_their_status_in_the_api() {
    let a = api().await;
    let t = a.admin().await;
    patronus_controller::webhooks::start(&a.state);
    let (url, got) = receiver(1).await;
    // Refused: not http(s), no events, an unknown event.
    for (body, field) in [
        (
            json!({ "url": "ftp://example.net/h", "events": ["failover"] }),
            "url",
        ),
        (json!({ "url": url, "events": [] }), "events"),
    ] {
        let r = a
            .call(Method::POST, "/api/v1/webhooks", Some(&t), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
        assert!(
            r.body["error"]["details"].to_string().contains(field),
            "{r:?}"
        );
    }
    let r = a
        .call(
            Method::POST,
            "/api/v1/webhooks",
            Some(&t),
            Some(json!({ "url": url, "events": ["sideways"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/webhooks",
            Some(&t),
            Some(json!({
                "url": url,
                "events": ["config.changed", "site.online", "site.offline", "path.down",
                           "path.up", "sla.violated", "failover"],
                "description": "the NOC"
            })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let hook = r.body["id"].as_i64().unwrap();
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/webhooks/{hook}"),
            Some(&t),
            None,
        )
        .await;
    assert!(r.body.get("secret").is_none(), "shown once: {r:?}");

    // A change of the desired state: the first attempt gets a 500, the retry (after about a
    // second) gets through; both are signed, and carry the same event id.
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let (h, v) = wait_for(&got, "config.changed").await;
    assert_eq!(v["data"]["action"], "site.create");
    assert_eq!(v["data"]["target"], format!("site/{}", ids[0]));
    assert_eq!(v["data"]["actor"], ADMIN);
    assert!(v["data"]["generation"].as_i64().unwrap() >= 1, "{v}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/webhooks/{hook}/deliveries?event=config.changed"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        let first = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["event_id"] == v["id"])
            .cloned()
            .unwrap();
        if first["status"] == "delivered" {
            assert_eq!(first["attempts"], 2, "{first}");
            assert_eq!(first["last_status"], 204, "{first}");
            assert_eq!(first["payload"], v);
            break;
        }
        assert_eq!(first["status"], "pending", "{first}");
        assert!(tokio::time::Instant::now() < deadline, "{first}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    {
        let g = got.lock().unwrap();
        let same: Vec<_> = g
            .iter()
            .filter(|(_, b)| serde_json::from_str::<Value>(b).unwrap()["id"] == v["id"])
            .collect();
        assert_eq!(same.len(), 2);
        for (h, b) in same {
            assert!(signed_with(&secret, h, b), "bad signature");
            assert!(!signed_with("whsec_other", h, b));
            assert_eq!(h["x-patronus-event"], "config.changed");
        }
    }
    assert_eq!(h["content-type"], "application/json");

    // An edge: online, a path down, a failover.
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let (_, v) = wait_for(&got, "site.online").await;
    assert_eq!(v["data"]["site"], "hq");
    let report = json!({
        "paths": [{ "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": "down",
                    "rtt_ms": null, "jitter_ms": 0.0, "loss_pct": 100.0,
                    "tx_bytes": 0, "rx_bytes": 0 }],
        "failovers": [{ "seq": 1, "at_ms": 1_795_000_000_000i64, "peer": "b1",
                        "from_local_link": "mpls", "from_remote_link": "mpls",
                        "to_local_link": "inet", "to_remote_link": "mpls",
                        "reason": "path-down", "flows": 3 }],
        "path_events": [{ "seq": 1, "at_ms": 1_794_999_999_940i64, "peer": "b1",
                          "local_link": "mpls", "remote_link": "mpls", "kind": "down",
                          "silent_ms": 64.5, "flows": 3 }]
    });
    for _ in 0..2 {
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(report.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let (_, v) = wait_for(&got, "path.down").await;
    assert_eq!(
        (v["data"]["from"].as_str(), v["data"]["to"].as_str()),
        (Some("hq/mpls"), Some("b1/mpls"))
    );
    // At the moment the edge saw it, to the millisecond.
    assert_eq!(v["data"]["at_ms"], 1_794_999_999_940i64);
    assert_eq!(v["data"]["silent_ms"], 64.5);
    let (_, v) = wait_for(&got, "failover").await;
    assert_eq!(
        (v["data"]["reason"].as_str(), v["data"]["flows"].as_u64()),
        (Some("path-down"), Some(3))
    );
    // A report repeated is not news: one path.down, one failover. The deliveries are queued by
    // the transaction that keeps the report, so once it is answered the table is final.
    let queued = |kind: &'static str| {
        let store = a.state.store.clone();
        async move {
            patronus_controller::store::db::query_scalar::<i64>(
                "SELECT COUNT(*) FROM webhook_deliveries WHERE event = ?",
            )
            .bind(kind)
            .fetch_one(&mut *store.conn().await.unwrap())
            .await
            .unwrap()
        }
    };
    assert_eq!(
        (queued("path.down").await, queued("failover").await),
        (1, 1),
        "{:?}",
        got.lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect::<Vec<_>>()
    );
    let up = report["paths"][0].clone();
    let mut up = json!({ "paths": [up], "path_events": [
        { "seq": 2, "at_ms": 1_795_000_004_000i64, "peer": "b1", "local_link": "mpls",
          "remote_link": "mpls", "kind": "up", "rtt_ms": 20.0 },
        { "seq": 3, "at_ms": 1_795_000_009_000i64, "peer": "b1", "local_link": "mpls",
          "remote_link": "mpls", "kind": "sla-violated", "class": "realtime",
          "rtt_ms": 180.5, "jitter_ms": 4.0, "loss_pct": 0.0 }] });
    up["paths"][0]["state"] = json!("up");
    up["paths"][0]["rtt_ms"] = json!(20.0);
    a.call(
        Method::POST,
        "/api/v1/edge/telemetry",
        Some(&cred),
        Some(up),
    )
    .await;
    wait_for(&got, "path.up").await;
    // The class the path broke, and what it measured, at the edge's millisecond.
    let (_, v) = wait_for(&got, "sla.violated").await;
    assert_eq!(
        (
            v["data"]["class"].as_str(),
            v["data"]["rtt_ms"].as_f64(),
            v["data"]["at_ms"].as_i64()
        ),
        (Some("realtime"), Some(180.5), Some(1_795_000_009_000)),
        "{v}"
    );
    // The path's history of state changes.
    let path_id = v_path_id(&a, &t).await;
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{path_id}/events"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let kinds: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["down", "up", "sla-violated"], "{r:?}");
    assert_eq!(r.body["items"][0]["detail"]["flows"], 3);
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{path_id}/events?kind=sideways"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    // The edge falls silent: once it has not been heard from for 15 s, its site is
    // announced offline, with when it was last seen.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(25);
    let offline = loop {
        let found = got.lock().unwrap().iter().find_map(|(_, b)| {
            let v: Value = serde_json::from_str(b).unwrap();
            (v["type"] == "site.offline").then_some(v)
        });
        if let Some(v) = found {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "no site.offline");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(offline["data"]["site"], "hq", "{offline}");
    assert!(offline["data"]["last_seen"].is_i64(), "{offline}");
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[0]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(
        (r.body["online"].as_bool(), r.body["last_seen"].as_i64()),
        (Some(false), offline["data"]["last_seen"].as_i64()),
        "{r:?}"
    );

    // A ping on request; a disabled webhook hears nothing, and cannot be pinged.
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/webhooks/{hook}/ping"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let (_, v) = wait_for(&got, "ping").await;
    assert_eq!(v["id"], r.body["event_id"]);
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/webhooks/{hook}"),
            Some(&t),
            Some(json!({ "enabled": false })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["enabled"], false);
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/webhooks/{hook}/ping"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    // A change made while it is disabled queues nothing for it: config.changed is queued by the
    // write's own transaction, so the table is final once the write is answered.
    let deliveries = || async {
        patronus_controller::store::db::query_scalar::<i64>(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE webhook_id = ?",
        )
        .bind(hook)
        .fetch_one(&mut *a.state.store.conn().await.unwrap())
        .await
        .unwrap()
    };
    let before = deliveries().await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("b2", &["10.9.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(deliveries().await, before);
    // Deleted with its deliveries; the secret is in no audit record.
    let r = a
        .call(
            Method::DELETE,
            &format!("/api/v1/webhooks/{hook}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let left: i64 =
        patronus_controller::store::db::query_scalar("SELECT COUNT(*) FROM webhook_deliveries")
            .fetch_one(&mut *a.state.store.conn().await.unwrap())
            .await
            .unwrap();
    assert_eq!(left, 0);
    let r = a
        .call(Method::GET, "/api/v1/audit?limit=500", Some(&t), None)
        .await;
    assert!(r.body.to_string().contains("webhook.create"));
    assert!(!r.body.to_string().contains(&secret));
}

#[tokio::test]
async fn https_webhooks_are_verified_against_the_configured_ca_and_refused_otherwise() {
    // A CA of our own, given to the controller as `webhook_ca_file`.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Patronus test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let trusted = rcgen::Issuer::new(ca, ca_key);
    // Another CA, that nobody told the controller about.
    let rogue_key = rcgen::KeyPair::generate().unwrap();
    let mut rogue = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    rogue.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let rogue = rcgen::Issuer::new(rogue, rogue_key);

    let a = api_with(|c| c.webhook_ca_file = Some(ca_file.clone())).await;
    let t = a.admin().await;
    patronus_controller::webhooks::start(&a.state);
    let (good_port, good) = tls_receiver(&trusted).await;
    let (bad_port, bad) = tls_receiver(&rogue).await;
    let mut hooks = Vec::new();
    for port in [good_port, bad_port] {
        let url = format!("https://localhost:{port}/hook");
        let r = a
            .call(
                Method::POST,
                "/api/v1/webhooks",
                Some(&t),
                Some(json!({ "url": url, "events": ["failover"] })),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        let id = r.body["id"].as_i64().unwrap();
        let r = a
            .call(
                Method::POST,
                &format!("/api/v1/webhooks/{id}/ping"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        hooks.push(id);
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut last = Vec::new();
        for id in &hooks {
            let r = a
                .call(
                    Method::GET,
                    &format!("/api/v1/webhooks/{id}/deliveries"),
                    Some(&t),
                    None,
                )
                .await;
            last.push(r.body["items"][0].clone());
        }
        let (ok, refused) = (&last[0], &last[1]);
        if ok["status"] == "delivered" && refused["attempts"].as_i64() >= Some(1) {
            assert_eq!(ok["last_status"], 204);
            assert_eq!(refused["status"], "pending", "retried later: {refused}");
            let why = refused["last_error"].as_str().unwrap_or("");
            assert!(why.contains("TLS") && why.contains("certificate"), "{why}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ok} {refused}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(good.lock().unwrap().len(), 1);
    assert!(
        bad.lock().unwrap().is_empty(),
        "nothing sent to an untrusted server"
    );
    // A CA file that holds no certificate stops the controller at start, by name.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let mut config = Config::with_data_dir(dir.path().join("other"));
    config.webhook_ca_file = Some(empty);
    let e = patronus_controller::server::prepare(config, &[])
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("webhook_ca_file") && e.contains("no PEM certificate"),
        "{e}"
    );
}

#[tokio::test]
async fn webhooks_to_internal_addresses_are_refused_at_creation_and_at_every_delivery() {
    let a = api_with(|c| c.webhook_allowed_networks.clear()).await;
    let t = a.admin().await;
    patronus_controller::webhooks::start(&a.state);
    let (url, got) = receiver(0).await;
    for bad in [
        url.as_str(),
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://localhost:9000/",
        "http://10.1.2.3/hook",
        "https://192.168.1.1/",
    ] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/webhooks",
                Some(&t),
                Some(json!({ "url": bad, "events": ["failover"] })),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {r:?}");
        assert_eq!(r.body["error"]["details"][0]["field"], "url", "{r:?}");
        let problem = r.body["error"]["details"][0]["problem"].as_str().unwrap();
        assert!(problem.contains("webhook_allowed_networks"), "{problem}");
    }
    // A public address is taken. Then its name comes to mean the controller's own loopback
    // (DNS rebinding, or an operator's mistake): written here straight into the store.
    let r = a
        .call(
            Method::POST,
            "/api/v1/webhooks",
            Some(&t),
            Some(json!({ "url": "http://93.184.216.34/hook", "events": ["failover"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let hook = r.body["id"].as_i64().unwrap();
    patronus_controller::store::db::query("UPDATE webhooks SET url = ? WHERE id = ?")
        .bind(&url)
        .bind(hook)
        .execute(&mut *a.state.store.conn().await.unwrap())
        .await
        .unwrap();
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/webhooks/{hook}/ping"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    // The attempt is recorded as refused before any connection is made: the receiver got
    // nothing, and the delivery says why.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let d = loop {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/webhooks/{hook}/deliveries"),
                Some(&t),
                None,
            )
            .await;
        let d = r.body["items"][0].clone();
        if d["attempts"].as_i64().unwrap_or(0) >= 1 {
            break d;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(d["status"], "pending", "{d}");
    assert!(d["last_status"].is_null(), "{d}");
    let error = d["last_error"].as_str().unwrap();
    assert!(
        error.contains("refused") && error.contains("loopback"),
        "{error}"
    );
    assert!(got.lock().unwrap().is_empty());
}
