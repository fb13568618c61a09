//! Advisory locks for writers: one process at a time writes a given file (a curvature file, a
//! shard of a gradient store, a store's manifest).
//!
//! A lock is the OS advisory lock (`flock`, through `std::fs::File::try_lock`) on a hidden file
//! `.NAME.lock` beside the file it guards. A second writer does not wait: it fails at once with a
//! message naming the holder (its process id, command line and for how long it has held the
//! lock), which the holder wrote into the lock file. The lock is released when the holder exits,
//! however it exits (the OS drops it with the process), so a killed writer never leaves a lock
//! behind; the holder removes the lock file when it releases the lock normally. Taking a lock
//! checks that the file locked is still the one at the path (a releasing holder may have removed
//! it meanwhile) and retries otherwise, so two processes can never both believe they hold it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A held exclusive lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
    file: Option<File>,
}

/// The lock file guarding `target`: `.NAME.lock` beside it.
pub fn lock_path(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    super::parent_of(target).join(format!(".{name}.lock"))
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &File, path: &Path) -> bool {
    path.exists()
}

/// Who holds a lock, as its holder wrote it: "pid P (`COMMAND`) for S s".
fn describe_holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_string(&mut text));
    let mut lines = text.lines();
    let (Some(pid), Some(since), command) = (lines.next(), lines.next(), lines.next().unwrap_or("")) else {
        return "another process".into();
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let held = now.saturating_sub(since.parse().unwrap_or(now));
    format!("process {pid} (`{command}`, for {held} s)")
}

impl Lock {
    /// Takes the exclusive lock guarding `target` (what the lock protects is named `what` in the
    /// error), or fails at once naming the process that holds it.
    pub fn acquire(target: &Path, what: &str) -> Result<Lock> {
        let path = lock_path(target);
        for _ in 0..100 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(Error::io(&path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::Busy {
                        path: target.to_path_buf(),
                        message: format!(
                            "{what} is being written by {}; wait for it to finish (a killed process releases its lock)",
                            describe_holder(&mut file)
                        ),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path)(e)),
            }
            if !same_file(&file, &path) {
                // The previous holder removed the file between our open and our lock: retry.
                continue;
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let command: Vec<String> = std::env::args().collect();
            let holder = format!("{}\n{now}\n{}\n", std::process::id(), command.join(" "));
            file.set_len(0).and_then(|_| file.write_all(holder.as_bytes())).map_err(Error::io(&path))?;
            return Ok(Lock { path, file: Some(file) });
        }
        Err(Error::run(&path, "the lock file keeps being replaced; is another process removing it?"))
    }
}

/// Removes `target`'s lock file if a killed process left it: taken at once and released (which
/// removes it); a lock someone holds is left alone.
pub fn clear_stale(target: &Path) {
    if lock_path(target).exists() {
        drop(Lock::acquire(target, "a stale lock"));
    }
}

impl Lock {
    /// [`Lock::acquire`], but waiting up to `patience` for a holder that is expected to be brief
    /// (creating a store's manifest) before failing the same way.
    pub fn acquire_waiting(target: &Path, what: &str, patience: std::time::Duration) -> Result<Lock> {
        let started = std::time::Instant::now();
        loop {
            match Self::acquire(target, what) {
                Err(Error::Busy { .. }) if started.elapsed() < patience => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock, then release it: a process that opened
        // the old file finds it gone from the path and retries on a fresh one.
        let _ = std::fs::remove_file(&self.path);
        if let Some(file) = self.file.take() {
            let _ = file.unlock();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_fails_at_once_naming_the_holder_and_the_lock_is_reusable() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("ekfac.bin");
        let held = Lock::acquire(&target, "the ekfac curvature").unwrap();
        let e = Lock::acquire(&target, "the ekfac curvature").unwrap_err().to_string();
        assert!(e.contains("ekfac.bin") && e.contains(&format!("process {}", std::process::id())), "{e}");
        drop(held);
        assert!(!lock_path(&target).exists(), "the lock file is removed on release");
        let again = Lock::acquire(&target, "the ekfac curvature").unwrap();
        drop(again);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
