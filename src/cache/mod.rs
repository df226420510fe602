//! The cache: keys, stored entries, the moka store and single flight.

pub mod entry;
pub mod flight;
pub mod key;
pub mod outcome;
pub mod store;
