//! Protocol v1: the frames publishers, subscribers and the broker exchange.
//!
//! Every message is a ZeroMQ multipart message; words are ASCII. The full
//! contract, with a client written in Python, is `docs/PROTOCOL.md`. This
//! module is the only place that knows the byte layout: decoders return typed
//! errors and never panic on any input.
//!
//! ```
//! use zbroker_core::protocol::{self, Command};
//! let cmd = protocol::parse_command(&[b"SUB", b"prefix", b"net."], 1024).unwrap();
//! assert!(matches!(cmd, Command::Subscribe(f) if f.text() == b"net."));
//!
//! let mut header = [0u8; 64];
//! let n = protocol::write_header(&mut header, 7, b"net.a");
//! assert_eq!(protocol::parse_header(&header[..n]), Some((7, &b"net.a"[..])));
//! ```

use std::fmt;

use crate::filter::{Filter, FilterError, FilterKind};

/// Subscriber → broker: add a filter.
pub const SUB: &[u8] = b"SUB";
/// Subscriber → broker: remove a filter.
pub const UNSUB: &[u8] = b"UNSUB";
/// Subscriber → broker: keep-alive; answered with [`PONG`].
pub const PING: &[u8] = b"PING";
/// Broker → subscriber: answer to [`PING`].
pub const PONG: &[u8] = b"PONG";
/// Broker → subscriber: a command took effect.
pub const OK: &[u8] = b"OK";
/// Broker → subscriber: a command was refused.
pub const ERR: &[u8] = b"ERR";
/// First three bytes of every delivery header.
pub const MSG: &[u8] = b"MSG";

/// Bytes in a delivery header before the topic: `MSG` and the 8-byte seq.
pub const HEADER_FIXED_LEN: usize = MSG.len() + 8;

/// Default longest topic (and filter) in bytes.
pub const DEFAULT_MAX_TOPIC_LEN: usize = 1024;

/// The error codes of an `[ERR, code, text]` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Not a command: unknown verb, wrong number of frames, unknown kind.
    BadCommand,
    /// The filter itself is invalid (empty, too long, misplaced `>`).
    BadFilter,
    /// UNSUB of a filter the subscriber does not hold.
    NotSubscribed,
    /// A configured limit refused the command.
    Limit,
    /// The subscriber's key may not subscribe to this filter.
    Unauthorized,
}

impl ErrorCode {
    /// The code's word on the wire.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            ErrorCode::BadCommand => b"bad-command",
            ErrorCode::BadFilter => b"bad-filter",
            ErrorCode::NotSubscribed => b"not-subscribed",
            ErrorCode::Limit => b"limit",
            ErrorCode::Unauthorized => b"unauthorized",
        }
    }

    /// Parses a code word; `None` for unknown words.
    pub fn from_bytes(word: &[u8]) -> Option<ErrorCode> {
        [
            ErrorCode::BadCommand,
            ErrorCode::BadFilter,
            ErrorCode::NotSubscribed,
            ErrorCode::Limit,
            ErrorCode::Unauthorized,
        ]
        .into_iter()
        .find(|code| code.as_bytes() == word)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

/// A decoded subscriber command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `[SUB, kind, filter]`.
    Subscribe(Filter),
    /// `[UNSUB, kind, filter]`.
    Unsubscribe(Filter),
    /// `[PING]`.
    Ping,
}

/// Why a subscriber command was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// The message had no frames at all.
    Empty,
    /// The first frame is not `SUB`, `UNSUB` or `PING`.
    UnknownVerb,
    /// A known verb with the wrong number of frames.
    FrameCount {
        /// The verb as sent.
        verb: &'static str,
        /// Frames the verb takes.
        expected: usize,
        /// Frames received.
        got: usize,
    },
    /// The kind frame is not `exact`, `prefix` or `pattern`.
    UnknownKind,
    /// The filter failed validation.
    Filter(FilterError),
    /// More frames than any command has.
    TooManyFrames(usize),
}

impl CommandError {
    /// The `ERR` code this refusal is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            CommandError::Filter(_) => ErrorCode::BadFilter,
            _ => ErrorCode::BadCommand,
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Empty => f.write_str("empty message; send SUB, UNSUB or PING"),
            CommandError::UnknownVerb => {
                f.write_str("unknown command; the first frame must be SUB, UNSUB or PING")
            }
            CommandError::FrameCount {
                verb,
                expected,
                got,
            } => write!(f, "{verb} takes {expected} frames, got {got}"),
            CommandError::UnknownKind => {
                f.write_str("unknown filter kind; use exact, prefix or pattern")
            }
            CommandError::Filter(e) => e.fmt(f),
            CommandError::TooManyFrames(n) => {
                write!(f, "{n} frames is more than any command has (at most 3)")
            }
        }
    }
}

impl std::error::Error for CommandError {}

/// Decodes a subscriber command from its frames (routing id already removed).
pub fn parse_command(frames: &[&[u8]], max_filter_len: usize) -> Result<Command, CommandError> {
    let (verb, expected): (&'static str, usize) = match frames.first() {
        None => return Err(CommandError::Empty),
        Some(&SUB) => ("SUB", 3),
        Some(&UNSUB) => ("UNSUB", 3),
        Some(&PING) => ("PING", 1),
        Some(_) => return Err(CommandError::UnknownVerb),
    };
    if frames.len() != expected {
        return Err(CommandError::FrameCount {
            verb,
            expected,
            got: frames.len(),
        });
    }
    if verb == "PING" {
        return Ok(Command::Ping);
    }
    let kind = FilterKind::from_bytes(frames[1]).ok_or(CommandError::UnknownKind)?;
    let filter = Filter::new(kind, frames[2], max_filter_len).map_err(CommandError::Filter)?;
    Ok(if verb == "SUB" {
        Command::Subscribe(filter)
    } else {
        Command::Unsubscribe(filter)
    })
}

/// Why a publisher's message was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishError {
    /// Not exactly two frames `[topic, payload]`.
    FrameCount(usize),
    /// The topic frame is empty.
    EmptyTopic,
    /// The topic is longer than the configured limit.
    TopicTooLong {
        /// Topic length in bytes.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The publisher's key may not publish on this topic.
    Unauthorized,
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::FrameCount(n) => {
                write!(f, "a publish is two frames [topic, payload], got {n}")
            }
            PublishError::EmptyTopic => f.write_str("empty topic"),
            PublishError::TopicTooLong { len, max } => {
                write!(f, "topic is {len} bytes, the limit is {max}")
            }
            PublishError::Unauthorized => {
                f.write_str("this publisher may not publish on the topic")
            }
        }
    }
}

impl std::error::Error for PublishError {}

/// Checks a publisher's message: `frame_count` frames, the first being `topic`.
pub fn check_publish(
    frame_count: usize,
    topic: &[u8],
    max_topic_len: usize,
) -> Result<(), PublishError> {
    if frame_count != 2 {
        return Err(PublishError::FrameCount(frame_count));
    }
    if topic.is_empty() {
        return Err(PublishError::EmptyTopic);
    }
    if topic.len() > max_topic_len {
        return Err(PublishError::TopicTooLong {
            len: topic.len(),
            max: max_topic_len,
        });
    }
    Ok(())
}

/// Length of the delivery header for a topic of `topic_len` bytes.
pub fn header_len(topic_len: usize) -> usize {
    HEADER_FIXED_LEN + topic_len
}

/// Writes the delivery header `MSG | seq (u64 big-endian) | topic` into the
/// front of `buf` and returns its length.
///
/// # Panics
/// If `buf` is shorter than [`header_len`]`(topic.len())`: callers size it.
pub fn write_header(buf: &mut [u8], seq: u64, topic: &[u8]) -> usize {
    let len = header_len(topic.len());
    let buf = &mut buf[..len];
    buf[..3].copy_from_slice(MSG);
    buf[3..HEADER_FIXED_LEN].copy_from_slice(&seq.to_be_bytes());
    buf[HEADER_FIXED_LEN..].copy_from_slice(topic);
    len
}

/// Splits a delivery header into `(seq, topic)`; `None` if it is not one.
pub fn parse_header(header: &[u8]) -> Option<(u64, &[u8])> {
    if header.len() <= HEADER_FIXED_LEN || !header.starts_with(MSG) {
        return None;
    }
    let seq = u64::from_be_bytes(header[3..HEADER_FIXED_LEN].try_into().ok()?);
    Some((seq, &header[HEADER_FIXED_LEN..]))
}

/// A decoded broker → subscriber message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `[header, payload]`: a message routed to this subscriber.
    Message {
        /// Per-subscriber sequence number, from 1.
        seq: u64,
        /// The topic it was published on.
        topic: &'a [u8],
        /// The publisher's payload.
        payload: &'a [u8],
    },
    /// `[OK, SUB|UNSUB, kind, filter]`.
    Ok {
        /// True for SUB, false for UNSUB.
        subscribe: bool,
        /// The confirmed filter's kind.
        kind: FilterKind,
        /// The confirmed filter's text.
        filter: &'a [u8],
    },
    /// `[ERR, code, text]`.
    Err {
        /// The error code word (unknown codes are passed through).
        code: &'a [u8],
        /// Human-readable explanation.
        text: &'a [u8],
    },
    /// `[PONG]`.
    Pong,
}

/// Decodes what the broker sent a subscriber; `None` if it is not protocol v1.
pub fn parse_reply<'a>(frames: &[&'a [u8]]) -> Option<Reply<'a>> {
    match frames {
        [header, payload] if header.len() > HEADER_FIXED_LEN => {
            let (seq, topic) = parse_header(header)?;
            Some(Reply::Message {
                seq,
                topic,
                payload,
            })
        }
        [word] if *word == PONG => Some(Reply::Pong),
        [word, verb, kind, filter] if *word == OK => Some(Reply::Ok {
            subscribe: match *verb {
                SUB => true,
                UNSUB => false,
                _ => return None,
            },
            kind: FilterKind::from_bytes(kind)?,
            filter,
        }),
        [word, code, text] if *word == ERR => Some(Reply::Err { code, text }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse_command(&[b"PING"], 8), Ok(Command::Ping));
        assert_eq!(parse_command(&[], 8), Err(CommandError::Empty));
        assert_eq!(
            parse_command(&[b"PING", b"x"], 8),
            Err(CommandError::FrameCount {
                verb: "PING",
                expected: 1,
                got: 2
            })
        );
        assert_eq!(
            parse_command(&[b"SUB", b"glob", b"x"], 8),
            Err(CommandError::UnknownKind)
        );
        assert_eq!(
            parse_command(&[b"SUB", b"exact", b""], 8)
                .unwrap_err()
                .code(),
            ErrorCode::BadFilter
        );
        assert_eq!(
            parse_command(&[b"sub", b"exact", b"x"], 8),
            Err(CommandError::UnknownVerb)
        );
        assert!(matches!(
            parse_command(&[b"UNSUB", b"pattern", b"a.>"], 8),
            Ok(Command::Unsubscribe(f)) if f.kind() == FilterKind::Pattern
        ));
    }

    #[test]
    fn publish_checks() {
        assert_eq!(check_publish(2, b"t", 4), Ok(()));
        assert_eq!(check_publish(1, b"t", 4), Err(PublishError::FrameCount(1)));
        assert_eq!(check_publish(2, b"", 4), Err(PublishError::EmptyTopic));
        assert_eq!(
            check_publish(2, b"toolong", 4),
            Err(PublishError::TopicTooLong { len: 7, max: 4 })
        );
    }

    #[test]
    fn header_round_trip_and_never_a_reply_word() {
        let mut buf = [0u8; 32];
        let n = write_header(&mut buf, u64::MAX - 1, b"t");
        assert_eq!(n, 12);
        assert_eq!(parse_header(&buf[..n]), Some((u64::MAX - 1, &b"t"[..])));
        assert_eq!(parse_header(b"MSG12345678"), None);
        for word in [PONG, OK, ERR] {
            assert!(word.len() < 12);
        }
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply(&[b"PONG"]), Some(Reply::Pong));
        assert_eq!(
            parse_reply(&[b"OK", b"UNSUB", b"exact", b"a"]),
            Some(Reply::Ok {
                subscribe: false,
                kind: FilterKind::Exact,
                filter: b"a"
            })
        );
        assert_eq!(parse_reply(&[b"OK", b"PING", b"exact", b"a"]), None);
        assert_eq!(parse_reply(&[b"what"]), None);
        assert_eq!(ErrorCode::from_bytes(b"limit"), Some(ErrorCode::Limit));
    }
}
