//! The L7 engine: decides HTTP requests and Envoy descriptor lists against the compiled
//! [`crate::plan::L7Plan`]. (Being written.)
