//! Input decoding shared by the fuzz targets.
//!
//! The targets read their input as a plain byte stream instead of deriving
//! `arbitrary` so the encoding stays trivial to write by hand: the seeds in
//! `fuzz/corpus/` are produced by `fuzz/make_seeds.py` from the same rules,
//! and a crashing input can be read back without tooling. Reading past the
//! end yields zeros, so every byte string is a valid input.

#![allow(dead_code)] // each target uses a different subset

use std::rc::Rc;

use zbroker_core::broker::Payload;

/// A message part whose `take` really empties it, as a `Frame`'s does, so
/// a part read after the core gave it away shows as a wrong payload, a
/// wrong delivery or a wrong byte count.
#[derive(Debug)]
pub struct Bytes(pub Rc<[u8]>);

thread_local! {
    static EMPTY: Rc<[u8]> = Rc::from(&[][..]);
}

impl Payload for Bytes {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn share(&mut self) -> Self {
        Bytes(Rc::clone(&self.0))
    }
    fn take(&mut self) -> Self {
        Bytes(std::mem::replace(&mut self.0, EMPTY.with(Rc::clone)))
    }
}

/// A cursor over the fuzz input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte, or 0 once the input is exhausted.
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A length-prefixed frame: one length byte, except that 255 announces a
    /// 16-bit little-endian length, so frames past the 1024-byte topic and
    /// filter limits stay reachable.
    pub fn frame(&mut self) -> &'a [u8] {
        let n = match self.byte() {
            255 => u16::from_le_bytes([self.byte(), self.byte()]) as usize,
            n => n as usize,
        };
        self.bytes(n)
    }

    /// Text glued from a few pieces of a small alphabet, so that equal
    /// topics and filters, `.` boundaries and wildcards come up constantly
    /// instead of once in a blue moon as they would with random bytes.
    /// One byte gives the piece count (`% (max_pieces + 1)`), one byte each
    /// piece.
    pub fn text(&mut self, alphabet: &[&[u8]], max_pieces: usize) -> Vec<u8> {
        let n = self.byte() as usize % (max_pieces + 1);
        let mut text = Vec::new();
        for _ in 0..n {
            text.extend_from_slice(alphabet[self.byte() as usize % alphabet.len()]);
        }
        text
    }
}

/// Pieces for topics and filters: the separator, both wildcards, segments
/// that are prefixes of one another, and a piece with a separator inside.
pub const PIECES: [&[u8]; 8] = [b"a", b"b", b"ab", b".", b".", b"*", b">", b"a.b"];

/// Asserts that an index whose every pair was removed is back to a fresh
/// index's footprint: no pairs, no nodes or heap left behind, no match cache.
pub fn assert_drained(index: &zbroker_core::index::RoutingIndex) {
    let fresh = zbroker_core::index::RoutingIndex::new();
    assert_eq!(index.len(), 0);
    assert_eq!(
        index.node_count(),
        fresh.node_count(),
        "nodes left behind after removing every pair"
    );
    assert_eq!(
        index.heap_bytes(),
        fresh.heap_bytes(),
        "heap bytes left behind after removing every pair"
    );
    assert_eq!(index.cache_len(), 0, "match cache kept without patterns");
    assert_eq!(index.cache_heap_bytes(), 0, "match cache memory kept");
}
