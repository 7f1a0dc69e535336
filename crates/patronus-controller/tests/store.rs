//! The store's backends at start-up: a PostgreSQL that refuses the connection and a schema
//! newer than the binary each stop the controller before it serves anything, with one error
//! that names the problem (and never the database's password); so does a signing key other than
//! the one the controllers over the database use; so does a damaged SQLite file; and a backup
//! tool does not migrate an older schema under its controllers.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

use patronus_controller::config::{Config, Database};
use patronus_controller::store::Store;

const ENV: &[(&str, &str)] = &[
    ("PATRONUS_ADMIN_EMAIL", "admin@example.net"),
    ("PATRONUS_ADMIN_PASSWORD", "Correct-Horse-Battery-1"),
];

fn env() -> Vec<(String, String)> {
    ENV.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_postgres_that_refuses_the_connection_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path().join("state"));
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    config.database = Database::Postgres(format!(
        "postgres://patronus:pw-not-to-show@127.0.0.1:{port}/patronus"
    ));
    let e = format!(
        "{:#}",
        patronus_controller::server::prepare(config.clone(), &env())
            .await
            .map(|_| ())
            .expect_err("a refused database must stop the start")
    );
    assert!(
        e.contains(&format!(
            "connecting to postgres://patronus:***@127.0.0.1:{port}/patronus"
        )),
        "{e}"
    );
    assert!(e.to_lowercase().contains("refused"), "{e}");
    assert!(!e.contains("pw-not-to-show"), "{e}");
    // Nothing was made past the database: no signing key, no first admin's password file.
    assert!(!config.jwt_key_file.exists());
}

/// Opens `database`, records a schema version past this binary's, and checks that opening it
/// again fails, naming both versions, and changes nothing.
async fn newer_schema_is_refused(database: Database) {
    let store = Store::connect(&database).await.unwrap();
    let known = store.schema_version().await.unwrap();
    patronus_controller::store::db::query(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'from the future', 0)",
    )
    .bind(known + 1)
    .execute(&mut *store.conn().await.unwrap())
    .await
    .unwrap();
    store.close().await;
    let e = Store::connect(&database).await.err().unwrap().to_string();
    assert!(
        e.contains(&format!(
            "schema is at version {}, newer than this binary knows ({known})",
            known + 1
        )),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path().join("state"));
    config.database = database;
    assert!(
        patronus_controller::server::prepare(config.clone(), &env())
            .await
            .is_err()
    );
    assert!(!config.jwt_key_file.exists());
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    newer_schema_is_refused(Database::Sqlite(dir.path().join("c.db"))).await;
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused_on_postgres() {
    let pg = patronus_lab::postgres::shared().unwrap();
    pg.create_database("newer_schema").unwrap();
    newer_schema_is_refused(Database::Postgres(pg.url("newer_schema"))).await;
}

/// Waits until `store`'s configuration generation reaches `g` (the edges' long polls wait on
/// the same watch); fails after 10 s.
async fn sees(store: &Store, g: i64, what: &str) {
    let mut w = store.watch_generation();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        w.wait_for(|cur| *cur >= g),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: generation {g} not seen in 10 s"))
    .unwrap();
}

#[tokio::test]
async fn a_write_on_one_controller_wakes_the_edges_waiting_on_another_even_after_a_reconnect() {
    let pg = patronus_lab::postgres::shared().unwrap();
    pg.create_database("two_controllers").unwrap();
    let database = Database::Postgres(pg.url("two_controllers"));
    let a = Store::connect(&database).await.unwrap();
    let b = Store::connect(&database).await.unwrap();
    let g = a.generation();
    assert_eq!(b.generation(), g);
    let bump = |s: Store| async move {
        let mut tx = s.begin().await.unwrap();
        let g = tx.config_changed().await.unwrap();
        tx.commit().await.unwrap();
        g
    };
    // A's write reaches B through NOTIFY (B also reads the table every 5 s: its counters say
    // which way each generation came; three writes, so that the check cannot have beaten
    // every announcement).
    let mut g1 = g;
    for _ in 0..3 {
        g1 = bump(a.clone()).await;
        sees(&b, g1, "B after A's write").await;
    }
    assert_eq!(g1, g + 3);
    let (announced, _) = b.generations_followed();
    assert!(announced >= 1, "B learnt nothing by NOTIFY");
    // B's write reaches A.
    let g2 = bump(b.clone()).await;
    sees(&a, g2, "A after B's write").await;
    // B's listening connection is cut (as a network failure or a restarted server would);
    // the write made while it is down still reaches B.
    pg.psql(
        "two_controllers",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = 'two_controllers' AND query LIKE 'LISTEN%'",
    )
    .unwrap();
    let g3 = bump(a.clone()).await;
    sees(&b, g3, "B after its listener was cut").await;
    // By the announcement, or by the reread after the reconnect or the periodic check: either
    // way B counted it.
    let (announced, reread) = b.generations_followed();
    assert!(announced + reread >= 2, "{announced} + {reread}");
    // A rolled-back write announces nothing.
    let mut tx = a.begin().await.unwrap();
    tx.config_changed().await.unwrap();
    drop(tx);
    let g4 = bump(a.clone()).await;
    assert_eq!(g4, g3 + 1);
    sees(&b, g4, "B after a rolled-back write").await;
    assert_eq!(b.generation(), g4);
}

#[tokio::test]
async fn a_controller_with_another_signing_key_than_the_others_refuses_to_start() {
    use patronus_controller::server::prepare;
    let dir = tempfile::tempdir().unwrap();
    let mut first = Config::with_data_dir(dir.path().join("a"));
    first.database = Database::Sqlite(dir.path().join("shared.db"));
    let a = prepare(first.clone(), &env()).await.unwrap();
    a.store.close().await;
    // A second controller over the same database with a key of its own (its own data
    // directory): refused, naming the key file, before it serves a token the others refuse.
    let mut second = first.clone();
    second.jwt_key_file = dir.path().join("b").join("jwt.key");
    let e = format!("{:#}", prepare(second.clone(), &env()).await.unwrap_err());
    assert!(
        e.contains(&second.jwt_key_file.display().to_string()) && e.contains("not the key"),
        "{e}"
    );
    let a = prepare(first.clone(), &env()).await.unwrap();
    a.store.close().await;
    // Replaced on purpose: the second's key is the one from now on, and the first's is refused.
    let mut replace = env();
    replace.push(("PATRONUS_REPLACE_SIGNING_KEY".to_owned(), "1".to_owned()));
    let b = prepare(second, &replace).await.unwrap();
    b.store.close().await;
    assert!(prepare(first, &env()).await.is_err());
}

/// A live SQLite database with bytes overwritten is found damaged at start, before anything is
/// read or migrated, and the error names the file and the way back (`patronus restore`):
/// a b-tree page overwritten, and the file's header overwritten.
#[tokio::test]
async fn a_damaged_sqlite_database_is_named_at_start_with_the_restore_command() {
    for (at, what) in [(4096u64, "a page"), (0, "the header")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.db");
        let store = Store::connect(&Database::Sqlite(path.clone()))
            .await
            .unwrap();
        store.close().await;
        {
            use std::io::{Seek, SeekFrom, Write};
            // Closed, the store has checkpointed its write-ahead log into the file: what is
            // overwritten is the database itself.
            let wal = dir.path().join("controller.db-wal");
            assert!(std::fs::metadata(&wal).map_or(true, |m| m.len() == 0));
            assert!(std::fs::metadata(&path).unwrap().len() > 8192);
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[0xA5; 4096]).unwrap();
        }
        let mut config = Config::with_data_dir(dir.path().to_path_buf());
        config.database = Database::Sqlite(path.clone());
        let e = format!(
            "{:#}",
            patronus_controller::server::prepare(config, &env())
                .await
                .err()
                .unwrap_or_else(|| panic!("{what} overwritten, and the controller started"))
        );
        assert!(
            e.contains(&format!("{}: the database is damaged", path.display()))
                && e.contains("patronus restore"),
            "{what}: {e}"
        );
    }
}

/// A tool on a database the controllers own (`patronus backup create`) does not migrate one at
/// an older schema under them: it refuses, naming both versions.
#[tokio::test]
async fn a_backup_tool_refuses_to_migrate_an_older_schema_under_its_controllers() {
    let dir = tempfile::tempdir().unwrap();
    let database = Database::Sqlite(dir.path().join("c.db"));
    let store = Store::connect(&database).await.unwrap();
    let known = store.schema_version().await.unwrap();
    patronus_controller::store::db::query("DELETE FROM schema_migrations WHERE version = ?")
        .bind(known)
        .execute(&mut *store.conn().await.unwrap())
        .await
        .unwrap();
    store.close().await;
    let e = Store::connect_existing(&database)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&format!(
            "schema is at version {}, older than this binary's ({known})",
            known - 1
        )),
        "{e}"
    );
}
