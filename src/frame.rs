//! [`Frame`]: one ZeroMQ message part that can be shared between many sends
//! without copying its bytes.
//!
//! The `zmq` crate's `Message` cannot be shared: it has no way to reach
//! `zmq_msg_copy`. Fan-out to N subscribers with a copied payload costs N
//! copies of the payload in memory while they wait in queues (the classic
//! Redis pub/sub complaint); with `zmq_msg_copy` libzmq shares any part
//! longer than 33 bytes by reference count, and parts of up to 33 bytes live
//! inline in the 64-byte message object, so neither case allocates.

use crate::ffi::Msg;

/// One ZeroMQ message part, owned; closed when dropped.
///
/// The libzmq message itself, and every call on it, is `ffi::Msg`; this
/// type adds what the broker means by a part (delivery headers, the
/// authenticated sender, sharing with the core) in safe code.
pub struct Frame(Msg);

impl Frame {
    /// An empty part, ready to receive into.
    pub fn new() -> Frame {
        Frame(Msg::new())
    }

    /// A part holding a copy of `bytes`. Parts of up to 33 bytes are stored
    /// inline and never touch the heap.
    pub fn from_slice(bytes: &[u8]) -> Frame {
        Frame(Msg::with_size(bytes.len(), |buf| {
            buf.copy_from_slice(bytes)
        }))
    }

    /// A delivery header (`MSG`, `seq`, `topic`), written in place.
    pub fn header(seq: u64, topic: &[u8]) -> Frame {
        let len = crate::protocol::header_len(topic.len());
        Frame(Msg::with_size(len, |buf| {
            crate::protocol::write_header(buf, seq, topic);
        }))
    }

    /// The part's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }

    /// Another handle on the same bytes: shared by reference count above 33
    /// bytes, copied inline below. Never allocates.
    pub fn share(&mut self) -> Frame {
        Frame(self.0.share())
    }

    /// Moves the part into a new frame, leaving this one empty; no
    /// reference count is touched.
    pub fn take(&mut self) -> Frame {
        Frame(self.0.take())
    }

    /// Whether more parts of the same message follow this received part.
    pub fn more(&self) -> bool {
        self.0.more()
    }

    /// The authenticated user of the connection this part arrived on: with
    /// CURVE, the Z85 public key our ZAP handler admitted. `None` without
    /// authentication.
    pub fn user_id(&self) -> Option<&str> {
        let value = self.0.property(c"User-Id")?.to_str().ok()?;
        (!value.is_empty()).then_some(value)
    }

    /// Receives the next part from `socket` into this frame, replacing what
    /// it held. With `zmq::DONTWAIT`, `Err(EAGAIN)` means nothing is waiting.
    pub fn recv(&mut self, socket: &mut zmq::Socket, flags: i32) -> zmq::Result<()> {
        self.0.recv(socket, flags)
    }

    /// Sends this part. On success libzmq owns the bytes; on failure (e.g.
    /// `EAGAIN`, `EHOSTUNREACH`) the frame is dropped and the error returned.
    pub fn send(self, socket: &mut zmq::Socket, flags: i32) -> zmq::Result<()> {
        self.0.send(socket, flags)
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
