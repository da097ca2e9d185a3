//! The token bucket, written as GCRA (the generic cell rate algorithm).
//!
//! A bucket of `rate` tokens per `unit` with depth `capacity` is stored as one `u64`: the
//! *theoretical arrival time* (TAT), in nanoseconds of `CLOCK_BOOTTIME`. Every token costs
//! `ns_per_token` nanoseconds of "credit"; a request is admitted when, after adding its cost,
//! the TAT is no further than `burst_ns = capacity * ns_per_token` ahead of now. This is exactly
//! a token bucket that starts full, refills continuously and holds at most `capacity` tokens,
//! but its whole state is a single word, so the kernel can update it with one compare-and-swap
//! instead of a lock (see `limiter-ebpf/src/bucket.rs` for the concurrency argument).
//!
//! The arithmetic is this one pure function of `(state, now, params)`, shared by the XDP
//! program and the agent's unit tests, so tests control time instead of sleeping.

/// Fixed-point shift of [`BucketParams::ns_per_token_fp`]: nanoseconds per token in Q48.16, so
/// byte rates above 1 GB/s (less than one nanosecond per byte) keep their precision.
pub const FP_SHIFT: u32 = 16;

/// Nanoseconds in each policy unit.
pub const NS_PER_SECOND: u64 = 1_000_000_000;
pub const NS_PER_MINUTE: u64 = 60 * NS_PER_SECOND;
pub const NS_PER_HOUR: u64 = 60 * NS_PER_MINUTE;
pub const NS_PER_DAY: u64 = 24 * NS_PER_HOUR;

/// Largest `burst_ns` we store. Keeps `tat + cost` far from `u64` overflow for any clock
/// value a machine reaches (2^62 ns is 146 years of uptime).
pub const MAX_BURST_NS: u64 = 1 << 62;

/// Bucket parameters as the kernel reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketParams {
    /// Nanoseconds of credit one token costs, Q48.16 fixed point.
    pub ns_per_token_fp: u64,
    /// How far ahead of now the TAT may run: `capacity * ns_per_token`, in nanoseconds.
    pub burst_ns: u64,
}

const _: () = assert!(core::mem::size_of::<BucketParams>() == 16);

impl BucketParams {
    /// Parameters for `requests` packets (or connections, or requests) per `unit_ns`, with a
    /// depth of `requests + burst`.
    ///
    /// The cost of one token is rounded to a whole nanosecond, so that a full bucket admits
    /// exactly `requests + burst` at once; the rate is then off by at most 0.5 ns per token
    /// (0.05% at one million per second).
    ///
    /// Returns `None` when the rate is zero or above one token per nanosecond.
    pub const fn for_packets(requests: u64, unit_ns: u64, burst: u64) -> Option<Self> {
        if requests == 0 || unit_ns == 0 {
            return None;
        }
        let whole_ns = ((unit_ns as u128) + requests as u128 / 2) / requests as u128;
        if whole_ns == 0 {
            return None;
        }
        Self::from_fp(whole_ns << FP_SHIFT, requests as u128 + burst as u128)
    }

    /// Parameters for `requests` bytes per `unit_ns` with a depth of `requests + burst` bytes.
    ///
    /// A byte costs a Q48.16 fraction of a nanosecond, so rates above 1 GB/s keep their
    /// precision; each frame's cost is rounded to the nearest nanosecond (see [`Self::cost_ns`]).
    ///
    /// Returns `None` when the rate is zero or above 65,536 bytes per nanosecond.
    pub const fn for_bytes(requests: u64, unit_ns: u64, burst: u64) -> Option<Self> {
        if requests == 0 || unit_ns == 0 {
            return None;
        }
        Self::from_fp(((unit_ns as u128) << FP_SHIFT) / requests as u128, requests as u128 + burst as u128)
    }

    const fn from_fp(fp: u128, capacity: u128) -> Option<Self> {
        if fp == 0 || fp > u64::MAX as u128 {
            return None;
        }
        // Rounded like `cost_ns`, so a bucket of N bytes admits one N-byte frame.
        let burst_ns = (capacity * fp + (1 << (FP_SHIFT - 1))) >> FP_SHIFT;
        let burst_ns = if burst_ns > MAX_BURST_NS as u128 { MAX_BURST_NS } else { burst_ns as u64 };
        Some(Self { ns_per_token_fp: fp as u64, burst_ns })
    }

    /// Credit in nanoseconds that `tokens` tokens cost, rounded to the nearest nanosecond:
    /// exact for packet buckets, and off by at most 0.5 ns per frame for byte buckets
    /// (a relative error of `0.5 / (frame bytes * ns per byte)`: 0.1% for 64-byte frames at
    /// 1 Gbit/s).
    #[inline(always)]
    pub const fn cost_ns(&self, tokens: u64) -> u64 {
        // Written without u128 because the BPF target has no 128-bit multiply: the whole
        // nanoseconds and the 16-bit fraction are multiplied separately, which rounds exactly
        // like `(tokens * fp + half) >> FP_SHIFT`.
        if tokens > u32::MAX as u64 {
            return MAX_BURST_NS;
        }
        let whole = self.ns_per_token_fp >> FP_SHIFT;
        let frac = self.ns_per_token_fp & ((1 << FP_SHIFT) - 1);
        let frac_ns = (tokens * frac + (1 << (FP_SHIFT - 1))) >> FP_SHIFT;
        if whole != 0 && tokens > MAX_BURST_NS / whole {
            return MAX_BURST_NS;
        }
        let c = tokens * whole + frac_ns;
        if c > MAX_BURST_NS { MAX_BURST_NS } else { c }
    }
}

/// One GCRA step: the new TAT if a charge of `cost_ns` conforms at `now_ns`, `None` if it
/// must be refused (a refused charge leaves the state unchanged).
///
/// An idle bucket (TAT in the past) counts from `now`, so credit never accumulates beyond
/// `burst_ns`; a TAT of 0 is a new, full bucket.
#[inline(always)]
pub const fn gcra(tat_ns: u64, now_ns: u64, cost_ns: u64, burst_ns: u64) -> Option<u64> {
    let base = if tat_ns > now_ns { tat_ns } else { now_ns };
    let new_tat = base.saturating_add(cost_ns);
    if new_tat - now_ns <= burst_ns { Some(new_tat) } else { None }
}

/// Gives back a charge of `cost_ns` (a later bucket dropped the packet this one admitted):
/// the TAT the bucket should hold instead of `tat_ns`.
///
/// A refund never moves the TAT below `now_ns`, which is where a full bucket stands ([`gcra`]
/// treats any TAT at or before now alike), and never wraps. So a refund cannot hand out
/// credit beyond the bucket's depth, and a refund applied to a bucket that was recreated
/// (TAT 0) or has gone idle since the charge leaves it as it is. A plain subtraction would
/// wrap a TAT of 0 to nearly `u64::MAX`, a bucket [`gcra`] refuses forever.
#[inline(always)]
pub const fn refund(tat_ns: u64, now_ns: u64, cost_ns: u64) -> u64 {
    if tat_ns <= now_ns {
        return tat_ns;
    }
    let back = tat_ns.saturating_sub(cost_ns);
    if back > now_ns { back } else { now_ns }
}

/// Compare-and-swap attempts before a charge gives up and refuses the packet
/// (`bucket_contended`). Only other CPUs' charges can make a swap fail (refunds never touch
/// the swapped word), so this many failures in a row means this many other packets took
/// this bucket's tokens while we tried.
pub const CAS_ATTEMPTS: u32 = 6;

/// A bucket as the lock-free loop sees it: the kernel's is a map value ([`crate::Bucket`])
/// updated with atomic instructions; the unit tests' is a cell whose races they script.
pub trait BucketWords {
    /// Reads `tat_ns`.
    fn load_tat(&mut self) -> u64;
    /// Reads `refunded_ns`.
    fn load_refunded(&mut self) -> u64;
    /// Replaces `seen` with `next` in `tat_ns` if it still holds `seen`; returns the value
    /// found (equal to `seen` when it swapped) and whether it swapped.
    fn compare_exchange_tat(&mut self, seen: u64, next: u64) -> (u64, bool);
    /// Adds `cost_ns` to `refunded_ns`, atomically.
    fn add_refunded(&mut self, cost_ns: u64);
    /// Replaces `seen` with `next` in `tat_ns` if it still holds `seen`, on the rare path that
    /// repairs a bucket (the kernel's keeps it out of line, off the hot path's stack frame).
    fn set_back(&mut self, seen: u64, next: u64) {
        let _ = self.compare_exchange_tat(seen, next);
    }
}

/// Outcome of [`charge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    Admitted,
    /// The bucket, as it stood at the last attempt, had no room.
    Refused,
    /// [`CAS_ATTEMPTS`] races lost to other CPUs' charges.
    Contended,
}

/// The GCRA state a bucket's two words stand for: its TAT less every refund, where a TAT at
/// or before now (0 included) is a full bucket.
///
/// Refunds beyond what the bucket owes (a refund landing on a bucket recreated since the
/// charge, or gone idle, or charged at a later time by another CPU) drive this below now, which
/// [`gcra`] treats as full: never more credit than a full bucket, and never a wrap.
#[inline(always)]
pub const fn effective_tat(tat_ns: u64, refunded_ns: u64) -> u64 {
    tat_ns.saturating_sub(refunded_ns)
}

/// Charges `cost_ns` to a bucket at `now_ns`: the lock-free loop the kernel runs.
///
/// Charges compare-and-swap `tat_ns`; refunds only add to `refunded_ns`, so they never make a
/// charge's swap fail, and a busy bucket with room admits. The refund total is read once; the
/// new TAT is written back with that same total added, so the bucket's state afterwards is
/// exactly the charge applied to the state it was computed from, and a refund that lands
/// between the read and the swap counts afterwards instead (it is not lost).
///
/// A failed swap returns the value that beat it (another CPU's charge, or the agent resetting
/// the bucket), and the next attempt computes from it: a bucket that ran out refuses on the
/// fresh state.
#[inline(always)]
pub fn charge<W: BucketWords>(word: &mut W, now_ns: u64, cost_ns: u64, burst_ns: u64) -> Charge {
    let refunded = word.load_refunded();
    let mut seen = word.load_tat();
    for _ in 0..CAS_ATTEMPTS {
        let state = effective_tat(seen, refunded);
        let Some(next) = gcra(state, now_ns, cost_ns, burst_ns) else {
            // A bucket is never more than empty. A state further ahead comes only from a bucket
            // recreated between this loop's two reads (LRU reuse of the element: the old
            // owner's refund total read, the new owner's TAT swapped): set it back to empty so
            // it refills from now, rather than refusing for as long as the stale total says.
            let empty = now_ns.saturating_add(burst_ns);
            if state > empty {
                word.set_back(seen, empty.saturating_add(refunded));
            }
            return Charge::Refused;
        };
        let (found, swapped) = word.compare_exchange_tat(seen, next.saturating_add(refunded));
        if swapped {
            return Charge::Admitted;
        }
        seen = found;
    }
    Charge::Contended
}

/// Tokens still available at `now_ns` in a bucket whose TAT is `tat_ns` (for reporting, e.g.
/// `x-ratelimit-remaining`).
pub const fn remaining_tokens(params: &BucketParams, tat_ns: u64, now_ns: u64) -> u64 {
    let used_ns = tat_ns.saturating_sub(now_ns);
    let free_ns = params.burst_ns.saturating_sub(used_ns);
    if params.ns_per_token_fp == 0 {
        return 0;
    }
    (((free_ns as u128) << FP_SHIFT) / params.ns_per_token_fp as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a bucket like the kernel does: `n` charges of `tokens` at `now`.
    fn admit(state: &mut u64, p: &BucketParams, now: u64, tokens: u64, n: u64) -> u64 {
        let mut admitted = 0;
        for _ in 0..n {
            if let Some(t) = gcra(*state, now, p.cost_ns(tokens), p.burst_ns) {
                *state = t;
                admitted += 1;
            }
        }
        admitted
    }

    const T0: u64 = 5 * NS_PER_SECOND;

    #[test]
    fn full_bucket_admits_rate_plus_burst_at_once() {
        // The gateway docs' example: 3 per second with burst 3 admits 6 at once.
        let p = BucketParams::for_packets(3, NS_PER_SECOND, 3).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, 1, 10), 6);
    }

    #[test]
    fn refills_at_the_configured_rate() {
        let p = BucketParams::for_packets(3, NS_PER_SECOND, 3).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, 1, 6), 6);
        // Half a second refills 1.5 tokens: one whole token.
        assert_eq!(admit(&mut tat, &p, T0 + NS_PER_SECOND / 2, 1, 10), 1);
        // A further second refills 3 tokens (the 0.5 left over is kept).
        assert_eq!(admit(&mut tat, &p, T0 + 3 * NS_PER_SECOND / 2, 1, 10), 3);
        // A long idle time refills only up to capacity.
        assert_eq!(admit(&mut tat, &p, T0 + 3600 * NS_PER_SECOND, 1, 100), 6);
    }

    #[test]
    fn five_per_minute_admits_five_then_one_every_twelve_seconds() {
        let p = BucketParams::for_packets(5, NS_PER_MINUTE, 0).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, 1, 20), 5);
        assert_eq!(admit(&mut tat, &p, T0 + 11 * NS_PER_SECOND, 1, 20), 0);
        assert_eq!(admit(&mut tat, &p, T0 + 12 * NS_PER_SECOND, 1, 20), 1);
    }

    #[test]
    fn sustained_admission_matches_rate_times_time_plus_burst() {
        // 1000/s, burst 100, offered 10x for 10 s in 1 ms steps.
        let p = BucketParams::for_packets(1000, NS_PER_SECOND, 100).unwrap();
        let mut tat = 0;
        let mut admitted = 0;
        for ms in 0..10_000u64 {
            admitted += admit(&mut tat, &p, T0 + ms * 1_000_000, 1, 10);
        }
        // rate * time + capacity = 10 * 1000 + 1100 (capacity includes the first second's 1000).
        let expected = 10_000 - 1 + 1100;
        assert!(admitted.abs_diff(expected) <= 1, "admitted {admitted}, expected {expected}");
    }

    #[test]
    fn counts_bytes() {
        // 1500 bytes per second, no burst: one 1500-byte frame, or three 500-byte ones.
        let p = BucketParams::for_bytes(1500, NS_PER_SECOND, 0).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, 1500, 3), 1);
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, 500, 5), 3);
        // A frame larger than the whole bucket never conforms.
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, 1501, 1), 0);
    }

    #[test]
    fn byte_rates_above_one_per_nanosecond_keep_precision() {
        // 10 GB/s (0.1 ns per byte, unrepresentable in whole nanoseconds), written as 10 MB
        // per millisecond so the bucket holds 10 MB.
        let p = BucketParams::for_bytes(10_000_000, NS_PER_SECOND / 1000, 0).unwrap();
        let mut tat = 0;
        let mut bytes = 0u64;
        // Offer 1500-byte frames at twice the rate for 10 ms, in 1 µs steps.
        for us in 0..10_000u64 {
            for _ in 0..14 {
                if let Some(t) = gcra(tat, T0 + us * 1000, p.cost_ns(1500), p.burst_ns) {
                    tat = t;
                    bytes += 1500;
                }
            }
        }
        let expected = 10_000_000 + 10 * 10_000_000; // capacity + 10 ms at rate
        let err = bytes.abs_diff(expected) as f64 / expected as f64;
        assert!(err < 0.001, "admitted {bytes} bytes, expected about {expected}");
    }

    #[test]
    fn huge_rates_and_long_idle_times_do_not_overflow() {
        let p = BucketParams::for_packets(1_000_000_000, NS_PER_SECOND, u32::MAX as u64).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, u64::MAX / 2, 1, 3), 3);
        // A clock near the end of u64 does not wrap the TAT.
        assert!(gcra(u64::MAX - 10, u64::MAX - 5, p.cost_ns(1), p.burst_ns).is_some());
        // One request per day with the maximum burst: all arithmetic saturates, none wraps.
        let p = BucketParams::for_packets(1, NS_PER_DAY, u64::MAX).unwrap();
        assert_eq!(p.burst_ns, MAX_BURST_NS);
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, u32::MAX as u64, 1), 1);
        // A bucket idle for 100 years is simply full again.
        let mut tat = T0 + NS_PER_DAY;
        let p = BucketParams::for_packets(2, NS_PER_SECOND, 0).unwrap();
        assert_eq!(admit(&mut tat, &p, T0 + 100 * 365 * NS_PER_DAY, 1, 5), 2);
    }

    #[test]
    fn unenforceable_rates_are_refused() {
        assert_eq!(BucketParams::for_packets(0, NS_PER_SECOND, 5), None);
        assert_eq!(BucketParams::for_packets(5, 0, 5), None);
        assert_eq!(BucketParams::for_packets(u64::MAX, 1, 0), None);
        assert_eq!(BucketParams::for_bytes(u64::MAX, 1, 0), None);
        assert!(BucketParams::for_bytes(65_536, 1, 0).is_some());
    }

    #[test]
    fn rates_with_fractional_nanoseconds_still_admit_the_whole_burst() {
        // 3 per 2 seconds: 666,666,666.67 ns per token.
        let p = BucketParams::for_packets(3, 2 * NS_PER_SECOND, 0).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, 1, 10), 3);
        // 7 per second with burst 13.
        let p = BucketParams::for_packets(7, NS_PER_SECOND, 13).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, 1, 100), 20);
    }

    #[test]
    fn a_refund_gives_back_exactly_the_charge() {
        let p = BucketParams::for_packets(3, NS_PER_SECOND, 0).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&mut tat, &p, T0, 1, 3), 3);
        let full = tat;
        tat = refund(tat, T0, p.cost_ns(1));
        assert_eq!(tat, full - p.cost_ns(1));
        assert_eq!(admit(&mut tat, &p, T0, 1, 5), 1, "one token back, no more");
    }

    #[test]
    fn refunding_a_recreated_or_idle_bucket_never_poisons_it() {
        let p = BucketParams::for_packets(1, NS_PER_HOUR, 0).unwrap();
        let cost = p.cost_ns(1);
        // The entry vanished after the charge and was recreated empty (TAT 0): the refund
        // leaves a full bucket, not a TAT near u64::MAX.
        assert_eq!(refund(0, T0, cost), 0);
        let mut tat = refund(0, T0, cost);
        assert_eq!(admit(&mut tat, &p, T0, 1, 3), 1);
        // A bucket that went idle (TAT in the past) stays as it is.
        assert_eq!(refund(T0 - 1, T0, cost), T0 - 1);
        // Reset and recharged by another CPU at `now`: the refund stops at now (full).
        assert_eq!(refund(T0 + 10, T0, cost), T0);
        // A cost larger than the TAT saturates instead of wrapping.
        assert_eq!(refund(T0 + 10, T0, u64::MAX), T0);
        assert_eq!(refund(5, 0, u64::MAX), 0);
        // Whatever the inputs, the result stays between now and the old TAT: never huge.
        for &(tat, now, cost) in &[(0, 0, 1), (1, 0, 2), (u64::MAX, 0, 1), (T0, T0, cost), (3, 2, u64::MAX)] {
            let back = refund(tat, now, cost);
            assert!(back <= tat, "refund({tat}, {now}, {cost}) = {back} moved the TAT forward");
            assert!(back >= now.min(tat), "refund({tat}, {now}, {cost}) = {back} went below now");
        }
    }

    #[test]
    fn remaining_reports_whole_tokens_left() {
        let p = BucketParams::for_packets(10, NS_PER_SECOND, 0).unwrap();
        let mut tat = 0;
        assert_eq!(remaining_tokens(&p, tat, T0), 10);
        admit(&mut tat, &p, T0, 1, 4);
        assert_eq!(remaining_tokens(&p, tat, T0), 6);
        admit(&mut tat, &p, T0, 1, 100);
        assert_eq!(remaining_tokens(&p, tat, T0), 0);
    }

    /// Two bucket words whose races the test scripts: before each swap, `other_cpu` may
    /// charge or refund as another CPU would.
    struct Scripted<F: FnMut(u32, &mut Bucket2)> {
        words: Bucket2,
        swaps: u32,
        other_cpu: F,
    }

    #[derive(Clone, Copy, Default)]
    struct Bucket2 {
        tat: u64,
        refunded: u64,
    }

    impl Bucket2 {
        fn state(&self) -> u64 {
            effective_tat(self.tat, self.refunded)
        }
    }

    impl<F: FnMut(u32, &mut Bucket2)> BucketWords for Scripted<F> {
        fn load_tat(&mut self) -> u64 {
            self.words.tat
        }
        fn load_refunded(&mut self) -> u64 {
            self.words.refunded
        }
        fn compare_exchange_tat(&mut self, seen: u64, next: u64) -> (u64, bool) {
            (self.other_cpu)(self.swaps, &mut self.words);
            self.swaps += 1;
            if self.words.tat == seen {
                self.words.tat = next;
                (seen, true)
            } else {
                (self.words.tat, false)
            }
        }
        fn add_refunded(&mut self, cost_ns: u64) {
            self.words.refunded += cost_ns;
        }
    }

    fn refund_words(b: &mut Bucket2, cost: u64) {
        b.refunded += cost;
    }

    #[test]
    fn refunds_from_other_cpus_never_fail_a_charge_and_are_not_lost() {
        // A busy bucket with room: another CPU refunds before each of our swaps.
        let p = BucketParams::for_packets(1000, NS_PER_SECOND, 100).unwrap();
        let cost = p.cost_ns(1);
        let mut b = Scripted {
            words: Bucket2 { tat: T0 + 50 * cost, refunded: 0 },
            swaps: 0,
            other_cpu: |_, b: &mut Bucket2| refund_words(b, cost),
        };
        assert_eq!(charge(&mut b, T0, cost, p.burst_ns), Charge::Admitted);
        assert_eq!(b.swaps, 1, "a refund does not make the swap fail");
        // Ours taken, theirs given back: the state is where it started.
        assert_eq!(b.words.state(), T0 + 50 * cost);
    }

    #[test]
    fn losses_to_charges_are_retried_on_the_fresh_state_then_given_up() {
        let p = BucketParams::for_packets(1000, NS_PER_SECOND, 100).unwrap();
        let cost = p.cost_ns(1);
        // Another CPU charges before every swap, while the bucket has room.
        let mut b = Scripted {
            words: Bucket2 { tat: T0, refunded: 0 },
            swaps: 0,
            other_cpu: |_, b: &mut Bucket2| b.tat += cost,
        };
        assert_eq!(charge(&mut b, T0, cost, p.burst_ns), Charge::Contended);
        assert_eq!(b.swaps, CAS_ATTEMPTS);
        // Five losses, then the swap wins from the state the winners left.
        let mut b = Scripted {
            words: Bucket2 { tat: T0, refunded: 0 },
            swaps: 0,
            other_cpu: |n, b: &mut Bucket2| {
                if n < 5 {
                    b.tat += cost
                }
            },
        };
        assert_eq!(charge(&mut b, T0, cost, p.burst_ns), Charge::Admitted);
        assert_eq!(b.words.state(), T0 + 6 * cost);
        // The winner drained the bucket meanwhile: the retry sees it and refuses, it does not
        // admit from the stale state.
        let full = T0 + p.burst_ns;
        let mut b = Scripted {
            words: Bucket2 { tat: full - cost, refunded: 0 },
            swaps: 0,
            other_cpu: |n, b: &mut Bucket2| {
                if n == 0 {
                    b.tat += cost
                }
            },
        };
        assert_eq!(charge(&mut b, T0, cost, p.burst_ns), Charge::Refused);
        assert_eq!(b.words.state(), full);
    }

    #[test]
    fn refunds_never_fill_beyond_full_nor_poison_a_recreated_bucket() {
        let p = BucketParams::for_packets(3, NS_PER_HOUR, 0).unwrap();
        let cost = p.cost_ns(1);
        let quiet = |_: u32, _: &mut Bucket2| {};
        // A refund landing on a bucket recreated since the charge (both words 0): it stays a
        // full bucket of 3, not one of 4, and not one near u64::MAX that refuses forever.
        let mut b = Scripted { words: Bucket2::default(), swaps: 0, other_cpu: quiet };
        b.add_refunded(cost);
        let admitted = (0..10).filter(|_| charge(&mut b, T0, cost, p.burst_ns) == Charge::Admitted).count();
        assert_eq!(admitted, 3);
        // One charge refunded gives exactly one token back.
        b.add_refunded(cost);
        let admitted = (0..10).filter(|_| charge(&mut b, T0, cost, p.burst_ns) == Charge::Admitted).count();
        assert_eq!(admitted, 1);
        // Refunds piled on an idle bucket (older timestamps) are worth nothing past full.
        for _ in 0..100 {
            b.add_refunded(cost);
        }
        let later = T0 + 2 * NS_PER_HOUR;
        let admitted = (0..10).filter(|_| charge(&mut b, later, cost, p.burst_ns) == Charge::Admitted).count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn a_state_beyond_empty_is_set_back_to_empty_and_refills() {
        // What a charge racing an element's reuse can leave: the old owner's refund total
        // added to the new owner's TAT, far beyond an empty bucket.
        let p = BucketParams::for_packets(10, NS_PER_SECOND, 0).unwrap();
        let cost = p.cost_ns(1);
        let mut b = Scripted {
            words: Bucket2 { tat: T0 + 3600 * NS_PER_SECOND, refunded: 0 },
            swaps: 0,
            other_cpu: |_, _: &mut Bucket2| {},
        };
        assert_eq!(charge(&mut b, T0, cost, p.burst_ns), Charge::Refused);
        assert_eq!(b.words.state(), T0 + p.burst_ns, "set back to empty");
        // One second later the bucket has refilled as any empty bucket does.
        let admitted =
            (0..20).filter(|_| charge(&mut b, T0 + NS_PER_SECOND, cost, p.burst_ns) == Charge::Admitted).count();
        assert_eq!(admitted, 10);
    }
}
