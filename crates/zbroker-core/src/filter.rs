//! Topic filters: the three kinds a subscriber may hold, their validation, and
//! the reference definition of what each one matches.
//!
//! [`Filter::matches`] is the specification. The routing index
//! ([`crate::index::RoutingIndex`]) must agree with it for every topic; the
//! tests and the `routing_model` fuzz target check exactly that.

use std::fmt;

/// Which of the three matching rules a filter uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterKind {
    /// The whole topic equals the filter.
    Exact,
    /// The topic starts with the filter's bytes (ZeroMQ SUB semantics: the
    /// empty prefix matches every topic).
    Prefix,
    /// Topic and filter are split on `.`; a `*` segment matches exactly one
    /// segment, a `>` segment (only allowed last) matches one or more.
    Pattern,
}

impl FilterKind {
    /// Every kind, in wire order.
    pub const ALL: [FilterKind; 3] = [FilterKind::Exact, FilterKind::Prefix, FilterKind::Pattern];

    /// The ASCII word that names this kind on the wire.
    pub fn as_bytes(self) -> &'static [u8] {
        self.as_str().as_bytes()
    }

    /// The word that names this kind on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            FilterKind::Exact => "exact",
            FilterKind::Prefix => "prefix",
            FilterKind::Pattern => "pattern",
        }
    }

    /// Parses the wire word; `None` for anything but the three exact words.
    pub fn from_bytes(word: &[u8]) -> Option<FilterKind> {
        match word {
            b"exact" => Some(FilterKind::Exact),
            b"prefix" => Some(FilterKind::Prefix),
            b"pattern" => Some(FilterKind::Pattern),
            _ => None,
        }
    }
}

impl fmt::Display for FilterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a filter was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterError {
    /// An `exact` or `pattern` filter was empty (only `prefix` may be).
    Empty(FilterKind),
    /// The filter is longer than the configured limit.
    TooLong {
        /// Length of the refused filter in bytes.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A `>` segment stood somewhere other than last in a pattern.
    TailNotLast,
    /// The text had no `kind:` in front (command-line form only).
    NoKind(String),
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterError::Empty(kind) => write!(f, "an empty {kind} filter matches nothing"),
            FilterError::TooLong { len, max } => {
                write!(f, "filter is {len} bytes, the limit is {max}")
            }
            FilterError::TailNotLast => {
                f.write_str("'>' may only be the last segment of a pattern")
            }
            FilterError::NoKind(text) => write!(
                f,
                "filter {text:?} has no kind; write exact:TOPIC, prefix:TOPIC or pattern:TOPIC"
            ),
        }
    }
}

impl std::error::Error for FilterError {}

/// A validated topic filter: a kind and the bytes it is written with.
///
/// Construction validates, so every `Filter` value is one the broker accepts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Filter {
    kind: FilterKind,
    text: Box<[u8]>,
}

/// The byte that separates pattern segments.
pub const SEPARATOR: u8 = b'.';
/// A pattern segment matching exactly one topic segment.
pub const ONE_SEGMENT: &[u8] = b"*";
/// A last pattern segment matching one or more topic segments.
pub const TAIL: &[u8] = b">";

impl Filter {
    /// Validates `text` as a filter of `kind` no longer than `max_len` bytes.
    ///
    /// ```
    /// use zbroker_core::filter::{Filter, FilterKind};
    /// let f = Filter::new(FilterKind::Pattern, b"net.*.port", 1024).unwrap();
    /// assert!(f.matches(b"net.a.port"));
    /// assert!(Filter::new(FilterKind::Pattern, b"net.>.x", 1024).is_err());
    /// ```
    pub fn new(kind: FilterKind, text: &[u8], max_len: usize) -> Result<Filter, FilterError> {
        if text.len() > max_len {
            return Err(FilterError::TooLong {
                len: text.len(),
                max: max_len,
            });
        }
        match kind {
            FilterKind::Prefix => {}
            FilterKind::Exact | FilterKind::Pattern if text.is_empty() => {
                return Err(FilterError::Empty(kind));
            }
            FilterKind::Exact => {}
            FilterKind::Pattern => {
                let mut segments = text.split(|&b| b == SEPARATOR).peekable();
                while let Some(segment) = segments.next() {
                    if segment == TAIL && segments.peek().is_some() {
                        return Err(FilterError::TailNotLast);
                    }
                }
            }
        }
        Ok(Filter {
            kind,
            text: text.into(),
        })
    }

    /// Parses the command-line form `kind:text`, e.g. `prefix:net.`.
    pub fn parse_cli(spec: &str, max_len: usize) -> Result<Filter, FilterError> {
        let (kind, text) = spec
            .split_once(':')
            .and_then(|(kind, text)| Some((FilterKind::from_bytes(kind.as_bytes())?, text)))
            .ok_or_else(|| FilterError::NoKind(spec.to_string()))?;
        Filter::new(kind, text.as_bytes(), max_len)
    }

    /// The filter's kind.
    pub fn kind(&self) -> FilterKind {
        self.kind
    }

    /// The filter's bytes as written.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// For a pattern, its number of `.`-separated segments (what
    /// `max_pattern_segments` limits); 0 for the other kinds, which are
    /// matched byte by byte.
    pub fn pattern_segments(&self) -> usize {
        match self.kind {
            FilterKind::Pattern => 1 + self.text.iter().filter(|&&b| b == SEPARATOR).count(),
            FilterKind::Exact | FilterKind::Prefix => 0,
        }
    }

    /// Whether this filter matches `topic`: the reference definition, by
    /// brute force. The routing index gives the same answers faster.
    pub fn matches(&self, topic: &[u8]) -> bool {
        match self.kind {
            FilterKind::Exact => topic == &*self.text,
            FilterKind::Prefix => topic.starts_with(&self.text),
            FilterKind::Pattern => pattern_matches(&self.text, topic),
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, String::from_utf8_lossy(&self.text))
    }
}

fn pattern_matches(pattern: &[u8], topic: &[u8]) -> bool {
    let mut topic_segments = topic.split(|&b| b == SEPARATOR);
    for segment in pattern.split(|&b| b == SEPARATOR) {
        if segment == TAIL {
            // `>` needs at least one more segment, and takes all that remain.
            return topic_segments.next().is_some();
        }
        match topic_segments.next() {
            Some(t) if segment == ONE_SEGMENT || segment == t => {}
            _ => return false,
        }
    }
    topic_segments.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> Filter {
        Filter::new(FilterKind::Pattern, text.as_bytes(), 1024).unwrap()
    }

    #[test]
    fn pattern_rules_from_the_spec() {
        assert!(pattern("net.*.port").matches(b"net.a.port"));
        assert!(!pattern("net.*.port").matches(b"net.a.b.port"));
        assert!(!pattern("net.*.port").matches(b"net.port"));
        assert!(pattern("net.>").matches(b"net.a"));
        assert!(pattern("net.>").matches(b"net.a.b"));
        assert!(!pattern("net.>").matches(b"net"));
        assert!(pattern(">").matches(b"anything.at.all"));
        assert!(pattern("*").matches(b""));
        assert!(!pattern("a").matches(b"a.b"));
        // Wildcards only count as whole segments.
        assert!(pattern("a*").matches(b"a*"));
        assert!(!pattern("a*").matches(b"ab"));
    }

    #[test]
    fn prefix_and_exact() {
        let all = Filter::new(FilterKind::Prefix, b"", 1024).unwrap();
        assert!(all.matches(b"x"));
        let exact = Filter::new(FilterKind::Exact, b"ab", 1024).unwrap();
        assert!(exact.matches(b"ab") && !exact.matches(b"abc"));
    }

    #[test]
    fn validation() {
        assert_eq!(
            Filter::new(FilterKind::Exact, b"", 8),
            Err(FilterError::Empty(FilterKind::Exact))
        );
        assert_eq!(
            Filter::new(FilterKind::Prefix, b"123456789", 8),
            Err(FilterError::TooLong { len: 9, max: 8 })
        );
        assert_eq!(
            Filter::new(FilterKind::Pattern, b">.a", 8),
            Err(FilterError::TailNotLast)
        );
        assert!(Filter::parse_cli("prefix:", 8).is_ok());
        assert!(matches!(
            Filter::parse_cli("nope", 8),
            Err(FilterError::NoKind(_))
        ));
    }
}
