//! zbroker-core: everything the zbroker broker decides, with no IO.
//!
//! The broker's event loop (the `zbroker` crate) reads frames from libzmq
//! sockets and hands them to a [`broker::Broker`]; the broker decides which
//! subscribers get what, with which sequence numbers, what to queue, drop or
//! refuse, and calls back a [`broker::Transport`] to send. Nothing in this
//! crate opens a socket, a file or a thread, so the fuzz targets and benches
//! drive the real forwarding path directly, and the same core can sit behind
//! another front (as `quinn-proto` sits behind `quinn`).
//!
//! - [`filter`]: the three filter kinds and their reference semantics;
//! - [`index`]: the routing index over every subscriber's filters;
//! - [`protocol`]: protocol v1 frames, decoded without panics;
//! - [`subscribers`]: the per-subscriber records and queues;
//! - [`broker`]: the state machine that decides what goes where;
//! - [`cluster`]: peer links, interest propagation, the link protocol;
//! - [`acl`]: which CURVE key may publish or subscribe to what;
//! - [`config`]: limits, queue policy, timeouts;
//! - [`counters`]: what the broker counts about itself.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod acl;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod counters;
pub mod filter;
pub mod index;
pub mod protocol;
pub mod subscribers;
