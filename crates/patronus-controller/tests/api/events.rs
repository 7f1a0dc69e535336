//! `GET /api/v1/events/stream`: server-sent events, resumed without loss.

use super::harness::*;

/// One server-sent event: (`id`, `event`, `data`).
type Sse = (Option<i64>, String, String);

/// A stream being read: the response body and what was read of it not yet parsed.
struct Stream {
    body: hyper::body::Incoming,
    buf: String,
}

impl Stream {
    async fn open(a: &Api, token: &str, query: &str, last: Option<i64>) -> Self {
        let mut req = Request::get(format!("/api/v1/events/stream{query}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if let Some(n) = last {
            req = req.header("last-event-id", n.to_string());
        }
        let r = a.send(req.body(Body::empty()).unwrap()).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut s = Self {
            body: r.into_body(),
            buf: String::new(),
        };
        // Every stream starts by asking clients to reconnect after 2 s.
        assert_eq!(s.block().await, "retry: 2000");
        s
    }

    /// Whether the controller ends the stream within `within` (comments and events skipped).
    async fn ends_within(&mut self, within: std::time::Duration) -> bool {
        tokio::time::timeout(within, async {
            while let Some(f) = self.body.frame().await {
                if f.is_err() {
                    break;
                }
            }
        })
        .await
        .is_ok()
    }

    /// The next block (up to a blank line), comments included.
    async fn block(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let b = self.buf[..i].to_owned();
                self.buf.drain(..i + 2);
                return b;
            }
            let frame = tokio::time::timeout(std::time::Duration::from_secs(20), self.body.frame())
                .await
                .expect("an event within 20 s")
                .expect("the stream goes on")
                .unwrap();
            if let Ok(d) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&d).unwrap());
            }
        }
    }

    /// The next event (keep-alive comments skipped), within 20 s.
    async fn event(&mut self) -> Sse {
        tokio::time::timeout(std::time::Duration::from_secs(20), self.next_event())
            .await
            .expect("an event within 20 s")
    }

    async fn next_event(&mut self) -> Sse {
        loop {
            let b = self.block().await;
            if b.starts_with(':') {
                continue;
            }
            let field = |name: &str| {
                b.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::to_owned)
            };
            return (
                field("id: ").map(|v| v.parse().unwrap()),
                field("event: ").unwrap(),
                field("data: ").unwrap(),
            );
        }
    }
}

async fn policy(a: &Api, t: &str, name: &str, order: u32) {
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(t),
            Some(voice(name, order, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
}

/// The policy an event's `config.changed` data names.
fn target(e: &Sse) -> String {
    let v: Value = serde_json::from_str(&e.2).unwrap();
    v["data"]["target"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_stream_resumed_after_a_disconnect_loses_no_event_and_repeats_none() {
    let a = api().await;
    let t = a.admin().await;
    let mut s = Stream::open(&a, &t, "", None).await;
    policy(&a, &t, "p1", 10).await;
    policy(&a, &t, "p2", 20).await;
    let e1 = s.event().await;
    let e2 = s.event().await;
    assert_eq!(
        (e1.1.as_str(), e2.1.as_str()),
        ("config.changed", "config.changed")
    );
    let (i1, i2) = (e1.0.unwrap(), e2.0.unwrap());
    assert!(i2 > i1, "{i1} {i2}");
    // The admin sees who made the change.
    let v: Value = serde_json::from_str(&e1.2).unwrap();
    assert_eq!(v["type"], "config.changed");
    assert!(v["data"]["actor"].is_string(), "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("evt_"));

    // Gone; three changes meanwhile; back with the last id it had: those three, in order, then
    // what comes next, each once.
    drop(s);
    for (i, n) in ["p3", "p4", "p5"].iter().enumerate() {
        policy(&a, &t, n, 30 + i as u32).await;
    }
    let mut s = Stream::open(&a, &t, "", Some(i2)).await;
    let missed = [s.event().await, s.event().await, s.event().await];
    policy(&a, &t, "p6", 60).await;
    let next = s.event().await;
    let ids: Vec<i64> = missed.iter().chain([&next]).map(|e| e.0.unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]) && ids[0] > i2,
        "{ids:?}"
    );
    let r = a
        .call(Method::GET, "/api/v1/policies", Some(&t), None)
        .await;
    let id_of = |name: &str| {
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| format!("policy/{}", p["id"]))
            .unwrap()
    };
    assert_eq!(
        missed.iter().chain([&next]).map(target).collect::<Vec<_>>(),
        ["p3", "p4", "p5", "p6"].map(id_of)
    );

    // The same from the query (`after`), for clients that cannot set the header.
    let mut s = Stream::open(&a, &t, &format!("?after={i1}"), None).await;
    assert_eq!(s.event().await.0, Some(i2));
}

#[tokio::test]
async fn a_viewer_sees_events_without_who_made_them_and_filters_hold() {
    let a = api().await;
    // The presence writer, which announces sites online.
    patronus_controller::webhooks::start(&a.state);
    let t = a.admin().await;
    let (_, viewer) = a.user(&t, "viewer@example.net", "viewer").await;
    // Without credentials: 401, in the API's error shape.
    let r = a
        .call(Method::GET, "/api/v1/events/stream", None, None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A kind that does not exist, an id that is not one: 422 naming what is wrong.
    let r = a
        .call(
            Method::GET,
            "/api/v1/events/stream?kind=path.down,nope",
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.to_string().contains("kind"), "{r:?}");
    let r = a
        .call_with(
            Method::GET,
            "/api/v1/events/stream",
            Some(&viewer),
            None,
            &[("last-event-id", "x")],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.to_string().contains("Last-Event-ID"), "{r:?}");

    policy(&a, &t, "p1", 10).await;
    let ids = sites(&a, &t, &["hq"]).await;
    // From the start: the policy's change, then the site's, each without its author.
    let mut s = Stream::open(&a, &viewer, "?after=0", None).await;
    for _ in 0..2 {
        let e = s.event().await;
        let v: Value = serde_json::from_str(&e.2).unwrap();
        assert_eq!(e.1, "config.changed");
        assert!(v["data"].get("actor").is_none(), "{v}");
        assert!(v["data"].get("request_id").is_none(), "{v}");
    }
    // Filtered by kind: a stream for presence only gets nothing of the changes before the
    // site comes online (its edge's first request), which it does get.
    let mut s = Stream::open(&a, &viewer, "?after=0&kind=site.online,site.offline", None).await;
    let cred = enrolled(&a, &t, ids[0], 3).await;
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);

    let e = s.event().await;
    assert_eq!(e.1, "site.online", "{e:?}");
    let v: Value = serde_json::from_str(&e.2).unwrap();
    assert_eq!(v["data"]["site"], "hq");
    // By site: a site with no events gets none before one about it.
    let mut s = Stream::open(&a, &viewer, "?after=0&site=hq", None).await;
    let e = s.event().await;
    assert_eq!(e.1, "site.online", "{e:?}");

    // An id from beyond what the store has (a restored database): a gap, then what is new.
    let mut s = Stream::open(&a, &viewer, "", Some(1_000_000)).await;
    let gap = s.event().await;
    assert_eq!((gap.0, gap.1.as_str()), (None, "gap"));
    policy(&a, &t, "p2", 20).await;
    assert_eq!(s.event().await.1, "config.changed");
    // Each stream counted while it lasts.
    assert!(
        metrics_text(&a, &t)
            .await
            .contains("\npatronus_event_streams ")
    );
}

/// A store whose events are numbered anew under a running controller (a restore): its streams
/// end, and a client that reconnects with its last id is told of the gap, then gets what is new.
#[tokio::test]
async fn a_stream_restarts_when_the_store_goes_back_and_says_what_was_lost() {
    let a = api().await;
    let t = a.admin().await;
    let mut s = Stream::open(&a, &t, "", None).await;
    policy(&a, &t, "p1", 10).await;
    policy(&a, &t, "p2", 20).await;
    let _ = s.event().await;
    let last = s.event().await.0.unwrap();
    // As a restore of an older backup leaves it: the newest event behind what was streamed.
    patronus_controller::store::db::query("DELETE FROM events WHERE id >= ?")
        .bind(last)
        .execute(&mut *a.state.store.conn().await.unwrap())
        .await
        .unwrap();
    assert!(s.ends_within(std::time::Duration::from_secs(10)).await);
    let mut s = Stream::open(&a, &t, "", Some(last)).await;
    let gap = s.event().await;
    assert_eq!((gap.0, gap.1.as_str()), (None, "gap"), "{gap:?}");
    policy(&a, &t, "p3", 30).await;
    assert_eq!(s.event().await.1, "config.changed");
}
