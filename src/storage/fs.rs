//! File helpers the WAL, the store and the cluster file share: one copy each, so that every
//! durable write takes the same path (temp file, fsync, rename, directory fsync).

use super::error::StorageError;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// The temporary name `name` is written under before it is renamed into place.
pub(crate) fn tmp_name(name: &str) -> String {
    format!("{name}.tmp")
}

/// Writes `dir/name` so that a crash leaves either the old file or the whole new one, never an
/// empty or partial one: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let path = dir.join(name);
    let tmp = dir.join(tmp_name(name));
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(StorageError::io("write", &path))?;
    sync_dir(dir)
}

/// Makes the directory's entries (newly created, renamed or deleted files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io("fsync directory", dir))
}

/// Whether `path` exists; an error (not "absent") if that cannot be told.
pub(crate) fn exists(path: &Path) -> Result<bool, StorageError> {
    path.try_exists().map_err(StorageError::io("stat", path))
}

/// Removes `path`; a file already gone is fine.
pub(crate) fn remove_if_exists(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StorageError::io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Opens `path` for reading and writing, creating it if absent, never truncating it.
pub(crate) fn open_rw(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(StorageError::io("open", path))
}

/// The error for a failed write to `path`.
pub(crate) fn write_error(path: &Path, e: io::Error) -> StorageError {
    StorageError::io("write", path)(e)
}
