//! Backups of a cluster's committed log (`client snapshot save`, `peer --restore`): the file
//! format, saving one from a live cluster, and reading one back with every check.
//!
//! A backup is text, one JSON value a line:
//! - a header, padded with spaces to [`HEADER_LEN`] bytes so it can be written last in place:
//!   `{"format":"raft-backup","version":1,"cluster":NAME,"index":N,"term":T,"records":N}`;
//! - the committed log's records `1..=N`, each as `client query` prints it;
//! - a trailer `{"blake3":HEX}`: the BLAKE3 hash of the record lines followed by the header
//!   line, so that every byte before it is covered.
//!
//! It is written to a temporary file beside the target, synced, and renamed over it, so the
//! target is either the old file or the whole new one. Saving and reading stream it in pages:
//! a log of any length never sits in memory whole.

use crate::client::{Client, ClientError};
use crate::raft::{ClientOp, ClientResult, Index, LogRecord, Term};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bytes of the header line, its newline included.
pub const HEADER_LEN: usize = 512;
/// The `format` field of every backup's header.
pub const FORMAT: &str = "raft-backup";
pub const VERSION: u32 = 1;
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
    /// The last index backed up (the read index the save was taken at) and its term.
    pub index: Index,
    pub term: Term,
    /// Record lines that follow: `index` of them, indices `1..=index`.
    pub records: u64,
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

/// A backup read back: its header and its checksum (hex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub header: Header,
    pub blake3: String,
}

/// Saves the committed log of the cluster `client` reaches to `file`, at a linearizable read
/// index (ReadIndex, fixed by the first page; writes go on meanwhile). Each page has the
/// client's timeout. `progress(done, of)` is called after each page.
pub fn save(
    client: &mut Client,
    cluster: &str,
    file: &Path,
    mut progress: impl FnMut(Index, Index),
) -> Result<Saved, ClientError> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        ClientError::Io(format!("{what} {}: {e}", path.display()))
    };
    let tmp = temporary_beside(file);
    let mut out = BufWriter::new(File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?);
    let result = (|| {
        out.write_all(&[b' '; HEADER_LEN])
            .map_err(|e| io("cannot write", &tmp, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut start: Index = 1;
        let mut read_index: Option<Index> = None;
        let mut term: Term = 0;
        loop {
            let op = ClientOp::Backup { start, read_index };
            let deadline = Instant::now() + client.timeout();
            let (peer, result) = client.call(&op, deadline)?;
            let ClientResult::Entries {
                entries,
                read_index: fixed,
                next,
            } = result
            else {
                return Err(ClientError::Io(format!(
                    "peer {peer} answered a backup page with {result:?}"
                )));
            };
            if read_index.is_some_and(|r| r != fixed) {
                return Err(ClientError::Io(format!(
                    "peer {peer} answered for read index {fixed}, not {read_index:?}"
                )));
            }
            read_index = Some(fixed);
            for (i, r) in entries.iter().enumerate() {
                if r.index != start + i as Index || r.index > fixed {
                    return Err(ClientError::Io(format!(
                        "peer {peer} sent entry {} where {} (at most {fixed}) was due",
                        r.index,
                        start + i as Index
                    )));
                }
                let mut line = serde_json::to_vec(r).expect("plain data serializes");
                line.push(b'\n');
                hasher.update(&line);
                out.write_all(&line)
                    .map_err(|e| io("cannot write", &tmp, e))?;
                term = r.term;
            }
            let got = entries.len() as Index;
            start += got;
            progress(start - 1, fixed);
            match next {
                None if start == fixed + 1 => break,
                // An empty page that asks for the same start again would never end.
                Some(n) if n == start && n <= fixed && got > 0 => {}
                _ => {
                    return Err(ClientError::Io(format!(
                    "peer {peer} ended a page at {start} with next {next:?} (read index {fixed})"
                )))
                }
            }
        }
        let index = start - 1;
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            cluster: cluster.into(),
            index,
            term,
            records: index,
        };
        let header = header_line(&header).map_err(ClientError::Refused)?;
        hasher.update(&header);
        let trailer = serde_json::to_string(&Trailer {
            blake3: hasher.finalize().to_hex().to_string(),
        })
        .expect("plain data serializes");
        writeln!(out, "{trailer}").map_err(|e| io("cannot write", &tmp, e))?;
        let mut f = out
            .into_inner()
            .map_err(|e| io("cannot write", &tmp, e.into_error()))?;
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(&header))
            .and_then(|()| f.sync_all())
            .map_err(|e| io("cannot write", &tmp, e))?;
        let bytes = f.metadata().map_err(|e| io("cannot stat", &tmp, e))?.len();
        Ok((index, term, bytes))
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
        io("cannot rename the backup to", file, e)
    })?;
    sync_parent(file);
    Ok(Saved {
        index,
        term,
        bytes,
        file: file.display().to_string(),
    })
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

/// Reads the backup at `path` from end to end, handing its records to `page` [`READ_PAGE`] at
/// a time, and checks everything: the header, indices `1..=index` in order, the last record's
/// term, the record count, the checksum, and that nothing follows the trailer. Any failure is
/// an error naming the file and what is wrong; `page` may have seen records by then.
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
    if header.format != FORMAT || header.version != VERSION {
        return Err(at(format!(
            "format {:?} version {} is not {FORMAT:?} version {VERSION}",
            header.format, header.version
        )));
    }
    if header.records != header.index {
        return Err(at(format!(
            "the header claims {} records up to index {}",
            header.records, header.index
        )));
    }
    let mut hasher = blake3::Hasher::new();
    let mut line = Vec::new();
    let mut batch: Vec<LogRecord> = Vec::with_capacity(READ_PAGE);
    let mut last_term = 0;
    for want in 1..=header.index {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .map_err(|e| at(format!("cannot read record {want}: {e}")))?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(at(format!(
                "truncated: it ends before record {want} of {}",
                header.index
            )));
        }
        hasher.update(&line);
        let r: LogRecord = serde_json::from_slice(&line)
            .map_err(|e| at(format!("record {want} does not parse: {e}: corrupt")))?;
        if r.index != want || r.term < last_term {
            return Err(at(format!(
                "record {want} is entry {} of term {} (after term {last_term}): corrupt",
                r.index, r.term
            )));
        }
        last_term = r.term;
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
    Ok(Verified { header, blake3 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a backup of `n` records the way `save` lays it out.
    fn write(path: &Path, n: u64) {
        let mut hasher = blake3::Hasher::new();
        let mut body = Vec::new();
        for i in 1..=n {
            let r = LogRecord {
                index: i,
                term: 1 + i / 3,
                data: Some(format!("d{i}")),
                kind: None,
            };
            let mut line = serde_json::to_vec(&r).unwrap();
            line.push(b'\n');
            hasher.update(&line);
            body.extend(line);
        }
        let header = header_line(&Header {
            format: FORMAT.into(),
            version: VERSION,
            cluster: "raft".into(),
            index: n,
            term: 1 + n / 3,
            records: n,
        })
        .unwrap();
        hasher.update(&header);
        let trailer = format!("{{\"blake3\":\"{}\"}}\n", hasher.finalize().to_hex());
        std::fs::write(path, [header, body, trailer.into_bytes()].concat()).unwrap();
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("raft-backup-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_backup_reads_back_in_pages_and_damage_is_refused() {
        let path = temp("unit");
        write(&path, 10_000);
        let mut seen = 0;
        let v = read(&path, |p| {
            seen += p.len();
            Ok(())
        })
        .unwrap();
        assert_eq!((v.header.index, seen), (10_000, 10_000));
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
        let mut header = good.clone();
        header[HEADER_LEN - 3] = b'x';
        assert!(damaged(&header).contains("header"));
        assert!(damaged(b"hello\n").contains("not a backup"));
        let _ = std::fs::remove_file(&path);
    }
}
