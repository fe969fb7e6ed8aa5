//! The link protocol between brokers: versioned `bincode` messages.
//!
//! Every link message is one frame, a [`LinkMessage`] encoded with
//! `bincode`'s standard configuration (little-endian, variable-length
//! integers), except `FORWARD`, which is three frames: the encoded
//! [`LinkMessage::Forward`] header, then the topic and the payload as they
//! are, so the payload a broker forwards is the one its local fan-out
//! shares, never copied per peer.
//!
//! Decoding never panics and never allocates more than the frame it reads
//! could hold ([`MAX_LINK_FRAME`] bounds what it reads at all). The first
//! message on every link is [`LinkMessage::Hello`], which carries
//! [`LINK_PROTOCOL_VERSION`]; a broker refuses a peer speaking another
//! version rather than guessing. docs/CLUSTERING.md has the exchange.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bincode::{BorrowDecode, Encode};

use crate::filter::{Filter, FilterKind};

/// The link protocol version this broker speaks, sent in `HELLO`.
pub const LINK_PROTOCOL_VERSION: u16 = 1;

/// The largest link frame a broker decodes (a snapshot chunk is far
/// smaller: see [`SNAPSHOT_CHUNK_FILTERS`]).
pub const MAX_LINK_FRAME: usize = 8 << 20;

/// Filters per `INTEREST` snapshot chunk: a snapshot of a million filters
/// is a thousand frames, none of them large.
pub const SNAPSHOT_CHUNK_FILTERS: usize = 1024;

type WireConfig = Configuration<LittleEndian, Varint, Limit<MAX_LINK_FRAME>>;

const CONFIG: WireConfig = bincode::config::standard().with_limit::<MAX_LINK_FRAME>();

/// One message between two brokers. Borrowed from the frame it was decoded
/// from.
#[derive(Clone, Debug, PartialEq, Eq, Encode, BorrowDecode)]
pub enum LinkMessage<'a> {
    /// First on a link, from the connecting broker: who it is.
    Hello {
        /// [`LINK_PROTOCOL_VERSION`] of the sender.
        version: u16,
        /// The sender's broker id, unique in the cluster.
        broker_id: &'a str,
        /// Changes at every start of the sender: a new epoch means its
        /// state (interest, sequence numbers) starts over.
        epoch: u64,
    },
    /// One change to the sender's interest: `add` a filter some local
    /// subscriber now holds, or remove one none holds any more.
    Interest {
        /// The sender's interest version after this change; versions on a
        /// link follow each other by one.
        version: u64,
        /// Added (true) or removed.
        add: bool,
        /// The filter, as [`WireFilter`].
        filter: WireFilter<'a>,
    },
    /// One chunk of the sender's whole interest, replacing what the
    /// receiver held for it once the `last` chunk arrives.
    Snapshot {
        /// The interest version the snapshot was taken at.
        version: u64,
        /// Chunk number, from 0.
        part: u32,
        /// Whether this is the last chunk.
        last: bool,
        /// Up to [`SNAPSHOT_CHUNK_FILTERS`] filters.
        filters: Vec<WireFilter<'a>>,
    },
    /// A message published on the sender's broker that the receiver's
    /// interest matches; followed by the topic and payload frames.
    Forward {
        /// The sender's sequence number for the receiver: one more for
        /// every message routed to it, sent or dropped, so a jump is a
        /// loss.
        seq: u64,
    },
    /// Liveness, from the connecting broker, every ping interval, with
    /// the interest version the sender had sent when it pinged: the
    /// receiver, holding another, lost a change or a snapshot (a link
    /// delivers in order) and answers RESET.
    Ping {
        /// The sender's interest version.
        version: u64,
    },
    /// The answer to `PING`: who answers, and the last interest version it
    /// applied from the pinging broker.
    Pong {
        /// The answering broker's id.
        broker_id: &'a str,
        /// Its epoch.
        epoch: u64,
        /// The last interest version applied from the pinging broker.
        version: u64,
    },
    /// The receiver holds no (or no consistent) state for this link: send
    /// `HELLO` and a snapshot again.
    Reset {
        /// Why, for the log.
        reason: &'a str,
    },
    /// The link is refused for good (another protocol version, itself):
    /// stop using it.
    Refused {
        /// Why, for the log.
        reason: &'a str,
    },
}

/// A filter on the wire: its kind as a byte (0 exact, 1 prefix, 2 pattern)
/// and its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, BorrowDecode)]
pub struct WireFilter<'a> {
    /// 0, 1 or 2: [`FilterKind`] in wire order.
    pub kind: u8,
    /// The filter's bytes.
    pub text: &'a [u8],
}

impl<'a> WireFilter<'a> {
    /// The wire form of `filter`.
    pub fn of(filter: &'a Filter) -> WireFilter<'a> {
        let kind = match filter.kind() {
            FilterKind::Exact => 0,
            FilterKind::Prefix => 1,
            FilterKind::Pattern => 2,
        };
        WireFilter {
            kind,
            text: filter.text(),
        }
    }

    /// The filter it names, if it is one this broker accepts within
    /// `max_len` bytes.
    pub fn to_filter(self, max_len: usize) -> Option<Filter> {
        let kind = *FilterKind::ALL.get(usize::from(self.kind))?;
        Filter::new(kind, self.text, max_len).ok()
    }
}

impl LinkMessage<'_> {
    /// Appends the encoded message to `buf`.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        // Writing to a Vec cannot fail, and every message this broker
        // builds is far under the limit.
        let _ = bincode::encode_into_std_write(self, buf, CONFIG);
    }

    /// The encoded message.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.encode_into(&mut buf);
        buf
    }
}

/// Room enough for any FORWARD header: a variant byte and a varint.
pub const FORWARD_HEADER_MAX: usize = 16;

/// Writes the first frame of a FORWARD with `seq` into `buf`, on the stack
/// (this is on the forwarding path, which does not allocate); returns its
/// length. The topic and payload follow as frames of their own.
pub fn forward_header(seq: u64, buf: &mut [u8; FORWARD_HEADER_MAX]) -> usize {
    // 1 + at most 9 bytes: always fits.
    bincode::encode_into_slice(LinkMessage::Forward { seq }, buf, CONFIG).unwrap_or(0)
}

/// Why a link frame was not understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unreadable link message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one link frame; trailing bytes are an error, so every frame has
/// exactly one reading.
pub fn decode(frame: &[u8]) -> Result<LinkMessage<'_>, DecodeError> {
    if frame.len() > MAX_LINK_FRAME {
        return Err(DecodeError(format!(
            "{} bytes, over the limit of {MAX_LINK_FRAME}",
            frame.len()
        )));
    }
    match bincode::borrow_decode_from_slice::<LinkMessage<'_>, _>(frame, CONFIG) {
        Ok((message, read)) if read == frame.len() => Ok(message),
        Ok((_, read)) => Err(DecodeError(format!(
            "{} bytes after the message",
            frame.len() - read
        ))),
        Err(e) => Err(DecodeError(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written() {
        let filter = Filter::new(FilterKind::Pattern, b"net.*.port", 64).unwrap();
        let messages = [
            LinkMessage::Hello {
                version: LINK_PROTOCOL_VERSION,
                broker_id: "broker-a",
                epoch: u64::MAX,
            },
            LinkMessage::Interest {
                version: 7,
                add: true,
                filter: WireFilter::of(&filter),
            },
            LinkMessage::Snapshot {
                version: 9,
                part: 0,
                last: true,
                filters: vec![WireFilter::of(&filter); 3],
            },
            LinkMessage::Forward { seq: 1 << 40 },
            LinkMessage::Forward { seq: u64::MAX },
            LinkMessage::Ping { version: 5 },
            LinkMessage::Pong {
                broker_id: "b",
                epoch: 3,
                version: 0,
            },
            LinkMessage::Reset { reason: "why" },
            LinkMessage::Refused { reason: "no" },
        ];
        for message in messages {
            assert_eq!(decode(&message.encode()), Ok(message.clone()));
            if let LinkMessage::Forward { seq } = message {
                let mut header = [0; FORWARD_HEADER_MAX];
                let len = forward_header(seq, &mut header);
                assert_eq!(decode(&header[..len]), Ok(message));
            }
        }
        let read = WireFilter::of(&filter).to_filter(64);
        assert_eq!(read, Some(filter));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic_or_an_allocation() {
        assert!(decode(b"").is_err());
        assert!(decode(&[0xff; 64]).is_err());
        // A snapshot claiming 2^60 filters in a few bytes.
        let mut huge = vec![2u8, 9, 0, 1];
        huge.extend_from_slice(&[0xfe, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert!(decode(&huge).is_err());
        let mut trailing = LinkMessage::Ping { version: 0 }.encode();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        assert_eq!(
            WireFilter {
                kind: 3,
                text: b"x"
            }
            .to_filter(64),
            None
        );
        assert_eq!(WireFilter { kind: 0, text: b"" }.to_filter(64), None);
    }
}
