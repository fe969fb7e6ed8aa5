//! `zmq_curve_public`, which zmq-sys 0.12 does not bind (it is libzmq
//! >= 4.2.1, and in the libzmq this crate links).

use std::ffi::{CStr, c_char, c_int};

use super::last_error;

/// The length of a Z85-encoded CURVE key (32 bytes, 5 characters per 4).
const Z85_KEY_LEN: usize = 40;

unsafe extern "C" {
    fn zmq_curve_public(z85_public_key: *mut c_char, z85_secret_key: *const c_char) -> c_int;
}

/// Derives the Z85 public key of a Z85 secret key. A secret that is not 40
/// characters fails with `EINVAL` before libzmq sees it: libzmq decodes a
/// key of any multiple of 5 characters into a 32-byte buffer, so a longer
/// one would overflow it. libzmq refuses other malformed keys with `EINVAL`
/// too, and a build without CURVE with `ENOTSUP`.
pub(crate) fn curve_public(secret: &CStr) -> zmq::Result<String> {
    if secret.to_bytes().len() != Z85_KEY_LEN {
        return Err(zmq::Error::EINVAL);
    }
    let mut public = [0u8; Z85_KEY_LEN + 1];
    // SAFETY: `secret` is NUL-terminated and exactly 40 characters (checked
    // above), so libzmq decodes at most the 32 bytes its buffer holds; it
    // writes 40 Z85 characters and a NUL into `public`, which has room for
    // 41.
    let rc = unsafe { zmq_curve_public(public.as_mut_ptr().cast(), secret.as_ptr()) };
    if rc != 0 {
        return Err(last_error());
    }
    Ok(String::from_utf8_lossy(&public[..Z85_KEY_LEN]).into_owned())
}
