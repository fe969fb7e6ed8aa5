//! Integer socket options the `zmq` crate has no setter or getter for:
//! libzmq's DRAFT options and the ones zbroker's own libzmq build adds.

use std::ffi::c_int;

use super::last_error;

/// Sets an `int` socket option.
pub(crate) fn set_int_option(
    socket: &mut zmq::Socket,
    option: c_int,
    value: c_int,
) -> zmq::Result<()> {
    set_option(socket, option, value)
}

/// Sets an `int64_t` socket option.
pub(crate) fn set_i64_option(
    socket: &mut zmq::Socket,
    option: c_int,
    value: i64,
) -> zmq::Result<()> {
    set_option(socket, option, value)
}

/// Reads an `int` socket option (only tests need to, so far).
#[cfg(test)]
pub(crate) fn get_int_option(socket: &mut zmq::Socket, option: c_int) -> zmq::Result<c_int> {
    get_option(socket, option)
}

/// Reads an `int64_t` socket option.
pub(crate) fn get_i64_option(socket: &mut zmq::Socket, option: c_int) -> zmq::Result<i64> {
    get_option(socket, option)
}

/// The option value types: plain integers, for which every bit pattern
/// libzmq may write is a valid value. Private, so no other type can be
/// passed to [`get_option`].
trait Integer: Copy + Default {}
impl Integer for c_int {}
impl Integer for i64 {}

/// `zmq_setsockopt` with an integer of the option's own width. An option
/// of another width or kind fails with `EINVAL`: libzmq checks the length.
fn set_option<T: Integer>(socket: &mut zmq::Socket, option: c_int, value: T) -> zmq::Result<()> {
    // SAFETY: the socket handle is open and exclusively ours for the borrow
    // (see the module docs); libzmq reads at most `size_of::<T>()` bytes
    // from `value`, which is that long and outlives the call.
    let rc = unsafe {
        zmq_sys::zmq_setsockopt(
            socket.as_mut_ptr(),
            option,
            (&value as *const T).cast(),
            std::mem::size_of::<T>(),
        )
    };
    if rc == 0 { Ok(()) } else { Err(last_error()) }
}

/// `zmq_getsockopt` into an integer of the option's own width.
fn get_option<T: Integer>(socket: &mut zmq::Socket, option: c_int) -> zmq::Result<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: as in `set_option` for the socket; libzmq writes at most `len`
    // bytes into `value`, which is that long, and any bytes make a valid
    // `T` (see [`Integer`]); it writes the length it used into `len`.
    let rc = unsafe {
        zmq_sys::zmq_getsockopt(
            socket.as_mut_ptr(),
            option,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(last_error())
    }
}
