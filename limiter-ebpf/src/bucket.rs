//! Lock-free updates of a shared GCRA bucket: the kernel's side of
//! [`limiter_common::bucket::charge`].
//!
//! Concurrency scheme: a bucket is two words. Charges update the first (the theoretical
//! arrival time) with compare-and-swap: a CPU reads it, runs the pure GCRA step, and publishes
//! the new TAT only if nobody changed it meanwhile; otherwise it retries on the value that
//! beat it. Because every admitted charge is a successful CAS from the exact state it was
//! computed from, concurrent CPUs serialise perfectly: the admitted total never exceeds
//! `rate * time + capacity`, with no error term from concurrency.
//!
//! Refunds (a later bucket dropped a packet this one admitted) only add to the second word,
//! with one atomic add that cannot fail. So a refund never makes a charge's swap fail: only
//! other CPUs' charges can, and [`CAS_ATTEMPTS`](limiter_common::bucket::CAS_ATTEMPTS) lost
//! races in a row mean that many packets took this bucket's tokens while we tried; the packet
//! is then refused (`bucket_contended`), the safe side. Refunding by subtracting from the TAT
//! instead would either race charges (a CAS) or, as a blind add of a negative cost, wrap a
//! bucket recreated since the charge (LRU eviction, a purge) to a TAT near `u64::MAX` that
//! refuses forever; the refund word cannot: the state is `tat - refunded`, floored at "full"
//! (see `limiter_common::bucket::effective_tat`).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

pub use limiter_common::bucket::Charge;
use limiter_common::{
    Bucket,
    bucket::{BucketWords, charge as charge_loop},
};

/// A bucket in a BPF map value.
struct MapBucket(*mut Bucket);

impl BucketWords for MapBucket {
    /// A plain aligned 8-byte load cannot tear on the 64-bit machines the BPF JIT runs on, and
    /// LLVM's BPF backend cannot select an atomic load before cpu v4; the CAS is what makes an
    /// update safe.
    #[inline(always)]
    fn load_tat(&mut self) -> u64 {
        // SAFETY: `MapBucket` is only built from a live map value (see `charge`), whose
        // fields are 8-byte aligned.
        unsafe { core::ptr::read_volatile(&raw const (*self.0).tat_ns) }
    }

    #[inline(always)]
    fn load_refunded(&mut self) -> u64 {
        // SAFETY: as in `load_tat`.
        unsafe { core::ptr::read_volatile(&raw const (*self.0).refunded_ns) }
    }

    #[inline(always)]
    fn compare_exchange_tat(&mut self, seen: u64, next: u64) -> (u64, bool) {
        // SAFETY: as in `load_tat`.
        unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(
                &raw mut (*self.0).tat_ns,
                seen,
                next,
            )
        }
    }

    fn set_back(&mut self, seen: u64, next: u64) {
        set_back(self.0, seen, next);
    }

    #[inline(always)]
    fn add_refunded(&mut self, cost_ns: u64) {
        // SAFETY: as in `load_tat`.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*self.0).refunded_ns, cost_ns) };
    }
}

/// The rare repair of a bucket found beyond empty (see `limiter_common::bucket::charge`), as a
/// BPF subprogram: inlined, its registers would be spilled into the rule callback's frame, and
/// the call chain's stack is at its 512-byte limit.
#[inline(never)]
extern "C" fn set_back(bucket: *mut Bucket, seen: u64, next: u64) {
    // SAFETY: called only by `MapBucket::set_back`, with its live map value.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(
            &raw mut (*bucket).tat_ns,
            seen,
            next,
        )
    };
}

/// Charges `cost_ns` to `bucket`.
///
/// # Safety
/// `bucket` must point to a live bucket value in a BPF map.
#[inline(always)]
pub unsafe fn charge(bucket: *mut Bucket, now_ns: u64, cost_ns: u64, burst_ns: u64) -> Charge {
    charge_loop(&mut MapBucket(bucket), now_ns, cost_ns, burst_ns)
}

/// Gives back a charge of `cost_ns` (the packet was dropped by a later bucket).
///
/// # Safety
/// As for [`charge`].
#[inline(always)]
pub unsafe fn refund(bucket: *mut Bucket, cost_ns: u64) {
    MapBucket(bucket).add_refunded(cost_ns);
}
