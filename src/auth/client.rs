//! The client side of sealed datagrams: a session that seals requests for each peer and opens
//! the replies and notices sealed back to it (see the parent module for the rules).

use super::*;

/// What a client takes from an authentic datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FromPeer<'a> {
    /// A reply's JSON, from peer `from`, sealed to this session.
    Reply { from: NodeId, body: &'a [u8] },
    /// Peer `from` has told us its epoch (or moved ours on): resend what it dropped.
    Notice { from: NodeId },
}

/// Why a client dropped a datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientDrop {
    Auth(AuthError),
    /// Authentic but not for this session, of a kind clients do not take, from a node that is
    /// not a peer, or a stale notice.
    Ignored(String),
}

/// What a client knows of one peer.
#[derive(Clone, Copy, Debug, Default)]
struct PeerView {
    /// The peer's epoch; 0 until it has sent us something.
    epoch: u64,
    /// The newest key (lowest slot) it has used with us in its current incarnation.
    slot: usize,
    /// The last counter used towards it.
    counter: u64,
}

/// A client's authentication state: its random session ID and epoch, and what it knows of
/// each peer. One per [`crate::client::Client`] (or bench socket); single-threaded.
#[derive(Debug)]
pub struct ClientAuth {
    keys: Arc<Keys>,
    session: u64,
    epoch: u64,
    peers: BTreeMap<NodeId, PeerView>,
    /// Authentic datagrams received (replies and notices): the key matches the peers'.
    pub heard: u64,
    /// Datagrams that failed authentication.
    pub rejected: u64,
    /// Of those, datagrams without an envelope: peers that run without a secret_file.
    pub unsealed: u64,
    /// The plaintext of the datagram last opened, reused.
    plain: Vec<u8>,
}

impl ClientAuth {
    /// A new session with the peers `peers`; its ID comes from the operating system's
    /// randomness.
    pub fn new(
        keys: Arc<Keys>,
        peers: impl IntoIterator<Item = NodeId>,
    ) -> Result<ClientAuth, String> {
        let session = getrandom::u64()
            .map_err(|e| format!("cannot draw a client session ID from the OS: {e}"))?;
        Ok(ClientAuth {
            keys,
            session,
            epoch: fresh_epoch(),
            peers: peers
                .into_iter()
                .map(|p| (p, PeerView::default()))
                .collect(),
            heard: 0,
            rejected: 0,
            unsealed: 0,
            plain: Vec::new(),
        })
    }

    /// This session's ID.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// This session's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Forgets what this session knows of peer `id` (after it stopped answering: it may have
    /// restarted with other keys), so that the next request to it is sealed once per key and
    /// provokes a notice of its epoch.
    pub fn forget(&mut self, id: NodeId) {
        if let Some(view) = self.peers.get_mut(&id) {
            view.epoch = 0;
            view.slot = 0;
        }
    }

    /// Peer `id`'s epoch as this session knows it (0: not heard from yet).
    pub fn peer_epoch(&self, id: NodeId) -> u64 {
        self.peers.get(&id).map_or(0, |v| v.epoch)
    }

    /// Seals the request body in `buf` (after [`HEADER_LEN`] bytes of room) for peer `to` and
    /// hands each datagram to `send`: one, or one per key while `to`'s epoch is unknown. Leaves
    /// the last datagram sealed in `buf`; returns the first error `send` returned.
    pub fn seal_request<E>(
        &mut self,
        to: NodeId,
        buf: &mut Vec<u8>,
        mut send: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let keys = Arc::clone(&self.keys);
        let view = self.peers.entry(to).or_default();
        let len = keys.client_len().max(1);
        let slots = if view.epoch == 0 {
            0..len
        } else {
            // The newest key the peer has shown it holds.
            let slot = view.slot.min(len - 1);
            slot..slot + 1
        };
        // Sealing encrypts the body in place: keep it to seal another copy.
        let body = (slots.len() > 1).then(|| buf[HEADER_LEN..].to_vec());
        let mut result = Ok(());
        for slot in slots.clone() {
            if let (true, Some(body)) = (slot > slots.start, &body) {
                refill(buf, body);
            }
            // 2^64 requests will not be sent; saturate rather than wrap if they were.
            view.counter = view.counter.saturating_add(1);
            let header = Header {
                kind: Kind::Request,
                key_id: 0,
                sender: self.session,
                sender_epoch: self.epoch,
                recipient: to,
                recipient_epoch: view.epoch,
                counter: view.counter,
                sent: now_micros(),
            };
            seal(&keys, slot, &header, buf);
            let sent = send(buf);
            if result.is_ok() {
                result = sent;
            }
        }
        result
    }

    /// Opens a datagram a peer sent this client. A reply is taken only if it is sealed to this
    /// session and epoch by a configured peer; the caller then matches its request ID.
    pub fn open(&mut self, bytes: &[u8]) -> Result<FromPeer<'_>, ClientDrop> {
        let opened = match open_into(bytes, &self.keys, &mut self.plain) {
            Ok((header, slot)) => Sealed {
                header,
                slot,
                user: None,
            },
            Err(e) => {
                self.rejected += 1;
                if e == AuthError::NotSealed {
                    self.unsealed += 1;
                }
                return Err(ClientDrop::Auth(e));
            }
        };
        let h = opened.header;
        if !matches!(h.kind, Kind::Reply | Kind::NoticeToClient) {
            return Err(ClientDrop::Ignored(format!(
                "a {:?}: clients take replies",
                h.kind
            )));
        }
        let Some(view) = self.peers.get_mut(&h.sender) else {
            return Err(ClientDrop::Ignored(format!(
                "sealed by node {}, not a peer",
                h.sender
            )));
        };
        if h.recipient != self.session || h.recipient_epoch != self.epoch {
            return Err(ClientDrop::Ignored(
                "sealed to another client session".into(),
            ));
        }
        if h.sender_epoch > epoch_limit() {
            return Err(ClientDrop::Ignored(format!(
                "node {}'s epoch is more than {EPOCH_SLACK:?} ahead of our clock",
                h.sender
            )));
        }
        self.heard += 1;
        if h.sender_epoch > view.epoch {
            view.epoch = h.sender_epoch;
            view.slot = opened.slot;
        } else if h.sender_epoch == view.epoch {
            view.slot = view.slot.min(opened.slot);
        }
        if h.kind == Kind::Reply {
            return Ok(FromPeer::Reply {
                from: h.sender,
                body: &self.plain,
            });
        }
        if h.sender_epoch < view.epoch {
            // From an older incarnation of the peer: it says nothing about the current one.
            return Err(ClientDrop::Ignored(
                "a notice from an older incarnation".into(),
            ));
        }
        if let Ok(min) = <[u8; 8]>::try_from(&self.plain[..]) {
            let min = u64::from_le_bytes(min);
            if min > epoch_limit() {
                return Err(ClientDrop::Ignored(format!(
                    "a notice asking for an epoch more than {EPOCH_SLACK:?} ahead of our clock"
                )));
            }
            if min > self.epoch {
                self.epoch = min.max(fresh_epoch());
            }
        }
        Ok(FromPeer::Notice { from: h.sender })
    }
}
