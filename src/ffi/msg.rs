//! [`Msg`]: an owned `zmq_msg_t`, the one libzmq type the `zmq` crate's
//! `Message` does not let us share (it cannot reach `zmq_msg_copy`).

use std::ffi::{CStr, c_int};

use super::last_error;

/// One libzmq message part. Invariant, on which every `unsafe` block below
/// relies: `raw` is initialised (by `zmq_msg_init` or `zmq_msg_init_size`)
/// from construction until `Drop` closes it, and is never moved out.
///
/// `Send` and `Sync` come for free (`zmq_msg_t` is a byte array to Rust) and
/// are sound: libzmq documents messages, unlike sockets, as movable between
/// threads; shared content is reference counted atomically; and `&Msg` only
/// reaches functions that read.
pub(crate) struct Msg {
    raw: zmq_sys::zmq_msg_t,
}

// A `Server` holds frames and is moved onto the thread that runs it (tests
// and benches do): if a change to `Msg` loses either trait, fail the build
// here rather than there.
const _: fn() = || {
    fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Msg>();
};

impl Msg {
    /// An empty message, ready to receive into.
    #[inline]
    pub(crate) fn new() -> Msg {
        let mut raw = zmq_sys::zmq_msg_t::default();
        // SAFETY: `raw` is a writable zmq_msg_t; zmq_msg_init cannot fail.
        unsafe { zmq_sys::zmq_msg_init(&mut raw) };
        Msg { raw }
    }

    /// A message of `len` bytes, filled by `fill`. Up to 33 bytes are stored
    /// inline and never touch the heap; when libzmq cannot allocate, this
    /// aborts as the global allocator does.
    #[inline]
    pub(crate) fn with_size(len: usize, fill: impl FnOnce(&mut [u8])) -> Msg {
        let mut raw = zmq_sys::zmq_msg_t::default();
        // SAFETY: `raw` is a writable zmq_msg_t. On failure (only ENOMEM)
        // libzmq leaves it uninitialised, and we abort before using it.
        let rc = unsafe { zmq_sys::zmq_msg_init_size(&mut raw, len) };
        if rc != 0 {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::array::<u8>(len).unwrap_or(std::alloc::Layout::new::<u8>()),
            );
        }
        let mut msg = Msg { raw };
        if len > 0 {
            // SAFETY: the message was just sized to `len` bytes and is not
            // shared yet, so its data is `len` writable bytes that nothing
            // else aliases, valid while `msg` is borrowed mutably here.
            let data = unsafe {
                std::slice::from_raw_parts_mut(
                    zmq_sys::zmq_msg_data(&mut msg.raw).cast::<u8>(),
                    len,
                )
            };
            fill(data);
        }
        msg
    }

    /// The message's bytes, valid until it is next received into, sent or
    /// dropped (all of which need it back from the borrow).
    #[inline]
    pub(crate) fn bytes(&self) -> &[u8] {
        // The C signature of zmq_msg_data lacks `const`; it only reads.
        let ptr = (&self.raw as *const zmq_sys::zmq_msg_t).cast_mut();
        // SAFETY: `raw` is initialised (type invariant); zmq_msg_size reads
        // it.
        let len = unsafe { zmq_sys::zmq_msg_size(ptr) };
        if len == 0 {
            // An empty message's data pointer may be NULL, which a slice
            // must not be built from.
            return &[];
        }
        // SAFETY: `raw` is initialised and zmq_msg_data only reads it; the
        // `len` bytes it points to belong to the message (inline, or a
        // reference-counted buffer nobody writes once shared), which `self`
        // keeps alive and unchanged for the lifetime of the returned slice.
        unsafe { std::slice::from_raw_parts(zmq_sys::zmq_msg_data(ptr).cast::<u8>(), len) }
    }

    /// Another message with the same bytes: shared by reference count above
    /// 33 bytes, copied inline below. Never allocates.
    #[inline]
    pub(crate) fn share(&mut self) -> Msg {
        let mut copy = Msg::new();
        // SAFETY: both messages are initialised (type invariant);
        // zmq_msg_copy only fails with EFAULT on invalid ones, so the
        // ignored return code is always 0.
        unsafe { zmq_sys::zmq_msg_copy(&mut copy.raw, &mut self.raw) };
        copy
    }

    /// Moves the content into a new message, leaving this one empty (and
    /// still initialised); no reference count is touched.
    #[inline]
    pub(crate) fn take(&mut self) -> Msg {
        let mut moved = Msg::new();
        // SAFETY: both messages are initialised; zmq_msg_move closes
        // `moved`'s empty content, moves `self`'s in and re-initialises
        // `self` as empty, so both stay initialised.
        unsafe { zmq_sys::zmq_msg_move(&mut moved.raw, &mut self.raw) };
        moved
    }

    /// Whether more parts of the same message follow this received part.
    #[inline]
    pub(crate) fn more(&self) -> bool {
        // SAFETY: reads a flag of an initialised message.
        unsafe { zmq_sys::zmq_msg_more(&self.raw) != 0 }
    }

    /// A metadata property of a received message (`zmq_msg_gets`), such as
    /// `User-Id`; `None` when the connection did not set it.
    #[inline]
    pub(crate) fn property(&self, name: &CStr) -> Option<&CStr> {
        // SAFETY: `raw` is initialised and `name` is NUL-terminated;
        // zmq_msg_gets only reads them, returning NULL or a string owned
        // by the message's metadata.
        let value = unsafe { zmq_sys::zmq_msg_gets(&self.raw, name.as_ptr()) };
        if value.is_null() {
            return None;
        }
        // SAFETY: a non-NULL result is a NUL-terminated string held by the
        // message's reference-counted metadata, which lives until the
        // message is closed or replaced: both need `&mut self`, so not
        // while the returned borrow lasts.
        Some(unsafe { CStr::from_ptr(value) })
    }

    /// Receives the next part from `socket`, replacing this message's
    /// content. With `zmq::DONTWAIT`, `Err(EAGAIN)` means nothing waits.
    #[inline]
    pub(crate) fn recv(&mut self, socket: &mut zmq::Socket, flags: i32) -> zmq::Result<()> {
        // SAFETY: the socket handle is open and exclusively ours for the
        // borrow (see the module docs); the message is initialised, and
        // libzmq closes its old content before filling it, leaving it
        // initialised whether or not the call succeeds.
        let rc =
            unsafe { zmq_sys::zmq_msg_recv(&mut self.raw, socket.as_mut_ptr(), flags as c_int) };
        if rc < 0 { Err(last_error()) } else { Ok(()) }
    }

    /// Sends this part on `socket`. On success libzmq owns the content; on
    /// failure (`EAGAIN`, `EHOSTUNREACH`, ...) the message is closed here.
    #[inline]
    pub(crate) fn send(mut self, socket: &mut zmq::Socket, flags: i32) -> zmq::Result<()> {
        // SAFETY: as in `recv`: an open socket used by one thread, and an
        // initialised message.
        let rc =
            unsafe { zmq_sys::zmq_msg_send(&mut self.raw, socket.as_mut_ptr(), flags as c_int) };
        if rc < 0 {
            return Err(last_error());
        }
        // libzmq took the content and left the message empty; zmq_msg_close
        // "is NOT necessary after a successful zmq_msg_send()" (its man
        // page), and skipping it saves an FFI call per part sent.
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Msg {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: `raw` is initialised for the whole life of a Msg, and is
        // not used again after this.
        unsafe { zmq_sys::zmq_msg_close(&mut self.raw) };
    }
}
