//! `onetoken-mock-upstream --listen ADDR [--chunks N] [--delay-ms N] [--latency-ms N]`:
//! the fake provider in the foreground until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use onetoken_mock_upstream::{serve_blocking, MockDefaults};

const USAGE: &str =
    "usage: onetoken-mock-upstream [--listen ADDR] [--chunks N] [--delay-ms N] [--latency-ms N]
  --listen ADDR     host:port to bind (default 127.0.0.1:9090; port 0 picks a free one)
  --chunks N        content chunks per stream / tokens per reply (default 8)
  --delay-ms N      pause before each stream chunk (default 0)
  --latency-ms N    pause before the response headers (default 0)";

fn main() -> ExitCode {
    let mut listen = String::from("127.0.0.1:9090");
    let mut defaults = MockDefaults::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        let Some(value) = inline.or_else(|| args.next()) else {
            eprintln!("missing value for {flag}\n{USAGE}");
            return ExitCode::from(2);
        };
        let parsed = match flag.as_str() {
            "--listen" => {
                listen = value.clone();
                Ok(())
            }
            "--chunks" => value.parse().map(|v| defaults.chunks = v).map_err(|_| ()),
            "--delay-ms" => value.parse().map(|v| defaults.delay_ms = v).map_err(|_| ()),
            "--latency-ms" => value
                .parse()
                .map(|v| defaults.latency_ms = v)
                .map_err(|_| ()),
            _ => {
                eprintln!("unknown argument {flag}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        if parsed.is_err() {
            eprintln!("{flag} needs a non-negative integer, got {value:?}");
            return ExitCode::from(2);
        }
    }
    match serve_blocking(&listen, defaults, shutdown_signal()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on Ctrl-C or SIGTERM (what a supervisor or the bench script sends).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
