//! `patronus bench events`: what the event stream (`GET /api/v1/events/stream`) costs the
//! controller. A `patronus controller` process on loopback (SQLite in a temporary directory);
//! configuration changes written through the API at a steady rate (each a `config.changed`
//! event), first with no subscriber, then with N subscribers on the stream, each a raw
//! HTTP/1.1 client in this process reading the server-sent events. Reported: how many events
//! every subscriber received (none may be missing), how long after its write each event
//! reached each subscriber, and the controller's CPU time with and without the subscribers,
//! and with them held idle.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::process::ControllerProcess;
use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Subscribers on the event stream at once (at most 1024, what one controller serves).
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Configuration changes written in each phase (each one event to every subscriber).
    #[arg(long, default_value_t = 200)]
    events: usize,
    /// Changes written per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds the subscribers are held with nothing happening, the controller's CPU read.
    #[arg(long, default_value_t = 10)]
    idle_s: u64,
}

/// What one subscriber received: each event's target (`policy/7`) and when it arrived.
type Received = Arc<Mutex<Vec<(String, Instant)>>>;

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        (1..=1024).contains(&args.subscribers),
        "--subscribers must be 1 to 1024"
    );
    anyhow::ensure!(
        (1..=4000).contains(&args.events),
        "--events must be 1 to 4000 (two phases of policies, under the 10,000 a network holds)"
    );
    anyhow::ensure!(
        args.rate >= 0.1 && args.rate <= 1000.0,
        "--rate must be 0.1 to 1000 changes per second"
    );
    anyhow::ensure!(
        (1..=600).contains(&args.idle_s),
        "--idle-s must be 1 to 600"
    );
    super::push::raise_fd_limit(args.subscribers as u64 + 1024)?;
    let dir = std::env::temp_dir().join(format!("patronus-bench-events-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(measure(args, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    let mut r = r?;
    r["machine"] = super::machine();
    Ok(r)
}

async fn measure(args: &Args, dir: &std::path::Path) -> anyhow::Result<Value> {
    progress(format_args!("a controller on SQLite"));
    let ctl = ControllerProcess::start(dir, None, None)?;
    let token = super::push::login(ctl.addr, &ctl.password).await?;
    let cpu = || ctl.usage().2.context("reading the controller's CPU time");

    progress(format_args!(
        "{} changes at {}/s with no subscriber",
        args.events, args.rate
    ));
    let before = cpu()?;
    write(ctl.addr, &token, args, 0).await?;
    let alone_s = cpu()? - before;

    progress(format_args!(
        "{} subscribers on the event stream",
        args.subscribers
    ));
    let mut subscribers = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.subscribers {
        let got: Received = Arc::default();
        let (addr, token, sink) = (ctl.addr, token.clone(), got.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tasks.spawn(async move { subscribe(addr, &token, sink, ready_tx).await });
        subscribers.push((got, ready_rx));
    }
    let mut received = Vec::new();
    for (got, ready) in subscribers {
        tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .context("a subscriber was not answered within 60 s")?
            .context("a subscriber failed before its stream started")?;
        received.push(got);
    }

    progress(format_args!(
        "the subscribers held {} s with nothing happening",
        args.idle_s
    ));
    let before = cpu()?;
    tokio::time::sleep(Duration::from_secs(args.idle_s)).await;
    let idle_s = cpu()? - before;

    progress(format_args!(
        "{} changes at {}/s, each to {} subscribers",
        args.events, args.rate, args.subscribers
    ));
    let before = cpu()?;
    let sent = write(ctl.addr, &token, args, args.events).await?;
    let with_s = cpu()? - before;
    // Every subscriber has every event, or the wait runs out and the missing are counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    while received
        .iter()
        .any(|g| g.lock().unwrap_or_else(|e| e.into_inner()).len() < args.events)
        && Instant::now() < deadline
    {
        if let Some(Ok(Err(e))) = tasks.try_join_next() {
            bail!("a subscriber failed: {e:#}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.abort_all();
    ctl.stop();

    let mut latencies_us = Vec::new();
    let (mut delivered, mut unexpected) = (0usize, 0usize);
    for g in &received {
        for (target, at) in g.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            match sent.get(target) {
                Some(t) => {
                    delivered += 1;
                    latencies_us.push(at.saturating_duration_since(*t).as_micros() as u64);
                }
                None => unexpected += 1,
            }
        }
    }
    let expected = args.events * args.subscribers;
    latencies_us.sort_unstable();
    let pct = |q: f64| patronus_lab::stats::percentile(&latencies_us, q).map(|us| us as f64 / 1e3);
    let extra_s = (with_s - alone_s).max(0.0);
    Ok(json!({
        "bench": "events",
        "subscribers": args.subscribers,
        "events": args.events,
        "rate_per_s": args.rate,
        "expected": expected,
        "delivered": delivered,
        "missing": expected.saturating_sub(delivered),
        "unexpected": unexpected,
        "latency_ms": { "p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0) },
        "controller_cpu_s": {
            "writes_alone": alone_s,
            "writes_with_subscribers": with_s,
            "idle_with_subscribers": idle_s,
        },
        // CPU time is read in ticks of 10 ms: below a few ticks the figure says nothing.
        "cpu_ms_per_1000_deliveries": (delivered > 0).then(|| extra_s * 1e3 / delivered as f64 * 1e3),
        "idle_cpu_pct": idle_s / args.idle_s as f64 * 100.0,
        "cpu_tick_s": 0.01,
    }))
}

/// Writes `args.events` policies at `args.rate` per second (their orders from `first + 1`);
/// when each write was sent, by the target its event names (`policy/<id>`).
async fn write(
    addr: SocketAddr,
    token: &str,
    args: &Args,
    first: usize,
) -> anyhow::Result<std::collections::HashMap<String, Instant>> {
    let mut c = super::http::Client::connect(addr, token).await?;
    let mut sent = std::collections::HashMap::new();
    let start = tokio::time::Instant::now();
    for i in 0..args.events {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / args.rate)).await;
        let n = first + i + 1;
        let policy = json!({
            "name": format!("bench-{n}"), "order": n, "class": "bulk",
            "match": { "protocol": "tcp", "dst_ports": [format!("{}", 1024 + n)] }
        });
        let t = Instant::now();
        let r = c
            .json("POST", "/api/v1/policies", Some(&policy), 201)
            .await?;
        let id = r["id"].as_i64().context("the policy's id")?;
        sent.insert(format!("policy/{id}"), t);
    }
    Ok(sent)
}

/// One subscriber: reads the stream of `config.changed` events, each event's target and
/// arrival into `got`; `ready` once the stream has started.
async fn subscribe(
    addr: SocketAddr,
    token: &str,
    got: Received,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut conn = BufReader::new(s);
    conn.get_mut()
        .write_all(
            format!(
                "GET /api/v1/events/stream?kind=config.changed HTTP/1.1\r\nHost: {addr}\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    anyhow::ensure!(
        line.split(' ').nth(1) == Some("200"),
        "the event stream answered {}",
        line.trim_end()
    );
    let mut chunked = false;
    loop {
        line.clear();
        anyhow::ensure!(conn.read_line(&mut line).await? > 0, "closed in the head");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            chunked |= k.eq_ignore_ascii_case("transfer-encoding") && v.trim() == "chunked";
        }
    }
    anyhow::ensure!(chunked, "the event stream is not chunked");
    let mut ready = Some(ready);
    let mut text = String::new();
    let mut chunk = Vec::new();
    loop {
        line.clear();
        anyhow::ensure!(conn.read_line(&mut line).await? > 0, "the stream closed");
        let size = usize::from_str_radix(line.trim_end(), 16).context("a chunk size")?;
        anyhow::ensure!(size > 0, "the stream ended");
        anyhow::ensure!(size <= 1 << 20, "a chunk over 1 MiB");
        chunk.resize(size + 2, 0);
        conn.read_exact(&mut chunk).await?;
        let at = Instant::now();
        text.push_str(std::str::from_utf8(&chunk[..size]).context("not UTF-8")?);
        while let Some(i) = text.find("\n\n") {
            let block: String = text.drain(..i + 2).collect();
            if block.starts_with("retry:") {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                continue;
            }
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let v: Value = serde_json::from_str(data).context("an event's data")?;
            if let Some(t) = v["data"]["target"].as_str() {
                got.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((t.to_owned(), at));
            }
        }
    }
}

pub fn summary(r: &Value) -> String {
    format!(
        "events: {} subscribers, {} changes at {}/s: {} of {} deliveries ({} missing), \
         latency p50 {}, p99 {}, max {}; controller CPU {} per 1000 deliveries, {} idle with \
         the subscribers",
        r["subscribers"],
        r["events"],
        r["rate_per_s"],
        r["delivered"],
        r["expected"],
        r["missing"],
        fig(&r["latency_ms"]["p50"], 1, " ms"),
        fig(&r["latency_ms"]["p99"], 1, " ms"),
        fig(&r["latency_ms"]["max"], 1, " ms"),
        fig(&r["cpu_ms_per_1000_deliveries"], 1, " ms"),
        fig(&r["idle_cpu_pct"], 2, " %"),
    )
}
