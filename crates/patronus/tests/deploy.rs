//! What `deploy/` ships, checked with the tools operators use on it: the alert rules with
//! `promtool` (a firing and a quiet case for every alert, a runbook section for every alert),
//! the systemd units with `systemd-analyze verify`, and the `.deb` installed into a fresh
//! Debian root made by `mmdebstrap` (files, users, owners and modes). Runs on the lab's harness
//! (`patronus_lab::harness`: root, and the tools each test names); without them the tests are
//! counted as ignored, and `PATRONUS_REQUIRE_LAB=1` makes that a failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "deploy",
        vec![
            patronus_lab::lab_test!(every_alert_fires_on_its_case_and_names_a_runbook_section, needs "promtool"),
            patronus_lab::lab_test!(the_systemd_units_verify, needs "systemd-analyze"),
            patronus_lab::lab_test!(the_package_installs_into_a_fresh_debian_root, needs "mmdebstrap", "dpkg-deb"),
            patronus_lab::lab_test!(the_runtime_image_builds_on_a_debian_base, needs "mmdebstrap", "podman"),
            patronus_lab::lab_test!(the_compose_file_follows_the_compose_specification),
        ],
    )
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The names after `key` on lines of `text` (`- alert: X`, `alertname: X`).
fn values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .trim_start_matches("- ")
                .strip_prefix(key)
                .map(|v| v.trim().trim_matches('"'))
        })
        .collect()
}

fn every_alert_fires_on_its_case_and_names_a_runbook_section() {
    let dir = repo().join("deploy/prometheus");
    let out = run(Command::new("promtool")
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir));
    eprintln!("{out}");
    let out = run(Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir));
    assert!(out.contains("SUCCESS"), "{out}");
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).unwrap();
    let alerts: BTreeSet<&str> = values(&rules, "alert:").into_iter().collect();
    assert!(alerts.len() >= 15, "{alerts:?}");
    // Every alert has a case where it fires: an `alertname:` followed by expected alerts.
    let mut fired = BTreeSet::new();
    let mut current = None;
    for l in tests.lines().map(str::trim) {
        if let Some(n) = l.strip_prefix("alertname:") {
            current = Some(n.trim());
        } else if l.starts_with("- exp_labels:") {
            fired.extend(current);
        }
    }
    let quiet: BTreeSet<&str> = alerts.difference(&fired).copied().collect();
    assert!(quiet.is_empty(), "alerts with no firing case: {quiet:?}");
    // Every runbook link names a section of docs/runbook.md.
    let runbook = std::fs::read_to_string(repo().join("docs/runbook.md")).unwrap();
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## ").or_else(|| l.strip_prefix("### ")))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .collect::<String>()
                .replace(' ', "-")
        })
        .collect();
    let links = values(&rules, "runbook_url:");
    assert_eq!(links.len(), alerts.len(), "one runbook link per alert");
    for l in links {
        let anchor = l
            .strip_prefix("docs/runbook.md#")
            .unwrap_or_else(|| panic!("{l}: not a link into docs/runbook.md"));
        assert!(
            anchors.contains(anchor),
            "{l}: no such section in docs/runbook.md ({anchors:?})"
        );
    }
}

/// A root holding systemd's own units (for the targets the units name), the units and the
/// binary they start.
fn unit_root(dir: &Path) {
    let units = dir.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(dir.join("usr/bin")).unwrap();
    std::os::unix::fs::symlink("usr/lib", dir.join("lib")).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg("/lib/systemd/system/.")
        .arg(&units));
    for u in ["patronus-controller.service", "patronus-edge.service"] {
        std::fs::copy(repo().join("deploy/systemd").join(u), units.join(u)).unwrap();
    }
    std::fs::copy(env!("CARGO_BIN_EXE_patronus"), dir.join("usr/bin/patronus")).unwrap();
}

fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    unit_root(dir.path());
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", dir.path().display()))
        .args(["patronus-controller.service", "patronus-edge.service"]));
    assert!(out.trim().is_empty(), "systemd-analyze verify:\n{out}");
    // The exposure score systemd gives each unit (0 is the best, 10 the worst), for the note.
    for u in ["patronus-controller.service", "patronus-edge.service"] {
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", dir.path().display()))
            .arg(u));
        let score = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{out}"));
        eprintln!("{score}");
    }
}

fn the_package_installs_into_a_fresh_debian_root() {
    let work = tempfile::tempdir().unwrap();
    let out = run(Command::new(repo().join("deploy/deb/build"))
        .arg(env!("CARGO_BIN_EXE_patronus"))
        .arg(work.path()));
    let deb = PathBuf::from(out.trim().lines().last().unwrap());
    assert!(deb.exists(), "{out}");
    // A Debian root from Debian's packages alone: the essential set, and adduser (the
    // package's one dependency beyond libc).
    let root = work.path().join("root");
    run(Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--variant=essential",
            "--include=adduser",
            "--mode=root",
        ])
        .arg(debian_suite())
        .arg(&root));
    std::fs::copy(&deb, root.join("tmp/patronus.deb")).unwrap();
    let out = run(Command::new("chroot")
        .arg(&root)
        .args(["dpkg", "-i", "/tmp/patronus.deb"]));
    eprintln!("{out}");
    // Files, with their owners and modes.
    let check = |path: &str, mode: u32, owner: &str| {
        let meta = std::fs::symlink_metadata(root.join(path.trim_start_matches('/')))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            meta.mode() & 0o7777,
            mode,
            "{path}: mode {:o}",
            meta.mode() & 0o7777
        );
        let name = user_name(&root, meta.uid());
        assert_eq!(name, owner, "{path}: owner");
    };
    check("/usr/bin/patronus", 0o755, "root");
    check(
        "/lib/systemd/system/patronus-controller.service",
        0o644,
        "root",
    );
    check("/lib/systemd/system/patronus-edge.service", 0o644, "root");
    check("/usr/share/patronus/prometheus/alerts.yml", 0o644, "root");
    check(
        "/usr/share/patronus/grafana/dashboards/patronus-overview.json",
        0o644,
        "root",
    );
    check(
        "/usr/share/patronus/examples/controller.toml",
        0o644,
        "root",
    );
    check("/usr/share/patronus/examples/edge.toml", 0o644, "root");
    check("/usr/share/doc/patronus/runbook.md", 0o644, "root");
    check("/etc/patronus", 0o750, "root");
    check("/var/lib/patronus", 0o700, "patronus");
    check("/var/lib/patronus-edge", 0o700, "patronus-edge");
    // The users: system users without a login shell.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    for u in ["patronus", "patronus-edge"] {
        let line = passwd
            .lines()
            .find(|l| l.split(':').next() == Some(u))
            .unwrap_or_else(|| panic!("no user {u}:\n{passwd}"));
        let f: Vec<&str> = line.split(':').collect();
        assert!(
            f[2].parse::<u32>().unwrap() < 1000,
            "{line}: not a system user"
        );
        assert_eq!(f[6], "/usr/sbin/nologin", "{line}");
    }
    // The binary runs in the root it was installed into.
    let out = run(Command::new("chroot")
        .arg(&root)
        .args(["/usr/bin/patronus", "--version"]));
    assert!(out.starts_with("patronus "), "{out}");
    // A second install (an upgrade in place) keeps the users and the state directories.
    run(Command::new("chroot")
        .arg(&root)
        .args(["dpkg", "-i", "/tmp/patronus.deb"]));
    check("/var/lib/patronus", 0o700, "patronus");
    run(Command::new("chroot")
        .arg(&root)
        .args(["dpkg", "--remove", "patronus"]));
    assert!(!root.join("usr/bin/patronus").exists());
    assert!(
        root.join("var/lib/patronus").exists(),
        "the state is kept on remove"
    );
}

/// The Debian release of this machine (the suite mmdebstrap builds the root of).
fn debian_suite() -> String {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    os.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "bookworm".into())
}

fn user_name(root: &Path, uid: u32) -> String {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (*f.get(2)? == uid.to_string()).then(|| f[0].to_owned())
        })
        .unwrap_or_else(|| uid.to_string())
}

/// The Containerfile's runtime stage, on a base made from Debian's packages (`mmdebstrap`,
/// `podman import`) and the binary cargo built: the only registry this machine reaches is
/// Debian's, so the build stage (Debian's Rust image) is not built here.
fn the_runtime_image_builds_on_a_debian_base() {
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("base.tar");
    run(Command::new("mmdebstrap")
        .args(["--quiet", "--variant=minbase", "--mode=root"])
        .arg(debian_suite())
        .arg(&tar));
    let tag = format!("localhost/patronus-test-base:{}", std::process::id());
    run(Command::new("podman").arg("import").arg(&tar).arg(&tag));
    // The binary as the build stage leaves it: /out/patronus in the `build` context.
    let ctx = work.path().join("build");
    std::fs::create_dir_all(ctx.join("out")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_patronus"), ctx.join("out/patronus")).unwrap();
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg(ctx.join("out/patronus")));
    let empty = work.path().join("context");
    std::fs::create_dir_all(&empty).unwrap();
    let image = format!("localhost/patronus-test:{}", std::process::id());
    let out = run(Command::new("podman")
        // chroot isolation: RUN steps without crun (which this machine's cgroups refuse).
        .args([
            "build",
            "--isolation",
            "chroot",
            "--format",
            "docker",
            "--target",
            "runtime",
        ])
        .arg("-f")
        .arg(repo().join("deploy/container/Containerfile"))
        .arg("--build-arg")
        .arg(format!("BASE={tag}"))
        .arg("--build-context")
        .arg(format!("build={}", ctx.display()))
        .args(["-t", &image])
        .arg(&empty));
    eprintln!(
        "{}",
        out.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
    let inspect = run(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}|{{json .Config.Healthcheck}}|{{json .Config.Entrypoint}}",
        &image,
    ]));
    let f: Vec<&str> = inspect.trim().splitn(3, '|').collect();
    assert_eq!(f[0], "10001:10001", "runs as its own user: {inspect}");
    assert!(
        f[1].contains("controller") && f[1].contains("ready"),
        "health check: {inspect}"
    );
    assert!(f[2].contains("/usr/bin/patronus"), "{inspect}");
    // Run it, if this machine lets containers run; if it does not, say what fails.
    let out = Command::new("podman")
        .args([
            "run",
            "--rm",
            "--entrypoint",
            "/usr/bin/patronus",
            &image,
            "--version",
        ])
        .output()
        .unwrap();
    if out.status.success() {
        let v = String::from_utf8_lossy(&out.stdout);
        assert!(v.starts_with("patronus "), "{v}");
        eprintln!("the image runs: {}", v.trim());
    } else {
        eprintln!(
            "the image does not run on this machine (podman run: {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let _ = Command::new("podman")
        .args(["rmi", "-f", &image, &tag])
        .output();
}

/// `deploy/container/compose.yml` against the Compose Specification's JSON schema (as
/// check-jsonschema, from PyPI, carries it; `.ci/deps` installs it): a misspelt key fails.
fn the_compose_file_follows_the_compose_specification() {
    let checker = repo().join("target/tools/python/bin/check-jsonschema");
    assert!(
        checker.exists(),
        "{}: missing (run .ci/deps)",
        checker.display()
    );
    let out = run(Command::new(&checker)
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(repo().join("deploy/container/compose.yml")));
    assert!(out.contains("ok"), "{out}");
    // And the checker does check: a misspelt key is refused.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("compose.yml");
    let text = std::fs::read_to_string(repo().join("deploy/container/compose.yml")).unwrap();
    std::fs::write(&bad, text.replacen("restart:", "restrat:", 1)).unwrap();
    let out = Command::new(&checker)
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
}
