//! The dashboard's drawings, as inline SVG rendered on the server: the topology (sites, and
//! every path between them coloured by its state) and a measurement over time. Colours come
//! from the stylesheet by `data-state`, so that the script can recolour a path without a
//! style of its own (the CSP allows no inline style).

use maud::{Markup, html};
use serde_json::Value;

use super::pages::{path_name, state_of};

const W: f64 = 800.0;
const H: f64 = 520.0;

/// Where each site is drawn: hubs in the middle (hub and spoke), the others on a circle.
fn places(topo: &Value, sites: &[Value]) -> Vec<(i64, String, f64, f64)> {
    let hubs: Vec<&str> = topo["hubs"]
        .as_array()
        .map(|h| h.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let hub_mode = topo["mode"].as_str() == Some("hub-and-spoke") && !hubs.is_empty();
    let (cx, cy) = (W / 2.0, H / 2.0);
    let (inner, outer): (Vec<&Value>, Vec<&Value>) = sites
        .iter()
        .partition(|s| hub_mode && s["name"].as_str().is_some_and(|n| hubs.contains(&n)));
    let mut out = Vec::new();
    let mut ring = |list: &[&Value], r: f64, phase: f64| {
        let n = list.len().max(1) as f64;
        for (i, s) in list.iter().enumerate() {
            let a = phase + std::f64::consts::TAU * i as f64 / n;
            let (x, y) = if list.len() == 1 && r < 100.0 {
                (cx, cy)
            } else {
                (cx + r * a.cos(), cy + r * 0.9 * a.sin())
            };
            out.push((
                s["id"].as_i64().unwrap_or(0),
                s["name"].as_str().unwrap_or("?").to_owned(),
                x,
                y,
            ));
        }
    };
    ring(&inner, 70.0, -std::f64::consts::FRAC_PI_2);
    ring(&outer, 200.0, -std::f64::consts::FRAC_PI_2);
    out
}

/// The sites and their paths. Paths between the same two sites fan out so that each is seen.
pub fn topology(topo: &Value, sites: &[Value], paths: &[Value]) -> Markup {
    let at = places(topo, sites);
    let pos = |id: &Value| {
        at.iter()
            .find(|(i, ..)| Some(*i) == id.as_i64())
            .map(|(_, _, x, y)| (*x, *y))
    };
    // Paths grouped by their pair of sites, in a stable order.
    let mut pairs: Vec<((i64, i64), Vec<&Value>)> = Vec::new();
    for p in paths {
        let (a, b) = (
            p["a"]["site_id"].as_i64().unwrap_or(0),
            p["b"]["site_id"].as_i64().unwrap_or(0),
        );
        let key = (a.min(b), a.max(b));
        match pairs.iter_mut().find(|(k, _)| *k == key) {
            Some((_, l)) => l.push(p),
            None => pairs.push((key, vec![p])),
        }
    }
    let online: Vec<i64> = sites
        .iter()
        .filter(|s| s["online"] == true)
        .filter_map(|s| s["id"].as_i64())
        .collect();
    // The drawing's box: the sites and room around them for the fanned paths and the names.
    let pad = 100.0;
    let (x0, x1, y0, y1) = at.iter().fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(a, b, c, d), (_, _, x, y)| (a.min(*x), b.max(*x), c.min(*y), d.max(*y)),
    );
    let view = if at.is_empty() {
        format!("0 0 {W} {H}")
    } else {
        format!(
            "{:.0} {:.0} {:.0} {:.0}",
            x0 - pad,
            y0 - pad * 0.7,
            (x1 - x0) + 2.0 * pad,
            (y1 - y0) + 1.4 * pad
        )
    };
    html! {
        svg.topology viewBox=(view) role="img" aria-label="Sites and paths" {
            @for (_, list) in &pairs {
                @let k = list.len() as f64;
                @for (i, p) in list.iter().enumerate() {
                    @if let (Some((x1, y1)), Some((x2, y2))) = (pos(&p["a"]["site_id"]), pos(&p["b"]["site_id"])) {
                        @let (dx, dy) = (x2 - x1, y2 - y1);
                        @let len = (dx * dx + dy * dy).sqrt().max(1.0);
                        @let off = (i as f64 - (k - 1.0) / 2.0) * 22.0;
                        @let (mx, my) = ((x1 + x2) / 2.0 - dy / len * off * 2.0, (y1 + y2) / 2.0 + dx / len * off * 2.0);
                        @let id = p["id"].as_str().unwrap_or("");
                        a href={ "/ui/paths/" (id) } {
                            path.p d=(format!("M{x1:.1},{y1:.1} Q{mx:.1},{my:.1} {x2:.1},{y2:.1}"))
                                data-path=(id) data-state=(state_of(p)) {
                                title { (path_name(p)) ": " (state_of(p)) }
                            }
                        }
                    }
                }
            }
            @for (id, name, x, y) in &at {
                a href={ "/ui/sites/" (id) } {
                    g.site data-site=(name) data-online=(online.contains(id)) {
                        circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="24" {}
                        // The name outside the drawing's centre, away from the paths.
                        @let (ux, uy) = ((x - W / 2.0), (y - H / 2.0));
                        @let n = (ux * ux + uy * uy).sqrt();
                        @let (lx, ly) = if n < 1.0 { (*x, y + 44.0) } else { (x + ux / n * 44.0, y + uy / n * 44.0 + 6.0) };
                        text x=(format!("{lx:.1}")) y=(format!("{ly:.1}")) { (name) }
                    }
                }
            }
        }
    }
}

/// `field` of `samples` (a path's metrics, oldest first) from `t0` to `t1` (unix s), as a line;
/// gaps longer than three minutes are left as gaps; no sample at all says so.
pub fn chart(samples: &[Value], t0: i64, t1: i64, field: &str, unit: &str) -> Markup {
    const CW: f64 = 600.0;
    const CH: f64 = 150.0;
    const L: f64 = 48.0;
    const R: f64 = 8.0;
    const T: f64 = 10.0;
    const B: f64 = 24.0;
    let pts: Vec<(i64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s["at"].as_i64()?, s[field].as_f64()?)))
        .filter(|(t, _)| (t0..=t1).contains(t))
        .collect();
    if pts.is_empty() {
        return html! { p.nodata { "No measurement in this hour." } };
    }
    // A history shorter than the window is drawn over what there is (five minutes at least),
    // not as a sliver at the right edge; the axis says which.
    let first = pts.first().map_or(t0, |p| p.0);
    let t0 = t0.max(first - 30).min(t1 - 300);
    let span_min = (t1 - t0 + 59) / 60;
    let max = pts.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let top = nice(max);
    let x = |t: i64| L + (t - t0) as f64 / (t1 - t0).max(1) as f64 * (CW - L - R);
    let y = |v: f64| T + (1.0 - v / top) * (CH - T - B);
    // Runs of points without a gap; a run of one is drawn as a dot.
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut last: Option<i64> = None;
    for (t, v) in &pts {
        if runs.is_empty() || last.is_some_and(|l| t - l > 180) {
            runs.push(Vec::new());
        }
        if let Some(run) = runs.last_mut() {
            run.push((x(*t), y(*v)));
        }
        last = Some(*t);
    }
    let newest = pts.last().map_or(0.0, |p| p.1);
    html! {
        svg.chart viewBox={ "0 0 " (CW) " " (CH) } role="img"
            aria-label={ (field) ", last value " (format!("{newest:.2}")) " " (unit) } {
            line.axis x1=(L) y1=(CH - B) x2=(CW - R) y2=(CH - B) {}
            line.grid x1=(L) y1=(T) x2=(CW - R) y2=(T) {}
            text.tick x=(L - 4.0) y=(T + 4.0) text-anchor="end" { (fmt(top)) }
            text.tick x=(L - 4.0) y=(CH - B) text-anchor="end" { "0" }
            text.tick x=(L) y=(CH - 6.0) { "−" (span_min) " min" }
            text.tick x=(CW - R) y=(CH - 6.0) text-anchor="end" { "now" }
            @for run in &runs {
                @if let [(px, py)] = run.as_slice() {
                    circle.pt cx=(format!("{px:.1}")) cy=(format!("{py:.1}")) r="2" {}
                } @else {
                    polyline.series points=(run.iter().map(|(px, py)| format!("{px:.1},{py:.1}")).collect::<Vec<_>>().join(" ")) {}
                }
            }
            title { (unit) ", last hour" }
        }
    }
}

/// A round number at or above `v` for the axis.
fn nice(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt(v: f64) -> String {
    if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(super::nice(0.0), 1.0);
        assert_eq!(super::nice(7.3), 10.0);
        assert_eq!(super::nice(23.0), 25.0);
        assert_eq!(super::nice(180.0), 200.0);
    }
}
