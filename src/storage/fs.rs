//! The filesystem seam: every file the storage writes, syncs, renames, links or deletes goes
//! through [`Fs`], either the real `std::fs` or the simulated one in [`super::simfs`] (which
//! can cut the power and keep only what was made durable, or fail writes and fsyncs). Also the
//! one copy of the helpers the WAL, the store and the cluster file share, so that every durable
//! write takes the same path (temp file, fsync, rename, directory fsync).
//!
//! The real arm is a `match` over a plain `std::fs::File` with nothing boxed, so it costs a
//! branch per call.

use super::error::StorageError;
pub use super::simfs::Open;
use super::simfs::{SimFile, SimFs};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Which filesystem the storage works on.
#[derive(Clone, Debug, Default)]
pub enum Fs {
    /// The operating system's, through `std::fs`.
    #[default]
    Real,
    /// An in-memory one that models durability and injects faults (tests, the simulator).
    Sim(SimFs),
}

/// An open file of an [`Fs`].
#[derive(Debug)]
pub enum FsFile {
    Real(File),
    Sim(Box<SimFile>),
}

impl Fs {
    /// Creates `dir` and its missing parents, syncing the parent of every directory it created
    /// so that the new names survive a power cut.
    pub fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        if self.try_exists(dir)? {
            return Ok(());
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent {
            self.create_dir_all(parent)?;
        }
        match self.create_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        self.sync_dir(parent.unwrap_or(Path::new(".")))
    }

    pub fn create_dir(&self, dir: &Path) -> io::Result<()> {
        match self {
            Fs::Real => fs::create_dir(dir),
            Fs::Sim(s) => s.create_dir(dir),
        }
    }

    pub fn open(&self, path: &Path, how: Open) -> io::Result<FsFile> {
        match self {
            Fs::Real => OpenOptions::new()
                .read(how.read)
                .write(how.write)
                .create(how.create)
                .truncate(how.truncate)
                .open(path)
                .map(FsFile::Real),
            Fs::Sim(s) => s.open(path, how).map(|f| FsFile::Sim(Box::new(f))),
        }
    }

    /// The whole contents of `path`.
    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        match self {
            Fs::Real => fs::read(path),
            Fs::Sim(s) => s.read(path),
        }
    }

    pub fn read_to_string(&self, path: &Path) -> io::Result<String> {
        String::from_utf8(self.read(path)?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        match self {
            Fs::Real => fs::rename(from, to),
            Fs::Sim(s) => s.rename(from, to),
        }
    }

    /// A second name for `from`; fails with `AlreadyExists` rather than replace `to`.
    pub fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        match self {
            Fs::Real => fs::hard_link(from, to),
            Fs::Sim(s) => s.hard_link(from, to),
        }
    }

    pub fn remove_file(&self, path: &Path) -> io::Result<()> {
        match self {
            Fs::Real => fs::remove_file(path),
            Fs::Sim(s) => s.remove_file(path),
        }
    }

    pub fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        match self {
            Fs::Real => fs::remove_dir_all(path),
            Fs::Sim(s) => s.remove_dir_all(path),
        }
    }

    /// The entries of `dir` whose names are UTF-8: name and path.
    pub fn list(&self, dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
        match self {
            Fs::Real => {
                let mut out = Vec::new();
                for item in fs::read_dir(dir)? {
                    let item = item?;
                    if let Ok(name) = item.file_name().into_string() {
                        out.push((name, item.path()));
                    }
                }
                Ok(out)
            }
            Fs::Sim(s) => s.list(dir),
        }
    }

    pub fn try_exists(&self, path: &Path) -> io::Result<bool> {
        match self {
            Fs::Real => path.try_exists(),
            Fs::Sim(s) => Ok(s.exists(path)),
        }
    }

    /// The length of the file at `path`.
    pub fn file_len(&self, path: &Path) -> io::Result<u64> {
        match self {
            Fs::Real => fs::metadata(path).map(|m| m.len()),
            Fs::Sim(s) => s.file_len(path),
        }
    }

    /// Makes the directory's entries (files created, renamed or deleted in it) durable.
    pub fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        match self {
            Fs::Real => File::open(dir).and_then(|d| d.sync_all()),
            Fs::Sim(s) => s.sync_dir(dir),
        }
    }
}

impl FsFile {
    /// Makes the file's data (and the length needed to read it) durable: `fdatasync`.
    pub fn sync_data(&self) -> io::Result<()> {
        match self {
            FsFile::Real(f) => f.sync_data(),
            FsFile::Sim(f) => f.sync(),
        }
    }

    /// Makes the file's data and metadata durable: `fsync`.
    pub fn sync_all(&self) -> io::Result<()> {
        match self {
            FsFile::Real(f) => f.sync_all(),
            FsFile::Sim(f) => f.sync(),
        }
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            FsFile::Real(f) => f.set_len(len),
            FsFile::Sim(f) => f.set_len(len),
        }
    }

    pub fn size(&self) -> io::Result<u64> {
        match self {
            FsFile::Real(f) => f.metadata().map(|m| m.len()),
            FsFile::Sim(f) => f.size(),
        }
    }

    /// Another handle on the same file, sharing its position.
    pub fn try_clone(&self) -> io::Result<FsFile> {
        match self {
            FsFile::Real(f) => f.try_clone().map(FsFile::Real),
            FsFile::Sim(f) => Ok(FsFile::Sim(Box::new(f.clone_handle()))),
        }
    }

    /// Takes the exclusive lock on the file, held until this handle is dropped.
    pub fn try_lock(&self) -> Result<(), TryLockError> {
        match self {
            FsFile::Real(f) => f.try_lock(),
            FsFile::Sim(f) => f.try_lock(),
        }
    }
}

impl Read for &FsFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            FsFile::Real(f) => (&*f).read(buf),
            FsFile::Sim(f) => f.read(buf),
        }
    }
}

impl Seek for &FsFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match self {
            FsFile::Real(f) => (&*f).seek(pos),
            FsFile::Sim(f) => f.seek(pos),
        }
    }
}

impl Write for &FsFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            FsFile::Real(f) => (&*f).write(buf),
            FsFile::Sim(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for FsFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Seek for FsFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        (&*self).seek(pos)
    }
}

impl Write for FsFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            FsFile::Real(f) => f.write_all(buf),
            FsFile::Sim(f) => f.write_all(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The temporary name `name` is written under before it is renamed into place.
pub(crate) fn tmp_name(name: &str) -> String {
    format!("{name}.tmp")
}

/// Writes `dir/name` so that a crash leaves either the old file or the whole new one, never an
/// empty or partial one: temp file, fsync, rename, fsync of the directory.
pub fn write_atomically(fs: &Fs, dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    replace_file(fs, dir, name, bytes)?;
    sync_dir(fs, dir)
}

/// [`write_atomically`] but for the directory fsync, which the caller does: an error here
/// (a full disk, say) leaves `dir/name` as it was.
pub(crate) fn replace_file(
    fs: &Fs,
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), StorageError> {
    let path = dir.join(name);
    let tmp = dir.join(tmp_name(name));
    let write = || -> io::Result<()> {
        let create = Open {
            write: true,
            create: true,
            truncate: true,
            ..Open::default()
        };
        let mut f = fs.open(&tmp, create)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs.rename(&tmp, &path)
    };
    write().map_err(StorageError::io("write", &path))
}

/// Makes the directory's entries (newly created, renamed or deleted files) durable.
pub(crate) fn sync_dir(fs: &Fs, dir: &Path) -> Result<(), StorageError> {
    fs.sync_dir(dir)
        .map_err(StorageError::io("fsync directory", dir))
}

/// Whether `path` exists; an error (not "absent") if that cannot be told.
pub(crate) fn exists(fs: &Fs, path: &Path) -> Result<bool, StorageError> {
    fs.try_exists(path).map_err(StorageError::io("stat", path))
}

/// Removes `path`; a file already gone is fine.
pub(crate) fn remove_if_exists(fs: &Fs, path: &Path) -> Result<(), StorageError> {
    match fs.remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StorageError::io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Opens `path` for reading and writing, creating it if absent, never truncating it.
pub(crate) fn open_rw(fs: &Fs, path: &Path) -> Result<FsFile, StorageError> {
    fs.open(path, Open::RW_CREATE)
        .map_err(StorageError::io("open", path))
}

/// The error for a failed write to `path`.
pub(crate) fn write_error(path: &Path, e: io::Error) -> StorageError {
    StorageError::io("write", path)(e)
}
