//! zbroker: a ZeroMQ pub/sub broker with server-side topic filtering.
//!
//! Publishers connect a PUSH socket to the broker's PULL endpoint;
//! subscribers connect a DEALER socket to its ROUTER endpoint, send
//! `SUB`/`UNSUB`/`PING` commands and receive only the messages their filters
//! match, each with a per-subscriber sequence number so that any message the
//! broker had to drop shows as a gap. The wire protocol is `docs/PROTOCOL.md`.
//!
//! Everything the broker decides lives in the sans-IO [`zbroker_core`]
//! crate (filters, routing index, protocol, subscriber table, broker state
//! machine, ACLs, counters), re-exported here under the same names; this
//! crate moves bytes:
//! - [`frame`]: zero-copy shared ZeroMQ message parts;
//! - [`server`]: the mio event loop around the core;
//! - [`client`]: Rust publisher and subscriber;
//! - [`auth`]: CURVE keys, the ZAP handler and topic ACLs;
//! - [`config`] and [`metrics`].
//!
//! Every call into libzmq's C API that the `zmq` crate does not make goes
//! through one private module, `ffi`, of safe wrappers with documented
//! contracts; the lints below keep the rest of the crate free of raw FFI.

#![warn(missing_docs)]
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod auth;
pub mod client;
pub mod config;
#[allow(unsafe_code)]
mod ffi;
pub mod frame;
pub mod membership;
pub mod metrics;
pub mod server;

pub use zbroker_core::{broker, filter, index, protocol, subscribers};

/// Compiles the README's examples as doc tests, so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
