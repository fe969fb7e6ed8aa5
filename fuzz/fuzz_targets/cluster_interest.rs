#![no_main]
//! `cluster_interest`: two brokers linked in memory, driven by the input as
//! a script (subscribes and unsubscribes on broker A, SUB notices on its
//! XPUB front, link frames delivered, dropped or lost to a reconnect, the
//! peer restarting, time passing), checked against a model of A's interest:
//! the reference counts after every operation, and, once the link settles,
//! the interest the peer holds for A and the forwarding it routes with.
//! The script format and every check are in `zbroker_core::cluster::sim`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = zbroker_core::cluster::sim::run(data) {
        panic!("{e}");
    }
});
