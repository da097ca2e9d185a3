//! Lock-free updates of a shared GCRA bucket.
//!
//! Concurrency scheme: the whole bucket is one `u64` (the theoretical arrival time), updated
//! with compare-and-swap. A CPU reads the TAT, runs the pure [`gcra`] step, and publishes the
//! new TAT only if nobody changed it meanwhile; otherwise it retries with the fresh value.
//! Because every admitted charge is a successful CAS from the exact state it was computed
//! from, concurrent CPUs serialise perfectly: the admitted total never exceeds
//! `rate * time + capacity`, with no error term from concurrency.
//!
//! A failed compare-and-swap returns the value that beat it, and the next attempt starts from
//! that value rather than re-reading. Only a loss to another CPU's *charge* (the TAT moved
//! forward) counts towards [`CAS_CHARGE_LOSSES`]; a loss to a refund (the TAT moved back) is
//! retried on the fresher state without counting, since a refund only adds credit. A CPU
//! that loses [`CAS_CHARGE_LOSSES`] races to other CPUs' charges, or runs out of the
//! [`CAS_ATTEMPTS`] the verifier needs as a bound, refuses the packet (counted as
//! `bucket_contended`): by then other CPUs admitted that many packets while this one tried,
//! so the bucket is being drained, and under contention we under-admit rather than over-admit.
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

/// Compare-and-swap attempts in all, for the verifier's bound.
pub const CAS_ATTEMPTS: u32 = 4;
/// Races lost to other CPUs' charges before a charge gives up.
pub const CAS_CHARGE_LOSSES: u32 = 4;

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
