//! The vocabulary every part of the core shares: identities, terms and indexes, the size
//! limits that keep every message within one datagram, and the deterministic hash.

use std::net::SocketAddr;

/// A peer's identity, the `node_ID` of its config.
pub type NodeId = u64;
/// A Raft term (§5.1). 0 is the term before any election.
pub type Term = u64;
/// A log index (§5.3). The first entry has index 1; 0 means "none".
pub type Index = u64;
/// A client's identity for exactly-once appends: random, chosen by the client.
pub type ClientId = u64;
/// Where a client reply goes: the source address of the client's datagram.
pub type ReplyTo = SocketAddr;

/// The largest datagram we send or accept, kept under UDP's 65,507-byte payload limit.
pub const MAX_DATAGRAM: usize = 64 * 1000;
/// The largest client entry, in bytes of UTF-8.
pub const MAX_ENTRY_DATA: usize = 16 * 1024;
/// The largest client entry once JSON-escaped; control characters escape to six bytes each,
/// so this bound (not only [`MAX_ENTRY_DATA`]) is what guarantees an entry fits a datagram.
pub const MAX_ENTRY_ESCAPED: usize = 40 * 1024;
/// Bytes of a datagram reserved for everything in it but the entries' data.
pub const DATAGRAM_OVERHEAD: usize = 1024;
/// Per-entry JSON framing (keys, numbers, client id), an upper bound.
pub const ENTRY_OVERHEAD: usize = 128;

/// The length of `s` once escaped as a JSON string body.
pub fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// FNV-1a, 64-bit: a deterministic fingerprint (the same on every peer and every run).
pub fn data_hash(data: &str) -> u64 {
    data.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
