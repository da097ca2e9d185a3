//! Node membership for `global` kernel rules against a real `redis-server` the harness starts on
//! a free loopback port: members count each other, leave with `ZREM`, drop out once they stop
//! heartbeating, and a node keeps its last count while Redis is down; and the demand they
//! publish for the shares of `global` kernel rules.
//!
//! Staleness is real time (Redis's clock); heartbeats here are short and waits are bounded by
//! deadlines, never asserted on.

use std::time::{Duration, Instant};

use limiter_agent::sync::{Membership, MembershipConfig, NODES_KEY};
use limiter_tests::redis::RedisServer;
use tokio::sync::watch;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn member(server: &RedisServer, id: &str, heartbeat: Duration) -> Membership {
    Membership::new(&server.url(), MembershipConfig::new(id.to_owned(), "", heartbeat)).expect("valid redis url")
}

/// Beats `m` until it sees `want` nodes, at most `within`.
async fn beat_until(m: &mut Membership, want: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let n = m.beat().await.expect("heartbeat");
        if n == want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn two_members_count_two_and_one_after_the_other_leaves() {
    let server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        let heartbeat = Duration::from_secs(10);
        let mut a = member(&server, "node-a", heartbeat);
        let mut b = member(&server, "node-b", heartbeat);
        assert_eq!(a.beat().await.expect("beat a"), 1);
        assert_eq!(b.beat().await.expect("beat b"), 2);
        assert_eq!(a.beat().await.expect("beat a again"), 2, "a beat renews, never adds");
        // Scores are heartbeat times, so ZRANGE order follows who beat last: compare as a set.
        let mut members = server.command(&["ZRANGE", NODES_KEY, "0", "-1"]).unwrap().as_strings();
        members.sort();
        assert_eq!(members, ["node-a", "node-b"]);

        b.leave().await.expect("b leaves");
        assert_eq!(a.beat().await.expect("beat a"), 1);
        let members = server.command(&["ZRANGE", NODES_KEY, "0", "-1"]).unwrap().as_strings();
        assert_eq!(members, ["node-a"]);
    });
}

#[test]
fn a_member_that_stops_heartbeating_drops_out_after_three_heartbeats() {
    let server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        let heartbeat = Duration::from_millis(200);
        let mut a = member(&server, "node-a", heartbeat);
        let mut b = member(&server, "node-b", heartbeat);
        assert_eq!(a.beat().await.expect("beat a"), 1);
        assert_eq!(b.beat().await.expect("beat b"), 2);
        // b goes silent (a crash: no ZREM); a keeps beating and sees it go.
        drop(b);
        let n = beat_until(&mut a, 1, Duration::from_secs(10)).await;
        assert_eq!(n, 1, "b still counted long after 3 heartbeats");
    });
}

async fn wait_for(nodes: &mut watch::Receiver<u64>, want: u64) -> u64 {
    tokio::time::timeout(Duration::from_secs(10), nodes.wait_for(|n| *n == want))
        .await
        .unwrap_or_else(|_| panic!("never saw {want} nodes"))
        .map(|n| *n)
        .expect("membership task alive")
}

#[test]
fn the_run_task_publishes_changes_keeps_the_count_while_redis_is_down_and_leaves_at_shutdown() {
    let mut server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        let heartbeat = Duration::from_millis(100);
        let a = member(&server, "node-a", heartbeat);
        let (tx, mut nodes) = watch::channel(0u64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(a.run(tx, stop_rx));
        assert_eq!(wait_for(&mut nodes, 1).await, 1);

        // Another node, scored an hour ahead on Redis's clock so it stays live for the test.
        let now = server.command(&["TIME"]).unwrap().as_strings();
        let ms = now[0].parse::<u64>().unwrap() * 1000 + 3_600_000;
        server.command(&["ZADD", NODES_KEY, &ms.to_string(), "node-b"]).unwrap();
        assert_eq!(wait_for(&mut nodes, 2).await, 2);

        // Redis down: the count stays at 2 (no silent fallback to the full rate).
        server.stop().unwrap();
        tokio::time::sleep(heartbeat * 6).await;
        assert_eq!(*nodes.borrow(), 2, "the last known count stays while Redis is down");
        assert!(!nodes.has_changed().unwrap(), "nothing published while Redis is down");

        // Back (empty: no persistence): a re-joins alone.
        server.restart().unwrap();
        assert_eq!(wait_for(&mut nodes, 1).await, 1);

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("task ends").expect("task ok");
        let members = server.command(&["ZRANGE", NODES_KEY, "0", "-1"]).unwrap().as_strings();
        assert!(members.is_empty(), "node-a left at shutdown: {members:?}");
    });
}

/// `s`'s demand for rule "r".
fn demand(r: f64) -> limiter_agent::sync::demand::Demand {
    [("r".to_owned(), r)].into_iter().collect()
}

/// Demand exchange through a real `redis-server`: each node publishes its demand and reads
/// every live node's in one round trip; both nodes compute shares from the same data that sum
/// to the limit; a node whose field goes stale (a crash) drops out of the others' views and
/// its share goes to them; an unreadable field counts as no demand; leaving removes the field.
#[test]
fn nodes_exchange_demand_and_compute_shares_that_sum_to_the_limit() {
    use limiter_agent::{
        plan::{Limit, Unit},
        sync::{
            demand::{DEFAULT_FLOOR, share_of},
            exchange::DEMAND_KEY,
        },
    };
    let server = RedisServer::start().expect("redis-server");
    runtime().block_on(async {
        let heartbeat = Duration::from_millis(200);
        let mut a = member(&server, "node-a", heartbeat);
        let mut b = member(&server, "node-b", heartbeat);
        a.sync_once(&demand(0.0)).await.expect("a's first sync");
        let view_b = b.sync_once(&demand(100.0)).await.expect("b syncs");
        let view_a = a.sync_once(&demand(300.0)).await.expect("a syncs");
        assert_eq!(view_a.nodes, ["node-a", "node-b"]);
        assert_eq!(view_a.weights("r"), [300.0, 100.0]);
        assert_eq!(view_b.weights("r"), [0.0, 100.0], "b read a's earlier demand");
        let limit = Limit { requests: 1000, unit: Unit::Second, burst: 0 };
        let view_b = b.sync_once(&demand(100.0)).await.expect("b syncs again");
        let (sa, sb) = (share_of(limit, "r", &view_a, DEFAULT_FLOOR), share_of(limit, "r", &view_b, DEFAULT_FLOOR));
        assert_eq!((sa.requests, sb.requests), (738, 262), "25 each, then 950 as 3:1 (the tie to the first node)");

        // The hash: a field per node (Redis time and JSON), under a TTL.
        let fields = server.command(&["HGET", DEMAND_KEY, "node-a"]).unwrap().as_text().unwrap();
        assert!(fields.ends_with(" {\"r\":300.0}"), "{fields}");
        let ttl = server.command(&["PTTL", DEMAND_KEY]).unwrap().as_int().unwrap();
        assert!(ttl > 0, "the hash has a TTL: {ttl}");

        // An unreadable field counts as no demand.
        let time = server.command(&["TIME"]).unwrap().as_strings();
        let ahead = (time[0].parse::<u64>().unwrap() * 1000 + 60_000).to_string();
        server.command(&["ZADD", NODES_KEY, &ahead, "node-x"]).unwrap();
        server.command(&["HSET", DEMAND_KEY, "node-x", &format!("{ahead} not json")]).unwrap();
        let view = a.sync_once(&demand(300.0)).await.expect("a syncs");
        assert_eq!(view.nodes, ["node-a", "node-b", "node-x"]);
        assert_eq!(view.weights("r"), [300.0, 100.0, 0.0]);
        server.command(&["ZREM", NODES_KEY, "node-x"]).unwrap();
        server.command(&["HDEL", DEMAND_KEY, "node-x"]).unwrap();

        // b goes silent (a crash): after three periods its field and membership are gone from
        // a's view, and a gets the whole limit.
        drop(b);
        let deadline = Instant::now() + Duration::from_secs(10);
        let view = loop {
            let view = a.sync_once(&demand(300.0)).await.expect("a syncs");
            if view.nodes.len() == 1 || Instant::now() > deadline {
                break view;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(view.nodes, ["node-a"], "b still live long after three periods");
        assert!(!view.demand.contains_key("node-b"));
        let fields = server.command(&["HKEYS", DEMAND_KEY]).unwrap().as_strings();
        assert_eq!(fields, ["node-a"], "b's stale field was deleted");
        assert_eq!(share_of(limit, "r", &view, DEFAULT_FLOOR), limit);

        a.leave().await.expect("a leaves");
        assert_eq!(server.command(&["HLEN", DEMAND_KEY]).unwrap().as_int(), Some(0));
    });
}
