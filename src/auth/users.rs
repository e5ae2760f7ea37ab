//! Users' credentials: each user of the replicated users table ([`crate::raft::users`]) has
//! a key of its own, which seals its requests and the replies to them, so that a peer knows
//! who asks (and with which role) from the key that opened the request.
//!
//! A user's key is never stored: every peer derives it from the cluster secret, the cluster
//! name and the entry that added the user, `K = BLAKE3-keyed(M, index ‖ term ‖ name)` with
//! `M = BLAKE3-derive-key("raft 2026 user credential master v1", secret key ‖ cluster)`, so
//! the log, the WAL and snapshots carry only names, roles and indices. The answering leader
//! derives it once more to hand it out in the reply to `user add` (sealed to the admin's
//! session); the user keeps it in a credential file. The datagram key is derived from `K`
//! with its own label, as the operator's is from the secret: a user credential seals
//! requests only, never peer traffic.
//!
//! Adding a user again (same name) gives a new entry, so a new key; removing it drops its
//! keys from every peer's table as the removal applies there, and its datagrams then fail to
//! open (counted as authentication failures, never answered).

use super::*;
use crate::raft::users::{UserRecord, UserRole};
use serde::{Deserialize, Serialize};

const USER_MASTER_CONTEXT: &str = "raft 2026 user credential master v1";
const USER_DATAGRAM_CONTEXT: &str = "raft 2026 user client datagram key v1";

/// The secret from which a peer derives every user's key, for one key of the secret file.
pub(super) fn user_master(raw: &[u8; KEY_BYTES], cluster: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(USER_MASTER_CONTEXT);
    h.update(raw);
    h.update(cluster.as_bytes());
    *h.finalize().as_bytes()
}

/// User `r`'s key under `master`.
fn user_key(master: &[u8; 32], r: &UserRecord) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(master);
    h.update(&r.index.to_le_bytes());
    h.update(&r.term.to_le_bytes());
    h.update(r.name.as_bytes());
    *h.finalize().as_bytes()
}

/// The key that seals a user's datagrams, from the user's key.
fn datagram_key(user_key: &[u8; 32]) -> AeadKey {
    // The cluster name is already in the user's key.
    AeadKey::derive(USER_DATAGRAM_CONTEXT, user_key, "")
}

/// Which user's key sealed a request: its key id and the index of the entry that added it
/// (an added-again user has a new index, so a reply is never sealed with a stale key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRef {
    pub id: u32,
    pub index: u64,
}

/// One user's datagram key, as a peer holds it.
struct UserKey {
    key: AeadKey,
    index: u64,
    role: UserRole,
}

/// The keys of every user, by key id, for the receiver and the node thread. Rebuilt whole
/// when the users change; never printed.
#[derive(Default)]
pub struct UserTable {
    by_id: HashMap<u32, Vec<UserKey>>,
    users: usize,
}

impl fmt::Debug for UserTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserTable({} users, redacted)", self.users)
    }
}

impl UserTable {
    /// The keys of `users` under every key of the secret (`masters`, current first).
    pub fn new(masters: &[[u8; 32]], users: &[UserRecord]) -> UserTable {
        let mut by_id: HashMap<u32, Vec<UserKey>> = HashMap::new();
        for r in users {
            for master in masters {
                let key = datagram_key(&user_key(master, r));
                by_id.entry(key.id).or_default().push(UserKey {
                    key,
                    index: r.index,
                    role: r.role,
                });
            }
        }
        UserTable {
            by_id,
            users: users.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.users
    }

    pub fn is_empty(&self) -> bool {
        self.users == 0
    }

    /// Whether some user's key has fingerprint `id`.
    pub fn has_id(&self, id: u32) -> bool {
        self.by_id.contains_key(&id)
    }

    fn get(&self, user: UserRef) -> Option<&UserKey> {
        self.by_id
            .get(&user.id)?
            .iter()
            .find(|k| k.index == user.index)
    }
}

/// Opens a request sealed with a user's key: the header's key id picks the candidates (one,
/// barring a fingerprint collision). Returns the header, the user and its role.
pub(super) fn open_as_user(
    bytes: &[u8],
    table: &UserTable,
    body: &mut Vec<u8>,
) -> Result<(Header, UserRef, UserRole), AuthError> {
    let header = Header::read(bytes)?;
    let Some(candidates) = table.by_id.get(&header.key_id) else {
        return Err(AuthError::UnknownKey(header.key_id));
    };
    if header.kind != Kind::Request {
        // A user's key seals requests only: nothing a user holds is taken as anything else.
        return Err(AuthError::WrongSide(header.kind));
    }
    let (head, rest) = bytes.split_at(HEADER_LEN);
    let (sealed, tag) = rest.split_at(rest.len() - MAC_LEN);
    for candidate in candidates {
        body.clear();
        body.extend_from_slice(sealed);
        let opened = candidate.key.with_cipher(head, |c| {
            c.decrypt_in_place_detached(&nonce(head), head, body, Tag::from_slice(tag))
        });
        if opened.is_ok() {
            let user = UserRef {
                id: header.key_id,
                index: candidate.index,
            };
            return Ok((header, user, candidate.role));
        }
    }
    body.clear();
    Err(AuthError::BadMac)
}

/// Seals `buf` (see [`seal`]) with user `user`'s key; false (and `buf` emptied) if the user
/// is gone (removed since its request came in: it is answered no more).
pub(super) fn seal_as_user(
    table: &UserTable,
    user: UserRef,
    header: &Header,
    buf: &mut Vec<u8>,
) -> bool {
    match table.get(user) {
        Some(k) => {
            seal_with(&k.key, header, buf);
            true
        }
        None => {
            buf.clear();
            false
        }
    }
}

/// Fills in the key of a `UserAdded` answer: the user's credential under the current key of
/// the secret (the answering peer holds it; nothing does if `keys` are a client's).
pub fn fill_credential(keys: &Keys, result: &mut crate::raft::ClientResult) {
    if let crate::raft::ClientResult::UserAdded {
        user,
        role,
        index,
        term,
        key,
    } = result
    {
        let r = UserRecord {
            name: user.clone(),
            role: *role,
            index: *index,
            term: *term,
            nonce: 0,
        };
        if let Some(c) = keys.user_credential(&r) {
            key.0 = hex(&c.key);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Keys {
    /// The client keys of a user credential: they seal requests and open the replies to them,
    /// and nothing else.
    pub fn for_user(credential: &Credential) -> Keys {
        Keys {
            peer: Vec::new(),
            client: vec![datagram_key(&credential.key)],
            masters: Vec::new(),
        }
    }

    /// User `r`'s key (its credential) under the current key of the secret; `None` for keys
    /// without the peers' secret (a client's).
    pub fn user_credential(&self, r: &UserRecord) -> Option<Credential> {
        let master = self.masters.first()?;
        Some(Credential {
            user: r.name.clone(),
            role: r.role,
            key: user_key(master, r),
        })
    }
}

/// A user's credential, as `client user add` prints it and the user keeps it in a file
/// (`{"user":"NAME","role":"ROLE","key":"64 hex digits"}`). Never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    pub role: UserRole,
    pub key: [u8; 32],
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}, {}, key redacted)", self.user, self.role)
    }
}

/// The credential file's JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialJson {
    user: String,
    role: UserRole,
    key: String,
}

impl Credential {
    /// The one JSON line of the credential file.
    pub fn to_json(&self) -> String {
        let key = hex(&self.key);
        serde_json::to_string(&CredentialJson {
            user: self.user.clone(),
            role: self.role,
            key,
        })
        .expect("plain data serializes")
    }

    /// Parses a credential's JSON.
    pub fn parse(text: &str) -> Result<Credential, String> {
        let json: CredentialJson = serde_json::from_str(text.trim()).map_err(|e| {
            format!(
                "not a credential ({e}); expected the line `client user add` printed: {{\"user\":\"NAME\",\"role\":\"ROLE\",\"key\":\"...\"}}"
            )
        })?;
        crate::raft::users::check_user_name(&json.user)?;
        let key = parse_key(&json.key).map_err(|e| format!("field `key`: {e}"))?;
        Ok(Credential {
            user: json.user,
            role: json.role,
            key,
        })
    }

    /// Reads and checks a credential file: a regular file only its owner can read or write
    /// (mode 0600 or stricter), holding one credential. Errors name the file.
    pub fn load(path: &Path) -> Result<Credential, String> {
        let err = |what: String| format!("credential file {}: {what}", path.display());
        let text = super::read_private_file(path, "client user add prints one").map_err(err)?;
        Credential::parse(&text).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, index: u64) -> UserRecord {
        UserRecord {
            name: name.into(),
            role: UserRole::Write,
            index,
            term: 1,
            nonce: 1,
        }
    }

    #[test]
    fn a_peer_opens_what_a_user_seals_and_knows_its_role() {
        let peers = Keys::random("c").unwrap();
        let ann = record("ann", 5);
        let cred = peers.user_credential(&ann).unwrap();
        let parsed = Credential::parse(&cred.to_json()).unwrap();
        assert_eq!(parsed, cred);
        assert!(!format!("{cred:?}").contains(&cred.to_json()[30..50]));
        let mine = Keys::for_user(&cred);
        assert!(
            mine.user_credential(&ann).is_none(),
            "a client derives none"
        );
        let header = Header {
            kind: Kind::Request,
            key_id: 0,
            sender: 9,
            sender_epoch: 1,
            recipient: 1,
            recipient_epoch: 0,
            counter: 1,
            sent: 0,
        };
        let mut buf = with_room(b"{\"hello\":1}");
        seal(&mine, 0, &header, &mut buf);
        let table = UserTable::new(&peers.masters, &[ann.clone(), record("bob", 6)]);
        let mut body = Vec::new();
        let (h, user, role) = open_as_user(&buf, &table, &mut body).unwrap();
        assert_eq!((h.sender, role, user.index), (9, UserRole::Write, 5));
        assert_eq!(body, b"{\"hello\":1}");
        // The operator's keys do not open it, and once removed, nor does the table.
        assert!(open(&buf, &peers).is_err());
        let removed = UserTable::new(&peers.masters, &[record("bob", 6)]);
        assert!(open_as_user(&buf, &removed, &mut body).is_err());
        // Added again: a new entry, a new key; the old credential is refused.
        let again = UserTable::new(&peers.masters, &[record("ann", 9)]);
        assert!(open_as_user(&buf, &again, &mut body).is_err());
        // A user key never seals peer traffic.
        let mut peer_msg = with_room(b"{}");
        let forged = Header {
            kind: Kind::Peer,
            ..header
        };
        let as_peer = Keys {
            peer: mine.client.clone(),
            client: Vec::new(),
            masters: Vec::new(),
        };
        seal(&as_peer, 0, &forged, &mut peer_msg);
        assert!(open(&peer_msg, &peers).is_err());
        assert_eq!(
            open_as_user(&peer_msg, &table, &mut body).map(|_| ()),
            Err(AuthError::WrongSide(Kind::Peer))
        );
    }

    #[test]
    fn a_user_handshakes_is_admitted_with_its_role_then_removed() {
        let k = Arc::new(Keys::random("c").unwrap());
        let peer = Arc::new(PeerAuth::new(Arc::clone(&k), 1, [2, 3]));
        let mut gate = Gate::new(Arc::clone(&peer));
        let ann = record("ann", 4);
        peer.set_users(std::slice::from_ref(&ann));
        let cred = k.user_credential(&ann).unwrap();
        let mut client = ClientAuth::new(Arc::new(Keys::for_user(&cred)), [1]).unwrap();
        let at: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let send = |client: &mut ClientAuth| {
            let mut buf = with_room(b"req");
            let mut out = Vec::new();
            client
                .seal_request::<()>(1, &mut buf, |b| {
                    out.push(b.to_vec());
                    Ok(())
                })
                .unwrap();
            out.remove(0)
        };
        let first = send(&mut client);
        assert_eq!(
            gate.admit(&first, at, Instant::now()),
            Err(Refused::Handshake)
        );
        // The notice is sealed with the user's key: the user's client opens it.
        let out = gate.take_outgoing();
        assert_eq!(client.open(&out[0].1), Ok(FromPeer::Notice { from: 1 }));
        let second = send(&mut client);
        let Ok(Admitted::Request { role, tag, .. }) = gate.admit(&second, at, Instant::now())
        else {
            panic!("not admitted");
        };
        assert_eq!(
            (role, tag.user.map(|u| u.index)),
            (UserRole::Write, Some(4))
        );
        let mut reply = with_room(b"ok");
        peer.seal_reply(at, &mut reply).unwrap();
        assert_eq!(
            client.open(&reply),
            Ok(FromPeer::Reply {
                from: 1,
                body: b"ok"
            })
        );
        // Removed: its next request fails to open (counted, unanswered), and a reply to its
        // earlier one is no longer sealed.
        peer.set_users(&[]);
        let failures = peer.stats.auth_failures.load(Ordering::Relaxed);
        let third = send(&mut client);
        assert_eq!(
            gate.admit(&third, at, Instant::now()),
            Err(Refused::Auth(AuthError::UnknownKey(
                Header::read(&third).unwrap().key_id
            )))
        );
        assert!(gate.take_outgoing().is_empty());
        assert_eq!(
            peer.stats.auth_failures.load(Ordering::Relaxed),
            failures + 1
        );
        assert!(peer.seal_reply(at, &mut with_room(b"late")).is_err());
    }

    #[test]
    fn bad_credentials_are_refused_with_reasons() {
        for (text, says) in [
            ("", "not a credential"),
            (
                "{\"user\":\"a\",\"role\":\"root\",\"key\":\"00\"}",
                "not a credential",
            ),
            (
                "{\"user\":\"a b\",\"role\":\"read\",\"key\":\"00\"}",
                "user name",
            ),
            (
                "{\"user\":\"a\",\"role\":\"read\",\"key\":\"0011\"}",
                "field `key`",
            ),
        ] {
            let e = Credential::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }
}
