//! The controller's own Prometheus metrics: requests by route, method and status, their latency
//! (a histogram per route), the database pool, how many objects the store holds, the build and
//! the process.
//!
//! Every label value a client can choose comes from a closed set: the route is the pattern the
//! router matched (`unmatched` for anything else, never the path a client sent) and the method
//! one of the standard ones (`other` for anything else), so no request can add a series that
//! the controller's own routes do not already define.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// (route, method, status) -> requests.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// (route, method) -> latency.
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    /// Connections closed at once for being over a connection cap.
    refused: std::sync::atomic::AtomicU64,
    /// TLS handshakes that failed or timed out.
    handshakes_failed: std::sync::atomic::AtomicU64,
}

/// The methods counted by name; any other is counted as `other`.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

/// The `method` label of a request's method: its name if standard, else `other`.
pub fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

impl HttpMetrics {
    /// Counts one answered request. `route` must be a route pattern of the router (or
    /// `unmatched`); the method is folded into [`method_label`].
    pub fn record(&self, route: &str, method: &str, status: u16, took: Duration) {
        let key = (route.to_owned(), method_label(method).to_owned());
        {
            let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            *r.entry((key.0.clone(), key.1.clone(), status)).or_default() += 1;
        }
        let s = took.as_secs_f64();
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let h = l.entry(key).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// Counts a connection closed at once for being over a cap.
    pub fn refused_connection(&self) {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a TLS handshake that failed or timed out (a client that does not trust the
    /// certificate, a scanner, a client that sent nothing).
    pub fn failed_handshake(&self) {
        self.handshakes_failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The HTTP families, in the text exposition format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP patronus_http_tls_handshakes_failed_total TLS handshakes on the API's port \
             that failed or timed out (a client that refuses the certificate, a scanner).\n\
             # TYPE patronus_http_tls_handshakes_failed_total counter\n\
             patronus_http_tls_handshakes_failed_total {}",
            self.handshakes_failed
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP patronus_http_connections_refused_total Connections closed at once for being over \
             the total or per-address connection cap.\n\
             # TYPE patronus_http_connections_refused_total counter\n\
             patronus_http_connections_refused_total {}",
            self.refused.load(std::sync::atomic::Ordering::Relaxed)
        );
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str("# HELP patronus_http_requests_total HTTP requests answered, by route pattern, method and status.\n");
        out.push_str("# TYPE patronus_http_requests_total counter\n");
        for ((route, method, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "patronus_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
                esc(route),
                esc(method)
            );
        }
        out.push_str("# HELP patronus_http_request_duration_seconds Time to answer, by route pattern and method.\n");
        out.push_str("# TYPE patronus_http_request_duration_seconds histogram\n");
        for ((route, method), h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let labels = format!("route=\"{}\",method=\"{}\"", esc(route), esc(method));
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "patronus_http_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "patronus_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "patronus_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "patronus_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
    }
}

/// `patronus_build_info`: 1, labelled with the version that is running.
pub fn build_info(out: &mut String) {
    gauge(
        out,
        "patronus_build_info",
        "Always 1; the labels say which build of the controller is running.",
        &[(
            format!(
                "{{version=\"{}\",component=\"controller\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        )],
    );
}

/// The standard `process_*` metrics, read from `/proc/self` (Linux). A value that cannot be read
/// is left out, never written as 0.
pub fn process(out: &mut String) {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // Field n of proc(5) is fields[n - 3].
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let ticks = 100.0; // USER_HZ, 100 on every Linux ABI.
    let page = 4096.0;
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total User and system CPU time spent, seconds.\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}",
            (utime + stime) / ticks
        );
    }
    if let Some(vsize) = field(23) {
        gauge(
            out,
            "process_virtual_memory_bytes",
            "Virtual memory size, bytes.",
            &[(String::new(), vsize)],
        );
    }
    if let Some(rss) = field(24) {
        gauge(
            out,
            "process_resident_memory_bytes",
            "Resident memory size, bytes.",
            &[(String::new(), rss * page)],
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        gauge(
            out,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, seconds.",
            &[(String::new(), boot + start / ticks)],
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            out,
            "process_open_fds",
            "Open file descriptors.",
            &[(String::new(), dir.count() as f64)],
        );
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        });
    if let Some(max) = max_fds {
        gauge(
            out,
            "process_max_fds",
            "The soft limit on open file descriptors.",
            &[(String::new(), max)],
        );
    }
}

/// One histogram with the latency buckets of the HTTP metrics, for a figure with no label:
/// [`crate::app::Inner::push_lag`].
#[derive(Debug, Default)]
pub struct Timing(Mutex<Histogram>);

impl Timing {
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The family, with every bucket even before the first observation (a zero, not an
    /// absent series: a dashboard's query of it has data from the start).
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", h.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", h.sum);
        let _ = writeln!(out, "{name}_count {}", h.count);
    }
}

/// A counter family.
pub fn counter(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// A one-sample gauge family.
pub fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counts_add_up() {
        let m = HttpMetrics::default();
        m.record("/a", "GET", 200, Duration::from_millis(3));
        m.record("/a", "GET", 404, Duration::from_millis(300));
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains(r#"patronus_http_requests_total{route="/a",method="GET",status="200"} 1"#)
        );
        assert!(out.contains(r#"le="0.005"} 1"#), "{out}");
        assert!(out.contains(r#"le="0.5"} 2"#), "{out}");
        assert!(out.contains(r#"le="+Inf"} 2"#), "{out}");
        assert!(out.contains(
            r#"patronus_http_request_duration_seconds_count{route="/a",method="GET"} 2"#
        ));
    }

    #[test]
    fn methods_outside_the_standard_set_share_one_label() {
        let m = HttpMetrics::default();
        for method in ["ZZTEST1", "ZZTEST2", "get", "PROPFIND"] {
            m.record("unmatched", method, 405, Duration::from_millis(1));
        }
        m.record("unmatched", "PATCH", 405, Duration::from_millis(1));
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains(
                r#"patronus_http_requests_total{route="unmatched",method="other",status="405"} 4"#
            ),
            "{out}"
        );
        assert!(out.contains(r#"method="PATCH""#));
        assert!(
            !out.contains("ZZTEST") && !out.contains("PROPFIND"),
            "{out}"
        );
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let mut out = String::new();
        process(&mut out);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(out.contains(&format!("\n{name} ")), "{name} in {out}");
        }
    }
}
