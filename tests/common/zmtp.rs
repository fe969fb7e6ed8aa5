//! Raw ZMTP 3.0 over TCP, for clients libzmq will not be: ones that stop
//! reading for as long as they like, send what libzmq would refuse to, or
//! fail a handshake on purpose. Just enough of the NULL mechanism.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A ZMTP 3.0 greeting offering `mechanism`, as a client.
pub fn greeting(mechanism: &[u8]) -> Vec<u8> {
    let mut greeting = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 0];
    greeting.extend_from_slice(mechanism);
    greeting.resize(12 + 20, 0); // the mechanism, zero-padded
    greeting.push(0); // as-server
    greeting.resize(64, 0); // filler
    greeting
}

/// The NULL mechanism's READY command announcing `socket_type`.
pub fn ready(socket_type: &[u8]) -> Vec<u8> {
    let mut body = vec![5];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type);
    let mut command = vec![0x04, body.len() as u8];
    command.extend_from_slice(&body);
    command
}

/// A raw client of `socket_type` (NULL mechanism) connected to `address`,
/// after the handshake; reads and writes time out after 10 s.
pub fn connect(address: SocketAddr, socket_type: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(address).expect("connect a raw ZMTP client");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hello = greeting(b"NULL");
    hello.extend_from_slice(&ready(socket_type));
    stream.write_all(&hello).expect("send the ZMTP greeting");
    // Messages must wait for the broker's READY: libzmq takes a message
    // arriving before it has sent its own READY for a bad handshake command.
    let mut greeting = [0u8; 64];
    let mut header = [0u8; 2];
    stream
        .read_exact(&mut greeting)
        .expect("the broker's greeting");
    stream.read_exact(&mut header).expect("the broker's READY");
    let mut ready = vec![0u8; usize::from(header[1])];
    stream.read_exact(&mut ready).expect("the broker's READY");
    assert!(
        header[0] == 0x04 && ready.starts_with(b"\x05READY"),
        "not a READY command: {header:?} {ready:?}"
    );
    stream
}

/// A raw DEALER: libzmq is not involved on this side, so it can stop
/// reading for as long as it likes without tripping libzmq's own
/// assertions.
pub fn dealer(address: SocketAddr) -> TcpStream {
    connect(address, b"DEALER")
}

/// `frames` as one message.
pub fn message(frames: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        let more = u8::from(i + 1 < frames.len());
        match u8::try_from(frame.len()) {
            Ok(len) => out.extend_from_slice(&[more, len]),
            Err(_) => {
                out.push(more | 0x02);
                out.extend_from_slice(&(frame.len() as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(frame);
    }
    out
}

/// `count` single-part `[PING]` messages.
pub fn pings(count: usize) -> Vec<u8> {
    message(&[b"PING"]).repeat(count)
}

/// Reads one message, skipping commands (heartbeats).
pub fn read_message(stream: &mut TcpStream) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for _ in 0..1000 {
        let mut flags = [0u8; 1];
        stream.read_exact(&mut flags).expect("a ZMTP frame");
        let len = if flags[0] & 0x02 != 0 {
            let mut len = [0u8; 8];
            stream.read_exact(&mut len).expect("a ZMTP frame");
            u64::from_be_bytes(len) as usize
        } else {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len).expect("a ZMTP frame");
            usize::from(len[0])
        };
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).expect("a ZMTP frame");
        if flags[0] & 0x04 != 0 {
            continue;
        }
        frames.push(body);
        if flags[0] & 0x01 == 0 {
            return frames;
        }
    }
    panic!("no whole message among 1000 frames");
}
