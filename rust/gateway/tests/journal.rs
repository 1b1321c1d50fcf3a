//! Record journal: the one durable record log. Every record is on disk before the last
//! byte of its response reaches the client, a SIGKILL loses none, the engine deletes no
//! segment, and the spool dir's locks say which instance is live and keep a second
//! gateway out.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::path::Path;
use std::time::Duration;

use harness::*;
use onetoken_gateway::journal_reader::{instance_live, read_segment};
use onetoken_gateway::{Engine, Error};
use serde_json::{json, Value};

/// Every journal line of the instance, in write order, as written.
fn journal_lines(dir: &Path, instance_id: &str) -> Vec<String> {
    journal_tail::segments(dir, instance_id)
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn lock_path(dir: &Path, instance_id: &str) -> std::path::PathBuf {
    dir.join(format!("journal-{instance_id}.lock"))
}

fn started(spool: &str, upstream: &Upstream) -> Result<Engine, Error> {
    let engine = Engine::new(engine_config(spool))?;
    engine
        .load_snapshot(
            spec_snapshot(1, upstream.addr, 100_000_000_000)
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    engine.start().map(|_| engine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_journaled_as_lines_and_stay_after_stop() {
    let h = Gateway::start();
    let id = h.engine.instance_id().to_owned();
    for i in 0..5 {
        let body = chat(CANARY, json!({"stream": i % 2 == 0}));
        let r = h.chat_as("ot-good", body).await;
        assert_eq!(r.status, 200);
    }
    let r = h.ask("ot-unknown", CANARY).await;
    assert_eq!(r.status, 401);
    h.wait_records(6).await;

    // One segment, one JSON line per record, in the line format (the record serialized
    // as is), and the instance is live while it runs.
    let files = journal_tail::segments(&h.spool.0, &id);
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(name, format!("journal-{id}-00000000.jsonl"));
    assert!(instance_live(&lock_path(&h.spool.0, &id)).unwrap());
    let lines = journal_lines(&h.spool.0, &id);
    assert_eq!(lines.len(), 6);
    let recs = h.records();
    let mut expected: Vec<String> = recs
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    let mut sorted_lines = lines.clone();
    sorted_lines.sort();
    expected.sort();
    assert_eq!(sorted_lines, expected);
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), onetoken_gateway::journal_reader::COLUMNS.len());
        assert!(v["ts"].is_i64());
    }
    h.assert_no_canary(&recs, &[&r]);

    // Stopping deletes nothing and releases the instance: its segments are complete.
    let late = h.ask("ot-good", "hi").await;
    assert_eq!(late.status, 200);
    h.wait_records(7).await;
    h.engine.stop(Duration::from_secs(1));
    assert!(!instance_live(&lock_path(&h.spool.0, &id)).unwrap());
    assert_eq!(journal_tail::segments(&h.spool.0, &id), files);
    let all = read_segment(&files[0], 0, usize::MAX, true).unwrap();
    assert_eq!((all.records.len(), all.bad_lines), (7, 0));
    assert_eq!(
        h.records().len(),
        1,
        "the late record, read on from the offset"
    );
    assert_eq!(h.engine.stats().journal_errors, 0);
}

/// A whole response's record is on disk before its last byte reaches the client: a crash
/// right after the client read its answer must not lose the record of that call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_response_is_journaled_before_its_last_byte_reaches_the_client() {
    let h = Gateway::start();
    let body = chat("hi", json!({})).to_string();
    let mut conn = send_raw(&h, &body).await;
    let mut seen = Vec::new();
    loop {
        read_more(
            &mut conn,
            &mut seen,
            "connection closed before the whole response",
        )
        .await;
        let text = String::from_utf8_lossy(&seen);
        let Some(split) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..split]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if seen.len() >= split + 4 + length {
            break;
        }
    }
    // No waiting: the record must already be journaled when the client has the body.
    let rec = only_journal_line(&h, "the record is journaled before the last byte");
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["streamed"], 0, "{rec}");
}

/// A chat request written byte by byte, for a test that reads the answer off the socket.
async fn send_raw(h: &Gateway, body: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer ot-good\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    conn
}

/// Append what arrives next on `conn` to `seen`; `closed` says what the connection
/// closing first would mean.
async fn read_more(conn: &mut tokio::net::TcpStream, seen: &mut Vec<u8>, closed: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0, "{closed}");
    seen.extend_from_slice(&buf[..n]);
}

/// The one line journaled so far, parsed; `why` says why there must be exactly one.
fn only_journal_line(h: &Gateway, why: &str) -> Value {
    let lines = journal_lines(&h.spool.0, h.engine.instance_id());
    assert_eq!(lines.len(), 1, "{why}");
    serde_json::from_str(&lines[0]).unwrap()
}

/// A stream's record is on disk before its terminal event reaches the client, even when
/// the upstream keeps its body open after that event: a crash right after the client saw
/// `[DONE]` must not lose the record of a call the client saw complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_journaled_before_its_terminal_event_reaches_the_client() {
    let h = Gateway::start();
    let body = chat("hi", json!({"stream": true, "mock": {"linger_ms": 5000}})).to_string();
    let mut conn = send_raw(&h, &body).await;
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("[DONE]") {
        read_more(&mut conn, &mut seen, "connection closed before [DONE]").await;
    }
    // No waiting: the record must already be journaled when the client has `[DONE]`.
    let rec = only_journal_line(&h, "the record is journaled before [DONE] is sent");
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["streamed"], 1, "{rec}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the relay ends at the terminal event, not when the upstream closes"
    );
}

/// One gateway per data dir: a second engine on the same spool dir refuses to start,
/// with a message that says why, and starts once the first has stopped.
#[test]
fn a_second_engine_on_the_same_spool_dir_fails_to_start() {
    let upstream = Upstream::start();
    let spool = tempdir::Dir::new();
    let first = started(spool.path(), &upstream).unwrap();
    let second = Engine::new(engine_config(spool.path())).unwrap();
    let err = second.start().unwrap_err();
    let data_dir = spool.0.parent().unwrap();
    assert!(
        matches!(&err, Error::Bind(m) if m.starts_with(&format!(
            "another gateway is serving data dir {}", data_dir.display()))),
        "{err}"
    );
    assert!(!second.running());
    assert!(
        !instance_live(&lock_path(&spool.0, second.instance_id())).unwrap(),
        "the refused engine holds nothing"
    );
    first.stop(Duration::from_secs(1));
    let third = started(spool.path(), &upstream).unwrap();
    assert!(third.running());
    // An engine dropped without a stop lets the next one in too.
    drop(third);
    started(spool.path(), &upstream).unwrap();
}

/// The instance lock is held while the engine runs and free after stop or drop; an
/// engine that never started holds none.
#[test]
fn the_instance_lock_is_held_while_running() {
    let upstream = Upstream::start();
    let spool = tempdir::Dir::new();
    let idle = Engine::new(engine_config(spool.path())).unwrap();
    assert!(!instance_live(&lock_path(&spool.0, idle.instance_id())).unwrap());
    drop(idle);

    let stopped = started(spool.path(), &upstream).unwrap();
    let lock = lock_path(&spool.0, stopped.instance_id());
    assert!(instance_live(&lock).unwrap());
    stopped.stop(Duration::from_secs(1));
    assert!(!instance_live(&lock).unwrap());
    assert!(lock.exists(), "the lock file stays for ingestion to remove");

    let dropped = started(spool.path(), &upstream).unwrap();
    let lock = lock_path(&spool.0, dropped.instance_id());
    assert!(instance_live(&lock).unwrap());
    drop(dropped);
    assert!(!instance_live(&lock).unwrap());
}

const CHILD_ENV: &str = "ONETOKEN_JOURNAL_CHILD_SPOOL";
const CHILD_REQUESTS: usize = 40;

/// Run by `a_sigkill_loses_no_completed_request` in a child process: serve, answer, then
/// wait to be killed with every record still in memory. Ignored in a normal run, where it
/// would have nothing to check.
#[test]
#[ignore = "run by a_sigkill_loses_no_completed_request"]
fn journal_child_process() {
    let spool = std::env::var(CHILD_ENV)
        .expect("run only as the child of a_sigkill_loses_no_completed_request");
    let upstream = Upstream::start();
    let engine = started(&spool, &upstream).unwrap();
    let addr = engine.address().unwrap();
    std::fs::write(Path::new(&spool).join("instance.txt"), engine.instance_id()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for i in 0..CHILD_REQUESTS {
            let r = post(
                addr,
                CHAT,
                Some("ot-good"),
                chat("hi", json!({"stream": i % 3 == 0})),
            )
            .await;
            assert_eq!(r.status, 200);
            ids.push(r.headers["x-request-id"].to_str().unwrap().to_owned());
        }
        ids
    });
    assert!(wait_until(WAIT, || engine.stats().records_total
        >= CHILD_REQUESTS as u64));
    // Written whole, then renamed: the parent never reads a partial list.
    let partial = Path::new(&spool).join("ids.partial");
    std::fs::write(&partial, ids.join("\n")).unwrap();
    std::fs::rename(&partial, Path::new(&spool).join("ids.txt")).unwrap();
    // Killed here.
    loop {
        std::thread::park();
    }
}

#[test]
fn a_sigkill_loses_no_completed_request() {
    let spool = tempdir::Dir::new();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "journal_child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spool.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ids_path = spool.0.join("ids.txt");
    let answered = wait_until(Duration::from_secs(60), || {
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        ids_path.exists()
    });
    assert!(answered, "child never finished");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let ids = std::fs::read_to_string(&ids_path).unwrap();
    let mut expected: Vec<&str> = ids.lines().collect();
    expected.sort_unstable();
    let instance = std::fs::read_to_string(spool.0.join("instance.txt")).unwrap();
    assert!(
        !instance_live(&lock_path(&spool.0, &instance)).unwrap(),
        "the OS released the dead instance's lock"
    );
    let mut found: Vec<String> = journal_records(&spool.0, &instance)
        .into_iter()
        .map(|r| {
            assert_eq!(r.status, 200);
            assert!(r.cost > 0);
            r.request_id
        })
        .collect();
    found.sort_unstable();
    assert_eq!(
        found, expected,
        "every completed request is in the journal, once"
    );
}

/// Latency added by the gateway at one connection, journal included, next to the same
/// requests sent straight to the upstream. A measurement, not a check; run with
/// `cargo test -p onetoken-gateway --test journal added_latency -- --ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn added_latency_one_connection() {
    use http_body_util::BodyExt;
    const N: usize = 3_000;
    let upstream = Upstream::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let run = |addr: std::net::SocketAddr, path: &str, key: Option<&str>, body: String| {
        rt.block_on(async {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut sender = http1(stream).await;
            let mut took = Vec::with_capacity(N);
            for i in 0..N + 200 {
                let req = request("POST", path, key, body.clone());
                // The connection takes the next request only once it has finished the
                // last response.
                sender.ready().await.unwrap();
                let t = std::time::Instant::now();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
                if i >= 200 {
                    took.push(t.elapsed());
                }
            }
            took.sort();
            (took[N / 2], took[N * 99 / 100])
        })
    };
    let body = chat("hi", json!({})).to_string();
    let direct = run(upstream.addr, "/v1/chat/completions", None, body.clone());
    let mut out = vec![format!("direct p50 {:?} p99 {:?}", direct.0, direct.1)];
    for round in 0..2 {
        let spool = tempdir::Dir::new();
        let engine = started(spool.path(), &upstream).unwrap();
        let addr = engine.address().unwrap();
        let (p50, p99) = run(addr, CHAT, Some("ot-good"), body.clone());
        engine.stop(Duration::from_secs(1));
        assert_eq!(engine.stats().records_total, (N + 200) as u64);
        out.push(format!(
            "round {round}: added p50 {:?} p99 {:?}",
            p50.saturating_sub(direct.0),
            p99.saturating_sub(direct.1)
        ));
    }
    println!("{}", out.join("\n"));
}

/// Restriction of processing (docs/retention.md): the call of a key whose account or org
/// restricted it is journaled with the address's keyed token and the User-Agent's product
/// only (one address, one token); any other key's call as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_call_is_journaled_without_its_clear_address_and_agent() {
    let h = Gateway::builder()
        .patch_snapshot(|s| {
            s["keys"][0]["restrict_client"] = json!(true); // ot-good: its account's
            s["orgs"][1]["restrict_client"] = json!(true); // org_poor: the whole org's
        })
        .start();
    let ua = "OpenAI/Python 1.54.0 (host-zq81x7; Linux)";
    for key in ["ot-good", "ot-poor", "ot-expired"] {
        let mut req = chat_request(key, chat("hi", json!({})));
        // In place of the harness's own agent.
        req.headers_mut().insert("user-agent", ua.parse().unwrap());
        call(h.addr, req).await;
    }
    let lines = journal_lines(&h.spool.0, h.engine.instance_id());
    let recs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 3);
    let by_key = |k: &str| recs.iter().find(|r| r["key_id"] == k).unwrap().clone();
    let (good, poor, clear) = (
        by_key("key_good"),
        by_key("key_poor"),
        by_key("key_expired"),
    );
    for rec in [&good, &poor] {
        let ip = rec["source_ip"].as_str().unwrap();
        assert!(ip.starts_with("hmac:") && ip.len() == 21, "{rec}");
        assert_eq!(rec["user_agent"], "OpenAI", "{rec}");
    }
    assert_eq!(
        good["source_ip"], poor["source_ip"],
        "one address, one token"
    );
    assert_eq!(clear["source_ip"], "127.0.0.1");
    assert_eq!(clear["user_agent"], ua);
    let restricted: Vec<&String> = lines
        .iter()
        .filter(|l| !l.contains("key_expired"))
        .collect();
    assert!(restricted
        .iter()
        .all(|l| !l.contains("127.0.0.1") && !l.contains("zq81x7")));
}
