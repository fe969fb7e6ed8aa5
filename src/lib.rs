//! zbroker: a ZeroMQ pub/sub broker with server-side topic filtering.
//!
//! Publishers connect a PUSH socket to the broker's PULL endpoint;
//! subscribers connect a DEALER socket to its ROUTER endpoint, send
//! `SUB`/`UNSUB`/`PING` commands and receive only the messages their filters
//! match, each with a per-subscriber sequence number so that any message the
//! broker had to drop shows as a gap. The wire protocol is `docs/PROTOCOL.md`.
//!
//! The library is layered so each part can be tested alone:
//! - [`filter`]: the three filter kinds and their reference semantics;
//! - [`trie`]: the routing index over every subscriber's filters;
//! - [`protocol`]: protocol v1 frames, decoded without panics;
//! - [`subscribers`]: the per-subscriber records and queues;
//! - [`broker`]: the sans-IO core that decides what goes where;
//! - [`frame`]: zero-copy shared ZeroMQ message parts;
//! - [`server`]: the mio event loop around the core;
//! - [`client`]: Rust publisher and subscriber;
//! - [`auth`]: CURVE keys, the ZAP handler and topic ACLs;
//! - [`config`] and [`metrics`].

#![warn(missing_docs)]

pub mod auth;
pub mod broker;
pub mod client;
pub mod config;
pub mod filter;
pub mod frame;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod subscribers;
pub mod trie;

/// Compiles the README's examples as doc tests, so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
