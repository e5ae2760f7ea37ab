//! A simulated filesystem for [`super::fs::Fs::Sim`]: files and directories in memory, with
//! what was made durable kept apart from what was only written, so that a power cut keeps just
//! the durable state plus some of the rest. It can also fail writes (a full disk) and fsyncs.
//!
//! Model (what POSIX promises, and no more):
//! - File data written since the file's last fsync may be lost on a power cut: the writes
//!   since then survive as an arbitrary prefix, the next one torn at any byte (its tail lost
//!   or zeros), and an earlier one of the prefix may still be missing (pages written back out
//!   of order). An fsync (`sync_data` and `sync_all` alike) makes all of them durable.
//! - A name created, renamed, linked or deleted in a directory since that directory's last
//!   fsync may revert: the directory keeps an arbitrary prefix of those changes (a journal
//!   commits them in order) or, as often, an arbitrary subset of them (POSIX promises no
//!   order; a rename within one directory is one change either way).
//! - A power cut closes every handle: later calls on them fail, and locks are released.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::TryLockError;
use std::io::{self, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::raft::rng::Rng;

/// How `Fs::open` opens a file (the `std::fs::OpenOptions` subset the storage uses).
#[derive(Clone, Copy, Debug, Default)]
pub struct Open {
    pub read: bool,
    pub write: bool,
    pub create: bool,
    pub truncate: bool,
}

impl Open {
    pub const READ: Open = Open {
        read: true,
        write: false,
        create: false,
        truncate: false,
    };
    /// Read and write, creating the file if absent, never truncating it.
    pub const RW_CREATE: Open = Open {
        read: true,
        write: true,
        create: true,
        truncate: false,
    };
}

/// Whether `buf` holds only zeros; ORs 64-byte blocks, which the compiler vectorizes (a
/// byte-at-a-time early exit does not, and WAL replay scans megabytes of zeros at each open).
pub(crate) fn all_zeros(buf: &[u8]) -> bool {
    buf.chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The errno a full disk gives (Linux's ENOSPC).
pub const ENOSPC: i32 = 28;
/// The errno of an I/O error (Linux's EIO).
pub const EIO: i32 = 5;

/// A simulated filesystem; clones share it.
#[derive(Clone, Default)]
pub struct SimFs(Arc<Mutex<State>>);

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SimFs")
    }
}

/// Counts of what was done, for tests' activity floors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub writes: u64,
    pub file_syncs: u64,
    pub dir_syncs: u64,
    pub renames: u64,
    pub links: u64,
    pub unlinks: u64,
    pub power_cuts: u64,
    pub failed_writes: u64,
    pub failed_syncs: u64,
}

/// Faults to inject.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Bytes of file data the disk holds; a write that would grow the total beyond it fails
    /// with ENOSPC (writes over bytes a file already has never do).
    pub capacity: Option<u64>,
    /// The next this many file fsyncs fail with EIO (and keep nothing of what they would have
    /// made durable durable, as Linux may drop the dirty pages).
    pub failing_syncs: u32,
    /// The next this many writes fail with EIO.
    pub failing_writes: u32,
    /// The next this many renames fail with EIO (and change nothing).
    pub failing_renames: u32,
    /// The next this many directory fsyncs fail with EIO (and keep nothing of what they would
    /// have made durable durable).
    pub failing_dir_syncs: u32,
    /// After this many more writes that grow a file, every such write fails with ENOSPC,
    /// whatever is deleted meanwhile: as if another writer took all the space left and any
    /// freed later.
    pub growing_writes_left: Option<u32>,
}

struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Bumped by a power cut: handles of an older generation are closed.
    generation: u64,
    locked: HashSet<u64>,
    faults: Faults,
    counts: Counts,
    /// Set by [`SimFs::capture_images`]: a crash image is taken before every fsync (file or
    /// directory) and, at random, before other changes.
    capture: Option<Capture>,
    rng: Rng,
    /// Set by [`SimFs::start_journal`]: the durability-relevant operations, in order.
    journal: Option<Vec<String>>,
    /// Set by [`SimFs::set_segment_prealloc`]: the length WAL segments are created with.
    segment_prealloc: Option<u64>,
}

struct Capture {
    /// One in this many other changes also gets an image.
    other_every: u64,
    images: Vec<SimFs>,
}

const ROOT: u64 = 1;

impl Default for State {
    fn default() -> State {
        let mut inodes = HashMap::new();
        inodes.insert(ROOT, Inode::Dir(DirNode::default()));
        State {
            inodes,
            next_ino: ROOT + 1,
            generation: 0,
            locked: HashSet::new(),
            faults: Faults::default(),
            counts: Counts::default(),
            capture: None,
            rng: Rng::new(0),
            journal: None,
            segment_prealloc: None,
        }
    }
}

#[derive(Clone)]
enum Inode {
    File(FileNode),
    Dir(DirNode),
}

#[derive(Clone, Default)]
struct FileNode {
    data: Arc<Content>,
    durable: Arc<Content>,
    /// Changes since the last fsync, oldest first.
    pending: Vec<FileOp>,
}

#[derive(Clone)]
enum FileOp {
    Write {
        at: u64,
        bytes: Vec<u8>,
    },
    /// A write of `len` zeros (preallocation), kept without its bytes.
    Zeros {
        at: u64,
        len: u64,
    },
    SetLen(u64),
}

/// A file's bytes in pages shared copy-on-write, so that crash images cost little more than
/// the pages written since the last fsync; a missing page is zeros (a preallocated tail).
#[derive(Clone, Default)]
struct Content {
    pages: Vec<Option<Arc<Vec<u8>>>>,
    len: u64,
}

const PAGE: u64 = 16 << 10;

impl Content {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> usize {
        let n = (self.len.saturating_sub(pos) as usize).min(buf.len());
        let mut done = 0;
        while done < n {
            let at = pos + done as u64;
            let (page, off) = ((at / PAGE) as usize, (at % PAGE) as usize);
            let k = (PAGE as usize - off).min(n - done);
            match self.pages.get(page).and_then(|p| p.as_ref()) {
                Some(p) => buf[done..done + k].copy_from_slice(&p[off..off + k]),
                None => buf[done..done + k].fill(0),
            }
            done += k;
        }
        n
    }

    fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len as usize];
        self.read_at(0, &mut out);
        out
    }

    /// Writes `bytes` at `at` (None: zeros, `len` of them).
    fn write_at(&mut self, at: u64, bytes: Option<&[u8]>, len: u64) {
        let end = at + len;
        let pages = end.div_ceil(PAGE) as usize;
        if self.pages.len() < pages {
            self.pages.resize(pages, None);
        }
        let mut done = 0u64;
        while done < len {
            let pos = at + done;
            let (page, off) = ((pos / PAGE) as usize, (pos % PAGE) as usize);
            let k = (PAGE as usize - off).min((len - done) as usize);
            let slot = &mut self.pages[page];
            match bytes {
                None if slot.is_none() => {}
                None => Arc::make_mut(slot.as_mut().unwrap())[off..off + k].fill(0),
                Some(b) => {
                    let p = slot.get_or_insert_with(|| Arc::new(vec![0; PAGE as usize]));
                    let d = done as usize;
                    Arc::make_mut(p)[off..off + k].copy_from_slice(&b[d..d + k]);
                }
            }
            done += k as u64;
        }
        self.len = self.len.max(end);
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            // Zero what is cut off, so that growing again reads zeros.
            let cut = self.len - len;
            self.write_at(len, None, cut);
            self.pages.truncate(len.div_ceil(PAGE) as usize);
        }
        self.len = len;
    }
}

fn apply_file_op(content: &mut Arc<Content>, op: &FileOp) {
    let c = Arc::make_mut(content);
    match op {
        FileOp::Write { at, bytes } => c.write_at(*at, Some(bytes), bytes.len() as u64),
        FileOp::Zeros { at, len } => c.write_at(*at, None, *len),
        FileOp::SetLen(len) => c.set_len(*len),
    }
}

#[derive(Clone, Default)]
struct DirNode {
    entries: BTreeMap<String, u64>,
    durable: BTreeMap<String, u64>,
    /// Changes since the last fsync, oldest first; each is applied whole or not at all.
    pending: Vec<Vec<DirOp>>,
}

#[derive(Clone)]
enum DirOp {
    Set(String, u64),
    Remove(String),
}

fn apply_dir_ops(entries: &mut BTreeMap<String, u64>, ops: &[DirOp]) {
    for op in ops {
        match op {
            DirOp::Set(name, ino) => {
                entries.insert(name.clone(), *ino);
            }
            DirOp::Remove(name) => {
                entries.remove(name);
            }
        }
    }
}

fn err(kind: io::ErrorKind, what: &str, path: &Path) -> io::Error {
    io::Error::new(kind, format!("{what}: {}", path.display()))
}

fn names(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(
                n.to_str()
                    .ok_or_else(|| err(io::ErrorKind::InvalidInput, "not UTF-8", path))?
                    .to_owned(),
            ),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

impl State {
    fn next_random(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    fn dir(&self, ino: u64) -> Option<&DirNode> {
        match self.inodes.get(&ino) {
            Some(Inode::Dir(d)) => Some(d),
            _ => None,
        }
    }

    fn dir_mut(&mut self, ino: u64) -> &mut DirNode {
        match self.inodes.get_mut(&ino) {
            Some(Inode::Dir(d)) => d,
            _ => panic!("inode {ino} is not a directory"),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Option<&mut FileNode> {
        match self.inodes.get_mut(&ino) {
            Some(Inode::File(f)) => Some(f),
            _ => None,
        }
    }

    /// The inode at `path`, if there is one.
    fn lookup(&self, path: &Path) -> io::Result<Option<u64>> {
        let mut ino = ROOT;
        for name in names(path)? {
            let Some(dir) = self.dir(ino) else {
                return Err(err(io::ErrorKind::NotADirectory, "not a directory", path));
            };
            match dir.entries.get(&name) {
                Some(&next) => ino = next,
                None => return Ok(None),
            }
        }
        Ok(Some(ino))
    }

    fn lookup_existing(&self, path: &Path) -> io::Result<u64> {
        self.lookup(path)?
            .ok_or_else(|| err(io::ErrorKind::NotFound, "no such file or directory", path))
    }

    /// The directory holding `path`'s last name, and that name.
    fn parent(&self, path: &Path) -> io::Result<(u64, String)> {
        let mut parts = names(path)?;
        let name = parts
            .pop()
            .ok_or_else(|| err(io::ErrorKind::InvalidInput, "no file name", path))?;
        let parent: PathBuf = parts.iter().collect();
        let ino = self.lookup_existing(&parent)?;
        if self.dir(ino).is_none() {
            return Err(err(io::ErrorKind::NotADirectory, "not a directory", path));
        }
        Ok((ino, name))
    }

    /// Changes directory `dir`'s entries by `ops`, as one change.
    fn change_dir(&mut self, dir: u64, ops: Vec<DirOp>) {
        self.maybe_capture(false);
        let d = self.dir_mut(dir);
        apply_dir_ops(&mut d.entries, &ops);
        d.pending.push(ops);
    }

    /// Bytes in the files that have a name (each counted once, however many it has).
    fn used_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        let mut dirs = vec![ROOT];
        let mut used = 0;
        while let Some(dir) = dirs.pop() {
            let Some(d) = self.dir(dir) else { continue };
            for &ino in d.entries.values() {
                if !seen.insert(ino) {
                    continue;
                }
                match &self.inodes[&ino] {
                    Inode::File(f) => used += f.data.len(),
                    Inode::Dir(_) => dirs.push(ino),
                }
            }
        }
        used
    }

    fn note(&mut self, what: impl FnOnce() -> String) {
        if let Some(j) = &mut self.journal {
            j.push(what());
        }
    }

    /// Takes a crash image now if capturing: before every fsync (`sync`), and at random
    /// before other changes.
    fn maybe_capture(&mut self, sync: bool) {
        let Some(every) = self.capture.as_ref().map(|c| c.other_every) else {
            return;
        };
        if !sync && self.below(every) != 0 {
            return;
        }
        let image = self.crash_image();
        self.capture
            .as_mut()
            .unwrap()
            .images
            .push(SimFs(Arc::new(Mutex::new(image))));
    }

    /// What a power cut now could leave: the durable state, plus for each file a prefix of
    /// its unsynced writes (one of them maybe missing, the last one torn), and for each
    /// directory a prefix or a subset of its unsynced changes.
    fn crash_image(&mut self) -> State {
        let mut rng = self.rng.clone();
        let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        let mut inodes = HashMap::with_capacity(inos.len());
        for ino in inos {
            let image = match &self.inodes[&ino] {
                Inode::Dir(d) => {
                    // Half the time a prefix, as a journal commits in order; otherwise any
                    // subset, as a filesystem that reorders directory updates may leave.
                    let n = d.pending.len() as u64;
                    let (prefix, subset) = (rng.below(n + 1), rng.below(2) == 0);
                    let mut entries = d.durable.clone();
                    for (i, ops) in d.pending.iter().enumerate() {
                        let kept = if subset {
                            rng.below(2) == 0
                        } else {
                            (i as u64) < prefix
                        };
                        if kept {
                            apply_dir_ops(&mut entries, ops);
                        }
                    }
                    Inode::Dir(DirNode {
                        durable: entries.clone(),
                        entries,
                        pending: Vec::new(),
                    })
                }
                Inode::File(f) => {
                    let keep = rng.below(f.pending.len() as u64 + 1) as usize;
                    let skip = if keep > 1 && rng.below(4) == 0 {
                        Some(rng.below(keep as u64) as usize)
                    } else {
                        None
                    };
                    let mut data = f.durable.clone();
                    for (i, op) in f.pending.iter().enumerate().take(keep + 1) {
                        if Some(i) == skip {
                            continue;
                        }
                        if i < keep {
                            apply_file_op(&mut data, op);
                            continue;
                        }
                        // The write at the cut: torn somewhere, its tail lost or zeros.
                        if let FileOp::Zeros { at, len } = op {
                            let len = rng.below(len + 1);
                            apply_file_op(&mut data, &FileOp::Zeros { at: *at, len });
                        }
                        if let FileOp::Write { at, bytes } = op {
                            let cut = rng.below(bytes.len() as u64 + 1) as usize;
                            let mut torn = bytes[..cut].to_vec();
                            if rng.below(2) == 0 {
                                torn.resize(bytes.len(), 0);
                            }
                            apply_file_op(
                                &mut data,
                                &FileOp::Write {
                                    at: *at,
                                    bytes: torn,
                                },
                            );
                        }
                    }
                    Inode::File(FileNode {
                        durable: data.clone(),
                        data,
                        pending: Vec::new(),
                    })
                }
            };
            inodes.insert(ino, image);
        }
        self.rng = rng;
        let rng = Rng::new(self.next_random());
        State {
            inodes,
            next_ino: self.next_ino,
            generation: self.generation + 1,
            locked: HashSet::new(),
            faults: Faults::default(),
            counts: self.counts,
            capture: None,
            rng,
            journal: None,
            segment_prealloc: self.segment_prealloc,
        }
    }

    fn check_space(&mut self, grows_by: u64, path: &str) -> io::Result<()> {
        if self.faults.failing_writes > 0 {
            self.faults.failing_writes -= 1;
            self.counts.failed_writes += 1;
            return Err(io::Error::from_raw_os_error(EIO));
        }
        if let Some(left) = self
            .faults
            .growing_writes_left
            .as_mut()
            .filter(|_| grows_by > 0)
        {
            if *left == 0 {
                self.counts.failed_writes += 1;
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            *left -= 1;
        }
        if let Some(cap) = self.faults.capacity {
            if grows_by > 0 && self.used_bytes() + grows_by > cap {
                self.counts.failed_writes += 1;
                let _ = path;
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
        }
        Ok(())
    }
}

impl SimFs {
    pub fn new(seed: u64) -> SimFs {
        let fs = SimFs::default();
        fs.lock().rng = Rng::new(seed);
        fs
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    /// Bytes in the files that have a name (what a capacity is measured against).
    pub fn used(&self) -> u64 {
        self.lock().used_bytes()
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Cuts the power: every handle is closed, locks released, and the files and directories
    /// keep what was durable and some of the rest (see the module's model).
    pub fn power_cut(&self) {
        let mut s = self.lock();
        let mut image = s.crash_image();
        image.counts.power_cuts += 1;
        image.faults = s.faults;
        image.capture = s.capture.take();
        *s = image;
    }

    /// From now on, keeps a crash image (a separate filesystem) before every fsync and before
    /// about one in `other_every` other changes; [`SimFs::take_images`] hands them over.
    pub fn capture_images(&self, other_every: u64) {
        self.lock().capture = Some(Capture {
            other_every: other_every.max(1),
            images: Vec::new(),
        });
    }

    /// From now on, notes every fsync, directory fsync, rename, link and unlink, and the
    /// test's own [`SimFs::mark`]s; [`SimFs::journal`] gives them, in order.
    pub fn start_journal(&self) {
        self.lock().journal = Some(Vec::new());
    }

    pub fn mark(&self, what: &str) {
        self.lock().note(|| what.to_string());
    }

    pub fn journal(&self) -> Vec<String> {
        self.lock().journal.clone().unwrap_or_default()
    }

    /// A separate copy of this filesystem as it is now (durable and written alike), with no
    /// handle open and nothing captured: to go on from a crash image while keeping it.
    pub fn fork(&self) -> SimFs {
        let s = self.lock();
        SimFs(Arc::new(Mutex::new(State {
            inodes: s.inodes.clone(),
            next_ino: s.next_ino,
            generation: s.generation + 1,
            locked: HashSet::new(),
            faults: s.faults,
            counts: s.counts,
            capture: None,
            rng: s.rng.clone(),
            journal: None,
            segment_prealloc: s.segment_prealloc,
        })))
    }

    /// Bytes written to the file at `path` since its last fsync (zeros included).
    pub fn unsynced_bytes(&self, path: &Path) -> io::Result<u64> {
        let mut s = self.lock();
        let ino = s.lookup_existing(path)?;
        let f = s
            .file_mut(ino)
            .ok_or_else(|| err(io::ErrorKind::IsADirectory, "is a directory", path))?;
        Ok(f.pending
            .iter()
            .map(|op| match op {
                FileOp::Write { bytes, .. } => bytes.len() as u64,
                FileOp::Zeros { len, .. } => *len,
                FileOp::SetLen(_) => 0,
            })
            .sum())
    }

    /// Has the WAL create its segments `bytes` long (zeros after the header) instead of
    /// `wal::SEGMENT_PREALLOC`: the simulator opens disks so often that reading megabytes of
    /// zeros each time would dominate its runs.
    pub fn set_segment_prealloc(&self, bytes: u64) {
        self.lock().segment_prealloc = Some(bytes);
    }

    pub fn segment_prealloc(&self) -> Option<u64> {
        self.lock().segment_prealloc
    }

    /// Stops keeping crash images and hands over those kept.
    pub fn stop_capture(&self) -> Vec<SimFs> {
        self.lock()
            .capture
            .take()
            .map_or_else(Vec::new, |c| c.images)
    }

    pub fn take_images(&self) -> Vec<SimFs> {
        match &mut self.lock().capture {
            Some(c) => std::mem::take(&mut c.images),
            None => Vec::new(),
        }
    }

    pub fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let (parent, name) = s.parent(path)?;
        if s.dir(parent).unwrap().entries.contains_key(&name) {
            return Err(err(io::ErrorKind::AlreadyExists, "exists", path));
        }
        let ino = s.next_ino;
        s.next_ino += 1;
        s.inodes.insert(ino, Inode::Dir(DirNode::default()));
        s.change_dir(parent, vec![DirOp::Set(name, ino)]);
        Ok(())
    }

    pub fn open(&self, path: &Path, how: Open) -> io::Result<SimFile> {
        let mut s = self.lock();
        let ino = match s.lookup(path)? {
            Some(ino) => {
                if s.dir(ino).is_some() && how.write {
                    return Err(err(io::ErrorKind::IsADirectory, "is a directory", path));
                }
                if how.truncate {
                    s.maybe_capture(false);
                    if let Some(f) = s.file_mut(ino) {
                        apply_file_op(&mut f.data, &FileOp::SetLen(0));
                        f.pending.push(FileOp::SetLen(0));
                    }
                }
                ino
            }
            None if how.create => {
                let (parent, name) = s.parent(path)?;
                let ino = s.next_ino;
                s.next_ino += 1;
                s.inodes.insert(ino, Inode::File(FileNode::default()));
                s.change_dir(parent, vec![DirOp::Set(name, ino)]);
                ino
            }
            None => return Err(err(io::ErrorKind::NotFound, "no such file", path)),
        };
        Ok(SimFile {
            fs: self.clone(),
            ino,
            path: path.to_path_buf(),
            generation: s.generation,
            pos: Arc::new(Mutex::new(0)),
            writable: how.write,
            holds_lock: Mutex::new(false),
        })
    }

    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.lock();
        let ino = s.lookup_existing(path)?;
        match s.inodes.get(&ino) {
            Some(Inode::File(f)) => Ok(f.data.to_vec()),
            _ => Err(err(io::ErrorKind::IsADirectory, "is a directory", path)),
        }
    }

    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let (src, src_name) = s.parent(from)?;
        let (dst, dst_name) = s.parent(to)?;
        let ino = *s
            .dir(src)
            .unwrap()
            .entries
            .get(&src_name)
            .ok_or_else(|| err(io::ErrorKind::NotFound, "no such file", from))?;
        if let Some(&there) = s.dir(dst).unwrap().entries.get(&dst_name) {
            if let Some(d) = s.dir(there) {
                if !d.entries.is_empty() {
                    return Err(err(io::ErrorKind::DirectoryNotEmpty, "not empty", to));
                }
            }
        }
        if s.faults.failing_renames > 0 {
            s.faults.failing_renames -= 1;
            return Err(io::Error::from_raw_os_error(EIO));
        }
        s.counts.renames += 1;
        s.note(|| format!("rename {} {}", from.display(), to.display()));
        if src == dst {
            s.change_dir(
                src,
                vec![DirOp::Remove(src_name), DirOp::Set(dst_name, ino)],
            );
        } else {
            s.change_dir(dst, vec![DirOp::Set(dst_name, ino)]);
            s.change_dir(src, vec![DirOp::Remove(src_name)]);
        }
        Ok(())
    }

    pub fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let ino = s.lookup_existing(from)?;
        let (dst, name) = s.parent(to)?;
        if s.dir(dst).unwrap().entries.contains_key(&name) {
            return Err(err(io::ErrorKind::AlreadyExists, "exists", to));
        }
        s.counts.links += 1;
        s.note(|| format!("link {} {}", from.display(), to.display()));
        s.change_dir(dst, vec![DirOp::Set(name, ino)]);
        Ok(())
    }

    pub fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let (parent, name) = s.parent(path)?;
        let Some(&ino) = s.dir(parent).unwrap().entries.get(&name) else {
            return Err(err(io::ErrorKind::NotFound, "no such file", path));
        };
        if s.dir(ino).is_some() {
            return Err(err(io::ErrorKind::IsADirectory, "is a directory", path));
        }
        s.counts.unlinks += 1;
        s.note(|| format!("unlink {}", path.display()));
        s.change_dir(parent, vec![DirOp::Remove(name)]);
        Ok(())
    }

    /// Removes `path` and everything under it (as `rm -r` does: the entries one by one,
    /// the directory's own name last).
    pub fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let (parent, name) = s.parent(path)?;
        let ino = s.lookup_existing(path)?;
        fn empty(s: &mut State, ino: u64) {
            let Some(d) = s.dir(ino) else { return };
            let children: Vec<(String, u64)> =
                d.entries.iter().map(|(n, i)| (n.clone(), *i)).collect();
            for (name, child) in children {
                empty(s, child);
                s.counts.unlinks += 1;
                s.change_dir(ino, vec![DirOp::Remove(name)]);
            }
        }
        empty(&mut s, ino);
        s.note(|| format!("rmdir {}", path.display()));
        s.counts.unlinks += 1;
        s.change_dir(parent, vec![DirOp::Remove(name)]);
        Ok(())
    }

    pub fn list(&self, dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
        let s = self.lock();
        let ino = s.lookup_existing(dir)?;
        let d = s
            .dir(ino)
            .ok_or_else(|| err(io::ErrorKind::NotADirectory, "not a directory", dir))?;
        Ok(d.entries
            .keys()
            .map(|name| (name.clone(), dir.join(name)))
            .collect())
    }

    pub fn exists(&self, path: &Path) -> bool {
        matches!(self.lock().lookup(path), Ok(Some(_)))
    }

    pub fn file_len(&self, path: &Path) -> io::Result<u64> {
        let s = self.lock();
        let ino = s.lookup_existing(path)?;
        match s.inodes.get(&ino) {
            Some(Inode::File(f)) => Ok(f.data.len()),
            _ => Ok(0),
        }
    }

    pub fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let ino = s.lookup_existing(path)?;
        if s.dir(ino).is_none() {
            return Err(err(io::ErrorKind::NotADirectory, "not a directory", path));
        }
        s.maybe_capture(true);
        if s.faults.failing_dir_syncs > 0 {
            s.faults.failing_dir_syncs -= 1;
            s.counts.failed_syncs += 1;
            return Err(io::Error::from_raw_os_error(EIO));
        }
        s.counts.dir_syncs += 1;
        s.note(|| format!("syncdir {}", path.display()));
        let d = s.dir_mut(ino);
        for ops in std::mem::take(&mut d.pending) {
            apply_dir_ops(&mut d.durable, &ops);
        }
        Ok(())
    }

    /// The names under `dir`, recursively, with each file's length: for test failures.
    pub fn describe(&self, dir: &Path) -> String {
        let s = self.lock();
        let mut out = String::new();
        fn walk(s: &State, ino: u64, prefix: &str, out: &mut String) {
            let Some(d) = s.dir(ino) else { return };
            for (name, &child) in &d.entries {
                match s.inodes.get(&child) {
                    Some(Inode::File(f)) => {
                        out.push_str(&format!("{prefix}{name} ({} bytes)\n", f.data.len()))
                    }
                    _ => {
                        out.push_str(&format!("{prefix}{name}/\n"));
                        walk(s, child, &format!("{prefix}{name}/"), out);
                    }
                }
            }
        }
        if let Ok(Some(ino)) = s.lookup(dir) {
            walk(&s, ino, "", &mut out);
        }
        out
    }
}

/// An open file of a [`SimFs`]. Clones made by `clone_handle` share the position.
#[derive(Debug)]
pub struct SimFile {
    fs: SimFs,
    ino: u64,
    path: PathBuf,
    generation: u64,
    pos: Arc<Mutex<u64>>,
    writable: bool,
    holds_lock: Mutex<bool>,
}

impl SimFile {
    /// The state, if this handle survived every power cut since it was opened.
    fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        let s = self.fs.lock();
        if s.generation != self.generation {
            return Err(io::Error::other(format!(
                "{}: closed by a power cut",
                self.path.display()
            )));
        }
        Ok(s)
    }

    fn pos(&self) -> MutexGuard<'_, u64> {
        self.pos.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn clone_handle(&self) -> SimFile {
        SimFile {
            fs: self.fs.clone(),
            ino: self.ino,
            path: self.path.clone(),
            generation: self.generation,
            pos: self.pos.clone(),
            writable: self.writable,
            holds_lock: Mutex::new(false),
        }
    }

    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.state()?;
        let mut pos = self.pos();
        let Some(f) = s.file_mut(self.ino) else {
            return Err(err(
                io::ErrorKind::IsADirectory,
                "is a directory",
                &self.path,
            ));
        };
        let n = f.data.read_at(*pos, buf);
        *pos += n as u64;
        Ok(n)
    }

    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(err(
                io::ErrorKind::PermissionDenied,
                "read-only",
                &self.path,
            ));
        }
        let mut s = self.state()?;
        let mut pos = self.pos();
        let len = match s.inodes.get(&self.ino) {
            Some(Inode::File(f)) => f.data.len(),
            _ => {
                return Err(err(
                    io::ErrorKind::IsADirectory,
                    "is a directory",
                    &self.path,
                ))
            }
        };
        let grows = (*pos + buf.len() as u64).saturating_sub(len);
        s.check_space(grows, "")?;
        s.maybe_capture(false);
        s.counts.writes += 1;
        let op = if all_zeros(buf) {
            FileOp::Zeros {
                at: *pos,
                len: buf.len() as u64,
            }
        } else {
            FileOp::Write {
                at: *pos,
                bytes: buf.to_vec(),
            }
        };
        let f = s.file_mut(self.ino).unwrap();
        apply_file_op(&mut f.data, &op);
        f.pending.push(op);
        *pos += buf.len() as u64;
        Ok(())
    }

    pub fn seek(&self, to: SeekFrom) -> io::Result<u64> {
        let mut s = self.state()?;
        let len = s.file_mut(self.ino).map_or(0, |f| f.data.len());
        let mut pos = self.pos();
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => len.checked_add_signed(d),
            SeekFrom::Current(d) => pos.checked_add_signed(d),
        };
        *pos = new.ok_or_else(|| err(io::ErrorKind::InvalidInput, "seek before 0", &self.path))?;
        Ok(*pos)
    }

    pub fn sync(&self) -> io::Result<()> {
        let mut s = self.state()?;
        s.maybe_capture(true);
        if s.faults.failing_syncs > 0 {
            s.faults.failing_syncs -= 1;
            s.counts.failed_syncs += 1;
            // As Linux may: the dirty pages are dropped, and the error reported once.
            if let Some(f) = s.file_mut(self.ino) {
                f.data = f.durable.clone();
                f.pending.clear();
            }
            return Err(io::Error::from_raw_os_error(EIO));
        }
        s.counts.file_syncs += 1;
        let path = &self.path;
        s.note(|| format!("sync {}", path.display()));
        if let Some(f) = s.file_mut(self.ino) {
            for op in std::mem::take(&mut f.pending) {
                apply_file_op(&mut f.durable, &op);
            }
        }
        Ok(())
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(err(
                io::ErrorKind::PermissionDenied,
                "read-only",
                &self.path,
            ));
        }
        let mut s = self.state()?;
        let have = s.file_mut(self.ino).map_or(0, |f| f.data.len());
        s.check_space(len.saturating_sub(have), "")?;
        s.maybe_capture(false);
        let f = s
            .file_mut(self.ino)
            .ok_or_else(|| err(io::ErrorKind::IsADirectory, "is a directory", &self.path))?;
        let op = FileOp::SetLen(len);
        apply_file_op(&mut f.data, &op);
        f.pending.push(op);
        Ok(())
    }

    pub fn size(&self) -> io::Result<u64> {
        let mut s = self.state()?;
        Ok(s.file_mut(self.ino).map_or(0, |f| f.data.len()))
    }

    pub fn try_lock(&self) -> Result<(), TryLockError> {
        let mut s = self.state().map_err(TryLockError::Error)?;
        if !s.locked.insert(self.ino) {
            return Err(TryLockError::WouldBlock);
        }
        *self.holds_lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        if *self.holds_lock.get_mut().unwrap_or_else(|e| e.into_inner()) {
            let mut s = self.fs.lock();
            if s.generation == self.generation {
                s.locked.remove(&self.ino);
            }
        }
    }
}
