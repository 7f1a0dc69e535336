//! SLA classes, policies and failover settings.

use super::harness::*;

#[tokio::test]
async fn sla_classes_start_with_four_built_ins_that_can_be_edited_not_deleted() {
    let a = api().await;
    let t = a.admin().await;
    let r = a
        .call(Method::GET, "/api/v1/sla-classes", Some(&t), None)
        .await;
    let names: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["realtime", "interactive", "business", "bulk"]);
    assert_eq!(r.body["items"][0]["max_latency_ms"], 150);
    assert_eq!(r.body["items"][0]["builtin"], true);
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/sla-classes/1",
            Some(&t),
            Some(json!({ "max_latency_ms": 200 })),
        )
        .await;
    assert_eq!(
        (r.status, r.body["max_latency_ms"].as_i64()),
        (StatusCode::OK, Some(200)),
        "{r:?}"
    );
    let r = a
        .call(Method::DELETE, "/api/v1/sla-classes/1", Some(&t), None)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(
            Method::POST,
            "/api/v1/sla-classes",
            Some(&t),
            Some(json!({ "name": "gold", "max_loss_pct": 200.0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"][0]["field"], "max_loss_pct");
    let r = a
        .call(
            Method::POST,
            "/api/v1/sla-classes",
            Some(&t),
            Some(json!({ "name": "gold", "max_latency_ms": 80 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/sla-classes",
            Some(&t),
            Some(json!({ "name": "gold" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn policies_reference_classes_and_keep_names_and_orders_unique() {
    let a = api().await;
    let t = a.admin().await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/sla-classes",
            Some(&t),
            Some(json!({ "name": "gold" })),
        )
        .await;
    let gold = r.body["id"].as_i64().unwrap();
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "gold")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let id = r.body["id"].as_i64().unwrap();
    assert_eq!(r.body["match"]["dst_ports"], json!(["16384-32767"]));
    assert_eq!(r.body["enabled"], true);
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 20, "gold")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("video", 10, "gold")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("voice"),
        "{r:?}"
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("video", 20, "platinum")),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"][0]["field"], "class");
    let mut icmp = voice("ping", 30, "bulk");
    icmp["match"]["protocol"] = json!("icmp");
    let r = a
        .call(Method::POST, "/api/v1/policies", Some(&t), Some(icmp))
        .await;
    assert_eq!(
        r.body["error"]["details"][0]["field"], "match.protocol",
        "{r:?}"
    );
    let mut bad = voice("bad", 40, "bulk");
    bad["match"]["dst_ports"] = json!(["90-80"]);
    let r = a
        .call(Method::POST, "/api/v1/policies", Some(&t), Some(bad))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");

    // The class is in use: it stays, under its name.
    let r = a
        .call(
            Method::DELETE,
            &format!("/api/v1/sla-classes/{gold}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/sla-classes/{gold}"),
            Some(&t),
            Some(json!({ "name": "au" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(Method::GET, "/api/v1/policies?class=gold", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 1);
    let r = a
        .call_with(
            Method::PATCH,
            &format!("/api/v1/policies/{id}"),
            Some(&t),
            Some(json!({ "enabled": false, "match": { "dscp": null } })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.body["enabled"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{r:?}"
    );
    assert_eq!(r.body["match"]["dscp"], json!([]));
    assert_eq!(r.body["match"]["protocol"], "udp");
    let r = a
        .call(Method::GET, "/api/v1/policies?enabled=true", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 0);
    a.call(
        Method::DELETE,
        &format!("/api/v1/policies/{id}"),
        Some(&t),
        None,
    )
    .await;
    let r = a
        .call(
            Method::DELETE,
            &format!("/api/v1/sla-classes/{gold}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn failover_settings_have_defaults_and_validated_ranges() {
    let a = api().await;
    let t = a.admin().await;
    let r = a
        .call(Method::GET, "/api/v1/failover", Some(&t), None)
        .await;
    assert_eq!(
        (
            r.body["down_after_misses"].as_i64(),
            r.body["hold_down_ms"].as_i64()
        ),
        (Some(3), Some(5000))
    );
    assert_eq!(r.headers[header::ETAG], "\"0\"");
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/failover",
            Some(&t),
            Some(json!({ "down_after_misses": 0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"][0]["field"], "down_after_misses");
    let r = a
        .call_with(
            Method::PATCH,
            "/api/v1/failover",
            Some(&t),
            Some(json!({ "hold_down_ms": 10000 })),
            &[("if-match", "\"0\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.body["hold_down_ms"].as_i64()),
        (StatusCode::OK, Some(10000)),
        "{r:?}"
    );
    let r = a
        .call_with(
            Method::PATCH,
            "/api/v1/failover",
            Some(&t),
            Some(json!({ "hold_down_ms": 9000 })),
            &[("if-match", "\"0\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
}
