//! [`Frame`]: one ZeroMQ message part that can be shared between many sends
//! without copying its bytes.
//!
//! The `zmq` crate's `Message` cannot be shared: it has no way to reach
//! `zmq_msg_copy`. Fan-out to N subscribers with a copied payload costs N
//! copies of the payload in memory while they wait in queues (the classic
//! Redis pub/sub complaint); with `zmq_msg_copy` libzmq shares any part
//! longer than 33 bytes by reference count, and parts of up to 33 bytes live
//! inline in the 64-byte message object, so neither case allocates.

use std::os::raw::c_int;

/// One ZeroMQ message part, owned; dropped with `zmq_msg_close`.
pub struct Frame {
    msg: zmq_sys::zmq_msg_t,
}

// SAFETY: a zmq_msg_t is plain data owned by this value; shared content is
// reference counted atomically by libzmq, so moving a Frame to another thread
// is sound (libzmq documents messages, unlike sockets, as movable).
unsafe impl Send for Frame {}

pub(crate) fn last_error() -> zmq::Error {
    // SAFETY: zmq_errno only reads the calling thread's errno.
    zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() })
}

impl Frame {
    /// An empty part, ready to receive into.
    pub fn new() -> Frame {
        let mut msg = zmq_sys::zmq_msg_t::default();
        // SAFETY: msg is a valid, writable zmq_msg_t; zmq_msg_init cannot fail.
        unsafe { zmq_sys::zmq_msg_init(&mut msg) };
        Frame { msg }
    }

    /// A part of `len` bytes, filled by `fill`. Parts of up to 33 bytes are
    /// stored inline and never touch the heap.
    fn filled(len: usize, fill: impl FnOnce(&mut [u8])) -> Frame {
        let mut msg = zmq_sys::zmq_msg_t::default();
        // SAFETY: msg is a valid zmq_msg_t; on failure (out of memory) libzmq
        // leaves it uninitialised, so we abort like the global allocator does.
        let rc = unsafe { zmq_sys::zmq_msg_init_size(&mut msg, len) };
        if rc != 0 {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::array::<u8>(len).unwrap_or(std::alloc::Layout::new::<u8>()),
            );
        }
        let mut frame = Frame { msg };
        if len > 0 {
            // SAFETY: the message was just sized to `len` bytes and is not
            // shared, so its data is `len` writable bytes owned by `frame`.
            let data = unsafe {
                std::slice::from_raw_parts_mut(
                    zmq_sys::zmq_msg_data(&mut frame.msg) as *mut u8,
                    len,
                )
            };
            fill(data);
        }
        frame
    }

    /// A part holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Frame {
        Frame::filled(bytes.len(), |buf| buf.copy_from_slice(bytes))
    }

    /// A delivery header (`MSG`, `seq`, `topic`), written in place.
    pub fn header(seq: u64, topic: &[u8]) -> Frame {
        Frame::filled(crate::protocol::header_len(topic.len()), |buf| {
            crate::protocol::write_header(buf, seq, topic);
        })
    }

    /// The part's bytes.
    pub fn bytes(&self) -> &[u8] {
        let ptr = &self.msg as *const _ as *mut zmq_sys::zmq_msg_t;
        // SAFETY: zmq_msg_data and zmq_msg_size only read the message (the
        // C signature lacks const); the data lives as long as `self`.
        unsafe {
            let data = zmq_sys::zmq_msg_data(ptr) as *const u8;
            let len = zmq_sys::zmq_msg_size(ptr);
            if len == 0 {
                return &[];
            }
            std::slice::from_raw_parts(data, len)
        }
    }

    /// Another handle on the same bytes: shared by reference count above 33
    /// bytes, copied inline below. Never allocates.
    pub fn share(&mut self) -> Frame {
        let mut copy = Frame::new();
        // SAFETY: both are valid initialised messages; zmq_msg_copy only
        // fails with EFAULT on invalid messages, which these are not.
        unsafe { zmq_sys::zmq_msg_copy(&mut copy.msg, &mut self.msg) };
        copy
    }

    /// Moves the part into a new frame, leaving this one empty; no
    /// reference count is touched.
    pub fn take(&mut self) -> Frame {
        let mut moved = Frame::new();
        // SAFETY: both are initialised messages; zmq_msg_move closes
        // `moved`'s empty content and leaves `self` empty.
        unsafe { zmq_sys::zmq_msg_move(&mut moved.msg, &mut self.msg) };
        moved
    }

    /// Whether more parts of the same message follow this received part.
    pub fn more(&self) -> bool {
        // SAFETY: reads a flag of a valid message.
        unsafe { zmq_sys::zmq_msg_more(&self.msg) != 0 }
    }

    /// The authenticated user of the connection this part arrived on: with
    /// CURVE, the Z85 public key our ZAP handler admitted. `None` without
    /// authentication.
    pub fn user_id(&self) -> Option<&str> {
        let property = c"User-Id";
        let ptr = &self.msg as *const _ as *mut zmq_sys::zmq_msg_t;
        // SAFETY: zmq_msg_gets reads the metadata of a received message and
        // returns a NUL-terminated string owned by the message, or NULL.
        let value = unsafe { zmq_sys::zmq_msg_gets(ptr, property.as_ptr()) };
        if value.is_null() {
            return None;
        }
        // SAFETY: non-NULL results are valid C strings while `self` lives.
        let value = unsafe { std::ffi::CStr::from_ptr(value) };
        let value = value.to_str().ok()?;
        (!value.is_empty()).then_some(value)
    }

    /// Receives the next part from `socket` into this frame, replacing what
    /// it held. With `zmq::DONTWAIT`, `Err(EAGAIN)` means nothing is waiting.
    pub fn recv(&mut self, socket: &mut zmq::Socket, flags: i32) -> zmq::Result<()> {
        // SAFETY: the socket pointer is valid for the borrow; libzmq closes the
        // old content of `msg` before filling it.
        let rc =
            unsafe { zmq_sys::zmq_msg_recv(&mut self.msg, socket.as_mut_ptr(), flags as c_int) };
        if rc < 0 { Err(last_error()) } else { Ok(()) }
    }

    /// Sends this part. On success libzmq owns the bytes; on failure (e.g.
    /// `EAGAIN`, `EHOSTUNREACH`) the frame is dropped and the error returned.
    pub fn send(mut self, socket: &mut zmq::Socket, flags: i32) -> zmq::Result<()> {
        // SAFETY: valid message and socket.
        let rc =
            unsafe { zmq_sys::zmq_msg_send(&mut self.msg, socket.as_mut_ptr(), flags as c_int) };
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

/// The core shares published parts with every subscriber they go to; a
/// [`Frame`] shares its libzmq buffer (`zmq_msg_copy`), never the bytes.
impl zbroker_core::broker::Payload for Frame {
    fn bytes(&self) -> &[u8] {
        Frame::bytes(self)
    }
    fn share(&mut self) -> Self {
        Frame::share(self)
    }
    fn take(&mut self) -> Self {
        Frame::take(self)
    }
}

impl Default for Frame {
    fn default() -> Self {
        Frame::new()
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        // SAFETY: msg is initialised for the whole life of a Frame.
        unsafe { zmq_sys::zmq_msg_close(&mut self.msg) };
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({} bytes)", self.bytes().len())
    }
}

/// The event number of a message from a libzmq socket monitor: the first
/// frame starts with it as a little-endian u16 (`zmq_socket_monitor`).
pub fn monitor_event(frames: &[Vec<u8>]) -> Option<u16> {
    let first = frames.first()?;
    Some(u16::from_le_bytes([*first.first()?, *first.get(1)?]))
}

/// The 32-bit value of a libzmq monitor event (an errno, a descriptor, a
/// reason code), from the same first frame.
pub fn monitor_event_value(frames: &[Vec<u8>]) -> Option<u32> {
    let value = frames.first()?.get(2..6)?;
    Some(u32::from_le_bytes([value[0], value[1], value[2], value[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_frames_see_the_same_bytes() {
        for len in [0usize, 5, 33, 34, 4096] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut a = Frame::from_slice(&data);
            let b = a.share();
            drop(a);
            assert_eq!(b.bytes(), &data[..]);
        }
    }

    #[test]
    fn header_frame() {
        let f = Frame::header(3, b"topic");
        assert_eq!(
            crate::protocol::parse_header(f.bytes()),
            Some((3, &b"topic"[..]))
        );
    }

    #[test]
    fn send_and_recv_over_inproc() {
        let ctx = zmq::Context::new();
        let mut tx = ctx.socket(zmq::PAIR).unwrap();
        let mut rx = ctx.socket(zmq::PAIR).unwrap();
        rx.bind("inproc://frame-test").unwrap();
        tx.connect("inproc://frame-test").unwrap();
        let mut payload = Frame::from_slice(&[7u8; 100]);
        Frame::from_slice(b"a").send(&mut tx, zmq::SNDMORE).unwrap();
        payload.share().send(&mut tx, 0).unwrap();
        let mut got = Frame::new();
        got.recv(&mut rx, 0).unwrap();
        assert!(got.more());
        assert_eq!(got.bytes(), b"a");
        got.recv(&mut rx, 0).unwrap();
        assert!(!got.more());
        assert_eq!(got.bytes(), payload.bytes());
        assert_eq!(got.recv(&mut rx, zmq::DONTWAIT), Err(zmq::Error::EAGAIN));
    }
}
