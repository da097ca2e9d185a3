//! Counter state of the L7 engine: meters (token bucket, fixed window) and the bounded,
//! sharded store of per-key counters.
//!
//! # Concurrency
//!
//! Counters live in `SHARDS` maps, each behind its own mutex; a key's shard is chosen by a
//! keyed (SipHash, per-process random) hash, so unrelated keys rarely contend and crafted keys
//! cannot pile into one shard. A decision on one counter (read the state, decide, charge) runs
//! entirely under that shard's lock: decisions on one counter are linearizable and no update
//! is lost. A request that touches several counters takes their locks one at a time, never
//! two at once (no lock ordering to get wrong, no deadlock).
//!
//! # Bounded memory and what eviction costs
//!
//! The store holds at most `max_keys` counters: shard `i` holds at most its share of
//! `max_keys` (the shares add up to exactly `max_keys`). When a shard is full, inserting a new
//! key evicts that shard's least recently used counter. Eviction forgets state: the evicted
//! key, when it comes back, starts like a new key, with a full token bucket or an empty
//! window. For a counter idle long enough to have refilled (a full bucket, a past window)
//! that loses nothing; for one still partly drained it over-admits at most one bucket depth
//! (or one window's limit) for that key. Keys in steady use stay near the front of the LRU
//! order, so a flood of one-off random keys evicts other one-off keys first.
//!
//! A check that neither charges nor changes state (a new key, `hits_addend` 0, a refused
//! charge on a new key) never inserts: a state equal to the default is not stored.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use limiter_common::bucket::{BucketParams, gcra, remaining_tokens};

use crate::plan::l7::{Algorithm, L7Rule};

/// Time of one decision, on both clocks the meters use.
#[derive(Clone, Copy, Debug)]
pub(super) struct Now {
    /// Nanoseconds since the engine's monotonic anchor (token buckets).
    pub mono_ns: u64,
    /// Unix time in nanoseconds, derived from the monotonic clock (fixed windows).
    pub wall_ns: u64,
}

/// The state of one counter: two words whose meaning depends on the rule's meter.
/// All zeros is a new counter (a full bucket, an empty window) and is never stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CounterState {
    /// Token bucket: the GCRA theoretical arrival time (0 = full). Fixed window: the window
    /// index plus one (0 = no window yet).
    word: u64,
    /// Fixed window: hits counted in the window `word - 1`.
    count: u64,
}

/// What a meter said about one charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Outcome {
    /// The charge fits within the limit.
    pub conforms: bool,
    /// The charge was applied (it changed the state and must be undone on rollback).
    pub charged: bool,
    /// Whole requests still available after this decision.
    pub remaining: u64,
    /// Nanoseconds until the counter is back to its full quota.
    pub reset_ns: u64,
}

/// When [`Meter::decide`] applies a charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Charge {
    /// Always count the hits (RLS: the reference service counts over-limit hits too; a token
    /// bucket still refuses without charging).
    Always,
    /// Only if the charge conforms (HTTP requests, which are charged all-or-nothing).
    IfConforms,
}

/// Bucket arithmetic of one limited rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Meter {
    /// A token bucket (GCRA) of `requests` per unit, depth `requests + burst`: the kernel's
    /// arithmetic ([`limiter_common::bucket`]), so both layers admit exactly the same requests.
    Bucket(BucketParams),
    /// envoyproxy/ratelimit fixed windows of `limit` hits per `unit_ns`, aligned to unix time.
    /// Like the reference service, hits are counted even when over the limit.
    Window { unit_ns: u64, limit: u64 },
    /// `requests: 0` in a token bucket: nothing is admitted.
    Closed { unit_ns: u64 },
}

impl Meter {
    /// The meter of a rule; `None` for `unlimited`.
    pub fn for_rule(rule: &L7Rule) -> Option<Meter> {
        let limit = rule.limit?;
        let unit_ns = limit.unit.as_ns().max(1);
        Some(match rule.algorithm {
            Algorithm::FixedWindow => Meter::Window { unit_ns, limit: limit.requests },
            Algorithm::TokenBucket if limit.requests == 0 => Meter::Closed { unit_ns },
            Algorithm::TokenBucket => {
                // Above one request per nanosecond the kernel arithmetic has no exact cost;
                // such a rate admits everything a machine can send, so cap it there and keep
                // the depth.
                let depth = limit.requests.saturating_add(limit.burst);
                let requests = limit.requests.min(unit_ns);
                match BucketParams::for_packets(requests, unit_ns, depth - requests) {
                    Some(params) => Meter::Bucket(params),
                    None => Meter::Closed { unit_ns },
                }
            }
        })
    }

    /// Decides (and, as `charge` says, applies) `hits` against `state`.
    ///
    /// Token buckets never charge a refused request (GCRA leaves the state unchanged), so a
    /// flood of denied requests does not delay recovery. Fixed windows with
    /// [`Charge::Always`] count every hit, as envoyproxy/ratelimit's INCRBY does, so their
    /// `remaining` matches the reference service.
    pub fn decide(&self, state: &mut CounterState, now: Now, hits: u64, charge: Charge) -> Outcome {
        match *self {
            Meter::Bucket(params) => {
                let mut charged = false;
                let conforms = if hits == 0 {
                    true
                } else {
                    match gcra(state.word, now.mono_ns, params.cost_ns(hits), params.burst_ns) {
                        Some(tat) => {
                            state.word = tat;
                            charged = true;
                            true
                        }
                        None => false,
                    }
                };
                Outcome {
                    conforms,
                    charged,
                    remaining: remaining_tokens(&params, state.word, now.mono_ns),
                    reset_ns: state.word.saturating_sub(now.mono_ns),
                }
            }
            Meter::Window { unit_ns, limit } => {
                let index = now.wall_ns / unit_ns;
                let tag = index + 1;
                let before = if state.word == tag { state.count } else { 0 };
                let after = before.saturating_add(hits);
                let charged = hits > 0
                    && match charge {
                        Charge::Always => true,
                        Charge::IfConforms => after <= limit,
                    };
                if charged {
                    state.word = tag;
                    state.count = after;
                }
                let window_end = index.saturating_add(1).saturating_mul(unit_ns);
                Outcome {
                    conforms: after <= limit,
                    charged,
                    remaining: limit.saturating_sub(after),
                    reset_ns: window_end.saturating_sub(now.wall_ns),
                }
            }
            Meter::Closed { unit_ns } => {
                Outcome { conforms: hits == 0, charged: false, remaining: 0, reset_ns: unit_ns }
            }
        }
    }

    /// Undoes a charge of `hits` made by [`Meter::decide`] at `now` (a request denied by
    /// another rule). Exact even if other charges happened in between: a token bucket gives
    /// back exactly the credit taken, a window subtracts the hits if it is still current.
    pub fn refund(&self, state: &mut CounterState, now: Now, hits: u64) {
        match *self {
            Meter::Bucket(params) => state.word = state.word.saturating_sub(params.cost_ns(hits)),
            Meter::Window { unit_ns, .. } => {
                if state.word == now.wall_ns / unit_ns + 1 {
                    state.count = state.count.saturating_sub(hits);
                }
            }
            Meter::Closed { .. } => {}
        }
    }
}

/// One token bucket shared by every request of a rule (no value splits it): its TAT lives in
/// one atomic word, updated by compare-and-swap exactly as the XDP program updates its
/// buckets, so the busiest counter of all (a gateway-wide limit) takes no lock. The CAS loop
/// retries only when another thread changed the word in between: decisions stay
/// linearizable, no update is lost.
pub(super) fn decide_shared(tat: &AtomicU64, meter: &Meter, now: Now, hits: u64, charge: Charge) -> Outcome {
    let mut current = tat.load(Ordering::Relaxed);
    loop {
        let mut state = CounterState { word: current, count: 0 };
        let outcome = meter.decide(&mut state, now, hits, charge);
        if state.word == current {
            return outcome;
        }
        // Relaxed: the word is the whole state; nothing else is published with it.
        match tat.compare_exchange_weak(current, state.word, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return outcome,
            Err(actual) => current = actual,
        }
    }
}

/// [`Meter::refund`] for a [`decide_shared`] bucket.
pub(super) fn refund_shared(tat: &AtomicU64, meter: &Meter, now: Now, hits: u64) {
    let _ = tat.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
        let mut state = CounterState { word, count: 0 };
        meter.refund(&mut state, now, hits);
        Some(state.word)
    });
}

/// Number of shards for a capacity: enough to spread 2 cores' worth of contention and more,
/// few enough that every shard holds a useful share (at least ~256 keys when possible).
fn shard_count(max_keys: usize) -> usize {
    (max_keys / 256).clamp(1, 64).next_power_of_two().min(64)
}

/// Links of the intrusive LRU list ("no slot").
const NIL: u32 = u32::MAX;

struct Slot {
    key: Arc<[u8]>,
    state: CounterState,
    /// Towards the most recently used end.
    prev: u32,
    /// Towards the least recently used end.
    next: u32,
}

/// One shard: a hash map from key to slot index, and the slots in an LRU doubly linked list
/// threaded through a `Vec` (no per-node allocation; a freed slot is reused).
struct Shard {
    map: HashMap<Arc<[u8]>, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next to evict.
    tail: u32,
    capacity: usize,
}

impl Shard {
    fn new(capacity: usize) -> Self {
        Self { map: HashMap::new(), slots: Vec::new(), free: Vec::new(), head: NIL, tail: NIL, capacity }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = (self.slots[i as usize].prev, self.slots[i as usize].next);
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        self.slots[i as usize].prev = NIL;
        self.slots[i as usize].next = self.head;
        match self.head {
            NIL => self.tail = i,
            h => self.slots[h as usize].prev = i,
        }
        self.head = i;
    }

    /// Makes room for one more key; true if a counter was evicted.
    fn evict_if_full(&mut self) -> bool {
        if self.map.len() < self.capacity || self.tail == NIL {
            return false;
        }
        let victim = self.tail;
        self.unlink(victim);
        let key = self.slots[victim as usize].key.clone();
        self.map.remove(&key);
        self.free.push(victim);
        true
    }

    fn insert(&mut self, key: &[u8], state: CounterState) {
        let key: Arc<[u8]> = Arc::from(key);
        let slot = Slot { key: key.clone(), state, prev: NIL, next: NIL };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                // A shard never holds more than u32::MAX - 1 slots (NIL is reserved);
                // capacity is far below that in any sane configuration.
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        self.map.insert(key, i);
        self.push_front(i);
    }

    fn remove_where(&mut self, mut drop_key: impl FnMut(&[u8]) -> bool) {
        let doomed: Vec<u32> = self.map.iter().filter(|(k, _)| drop_key(k)).map(|(_, &i)| i).collect();
        for i in doomed {
            self.unlink(i);
            let key = self.slots[i as usize].key.clone();
            self.map.remove(&key);
            // Drop the key's memory now rather than when the slot is reused.
            self.slots[i as usize].key = Arc::from(&[][..]);
            self.free.push(i);
        }
    }
}

/// Occupancy and eviction figures of the counter store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterStats {
    /// Counters currently tracked.
    pub tracked: usize,
    /// The configured bound (`max_keys`).
    pub capacity: usize,
    /// Counters evicted to make room since the engine started.
    pub evictions: u64,
}

/// A shard on cache lines of its own: neighbouring shards locked by different cores must not
/// share a line, or every lock would bounce it between them (false sharing). 128 bytes
/// covers the adjacent-line prefetch of x86 and the line size of recent Arm cores.
#[repr(align(128))]
struct PaddedShard(Mutex<Shard>);

/// The bounded store of every (rule, key) counter.
pub(super) struct Counters {
    shards: Box<[PaddedShard]>,
    hasher: RandomState,
    capacity: usize,
    evictions: AtomicU64,
}

impl Counters {
    /// A store of at most `max_keys` counters (0 is treated as 1).
    pub fn new(max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        let n = shard_count(max_keys);
        let shards = (0..n)
            .map(|i| {
                let share = max_keys / n + usize::from(i < max_keys % n);
                PaddedShard(Mutex::new(Shard::new(share)))
            })
            .collect();
        Self { shards, hasher: RandomState::new(), capacity: max_keys, evictions: AtomicU64::new(0) }
    }

    fn shard(&self, key: &[u8]) -> &Mutex<Shard> {
        // `shards.len()` is a power of two.
        let i = self.hasher.hash_one(key) as usize & (self.shards.len() - 1);
        &self.shards[i].0
    }

    /// Runs `f` on the counter `key` under its shard's lock. A key not tracked yet is run on
    /// a new (default) state, which is stored only if `f` changed it; storing may evict the
    /// shard's least recently used counter. A tracked key becomes the most recently used.
    pub fn update<R>(&self, key: &[u8], f: impl FnOnce(&mut CounterState) -> R) -> R {
        let mut shard = self.shard(key).lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&i) = shard.map.get(key) {
            if shard.head != i {
                shard.unlink(i);
                shard.push_front(i);
            }
            return f(&mut shard.slots[i as usize].state);
        }
        let mut state = CounterState::default();
        let result = f(&mut state);
        if state != CounterState::default() {
            if shard.evict_if_full() {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
            shard.insert(key, state);
        }
        result
    }

    /// Like [`Counters::update`] but never inserts: `f` runs only on a tracked counter.
    pub fn update_existing(&self, key: &[u8], f: impl FnOnce(&mut CounterState)) {
        let mut shard = self.shard(key).lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&i) = shard.map.get(key) {
            f(&mut shard.slots[i as usize].state);
        }
    }

    /// Forgets every counter whose key `drop_key` selects (a rule that left the plan).
    pub fn remove_where(&self, mut drop_key: impl FnMut(&[u8]) -> bool) {
        for shard in &self.shards {
            shard.0.lock().unwrap_or_else(PoisonError::into_inner).remove_where(&mut drop_key);
        }
    }

    pub fn stats(&self) -> CounterStats {
        let tracked = self.shards.iter().map(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner).map.len()).sum();
        CounterStats { tracked, capacity: self.capacity, evictions: self.evictions.load(Ordering::Relaxed) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> Vec<u8> {
        n.to_le_bytes().to_vec()
    }

    fn touch(c: &Counters, k: &[u8]) {
        c.update(k, |s| s.count += 1);
    }

    #[test]
    fn shares_add_up_to_the_bound() {
        for max in [0, 1, 7, 255, 256, 1000, 100_000, 1 << 20] {
            let c = Counters::new(max);
            let total: usize = c.shards.iter().map(|s| s.0.lock().unwrap().capacity).sum();
            assert_eq!(total, max.max(1), "max_keys {max}");
        }
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let c = Counters::new(3); // one shard
        for n in 0..3 {
            touch(&c, &key(n));
        }
        touch(&c, &key(0)); // 1 is now the least recently used
        touch(&c, &key(3));
        assert_eq!(c.stats().tracked, 3);
        assert_eq!(c.stats().evictions, 1);
        let mut seen = Vec::new();
        for n in 0..4 {
            c.update_existing(&key(n), |s| seen.push((n, s.count)));
        }
        assert_eq!(seen, vec![(0, 2), (2, 1), (3, 1)]);
    }

    #[test]
    fn unchanged_new_state_is_not_stored() {
        let c = Counters::new(10);
        c.update(&key(1), |_| ());
        assert_eq!(c.stats().tracked, 0);
    }

    #[test]
    fn removed_slots_are_reused() {
        let c = Counters::new(4);
        for n in 0..4 {
            touch(&c, &key(n));
        }
        c.remove_where(|k| k[0] % 2 == 0);
        assert_eq!(c.stats().tracked, 2);
        touch(&c, &key(10));
        touch(&c, &key(12));
        assert_eq!(c.stats().tracked, 4);
        assert_eq!(c.stats().evictions, 0);
        assert_eq!(c.shards[0].0.lock().unwrap().slots.len(), 4);
    }
}
