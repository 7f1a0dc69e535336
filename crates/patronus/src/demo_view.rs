//! The demo's live view, laid out for a terminal of a given size: the header (what the demo
//! is, the API's address, the admin's password, the schedule) always on top and whole; then
//! each site's paths, the streams, and as many of the latest events as fit. A table that is too
//! wide loses its least useful columns first; the paths get the rows the streams and a few
//! events leave, shared between the sites; every line fits the width, so nothing scrolls.

use std::fmt::Write as _;

/// What one frame shows.
#[derive(Debug, Default)]
pub struct Frame {
    /// Pieces of the header, in order; as many go on a line as fit, and one too long for any
    /// line is wrapped.
    pub header: Vec<String>,
    pub sites: Vec<Site>,
    pub streams: Vec<StreamRow>,
    /// The event lines, oldest first.
    pub events: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Site {
    pub name: String,
    /// What to say about the site as a whole (or why its edge does not answer), most important
    /// first: the parts are joined on the site's line, after the first of them comes how many
    /// of its rows did not fit, and what the width cannot hold is cut.
    pub summary: Vec<String>,
    /// Its paths worth a row, most urgent first.
    pub paths: Vec<PathRow>,
}

#[derive(Debug, Default, Clone)]
pub struct PathRow {
    pub peer: String,
    /// `local>remote` link names.
    pub path: String,
    pub state: String,
    pub rtt_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    pub jitter_ms: f64,
    pub loss_pct: f64,
    pub flows: u32,
    pub flaps: u64,
    pub tx_kbps: f64,
}

#[derive(Debug, Default, Clone)]
pub struct StreamRow {
    pub name: String,
    pub from: String,
    pub to: String,
    pub port: u16,
    pub rate_pps: u32,
    pub sent: u64,
    pub lost: u64,
    pub last_outage_ms: f64,
}

/// Events shown at least, when the terminal is short.
const MIN_EVENTS: usize = 3;

/// The frame as at most `rows` lines of fewer than `cols` characters (the last column is left
/// free: a character there leaves some terminals about to wrap).
pub fn render(f: &Frame, cols: usize, rows: usize) -> Vec<String> {
    let width = cols.saturating_sub(1).max(20);
    let mut out = pack(&f.header, width);
    let streams = streams_table(&f.streams, width);
    let gap = usize::from(rows >= 30);
    // Always shown: the paths' header and each site's line, the streams, the events' title
    // and a few events. What is left goes half to path rows, half to more events.
    let fixed = 1 + f.sites.len() + gap + streams.len() + 1 + MIN_EVENTS;
    let spare = rows.saturating_sub(out.len() + fixed);
    out.extend(paths_table(&f.sites, width, spare.div_ceil(2)));
    out.extend(std::iter::repeat_n(String::new(), gap));
    out.extend(streams);
    let room = rows.saturating_sub(out.len() + 1);
    if room > 0 {
        out.push(fit(
            "EVENTS (as the controller's webhook tells them; the time an edge saw each)",
            width,
        ));
        out.extend(last_wrapped(&f.events, width, room));
    }
    out.truncate(rows);
    out
}

/// Every path row, for output that is not a terminal.
pub fn paths_lines(sites: &[Site]) -> Vec<String> {
    paths_table(sites, 200, usize::MAX)
}

/// The streams' table, for output that is not a terminal.
pub fn streams_lines(streams: &[StreamRow]) -> Vec<String> {
    streams_table(streams, 200)
}

/// The header's pieces, as many on a line as fit, three spaces apart.
fn pack(items: &[String], width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for item in items {
        let n = item.chars().count();
        if !cur.is_empty() && cur.chars().count() + 3 + n <= width {
            cur.push_str("   ");
            cur.push_str(item);
            continue;
        }
        if !cur.is_empty() {
            lines.push(std::mem::take(&mut cur));
        }
        let mut w = wrap(item, width, 2);
        cur = w.pop().unwrap_or_default();
        lines.extend(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// `text` in lines of at most `width` characters, the ones after the first indented by
/// `indent`; broken at spaces where it can be.
fn wrap(text: &str, width: usize, indent: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rest: Vec<char> = text.chars().collect();
    let mut first = true;
    loop {
        let pad = if first { 0 } else { indent };
        let room = width.saturating_sub(pad).max(1);
        if rest.len() <= room {
            let line: String = rest.iter().collect();
            lines.push(format!("{:pad$}{}", "", line.trim_end()));
            return lines;
        }
        let cut = rest[..=room]
            .iter()
            .rposition(|&c| c == ' ')
            .filter(|&i| i > room / 2)
            .unwrap_or(room);
        let line: String = rest[..cut].iter().collect();
        lines.push(format!("{:pad$}{}", "", line.trim_end()));
        rest.drain(..cut);
        while rest.first() == Some(&' ') {
            rest.remove(0);
        }
        first = false;
    }
}

/// At most `width` characters of `s` (an ellipsis marks a cut).
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// The newest `events`, wrapped, that fill `room` lines (oldest of them first).
fn last_wrapped(events: &[String], width: usize, room: usize) -> Vec<String> {
    let mut shown: Vec<Vec<String>> = Vec::new();
    let mut used = 0;
    for e in events.iter().rev() {
        let w = wrap(e, width, 11);
        if used + w.len() > room {
            if used < room {
                // The oldest that fits only in part: its last lines.
                let n = room - used;
                shown.push(w[w.len() - n..].to_vec());
            }
            break;
        }
        used += w.len();
        shown.push(w);
    }
    shown.into_iter().rev().flatten().collect()
}

/// A column: its header, whether it is right-aligned, and how much it is worth keeping when
/// the table is too wide (the lowest goes first; 255 never goes).
struct Column {
    head: &'static str,
    right: bool,
    keep: u8,
}

/// The columns that fit `width` (with 2 spaces between), dropping the least kept first; their
/// indexes and widths.
fn choose(columns: &[Column], rows: &[Vec<String>], width: usize) -> Vec<(usize, usize)> {
    let mut chosen: Vec<(usize, usize)> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let w = rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.head.chars().count()])
                .max()
                .unwrap_or(0);
            (i, w)
        })
        .collect();
    loop {
        let total: usize =
            chosen.iter().map(|(_, w)| w).sum::<usize>() + 2 * chosen.len().saturating_sub(1);
        if total <= width {
            break;
        }
        let Some(drop) = chosen
            .iter()
            .enumerate()
            .filter(|(_, (i, _))| columns[*i].keep < 255)
            .min_by_key(|(_, (i, _))| columns[*i].keep)
            .map(|(k, _)| k)
        else {
            break;
        };
        chosen.remove(drop);
    }
    chosen
}

fn line(columns: &[Column], chosen: &[(usize, usize)], cells: &[String], width: usize) -> String {
    let mut s = String::new();
    for (k, &(i, w)) in chosen.iter().enumerate() {
        if k > 0 {
            s.push_str("  ");
        }
        if columns[i].right {
            let _ = write!(s, "{:>w$}", cells[i]);
        } else {
            let _ = write!(s, "{:<w$}", cells[i]);
        }
    }
    fit(s.trim_end(), width)
}

/// The paths: a header, then per site its line and as many of its rows as `spare` lines allow
/// (shared in turn between the sites); a site's line says how many rows did not fit.
fn paths_table(sites: &[Site], width: usize, spare: usize) -> Vec<String> {
    let columns = [
        Column {
            head: "SITE",
            right: false,
            keep: 255,
        },
        Column {
            head: "PEER",
            right: false,
            keep: 255,
        },
        Column {
            head: "PATH",
            right: false,
            keep: 255,
        },
        Column {
            head: "STATE",
            right: false,
            keep: 255,
        },
        Column {
            head: "RTT ms",
            right: true,
            keep: 200,
        },
        Column {
            head: "LOSS %",
            right: true,
            keep: 190,
        },
        Column {
            head: "JIT ms",
            right: true,
            keep: 150,
        },
        Column {
            head: "TX kbit/s",
            right: true,
            keep: 140,
        },
        Column {
            head: "FLOWS",
            right: true,
            keep: 130,
        },
        Column {
            head: "P99 ms",
            right: true,
            keep: 20,
        },
        Column {
            head: "FLAPS",
            right: true,
            keep: 10,
        },
    ];
    // Rows per site: one at a time to each site that has more, while lines remain.
    let mut take = vec![0usize; sites.len()];
    let mut left = spare;
    while left > 0 {
        let mut gave = false;
        for (t, s) in take.iter_mut().zip(sites) {
            if left > 0 && *t < s.paths.len() {
                *t += 1;
                left -= 1;
                gave = true;
            }
        }
        if !gave {
            break;
        }
    }
    let num = |x: f64, places: usize| format!("{x:.places$}");
    let cells = |p: &PathRow| {
        vec![
            String::new(),
            p.peer.clone(),
            p.path.clone(),
            p.state.clone(),
            p.rtt_ms.map_or_else(|| "-".into(), |r| num(r, 1)),
            num(p.loss_pct, 1),
            num(p.jitter_ms, 1),
            num(p.tx_kbps, 0),
            p.flows.to_string(),
            p.rtt_p99_ms.map_or_else(|| "-".into(), |r| num(r, 1)),
            p.flaps.to_string(),
        ]
    };
    let rows: Vec<Vec<String>> = sites
        .iter()
        .zip(&take)
        .flat_map(|(s, &n)| s.paths[..n].iter().map(cells))
        .collect();
    // The sites' names are in the first column, on the sites' own lines.
    let names = sites.iter().map(|s| {
        let mut r = vec![String::new(); columns.len()];
        r[0] = s.name.clone();
        r
    });
    let chosen = choose(
        &columns,
        &rows.iter().cloned().chain(names).collect::<Vec<_>>(),
        width,
    );
    let heads: Vec<String> = columns.iter().map(|c| c.head.to_owned()).collect();
    let mut out = vec![line(&columns, &chosen, &heads, width)];
    let site_w = chosen.first().map_or(0, |&(_, w)| w);
    let mut rows = rows.into_iter();
    for (s, &n) in sites.iter().zip(&take) {
        let mut summary = s.summary.clone();
        if n < s.paths.len() {
            let hidden = format!("{} more not shown", s.paths.len() - n);
            summary.insert(summary.len().min(1), hidden);
        }
        let summary = summary.join(" · ");
        out.push(fit(&format!("{:<site_w$}  {summary}", s.name), width));
        for r in rows.by_ref().take(n) {
            out.push(line(&columns, &chosen, &r, width));
        }
    }
    out
}

fn streams_table(streams: &[StreamRow], width: usize) -> Vec<String> {
    let columns = [
        Column {
            head: "STREAM",
            right: false,
            keep: 255,
        },
        Column {
            head: "FROM → TO",
            right: false,
            keep: 255,
        },
        Column {
            head: "LOST",
            right: true,
            keep: 255,
        },
        Column {
            head: "SENT",
            right: true,
            keep: 200,
        },
        Column {
            head: "LAST OUTAGE",
            right: true,
            keep: 150,
        },
        Column {
            head: "PKT/S",
            right: true,
            keep: 100,
        },
        Column {
            head: "UDP PORT",
            right: true,
            keep: 50,
        },
    ];
    let rows: Vec<Vec<String>> = streams
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format!("{} → {}", s.from, s.to),
                s.lost.to_string(),
                s.sent.to_string(),
                format!("{:.0} ms", s.last_outage_ms),
                s.rate_pps.to_string(),
                s.port.to_string(),
            ]
        })
        .collect();
    let chosen = choose(&columns, &rows, width);
    let heads: Vec<String> = columns.iter().map(|c| c.head.to_owned()).collect();
    let mut out = vec![line(&columns, &chosen, &heads, width)];
    out.extend(rows.iter().map(|r| line(&columns, &chosen, r, width)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "Zq3xJ0rV8mK2pL5nW7tY9cB1-Aa1";

    fn frame(paths_per_site: usize, events: usize) -> Frame {
        let site = |name: &str| Site {
            name: name.into(),
            summary: vec![
                format!("{paths_per_site}/12 paths up"),
                "3 failovers".into(),
                "9 flows cached (idle ones 120 s)".into(),
            ],
            paths: (0..paths_per_site)
                .map(|i| PathRow {
                    peer: "branch1".into(),
                    path: format!("mpls>lte{i}"),
                    state: "down".into(),
                    rtt_ms: Some(41.462661999999995),
                    jitter_ms: 1.25,
                    ..Default::default()
                })
                .collect(),
        };
        Frame {
            header: vec![
                "Patronus demo (lab abc123) · 00:42 · next: degrade branch1/mpls in 3 s".into(),
                "API https://127.0.0.1:8080 (/docs)".into(),
                "login admin@example.net".into(),
                "Ctrl-C ends it".into(),
                format!("password {PASSWORD}"),
                "(also in /run/patronus-lab/abc123/controller/initial-admin-password)".into(),
                "each 80 s: 15 cut hq/mpls, 30 restore, 45 degrade branch1/mpls, 65 repair".into(),
            ],
            sites: ["hq", "branch1", "branch2"].map(site).into(),
            streams: (0..4)
                .map(|i| StreamRow {
                    name: "voice".into(),
                    from: "hq/h1".into(),
                    to: "branch1/h1".into(),
                    port: 5004 + i,
                    rate_pps: 100,
                    sent: 123_456,
                    lost: 12,
                    last_outage_ms: 60.4,
                })
                .collect(),
            events: (0..events)
                .map(|i| format!("00:{i:02}.000  event {i} {}", "with words ".repeat(i % 9)))
                .collect(),
        }
    }

    fn check(lines: &[String], cols: usize, rows: usize) {
        assert!(lines.len() <= rows, "{} lines for {rows} rows", lines.len());
        for l in lines {
            assert!(
                l.chars().count() < cols,
                "{l:?} is not narrower than {cols}"
            );
        }
        let top = lines[..6].join("\n");
        assert!(top.contains(PASSWORD), "the password is not on top: {top}");
        assert!(top.contains("https://127.0.0.1:8080"));
        assert!(top.contains("initial-admin-password"), "{top}");
        assert!(top.contains("next: degrade branch1/mpls"), "{top}");
    }

    #[test]
    fn at_80_by_24_the_header_stays_whole_and_every_section_gets_lines() {
        let lines = render(&frame(12, 100), 80, 24);
        check(&lines, 80, 24);
        assert_eq!(lines.len(), 24);
        let text = lines.join("\n");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("hq ") && l.contains("12/12 paths up · 11 more not shown")),
            "{text}"
        );
        for s in [
            "hq ",
            "branch1 ",
            "branch2 ",
            "more not shown",
            "STREAM",
            "EVENTS",
        ] {
            assert!(text.contains(s), "{s} in\n{text}");
        }
        assert!(lines.iter().any(|l| l.contains("41.5")), "{text}");
        assert!(!text.contains("41.46"), "{text}");
        // The newest event is the last line; older ones gave way.
        assert!(lines[23].ends_with("event 99"), "{text}");
        assert!(
            text.contains("event 97") && !text.contains("event 96"),
            "{text}"
        );
    }

    #[test]
    fn at_200_by_50_every_path_fits_and_the_extra_columns_show() {
        let lines = render(&frame(5, 100), 200, 50);
        check(&lines, 200, 50);
        let text = lines.join("\n");
        assert!(!text.contains("more not shown"), "{text}");
        assert_eq!(text.matches("mpls>lte").count(), 15, "{text}");
        assert!(
            text.contains("P99 ms") && text.contains("UDP PORT"),
            "{text}"
        );
        // The header fits in two lines.
        assert!(
            lines[0].contains("password") && lines[1].contains("each 80 s"),
            "{text}"
        );
    }

    #[test]
    fn tiny_or_odd_sizes_still_fit() {
        for (cols, rows) in [(40, 10), (20, 5), (1, 1), (300, 200), (81, 25)] {
            let lines = render(&frame(12, 30), cols, rows);
            assert!(lines.len() <= rows);
            for l in &lines {
                assert!(l.chars().count() <= cols.saturating_sub(1).max(20));
            }
        }
    }

    #[test]
    fn wrapping_breaks_at_spaces_and_indents_what_follows() {
        assert_eq!(wrap("aaa bbb ccc", 7, 2), ["aaa bbb", "  ccc"]);
        assert_eq!(wrap("abcdefghij", 4, 0), ["abcd", "efgh", "ij"]);
        assert_eq!(fit("abcdef", 4), "abc…");
    }
}
