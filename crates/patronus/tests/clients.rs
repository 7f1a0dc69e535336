//! The API from other languages, through clients generated from the controller's own OpenAPI
//! document by standard generators: Python (openapi-python-client, from PyPI) and TypeScript
//! (openapi-typescript's types with the openapi-fetch client, from npm, compiled by tsc
//! --strict). Each example in `clients/` logs in, lists the sites, creates a policy and
//! verifies the signature of the webhook that change sets off, against a live controller
//! started here on loopback. A generator that chokes on the document, or a type the examples
//! no longer compile against, fails the test. The tools come from `.ci/deps` (the README's test
//! command runs it first); without them the test fails and says how to get them.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EMAIL: &str = "admin@example.net";
const PASSWORD: &str = "Correct-Horse-Battery-1";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A tool `.ci/deps` installs, or a failure that says so.
fn tool(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run .ci/deps (the README's test command does)",
        path.display()
    );
    path
}

/// Runs `cmd`; its stdout, or a failure with everything it printed.
fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout:\n{stdout}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A controller on loopback, killed when dropped.
struct Controller {
    child: Child,
    url: String,
    ca: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn controller(dir: &Path) -> Controller {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.join("controller.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_patronus"))
        .args(["controller", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("state"))
        .env("PATRONUS_ADMIN_EMAIL", EMAIL)
        .env("PATRONUS_ADMIN_PASSWORD", PASSWORD)
        // The examples' webhook receivers listen on loopback.
        .env("PATRONUS_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let c = Controller {
        child,
        url: format!("https://127.0.0.1:{port}"),
        ca: dir.join("state/tls/cert.pem"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = c.ca.exists()
            && Command::new("curl")
                .args(["-sS", "--fail", "--cacert"])
                .arg(&c.ca)
                .arg(format!("{}/ready", c.url))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if ok {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "the controller did not come up: {}",
            std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the examples print when they get through, each line.
const EXPECTED: [&str; 3] = [
    "sites: 0 []",
    "created",
    "webhook: config.changed signature verified",
];

fn check(lang: &str, printed: &str) {
    for want in EXPECTED {
        assert!(printed.contains(want), "{lang}: no {want:?} in\n{printed}");
    }
}

#[test]
fn generated_python_and_typescript_clients_log_in_create_a_policy_and_verify_a_webhook() {
    let python = tool(root().join("target/tools/python/bin/python"));
    let generator = tool(root().join("target/tools/python/bin/openapi-python-client"));
    let ts = root().join("clients/typescript");
    let bin = tool(ts.join("node_modules/.bin"));
    let dir = tempfile::tempdir().unwrap();
    let c = controller(dir.path());
    let doc = dir.path().join("openapi.json");
    run(
        "fetching the OpenAPI document",
        Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&c.ca)
            .arg("-o")
            .arg(&doc)
            .arg(format!("{}/api/v1/openapi.json", c.url)),
    );
    let env = |cmd: &mut Command| {
        cmd.env("PATRONUS_URL", &c.url)
            .env("PATRONUS_CA_FILE", &c.ca)
            .env("PATRONUS_EMAIL", EMAIL)
            .env("PATRONUS_PASSWORD", PASSWORD);
    };

    // Python: the client generated into a directory of its own, the example run with it.
    let py = dir.path().join("python");
    std::fs::create_dir_all(&py).unwrap();
    run(
        "openapi-python-client generate",
        Command::new(&generator)
            .args(["generate", "--meta", "none", "--path"])
            .arg(&doc)
            .arg("--output-path")
            .arg(py.join("patronus_client")),
    );
    let mut cmd = Command::new(&python);
    cmd.arg(root().join("clients/python/example.py"))
        .env("PYTHONPATH", &py);
    env(&mut cmd);
    let printed = run("the Python example", &mut cmd);
    check("python", &printed);

    // TypeScript: the types generated beside a copy of the example, compiled strict, run.
    let out = dir.path().join("typescript");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["example.ts", "tsconfig.json", "package.json"] {
        std::fs::copy(ts.join(f), out.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(ts.join("node_modules"), out.join("node_modules")).unwrap();
    // Properties with a default are optional in what a client sends: the document's defaults
    // are the server's, not values every request must carry.
    run(
        "openapi-typescript",
        Command::new(bin.join("openapi-typescript"))
            .arg(&doc)
            .args(["--default-non-nullable", "false", "-o"])
            .arg(out.join("api.d.ts")),
    );
    run("tsc", Command::new(bin.join("tsc")).arg("-p").arg(&out));
    let mut cmd = Command::new("node");
    cmd.arg(out.join("example.js"))
        .env("NODE_EXTRA_CA_CERTS", &c.ca);
    env(&mut cmd);
    let printed = run("the TypeScript example", &mut cmd);
    check("typescript", &printed);
}
