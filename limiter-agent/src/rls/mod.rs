//! The Envoy rate limit service (`envoy.service.ratelimit.v3.RateLimitService`). (Being written.)

pub mod redis;
