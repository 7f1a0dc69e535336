//! Backups (`patronus_controller::backup`): a round trip on this suite's backend and across to
//! the other one, the standard `age` decrypting a backup, a damaged backup refused, and the
//! tiered retention over 400 days of hourly backups.

use std::collections::BTreeMap;
use std::path::Path;

use patronus_controller::backup::{self, Retention};
use patronus_controller::config::Database;
use patronus_controller::store::{Actor, Store, dump};
use serde_json::Value;

use super::harness::*;

fn actor() -> Actor {
    Actor {
        id: None,
        name: "cli".into(),
        source: "test".into(),
    }
}

/// Every table of a dump, each row as a map of column to value (backends order columns
/// differently), rows sorted (tables without ids come back in any order).
type Tables = BTreeMap<String, Vec<BTreeMap<String, Value>>>;

fn tables_of(dump: &[u8]) -> Tables {
    let mut out = Tables::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in dump.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).unwrap();
        if let (Some((table, cols)), Value::Array(values)) = (&current, &v) {
            let row = cols.iter().cloned().zip(values.iter().cloned()).collect();
            out.get_mut(table).unwrap().push(row);
        } else if let Some(table) = v["table"].as_str() {
            let cols = v["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c[0].as_str().unwrap().to_owned())
                .collect();
            out.insert(table.to_owned(), Vec::new());
            current = Some((table.to_owned(), cols));
        } else {
            current = None;
        }
    }
    for rows in out.values_mut() {
        rows.sort_by_key(|r| serde_json::to_string(r).unwrap());
    }
    out
}

async fn tables_now(store: &Store) -> Tables {
    let mut out = Vec::new();
    dump::dump(store, &mut out).await.unwrap();
    tables_of(&out)
}

/// `after` holds exactly what `backup` held, but for what a restore adds: its own audit
/// record, and the configuration generation past both the backup's and `before` (what the
/// database had: it never goes back, or running controllers and edges would miss the change).
fn same_but_the_restore(backup: &Tables, after: &Tables, before: i64) {
    assert_eq!(
        backup.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (table, rows) in backup {
        let now = &after[table];
        match table.as_str() {
            "audit_log" => {
                let restores: Vec<_> = now
                    .iter()
                    .filter(|r| !rows.contains(r))
                    .map(|r| r["action"].clone())
                    .collect();
                assert_eq!(restores, ["store.restore"], "audit_log");
                assert_eq!(now.len(), rows.len() + 1);
            }
            "config_generation" => {
                let g = now[0]["generation"].as_i64().unwrap();
                assert_eq!(g, rows[0]["generation"].as_i64().unwrap().max(before) + 1);
            }
            _ => assert_eq!(rows, now, "table {table}"),
        }
    }
}

/// A controller with something in every kind of table: users and sessions, sites, links and
/// prefixes, an enrolled edge with its credential, its telemetry (floats), a policy.
async fn populated() -> (Api, String) {
    let a = api().await;
    let t = a.admin().await;
    a.user(&t, "ops@example.net", "operator").await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&cred),
            Some(json!({ "paths": [
                { "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": "up",
                  "rtt_ms": 21.123456789, "jitter_ms": 0.1, "loss_pct": 1.0 / 3.0,
                  "tx_bytes": 1000, "rx_bytes": 900 }
            ]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    (a, t)
}

/// Deletes site `name` through the API (as an operator's mistake would); its id.
async fn delete_site(a: &Api, t: &str, name: &str) -> i64 {
    let r = a
        .call(Method::GET, "/api/v1/sites?limit=10", Some(t), None)
        .await;
    let id = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let r = a
        .call(
            Method::DELETE,
            &format!("/api/v1/sites/{id}"),
            Some(t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    id
}

pub(crate) fn keys(
    dir: &Path,
) -> (
    Vec<age::x25519::Recipient>,
    Vec<age::x25519::Identity>,
    String,
) {
    let (identity, recipient) = backup::keygen();
    let path = dir.join("identity.txt");
    std::fs::write(&path, identity).unwrap();
    (
        backup::recipients(std::slice::from_ref(&recipient)).unwrap(),
        backup::identities(&path).unwrap(),
        path.to_str().unwrap().to_owned(),
    )
}

/// A fresh store on the other backend than this suite's.
async fn other_backend(dir: &Path) -> Store {
    let db = if crate::BACKEND == "postgres" {
        Database::Sqlite(dir.join("other.db"))
    } else {
        let pg = patronus_lab::postgres::shared().unwrap();
        let name = format!("backup_other_{}", std::process::id());
        pg.create_database(&name).unwrap();
        Database::Postgres(pg.url(&name))
    };
    Store::connect(&db).await.unwrap()
}

#[tokio::test]
async fn a_backup_restores_what_it_held_here_and_on_the_other_backend_and_age_reads_it() {
    let (a, t) = populated().await;
    let store = &a.state.store;
    let work = tempfile::tempdir().unwrap();
    let (recipients, ids, identity_file) = keys(work.path());
    let dir = work.path().join("backups");
    let m = backup::create(store, &dir, &recipients).await.unwrap();
    assert_eq!(m.backend, crate::BACKEND);
    assert!(m.rows.iter().all(|(_, n)| *n >= 0));
    let rows = |t: &str| m.rows.iter().find(|(n, _)| n == t).unwrap().1;
    assert!(rows("sites") == 3 && rows("path_samples") >= 1 && rows("users") == 2);
    let plain = backup::plaintext(&dir, &m, &ids).unwrap();
    let held = tables_of(&plain);
    assert_eq!(
        held,
        tables_now(store).await,
        "the backup is the state it was taken of"
    );
    // Backups are private, and the identity decrypts them with the standard age as well.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(format!("{}.age", m.name))), 0o600);
    }
    let age = std::process::Command::new("age")
        .args(["--decrypt", "--identity", &identity_file])
        .arg(dir.join(format!("{}.age", m.name)))
        .output()
        .expect("the `age` command (Debian's age; .ci/deps installs it)");
    assert!(
        age.status.success(),
        "{}",
        String::from_utf8_lossy(&age.stderr)
    );
    assert!(age.stdout == plain, "age -d gives the same plaintext");
    let v = backup::verify(&dir, &m, &ids, work.path()).await.unwrap();
    assert_eq!(v.integrity, "ok");

    // Changes after the backup: a site deleted, a policy added.
    let b2 = delete_site(&a, &t, "b2").await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("video", 20, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_ne!(tables_now(store).await["sites"], held["sites"]);

    // Over a database in use only when told to; then it holds the backup again.
    let refused = backup::restore(store, &dir, &m, &ids, &actor(), false).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("--replace")),
        "{refused:?}"
    );
    let before = store.generation();
    backup::restore(store, &dir, &m, &ids, &actor(), true)
        .await
        .unwrap();
    same_but_the_restore(&held, &tables_now(store).await, before);
    assert!(
        store.generation() > before,
        "the generation moved forward, not back"
    );
    // The restored site answers through the API, and the token of before still works.
    let r = a
        .call(Method::GET, &format!("/api/v1/sites/{b2}"), Some(&t), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");

    // The same backup into a fresh database of the other backend.
    let other = other_backend(work.path()).await;
    let fresh = other.generation();
    backup::restore(&other, &dir, &m, &ids, &actor(), false)
        .await
        .unwrap();
    same_but_the_restore(&held, &tables_now(&other).await, fresh);
    // A second restore on the same one adds ids past those given: new rows get new ids.
    other.close().await;
}

#[tokio::test]
async fn a_damaged_backup_or_a_wrong_identity_is_refused_and_the_database_is_left_as_it_was() {
    let (a, _t) = populated().await;
    let store = &a.state.store;
    let work = tempfile::tempdir().unwrap();
    let (recipients, ids, _) = keys(work.path());
    let dir = work.path().join("backups");
    let m = backup::create(store, &dir, &recipients).await.unwrap();
    let before = tables_now(store).await;

    // Another identity: named as the wrong one, nothing restored.
    let other = work.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, wrong, _) = keys(&other);
    let e = backup::restore(store, &dir, &m, &wrong, &actor(), true)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("identity does not decrypt"), "{e}");

    // One byte flipped in the middle of the ciphertext.
    let path = dir.join(format!("{}.age", m.name));
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let e = backup::verify(&dir, &m, &ids, work.path())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("changed or damaged"), "{e}");
    let e = backup::restore(store, &dir, &m, &ids, &actor(), true)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("changed or damaged"), "{e}");
    // A manifest made to agree with the damage: age's authentication refuses it in the
    // middle of the load, and the transaction leaves the database untouched.
    let mut forged = m.clone();
    let sha = {
        use sha2::Digest;
        patronus_controller::auth::hex(&sha2::Sha256::digest(&bytes))
    };
    forged.ciphertext_sha256 = sha;
    let e = backup::restore(store, &dir, &forged, &ids, &actor(), true)
        .await
        .unwrap_err();
    assert!(!e.to_string().is_empty());
    assert_eq!(before, tables_now(store).await, "nothing half-restored");

    // A backup from a newer schema than this binary's: refused, naming both versions.
    let mut newer = Vec::new();
    dump::dump(store, &mut newer).await.unwrap();
    let text = String::from_utf8(newer).unwrap();
    let v = m.schema_version;
    let text = text.replacen(
        &format!("\"schema_version\":{v}"),
        &format!("\"schema_version\":{}", v + 1),
        1,
    );
    let e = dump::load(store, &mut text.as_bytes(), &actor(), true, &|| Ok(()))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("schema version {} and the database of {v}", v + 1)),
        "{e}"
    );
    // Cut short: refused.
    let cut = &text.as_bytes()[..text.len() / 2];
    let cut = String::from_utf8_lossy(cut).replacen(
        &format!("\"schema_version\":{}", v + 1),
        &format!("\"schema_version\":{v}"),
        1,
    );
    let cut = &cut[..cut.rfind('\n').unwrap() + 1];
    let e = dump::load(store, &mut cut.as_bytes(), &actor(), true, &|| Ok(()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cut short"), "{e}");
    // A dump that names a table of its own (a statement hidden in a name): refused by name,
    // before anything is written.
    let hostile = text.replacen(
        &format!("\"schema_version\":{}", v + 1),
        &format!("\"schema_version\":{v}"),
        1,
    );
    let hostile = hostile.replacen(
        "\"table\":\"users\"",
        "\"table\":\"users (id) VALUES (1); DROP TABLE sites; --\"",
        1,
    );
    assert!(hostile.contains("DROP TABLE"));
    let e = dump::load(store, &mut hostile.as_bytes(), &actor(), true, &|| Ok(()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("expected table users"), "{e}");
    // The same kind of name in the part of a dump one site is taken from: refused when it is
    // written, by the list of the controller's tables, inside a transaction left unfinished.
    let sneaky = hostile.replacen(
        "\"table\":\"links\"",
        "\"table\":\"links (id) VALUES (1); DROP TABLE sites; --\"",
        1,
    );
    let (_, o) = dump::extract(&mut sneaky.as_bytes(), "sites", "hq").unwrap();
    let o = o.unwrap();
    assert!(o.rows.iter().any(|(t, _, _)| t.contains("DROP")));
    let mut tx = store.begin().await.unwrap();
    let e = dump::insert_object(&mut tx, store.backend(), &o)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("not a table of the controller's"),
        "{e}"
    );
    drop(tx);
    assert_eq!(before, tables_now(store).await, "nothing half-restored");

    // A manifest that is not one, or that names another backup, is left alone: the others
    // are listed, and prune deletes neither it nor what it names.
    std::fs::write(dir.join("patronus-broken.json"), b"{").unwrap();
    let mut alias = m.clone();
    alias.name = "../elsewhere".into();
    std::fs::write(
        dir.join("patronus-alias.json"),
        serde_json::to_vec(&alias).unwrap(),
    )
    .unwrap();
    let listed = backup::list(&dir).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        backup::prune(&dir, &Retention::default())
            .unwrap()
            .is_empty()
    );
    assert!(
        dir.join("patronus-broken.json").exists() && dir.join(format!("{}.age", m.name)).exists()
    );
}

/// 400 days of hourly backups up to 2026-02-04T23:30Z (a Wednesday), kept 24/7/4/12: the 24
/// of the last day; the last of each of the 6 days before; of the weeks, the last of
/// the Sundays Jan 25 and Jan 18 (Feb 1 is already a day's); of the months, the last of Dec
/// back to Mar 2025 (10; Feb and Jan are already kept). 42 in all.
#[test]
fn prune_keeps_exactly_the_tiered_set_over_400_days_of_hourly_backups() {
    let start = 1_735_691_400_000i64; // 2025-01-01T00:30:00Z
    let hour = 3_600_000;
    let times: Vec<i64> = (0..400 * 24).map(|i| start + i * hour).collect();
    let dir = tempfile::tempdir().unwrap();
    for t in &times {
        let name = backup::name_of(*t);
        let m = json!({
            "format": "patronus-backup", "version": 1, "name": name, "created_ms": t,
            "schema_version": 1, "backend": "sqlite", "rows": [], "plaintext_sha256": "",
            "plaintext_bytes": 0, "ciphertext_sha256": "", "ciphertext_bytes": 0,
            "recipients": [], "took_ms": 0
        });
        std::fs::write(dir.path().join(format!("{name}.json")), m.to_string()).unwrap();
        std::fs::write(dir.path().join(format!("{name}.age")), b"").unwrap();
    }
    let mut want: Vec<String> = (0..24)
        .map(|h| format!("patronus-20260204T{h:02}3000.000Z"))
        .collect();
    for day in [
        "20260203", "20260202", "20260201", "20260131", "20260130", "20260129", "20260125",
        "20260118", "20251231", "20251130", "20251031", "20250930", "20250831", "20250731",
        "20250630", "20250531", "20250430", "20250331",
    ] {
        want.push(format!("patronus-{day}T233000.000Z"));
    }
    want.sort();
    assert_eq!(times.len(), 9600);
    let gone = backup::prune(dir.path(), &Retention::default()).unwrap();
    let left: Vec<String> = backup::list(dir.path())
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(left, want);
    assert_eq!(gone.len(), 9600 - 42);
    // Nothing of what was pruned is left on disk.
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 42 * 2);
    // Pruning again deletes nothing.
    assert!(
        backup::prune(dir.path(), &Retention::default())
            .unwrap()
            .is_empty()
    );
}

/// Two controllers over one database, each looking every 50 ms whether a backup is due (every
/// 60 s): one of them takes it, and after both have looked again several times there is still
/// one (the claim in the database, not luck). Then, with the directory unusable, the backup
/// fails: counted, told to a webhook as `backup.failed`, and not tried again at once.
#[tokio::test]
async fn one_controller_of_two_takes_each_scheduled_backup_and_a_failure_is_told() {
    let work = tempfile::tempdir().unwrap();
    let (identity, recipient) = backup::keygen();
    let dir = work.path().join("backups");
    let (d, r) = (dir.clone(), recipient.clone());
    let a = api_with(move |c| {
        c.backup_dir = d;
        c.backup_recipients = vec![r];
        c.backup_interval = Some(std::time::Duration::from_secs(60));
    })
    .await;
    let b = api_on(a.state.config.clone(), tempfile::tempdir().unwrap()).await;
    let every = std::time::Duration::from_millis(50);
    let looks = |x: &Api| x.state.backups.lock().unwrap().looks;
    let taken = |x: &Api| x.state.backups.lock().unwrap().successes;
    let runs = [
        tokio::spawn(backup::schedule_every(a.state.clone(), every)),
        tokio::spawn(backup::schedule_every(b.state.clone(), every)),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while backup::list(&dir).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no scheduled backup");
        tokio::time::sleep(every).await;
    }
    let (la, lb) = (looks(&a), looks(&b));
    while looks(&a) < la + 3 || looks(&b) < lb + 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the schedulers stopped looking"
        );
        tokio::time::sleep(every).await;
    }
    assert_eq!(backup::list(&dir).unwrap().len(), 1);
    assert_eq!(taken(&a) + taken(&b), 1);
    for r in runs {
        r.abort();
    }
    // The backup holds its own claim on the schedule (taken while it ran); restored, the claim
    // does not come back, or the restored controllers would take no backup for 30 minutes.
    let id_file = work.path().join("identity.txt");
    std::fs::write(&id_file, identity).unwrap();
    let ids = backup::identities(&id_file).unwrap();
    let m = backup::pick(&dir, None, None).unwrap();
    let plain = String::from_utf8(backup::plaintext(&dir, &m, &ids).unwrap()).unwrap();
    assert!(plain.contains("backup_due"), "the claim is in the dump");
    let fresh = Store::connect(&Database::Sqlite(work.path().join("fresh.db")))
        .await
        .unwrap();
    backup::restore(&fresh, &dir, &m, &ids, &actor(), false)
        .await
        .unwrap();
    let claims: i64 = patronus_controller::store::db::query_scalar(
        "SELECT COUNT(*) FROM settings WHERE key = 'backup_due'",
    )
    .fetch_one(&mut *fresh.conn().await.unwrap())
    .await
    .unwrap();
    assert_eq!(claims, 0);
    fresh.close().await;
    let t = a.admin().await;
    let text = metrics_text(&a, &t).await + &metrics_text(&b, &t).await;
    assert!(
        text.contains("patronus_backup_last_success_timestamp_seconds "),
        "{text}"
    );

    // The directory is a file now: the next backup fails.
    let (url, got) = receiver(0).await;
    patronus_controller::webhooks::start(&a.state);
    let r = a
        .call(
            Method::POST,
            "/api/v1/webhooks",
            Some(&t),
            Some(json!({ "url": url, "events": ["backup.failed"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let blocked = work.path().join("blocked");
    std::fs::write(&blocked, b"not a directory").unwrap();
    let mut config = a.state.config.clone();
    config.backup_dir = blocked.join("backups");
    let c = api_on(config, tempfile::tempdir().unwrap()).await;
    // Due now.
    patronus_controller::store::settings::backup_due_at(
        &mut *c.state.store.conn().await.unwrap(),
        0,
        0,
    )
    .await
    .unwrap();
    let run = tokio::spawn(backup::schedule_every(c.state.clone(), every));
    let (_, event) = wait_for(&got, "backup.failed").await;
    assert!(
        event["data"]["error"].as_str().unwrap().contains("blocked"),
        "{event}"
    );
    let l = looks(&c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while looks(&c) < l + 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the scheduler stopped looking"
        );
        tokio::time::sleep(every).await;
    }
    let s = c.state.backups.lock().unwrap().clone();
    assert_eq!(
        (s.successes, s.failures),
        (0, 1),
        "tried again only in 5 minutes"
    );
    let text = metrics_text(&c, &t).await;
    assert!(
        text.contains("patronus_backups_total{outcome=\"failed\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("patronus_backup_last_success"),
        "no made-up success"
    );
    run.abort();
}

/// An operator's mistakes undone one object at a time, while the rest of the day's changes
/// stay: the enrolled site hq deleted (its edge's credential works again once it is back, its
/// links keep their ids, so its paths and history are what they were; its overlay address,
/// given to a new site meanwhile, is replaced by a free one), b2 deleted and its LAN
/// prefix taken by a new site (refused, naming the overlap), a policy deleted and its order
/// taken (refused, then restored once the order is free). Each restore is audited and tells
/// the edges (`config.changed`); one that finds the object still there, or no such object in
/// the backup, changes nothing.
#[tokio::test]
async fn one_deleted_site_or_policy_comes_back_from_a_backup_as_an_api_write_would() {
    use backup::ObjectKind::{Policy, Site};
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let voice_id = r.body["id"].as_i64().unwrap();
    let hq_before = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[0]),
            Some(&t),
            None,
        )
        .await
        .body;
    let store = &a.state.store;
    let work = tempfile::tempdir().unwrap();
    let (recipients, keys_, _) = keys(work.path());
    let dir = work.path().join("backups");
    let m = backup::create(store, &dir, &recipients).await.unwrap();

    // The afternoon's changes: two sites and a policy deleted, b2's prefix given to a new
    // site, voice's order to a new policy.
    for path in [
        format!("/api/v1/sites/{}", ids[0]),
        format!("/api/v1/sites/{}", ids[2]),
        format!("/api/v1/policies/{voice_id}"),
    ] {
        let r = a.call(Method::DELETE, &path, Some(&t), None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("b9", &["10.3.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    // The lowest overlay address free was hq's.
    let b9_overlay = r.body["overlay_address"].clone();
    assert_eq!(b9_overlay, hq_before["overlay_address"]);
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("video", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let video_id = r.body["id"].as_i64().unwrap();
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the deleted site's credential"
    );
    let audit_rows = || async {
        a.call(Method::GET, "/api/v1/audit?limit=200", Some(&t), None)
            .await
            .body["total"]
            .as_i64()
            .unwrap()
    };
    let generation = || a.state.store.generation();

    // hq comes back, as it was, and its edge is in again with its credential.
    let (g0, n0) = (generation(), audit_rows().await);
    let r = backup::restore_object(store, &dir, &m, &keys_, Site, "hq", &actor())
        .await
        .unwrap();
    assert_eq!(r.id, ids[0]);
    assert!(generation() > g0, "the edges are told");
    assert_eq!(audit_rows().await, n0 + 1);
    let hq = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[0]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(hq.status, StatusCode::OK, "{hq:?}");
    for k in ["name", "links", "lan_prefixes", "public_key"] {
        assert_eq!(hq.body[k], hq_before[k], "{k}");
    }
    // Its overlay address went to b9 meanwhile: hq is given another.
    assert!(hq.body["overlay_address"].is_string());
    assert_ne!(hq.body["overlay_address"], b9_overlay);
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the edge's credential works again: {r:?}"
    );
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=site.restore",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");

    // Again: it is there, nothing to do. A name the backup does not hold: not found.
    let (g1, n1) = (generation(), audit_rows().await);
    let e = backup::restore_object(store, &dir, &m, &keys_, Site, "hq", &actor())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is in the database"), "{e}");
    let e = backup::restore_object(store, &dir, &m, &keys_, Site, "nowhere", &actor())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("site \"nowhere\""), "{e}");
    // b2's prefix belongs to b9 now.
    let e = backup::restore_object(store, &dir, &m, &keys_, Site, "b2", &actor())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("overlaps 10.3.0.0/16 of site b9"),
        "{e}"
    );
    // voice's order is video's.
    let e = backup::restore_object(store, &dir, &m, &keys_, Policy, "voice", &actor())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(&format!("policy {video_id}'s now")),
        "{e}"
    );
    assert_eq!(
        (generation(), audit_rows().await),
        (g1, n1),
        "nothing written"
    );
    let r = a
        .call(
            Method::DELETE,
            &format!("/api/v1/policies/{video_id}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    backup::restore_object(store, &dir, &m, &keys_, Policy, "voice", &actor())
        .await
        .unwrap();
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/policies/{voice_id}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    // The restores moved no identity back: a site made now gets an id past every one given.
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("b10", &["10.9.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert!(r.body["id"].as_i64().unwrap() > ids[2] + 1, "{r:?}");

    // A policy whose class was deleted since: refused as the API refuses it, nothing written.
    let r = a
        .call(
            Method::POST,
            "/api/v1/sla-classes",
            Some(&t),
            Some(json!({ "name": "gold", "max_latency_ms": 80 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let gold = r.body["id"].as_i64().unwrap();
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("p-gold", 30, "gold")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let p_gold = r.body["id"].as_i64().unwrap();
    let m2 = backup::create(store, &dir, &recipients).await.unwrap();
    for path in [
        format!("/api/v1/policies/{p_gold}"),
        format!("/api/v1/sla-classes/{gold}"),
    ] {
        let r = a.call(Method::DELETE, &path, Some(&t), None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let g = generation();
    let e = backup::restore_object(store, &dir, &m2, &keys_, Policy, "p-gold", &actor())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("gold"), "{e}");
    assert_eq!(generation(), g, "nothing written");
}

/// Backups in S3-compatible object storage (`backup_url`), against a real S3 server started
/// here (moto's, on loopback): create, list, prune with the tiers, and restore the latest
/// after a change; nothing stays in the staging directory, and the keys in the bucket are the
/// backups listed. Without credentials the destination is refused, saying which.
#[tokio::test]
async fn backups_go_to_an_s3_bucket_and_the_latest_comes_back_from_it() {
    let server = patronus_lab::s3::ObjectServer::start().unwrap();
    server.create_bucket("patronus-backups").unwrap();
    let (a, t) = populated().await;
    let store = &a.state.store;
    let work = tempfile::tempdir().unwrap();
    let (recipients, ids, _) = keys(work.path());
    let mut config = patronus_controller::config::Config::with_data_dir(work.path().join("data"));
    config.backup_url = Some("s3://patronus-backups/controllers/prod".into());
    config.backup_s3_endpoint = Some(server.endpoint());
    let env = vec![
        (
            "AWS_ACCESS_KEY_ID".to_owned(),
            patronus_lab::s3::ACCESS_KEY_ID.to_owned(),
        ),
        (
            "AWS_SECRET_ACCESS_KEY".to_owned(),
            patronus_lab::s3::SECRET_ACCESS_KEY.to_owned(),
        ),
    ];
    let refused = backup::Destination::from_config(&config, &[]);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("AWS_ACCESS_KEY_ID")),
        "{refused:?}"
    );
    let dest = backup::Destination::from_config(&config, &env).unwrap();

    let mut taken = Vec::new();
    for _ in 0..3 {
        let m = dest.create(store, &recipients).await.unwrap();
        // Names are the snapshot's millisecond: the next one is taken in a later one.
        while patronus_controller::store::now_ms() <= m.created_ms {
            tokio::task::yield_now().await;
        }
        taken.push(m);
    }
    let held = tables_now(store).await;
    let listed = dest.list().await.unwrap();
    assert_eq!(listed, taken, "listed oldest first, manifests as written");
    let mut keys_now = server.keys("patronus-backups").unwrap();
    keys_now.sort();
    let mut want: Vec<String> = taken
        .iter()
        .flat_map(|m| ["age", "json"].map(|x| format!("controllers/prod/{}.{x}", m.name)))
        .collect();
    want.sort();
    assert_eq!(keys_now, want);
    let staged = std::fs::read_dir(config.backup_dir.join("staging"))
        .unwrap()
        .count();
    assert_eq!(staged, 0, "nothing is left in the staging directory");

    // All three are in the same hour: one hourly kept, the newest.
    let gone = dest
        .prune(&Retention {
            hourly: 1,
            daily: 0,
            weekly: 0,
            monthly: 0,
        })
        .await
        .unwrap();
    assert_eq!(gone, [taken[0].name.clone(), taken[1].name.clone()]);
    assert_eq!(dest.list().await.unwrap(), [taken[2].clone()]);
    assert_eq!(server.keys("patronus-backups").unwrap().len(), 2);

    // A change after the last backup; the latest comes back, checked and whole.
    delete_site(&a, &t, "b1").await;
    assert_ne!(tables_now(store).await["sites"], held["sites"]);
    let scratch = work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let m = dest.pick(None, None).await.unwrap();
    assert_eq!(m, taken[2]);
    let local = dest.fetch(&m, &scratch).await.unwrap();
    let v = backup::verify(local.dir(), &m, &ids, &scratch)
        .await
        .unwrap();
    assert_eq!(v.integrity, "ok");
    let before = store.generation();
    backup::restore(store, local.dir(), &m, &ids, &actor(), true)
        .await
        .unwrap();
    same_but_the_restore(&held, &tables_now(store).await, before);
    drop(local);
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "the downloaded ciphertext is removed"
    );
}
