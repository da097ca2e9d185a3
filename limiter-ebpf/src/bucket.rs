//! Lock-free updates of a shared GCRA bucket.
//!
//! Concurrency scheme: the whole bucket is one `u64` (the theoretical arrival time), updated
//! with compare-and-swap. A CPU reads the TAT, runs the pure [`gcra`] step, and publishes the
//! new TAT only if nobody changed it meanwhile; otherwise it retries with the fresh value.
//! Because every admitted charge is a successful CAS from the exact state it was computed
//! from, concurrent CPUs serialise perfectly: the admitted total never exceeds
//! `rate * time + capacity`, with no error term from concurrency.
//!
//! The retry loop is bounded ([`CAS_ATTEMPTS`]) for the verifier. A CPU that loses every
//! attempt refuses the packet (counted as `bucket_contended`): under contention we
//! under-admit rather than over-admit, and losing four races in a row means other CPUs
//! admitted four packets in that window, so the bucket is being drained anyway.
//!
//! Refunds (when a later bucket drops a packet an earlier one admitted) go through the same
//! compare-and-swap, with the pure [`limiter_common::refund`] step: it never moves the TAT
//! below now (a full bucket) and never wraps. A blind atomic add of the negative cost would be
//! simpler, but if the entry was recreated between the charge and the refund (LRU eviction, or
//! the agent purging a retired rule's buckets), it would wrap a TAT of 0 to nearly `u64::MAX`:
//! a bucket that refuses everything, forever. A refund that loses every race is skipped: the
//! bucket keeps the charge, which under-admits (the safe side), like a contended charge.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use limiter_common::{gcra, refund as refund_step};

/// Compare-and-swap attempts before a contended charge gives up.
pub const CAS_ATTEMPTS: u32 = 4;

pub enum Charge {
    Admitted,
    Refused,
    Contended,
}

/// Charges `cost_ns` to the bucket at `tat`.
///
/// # Safety
/// `tat` must point to a live bucket value in a BPF map.
#[inline(always)]
pub unsafe fn charge(tat: *mut u64, now_ns: u64, cost_ns: u64, burst_ns: u64) -> Charge {
    for _ in 0..CAS_ATTEMPTS {
        // A plain aligned 8-byte load cannot tear on the 64-bit machines the BPF JIT runs on,
        // and LLVM's BPF backend cannot select an atomic load before cpu v4; the CAS below
        // is what makes the update safe.
        // SAFETY: the caller guarantees `tat` is a map value, 8-byte aligned by the map.
        let seen = unsafe { core::ptr::read_volatile(tat) };
        let Some(next) = gcra(seen, now_ns, cost_ns, burst_ns) else {
            return Charge::Refused;
        };
        // SAFETY: as above.
        let (_, swapped) =
            unsafe { atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(tat, seen, next) };
        if swapped {
            return Charge::Admitted;
        }
    }
    Charge::Contended
}

/// Gives back a charge of `cost_ns` (the packet was dropped by a later bucket) made at
/// `now_ns`.
///
/// # Safety
/// As for [`charge`].
#[inline(always)]
pub unsafe fn refund(tat: *mut u64, now_ns: u64, cost_ns: u64) {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: as in `charge`.
        let seen = unsafe { core::ptr::read_volatile(tat) };
        let next = refund_step(seen, now_ns, cost_ns);
        if next == seen {
            return;
        }
        // SAFETY: as above.
        let (_, swapped) =
            unsafe { atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(tat, seen, next) };
        if swapped {
            return;
        }
    }
}
