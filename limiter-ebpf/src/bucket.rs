//! Lock-free updates of a shared GCRA bucket.
//!
//! Concurrency scheme: the whole bucket is one `u64` (the theoretical arrival time), updated
//! with compare-and-swap. A CPU reads the TAT, runs the pure [`gcra`] step, and publishes the
//! new TAT only if nobody changed it meanwhile; otherwise it retries with the fresh value.
//! Because every admitted charge is a successful CAS from the exact state it was computed
//! from, concurrent CPUs serialise perfectly: the admitted total never exceeds
//! `rate * time + capacity`, with no error term from concurrency.
//!
//! A failed compare-and-swap returns the value that beat it, and the next attempt computes
//! from that value rather than from the stale one: a loss to a refund (which only adds
//! credit) or to another CPU's charge is retried on the bucket as it now is, and a bucket
//! that has run out refuses on that fresh state (`Refused`, not contention). Only a CPU that
//! loses [`CAS_ATTEMPTS`] races in a row gives up and refuses the packet (counted as
//! `bucket_contended`): by then other CPUs updated the bucket that many times while this one
//! tried, and under contention we under-admit rather than over-admit. (Counting only losses
//! to charges, with a larger bound for losses to refunds, is what we would prefer, but the
//! extra counter multiplies the states the verifier walks past its one-million-instruction
//! budget; six attempts are what it accepts.)
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

/// Compare-and-swap attempts before a contended update gives up.
pub const CAS_ATTEMPTS: u32 = 6;

pub enum Charge {
    Admitted,
    Refused,
    Contended,
}

/// The bucket's TAT. A plain aligned 8-byte load cannot tear on the 64-bit machines the BPF
/// JIT runs on, and LLVM's BPF backend cannot select an atomic load before cpu v4; the CAS
/// is what makes an update safe.
///
/// # Safety
/// `tat` must point to a live bucket value in a BPF map (8-byte aligned by the map).
#[inline(always)]
unsafe fn load(tat: *mut u64) -> u64 {
    // SAFETY: as the caller guarantees.
    unsafe { core::ptr::read_volatile(tat) }
}

/// Swaps `seen` for `next`; returns the value found (equal to `seen` on success).
///
/// # Safety
/// As for [`load`].
#[inline(always)]
unsafe fn swap(tat: *mut u64, seen: u64, next: u64) -> (u64, bool) {
    // SAFETY: as the caller guarantees.
    unsafe { atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(tat, seen, next) }
}

/// Charges `cost_ns` to the bucket at `tat`.
///
/// # Safety
/// `tat` must point to a live bucket value in a BPF map.
#[inline(always)]
pub unsafe fn charge(tat: *mut u64, now_ns: u64, cost_ns: u64, burst_ns: u64) -> Charge {
    // SAFETY: the caller guarantees `tat` is a map value.
    let mut seen = unsafe { load(tat) };
    for _ in 0..CAS_ATTEMPTS {
        let Some(next) = gcra(seen, now_ns, cost_ns, burst_ns) else {
            return Charge::Refused;
        };
        // SAFETY: as above.
        let (found, swapped) = unsafe { swap(tat, seen, next) };
        if swapped {
            return Charge::Admitted;
        }
        seen = found;
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
    // SAFETY: as in `charge`.
    let mut seen = unsafe { load(tat) };
    for _ in 0..CAS_ATTEMPTS {
        let next = refund_step(seen, now_ns, cost_ns);
        if next == seen {
            return;
        }
        // SAFETY: as above.
        let (found, swapped) = unsafe { swap(tat, seen, next) };
        if swapped {
            return;
        }
        seen = found;
    }
}
