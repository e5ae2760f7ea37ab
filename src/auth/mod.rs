//! Sealed datagrams: with a cluster secret (the config's `secret_file`), every datagram a peer
//! or client sends is encrypted and authenticated (an AEAD, AES-256-GCM) in an envelope
//! whose clear header is authenticated with it, and every receiver verifies it and its freshness
//! *before* decoding any JSON. The core never sees a datagram that no key holder sent, nor one
//! it has seen before, and nobody on the path reads a body.
//!
//! # Wire format
//!
//! ```text
//! offset size
//!      0    1  magic 0xA7: never the `{` that starts an unauthenticated (JSON) datagram
//!      1    1  version, 2
//!      2    1  kind: 1 peer message, 2 client request, 3 client reply,
//!              4 notice to a peer, 5 notice to a client
//!      3    1  reserved, 0
//!      4    4  key id: a fingerprint of the key that sealed it
//!      8    8  sender: a peer's node ID, or a client's random session ID
//!     16    8  sender epoch: the sender's incarnation (see below)
//!     24    8  recipient: a peer's node ID, or a client's session ID
//!     32    8  recipient epoch: the recipient's incarnation as the sender knows it, 0 if unknown
//!     40    8  counter: per sender incarnation and recipient, from 1, never reused
//!     48    8  sent: the sender's clock, microseconds since the Unix epoch (a request older
//!              than [`REQUEST_TTL`] is refused, so a captured one cannot be aimed elsewhere later)
//!     56    n  body, encrypted: the JSON datagram; in a notice, 8 bytes (the least sender
//!              epoch accepted)
//!   56+n   16  tag: AES-256-GCM over the header (associated data) and the body
//! ```
//!
//! Integers are little-endian. Each datagram is sealed under a subkey of its key for its link
//! (keyed BLAKE3 of kind, sender, sender epoch and recipient), with its counter and kind as
//! the nonce: a sender never reuses a counter towards one recipient in one incarnation, so no
//! nonce repeats under a subkey (as WireGuard keys a session and counts its datagrams).
//!
//! # Keys: peers and clients apart
//!
//! Each key of the secret gives two keys, derived (BLAKE3 `derive_key`) with different labels
//! from the key *and* the cluster name: the *peer key*, which seals peer messages and notices
//! between peers, and the *operator's client key*, which seals requests and the replies and
//! notices sent back. Each kind of datagram is opened only with keys of its side, and a
//! client's [`Keys`] hold no peer key ([`Keys::client_only`]), so nothing a client can seal is
//! taken as peer traffic (dropped as [`AuthError::WrongSide`]).
//!
//! Users (the replicated users table) each have a key of their own, which the peers derive
//! from the secret and never store (`auth/users.rs`): it seals requests, and the key that opened a
//! request tells the peer whose it is and so which role to check it against. A removed user's
//! key leaves every peer's table as the removal applies there.
//!
//! **Why AES-256-GCM** (RustCrypto's `aes-gcm`): an AEAD from a well-kept crate, with
//! hardware AES and carry-less multiplication on the x86 and ARM CPUs peers run on. Measured
//! on this project's 2-core VM (a small datagram, sealing alone): 0.5-0.7 µs with a fresh
//! subkey, against 3.4 µs for RustCrypto's `chacha20poly1305` (whose per-message CPU-feature
//! probing dominated there), and both about 1 GB/s on a 64 KB AppendEntries. The counter is
//! the nonce because the subkey already names the link: a nonce needs no state of its own and
//! no coordination between the peers that share the peer key.
//!
//! # Freshness: sessions bound to both ends' incarnations
//!
//! Each process draws an *epoch* when it starts: the wall clock in microseconds with 10 random
//! bits below it, so a later incarnation has a larger epoch. A receiver accepts a datagram only
//! if, after its tag verifies:
//! - it is addressed to this receiver (recipient ID) and to this *incarnation* (recipient epoch
//!   equals ours): a datagram captured before we restarted, or sent to another peer, is stale;
//! - its sender epoch is not older than the newest we have seen from that sender (an older one
//!   is a previous incarnation's datagram), and within that epoch its counter has not been seen
//!   and is within [`WINDOW`] of the highest seen (a sliding window, as IPsec and WireGuard keep).
//!
//! - its sender epoch is at most [`EPOCH_SLACK`] ahead of the receiver's clock, and a client
//!   request was sent (by its `sent` field) within [`REQUEST_TTL`] of the receiver's clock.
//!
//! The sender's state (epoch, window) changes only once a datagram has passed every check:
//! a refused datagram, whatever the reason, leaves no trace, so no forged or stale datagram
//! can move a sender's epoch out of reach of its genuine datagrams.
//!
//! A sender learns a recipient's epoch from the recipient's own authenticated datagrams. Until it
//! has (its first datagram says 0, a *handshake*; or the recipient restarted since), its
//! datagrams are stale, and the recipient answers the first of them (at most one per sender per
//! [`NOTICE_INTERVAL`]) with a *notice*: a sealed datagram that carries the recipient's epoch
//! and is bound to the sender's epoch. A notice is never answered with a notice, and a datagram
//! whose tag fails is never answered at all, so a spoofed source gets nothing; a peer is told
//! at its configured address, never a datagram's source. A notice also carries the least sender
//! epoch the recipient will accept, which moves a sender whose clock stepped back past its old
//! epoch. This is WireGuard's rule that a datagram is valid only inside the session it was sent
//! in, with the handshake folded into the first datagram and its notice: peers resend the
//! message the notice answered at once, clients their request.
//!
//! Client sessions are random 64-bit IDs, one per client process; a peer keeps the windows of
//! the [`CLIENT_SESSIONS`] most recently heard sessions and rejects an unknown session whose
//! epoch is not newer than every session it has forgotten (a notice tells a live client to move
//! its epoch on). A reply is sealed to the client's session and epoch, and its JSON carries the
//! request's ID, so a captured reply answers nothing else.
//!
//! # Keys and rotation
//!
//! The secret file holds one or two keys (64 hex digits each): the first is *current*, the
//! second *previous*. Datagrams sealed with either are accepted. A peer seals with the current
//! key, except towards a peer that has used only our previous key in its current incarnation
//! (a peer not yet restarted with the new file, which cannot verify the current one); to such a
//! peer it also sends one datagram a second under the current key as well, so that once the
//! peer has the new key both move to it. It answers a client with the key the client used.
//! While it does not know a recipient's epoch it seals its first datagram once per key, so
//! whichever key the recipient has, the exchange starts. A rolling restart with the new key
//! first and the old one second therefore rotates the key without losing a majority; a second
//! rolling restart without the old key ends the rotation.
//!
//! # What this does not do
//!
//! - It hides what is in a datagram, not that it was sent: its size, timing, kind, sender and
//!   recipient are in clear.
//! - A holder of the secret file (every peer, and an operator on a peer's host) can seal as any
//!   peer or client: the keys keep out everyone else, not a peer gone bad.
//! - A datagram that an attacker intercepts and withholds can still be delivered later, once,
//!   while neither end has restarted and its counter is within the window: a late datagram,
//!   which Raft takes (UDP delivers late too). One that was delivered is refused as a
//!   duplicate, and one bound to an earlier incarnation of either end is refused.
//! - Epochs order a process's incarnations by the wall clock. A peer whose clock stepped back
//!   across a restart is told by the others to move its epoch forward (one round trip).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::raft::users::UserRole;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};

/// A node ID, as in the core (`crate::raft::NodeId`).
pub type NodeId = u64;

/// Bytes in a key of the secret file.
pub const KEY_BYTES: usize = 32;
/// The first byte of every sealed datagram; an unauthenticated datagram starts with `{`.
pub const MAGIC: u8 = 0xA7;
/// The envelope's version.
pub const VERSION: u8 = 2;
/// Bytes before the body.
pub const HEADER_LEN: usize = 56;
/// Bytes of the AEAD tag after the body.
pub const MAC_LEN: usize = 16;
/// What sealing adds to a datagram.
pub const OVERHEAD: usize = HEADER_LEN + MAC_LEN;
/// 64-bit words of a replay window's bitmap.
const WINDOW_WORDS: usize = 32;
/// How far below the highest counter seen from a sender a counter is still accepted (once).
/// Counters are per recipient, so this is how many datagrams *to us* may overtake one.
pub const WINDOW: u64 = (WINDOW_WORDS as u64 - 1) * 64;
/// Client sessions whose windows a peer keeps; older ones are forgotten (see [`Sessions`]).
pub const CLIENT_SESSIONS: usize = 4096;
/// Peers a node keeps a link to, at most: far more than any cluster, and a bound on what
/// sender IDs made up by a holder of the secret can make it keep.
const MAX_LINKS: usize = 1024;
/// The least time between two notices to the same sender.
pub const NOTICE_INTERVAL: Duration = Duration::from_millis(10);
/// Notices a peer sends per second at most, to all senders together.
pub const NOTICES_PER_SECOND: u32 = 1000;
/// How far ahead of the receiver's clock a sender epoch (or the least epoch a notice asks for)
/// may be. Epochs are wall-clock times; one further ahead is forged (or the clocks disagree by
/// more than this, which the refusal's log line says), and adopting it would let one datagram
/// move a sender's state out of reach of its genuine datagrams.
pub const EPOCH_SLACK: Duration = Duration::from_secs(10);
/// How old (by its `sent` field, against the peer's clock) a client request may be. A reply
/// goes to the request's source address; a request captured on the way and delivered later
/// from another (spoofed) source would draw its reply there, so a request is good only briefly.
pub const REQUEST_TTL: Duration = Duration::from_secs(10);
/// How often a peer sealing to another peer with the previous key also sends a datagram under
/// the current key, to find out whether that peer has it yet (during a rotation).
pub const KEY_PROBE_INTERVAL: Duration = Duration::from_secs(1);

const PEER_CONTEXT: &str = "raft 2026 peer datagram key v2";
const OPERATOR_CONTEXT: &str = "raft 2026 operator client datagram key v2";
const KEY_ID_CONTEXT: &str = "raft 2026 datagram key id v2";

// ---------------------------------------------------------------------------------------------
// The secret file

/// The keys of a secret file: the current one first, then the previous one if any.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    keys: Vec<[u8; KEY_BYTES]>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} keys, redacted)", self.keys.len())
    }
}

/// The text of a small file that only its owner may read or write (mode 0600 or stricter): a
/// regular file of at most 64 KiB. `made_by` says where a missing one comes from. Errors say
/// what is wrong, for the caller to prefix with the file's role and path.
pub fn read_private_file(path: &Path, made_by: &str) -> Result<String, String> {
    let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("does not exist ({made_by})"),
        std::io::ErrorKind::PermissionDenied => "cannot be read: permission denied".into(),
        _ => format!("cannot be read: {e}"),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "is accessible by others (mode {mode:04o}); make it private with `chmod 600 {}`",
                path.display()
            ));
        }
    }
    // Key and credential files are tiny; refuse to read a huge one.
    let mut text = String::new();
    file.by_ref()
        .take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot be read: {e}"))?;
    Ok(text)
}

impl Secret {
    /// A secret of the given keys, current first (one or two).
    pub fn new(keys: Vec<[u8; KEY_BYTES]>) -> Result<Secret, String> {
        match keys.len() {
            1 | 2 => Ok(Secret { keys }),
            n => Err(format!("{n} keys: a secret file holds one or two")),
        }
    }

    /// One fresh random key from the operating system.
    pub fn generate() -> Result<Secret, String> {
        Ok(Secret {
            keys: vec![random_key()?],
        })
    }

    /// The keys, current first.
    pub fn keys(&self) -> &[[u8; KEY_BYTES]] {
        &self.keys
    }

    /// Parses a secret file's text: one key per line as 64 hex digits (32 bytes), the current
    /// key first and optionally the previous one; blank lines and lines starting with `#` are
    /// ignored.
    pub fn parse(text: &str) -> Result<Secret, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = parse_key(line).map_err(|e| format!("line {}: {e}", n + 1))?;
            keys.push(key);
        }
        match keys.len() {
            0 => Err(format!(
                "no key (expected a line of {} hex digits)",
                2 * KEY_BYTES
            )),
            1 | 2 => Ok(Secret { keys }),
            n => Err(format!(
                "{n} keys; at most two (the current key, then the previous one)"
            )),
        }
    }

    /// Reads and checks a secret file: it must be a regular file that only its owner can read
    /// or write (mode 0600 or stricter), holding one or two keys. Errors name the file.
    pub fn load(path: &Path) -> Result<Secret, String> {
        let err = |what: String| format!("secret_file {}: {what}", path.display());
        let text = read_private_file(path, "scripts/start-cluster.sh makes one").map_err(err)?;
        Secret::parse(&text).map_err(err)
    }

    /// The file's text: a comment, then one key per line, current first.
    pub fn to_file_text(&self) -> String {
        let mut text = String::from(
            "# raft cluster secret: the first key seals, a second one is also accepted (rotation)\n",
        );
        for key in &self.keys {
            for b in key {
                text.push_str(&format!("{b:02x}"));
            }
            text.push('\n');
        }
        text
    }

    /// Writes the secret to a new file only its owner can read (mode 0600); an existing file
    /// is replaced atomically (written beside it, then renamed over it).
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let err = |e: std::io::Error| format!("secret_file {}: cannot write: {e}", path.display());
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let _ = std::fs::remove_file(&tmp);
        let mut file = options.open(&tmp).map_err(err)?;
        use std::io::Write;
        file.write_all(self.to_file_text().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

fn parse_key(hex: &str) -> Result<[u8; KEY_BYTES], String> {
    let digits = hex.len();
    if digits < 2 * KEY_BYTES {
        return Err(format!(
            "a key of {digits} characters is too short: a key is {} hex digits ({KEY_BYTES} random bytes)",
            2 * KEY_BYTES
        ));
    }
    if digits > 2 * KEY_BYTES {
        return Err(format!(
            "a key of {digits} characters is too long: a key is {} hex digits ({KEY_BYTES} random bytes)",
            2 * KEY_BYTES
        ));
    }
    let mut key = [0u8; KEY_BYTES];
    let bytes = hex.as_bytes();
    for (i, byte) in key.iter_mut().enumerate() {
        let (hi, lo) = (hex_digit(bytes[2 * i]), hex_digit(bytes[2 * i + 1]));
        match (hi, lo) {
            (Some(h), Some(l)) => *byte = h << 4 | l,
            _ => return Err("a key has only hex digits (0-9, a-f)".into()),
        }
    }
    if key.iter().all(|&b| b == key[0]) {
        return Err("a key of one repeated byte is not a secret; draw 32 random bytes".into());
    }
    Ok(key)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn random_key() -> Result<[u8; KEY_BYTES], String> {
    let mut key = [0u8; KEY_BYTES];
    getrandom::fill(&mut key)
        .map_err(|e| format!("cannot draw a key from the operating system: {e}"))?;
    Ok(key)
}

// ---------------------------------------------------------------------------------------------
// Keys

/// One AEAD key and its fingerprint.
#[derive(Clone)]
struct AeadKey {
    id: u32,
    key: [u8; 32],
}

impl AeadKey {
    /// The key `context` derives from `raw` for the cluster named `cluster`.
    fn derive(context: &str, raw: &[u8; KEY_BYTES], cluster: &str) -> AeadKey {
        let mut h = blake3::Hasher::new_derive_key(context);
        // The key has a fixed length, so key || cluster is unambiguous.
        h.update(raw);
        h.update(cluster.as_bytes());
        let key = *h.finalize().as_bytes();
        let fp = blake3::derive_key(KEY_ID_CONTEXT, &key);
        AeadKey {
            id: u32::from_le_bytes([fp[0], fp[1], fp[2], fp[3]]),
            key,
        }
    }

    /// Runs `f` with the AEAD for the datagram whose header is `head`: keyed with a subkey of
    /// this key for its link (kind, sender, sender epoch, recipient), so that its counter
    /// alone can be the nonce (see [`nonce`]).
    fn with_cipher<T>(&self, head: &[u8], f: impl FnOnce(&Aes256Gcm) -> T) -> T {
        let mut link = [0u8; 25];
        link[0] = head[2];
        link[1..].copy_from_slice(&head[8..32]);
        CIPHERS.with(|cache| {
            let mut cache = cache.borrow_mut();
            let slot = cipher_slot(&self.key, &link);
            let hit = matches!(&cache[slot], Some(e) if e.base == self.key && e.link == link);
            if !hit {
                let subkey = blake3::keyed_hash(&self.key, &link);
                cache[slot] = Some(Box::new(CachedCipher {
                    base: self.key,
                    link,
                    cipher: Aes256Gcm::new(subkey.as_bytes().into()),
                }));
            }
            match &cache[slot] {
                Some(e) => f(&e.cipher),
                None => unreachable!("filled above"),
            }
        })
    }
}

/// A link's cipher (its subkey's AES key schedule), kept so that a busy link does not derive
/// and expand its subkey for every datagram. Tagged with the whole key and link it was made
/// for, so a lookup can only ever return the cipher the derivation would give.
struct CachedCipher {
    base: [u8; 32],
    link: [u8; 25],
    cipher: Aes256Gcm,
}

/// Ciphers cached per thread (each of a peer's threads seals or opens for its own links).
const CIPHER_SLOTS: usize = 64;

thread_local! {
    static CIPHERS: std::cell::RefCell<Vec<Option<Box<CachedCipher>>>> =
        std::cell::RefCell::new((0..CIPHER_SLOTS).map(|_| None).collect());
}

/// Where a link's cipher is cached: a cheap hash of the key and link (a miss only costs the
/// derivation the cache saves).
fn cipher_slot(base: &[u8; 32], link: &[u8; 25]) -> usize {
    use std::hash::Hasher as _;
    let mut h = FastHash::default();
    h.write(&base[..8]);
    h.write(link);
    (h.finish() % CIPHER_SLOTS as u64) as usize
}

/// Which kind of credential sealed a datagram: the peers' (peer messages and notices between
/// peers), or a client's (requests, and the replies and notices sealed back to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Peer,
    Client,
}

/// The keys derived from a [`Secret`] and the cluster name, in slots (0 current, 1 previous):
/// the peers' keys, and the operator's client keys, each derived with its own label so that
/// no datagram sealed with a client key is taken as peer traffic. A client credential (see
/// [`Keys::client_only`]) has no peer keys at all. Never prints key material.
#[derive(Clone)]
pub struct Keys {
    peer: Vec<AeadKey>,
    client: Vec<AeadKey>,
    /// Per key of the secret, what users' keys are derived from (`auth/users.rs`); peers only.
    masters: Vec<[u8; 32]>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = |k: &[AeadKey]| {
            k.iter()
                .map(|k| format!("{:08x}", k.id))
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "Keys(peer ids {}; client ids {})",
            ids(&self.peer),
            ids(&self.client)
        )
    }
}

impl PartialEq for Keys {
    fn eq(&self, other: &Keys) -> bool {
        self.ids() == other.ids() && self.client_ids() == other.client_ids()
    }
}

impl Eq for Keys {}

impl Keys {
    /// Derives the keys of `secret` for the cluster named `cluster`: the peers' and the
    /// operator's. The same secret under another cluster name gives unrelated keys. Fails only
    /// if two keys' fingerprints collide (chance 2^-32: draw another key).
    pub fn new(secret: &Secret, cluster: &str) -> Result<Keys, String> {
        let mut keys = Keys {
            peer: Vec::new(),
            client: Vec::new(),
            masters: Vec::new(),
        };
        for raw in &secret.keys {
            let peer = AeadKey::derive(PEER_CONTEXT, raw, cluster);
            let client = AeadKey::derive(OPERATOR_CONTEXT, raw, cluster);
            if keys.peer.iter().any(|s| s.key == peer.key) {
                continue; // the same key twice: once is enough
            }
            let mut ids: Vec<u32> = keys.peer.iter().chain(&keys.client).map(|k| k.id).collect();
            ids.extend([peer.id, client.id]);
            ids.sort_unstable();
            ids.dedup();
            if ids.len() != 2 * (keys.peer.len() + 1) {
                return Err("two keys have the same fingerprint; draw another key".into());
            }
            keys.peer.push(peer);
            keys.client.push(client);
            keys.masters.push(users::user_master(raw, cluster));
        }
        Ok(keys)
    }

    /// A single random key, for tests and for the bench and chaos runs.
    pub fn random(cluster: &str) -> Result<Keys, String> {
        Keys::new(&Secret::generate()?, cluster)
    }

    /// These keys without the peers' keys: what a client gets, which can seal requests and
    /// open replies but cannot seal (or read) a datagram between peers.
    pub fn client_only(&self) -> Keys {
        Keys {
            peer: Vec::new(),
            client: self.client.clone(),
            masters: Vec::new(),
        }
    }

    /// The fingerprints of the peers' keys, current first (in the header of every datagram
    /// between peers).
    pub fn ids(&self) -> Vec<u32> {
        self.peer.iter().map(|k| k.id).collect()
    }

    /// The fingerprints of the client keys, current first.
    pub fn client_ids(&self) -> Vec<u32> {
        self.client.iter().map(|k| k.id).collect()
    }

    /// Key slots of the peers' keys: 1, or 2 during a rotation (0 for a client credential).
    pub fn len(&self) -> usize {
        self.peer.len()
    }

    /// Key slots of the client keys.
    pub fn client_len(&self) -> usize {
        self.client.len()
    }

    /// Whether these keys seal nothing at all.
    pub fn is_empty(&self) -> bool {
        self.peer.is_empty() && self.client.is_empty()
    }

    fn side(&self, side: Side) -> &[AeadKey] {
        match side {
            Side::Peer => &self.peer,
            Side::Client => &self.client,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The envelope

/// What a sealed datagram carries, which decides who may send it and who takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Peer to peer: a Raft message.
    Peer = 1,
    /// Client to peer: a request.
    Request = 2,
    /// Peer to client: a reply.
    Reply = 3,
    /// Peer to peer: "your datagram was stale; here is my epoch".
    NoticeToPeer = 4,
    /// Peer to client: the same, for a client.
    NoticeToClient = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Peer,
            2 => Kind::Request,
            3 => Kind::Reply,
            4 => Kind::NoticeToPeer,
            5 => Kind::NoticeToClient,
            _ => return None,
        })
    }

    /// Whether the sender is a client (its ID a session ID) rather than a peer.
    pub fn from_client(self) -> bool {
        self == Kind::Request
    }

    /// Which keys seal this kind.
    pub fn side(self) -> Side {
        match self {
            Kind::Peer | Kind::NoticeToPeer => Side::Peer,
            Kind::Request | Kind::Reply | Kind::NoticeToClient => Side::Client,
        }
    }

    fn is_notice(self) -> bool {
        matches!(self, Kind::NoticeToPeer | Kind::NoticeToClient)
    }
}

/// The fixed fields before a sealed datagram's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub key_id: u32,
    pub sender: u64,
    pub sender_epoch: u64,
    pub recipient: u64,
    pub recipient_epoch: u64,
    pub counter: u64,
    /// The sender's clock when it sealed the datagram, microseconds since the Unix epoch.
    pub sent: u64,
}

impl Header {
    fn write(&self, out: &mut [u8]) {
        out[0] = MAGIC;
        out[1] = VERSION;
        out[2] = self.kind as u8;
        out[3] = 0;
        out[4..8].copy_from_slice(&self.key_id.to_le_bytes());
        for (at, v) in [
            (8, self.sender),
            (16, self.sender_epoch),
            (24, self.recipient),
            (32, self.recipient_epoch),
            (40, self.counter),
            (48, self.sent),
        ] {
            out[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
    }

    fn read(bytes: &[u8]) -> Result<Header, AuthError> {
        if bytes.first() != Some(&MAGIC) {
            return Err(AuthError::NotSealed);
        }
        if bytes.len() < OVERHEAD {
            return Err(AuthError::Truncated(bytes.len()));
        }
        if bytes[1] != VERSION {
            return Err(AuthError::Version(bytes[1]));
        }
        let kind = Kind::from_u8(bytes[2]).ok_or(AuthError::BadKind(bytes[2]))?;
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        Ok(Header {
            kind,
            key_id: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            sender: u64_at(8),
            sender_epoch: u64_at(16),
            recipient: u64_at(24),
            recipient_epoch: u64_at(32),
            counter: u64_at(40),
            sent: u64_at(48),
        })
    }
}

/// The nonce of a datagram under its link's subkey (see [`AeadKey::cipher`]): its counter
/// and kind. A sender never reuses a counter towards one recipient within one incarnation
/// (see [`next_counter`]), so no nonce repeats under a subkey.
fn nonce(head: &[u8]) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&head[40..48]);
    n[8] = head[2];
    n.into()
}

/// Seals the datagram in `buf` in place: `buf` holds [`HEADER_LEN`] bytes of room, then the
/// body; the header is written into the room (with the key id of `slot` of the key side its
/// kind takes), the body encrypted, and the tag appended. The header travels in clear but is
/// authenticated with the body. A `slot` beyond the keys held falls back to the last one.
pub fn seal(keys: &Keys, slot: usize, header: &Header, buf: &mut Vec<u8>) {
    debug_assert!(buf.len() >= HEADER_LEN, "no room for the header");
    let side = keys.side(header.kind.side());
    let Some(key) = side.get(slot).or(side.last()) else {
        // Never reached (every sealer holds a key of the side it seals), but if it were, the
        // plaintext must not leave: an empty datagram is dropped by every receiver.
        debug_assert!(false, "no key to seal a {:?}", header.kind);
        buf.clear();
        return;
    };
    seal_with(key, header, buf);
}

/// [`seal`] with one given key.
fn seal_with(key: &AeadKey, header: &Header, buf: &mut Vec<u8>) {
    let header = Header {
        key_id: key.id,
        ..*header
    };
    header.write(&mut buf[..HEADER_LEN]);
    let (head, body) = buf.split_at_mut(HEADER_LEN);
    let tag = key
        .with_cipher(head, |c| {
            c.encrypt_in_place_detached(&nonce(head), head, body)
        })
        .expect("a datagram is far below the AEAD's length limit");
    buf.extend_from_slice(&tag);
}

/// A new buffer holding `body` behind room for the header, ready for [`seal`].
pub fn with_room(body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(OVERHEAD + body.len());
    buf.resize(HEADER_LEN, 0);
    buf.extend_from_slice(body);
    buf
}

/// Puts `body` back in `buf` behind room for a header, to seal it again under another header or
/// key (sealing encrypted the one that was there).
fn refill(buf: &mut Vec<u8>, body: &[u8]) {
    buf.truncate(HEADER_LEN);
    buf.resize(HEADER_LEN, 0);
    buf.extend_from_slice(body);
}

/// Why a datagram failed authentication. Each is counted as an authentication failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No envelope: an unauthenticated datagram (its sender has no `secret_file`?).
    NotSealed,
    /// Shorter than an envelope: cut off, or not ours.
    Truncated(usize),
    Version(u8),
    BadKind(u8),
    /// Sealed with a key we do not hold (a wrong secret, another cluster name, or a key newer
    /// than ours during a rotation).
    UnknownKey(u32),
    /// The tag does not match: forged, corrupted, or a wrong key with a colliding fingerprint.
    BadMac,
    /// Sealed with a key of the wrong side for its kind: a client credential sealing a peer
    /// message or notice (an insider posing as a peer), or a peer key sealing a request.
    WrongSide(Kind),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::NotSealed => write!(
                f,
                "not sealed: an unauthenticated datagram (does its sender have the cluster's secret_file?)"
            ),
            AuthError::Truncated(n) => write!(f, "{n} bytes, shorter than an envelope"),
            AuthError::Version(v) => write!(f, "envelope version {v}, not {VERSION}"),
            AuthError::BadKind(k) => write!(f, "unknown datagram kind {k}"),
            AuthError::UnknownKey(id) => write!(
                f,
                "sealed with key {id:08x}, which this process does not hold (a different secret_file or cluster name?)"
            ),
            AuthError::BadMac => write!(f, "wrong tag (forged or corrupted)"),
            AuthError::WrongSide(kind) => write!(
                f,
                "a {kind:?} sealed with a key of the wrong side (a client credential posing as a peer, or the reverse)"
            ),
        }
    }
}

/// A datagram whose tag verified, decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub header: Header,
    /// The key slot that verified it (0 current, 1 previous), of the side its kind takes.
    pub slot: usize,
    pub body: Vec<u8>,
}

/// Verifies and decrypts a sealed datagram before anything in it is believed. Never panics.
pub fn open(bytes: &[u8], keys: &Keys) -> Result<Opened, AuthError> {
    let mut body = Vec::new();
    let (header, slot) = open_into(bytes, keys, &mut body)?;
    Ok(Opened { header, slot, body })
}

/// [`open`] into a buffer the caller reuses: `body` receives the plaintext. Returns the
/// header and the key slot that verified it.
pub fn open_into(
    bytes: &[u8],
    keys: &Keys,
    body: &mut Vec<u8>,
) -> Result<(Header, usize), AuthError> {
    let header = Header::read(bytes)?;
    let side = header.kind.side();
    let Some(slot) = keys.side(side).iter().position(|k| k.id == header.key_id) else {
        let other = match side {
            Side::Peer => Side::Client,
            Side::Client => Side::Peer,
        };
        return Err(if keys.side(other).iter().any(|k| k.id == header.key_id) {
            AuthError::WrongSide(header.kind)
        } else {
            AuthError::UnknownKey(header.key_id)
        });
    };
    let (head, rest) = bytes.split_at(HEADER_LEN);
    let (sealed, tag) = rest.split_at(rest.len() - MAC_LEN);
    body.clear();
    body.extend_from_slice(sealed);
    keys.side(side)[slot]
        .with_cipher(head, |c| {
            c.decrypt_in_place_detached(&nonce(head), head, body, Tag::from_slice(tag))
        })
        .map_err(|_| {
            body.clear();
            AuthError::BadMac
        })?;
    Ok((header, slot))
}

// ---------------------------------------------------------------------------------------------
// Epochs and counters

/// The wall clock in microseconds since the Unix epoch (0 before it).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A new incarnation's epoch: microseconds since the Unix epoch with 10 random bits below them,
/// so that a later start has a larger epoch (the clock permitting; see the module docs), and
/// two starts in the same microsecond still differ. Never 0 (which means "unknown").
pub fn fresh_epoch() -> u64 {
    let noise = getrandom::u64().unwrap_or(0) & 0x3ff;
    ((now_micros() << 10) | noise).max(1)
}

/// The largest epoch taken now: [`EPOCH_SLACK`] ahead of this clock. Anything above it is
/// refused, so no datagram or notice can move an epoch out of reach of genuine ones.
pub fn epoch_limit() -> u64 {
    let ahead = now_micros().saturating_add(EPOCH_SLACK.as_micros() as u64);
    ahead.saturating_mul(1 << 10) | 0x3ff
}

/// Whether a request sent at `sent` (the client's clock) is young enough to answer at `now`
/// (this peer's clock), allowing [`REQUEST_TTL`] either way for clocks that disagree.
pub fn request_is_fresh(sent: u64, now: u64) -> bool {
    let ttl = REQUEST_TTL.as_micros() as u64;
    sent.saturating_add(ttl) >= now && sent <= now.saturating_add(ttl)
}

/// Takes the next counter from `last` (the last one used): `None` once `u64::MAX` has been
/// used, so a counter never wraps around to values a receiver has already seen.
pub fn next_counter(last: &AtomicU64) -> Option<u64> {
    last.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_add(1))
        .ok()
        .map(|c| c + 1)
}

/// Why an authentic datagram was not fresh. Counted as replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// This counter was already accepted in this epoch.
    Duplicate,
    /// More than [`WINDOW`] below the highest counter seen in this epoch.
    TooOld,
    /// From an older incarnation of the sender than one already seen (or than a forgotten
    /// client session).
    OldEpoch,
    /// Bound to an earlier incarnation of this receiver (sent before it restarted, or replayed
    /// since).
    StaleRecipient,
    /// Addressed to another peer or client.
    WrongRecipient,
    /// Its sender epoch is more than [`EPOCH_SLACK`] ahead of this receiver's clock: forged,
    /// or the two clocks disagree by that much.
    Ahead,
    /// A client request sent more than [`REQUEST_TTL`] ago (or ahead) by this peer's clock:
    /// held back and delivered late, or the two clocks disagree by that much.
    Expired,
}

impl fmt::Display for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Replay::Duplicate => "a counter already seen (a replay or a duplicate)",
            Replay::TooOld => "a counter below the replay window",
            Replay::OldEpoch => "from an older incarnation of its sender",
            Replay::StaleRecipient => {
                "bound to an earlier incarnation of this peer (a replay, or its sender has not learned yet that we restarted; it has been told)"
            }
            Replay::WrongRecipient => "addressed to someone else",
            Replay::Ahead => {
                "its sender's epoch is far ahead of this clock (forged, or the clocks disagree)"
            }
            Replay::Expired => {
                "a request sent too long ago by this clock (held back, or the clocks disagree)"
            }
        })
    }
}

/// A sliding window over one sender incarnation's counters: each counter is accepted once, and
/// only if it is above, or at most [`WINDOW`] below, the highest accepted so far (RFC 6479's
/// bitmap, as IPsec and WireGuard keep).
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// Highest counter accepted; meaningful once `any`.
    top: u64,
    any: bool,
    /// Bit `c % 64` of word `(c / 64) % WINDOW_WORDS` is set once counter `c` is accepted.
    bits: [u64; WINDOW_WORDS],
}

impl Default for ReplayWindow {
    fn default() -> ReplayWindow {
        ReplayWindow::new()
    }
}

impl ReplayWindow {
    pub fn new() -> ReplayWindow {
        ReplayWindow {
            top: 0,
            any: false,
            bits: [0; WINDOW_WORDS],
        }
    }

    /// Whether `counter` would be accepted: new, and within the window. Changes nothing.
    pub fn check(&self, counter: u64) -> Result<(), Replay> {
        if !self.any || counter > self.top {
            return Ok(());
        }
        if self.top - counter >= WINDOW {
            return Err(Replay::TooOld);
        }
        if self.bits[Self::word(counter)] & Self::bit(counter) != 0 {
            return Err(Replay::Duplicate);
        }
        Ok(())
    }

    /// Accepts `counter` if it is new and within the window, and remembers it.
    pub fn accept(&mut self, counter: u64) -> Result<(), Replay> {
        self.check(counter)?;
        self.mark(counter);
        Ok(())
    }

    fn word(c: u64) -> usize {
        ((c / 64) % WINDOW_WORDS as u64) as usize
    }

    fn bit(c: u64) -> u64 {
        1u64 << (c % 64)
    }

    /// Remembers `counter`, which [`ReplayWindow::check`] has passed.
    fn mark(&mut self, counter: u64) {
        if !self.any || counter > self.top {
            let (from, to) = (self.top / 64, counter / 64);
            let stale = if self.any { to - from } else { u64::MAX };
            if stale >= WINDOW_WORDS as u64 {
                self.bits = [0; WINDOW_WORDS];
            } else {
                // The words of the blocks the window slides over now hold older counters.
                for block in from + 1..=to {
                    self.bits[Self::word(block * 64)] = 0;
                }
            }
            self.any = true;
            self.top = counter;
        }
        self.bits[Self::word(counter)] |= Self::bit(counter);
    }
}

/// What a receiver knows of one sender: its newest incarnation and that incarnation's window.
#[derive(Clone, Debug)]
pub struct SenderState {
    pub epoch: u64,
    /// The newest key (lowest slot) it has used in this epoch.
    pub slot: usize,
    window: ReplayWindow,
}

/// The outcome of [`admit`] for an authentic datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Fresh; `new_epoch` if it starts a new incarnation of its sender (its first datagram).
    Fresh { new_epoch: bool },
    /// Not fresh; `min_epoch`, if not 0, is the least epoch the sender must move to.
    Refused { why: Replay, min_epoch: u64 },
}

/// The freshness rule for one authentic datagram from a sender with state `state` (None: not
/// heard from in this receiver's incarnation, or forgotten), `floor` being the newest epoch of
/// any forgotten sender of its kind. Changes nothing: the state moves only by [`record`], once
/// the datagram is accepted whole (recipient and recipient epoch checked too), so a datagram
/// that is refused for any reason leaves no trace. `Err` holds why and, if not 0, the least
/// epoch the sender must move to.
pub fn check(
    state: Option<&SenderState>,
    floor: u64,
    epoch: u64,
    counter: u64,
) -> Result<(), (Replay, u64)> {
    match state {
        Some(s) if epoch == s.epoch => s.window.check(counter).map_err(|why| (why, 0)),
        Some(s) if epoch < s.epoch => Err((Replay::OldEpoch, s.epoch.saturating_add(1))),
        Some(_) => Ok(()),
        None if epoch <= floor => Err((Replay::OldEpoch, floor.saturating_add(1))),
        None => Ok(()),
    }
}

/// Records an accepted datagram that [`check`] passed; true if it starts a new incarnation of
/// its sender.
pub fn record(state: &mut Option<SenderState>, epoch: u64, counter: u64, slot: usize) -> bool {
    match state {
        Some(s) => s.record(epoch, counter, slot),
        None => {
            *state = Some(SenderState::new(epoch, counter, slot));
            true
        }
    }
}

/// [`check`], then [`record`] if it passed.
pub fn admit(
    state: &mut Option<SenderState>,
    floor: u64,
    epoch: u64,
    counter: u64,
    slot: usize,
) -> Admission {
    match check(state.as_ref(), floor, epoch, counter) {
        Err((why, min_epoch)) => Admission::Refused { why, min_epoch },
        Ok(()) => Admission::Fresh {
            new_epoch: record(state, epoch, counter, slot),
        },
    }
}

impl SenderState {
    /// A sender's first datagram in `epoch`.
    fn new(epoch: u64, counter: u64, slot: usize) -> SenderState {
        let mut window = ReplayWindow::new();
        window.mark(counter);
        SenderState {
            epoch,
            slot,
            window,
        }
    }

    /// Records a checked datagram; true if it starts a newer incarnation.
    fn record(&mut self, epoch: u64, counter: u64, slot: usize) -> bool {
        if epoch == self.epoch {
            self.window.mark(counter);
            self.slot = self.slot.min(slot);
            false
        } else {
            *self = SenderState::new(epoch, counter, slot);
            true
        }
    }
}

/// A fast hash for keys that only authentic datagrams put in a map (random session IDs, the
/// source addresses of verified requests): an unauthenticated sender cannot choose them, so
/// SipHash's protection against chosen collisions buys nothing here but time.
#[derive(Clone, Copy, Default)]
struct FastHash(u64);

impl std::hash::Hasher for FastHash {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // FxHash's step (as in rustc), then a final mix in `finish`.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        let z = self.0;
        z ^ (z >> 29)
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHash>>;

// ---------------------------------------------------------------------------------------------
// Bounded maps

/// The client sessions a peer remembers: the [`CLIENT_SESSIONS`] most recently heard, in two
/// generations (a session heard in the older one moves to the newer; when the newer is full,
/// the older is forgotten). Forgetting a session raises `floor` to its epoch, so that its
/// datagrams, and those of any session older than it, cannot be replayed as a new session's.
#[derive(Debug, Default)]
pub struct Sessions {
    young: FastMap<u64, SenderState>,
    old: FastMap<u64, SenderState>,
    /// The newest epoch of a forgotten session; an unknown session must be newer.
    pub floor: u64,
}

impl Sessions {
    /// [`check`] for a datagram of client `session`; also says whether the session is known.
    fn check(&self, session: u64, epoch: u64, counter: u64) -> (Result<(), (Replay, u64)>, bool) {
        let state = self.young.get(&session).or_else(|| self.old.get(&session));
        (check(state, self.floor, epoch, counter), state.is_some())
    }

    /// [`record`] for a datagram of client `session` that [`Sessions::check`] passed. A known
    /// session is updated in place (the common case: no map is changed).
    fn record(&mut self, session: u64, epoch: u64, counter: u64, slot: usize) {
        if let Some(s) = self.young.get_mut(&session) {
            s.record(epoch, counter, slot);
            return;
        }
        let mut state = self.old.remove(&session);
        record(&mut state, epoch, counter, slot);
        if let Some(state) = state {
            self.put(session, state);
        }
    }

    /// [`Sessions::check`], then [`Sessions::record`] if it passed.
    #[cfg(test)]
    fn admit(&mut self, session: u64, epoch: u64, counter: u64, slot: usize) -> (Admission, bool) {
        let (checked, known) = self.check(session, epoch, counter);
        let admission = match checked {
            Err((why, min_epoch)) => Admission::Refused { why, min_epoch },
            Ok(()) => {
                let new_epoch = self
                    .young
                    .get(&session)
                    .or_else(|| self.old.get(&session))
                    .is_none_or(|s| s.epoch != epoch);
                self.record(session, epoch, counter, slot);
                Admission::Fresh { new_epoch }
            }
        };
        (admission, known)
    }

    fn put(&mut self, session: u64, state: SenderState) {
        if self.young.len() >= CLIENT_SESSIONS / 2 {
            let forgotten = std::mem::replace(&mut self.old, std::mem::take(&mut self.young));
            if let Some(newest) = forgotten.values().map(|s| s.epoch).max() {
                self.floor = self.floor.max(newest);
            }
        }
        self.young.insert(session, state);
    }

    /// Sessions remembered.
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A map that keeps at most about `cap` entries, forgetting the least recently inserted half at
/// a time; O(1) per operation.
#[derive(Debug)]
struct TwoGenerations<K, V> {
    young: FastMap<K, V>,
    old: FastMap<K, V>,
    cap: usize,
}

impl<K: std::hash::Hash + Eq + Copy, V: Copy> TwoGenerations<K, V> {
    fn new(cap: usize) -> Self {
        TwoGenerations {
            young: FastMap::default(),
            old: FastMap::default(),
            cap: cap.max(2),
        }
    }

    fn get(&self, k: &K) -> Option<V> {
        self.young.get(k).or_else(|| self.old.get(k)).copied()
    }

    fn insert(&mut self, k: K, v: V) {
        if self.young.len() >= self.cap / 2 && !self.young.contains_key(&k) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(k, v);
    }
}

/// At most one notice per sender per [`NOTICE_INTERVAL`], and [`NOTICES_PER_SECOND`] in all
/// to peers and as many again to clients: a notice answers only authentic datagrams, but a
/// replayed one is authentic too, and a flood of client handshakes must not use up the
/// notices a restarted peer needs to rejoin.
#[derive(Debug)]
struct NoticeLimiter {
    last: TwoGenerations<(bool, u64), Instant>,
    /// Per class (peers, clients): when its current second began, and notices sent in it.
    second: [Option<Instant>; 2],
    in_second: [u32; 2],
}

impl NoticeLimiter {
    fn new() -> NoticeLimiter {
        NoticeLimiter {
            last: TwoGenerations::new(2 * CLIENT_SESSIONS),
            second: [None; 2],
            in_second: [0; 2],
        }
    }

    fn allow(&mut self, now: Instant, client: bool, sender: u64) -> bool {
        if let Some(last) = self.last.get(&(client, sender)) {
            if now.saturating_duration_since(last) < NOTICE_INTERVAL {
                return false;
            }
        }
        let class = usize::from(client);
        match self.second[class] {
            Some(s) if now.saturating_duration_since(s) < Duration::from_secs(1) => {
                if self.in_second[class] >= NOTICES_PER_SECOND {
                    return false;
                }
            }
            _ => {
                self.second[class] = Some(now);
                self.in_second[class] = 0;
            }
        }
        self.in_second[class] += 1;
        self.last.insert((client, sender), now);
        true
    }
}

// ---------------------------------------------------------------------------------------------
// The peer side

/// Counters of what authentication dropped, for `status` and the logs.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// Datagrams with a missing or wrong tag (or an unknown key).
    pub auth_failures: AtomicU64,
    /// Authentic datagrams that were not fresh (replays, stale sessions).
    pub replays: AtomicU64,
    /// Notices sent.
    pub notices: AtomicU64,
}

/// What a peer knows of another peer, shared by its node thread (sealing) and its receiver
/// thread (which learns the other peer's epoch and key).
#[derive(Debug)]
struct Link {
    /// The last counter used towards it.
    counter: AtomicU64,
    /// Its current epoch as far as we know; 0 until it has sent us a fresh datagram.
    epoch: AtomicU64,
    /// The key slot to seal with towards it: the newest key (lowest slot) it has used in its
    /// current incarnation, which it therefore holds.
    slot: AtomicU8,
    /// When we last also sealed to it with the current key while `slot` was the previous one
    /// (microseconds since the `PeerAuth` was made; 0: never).
    probed: AtomicU64,
    /// The body of the last datagram sent to it while its epoch was unknown, resent once the
    /// notice it provokes tells us the epoch.
    unsent: Mutex<Option<Vec<u8>>>,
}

impl Link {
    fn new() -> Link {
        Link {
            counter: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            slot: AtomicU8::new(0),
            probed: AtomicU64::new(0),
            unsent: Mutex::new(None),
        }
    }
}

/// A client session to seal replies to: who sent the latest request from an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientTag {
    pub session: u64,
    pub epoch: u64,
    pub slot: usize,
    /// The user whose key sealed the request; `None`: the operator's key (slot `slot`).
    pub user: Option<UserRef>,
}

/// A peer's authentication state, shared between its node thread (which seals peer messages
/// and replies) and its receiver thread (whose [`Gate`] opens datagrams).
#[derive(Debug)]
pub struct PeerAuth {
    keys: Arc<Keys>,
    me: NodeId,
    /// This incarnation's epoch; moved forward only by a peer's notice.
    epoch: AtomicU64,
    /// One per peer we may talk to. Grows as configurations add members (never shrinks: a
    /// link's counter must never restart within our epoch, or the peer would refuse it).
    links: RwLock<BTreeMap<NodeId, Arc<Link>>>,
    /// A joining peer that has no configuration yet takes authentic datagrams from any node
    /// (every member holds the cluster secret) and makes a link for each new sender.
    open: AtomicBool,
    /// The last counter used towards clients (replies and notices; clients keep no window).
    client_counter: AtomicU64,
    /// Source address → the session that sent the latest request from it.
    replies: Mutex<TwoGenerations<SocketAddr, ClientTag>>,
    /// When this was made, the origin of `Link::probed`.
    created: Instant,
    /// Every user's key, from the replicated users table (the node thread replaces it).
    users: RwLock<Arc<UserTable>>,
    pub stats: AuthStats,
}

/// Where a datagram the receiver thread makes (a notice or a resend) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// A peer, at the address its config gives (never a datagram's source address).
    Peer(NodeId),
    /// A peer at the address its config gives or, while this peer has none for it (a member
    /// added while we were away), at the source of its authentic datagram: the notice that
    /// completes its handshake must reach it before its messages, which carry its address,
    /// can be read.
    PeerOr(NodeId, SocketAddr),
    /// A client, at the source address of its request.
    Addr(SocketAddr),
}

impl PeerAuth {
    /// The state of peer `me`, whose configured peers are `peers`.
    pub fn new(keys: Arc<Keys>, me: NodeId, peers: impl IntoIterator<Item = NodeId>) -> PeerAuth {
        PeerAuth {
            keys,
            me,
            epoch: AtomicU64::new(fresh_epoch()),
            links: RwLock::new(
                peers
                    .into_iter()
                    .filter(|&p| p != me)
                    .map(|p| (p, Arc::new(Link::new())))
                    .collect(),
            ),
            open: AtomicBool::new(false),
            client_counter: AtomicU64::new(0),
            replies: Mutex::new(TwoGenerations::new(4 * CLIENT_SESSIONS)),
            created: Instant::now(),
            users: RwLock::new(Arc::new(UserTable::default())),
            stats: AuthStats::default(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The link to peer `id`, if it is one we know.
    fn link(&self, id: NodeId) -> Option<Arc<Link>> {
        let links = self.links.read().unwrap_or_else(|p| p.into_inner());
        links.get(&id).cloned()
    }

    /// Takes the users of the replicated state from now on: a removed user's requests fail
    /// to open from the next datagram on, and are answered no more.
    pub fn set_users(&self, users: &[crate::raft::UserRecord]) {
        let table = Arc::new(UserTable::new(&self.keys.masters, users));
        *self.users.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    /// The user table in force.
    pub fn users(&self) -> Arc<UserTable> {
        Arc::clone(&self.users.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Seals `buf` for a client with the key of `slot` or of `user`; false if that user is
    /// gone (nothing is to be sent then).
    fn seal_for_client(
        &self,
        slot: usize,
        user: Option<UserRef>,
        header: &Header,
        buf: &mut Vec<u8>,
    ) -> bool {
        match user {
            None => {
                seal(&self.keys, slot, header, buf);
                true
            }
            Some(user) => seal_as_user(&self.users(), user, header, buf),
        }
    }

    /// Whether datagrams sealed by node `id` are taken: a known peer, or any node while open.
    pub fn knows(&self, id: NodeId) -> bool {
        id != self.me && (self.open.load(Ordering::Relaxed) || self.link(id).is_some())
    }

    /// How many peers this one has a link to.
    pub fn link_count(&self) -> usize {
        self.links.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Starts talking to peer `id` (a member a configuration added); no-op if known.
    pub fn add_peer(&self, id: NodeId) {
        if id == self.me {
            return;
        }
        let mut links = self.links.write().unwrap_or_else(|p| p.into_inner());
        links.entry(id).or_insert_with(|| Arc::new(Link::new()));
    }

    /// Whether datagrams from nodes we have no link to are taken (a joining peer's state
    /// until it has a configuration).
    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::Relaxed);
    }

    /// This incarnation's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// What we know of peer `id`'s epoch (0: nothing yet).
    pub fn peer_epoch(&self, id: NodeId) -> u64 {
        self.link(id).map_or(0, |l| l.epoch.load(Ordering::Relaxed))
    }

    /// Seals the body in `buf` (after [`HEADER_LEN`] bytes of room) for peer `to` and hands each
    /// datagram to `send`: one, or one per key while `to`'s epoch is unknown (so that a peer
    /// that has only our previous key still answers), or, once per [`KEY_PROBE_INTERVAL`] to
    /// a peer we seal to with the previous key, a second copy under the current key (Raft takes
    /// duplicates; a peer that has the new key learns that we do). Leaves the last datagram
    /// sealed in `buf`.
    pub fn seal_to_peer(
        &self,
        to: NodeId,
        buf: &mut Vec<u8>,
        mut send: impl FnMut(&[u8]),
    ) -> Result<(), String> {
        let link = self
            .link(to)
            .ok_or_else(|| format!("node {to} is not a configured peer"))?;
        let their = link.epoch.load(Ordering::Acquire);
        if self.keys.peer.is_empty() {
            return Err("no peer key: a client credential cannot seal peer messages".into());
        }
        let slots = if their == 0 {
            if let Ok(mut unsent) = link.unsent.lock() {
                *unsent = Some(buf[HEADER_LEN..].to_vec());
            }
            (0..self.keys.len()).collect::<Vec<_>>().into_iter()
        } else {
            let slot = usize::from(link.slot.load(Ordering::Relaxed)).min(self.keys.len() - 1);
            if slot > 0 && self.probe_due(&link) {
                // Previous key first: the copy the peer surely takes.
                (0..slot + 1).rev().collect::<Vec<_>>().into_iter()
            } else {
                vec![slot].into_iter()
            }
        };
        // Sealing encrypts the body in place: keep it to seal another copy.
        let body = (slots.len() > 1).then(|| buf[HEADER_LEN..].to_vec());
        for (i, slot) in slots.enumerate() {
            if let (true, Some(body)) = (i > 0, &body) {
                refill(buf, body);
            }
            let counter = next_counter(&link.counter)
                .ok_or_else(|| format!("counter towards node {to} exhausted; restart this peer"))?;
            let header = Header {
                kind: Kind::Peer,
                key_id: 0,
                sender: self.me,
                sender_epoch: self.epoch(),
                recipient: to,
                recipient_epoch: their,
                counter,
                sent: now_micros(),
            };
            seal(&self.keys, slot, &header, buf);
            send(buf);
        }
        Ok(())
    }

    /// Whether it is time to try the current key on `link` again; if so, records the try.
    fn probe_due(&self, link: &Link) -> bool {
        let now = self.created.elapsed().as_micros() as u64 + 1;
        let last = link.probed.load(Ordering::Relaxed);
        let interval = KEY_PROBE_INTERVAL.as_micros() as u64;
        (last == 0 || now.saturating_sub(last) >= interval)
            && link
                .probed
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Seals the reply body in `buf` for the client whose latest request came from `to`, with
    /// the key that request used. Fails if no authenticated request came from `to` recently.
    pub fn seal_reply(&self, to: SocketAddr, buf: &mut Vec<u8>) -> Result<(), String> {
        let tag = self
            .replies
            .lock()
            .map_err(|_| "reply book poisoned".to_string())?
            .get(&to)
            .ok_or_else(|| format!("no authenticated request from {to} to answer"))?;
        let counter = next_counter(&self.client_counter)
            .ok_or("the counter towards clients is exhausted; restart this peer")?;
        let header = Header {
            kind: Kind::Reply,
            key_id: 0,
            sender: self.me,
            sender_epoch: self.epoch(),
            recipient: tag.session,
            recipient_epoch: tag.epoch,
            counter,
            sent: now_micros(),
        };
        if self.seal_for_client(tag.slot, tag.user, &header, buf) {
            Ok(())
        } else {
            Err(format!(
                "the user that sent the request from {to} has been removed"
            ))
        }
    }

    fn remember_client(&self, src: SocketAddr, tag: ClientTag) {
        if let Ok(mut book) = self.replies.lock() {
            if book.get(&src) != Some(tag) {
                book.insert(src, tag);
            }
        }
    }
}

/// What the receiver thread hands on from an authentic, fresh datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted<'a> {
    /// A peer message's JSON, from configured peer `from`.
    Peer { from: NodeId, body: &'a [u8] },
    /// A client request's JSON; its reply will be sealed to `tag`. `role` is what the key
    /// that sealed it may do: a user's role, or admin for the operator's key.
    Request {
        tag: ClientTag,
        body: &'a [u8],
        role: UserRole,
    },
    /// A notice: handled here, nothing for the core.
    Notice { from: NodeId },
}

/// Why the receiver thread dropped a datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Failed authentication: counted in `auth_failures`, never answered.
    Auth(AuthError),
    /// Authentic but not fresh: counted as a replay.
    Replay { why: Replay, sender: String },
    /// Authentic, but sealed by a node ID that is not a configured peer.
    Misdirected(String),
    /// Authentic, but of a kind peers do not take (a reply, a notice to a client).
    NotTaken(Kind),
    /// Authentic and fresh, from a sender that does not know our epoch yet (its first
    /// datagram to us, which a notice answers): not a drop worth a warning.
    Handshake,
}

/// The header of a datagram whose tag verified, and the key slot that verified it.
#[derive(Clone, Copy, Debug)]
struct Sealed {
    header: Header,
    slot: usize,
    /// The user whose key opened it (a request), and its role.
    user: Option<(UserRef, UserRole)>,
}

/// The receiver thread's half of a peer's authentication: opens datagrams, keeps the replay
/// windows, and queues notices (and the resends they allow) for the transport to send.
#[derive(Debug)]
pub struct Gate {
    auth: Arc<PeerAuth>,
    peers: BTreeMap<NodeId, Option<SenderState>>,
    sessions: Sessions,
    notices: NoticeLimiter,
    outbox: Vec<(Dest, Vec<u8>)>,
    /// The plaintext of the datagram last opened, reused.
    plain: Vec<u8>,
}

impl Gate {
    pub fn new(auth: Arc<PeerAuth>) -> Gate {
        let peers = auth
            .links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|&p| (p, None))
            .collect();
        Gate {
            auth,
            peers,
            sessions: Sessions::default(),
            notices: NoticeLimiter::new(),
            outbox: Vec::new(),
            plain: Vec::new(),
        }
    }

    pub fn auth(&self) -> &Arc<PeerAuth> {
        &self.auth
    }

    /// Datagrams to send on this thread's behalf (notices, resends), taken.
    pub fn take_outgoing(&mut self) -> Vec<(Dest, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// Client sessions remembered.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Opens a datagram from `src`: verifies and decrypts it, then its recipient and freshness. Counts
    /// what it drops. Never panics, whatever the bytes.
    pub fn admit(
        &mut self,
        bytes: &[u8],
        src: SocketAddr,
        now: Instant,
    ) -> Result<Admitted<'_>, Refused> {
        let auth = Arc::clone(&self.auth);
        let stats = &auth.stats;
        let opened = match self.open(bytes) {
            Ok(o) => o,
            Err(e) => {
                stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Auth(e));
            }
        };
        let h = opened.header;
        let me = self.auth.me;
        let client = h.kind.from_client();
        match h.kind {
            Kind::Peer | Kind::NoticeToPeer | Kind::Request => {}
            Kind::Reply | Kind::NoticeToClient => return Err(Refused::NotTaken(h.kind)),
        }
        if !client && self.auth.link(h.sender).is_none() && self.auth.link_count() < MAX_LINKS {
            // Any holder of the secret is a member of some cluster: a joining peer takes it
            // (open), and so does a member, for a peer of its own cluster that joined while
            // it was away. The cluster ID in the message decides whether it is heard.
            self.auth.add_peer(h.sender);
        }
        if !client && self.auth.link(h.sender).is_none() {
            return Err(Refused::Misdirected(format!(
                "sealed by node {}, which is not a configured peer of node {me}",
                h.sender
            )));
        }
        // Described only when dropped: no allocation on the path of an accepted datagram.
        let replay = |why: Replay| {
            stats.replays.fetch_add(1, Ordering::Relaxed);
            let sender = if client {
                format!("client session {:016x}", h.sender)
            } else {
                format!("node {}", h.sender)
            };
            Refused::Replay { why, sender }
        };
        if h.recipient != me {
            return Err(replay(Replay::WrongRecipient));
        }
        if h.sender_epoch > epoch_limit() {
            // Adopting it would put the sender's genuine datagrams out of reach: no state, no
            // notice (telling the real sender to move that far would do the same).
            return Err(replay(Replay::Ahead));
        }
        if client && !request_is_fresh(h.sent, now_micros()) {
            return Err(replay(Replay::Expired));
        }
        // Only checked here: the sender's state moves once the datagram is accepted whole
        // (below), so a datagram refused for any reason, a stale one too, changes nothing.
        let (checked, known_sender) = if client {
            self.sessions.check(h.sender, h.sender_epoch, h.counter)
        } else {
            let state = self.peers.get(&h.sender).and_then(|s| s.as_ref());
            (check(state, 0, h.sender_epoch, h.counter), true)
        };
        let admission = match checked {
            Err((why, min_epoch)) => Admission::Refused { why, min_epoch },
            Ok(()) => Admission::Fresh { new_epoch: false },
        };
        match admission {
            Admission::Refused { why, min_epoch } => {
                // A peer is told at its configured address (a spoofed source gets nothing);
                // a client only if it is unknown to us (new, or forgotten: it must move its
                // epoch past the floor). A known client's older epoch is a replay.
                if why == Replay::OldEpoch && (!client || !known_sender) {
                    self.notify(now, src, &opened, min_epoch);
                }
                Err(replay(why))
            }
            Admission::Fresh { .. } if h.recipient_epoch != self.auth.epoch() => {
                // Not recorded: a replay of it draws at most the notices the limiter allows.
                self.notify(now, src, &opened, 0);
                if h.recipient_epoch == 0 {
                    // Its sender does not know us yet: the first half of a handshake.
                    Err(Refused::Handshake)
                } else {
                    Err(replay(Replay::StaleRecipient))
                }
            }
            Admission::Fresh { .. } if client => {
                self.sessions
                    .record(h.sender, h.sender_epoch, h.counter, opened.slot);
                let tag = ClientTag {
                    session: h.sender,
                    epoch: h.sender_epoch,
                    slot: opened.slot,
                    user: opened.user.map(|(u, _)| u),
                };
                self.auth.remember_client(src, tag);
                Ok(Admitted::Request {
                    tag,
                    body: &self.plain,
                    role: opened.user.map_or(UserRole::Admin, |(_, role)| role),
                })
            }
            Admission::Fresh { .. } => {
                let state = self.peers.entry(h.sender).or_default();
                record(state, h.sender_epoch, h.counter, opened.slot);
                self.learn_peer(h.sender, h.sender_epoch, opened.slot);
                if h.kind == Kind::NoticeToPeer {
                    self.heed();
                    Ok(Admitted::Notice { from: h.sender })
                } else {
                    Ok(Admitted::Peer {
                        from: h.sender,
                        body: &self.plain,
                    })
                }
            }
        }
    }

    /// Verifies and decrypts a datagram into `self.plain`: with the operator's and peers'
    /// keys, or, for a request sealed with a key id that is none of theirs, with a user's.
    fn open(&mut self, bytes: &[u8]) -> Result<Sealed, AuthError> {
        let keys = &self.auth.keys;
        let user_request = bytes.len() >= HEADER_LEN
            && bytes[2] == Kind::Request as u8
            && !keys
                .client
                .iter()
                .chain(&keys.peer)
                .any(|k| bytes[4..8] == k.id.to_le_bytes());
        if user_request {
            let table = self.auth.users();
            let (header, user, role) = open_as_user(bytes, &table, &mut self.plain)?;
            return Ok(Sealed {
                header,
                slot: 0,
                user: Some((user, role)),
            });
        }
        match open_into(bytes, keys, &mut self.plain) {
            Ok((header, slot)) => Ok(Sealed {
                header,
                slot,
                user: None,
            }),
            // A user's key on a datagram other than a request: a user posing as a peer.
            Err(AuthError::UnknownKey(id)) if self.auth.users().has_id(id) => Err(
                AuthError::WrongSide(Kind::from_u8(bytes[2]).unwrap_or(Kind::Peer)),
            ),
            Err(e) => Err(e),
        }
    }

    /// Seals the reply body in `buf` (after [`HEADER_LEN`] bytes of room) to the client whose
    /// latest request came from `to` and queues it with the notices; for a refusal the
    /// receiver makes itself (a role that may not do what it asks). False if it cannot be.
    pub fn queue_reply(&mut self, to: SocketAddr, mut buf: Vec<u8>) -> bool {
        if self.auth.seal_reply(to, &mut buf).is_err() {
            return false;
        }
        self.outbox.push((Dest::Addr(to), buf));
        true
    }

    /// A fresh datagram from peer `id`: seal to it for this epoch and key from now on, and
    /// resend what it could not take before we knew its epoch.
    fn learn_peer(&mut self, id: NodeId, epoch: u64, slot: usize) {
        let Some(link) = self.auth.link(id) else {
            return;
        };
        if link.epoch.load(Ordering::Acquire) == epoch {
            // It holds every key it has used: seal with the newest of them.
            link.slot.fetch_min(slot as u8, Ordering::Relaxed);
            return;
        }
        // A newer incarnation (admission refuses older ones).
        link.slot.store(slot as u8, Ordering::Relaxed);
        let was = link.epoch.swap(epoch, Ordering::AcqRel);
        if was == 0 {
            let unsent = link.unsent.lock().ok().and_then(|mut u| u.take());
            if let Some(body) = unsent {
                let mut buf = with_room(&body);
                let mut sealed = Vec::new();
                let _ = self
                    .auth
                    .seal_to_peer(id, &mut buf, |b| sealed.push(b.to_vec()));
                for b in sealed {
                    self.outbox.push((Dest::Peer(id), b));
                }
            }
        }
    }

    /// A notice's body: the least epoch its sender accepts from us.
    fn heed(&mut self) {
        let Ok(min) = <[u8; 8]>::try_from(&self.plain[..]) else {
            return;
        };
        let min = u64::from_le_bytes(min);
        if min > epoch_limit() {
            log::warn!(
                "a peer asks us to move our epoch to {min}, more than {EPOCH_SLACK:?} ahead of our clock: ignored (forged, or the clocks disagree)"
            );
            return;
        }
        if min > self.auth.epoch() {
            let moved = min.max(fresh_epoch());
            log::warn!(
                "a peer does not accept our epoch {} (our clock may have stepped back since an earlier start); moving to {moved}",
                self.auth.epoch()
            );
            self.auth.epoch.store(moved, Ordering::Relaxed);
        }
    }

    /// Queues a notice answering `opened` (which was authentic but stale), unless it is itself
    /// a notice or a notice went to its sender very recently.
    fn notify(&mut self, now: Instant, src: SocketAddr, opened: &Sealed, min_epoch: u64) {
        let h = opened.header;
        let client = h.kind.from_client();
        if h.kind.is_notice() || !self.notices.allow(now, client, h.sender) {
            return;
        }
        let (kind, dest, counter) = if client {
            (
                Kind::NoticeToClient,
                Dest::Addr(src),
                next_counter(&self.auth.client_counter),
            )
        } else {
            let Some(link) = self.auth.link(h.sender) else {
                return;
            };
            (
                Kind::NoticeToPeer,
                Dest::PeerOr(h.sender, src),
                next_counter(&link.counter),
            )
        };
        let Some(counter) = counter else {
            return;
        };
        let header = Header {
            kind,
            key_id: 0,
            sender: self.auth.me,
            sender_epoch: self.auth.epoch(),
            recipient: h.sender,
            recipient_epoch: h.sender_epoch,
            counter,
            sent: now_micros(),
        };
        let mut buf = with_room(&min_epoch.to_le_bytes());
        let user = opened.user.map(|(u, _)| u);
        if !self
            .auth
            .seal_for_client(opened.slot, user, &header, &mut buf)
        {
            return;
        }
        self.auth.stats.notices.fetch_add(1, Ordering::Relaxed);
        self.outbox.push((dest, buf));
    }
}

mod client;
mod users;
pub use client::{ClientAuth, ClientDrop, FromPeer};
pub use users::{fill_credential, Credential, UserRef, UserTable};
use users::{open_as_user, seal_as_user};

#[cfg(test)]
mod tests;
