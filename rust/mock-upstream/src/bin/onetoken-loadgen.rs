//! `onetoken-loadgen`: a closed-loop HTTP/1.1 load generator for bench/, measuring what wrk
//! cannot: for each response the time to headers, the time to the first complete SSE event
//! (time to first token), the gaps between events, and the total.
//!
//! Every connection sends one request after another for `--duration` seconds (after
//! `--warmup` seconds whose results are discarded) and prints one JSON object. Loopback
//! benchmarking only; the run is bounded by the duration plus a short grace.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const USAGE: &str =
    "usage: onetoken-loadgen --url URL [--body JSON | --body-file PATH] [--header 'Name: value']...
       [--connections N] [--duration SECS] [--warmup SECS] [--threads N]
  POSTs the body (GETs when no body is given) over N keep-alive connections and prints a JSON
  summary with percentiles in microseconds: total, headers (time to response headers),
  first_event (time to the first complete SSE event, or first body bytes), event_gap.";

/// Requests still running this long after the deadline are abandoned.
const GRACE: Duration = Duration::from_secs(10);

struct Options {
    url: Uri,
    body: Option<Bytes>,
    headers: Vec<(HeaderName, HeaderValue)>,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    threads: usize,
}

#[derive(Default)]
struct Samples {
    ok: u64,
    non_2xx: u64,
    errors: u64,
    events: u64,
    total: Vec<u32>,
    headers: Vec<u32>,
    first_event: Vec<u32>,
    event_gap: Vec<u32>,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.errors += other.errors;
        self.events += other.events;
        self.total.extend(other.total);
        self.headers.extend(other.headers);
        self.first_event.extend(other.first_event);
        self.event_gap.extend(other.event_gap);
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("{msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot build the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Arc::new(opts))) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<Option<Options>, String> {
    let mut url = None;
    let mut body = None;
    let mut headers = Vec::new();
    let mut connections = 1usize;
    let mut duration = 5.0f64;
    let mut warmup = 1.0f64;
    let mut threads = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = args
            .next()
            .ok_or_else(|| format!("missing value for {flag}"))?;
        let bad = |what: &str| format!("{flag}: {what}, got {value:?}");
        match flag.as_str() {
            "--url" => url = Some(value.parse::<Uri>().map_err(|_| bad("not a URL"))?),
            "--body" => body = Some(Bytes::from(value.clone())),
            "--body-file" => {
                body = Some(Bytes::from(
                    std::fs::read(&value).map_err(|e| format!("{flag}: {value}: {e}"))?,
                ))
            }
            "--header" => {
                let (name, val) = value
                    .split_once(':')
                    .ok_or_else(|| bad("expected 'Name: value'"))?;
                let name = HeaderName::try_from(name.trim()).map_err(|_| bad("bad header name"))?;
                let val = HeaderValue::try_from(val.trim()).map_err(|_| bad("bad header value"))?;
                headers.push((name, val));
            }
            "--connections" => connections = value.parse().map_err(|_| bad("not a count"))?,
            "--duration" => duration = value.parse().map_err(|_| bad("not seconds"))?,
            "--warmup" => warmup = value.parse().map_err(|_| bad("not seconds"))?,
            "--threads" => threads = value.parse().map_err(|_| bad("not a count"))?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    let url = url.ok_or("--url is required")?;
    if url.scheme_str() != Some("http") {
        return Err("only http:// URLs are supported (loopback benchmarking)".into());
    }
    if !(duration > 0.0 && duration <= 3600.0 && (0.0..=600.0).contains(&warmup)) {
        return Err("--duration must be in (0, 3600] and --warmup in [0, 600]".into());
    }
    Ok(Some(Options {
        url,
        body,
        headers,
        connections: connections.max(1),
        duration: Duration::from_secs_f64(duration),
        warmup: Duration::from_secs_f64(warmup),
        threads: threads.max(1),
    }))
}

async fn run(opts: Arc<Options>) -> Result<String, String> {
    let start = Instant::now();
    let measure_from = start + opts.warmup;
    let deadline = measure_from + opts.duration;
    let mut tasks = Vec::with_capacity(opts.connections);
    for _ in 0..opts.connections {
        let opts = Arc::clone(&opts);
        tasks.push(tokio::spawn(async move {
            connection_loop(&opts, measure_from, deadline).await
        }));
    }
    let mut all = Samples::default();
    for task in tasks {
        match tokio::time::timeout_at((deadline + GRACE).into(), task).await {
            Ok(Ok(samples)) => all.merge(samples),
            Ok(Err(_)) | Err(_) => all.errors += 1,
        }
    }
    let seconds = opts.duration.as_secs_f64();
    Ok(format!(
        "{{\"connections\":{},\"duration_s\":{:.3},\"requests\":{},\"non_2xx\":{},\"errors\":{},\
\"rps\":{:.1},\"events_per_response\":{:.2},\"total_us\":{},\"headers_us\":{},\"first_event_us\":{},\"event_gap_us\":{}}}",
        opts.connections,
        seconds,
        all.ok,
        all.non_2xx,
        all.errors,
        all.ok as f64 / seconds,
        if all.ok > 0 { all.events as f64 / all.ok as f64 } else { 0.0 },
        stats(&mut all.total),
        stats(&mut all.headers),
        stats(&mut all.first_event),
        stats(&mut all.event_gap),
    ))
}

/// `{"p50":..,"p90":..,"p99":..,"max":..,"mean":..}` in microseconds (nearest rank).
fn stats(v: &mut [u32]) -> String {
    if v.is_empty() {
        return "null".into();
    }
    v.sort_unstable();
    let rank = |p: f64| {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    format!(
        "{{\"n\":{},\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{},\"mean\":{:.1}}}",
        v.len(),
        rank(0.50),
        rank(0.90),
        rank(0.99),
        v[v.len() - 1],
        mean
    )
}

async fn connect(
    opts: &Options,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let host = opts.url.host().ok_or("URL has no host")?;
    let port = opts.url.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn build_request(opts: &Options) -> Result<Request<Full<Bytes>>, String> {
    let authority = opts
        .url
        .authority()
        .map(|a| a.as_str())
        .unwrap_or("localhost");
    let path = opts.url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut builder = Request::builder()
        .uri(path)
        .header(http::header::HOST, authority);
    builder = match &opts.body {
        Some(_) => builder
            .method(http::Method::POST)
            .header(http::header::CONTENT_TYPE, "application/json"),
        None => builder.method(http::Method::GET),
    };
    for (name, value) in &opts.headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(opts.body.clone().unwrap_or_default()))
        .map_err(|e| format!("bad request: {e}"))
}

async fn connection_loop(opts: &Options, measure_from: Instant, deadline: Instant) -> Samples {
    let mut samples = Samples::default();
    let mut sender = None;
    while Instant::now() < deadline {
        let mut conn = match sender.take() {
            Some(conn) => conn,
            None => match connect(opts).await {
                Ok(conn) => conn,
                Err(_) => {
                    samples.errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if conn.ready().await.is_err() {
            continue;
        }
        let Ok(req) = build_request(opts) else {
            samples.errors += 1;
            return samples;
        };
        let t0 = Instant::now();
        let measured = t0 >= measure_from;
        match one_request(&mut conn, req, t0).await {
            Ok(Some(timing)) => {
                if measured {
                    samples.ok += 1;
                    samples.events += timing.events;
                    samples.total.push(timing.total);
                    samples.headers.push(timing.headers);
                    if let Some(first) = timing.first_event {
                        samples.first_event.push(first);
                    }
                    samples.event_gap.extend(timing.gaps);
                }
                sender = Some(conn);
            }
            Ok(None) => {
                if measured {
                    samples.non_2xx += 1;
                }
                sender = Some(conn);
            }
            Err(()) => {
                if measured {
                    samples.errors += 1;
                }
            }
        }
    }
    samples
}

struct Timing {
    total: u32,
    headers: u32,
    first_event: Option<u32>,
    gaps: Vec<u32>,
    events: u64,
}

/// `Ok(None)` for a non-2xx response (read to the end so the connection can be reused).
async fn one_request(
    conn: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    t0: Instant,
) -> Result<Option<Timing>, ()> {
    let resp = conn.send_request(req).await.map_err(|_| ())?;
    let headers = micros(t0.elapsed());
    let ok = resp.status().is_success();
    let mut body = resp.into_body();
    let mut first_event = None;
    let mut last_event_at: Option<Instant> = None;
    let mut gaps = Vec::new();
    let mut events = 0u64;
    let mut saw_any = false;
    let mut prev_newline = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ())?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let now = Instant::now();
        // Count SSE event ends ("\n\n"), including one split across two frames.
        let mut ends = 0u64;
        for &b in data.iter() {
            if b == b'\n' {
                if prev_newline {
                    ends += 1;
                    prev_newline = false;
                    continue;
                }
                prev_newline = true;
            } else if b != b'\r' {
                prev_newline = false;
            }
        }
        let completes = ends > 0 || !saw_any;
        saw_any = true;
        if completes {
            if first_event.is_none() {
                first_event = Some(micros(now - t0));
            } else if let Some(prev) = last_event_at {
                gaps.push(micros(now - prev));
            }
            last_event_at = Some(now);
        }
        events += ends;
    }
    if !ok {
        return Ok(None);
    }
    Ok(Some(Timing {
        total: micros(t0.elapsed()),
        headers,
        first_event,
        gaps,
        events,
    }))
}
