//! The controller's own Prometheus metrics: requests by route, method and status, their latency
//! (a histogram per route), the database pool, and how many objects the store holds.

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
}

impl HttpMetrics {
    pub fn record(&self, route: &str, method: &str, status: u16, took: Duration) {
        let key = (route.to_owned(), method.to_owned());
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

    /// The HTTP families, in the text exposition format.
    pub fn render(&self, out: &mut String) {
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
}
