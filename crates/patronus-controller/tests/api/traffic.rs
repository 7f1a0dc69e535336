//! `/api/v1/traffic/stats`.

use super::harness::*;

#[tokio::test]
async fn traffic_stats_add_up_what_edges_sent_per_class_path_and_site_across_restarts() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let report = |started: i64, tx: u64, voice: u64| {
        json!({
            "started_ms": started,
            "paths": [{ "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": "up",
                        "rtt_ms": 20.0, "jitter_ms": 0.1, "loss_pct": 0.0,
                        "tx_bytes": tx, "rx_bytes": tx / 2, "tx_packets": tx / 100,
                        "rx_packets": tx / 200 }],
            "classes": [{ "class": "realtime", "tx_packets": voice / 100, "tx_bytes": voice },
                        { "class": "business", "tx_packets": 3, "tx_bytes": 300 }]
        })
    };
    // Running totals: 1000, the same again (an answer lost, the report sent twice), 1500;
    // then the edge restarts and has sent 200 since.
    // A late report (older totals of the same run) adds nothing either.
    for body in [
        report(1000, 1000, 500),
        report(1000, 1000, 500),
        report(1000, 1500, 800),
        report(1000, 1200, 600),
        report(2000, 200, 100),
    ] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let sum = |v: &Value, field: &str, filter: &dyn Fn(&Value) -> bool| -> i64 {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| filter(i))
            .map(|i| i[field].as_i64().unwrap())
            .sum()
    };
    let r = a
        .call(Method::GET, "/api/v1/traffic/stats", Some(&t), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let class = |c: &'static str| move |i: &Value| i["class"] == c;
    assert_eq!(sum(&r.body, "tx_bytes", &class("realtime")), 900);
    assert_eq!(sum(&r.body, "tx_bytes", &class("business")), 600);
    assert!(r.body["items"][0]["rx_bytes"].is_null(), "{r:?}");
    assert_eq!(r.body["items"][0]["site"], "hq");
    let r = a
        .call(
            Method::GET,
            "/api/v1/traffic/stats?by=path&bucket=5",
            Some(&t),
            None,
        )
        .await;
    let all = |_: &Value| true;
    assert_eq!(sum(&r.body, "tx_bytes", &all), 1700);
    assert_eq!(sum(&r.body, "rx_bytes", &all), 850);
    assert_eq!(sum(&r.body, "tx_packets", &all), 17);
    let path_id = r.body["items"][0]["path_id"].as_str().unwrap().to_owned();
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/traffic/stats?path={path_id}&site={}", ids[0]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(sum(&r.body, "tx_bytes", &all), 1700);
    let r = a
        .call(Method::GET, "/api/v1/traffic/stats?by=site", Some(&t), None)
        .await;
    assert_eq!(sum(&r.body, "tx_bytes", &all), 1700);
    assert!(r.body["items"][0].get("path_id").is_none());
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/traffic/stats?site={}", ids[1]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 0);
    for bad in [
        "bucket=1",
        "by=nope",
        "from=100&to=50",
        "by=class&path=1-2",
        "path=1-2&class=bulk",
    ] {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/traffic/stats?{bad}"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {r:?}");
    }
}

#[tokio::test]
async fn counters_at_the_top_of_their_range_never_break_the_stats() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    // Two runs of the edge, each reporting the largest count the schema allows: their sum
    // does not fit in 64 bits.
    for started in [1000, 2000] {
        let body = json!({
            "started_ms": started,
            "paths": [],
            "classes": [{ "class": "bulk", "tx_packets": i64::MAX, "tx_bytes": i64::MAX }]
        });
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    for by in ["class", "site"] {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/traffic/stats?by={by}&bucket=86400"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "by {by}: {r:?}");
    }
    let r = a
        .call(
            Method::GET,
            "/api/v1/traffic/stats?by=class",
            Some(&t),
            None,
        )
        .await;
    let bytes = r.body["items"][0]["tx_bytes"].as_f64().unwrap();
    assert!(bytes >= 1.8e19, "{r:?}");
}

#[tokio::test]
async fn traffic_is_kept_a_sample_a_minute_and_read_at_once() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let report = |started: i64, tx: u64| {
        json!({
            "started_ms": started,
            "paths": [{ "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": "up",
                        "rtt_ms": 20.0, "jitter_ms": 0.1, "loss_pct": 0.0,
                        "tx_bytes": tx, "rx_bytes": tx, "tx_packets": tx / 100,
                        "rx_packets": tx / 100 }],
            "classes": [{ "class": "bulk", "tx_packets": tx / 100, "tx_bytes": tx }]
        })
    };
    // Six reports within the minute, the edge restarting after the fourth.
    for (started, tx) in [
        (1000, 1000),
        (1000, 3000),
        (1000, 3000),
        (1000, 6000),
        (2000, 500),
        (2000, 1500),
    ] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(report(started, tx)),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let sum = |v: &Value| -> i64 {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["tx_bytes"].as_i64().unwrap())
            .sum()
    };
    let samples = || async {
        patronus_controller::store::db::query_scalar::<i64>("SELECT COUNT(*) FROM traffic_samples")
            .fetch_one(&mut *a.state.store.conn().await.unwrap())
            .await
            .unwrap()
    };
    // Nothing kept as a sample yet, and all of it read: 6000 of the first run, 1500 of the
    // second, on the path and in the class.
    assert_eq!(samples().await, 0);
    for by in ["path", "class"] {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/traffic/stats?by={by}"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(sum(&r.body), 7500, "by {by}: {r:?}");
    }
    // A minute on (the housekeeping's flush, as of then): one sample per path and class,
    // the same sums.
    let mut tx = a.state.store.begin().await.unwrap();
    let kept = patronus_controller::store::telemetry::flush_traffic(
        &mut tx,
        patronus_controller::store::now_s() + 60,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!((kept, samples().await), (2, 2));
    for by in ["path", "class"] {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/traffic/stats?by={by}"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(sum(&r.body), 7500, "by {by}: {r:?}");
    }
    // What comes after is pending again, and read with the rest.
    a.call(
        Method::POST,
        "/api/v1/edge/telemetry",
        Some(&cred),
        Some(report(2000, 2500)),
    )
    .await;
    let r = a
        .call(Method::GET, "/api/v1/traffic/stats?by=site", Some(&t), None)
        .await;
    assert_eq!(sum(&r.body), 8500, "{r:?}");
    assert_eq!(samples().await, 2);
}
