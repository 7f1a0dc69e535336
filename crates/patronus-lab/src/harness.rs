//! The test harness of the lab tests (`harness = false` test targets), on `libtest-mimic`: the
//! same command line, filters, `--list`, `--exact` and summary line as cargo's own harness.
//!
//! A lab test needs root, `ip`, `/dev/net/tun` ([`privilege_problem`]), `ping` (iputils-ping:
//! the lab and its tests check reachability with it) and, for some, more tools (`iperf3`,
//! `wireguard-go`, ...). When one of these is missing:
//!
//! - with `PATRONUS_REQUIRE_LAB` set (not empty, not `0`; CI sets it), the test **fails**,
//!   saying what is missing;
//! - without it, the test is **ignored** at run time with the reason, so the summary counts it
//!   (`0 passed; 0 failed; 8 ignored`), and a banner after the summary says how many lab tests
//!   did not run and why. A lab test never passes without having run.
//!
//! The tests run one at a time whatever `--test-threads` says: they measure time on a shared
//! 2-core machine. Output is never captured (libtest-mimic has no capture; `--nocapture` is
//! accepted and changes nothing), so the figures the tests print are always shown.
//!
//! A test file lists its tests in its `main`:
//!
//! ```text
//! fn main() -> std::process::ExitCode {
//!     patronus_lab::harness::run(
//!         "edge lab",
//!         vec![
//!             patronus_lab::lab_test!(two_sites_reach_each_other),
//!             patronus_lab::lab_test!(tcp_through_the_tunnel, needs "iperf3"),
//!         ],
//!     )
//! }
//! ```

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};

use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::netns::privilege_problem;

/// One lab test: its name, the tools it needs beyond the lab's own, and its body (which
/// panics to fail).
#[derive(Debug)]
pub struct LabTest {
    name: &'static str,
    needs: Vec<&'static str>,
    body: fn(),
}

impl LabTest {
    pub fn new(name: &'static str, body: fn()) -> Self {
        Self {
            name,
            needs: Vec::new(),
            body,
        }
    }

    /// Programs this test runs besides `ip` and `ping`.
    pub fn needs(mut self, tools: &[&'static str]) -> Self {
        self.needs.extend_from_slice(tools);
        self
    }
}

/// A [`LabTest`] named after its function: `lab_test!(f)`, `lab_test!(f, needs "iperf3")`.
#[macro_export]
macro_rules! lab_test {
    ($f:ident $(, needs $($tool:literal),+)?) => {
        $crate::harness::LabTest::new(stringify!($f), $f)$(.needs(&[$($tool),+]))?
    };
}

/// Whether `PATRONUS_REQUIRE_LAB` makes a lab that cannot run a failure.
pub fn lab_required() -> bool {
    std::env::var("PATRONUS_REQUIRE_LAB").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Whether `tool` can be started (it is asked for its version, and its answer not read).
fn missing_tool(tool: &str) -> Option<String> {
    let found = Command::new(tool)
        .arg("-V")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    (!found).then(|| format!("the test needs `{tool}`, which is not installed"))
}

/// Runs `tests` as the test binary `suite` and returns its exit code (failure if any test
/// failed, or if the command line was bad).
pub fn run(suite: &str, tests: Vec<LabTest>) -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let listing = args.list;
    let required = lab_required();
    let lab = privilege_problem();
    let trials = tests
        .into_iter()
        .map(|t| {
            let LabTest { name, needs, body } = t;
            let lab = lab.clone();
            Trial::ignorable_test(name, move || {
                let problem = lab.or_else(|| {
                    std::iter::once(&"ping")
                        .chain(&needs)
                        .find_map(|tool| missing_tool(tool))
                });
                match problem {
                    None => {
                        body();
                        Ok(Completion::Completed)
                    }
                    Some(p) if required => Err(Failed::from(format!(
                        "PATRONUS_REQUIRE_LAB is set and this lab test cannot run: {p}"
                    ))),
                    Some(p) => Ok(Completion::ignored_with(p)),
                }
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if !listing && conclusion.num_ignored > 0 {
        let why = lab.unwrap_or_else(|| "a tool they need is missing (see each one above)".into());
        let n = conclusion.num_ignored;
        let _ = writeln!(
            std::io::stderr(),
            "\n{bar}\n*** {n} {suite} test{s} did NOT run: {why}.\n\
             *** They are counted as ignored above, never as passed. Run as root to run them;\n\
             *** CI sets PATRONUS_REQUIRE_LAB=1, which makes a lab test that cannot run fail.\n{bar}\n",
            bar = "*".repeat(88),
            s = if n == 1 { "" } else { "s" },
        );
    }
    conclusion.exit_code()
}

/// Panics unless Prometheus's own checker (`promtool check metrics`, from Debian's
/// `prometheus` package, which `.ci/deps` installs) finds nothing to say of `metrics`, a
/// `/metrics` page in the text exposition format.
pub fn promtool_accepts(metrics: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool checks the metrics ({e}): run .ci/deps to install it")
        });
    if let Some(mut stdin) = child.stdin.take() {
        if let Err(e) = stdin.write_all(metrics.as_bytes()) {
            panic!("writing to promtool: {e}");
        }
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for promtool: {e}"));
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
