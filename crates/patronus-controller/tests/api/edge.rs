//! Enrolment and the edge's own operations: configuration, long poll, telemetry, key roll.

use super::harness::*;

#[tokio::test]
async fn each_site_gets_its_peers_by_topology_and_a_change_reaches_only_the_configurations_it_concerns()
 {
    use patronus_controller::compile::{Network, compile, parse};
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2", "b3"]).await;
    for (i, id) in ids[..3].iter().enumerate() {
        enrol(&a, *id, i as u8 + 1).await;
    }
    let configs =
        |net: &Network| -> std::collections::BTreeMap<String, (u64, patronus_api::SiteConfig)> {
            compile(net)
                .unwrap()
                .iter()
                .map(|c| {
                    let s = parse(c).unwrap();
                    (s.site.to_string(), (c.version, s))
                })
                .collect()
        };
    let peers = |c: &patronus_api::SiteConfig| -> Vec<String> {
        c.peers.iter().map(|p| p.name.to_string()).collect()
    };
    let full = configs(&Network::load(&a.state.store).await.unwrap());
    // b3 has not enrolled: it has a configuration, but is nobody's peer.
    assert_eq!(full.len(), 4);
    assert_eq!(peers(&full["hq"].1), ["b1", "b2"]);
    assert_eq!(peers(&full["b3"].1), ["hq", "b1", "b2"]);
    let hq = &full["hq"].1;
    assert_eq!(hq.overlay.to_string(), "10.255.0.1");
    assert_eq!(hq.classes.len(), 4);
    assert_eq!(hq.links.len(), 2);
    let b1 = &hq.peers[0];
    assert_eq!(
        (
            b1.overlay.to_string(),
            b1.links[0].endpoint.unwrap().to_string()
        ),
        ("10.255.0.2".into(), "198.51.100.1:51820".into())
    );

    // Hub and spoke around hq: the spokes see only the hub.
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "mode": "hub-spoke", "hubs": [ids[0]] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let hs = configs(&Network::load(&a.state.store).await.unwrap());
    assert_eq!(peers(&hs["hq"].1), ["b1", "b2"]);
    assert_eq!(peers(&hs["b1"].1), ["hq"]);
    // A change to b2's link: b2 and the hub change, b1 does not.
    let link = json!({ "priority": 7 });
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[2]),
            Some(&t),
            None,
        )
        .await;
    let link_id = r.body["links"][0]["id"].as_i64().unwrap();
    a.call(
        Method::PATCH,
        &format!("/api/v1/sites/{}/links/{link_id}", ids[2]),
        Some(&t),
        Some(link),
    )
    .await;
    let after = configs(&Network::load(&a.state.store).await.unwrap());
    assert_ne!(after["b2"].0, hs["b2"].0);
    assert_ne!(after["hq"].0, hs["hq"].0);
    assert_eq!(after["b1"].0, hs["b1"].0);
    assert_eq!(after["b3"].0, hs["b3"].0);
    // A policy reaches everyone.
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let with_policy = configs(&Network::load(&a.state.store).await.unwrap());
    for site in ["hq", "b1", "b2", "b3"] {
        assert_ne!(with_policy[site].0, after[site].0, "{site}");
        assert_eq!(with_policy[site].1.policies.len(), 1);
    }
    // A disabled site has no configuration and is no one's peer.
    a.call(
        Method::PATCH,
        &format!("/api/v1/sites/{}", ids[1]),
        Some(&t),
        Some(json!({ "status": "disabled" })),
    )
    .await;
    let d = configs(&Network::load(&a.state.store).await.unwrap());
    assert!(!d.contains_key("b1"));
    assert_eq!(peers(&d["hq"].1), ["b2"]);
}

/// A policy (a network-wide setting) changes every configuration but no site: the compile
/// keeps the sites it read before, and what it makes is what a compile from scratch makes; a
/// change of a site (and one of each after another) reads them again.
#[tokio::test]
async fn a_settings_change_keeps_the_sites_read_before_and_a_site_change_reads_them_again() {
    use patronus_controller::compile::{Network, compile};
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    for (i, id) in ids.iter().enumerate() {
        enrol(&a, *id, i as u8 + 1).await;
    }
    let compiles = || {
        a.state
            .compiles
            .each_ref()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    };
    // Served (compiled with the sites kept or read), and from scratch: the same versions.
    let same_as_from_scratch = || async {
        let served = a.state.configs().await.unwrap();
        let fresh = compile(&Network::load(&a.state.store).await.unwrap()).unwrap();
        assert_eq!(served.len(), fresh.len());
        for c in fresh {
            assert_eq!(served[&c.site_id].version, c.version, "site {}", c.site_id);
            assert_eq!(served[&c.site_id].to_json(), c.to_json());
        }
    };
    same_as_from_scratch().await;
    let [read, kept] = compiles();
    assert!(read >= 1);

    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    same_as_from_scratch().await;
    assert_eq!(compiles(), [read, kept + 1]);

    // A link's priority: the sites are read again.
    let site = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[2]),
            Some(&t),
            None,
        )
        .await;
    let link = site.body["links"][0]["id"].as_i64().unwrap();
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/sites/{}/links/{link}", ids[2]),
            Some(&t),
            Some(json!({ "priority": 7 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    same_as_from_scratch().await;
    assert_eq!(compiles(), [read + 1, kept + 1]);

    // A site change, then a policy, compiled together: the site change is not lost behind
    // the later settings-only change.
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/sites/{}", ids[1]),
            Some(&t),
            Some(json!({ "status": "disabled" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("video", 20, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    same_as_from_scratch().await;
    assert_eq!(compiles(), [read + 2, kept + 1]);
    assert!(!a.state.configs().await.unwrap().contains_key(&ids[1]));
}

#[tokio::test]
async fn an_edge_enrols_once_with_a_token_and_then_acts_as_its_own_site_only() {
    let a = api().await;
    let t = a.admin().await;
    let (_, viewer) = a.user(&t, "viewer@example.net", "viewer").await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let path = format!("/api/v1/sites/{}/enrollment-tokens", ids[0]);
    assert_eq!(
        a.call(Method::POST, &path, Some(&viewer), Some(json!({})))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&t),
            Some(json!({ "expires_in_minutes": 0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a.call(Method::POST, &path, Some(&t), Some(json!({}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let token = r.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("pet_"));
    let key = patronus_api::key_to_base64(&[9; 32]);
    let enroll = |token: &str, endpoints: Value| json!({ "token": token, "public_key": key, "endpoints": endpoints });

    // A link the site does not have: refused, and the token is not spent.
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&token, json!({ "sat": "203.0.113.9:51820" }))),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&token, json!({ "inet": "203.0.113.9:51820" }))),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["site"], "hq");
    let cred = r.body["credential"].as_str().unwrap().to_owned();
    // Spent.
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&token, json!({}))),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{r:?}"
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll("pet_nothing", json!({}))),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Expired.
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&t),
            Some(json!({ "expires_in_minutes": 1 })),
        )
        .await;
    let old = r.body["token"].as_str().unwrap().to_owned();
    patronus_controller::store::db::query(
        "UPDATE enrollment_tokens SET expires_at = 0 WHERE used_at IS NULL",
    )
    .execute(&mut *a.state.store.conn().await.unwrap())
    .await
    .unwrap();
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&old, json!({}))),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{r:?}"
    );

    // The credential gets its own site's configuration, and nothing else.
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        (r.body["site"].as_str(), r.body["overlay"].as_str()),
        (Some("hq"), Some("10.255.0.1"))
    );
    assert_eq!(r.body["links"][1]["endpoint"], "203.0.113.9:51820");
    let etag = r.headers[header::ETAG].to_str().unwrap().to_owned();
    let r = a
        .call_with(
            Method::GET,
            "/api/v1/edge/config",
            Some(&cred),
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    for p in ["/api/v1/sites", "/api/v1/auth/me", "/api/v1/policies"] {
        let r = a.call(Method::GET, p, Some(&cred), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{p}: {r:?}");
    }
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&t), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a user is not an edge");
    // hq's key is now what its peers get.
    let b1 = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{}/enrollment-tokens", ids[1]),
            Some(&t),
            Some(json!({})),
        )
        .await;
    let b1_key = patronus_api::key_to_base64(&[7; 32]);
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(json!({ "token": b1.body["token"], "public_key": b1_key })),
        )
        .await;
    let b1_cred = r.body["credential"].as_str().unwrap().to_owned();
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&b1_cred), None)
        .await;
    assert_eq!(
        (r.body["site"].as_str(), r.body["peers"][0]["name"].as_str()),
        (Some("b1"), Some("hq"))
    );
    assert_eq!(r.body["peers"][0]["public_key"], key.as_str());
    // Enrolling again (a new machine) retires the old credential.
    let r = a.call(Method::POST, &path, Some(&t), Some(json!({}))).await;
    let again = r.body["token"].as_str().unwrap().to_owned();
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&again, json!({}))),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Nothing secret went into the audit log.
    let r = a
        .call(Method::GET, "/api/v1/audit?limit=500", Some(&t), None)
        .await;
    let log = r.body.to_string();
    for secret in [&token, &cred, &again] {
        assert!(!log.contains(secret.as_str()));
    }
}

/// Enrolments and site creations at once, more of them than the pool has connections: an
/// enrolment that held the write lock and asked for a second connection waited on a pool
/// emptied by writers queued behind that lock, until the busy timeout made them fail with 500
/// "database is locked" (found by `bench mesh-setup`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrolments_and_site_creations_at_once_all_succeed() {
    let a = std::sync::Arc::new(api().await);
    let t = a.admin().await;
    let names: Vec<String> = (0..24).map(|i| format!("e{i}")).collect();
    let ids = sites(
        &a,
        &t,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let mut tokens = Vec::new();
    for id in &ids {
        let r = a
            .call(
                Method::POST,
                &format!("/api/v1/sites/{id}/enrollment-tokens"),
                Some(&t),
                Some(json!({})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        tokens.push(r.body["token"].as_str().unwrap().to_owned());
    }
    let mut calls = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let (a, t) = (a.clone(), t.clone());
        calls.spawn(async move {
            let key = patronus_api::key_to_base64(&[i as u8 + 1; 32]);
            let enrol = json!({ "token": token, "public_key": key });
            let r = a
                .call(Method::POST, "/api/v1/enroll", None, Some(enrol))
                .await;
            assert_eq!(r.status, StatusCode::OK, "enrolment {i}: {r:?}");
            let new = site(&format!("n{i}"), &[&format!("10.{}.0.0/16", 100 + i)]);
            let r = a
                .call(Method::POST, "/api/v1/sites", Some(&t), Some(new))
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "site {i}: {r:?}");
        });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap();
    }
}

#[tokio::test]
async fn a_waiting_edge_gets_a_change_as_soon_as_it_is_made_and_304_when_there_is_none() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    let etag = r.headers[header::ETAG].to_str().unwrap().to_owned();
    // Nothing changes: 304 once the wait is over.
    let t0 = std::time::Instant::now();
    let r = a
        .call_with(
            Method::GET,
            "/api/v1/edge/config?wait=1",
            Some(&cred),
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(t0.elapsed() >= std::time::Duration::from_millis(900));
    let r = a
        .call(
            Method::GET,
            "/api/v1/edge/config?wait=99",
            Some(&cred),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // A change while the edge waits: the answer comes with it, not at the end of the wait.
    // Meanwhile the controller counts the poll it holds, and only while it holds it.
    let held = "\npatronus_edge_config_long_polls ";
    assert!(metrics_text(&a, &t).await.contains(&format!("{held}0\n")));
    let waiting = waiting_poll(&a, ids[0], &cred, &etag).await;
    assert!(metrics_text(&a, &t).await.contains(&format!("{held}1\n")));
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let (status, new_etag, took) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_ne!(new_etag.to_str().unwrap(), etag);
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    let m = metrics_text(&a, &t).await;
    assert!(m.contains(&format!("{held}0\n")));
    // The edge holds what it was sent: the current version, which the metrics name.
    let version = new_etag.to_str().unwrap().trim_matches('"');
    assert!(
        m.contains("patronus_site_config_current{site=\"hq\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "patronus_site_config_info{{site=\"hq\",version=\"{version}\"}} 1\n"
        )),
        "{m}"
    );
    // An edge asking for a delta from a version that is not one: behind (409, fetch it
    // whole), and of what it sent only hex digits reach a label.
    let r = a
        .call_with(
            Method::GET,
            "/api/v1/edge/config/delta",
            Some(&cred),
            None,
            &[("if-none-match", "\"a\\\"}x 1 b\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let m = metrics_text(&a, &t).await;
    assert!(
        m.contains("patronus_site_config_current{site=\"hq\"} 0\n"),
        "{m}"
    );
    assert!(
        m.contains("patronus_site_config_info{site=\"hq\",version=\"a1b\"} 1\n"),
        "{m}"
    );
}

#[tokio::test]
async fn a_site_is_online_while_its_edge_is_in_touch() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq"]).await;
    let path = format!("/api/v1/sites/{}", ids[0]);
    let r = a.call(Method::GET, &path, Some(&t), None).await;
    assert_eq!(
        (r.body["online"].as_bool(), &r.body["last_seen"]),
        (Some(false), &Value::Null)
    );
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a.call(Method::GET, &path, Some(&t), None).await;
    assert_eq!(r.body["online"], true);
    assert!(r.body["last_seen"].as_i64().unwrap() > 0);
    let r = a.call(Method::GET, "/api/v1/sites", Some(&t), None).await;
    assert_eq!(r.body["items"][0]["online"], true);
}

#[tokio::test]
async fn the_history_keeps_what_changed_and_the_live_state_every_report() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let report = |state: &str, rtt: f64, loss: f64| {
        json!({ "paths": [
            { "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": state,
              "rtt_ms": rtt, "jitter_ms": 0.4, "loss_pct": loss, "tx_bytes": 0, "rx_bytes": 0 }
        ]})
    };
    // Noise within the deadbands (RTT 2 ms and 10 %, loss 0.5 points), then an RTT that moved,
    // loss that moved, and a state that changed: the first report and the three changes.
    for (state, rtt, loss) in [
        ("up", 20.0, 0.0),
        ("up", 21.0, 0.0),
        ("up", 19.5, 0.2),
        ("up", 20.4, 0.0),
        ("up", 25.0, 0.0),
        ("up", 25.5, 0.0),
        ("up", 25.0, 1.0),
        ("down", 25.0, 1.0),
        ("down", 25.0, 1.0),
    ] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(report(state, rtt, loss)),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let r = a.call(Method::GET, "/api/v1/paths", Some(&t), None).await;
    let p = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["a"]["link"] == "mpls" && p["b"]["link"] == "mpls")
        .unwrap_or_else(|| panic!("{r:?}"))
        .clone();
    let id = p["id"].as_str().unwrap();
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{id}/metrics"),
            Some(&t),
            None,
        )
        .await;
    let kept: Vec<(f64, f64, &str)> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["rtt_ms"].as_f64().unwrap(),
                i["loss_pct"].as_f64().unwrap(),
                i["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kept,
        [
            (20.0, 0.0, "up"),
            (25.0, 0.0, "up"),
            (25.0, 1.0, "up"),
            (25.0, 1.0, "down")
        ],
        "{r:?}"
    );
    // The live state is the latest report, kept or not.
    let r = a
        .call(Method::GET, &format!("/api/v1/paths/{id}"), Some(&t), None)
        .await;
    assert_eq!(r.body["state"], "down", "{r:?}");
    let req = Request::get("/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {t}"))
        .body(Body::empty())
        .unwrap();
    let body = a.send(req).await.into_body().collect().await.unwrap();
    let text = String::from_utf8(body.to_bytes().to_vec()).unwrap();
    assert!(
        text.contains("patronus_path_measurements_total{kept=\"true\"} 4")
            && text.contains("patronus_path_measurements_total{kept=\"false\"} 5"),
        "{text}"
    );
}

#[tokio::test]
async fn edges_report_their_paths_and_the_api_shows_what_they_measured() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let report = |state: &str, rtt: f64| {
        json!({ "paths": [
            { "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": state,
              "rtt_ms": rtt, "jitter_ms": 0.4, "loss_pct": 0.0, "tx_bytes": 1000, "rx_bytes": 900 },
            { "peer": "gone", "local_link": "mpls", "remote_link": "x", "state": "down",
              "rtt_ms": null, "jitter_ms": 0.0, "loss_pct": 100.0, "tx_bytes": 0, "rx_bytes": 0 }
        ]})
    };
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&cred),
            Some(report("up", 21.5)),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&t),
            Some(report("up", 21.5)),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "only an edge reports");
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&cred),
            Some(report("sideways", 1.0)),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // The version the edge runs, from its User-Agent, once its presence is recorded (the
    // presence writer's job, which this harness does not run: written here as it would).
    patronus_controller::store::presence::record(
        &mut *a.state.store.conn().await.unwrap(),
        &[(ids[0], patronus_controller::store::now_ms())],
    )
    .await
    .unwrap();
    for ua in ["patronus-cli/0.9.1", "patronus-cli/<b>1</b>", "curl/8"] {
        let r = a
            .call_with(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(report("up", 21.5)),
                &[("user-agent", ua)],
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[0]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(
        r.body["edge_version"], "0.9.1",
        "only a plain version is kept: {r:?}"
    );
    let r = a
        .call(Method::GET, "/api/v1/paths?state=up", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");
    let p = &r.body["items"][0];
    assert_eq!(
        (
            p["a"]["link"].as_str(),
            p["b"]["site"].as_str(),
            p["rtt_ms"].as_f64()
        ),
        (Some("mpls"), Some("b1"), Some(21.5))
    );
    let id = p["id"].as_str().unwrap().to_owned();
    let r = a
        .call(Method::GET, "/api/v1/paths?state=unknown", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 3);
    a.call(
        Method::POST,
        "/api/v1/edge/telemetry",
        Some(&cred),
        Some(report("degraded", 180.0)),
    )
    .await;
    let r = a
        .call(Method::GET, &format!("/api/v1/paths/{id}"), Some(&t), None)
        .await;
    assert_eq!(
        (r.body["state"].as_str(), r.body["rtt_ms"].as_f64()),
        (Some("degraded"), Some(180.0))
    );
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{id}/metrics"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 2);
    assert_eq!(r.body["items"][1]["state"], "degraded");
    // At a resolution: the reports of a bucket summed up, the worst state kept.
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{id}/metrics?resolution=86400"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let items = r.body["items"].as_array().unwrap();
    let n: i64 = items.iter().map(|i| i["samples"].as_i64().unwrap()).sum();
    assert_eq!(n, 2, "{r:?}");
    assert!(items.iter().any(|i| i["state"] == "degraded"), "{r:?}");
    assert!(
        items
            .iter()
            .any(|i| i["rtt_ms_max"].as_f64() == Some(180.0)),
        "{r:?}"
    );
    if let [one] = items.as_slice() {
        assert_eq!(one["rtt_ms"].as_f64(), Some(100.75), "{r:?}");
    }
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{id}/metrics?resolution=1"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let req = Request::get("/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {t}"))
        .body(Body::empty())
        .unwrap();
    let text = String::from_utf8(
        a.send(req)
            .await
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(&format!("patronus_path_rtt_seconds{{path=\"{id}\"}} 0.18")),
        "{text}"
    );
    assert!(
        text.contains(&format!("patronus_path_up{{path=\"{id}\"}} 0.5")),
        "{text}"
    );
    // A failover, reported twice (an answer lost on the way back): kept once.
    let event = json!({ "paths": [], "failovers": [{
        "seq": 1, "at_ms": 1_795_000_000_000i64, "peer": "b1",
        "from_local_link": "mpls", "from_remote_link": "mpls",
        "to_local_link": "inet", "to_remote_link": "mpls",
        "reason": "path-down", "flows": 3 }] });
    for _ in 0..2 {
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(event.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let r = a
        .call(
            Method::GET,
            "/api/v1/failover/events?reason=path-down",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");
    let e = &r.body["items"][0];
    assert_eq!(
        (
            e["site"].as_str(),
            e["from_path"].as_str(),
            e["flows"].as_i64()
        ),
        (Some("hq"), Some(id.as_str()), Some(3))
    );
    assert_eq!(e["to"], "inet>mpls");
    let r = a
        .call(
            Method::GET,
            "/api/v1/failover/events?reason=sla-violated",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 0);
    // An old report is no data: the path reads unknown again, its history stays.
    a.state.live.lock().unwrap().get_mut(&id).unwrap().at -= 3600;
    let r = a
        .call(Method::GET, &format!("/api/v1/paths/{id}"), Some(&t), None)
        .await;
    assert!(
        r.body["state"].is_null() && r.body["rtt_ms"].is_null(),
        "{r:?}"
    );
    assert!(r.body["last_report"].as_i64().is_some());
}

#[tokio::test]
async fn a_key_rotation_is_asked_by_an_operator_announced_to_peers_then_committed_by_the_edge() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let (_, viewer) = a.user(&t, "v@example.net", "viewer").await;
    let path = format!("/api/v1/sites/{}/rotate-key", ids[0]);
    // Not before the site has an edge; not by a viewer.
    let r = a.call(Method::POST, &path, Some(&t), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    let hq = enrolled(&a, &t, ids[0], 5).await;
    let b1 = enrolled(&a, &t, ids[1], 6).await;
    let r = a.call(Method::POST, &path, Some(&viewer), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a.call(Method::POST, &path, Some(&t), None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    assert_eq!(r.body["key_rotation"], 1);
    let config = |cred: &str| {
        let cred = cred.to_owned();
        let a = &a;
        async move {
            a.call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
                .await
                .body
        }
    };
    assert_eq!(config(&hq).await["key_rotation"], 1);
    assert!(config(&b1).await.get("key_rotation").is_none());
    let old = patronus_api::key_to_base64(&[5; 32]);
    let new = patronus_api::key_to_base64(&[7; 32]);
    let step = |v: Value| {
        let hq = hq.clone();
        let a = &a;
        async move {
            a.call(Method::POST, "/api/v1/edge/key", Some(&hq), Some(v))
                .await
        }
    };
    // The edge announces its new key: the peers accept both.
    let r = step(json!({ "next": old })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    // Its own code: the edge finishing an interrupted roll reads it (not the message).
    assert_eq!(r.body["error"]["code"], "key_is_current", "{r:?}");
    let r = step(json!({ "commit": new })).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "not announced: {r:?}");
    let r = step(json!({ "next": new })).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let peer = config(&b1).await["peers"][0].clone();
    assert_eq!(
        (
            peer["public_key"].as_str(),
            peer["next_public_key"].as_str()
        ),
        (Some(old.as_str()), Some(new.as_str()))
    );
    // One roll at a time between connected sites: b1 waits for hq's to end.
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{}/rotate-key", ids[1]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert_eq!(r.body["error"]["code"], "peer_rolling");
    let b1_next = patronus_api::key_to_base64(&[8; 32]);
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/key",
            Some(&b1),
            Some(json!({ "next": b1_next })),
        )
        .await;
    assert_eq!(r.body["error"]["code"], "peer_rolling", "{r:?}");
    // Nor may a site announce another site's key.
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/key",
            Some(&b1),
            Some(json!({ "next": old })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[0]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["next_public_key"], new.as_str());
    // Another site's credential cannot roll hq's key: it acts as its own site only.
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/key",
            Some(&b1),
            Some(json!({ "commit": new })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    // Committed (twice: an answer lost): the new key is the site's, the old one goes.
    for _ in 0..2 {
        let r = step(json!({ "commit": new })).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let peer = config(&b1).await["peers"][0].clone();
    assert_eq!(peer["public_key"], new.as_str());
    assert!(peer.get("next_public_key").is_none(), "{peer}");
    let r = a
        .call(Method::GET, "/api/v1/audit?limit=500", Some(&t), None)
        .await;
    let text = r.body.to_string();
    assert!(
        text.contains("site.rotate_key") && text.contains("site.key_rotated"),
        "{text}"
    );
}

#[tokio::test]
async fn a_delta_carries_only_what_changed_and_makes_the_same_configuration() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    let hq = enrolled(&a, &t, ids[0], 5).await;
    enrolled(&a, &t, ids[1], 6).await;
    let full = |cred: &str| {
        let cred = cred.to_owned();
        let a = &a;
        async move {
            let r = a
                .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
                .await;
            let etag = r.headers[header::ETAG].to_str().unwrap().to_owned();
            let c: patronus_api::SiteConfig = serde_json::from_value(r.body).unwrap();
            (etag, c)
        }
    };
    let delta = |etag: &str| {
        let (hq, etag) = (hq.clone(), etag.to_owned());
        let a = &a;
        async move {
            a.call_with(
                Method::GET,
                "/api/v1/edge/config/delta",
                Some(&hq),
                None,
                &[("if-none-match", etag.as_str())],
            )
            .await
        }
    };
    let (e1, c1) = full(&hq).await;
    let r = delta(&e1).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    // A policy: only the shared fields travel.
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = delta(&e1).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert!(
        r.body.get("head").is_none() || r.body["head"].is_null(),
        "{r:?}"
    );
    assert_eq!(r.body["upsert"], json!([]));
    assert_eq!(r.body["shared"]["policies"][0]["name"], "voice");
    let d: patronus_api::ConfigDelta = serde_json::from_value(r.body.clone()).unwrap();
    let (e2, c2) = full(&hq).await;
    assert_eq!(format!("\"{}\"", d.version), e2);
    assert_eq!(d.apply(&c1), c2);
    // A peer enrols: it is the one peer sent.
    enrolled(&a, &t, ids[2], 7).await;
    let r = delta(&e2).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let d: patronus_api::ConfigDelta = serde_json::from_value(r.body.clone()).unwrap();
    assert_eq!(d.upsert.len(), 1, "{r:?}");
    assert_eq!(d.upsert[0].name.as_str(), "b2");
    assert!(d.shared.is_none() && d.remove.is_empty());
    let (e3, c3) = full(&hq).await;
    assert_eq!(d.apply(&c2), c3);
    // A peer disabled: it goes, by name.
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/sites/{}", ids[1]),
            Some(&t),
            Some(json!({ "status": "disabled" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let r = delta(&e3).await;
    let d: patronus_api::ConfigDelta = serde_json::from_value(r.body.clone()).unwrap();
    assert_eq!(
        d.remove.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["b1"],
        "{r:?}"
    );
    assert!(
        d.upsert.is_empty() && d.head.is_none() && d.shared.is_none(),
        "{r:?}"
    );
    let (_, c4) = full(&hq).await;
    assert_eq!(d.apply(&c3), c4);
    // An edge several changes behind still gets a delta, from the version it holds.
    let r = delta(&e1).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let d: patronus_api::ConfigDelta = serde_json::from_value(r.body.clone()).unwrap();
    assert_eq!(d.apply(&c1), c4);
    // A version the controller no longer has; no version at all.
    let r = delta("\"0000000000000000\"").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert_eq!(r.body["error"]["code"], "base_unknown");
    let r = a
        .call(Method::GET, "/api/v1/edge/config/delta", Some(&hq), None)
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
}

#[tokio::test]
async fn only_the_writes_that_change_a_configuration_bump_its_generation() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let g = a.state.store.generation();
    // Writes that change what no edge runs: a user, an API key, a webhook, an enrolment
    // token, a refused update.
    a.user(&t, "op@example.net", "operator").await;
    for (path, body) in [
        (
            "/api/v1/api-keys".to_owned(),
            json!({ "name": "ci", "role": "viewer" }),
        ),
        (
            "/api/v1/webhooks".to_owned(),
            json!({ "url": "http://127.0.0.1:9/h", "events": ["failover"] }),
        ),
        (
            format!("/api/v1/sites/{}/enrollment-tokens", ids[0]),
            json!({}),
        ),
    ] {
        let r = a.call(Method::POST, &path, Some(&t), Some(body)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{path}: {r:?}");
    }
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/sites/{}", ids[0]),
            Some(&t),
            Some(json!({ "latitude": 500.0, "longitude": 0.0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.state.store.generation(), g);
    // One that does, once.
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/sites/{}", ids[0]),
            Some(&t),
            Some(json!({ "lan_prefixes": ["10.9.0.0/16"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(a.state.store.generation(), g + 1);
    // The generation is the store's: a controller opened on the same database starts from it.
    let stored: i64 =
        patronus_controller::store::db::query_scalar("SELECT generation FROM config_generation")
            .fetch_one(&mut *a.state.store.conn().await.unwrap())
            .await
            .unwrap();
    assert_eq!(stored, g + 1);
}

#[tokio::test]
async fn a_reason_or_kind_from_a_newer_edge_is_kept_as_unknown_and_a_bad_filter_is_422() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    // A reason and a kind this controller does not know: the report is taken (an edge resends
    // what was refused, so refusing it would stall all of its telemetry).
    let report = json!({ "paths": [],
        "failovers": [{ "seq": 1, "at_ms": 1_795_000_000_000i64, "peer": "b1",
            "from_local_link": "mpls", "from_remote_link": "mpls",
            "to_local_link": "inet", "to_remote_link": "mpls",
            "reason": "returned", "flows": 1 }],
        "path_events": [{ "seq": 1, "at_ms": 1_795_000_000_000i64, "peer": "b1",
            "local_link": "mpls", "remote_link": "mpls", "kind": "wobbling" }] });
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&cred),
            Some(report),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let r = a
        .call(
            Method::GET,
            "/api/v1/failover/events?reason=unknown",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");
    assert_eq!(r.body["items"][0]["reason"], "unknown");
    // A state it does not know is refused, by name: it would have no meaning here.
    let bad = json!({ "paths": [{ "peer": "b1", "local_link": "mpls", "remote_link": "mpls",
        "state": "wobbly", "rtt_ms": 1.0, "jitter_ms": 0.0, "loss_pct": 0.0,
        "tx_bytes": 0, "rx_bytes": 0 }] });
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&cred),
            Some(bad),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    // Filters take the documented values only.
    for q in [
        "/api/v1/failover/events?reason=bogus",
        "/api/v1/paths?state=bogus",
    ] {
        let r = a.call(Method::GET, q, Some(&t), None).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{q}: {r:?}");
    }
}
