//! Money shared across gateways through Redis (docs/scale-out.md): engines in one process
//! sharing one private redis-server, the org's cap written as the control plane would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::HashMap;

use harness::redis::RedisServer;
use harness::*;
use serde_json::{json, Value};

const ORG: &str = "org_rich";

/// A spec gateway sharing money through `redis`.
fn shared_gateway(redis: &RedisServer) -> Gateway {
    let url = redis.url();
    Gateway::builder()
        .config(move |c| {
            c["shared"] = json!({"redis_url": url, "refill_interval_ms": 20, "wait_ms": 500,
                                 "timeout_ms": 200});
        })
        .start()
}

fn set_cap(redis: &RedisServer, cap: i64) {
    let _: () = ::redis::cmd("HSET")
        .arg(format!("ot:{{o:{ORG}}}:cap"))
        .arg("cap")
        .arg(cap)
        .arg("rev")
        .arg(1)
        .query(&mut redis.conn())
        .unwrap();
}

/// Every instance's hold on the org, from Redis.
fn holds(redis: &RedisServer) -> HashMap<String, i64> {
    ::redis::cmd("HGETALL")
        .arg(format!("ot:{{o:{ORG}}}:hold"))
        .query(&mut redis.conn())
        .unwrap()
}

/// A small priced chat: a 10-token output bound, so each reservation is about 15,000
/// nano-units, and a short upstream delay so requests overlap.
fn small() -> Value {
    chat(
        "hi",
        json!({"max_tokens": 10, "mock": {"latency_ms": 5}}),
    )
}

fn metric(gw: &Gateway, name: &str) -> f64 {
    let text = gw.engine.metrics_text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_never_hold_or_spend_more_than_the_cap_together() {
    let redis = RedisServer::start();
    let gws = [shared_gateway(&redis), shared_gateway(&redis)];

    // No cap published yet: the grow script grants nothing, so nothing is spent.
    let r = gws[0].chat_as("ot-good", small()).await;
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "insufficient_balance");

    // Room for a few dozen of these requests, far below the snapshot's balance that each
    // gateway alone would otherwise reserve against.
    let cap = 600_000;
    set_cap(&redis, cap);
    let mut tasks = Vec::new();
    for i in 0..120 {
        let addr = gws[i % 2].addr;
        tasks.push(tokio::spawn(async move {
            post(addr, CHAT, Some("ot-good"), small()).await.status
        }));
    }
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for t in tasks {
        *by_status.entry(t.await.unwrap().as_u16()).or_default() += 1;
    }
    let ok = by_status.get(&200).copied().unwrap_or(0);
    assert!(ok > 0, "{by_status:?}");
    assert_eq!(
        ok + by_status.get(&402).copied().unwrap_or(0),
        120,
        "{by_status:?}"
    );
    let held: i64 = holds(&redis).values().sum();
    let spent: i64 = gws.iter().map(|g| g.org_spent(ORG)).sum();
    eprintln!("statuses {by_status:?} held {held} spent {spent} cap {cap}");
    assert!(held <= cap, "holds {held} over the cap {cap}");
    let spent: i64 = gws.iter().map(|g| g.org_spent(ORG)).sum();
    assert!(spent > 0 && spent <= cap, "spent {spent}, cap {cap}");
    for g in &gws {
        g.assert_nothing_reserved();
        let lease = g.org_spent(ORG);
        let hold = holds(&redis)
            .get(g.engine.instance_id())
            .copied()
            .unwrap_or(0);
        assert!(lease <= hold, "an instance spent {lease} beyond its hold {hold}");
    }

    // Money comes in: the cap rises and the next requests pass on either gateway.
    set_cap(&redis, cap + 10_000_000);
    for g in &gws {
        let r = g.chat_as("ot-good", small()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(metric(&gws[0], "onetoken_redis_up"), 1.0);
    assert!(metric(&gws[0], "onetoken_shared_refill_waits_total") >= 1.0);
    assert!(metric(&gws[0], "onetoken_redis_round_trips_total") >= 1.0);
    assert_eq!(metric(&gws[1], "onetoken_shared_live_gateways"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_money_fails_closed_beyond_the_lease_then_recovers() {
    let mut redis = RedisServer::start();
    set_cap(&redis, 1_000_000_000);
    let gw = shared_gateway(&redis);
    for _ in 0..5 {
        let r = gw.chat_as("ot-good", small()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    redis.stop();
    assert!(
        wait_until_async(WAIT, || gw.engine.metrics_text().contains("onetoken_redis_up 0"))
            .await
    );
    // What the lease already holds is still spent; past it, 503 naming the cause, never
    // a 402 the balance does not justify.
    let mut served = 0;
    let refused = loop {
        let r = gw.chat_as("ot-good", small()).await;
        if r.status != 200 {
            break r;
        }
        served += 1;
        assert!(served < 1000, "the lease never ran out");
    };
    assert_eq!(refused.status, 503, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["error"]["code"], "shared_state_unavailable");
    assert_eq!(body["error"]["type"], "service_unavailable");
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(metric(&gw, "onetoken_shared_fallbacks_total") >= 1.0);
    let spent_while_down = gw.org_spent(ORG);

    // Redis comes back empty (no persistence): once the cap is published again the
    // gateway re-asserts its hold and is served from the shared cap again.
    redis.restart();
    set_cap(&redis, 1_000_000_000);
    assert!(
        wait_for(WAIT, || async {
            gw.chat_as("ot-good", small()).await.status == 200
        })
        .await
    );
    assert_eq!(metric(&gw, "onetoken_redis_up"), 1.0);
    let hold = holds(&redis)[gw.engine.instance_id()];
    assert!(
        hold >= spent_while_down,
        "hold {hold} forgot the {spent_while_down} already spent"
    );
}
