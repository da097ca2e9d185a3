//! Node membership for `global` kernel rules against a real `redis-server` the harness starts on
//! a free loopback port: members count each other, leave with `ZREM`, drop out once they stop
//! heartbeating, and a node keeps its last count while Redis is down.
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
