//! The docs' commands, run. Every block of the documents in [`DOCS`] fenced as ```` ```sh run ````
//! is run, in order, against `patronus lab demo --no-schedule` (a controller, three sites with
//! their edges, streams running): it must exit 0, and where a ```` ```text output ```` block
//! follows it, print lines of that shape, in that order (`…` stands for anything; other lines
//! may come between). A document whose command or flag was renamed fails here, naming the
//! document, the line and what the command printed.
//!
//! What a block can rely on: `patronus` on `PATH` (this build's), `PATRONUS_URL` (the
//! controller), `PATRONUS_CA_FINGERPRINT` (its certificate's, which the CLI pins),
//! `PATRONUS_CA_FILE` (the certificate, for curl), `PATRONUS_ADMIN_PASSWORD`,
//! `PATRONUS_DATA_DIR` (the controller's data directory, for `backup` and `restore`), a `HOME` of its
//! own (the CLI's login is kept there) and a working directory shared by the blocks of a run;
//! what a block `export`s, the blocks after it see. Each block runs under `bash -euo pipefail`.
//! Runs on the lab's harness: without root it is counted as ignored, and
//! `PATRONUS_REQUIRE_LAB=1` makes that a failure.
#![allow(clippy::unwrap_used)]

mod lab_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use lab_common::demo::start_demo;

/// The documents whose commands are run, in this order (each may use what the ones before it
/// made).
const DOCS: &[&str] = &[
    "docs/api-guide.md",
    "docs/runbook.md",
    "docs/disaster-recovery.md",
    "docs/tuning.md",
];

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "docs lab",
        vec![patronus_lab::lab_test!(
            every_command_the_docs_show_runs_and_prints_what_they_show,
            needs "curl", "python3"
        )],
    )
}

/// A runnable block: where it is, its commands, and the output it shows (if any).
#[derive(Debug)]
struct Block {
    doc: String,
    line: usize,
    script: String,
    shown: Option<Vec<String>>,
}

/// The runnable blocks of a Markdown document, each with the output block after it.
fn blocks(doc: &str, text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    // The fenced block starting at line `i` (its info string's words, its body, the line after
    // its end).
    // (A block in a list item is indented: its lines lose the fence's indentation.)
    let fence = |i: usize| -> Option<(Vec<&str>, Vec<&str>, usize)> {
        let line = lines.get(i)?;
        let indent = line.len() - line.trim_start().len();
        let info = line.trim_start().strip_prefix("```")?;
        let words: Vec<&str> = info.split_whitespace().collect();
        let mut body = Vec::new();
        let mut j = i + 1;
        while j < lines.len() && !lines[j].trim_start().starts_with("```") {
            let l = lines[j];
            let cut = l.len() - l.trim_start().len();
            body.push(&l[cut.min(indent)..]);
            j += 1;
        }
        Some((words, body, j + 1))
    };
    while i < lines.len() {
        let Some((words, body, next)) = fence(i) else {
            i += 1;
            continue;
        };
        if words.first().is_some_and(|w| *w == "sh") && words.contains(&"run") {
            let start = i;
            let mut after = next;
            while lines.get(after).is_some_and(|l| l.trim().is_empty()) {
                after += 1;
            }
            let shown = match fence(after) {
                Some((w, body, end)) if w == ["text", "output"] => {
                    i = end;
                    Some(body.iter().map(|l| l.to_string()).collect())
                }
                _ => {
                    i = next;
                    None
                }
            };
            out.push(Block {
                doc: doc.to_owned(),
                line: start + 2,
                script: body.join("\n"),
                shown,
            });
        } else {
            i = next;
        }
    }
    out
}

/// Whether `line` has the shape of `pattern` (`…` matches any run of characters).
fn shaped(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return pattern.trim_end() == line.trim_end();
    }
    let mut rest = line.trim_end();
    for (k, part) in parts.iter().enumerate() {
        let part = if k == parts.len() - 1 {
            part.trim_end()
        } else {
            part
        };
        if k == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if k == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

/// Every line of `shown` matched by a line of `printed`, in order; the first that is not.
fn check_shape<'a>(shown: &'a [String], printed: &str) -> Result<(), &'a str> {
    let mut lines = printed.lines();
    for want in shown {
        if !lines.any(|l| shaped(want, l)) {
            return Err(want);
        }
    }
    Ok(())
}

fn the_checker_itself_works() {
    assert!(shaped("ID  NAME", "ID  NAME   "));
    assert!(shaped("…hq…online…", "3   hq   online   x"));
    assert!(shaped("{\"error\":…}", "{\"error\":{\"code\":1}}"));
    assert!(!shaped("…hq…", "branch1"));
    assert!(!shaped("a…b", "a"));
    let shown = vec!["first".to_owned(), "…third…".to_owned()];
    assert!(check_shape(&shown, "first\nsecond\nthe third one").is_ok());
    assert!(check_shape(&shown, "the third one\nfirst").is_err());
    let md = "x\n```sh run\necho hi\n```\n\n```text output\nhi\n```\n```sh\nnot run\n```\n\
              1. a step\n   ```sh run\n   echo two\n   ```\n";
    let b = blocks("t.md", md);
    assert_eq!(b.len(), 2);
    assert_eq!(b[1].script, "echo two");
    assert_eq!(b[0].script, "echo hi");
    assert_eq!(b[0].shown.as_deref(), Some(&["hi".to_owned()][..]));
    assert_eq!(b[0].line, 3);
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn every_command_the_docs_show_runs_and_prints_what_they_show() {
    the_checker_itself_works();
    let mut all = Vec::new();
    for doc in DOCS {
        let text =
            std::fs::read_to_string(root().join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"));
        let found = blocks(doc, &text);
        assert!(!found.is_empty(), "{doc} has no runnable block");
        all.extend(found);
    }
    let demo = start_demo();
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let env_file = work.path().join(".doc-env");
    std::fs::write(&env_file, "").unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_patronus")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ca_file = demo.state.join("tls").join("cert.pem");
    assert!(ca_file.exists(), "{}", ca_file.display());
    let mut ran = 0;
    for b in &all {
        let script = format!(
            "set -euo pipefail\nsource {env}\n{body}\nexport -p > {env}.next\n",
            env = env_file.display(),
            body = b.script
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(work.path())
            .env_clear()
            .env("PATH", &path)
            .env("HOME", home.path())
            .env("LANG", "C.UTF-8")
            .env("PATRONUS_URL", &demo.url)
            .env("PATRONUS_CA_FINGERPRINT", &demo.fingerprint)
            .env("PATRONUS_CA_FILE", &ca_file)
            .env("PATRONUS_ADMIN_PASSWORD", &demo.password)
            .env("PATRONUS_DATA_DIR", &demo.state)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{}:{}: the block failed ({}):\n{}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
            b.doc,
            b.line,
            out.status,
            b.script
        );
        if let Some(shown) = &b.shown {
            if let Err(line) = check_shape(shown, &stdout) {
                panic!(
                    "{}:{}: the output has no line shaped like {line:?} (after the ones before \
                     it):\n{}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
                    b.doc, b.line, b.script
                );
            }
        }
        // What the block exported, for the next ones (bash's own variables left out).
        let next = std::fs::read_to_string(format!("{}.next", env_file.display())).unwrap();
        let kept: Vec<&str> = next
            .lines()
            .filter(|l| {
                let name = l
                    .trim_start_matches("declare -x ")
                    .split('=')
                    .next()
                    .unwrap_or("");
                !matches!(name, "PWD" | "OLDPWD" | "SHLVL" | "_" | "HOME" | "PATH")
                    && !name.starts_with("PATRONUS_")
            })
            .collect();
        std::fs::write(&env_file, kept.join("\n") + "\n").unwrap();
        ran += 1;
    }
    eprintln!(
        "docs: {ran} blocks of {} documents ran as shown",
        DOCS.len()
    );
    drop(demo);
}
