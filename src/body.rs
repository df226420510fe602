//! The one body type that flows through the proxy in both directions.
//!
//! Cached and generated responses are a `Full<Bytes>` (a clone of the stored `Bytes`, no copy);
//! passthrough streams hyper's `Incoming` unchanged. `Either` keeps that without boxing.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

pub type Body = Either<Full<Bytes>, Incoming>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

pub fn empty() -> Body {
    Either::Left(Full::new(Bytes::new()))
}

pub fn streaming(incoming: Incoming) -> Body {
    Either::Right(incoming)
}
