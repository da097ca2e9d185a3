//! Types and constants shared by the limiter XDP program (`limiter-ebpf`) and its agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of `bool`/enum/`Option` and of implicit
//! padding, because the same bytes are read by the kernel program and written by the agent
//! through the BPF map syscalls. Sizes are pinned with `const` assertions.
#![no_std]

pub mod bucket;
pub mod layout;
pub mod maps;
pub mod stats;
pub mod synproxy;

pub use bucket::{BucketParams, gcra, refund};
pub use maps::*;
pub use stats::*;
