//! Present only so `limiter-agent` can name this crate as a build dependency (which makes
//! cargo rebuild the agent when the program changes); the program itself is `src/main.rs`.
#![no_std]
