//! `/api/v1/topology` and the paths it makes.

use super::harness::*;

#[tokio::test]
async fn overlay_addresses_are_allocated_without_collisions_and_renumbered_with_the_prefix() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    let addr = |r: &Reply| r.body["overlay_address"].as_str().unwrap().to_owned();
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[1]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(addr(&r), "10.255.0.2");
    // A freed address is the next one given.
    a.call(
        Method::DELETE,
        &format!("/api/v1/sites/{}", ids[1]),
        Some(&t),
        None,
    )
    .await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("b3", &["10.9.0.0/16"])),
        )
        .await;
    assert_eq!(addr(&r), "10.255.0.2");
    // A LAN inside the overlay is refused.
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("b4", &["10.255.8.0/24"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");

    let r = a
        .call(Method::GET, "/api/v1/topology", Some(&t), None)
        .await;
    assert_eq!(
        (r.body["mode"].as_str(), r.body["overlay_prefix"].as_str()),
        (Some("full-mesh"), Some("10.255.0.0/16"))
    );
    assert_eq!(r.body["addresses"].as_array().unwrap().len(), 3);
    let v = r.body["version"].as_i64().unwrap();
    for (patch, status) in [
        (
            json!({ "overlay_prefix": "10.254.0.0/30" }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "overlay_prefix": "10.1.0.0/24" }),
            StatusCode::CONFLICT,
        ),
        (
            json!({ "overlay_prefix": "10.254.0.0/33" }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({ "mode": "ring" }), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = a
            .call(
                Method::PATCH,
                "/api/v1/topology",
                Some(&t),
                Some(patch.clone()),
            )
            .await;
        assert_eq!(r.status, status, "{patch}: {r:?}");
    }
    let r = a
        .call_with(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "overlay_prefix": "fd00:ff::/64" })),
            &[("if-match", &format!("\"{v}\""))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let got: Vec<(&str, &str)> = r.body["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["site"].as_str().unwrap(), x["address"].as_str().unwrap()))
        .collect();
    // Renumbered in creation order (b1 was deleted, b3 came last).
    assert_eq!(
        got,
        [
            ("hq", "fd00:ff::1"),
            ("b2", "fd00:ff::2"),
            ("b3", "fd00:ff::3")
        ]
    );
}

#[tokio::test]
async fn paths_follow_sites_links_and_the_topology_and_invent_no_measurements() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    let r = a
        .call(Method::GET, "/api/v1/paths?limit=500", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 12, "3 pairs x 2 x 2 links");
    let p = &r.body["items"][0];
    assert_eq!(
        (p["a"]["site"].as_str(), p["b"]["site"].as_str()),
        (Some("hq"), Some("b1"))
    );
    for k in ["state", "rtt_ms", "jitter_ms", "loss_pct", "last_report"] {
        assert!(p[k].is_null(), "{k}: {p}");
    }
    let id = p["id"].as_str().unwrap().to_owned();
    let r = a
        .call(Method::GET, &format!("/api/v1/paths/{id}"), Some(&t), None)
        .await;
    assert_eq!(r.body["id"], id.as_str());
    for bad in [
        "/api/v1/paths/1-1",
        "/api/v1/paths/x",
        "/api/v1/paths/999-1000",
    ] {
        assert_eq!(
            a.call(Method::GET, bad, Some(&t), None).await.status,
            StatusCode::NOT_FOUND,
            "{bad}"
        );
    }
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths?site={}", ids[2]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 8);
    let r = a
        .call(
            Method::GET,
            "/api/v1/paths?limit=5&offset=10",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
    let r = a
        .call(Method::GET, "/api/v1/paths?state=up", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 0, "no edge has reported: nothing is up");
    let r = a
        .call(Method::GET, "/api/v1/paths?state=unknown", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 12);

    // Hub and spoke: the spokes do not talk to each other.
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "mode": "hub-spoke" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "no hub: {r:?}");
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "mode": "hub-spoke", "hubs": [999] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "mode": "hub-spoke", "hubs": [ids[0]] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let r = a.call(Method::GET, "/api/v1/paths", Some(&t), None).await;
    assert_eq!(r.body["total"], 8);
    // A disabled site has no paths.
    a.call(
        Method::PATCH,
        &format!("/api/v1/sites/{}", ids[1]),
        Some(&t),
        Some(json!({ "status": "disabled" })),
    )
    .await;
    let r = a.call(Method::GET, "/api/v1/paths", Some(&t), None).await;
    assert_eq!(r.body["total"], 4);
    // Deleting the hub removes it from the hubs.
    a.call(
        Method::DELETE,
        &format!("/api/v1/sites/{}", ids[0]),
        Some(&t),
        None,
    )
    .await;
    let r = a
        .call(Method::GET, "/api/v1/topology", Some(&t), None)
        .await;
    assert_eq!(r.body["hubs"], json!([]));
}

/// A page of paths, found from the sites' link counts without reading every site, is exactly
/// the slice of the whole list (which `state=unknown` still builds by reading everything: no
/// edge has reported, so every path is unknown), for every offset and several limits, in a full
/// mesh and in hub and spoke, with and without a site filter, with sites of 0 to 3 links and a
/// disabled one.
#[tokio::test]
async fn every_page_of_paths_is_the_slice_of_the_whole_list() {
    let a = api().await;
    let t = a.admin().await;
    let links = |n: usize| -> Vec<Value> {
        ["mpls", "inet", "lte"][..n]
            .iter()
            .map(|l| json!({ "name": l, "kind": "broadband" }))
            .collect()
    };
    let mut ids = Vec::new();
    for (i, n) in [2usize, 0, 3, 1, 2, 3].iter().enumerate() {
        let r = a
            .call(
                Method::POST,
                "/api/v1/sites",
                Some(&t),
                Some(json!({
                    "name": format!("s{i}"),
                    "lan_prefixes": [format!("10.{}.0.0/16", i + 1)],
                    "links": links(*n),
                })),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        ids.push(r.body["id"].as_i64().unwrap());
    }
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/sites/{}", ids[4]),
            Some(&t),
            Some(json!({ "status": "disabled" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let get = async |q: &str| {
        let r = a
            .call(Method::GET, &format!("/api/v1/paths?{q}"), Some(&t), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{q}: {r:?}");
        r.body
    };
    for topology in [
        json!({ "mode": "full-mesh", "hubs": [] }),
        json!({ "mode": "hub-spoke", "hubs": [ids[2], ids[5]] }),
    ] {
        let r = a
            .call(Method::PATCH, "/api/v1/topology", Some(&t), Some(topology))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        for site in [String::new(), format!("&site={}", ids[3])] {
            let all = get(&format!("state=unknown&limit=500{site}")).await;
            let all: Vec<Value> = all["items"].as_array().unwrap().clone();
            assert!(!all.is_empty());
            for limit in [1usize, 2, 5, 500] {
                for offset in 0..=all.len() + 1 {
                    let page = get(&format!("limit={limit}&offset={offset}{site}")).await;
                    assert_eq!(page["total"], all.len(), "{limit} {offset} {site}");
                    let want: Vec<Value> = all.iter().skip(offset).take(limit).cloned().collect();
                    assert_eq!(
                        page["items"].as_array().unwrap(),
                        &want,
                        "limit {limit} offset {offset}{site}"
                    );
                }
            }
        }
    }
}
