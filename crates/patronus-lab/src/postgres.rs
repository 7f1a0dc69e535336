//! A throwaway PostgreSQL server for the tests and benches that need one, started by them and
//! never one they did not start: Debian's `postgresql` binaries, a cluster made by `initdb` in a
//! fresh private directory, listening on 127.0.0.1 on a free port and on a Unix socket in that
//! directory, with a generated password (SCRAM) for its one superuser. PostgreSQL refuses to
//! run as root, so under root the server runs as the `postgres` system user the package creates
//! (or `nobody`), which owns the directory. [`Postgres`] stops the server (immediate shutdown)
//! and removes the directory when dropped; a process killed outright leaves the server running
//! with its directory under the system's temporary directory (`patronus-pg-*`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): install Debian's \
         `postgresql` package (.ci/deps does)"
    )]
    NotInstalled,
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{what} failed: {output}")]
    Command { what: String, output: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let what = what.into();
    move |error| PgError::Io { what, error }
}

/// The newest installed PostgreSQL's `bin` directory.
pub fn bin_dir() -> Result<PathBuf, PgError> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| PgError::NotInstalled)?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).ok_or(PgError::NotInstalled)
}

/// A running server; stopped and removed on drop.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    password: String,
    /// The user and group the server runs as (None: the caller's own).
    owner: Option<(u32, u32)>,
    server: Option<Child>,
    /// `-c name=value` settings the server starts with.
    settings: Vec<(String, String)>,
}

/// The superuser's name.
pub const USER: &str = "patronus";

impl Postgres {
    /// Makes a cluster and starts it; returns once it accepts connections (30 s at most).
    pub fn start() -> Result<Self, PgError> {
        Self::start_with(&[])
    }

    /// [`Postgres::start`], with these server settings (`-c name=value`) on top.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self, PgError> {
        let bin = bin_dir()?;
        let owner = if nix::unistd::geteuid().is_root() {
            let user = ["postgres", "nobody"]
                .iter()
                .find_map(|n| nix::unistd::User::from_name(n).ok().flatten())
                .ok_or_else(|| PgError::Command {
                    what: "finding an unprivileged user to run PostgreSQL as".into(),
                    output: "neither `postgres` nor `nobody` exists".into(),
                })?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!(
            "patronus-pg-{}-{}",
            std::process::id(),
            random_hex(4)?
        ));
        std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut pg = Self {
            dir,
            bin,
            port: 0,
            password: random_hex(16)?,
            owner,
            server: None,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        pg.init()?;
        // A free port can be taken between finding it and the server binding it: try again.
        let mut last = None;
        for _ in 0..3 {
            pg.port = free_port()?;
            match pg.run_server() {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(PgError::NotInstalled))
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        }
        c.env("PGPASSWORD", &self.password)
            .env_remove("PGDATABASE")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGUSER")
            .stdin(Stdio::null());
        c
    }

    fn init(&self) -> Result<(), PgError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("making the directory private"))?;
        let pwfile = self.dir.join("pw");
        std::fs::write(&pwfile, format!("{}\n", self.password)).map_err(io("writing pw"))?;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600))
            .map_err(io("making pw private"))?;
        if let Some((uid, gid)) = self.owner {
            for p in [&self.dir, &pwfile] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .map_err(io(format!("giving {} to the server's user", p.display())))?;
            }
        }
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data())
            .args([
                "-U",
                USER,
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            // A throwaway cluster: nothing to lose if the machine crashes while initdb runs.
            .arg("--no-sync")
            .output()
            .map_err(io("running initdb"))?;
        let _ = std::fs::remove_file(&pwfile);
        check("initdb", &out)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run_server(&mut self) -> Result<(), PgError> {
        let log = std::fs::File::create(self.dir.join("server.log"))
            .map_err(io("creating the server's log"))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(self.dir.join("server.log"), Some(uid), Some(gid))
                .map_err(io("giving the log to the server's user"))?;
        }
        let err = log.try_clone().map_err(io("the server's log"))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(
                self.settings
                    .iter()
                    .flat_map(|(k, v)| ["-c".to_owned(), format!("{k}={v}")]),
            )
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io("starting postgres"))?;
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.server.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.server = None;
                    return Err(PgError::Command {
                        what: format!("postgres on port {}", self.port),
                        output: format!("exited ({status}): {}", self.log_tail()),
                    });
                }
            }
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(io("running pg_isready"))?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(PgError::Command {
                    what: "waiting 30 s for postgres to accept connections".into(),
                    output: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password (generated for this server).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A URL for database `db` as the superuser, over TCP on loopback.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// A URL for database `db` as the superuser, over the server's Unix socket: reachable
    /// from every network namespace of the machine (the lab's controllers run in one of their
    /// own), by root or the server's user.
    pub fn socket_url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{}@localhost/{db}?host={}&port={}",
            self.password,
            self.dir.display(),
            self.port
        )
    }

    /// Runs `sql` with `psql` in database `db`; returns its output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, PgError> {
        let out = self
            .command("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args(["-d", db, "-c", sql])
            .output()
            .map_err(io("running psql"))?;
        check(&format!("psql {sql:?}"), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Database `db`'s rows, as `pg_dump --data-only` writes them.
    pub fn dump(&self, db: &str) -> Result<String, PgError> {
        let out = self
            .command("pg_dump")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args(["--data-only", "-d", db])
            .output()
            .map_err(io("running pg_dump"))?;
        check(&format!("pg_dump {db}"), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates database `name` (a plain identifier).
    pub fn create_database(&self, name: &str) -> Result<(), PgError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(PgError::Command {
                what: format!("creating database {name:?}"),
                output: "a database name here is lower-case letters, digits and _".into(),
            });
        }
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .map(|_| ())
    }

    /// Stops the server at once (the equivalent of a crash: PostgreSQL recovers from its WAL
    /// on the next start) and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.server.take() {
            // SIGQUIT: immediate shutdown, the postmaster takes its children with it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            let _ = c.wait();
        }
    }

    /// The directory the cluster lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// One server for the whole test process, started on first use: a test suite that makes a
/// database per test on it pays `initdb` once. It runs without `fsync` (nothing it holds
/// outlives the process) and allows many connections (tests run in parallel, each with its
/// own pool). A process's statics are never dropped, so a watchdog started with it (a shell
/// in its own session) stops the server and removes its directory once the test process has
/// exited, however it exited.
pub fn shared() -> Result<&'static Postgres, String> {
    static SHARED: std::sync::OnceLock<Result<Postgres, String>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let pg = Postgres::start_with(&[
                ("fsync", "off"),
                ("synchronous_commit", "off"),
                ("full_page_writes", "off"),
                ("max_connections", "400"),
            ])
            .map_err(|e| e.to_string())?;
            pg.watch(std::process::id()).map_err(|e| e.to_string())?;
            Ok(pg)
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Postgres {
    /// Starts a watchdog that stops this server and removes its directory when process `pid`
    /// is gone.
    fn watch(&self, pid: u32) -> Result<(), PgError> {
        use std::os::unix::process::CommandExt;
        let server = self
            .server
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| PgError::Command {
                what: "watching the server".into(),
                output: "it is not running".into(),
            })?;
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; kill -QUIT {server}; \
             while kill -0 {server} 2>/dev/null; do sleep 0.1; done; rm -rf '{}'",
            self.dir.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(io("starting the server's watchdog"))?;
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn check(what: &str, out: &std::process::Output) -> Result<(), PgError> {
    if out.status.success() {
        return Ok(());
    }
    Err(PgError::Command {
        what: what.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .trim()
        .to_string(),
    })
}

fn free_port() -> Result<u16, PgError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

fn random_hex(bytes: usize) -> Result<String, PgError> {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(io("reading /dev/urandom"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server starts, answers with its generated password and refuses another, and is gone
    /// (its process reaped, its directory removed) once dropped.
    #[test]
    fn a_throwaway_server_starts_answers_and_is_gone_after() {
        let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pg.psql("postgres", "SELECT 1 + 1").unwrap(), "2");
        pg.create_database("patronus_test").unwrap();
        assert_eq!(
            pg.psql("patronus_test", "SELECT current_database()")
                .unwrap(),
            "patronus_test"
        );
        assert!(pg.create_database("no; DROP").is_err());
        // A wrong password is refused: authentication is on, even on loopback.
        let mut wrong = pg.command("psql");
        wrong
            .env("PGPASSWORD", "wrong")
            .args(["-X", "-h", "127.0.0.1", "-p", &pg.port().to_string()])
            .args(["-U", USER, "-d", "postgres", "-c", "SELECT 1"]);
        let out = wrong.output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = pg.dir().to_path_buf();
        let port = pg.port();
        drop(pg);
        assert!(!dir.exists(), "{}", dir.display());
        // Nothing listens on its port any more (the process was waited for).
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
