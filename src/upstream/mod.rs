//! Everything that talks to the CPH endpoint: the pooled client and (in aksk mode) the signer.

pub mod client;
pub mod sign;

pub use client::{Upstream, UpstreamError};
