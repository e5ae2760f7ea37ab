//! Backups of a cluster's committed log (`client snapshot save`, `peer --restore`): the file
//! format, saving one from a live cluster, and reading one back with every check.
//!
//! A backup is text, one JSON value a line:
//! - a header, padded with spaces to [`HEADER_LEN`] bytes so it can be written last in place:
//!   `{"format":"raft-backup","version":3,"cluster":NAME,"index":N,"term":T,"records":N,"sessions":S,"users":U}`;
//! - the committed log's records `1..=N`, each as `client query` prints it;
//! - (version 2) the configuration in force at index N: `{"config_index":I,"members":[...]}`;
//! - (version 2) the client sessions at index N, `S` lines, least recently used first, so that
//!   a retry of an append made before the backup is answered, after a restore, as it was;
//! - (version 3) the users at index N, `U` lines by name, `{"name":..,"role":..,"index":I,
//!   "term":T,"nonce":X}`: never a key (peers derive a user's key from the cluster secret, the
//!   config's `cluster` name and the entry `I`, `T` that added it, so a restore with the same
//!   secret and name keeps every credential working);
//! - a trailer `{"blake3":HEX}`: the BLAKE3 hash of every line between the header and the
//!   trailer followed by the header line, so that every byte before it is covered.
//!
//! It is written to a temporary file beside the target, synced, and renamed over it, so the
//! target is either the old file or the whole new one. Saving and reading stream the records
//! in pages: a log of any length never sits in memory whole (the sessions do: at most
//! [`MAX_SESSIONS`] of them, a few megabytes, and the users, at most [`MAX_USERS`]).

use crate::client::{Client, ClientError};
use crate::raft::state_machine::MAX_SESSIONS;
use crate::raft::users::{check_user_name, MAX_USERS};
use crate::raft::{
    ClientOp, ClientResult, Index, LogRecord, Member, SessionRecord, Term, UserRecord, UserRole,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes of the header line, its newline included.
pub const HEADER_LEN: usize = 512;
/// The `format` field of every backup's header.
pub const FORMAT: &str = "raft-backup";
/// The version `save` writes; `read` also reads version 2 (no users) and version 1 (records
/// only, no sessions, configuration or users).
pub const VERSION: u32 = 3;
/// Records handed to a reader's callback at a time.
pub const READ_PAGE: usize = 4096;

/// What a backup's first line says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub version: u32,
    /// The cluster's name (its config's `cluster`).
    pub cluster: String,
    /// The last index backed up (at or after the read index the save was taken at) and its term.
    pub index: Index,
    pub term: Term,
    /// Record lines that follow: `index` of them, indices `1..=index`.
    pub records: u64,
    /// Session lines after the configuration line (version 2; 0 in version 1).
    #[serde(default)]
    pub sessions: u64,
    /// User lines after the sessions (version 3; 0 before).
    #[serde(default)]
    pub users: u64,
}

/// The configuration line of a version 2 backup: the configuration in force at the backup's
/// index, and the index of the entry that made it (0: the bootstrap configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Configuration {
    pub config_index: Index,
    pub members: Vec<Member>,
}

/// A user line of a version 3 backup: exactly a [`UserRecord`]'s fields, so that a line with
/// anything more (a key, say) is refused rather than carried along.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserLine {
    name: String,
    role: UserRole,
    index: Index,
    term: Term,
    nonce: u64,
}

impl From<&UserRecord> for UserLine {
    fn from(r: &UserRecord) -> UserLine {
        UserLine {
            name: r.name.clone(),
            role: r.role,
            index: r.index,
            term: r.term,
            nonce: r.nonce,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    blake3: String,
}

/// What `client snapshot save` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub index: Index,
    pub term: Term,
    pub bytes: u64,
    pub file: String,
}

/// A backup read back: its header, checksum (hex), and what it holds besides the records
/// (a version 1 backup has no configuration and no sessions, and before version 3 no users).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub header: Header,
    pub blake3: String,
    pub configuration: Option<Configuration>,
    pub sessions: Vec<SessionRecord>,
    /// By name.
    pub users: Vec<UserRecord>,
}

/// The lines after the header, written and hashed together.
struct Body {
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    tmp: PathBuf,
}

impl Body {
    fn line(&mut self, value: &impl Serialize) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(value).expect("plain data serializes");
        line.push(b'\n');
        self.hasher.update(&line);
        self.out
            .write_all(&line)
            .map_err(|e| io_error("cannot write", &self.tmp, e))
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Io(format!("{what} {}: {e}", path.display()))
}

fn confused(peer: u64, what: String) -> ClientError {
    ClientError::Io(format!("peer {peer} {what}"))
}

/// Saves the committed log of the cluster `client` reaches to `file`, with the client
/// sessions and configuration at its last index. The first page is a linearizable read
/// (ReadIndex) that fixes a read index R; the sessions and configuration are then copied on
/// the leader at its applied index A >= R, and the records are read up to A: a committed
/// state no older than the save's start. Writes go on meanwhile. Each request has the
/// client's timeout. `progress(done, of)` is called after each page.
pub fn save(
    client: &mut Client,
    cluster: &str,
    file: &Path,
    mut progress: impl FnMut(Index, Index),
) -> Result<Saved, ClientError> {
    let tmp = temporary_beside(file);
    let out = File::create(&tmp).map_err(|e| io_error("cannot create", &tmp, e))?;
    let mut body = Body {
        out: BufWriter::new(out),
        hasher: blake3::Hasher::new(),
        tmp: tmp.clone(),
    };
    let result = (|| {
        body.out
            .write_all(&[b' '; HEADER_LEN])
            .map_err(|e| io_error("cannot write", &tmp, e))?;
        let mut start: Index = 1;
        let mut term: Term = 0;
        let mut write_page = |body: &mut Body, peer, entries: &[LogRecord], bound| {
            for r in entries {
                if r.index != start || r.index > bound {
                    return Err(confused(
                        peer,
                        format!(
                            "sent entry {} where {start} (at most {bound}) was due",
                            r.index
                        ),
                    ));
                }
                body.line(r)?;
                term = r.term;
                start += 1;
            }
            Ok(start)
        };
        let (peer, read_index, entries) = backup_page(client, 1, None)?;
        let mut next = write_page(&mut body, peer, &entries, read_index)?;
        progress(next - 1, read_index);
        let timeout = client.timeout();
        let call = |op: &ClientOp| client.call(op, Instant::now() + timeout);
        let state = backup_state(call, timeout, read_index)?;
        let end = state.index;
        while next <= end {
            let (peer, fixed, entries) = backup_page(client, next, Some(end))?;
            if fixed != end || entries.is_empty() {
                return Err(confused(
                    peer,
                    format!(
                        "answered for read index {fixed} with {} entries from {next}, not up to {end}",
                        entries.len()
                    ),
                ));
            }
            next = write_page(&mut body, peer, &entries, end)?;
            progress(next - 1, end);
        }
        if state.term != 0 && state.term != term {
            return Err(ClientError::Io(format!(
                "the leader's copy names term {} for index {end}, the record has term {term}",
                state.term
            )));
        }
        body.line(&state.configuration)?;
        for s in &state.sessions {
            body.line(s)?;
        }
        for u in &state.users {
            body.line(&UserLine::from(u))?;
        }
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            cluster: cluster.into(),
            index: end,
            term,
            records: end,
            sessions: state.sessions.len() as u64,
            users: state.users.len() as u64,
        };
        let header = header_line(&header).map_err(ClientError::Refused)?;
        body.hasher.update(&header);
        let trailer = Trailer {
            blake3: body.hasher.finalize().to_hex().to_string(),
        };
        body.line(&trailer)?;
        let mut f = body
            .out
            .into_inner()
            .map_err(|e| io_error("cannot write", &tmp, e.into_error()))?;
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(&header))
            .and_then(|()| f.sync_all())
            .map_err(|e| io_error("cannot write", &tmp, e))?;
        let bytes = f
            .metadata()
            .map_err(|e| io_error("cannot stat", &tmp, e))?
            .len();
        Ok((end, term, bytes))
    })();
    let (index, term, bytes) = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, file).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error("cannot rename the backup to", file, e)
    })?;
    sync_parent(file);
    Ok(Saved {
        index,
        term,
        bytes,
        file: file.display().to_string(),
    })
}

/// One page of records from `start`: the answering peer, the read index, the records.
fn backup_page(
    client: &mut Client,
    start: Index,
    read_index: Option<Index>,
) -> Result<(u64, Index, Vec<LogRecord>), ClientError> {
    let op = ClientOp::Backup { start, read_index };
    let (peer, result) = client.call(&op, Instant::now() + client.timeout())?;
    match result {
        ClientResult::Entries {
            entries,
            read_index: fixed,
            ..
        } if read_index.is_none_or(|r| r == fixed) => Ok((peer, fixed, entries)),
        other => Err(confused(
            peer,
            format!(
                "answered a backup page from {start} (read index {read_index:?}) with {other:?}"
            ),
        )),
    }
}

/// The sessions, users and configuration as copied on the leader at one applied index.
#[derive(Debug)]
struct State {
    index: Index,
    term: Term,
    configuration: Configuration,
    sessions: Vec<SessionRecord>,
    users: Vec<UserRecord>,
}

/// The leader's copy of the sessions, users and configuration at an applied index at least
/// `read_index`, all its pages. A copy that is no longer held is answered with a new one, and
/// reading starts over from that.
/// `call` sends one request (with the client's retries and its `timeout`).
fn backup_state(
    mut call: impl FnMut(&ClientOp) -> Result<(u64, ClientResult), ClientError>,
    timeout: Duration,
    read_index: Index,
) -> Result<State, ClientError> {
    let mut at: Option<Index> = None;
    let mut state: Option<State> = None;
    let mut catching_up: Option<Instant> = None;
    loop {
        let from = state
            .as_ref()
            .map_or(0, |s| (s.sessions.len() + s.users.len()) as u64);
        let (peer, result) = call(&ClientOp::BackupState { at, from })?;
        let ClientResult::BackupState {
            index,
            term,
            config_index,
            members,
            from: page_from,
            sessions,
            users,
            next,
        } = result
        else {
            return Err(confused(
                peer,
                format!("answered a backup's sessions with {result:?}"),
            ));
        };
        if index < read_index {
            // A new leader that has not applied the read index yet: ask again shortly.
            let since = *catching_up.get_or_insert_with(Instant::now);
            if since.elapsed() >= timeout {
                return Err(ClientError::Timeout(format!(
                    "peer {peer} applied only to {index}, not to the read index {read_index}, within {} ms",
                    timeout.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
            (at, state) = (None, None);
            continue;
        }
        if at != Some(index) || page_from != from {
            if page_from != 0 {
                return Err(confused(
                    peer,
                    format!("sent sessions from {page_from} of a copy at {index}, not from 0"),
                ));
            }
            // The first copy, or a new one because ours is no longer held: start from it.
            at = Some(index);
            state = Some(State {
                index,
                term,
                configuration: Configuration {
                    config_index,
                    members,
                },
                sessions: Vec::new(),
                users: Vec::new(),
            });
        }
        let s = state.as_mut().expect("set above");
        if let Some(bad) = sessions.iter().find(|r| r.index > index) {
            return Err(confused(
                peer,
                format!("sent a session at index {} in a copy at {index}", bad.index),
            ));
        }
        if !sessions.is_empty() && !s.users.is_empty() {
            return Err(confused(
                peer,
                format!("sent sessions after users in a copy at {index}"),
            ));
        }
        let mut previous = s.users.last().map(|l| l.name.as_str());
        for u in &users {
            if let Err(why) = check_user(u, index, previous) {
                return Err(confused(peer, format!("sent {why} in a copy at {index}")));
            }
            previous = Some(&u.name);
        }
        let got = sessions.len() + users.len();
        s.sessions.extend(sessions);
        s.users.extend(users);
        if s.sessions.len() > MAX_SESSIONS || s.users.len() > MAX_USERS {
            return Err(confused(
                peer,
                format!("sent more than {MAX_SESSIONS} sessions or {MAX_USERS} users"),
            ));
        }
        let have = (s.sessions.len() + s.users.len()) as u64;
        match next {
            None => return Ok(state.expect("set above")),
            Some(n) if n == have && got > 0 => {}
            Some(n) => {
                return Err(confused(
                    peer,
                    format!("asked for sessions and users from {n} after {have}"),
                ))
            }
        }
    }
}

/// Checks a user of a copy or a backup at `index`: a valid name, after `previous` (users are
/// listed by name, once each), added by an entry of the log up to `index`.
fn check_user(u: &UserRecord, index: Index, previous: Option<&str>) -> Result<(), String> {
    let what = || {
        format!(
            "user {:?} (added at index {}, term {})",
            u.name, u.index, u.term
        )
    };
    check_user_name(&u.name).map_err(|e| format!("{}: {e}", what()))?;
    if previous.is_some_and(|p| p >= u.name.as_str()) {
        return Err(format!("{}, a duplicate or out of order", what()));
    }
    if u.index == 0 || u.index > index || u.term == 0 {
        return Err(format!("{}, not an entry up to index {index}", what()));
    }
    Ok(())
}

/// `{dir}/.{name}.tmp-{pid}`: on the same file system as `file`, for an atomic rename.
fn temporary_beside(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map_or_else(|| "backup".into(), |n| n.to_string_lossy().into_owned());
    file.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Makes a rename in `file`'s directory durable (best effort: some file systems refuse).
fn sync_parent(file: &Path) {
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all();
    }
}

/// The header as its padded line of exactly [`HEADER_LEN`] bytes.
fn header_line(h: &Header) -> Result<Vec<u8>, String> {
    let mut line = serde_json::to_vec(h).expect("plain data serializes");
    if line.len() >= HEADER_LEN {
        return Err(format!(
            "the backup header would take {} bytes; the cluster name is too long",
            line.len()
        ));
    }
    line.resize(HEADER_LEN - 1, b' ');
    line.push(b'\n');
    Ok(line)
}

/// One line of a backup, hashed, or why not (`what` names it for the error).
fn next_line(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
    hasher: &mut blake3::Hasher,
    what: &str,
) -> Result<(), String> {
    line.clear();
    let n = input
        .read_until(b'\n', line)
        .map_err(|e| format!("cannot read {what}: {e}"))?;
    if n == 0 || line.last() != Some(&b'\n') {
        return Err(format!("truncated: it ends before {what}"));
    }
    hasher.update(line);
    Ok(())
}

/// Reads the backup at `path` from end to end, handing its records to `page` [`READ_PAGE`] at
/// a time, and checks everything: the header, indices `1..=index` in order, the last record's
/// term, the record count, the configuration and sessions (version 2), the users (version 3:
/// valid names, once each, in order, each naming a user change of the log), the checksum, and that
/// nothing follows the trailer. Any failure is an error naming the file and what is wrong;
/// `page` may have seen records by then.
pub fn read(
    path: &Path,
    mut page: impl FnMut(&[LogRecord]) -> Result<(), String>,
) -> Result<Verified, String> {
    let at = |what: String| format!("backup {}: {what}", path.display());
    let file = File::open(path).map_err(|e| at(format!("cannot open: {e}")))?;
    let mut input = BufReader::new(file);
    let mut head = vec![0u8; HEADER_LEN];
    input.read_exact(&mut head).map_err(|e| {
        at(format!(
            "too short for a header of {HEADER_LEN} bytes ({e}): not a backup, or truncated"
        ))
    })?;
    let header: Header = serde_json::from_slice(&head).map_err(|e| {
        at(format!(
            "the header does not parse: {e}: not a backup, or corrupt"
        ))
    })?;
    if header.format != FORMAT {
        return Err(at(format!(
            "format {:?} is not {FORMAT:?}: not a backup",
            header.format
        )));
    }
    if !(1..=VERSION).contains(&header.version) {
        return Err(at(format!(
            "version {} is not one this build reads (1 to {VERSION}): made by a newer release?",
            header.version
        )));
    }
    if header.records != header.index {
        return Err(at(format!(
            "the header claims {} records up to index {}",
            header.records, header.index
        )));
    }
    if (header.version == 1 && header.sessions != 0) || header.sessions > MAX_SESSIONS as u64 {
        return Err(at(format!(
            "the header claims {} sessions (at most {MAX_SESSIONS}): corrupt",
            header.sessions
        )));
    }
    if (header.version < 3 && header.users != 0) || header.users > MAX_USERS as u64 {
        return Err(at(format!(
            "the header claims {} users (at most {MAX_USERS}, none before version 3): corrupt",
            header.users
        )));
    }
    let mut hasher = blake3::Hasher::new();
    let mut line = Vec::new();
    let mut batch: Vec<LogRecord> = Vec::with_capacity(READ_PAGE);
    let mut last_term = 0;
    // The entries that added or removed users, by index with their terms: each user line must
    // name one (a few bytes per user change, not the log).
    let mut user_entries: BTreeMap<Index, Term> = BTreeMap::new();
    for want in 1..=header.index {
        let what = format!("record {want} of {}", header.index);
        next_line(&mut input, &mut line, &mut hasher, &what).map_err(at)?;
        let r: LogRecord = serde_json::from_slice(&line)
            .map_err(|e| at(format!("record {want} does not parse: {e}: corrupt")))?;
        if r.index != want || r.term < last_term {
            return Err(at(format!(
                "record {want} is entry {} of term {} (after term {last_term}): corrupt",
                r.index, r.term
            )));
        }
        last_term = r.term;
        if r.kind.as_deref() == Some("user") {
            user_entries.insert(r.index, r.term);
        }
        batch.push(r);
        if batch.len() == READ_PAGE {
            page(&batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        page(&batch)?;
    }
    if last_term != header.term {
        return Err(at(format!(
            "the header names term {} for index {}, the record has term {last_term}",
            header.term, header.index
        )));
    }
    let mut configuration = None;
    let mut sessions = Vec::new();
    if header.version >= 2 {
        next_line(&mut input, &mut line, &mut hasher, "the configuration").map_err(at)?;
        let c: Configuration = serde_json::from_slice(&line)
            .map_err(|e| at(format!("the configuration does not parse: {e}: corrupt")))?;
        if c.config_index > header.index || c.members.is_empty() {
            return Err(at(format!(
                "the configuration of index {} with {} members is not one of this log: corrupt",
                c.config_index,
                c.members.len()
            )));
        }
        configuration = Some(c);
        // One session per client, each at its own index (a client's latest append).
        let (mut clients, mut indices) = (BTreeSet::new(), BTreeSet::new());
        for n in 1..=header.sessions {
            let what = format!("session {n} of {}", header.sessions);
            next_line(&mut input, &mut line, &mut hasher, &what).map_err(at)?;
            let s: SessionRecord = serde_json::from_slice(&line)
                .map_err(|e| at(format!("{what} does not parse: {e}: corrupt")))?;
            if s.index == 0
                || s.index > header.index
                || !clients.insert(s.client)
                || !indices.insert(s.index)
            {
                return Err(at(format!(
                    "{what} (client {} at index {}) is not one of this log: corrupt",
                    s.client, s.index
                )));
            }
            sessions.push(s);
        }
    }
    let mut users: Vec<UserRecord> = Vec::new();
    for n in 1..=header.users {
        let what = format!("user {n} of {}", header.users);
        next_line(&mut input, &mut line, &mut hasher, &what).map_err(at)?;
        let u: UserLine = serde_json::from_slice(&line)
            .map_err(|e| at(format!("{what} does not parse: {e}: corrupt")))?;
        let u = UserRecord {
            name: u.name,
            role: u.role,
            index: u.index,
            term: u.term,
            nonce: u.nonce,
        };
        let previous = users.last().map(|p| p.name.as_str());
        check_user(&u, header.index, previous)
            .map_err(|why| at(format!("{what} is {why}: corrupt")))?;
        if user_entries.get(&u.index) != Some(&u.term) {
            return Err(at(format!(
                "{what} ({:?}) names entry {} of term {}, which is not a user change of this log: corrupt",
                u.name, u.index, u.term
            )));
        }
        users.push(u);
    }
    line.clear();
    input
        .read_until(b'\n', &mut line)
        .map_err(|e| at(format!("cannot read the trailer: {e}")))?;
    if line.last() != Some(&b'\n') {
        return Err(at(
            "truncated: the checksum trailer after the records is missing or cut short".into(),
        ));
    }
    let trailer: Trailer = serde_json::from_slice(&line)
        .map_err(|_| at("corrupt: no checksum trailer after the records".into()))?;
    hasher.update(&head);
    let blake3 = hasher.finalize().to_hex().to_string();
    if trailer.blake3 != blake3 {
        return Err(at(format!(
            "checksum mismatch (file says {}, contents hash to {blake3}): corrupt",
            trailer.blake3
        )));
    }
    let mut rest = [0u8; 1];
    if input.read(&mut rest).map_err(|e| at(e.to_string()))? != 0 {
        return Err(at("bytes after the checksum trailer: corrupt".into()));
    }
    Ok(Verified {
        header,
        blake3,
        configuration,
        sessions,
        users,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::raft::MemberRole;

    /// Writes a backup of `n` records (and, from version 2, a configuration and two sessions;
    /// from version 3, two users) the way `save` lays it out, with `edit` applied to the
    /// header before it is hashed.
    pub(crate) fn write_with(path: &Path, n: u64, version: u32, edit: impl FnOnce(&mut Header)) {
        write_sessions_to(path, n, version, n, edit)
    }

    /// Two users, as a version 3 backup's lines.
    fn two_users() -> Vec<serde_json::Value> {
        vec![
            serde_json::json!({"name":"ann","role":"admin","index":2,"term":1,"nonce":9}),
            serde_json::json!({"name":"bob","role":"read","index":5,"term":2,"nonce":4}),
        ]
    }

    /// As `write_with`, with the latest session at `last_session`.
    fn write_sessions_to(
        path: &Path,
        n: u64,
        version: u32,
        last_session: u64,
        edit: impl FnOnce(&mut Header),
    ) {
        let users = if version >= 3 {
            two_users()
        } else {
            Vec::new()
        };
        write_full(path, n, version, last_session, &users, edit)
    }

    /// As `write_sessions_to`, with these user lines (of any shape) after the sessions.
    fn write_full(
        path: &Path,
        n: u64,
        version: u32,
        last_session: u64,
        users: &[serde_json::Value],
        edit: impl FnOnce(&mut Header),
    ) {
        let mut hasher = blake3::Hasher::new();
        let mut body = Vec::new();
        let mut line = |value: &dyn erased::Line| {
            let mut line = value.json();
            line.push(b'\n');
            hasher.update(&line);
            body.extend(line);
        };
        for i in 1..=n {
            line(&LogRecord {
                index: i,
                term: 1 + i / 3,
                // Where `two_users` were added.
                data: (version < 3 || ![2, 5].contains(&i)).then(|| format!("d{i}")),
                kind: (version >= 3 && [2, 5].contains(&i)).then(|| "user".to_string()),
            });
        }
        let sessions = if version >= 2 {
            line(&Configuration {
                config_index: 0,
                members: vec![Member {
                    id: 1,
                    address: "127.0.0.1:3000".into(),
                    role: MemberRole::Voter,
                }],
            });
            for (client, index) in [(7, 1), (8, last_session)] {
                line(&SessionRecord {
                    client,
                    seq: 1,
                    index,
                    term: 1,
                    data_hash: 3,
                });
            }
            2
        } else {
            0
        };
        for u in users {
            line(u);
        }
        let mut header = Header {
            format: FORMAT.into(),
            version,
            cluster: "raft".into(),
            index: n,
            term: 1 + n / 3,
            records: n,
            sessions,
            users: users.len() as u64,
        };
        edit(&mut header);
        let mut head = serde_json::to_vec(&header).unwrap();
        // A version 1 header has no `sessions` field, nor a version 2 one a `users` field.
        let mut text = String::from_utf8(head).unwrap();
        if version < 3 {
            text = text.replace(",\"users\":0", "");
        }
        if version == 1 {
            text = text.replace(",\"sessions\":0", "");
        }
        head = text.into_bytes();
        head.resize(HEADER_LEN - 1, b' ');
        head.push(b'\n');
        hasher.update(&head);
        let trailer = format!("{{\"blake3\":\"{}\"}}\n", hasher.finalize().to_hex());
        std::fs::write(path, [head, body, trailer.into_bytes()].concat()).unwrap();
    }

    /// Lets the helper above take records, configurations and sessions alike.
    mod erased {
        pub trait Line {
            fn json(&self) -> Vec<u8>;
        }
        impl<T: serde::Serialize> Line for T {
            fn json(&self) -> Vec<u8> {
                serde_json::to_vec(self).unwrap()
            }
        }
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("raft-backup-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_backup_reads_back_in_pages_and_damage_is_refused() {
        let path = temp("unit");
        write_with(&path, 10_000, VERSION, |_| {});
        let mut seen = 0;
        let v = read(&path, |p| {
            seen += p.len();
            Ok(())
        })
        .unwrap();
        assert_eq!((v.header.index, seen), (10_000, 10_000));
        assert_eq!(v.sessions.len(), 2);
        assert_eq!(v.configuration.unwrap().members[0].id, 1);
        let good = std::fs::read(&path).unwrap();
        let damaged = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read(&path, |_| Ok(())).unwrap_err()
        };
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 40] ^= 1;
        assert!(damaged(&flipped).contains("corrupt"));
        let truncated = damaged(&good[..good.len() / 2]);
        assert!(truncated.contains("truncated"), "{truncated}");
        let no_trailer = damaged(&good[..good.len() - 10]);
        assert!(no_trailer.contains("trailer"), "{no_trailer}");
        let no_newline = damaged(&good[..good.len() - 1]);
        assert!(no_newline.contains("truncated"), "{no_newline}");
        // Cut inside the sessions.
        let end = good.len() - 90;
        let cut = good[..end].iter().rposition(|&b| b == b'\n').unwrap();
        let no_session = damaged(&good[..cut + 1]);
        assert!(no_session.contains("truncated"), "{no_session}");
        let mut header = good.clone();
        header[HEADER_LEN - 3] = b'x';
        assert!(damaged(&header).contains("header"));
        assert!(damaged(b"hello\n").contains("not a backup"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn sessions_start_over_from_a_new_copy_and_wait_for_the_read_index() {
        let session = |client| SessionRecord {
            client,
            seq: 1,
            index: client,
            term: 1,
            data_hash: 0,
        };
        let page = |index, from: u64, clients: &[u64], next| ClientResult::BackupState {
            index,
            term: 1,
            config_index: 0,
            members: Vec::new(),
            from,
            sessions: clients.iter().map(|&c| session(c)).collect(),
            users: Vec::new(),
            next,
        };
        // A peer behind the read index; then a copy at 10 whose second page finds it gone
        // (answered with page 0 of a copy at 12); then that copy to its end.
        let mut script = vec![
            (
                ClientOp::BackupState { at: None, from: 0 },
                page(8, 0, &[1], None),
            ),
            (
                ClientOp::BackupState { at: None, from: 0 },
                page(10, 0, &[1, 2], Some(2)),
            ),
            (
                ClientOp::BackupState {
                    at: Some(10),
                    from: 2,
                },
                page(12, 0, &[1, 2], Some(2)),
            ),
            (
                ClientOp::BackupState {
                    at: Some(12),
                    from: 2,
                },
                page(12, 2, &[11, 12], None),
            ),
        ]
        .into_iter();
        let call = |op: &ClientOp| {
            let (want, answer) = script.next().expect("no more requests expected");
            assert_eq!(*op, want);
            Ok((1, answer))
        };
        let state = backup_state(call, Duration::from_secs(5), 9).unwrap();
        assert_eq!(state.index, 12);
        let clients: Vec<u64> = state.sessions.iter().map(|s| s.client).collect();
        assert_eq!(clients, [1, 2, 11, 12]);
        // A page that claims a session after its copy's index is refused.
        let call = |_: &ClientOp| Ok((1, page(5, 0, &[6], None)));
        let e = backup_state(call, Duration::from_secs(5), 5).unwrap_err();
        assert!(e.to_string().contains("session at index 6"), "{e}");
    }

    #[test]
    fn version_1_reads_without_sessions_and_unknown_versions_are_refused() {
        let path = temp("versions");
        write_with(&path, 20, 1, |_| {});
        let v = read(&path, |_| Ok(())).unwrap();
        assert_eq!((v.header.version, v.header.index), (1, 20));
        assert!(v.configuration.is_none() && v.sessions.is_empty());
        write_with(&path, 20, VERSION, |h| h.version = VERSION + 1);
        let e = read(&path, |_| Ok(())).unwrap_err();
        assert!(e.contains("version 4 is not one this build reads"), "{e}");
        // A session past the backup's index is not of this log, checksum or not.
        write_sessions_to(&path, 20, VERSION, 21, |_| {});
        let e = read(&path, |_| Ok(())).unwrap_err();
        assert!(e.contains("session 2 of 2") && e.contains("corrupt"), "{e}");
        // Two sessions at one index cannot both be a client's latest append.
        write_sessions_to(&path, 20, VERSION, 1, |_| {});
        let e = read(&path, |_| Ok(())).unwrap_err();
        assert!(e.contains("session 2 of 2") && e.contains("corrupt"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn version_3_reads_its_users_and_version_2_reads_without() {
        let path = temp("users");
        write_with(&path, 20, 3, |_| {});
        let v = read(&path, |_| Ok(())).unwrap();
        assert_eq!(
            (v.header.version, v.header.users, v.sessions.len()),
            (3, 2, 2)
        );
        let users: Vec<(&str, UserRole, Index, Term, u64)> = v
            .users
            .iter()
            .map(|u| (u.name.as_str(), u.role, u.index, u.term, u.nonce))
            .collect();
        assert_eq!(
            users,
            [
                ("ann", UserRole::Admin, 2, 1, 9),
                ("bob", UserRole::Read, 5, 2, 4)
            ]
        );
        // A user line is a record's fields, never a key.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("key"), "{text}");
        write_with(&path, 20, 2, |_| {});
        let v = read(&path, |_| Ok(())).unwrap();
        assert_eq!((v.header.version, v.sessions.len()), (2, 2));
        assert!(v.users.is_empty());
        assert!(!std::fs::read_to_string(&path).unwrap()[..HEADER_LEN].contains("users"));
        // A version 2 header that claims users is corrupt.
        write_with(&path, 20, 2, |h| h.users = 1);
        let e = read(&path, |_| Ok(())).unwrap_err();
        assert!(e.contains("claims 1 users") && e.contains("corrupt"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn malformed_or_duplicate_users_are_refused_as_corrupt() {
        let path = temp("bad-users");
        let ann = two_users()[0].clone();
        let with = |field: &str, value: serde_json::Value| {
            let mut u = ann.clone();
            u[field] = value;
            u
        };
        let cases: Vec<(Vec<serde_json::Value>, &str)> = vec![
            (vec![ann.clone(), ann.clone()], "duplicate"),
            (vec![two_users()[1].clone(), ann.clone()], "out of order"),
            (vec![with("name", "a b".into())], "user name"),
            (vec![with("role", "root".into())], "does not parse"),
            (
                vec![with("index", 21.into())],
                "not an entry up to index 20",
            ),
            (vec![with("index", 0.into())], "not an entry up to index 20"),
            (
                vec![with("index", 3.into())],
                "not a user change of this log",
            ),
            (
                vec![with("term", 2.into())],
                "not a user change of this log",
            ),
            (vec![with("key", "00".repeat(32).into())], "does not parse"),
            (vec![serde_json::json!("ann")], "does not parse"),
        ];
        for (users, why) in cases {
            write_full(&path, 20, 3, 20, &users, |_| {});
            let e = read(&path, |_| Ok(())).unwrap_err();
            assert!(
                e.contains(why) && e.contains("corrupt") && e.contains("user "),
                "{why}: {e}"
            );
        }
        // Fewer user lines than the header claims: the trailer is read as a user.
        write_full(&path, 20, 3, 20, &two_users(), |h| h.users = 3);
        let e = read(&path, |_| Ok(())).unwrap_err();
        assert!(e.contains("user 3 of 3"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_copys_users_follow_its_sessions_and_bad_ones_are_refused() {
        let session = SessionRecord {
            client: 1,
            seq: 1,
            index: 1,
            term: 1,
            data_hash: 0,
        };
        let user = |name: &str, index| UserRecord {
            name: name.into(),
            role: UserRole::Read,
            index,
            term: 1,
            nonce: 1,
        };
        let page = |from, sessions: Vec<SessionRecord>, users, next| ClientResult::BackupState {
            index: 10,
            term: 1,
            config_index: 0,
            members: Vec::new(),
            from,
            sessions,
            users,
            next,
        };
        let run = |pages: Vec<ClientResult>| {
            let mut pages = pages.into_iter();
            let call = |_: &ClientOp| Ok((1, pages.next().expect("no more pages")));
            backup_state(call, Duration::from_secs(5), 10)
        };
        let state = run(vec![
            page(0, vec![session], vec![user("ann", 3)], Some(2)),
            page(2, Vec::new(), vec![user("bob", 4)], None),
        ])
        .unwrap();
        assert_eq!((state.sessions.len(), state.users.len()), (1, 2));
        let e = run(vec![
            page(0, Vec::new(), vec![user("ann", 3)], Some(1)),
            page(1, vec![session], Vec::new(), None),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("sessions after users"), "{e}");
        for (bad, why) in [
            (vec![user("ann", 3), user("ann", 4)], "duplicate"),
            (vec![user("ann", 11)], "not an entry up to index 10"),
            (vec![user("a b", 3)], "user name"),
        ] {
            let e = run(vec![page(0, Vec::new(), bad, None)]).unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }
}
