//! Every call into libzmq's C API that the `zmq` crate does not make for us,
//! behind safe functions: the only module of this crate allowed to use
//! `unsafe` (the crate root denies it everywhere else).
//!
//! The contract, for every item here: whatever a caller passes, a wrapper
//! either makes a call libzmq documents as valid or returns an error; it
//! never hands out a pointer, and any borrow it returns lives no longer
//! than the value libzmq keeps its memory in. The rest of the crate can
//! then be checked by the compiler alone.
//!
//! Each `unsafe` block carries a `SAFETY:` comment saying which of libzmq's
//! documented guarantees makes it sound (clippy's
//! `undocumented_unsafe_blocks` enforces that the comment exists).
//! Sockets are borrowed as `&mut zmq::Socket`: the `zmq` crate keeps the
//! handle open for as long as the value lives, and the exclusive borrow
//! rules out two threads using one socket, which libzmq forbids.

mod curve;
mod msg;
mod sockopt;

pub(crate) use curve::curve_public;
pub(crate) use msg::Msg;
#[cfg(test)]
pub(crate) use sockopt::get_int_option;
pub(crate) use sockopt::{get_i64_option, set_i64_option, set_int_option};

/// The error of the libzmq call that just failed on this thread.
fn last_error() -> zmq::Error {
    // SAFETY: zmq_errno takes no arguments and only reads the calling
    // thread's errno.
    zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() })
}
