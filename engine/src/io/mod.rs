//! The leaf of the pipeline: files that are written whole or not at all, locks for writers, and
//! the one binary container every culprit file uses ([`container`]).
//!
//! Rules every writer follows:
//! - A file is written to a temporary name beside it, synced, then renamed over the target
//!   ([`AtomicFile`], [`write_atomic`]); a directory is filled under a temporary name and renamed
//!   into place ([`AtomicDir`]). Readers see the old file or the new one, never a half-written one.
//! - Temporary names carry this process's id and a random suffix (`.NAME.tmp-PID-RANDOM`), so two
//!   processes never share one, and culprit only ever deletes temporaries it can prove are its
//!   own: the ones this process made, or (under the target's lock, see [`lock`]) leftovers of a
//!   killed culprit writing the same target ([`remove_stale_temporaries`]). A file culprit did not
//!   create is never deleted.

pub mod container;
pub mod lock;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The parent directory of `path` (`.` for a bare file name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name_of(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::run(path, "not a file or directory name"))
}

/// A fresh temporary name beside `target`: `.NAME.KIND-PID-RANDOM` (`KIND` is `tmp` for files,
/// `partial` for directories).
fn temporary_name(target: &Path, kind: &str) -> Result<PathBuf> {
    let name = file_name_of(target)?;
    let suffix: u32 = rand::random();
    Ok(parent_of(target).join(format!(".{name}.{kind}-{}-{suffix:08x}", std::process::id())))
}

/// Whether `candidate` is a temporary name culprit made for the file `target_name`, and if so
/// the id of the process that made it.
pub fn temporary_owner(candidate: &str, target_name: &str) -> Option<u32> {
    let rest = candidate.strip_prefix('.')?.strip_prefix(target_name)?;
    let rest = rest.strip_prefix(".tmp-").or_else(|| rest.strip_prefix(".partial-"))?;
    let (pid, random) = rest.split_once('-')?;
    (random.len() == 8 && random.chars().all(|c| c.is_ascii_hexdigit())).then_some(())?;
    pid.parse().ok()
}

/// Removes the temporaries a killed culprit left for `target` (names as [`temporary_owner`]
/// recognises them). Call it only while holding `target`'s lock: every live writer of `target`
/// holds that lock, so every temporary of `target` found then is a leftover. Other files, and
/// temporaries of other targets, are left alone. Returns how many were removed.
pub fn remove_stale_temporaries(target: &Path) -> Result<usize> {
    let name = file_name_of(target)?;
    let dir = parent_of(target);
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(0) };
    for entry in entries.flatten() {
        let candidate = entry.file_name().to_string_lossy().into_owned();
        if temporary_owner(&candidate, &name).is_some() {
            let path = entry.path();
            let result = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            result.map_err(Error::io(&path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Flushes the directory entry of a rename to disk (best effort: not every platform can open a
/// directory for syncing).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A file being written under a temporary name; [`AtomicFile::commit`] renames it into place,
/// dropping it uncommitted removes the temporary.
///
/// Large files are handed to the disk as they are written: after every [`WRITEBACK_BYTES`] the
/// bytes so far are flushed and their writeback started (`sync_file_range(SYNC_FILE_RANGE_WRITE)`
/// on Linux, which returns without waiting), so the disk works while the writer computes what
/// comes next and the `fsync` at [`AtomicFile::commit`] waits only for the last stretch. Without
/// it every byte stays dirty in the page cache until that `fsync`, which then writes them all
/// while nothing else runs: the `cache` bench's 38 MB store (4096 rows) took 99–100 ms to build
/// that way and 86–90 ms this way, on a Sapphire Rapids Xeon with a virtual disk.
pub struct AtomicFile {
    target: PathBuf,
    temporary: PathBuf,
    writer: Option<BufWriter<File>>,
    /// Bytes written so far.
    written: u64,
    /// Where the bytes whose writeback has not been started begin.
    unsent: u64,
}

/// Bytes an [`AtomicFile`] accumulates before it starts their writeback.
pub const WRITEBACK_BYTES: u64 = 4 << 20;

impl AtomicFile {
    /// Starts writing `target` (its directory must exist).
    pub fn create(target: &Path) -> Result<Self> {
        let temporary = temporary_name(target, "tmp")?;
        let file = File::create(&temporary).map_err(Error::io(&temporary))?;
        let writer = Some(BufWriter::with_capacity(1 << 20, file));
        Ok(Self { target: target.to_path_buf(), temporary, writer, written: 0, unsent: 0 })
    }

    /// The temporary file's path (for error messages).
    pub fn temporary(&self) -> &Path {
        &self.temporary
    }

    fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer.as_mut().expect("not committed")
    }

    /// Flushes what was written since the last call and starts its writeback without waiting
    /// for it (see the type's documentation; a no-op beyond the flush where the platform has no
    /// such call). Called by `write` once [`WRITEBACK_BYTES`] are waiting.
    fn start_writeback(&mut self) -> std::io::Result<()> {
        let (from, to) = (self.unsent, self.written);
        let writer = self.writer();
        writer.flush()?;
        hint_writeback(writer.get_ref(), from, to - from);
        self.unsent = to;
        Ok(())
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("committed once");
        let file =
            writer.into_inner().map_err(|e| Error::Io { path: self.temporary.clone(), source: e.into_error() })?;
        file.sync_all().map_err(Error::io(&self.temporary))?;
        drop(file);
        std::fs::rename(&self.temporary, &self.target).map_err(Error::io(&self.target))?;
        sync_dir(&parent_of(&self.target));
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Before this call's bytes are taken, so that an error takes none of them.
        if self.written - self.unsent >= WRITEBACK_BYTES {
            self.start_writeback()?;
        }
        let n = self.writer().write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer().flush()
    }
}

/// Asks the kernel to start writing `len` bytes of `file` from `offset` to disk, and returns
/// without waiting. Only a hint: a failure is ignored, since [`AtomicFile::commit`]'s `fsync`
/// writes and checks every byte anyway.
#[cfg(target_os = "linux")]
fn hint_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: the descriptor is open for the life of `file`; the call reads no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn hint_writeback(_file: &File, _offset: u64, _len: u64) {}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    let tmp = file.temporary().to_path_buf();
    file.write_all(bytes).map_err(Error::io(&tmp))?;
    file.commit()
}

/// A directory being filled under a temporary name beside its target; [`AtomicDir::commit`]
/// renames it into place, dropping it uncommitted removes it. The target must not exist.
pub struct AtomicDir {
    target: PathBuf,
    temporary: PathBuf,
    committed: bool,
    // Held until the directory is committed or dropped: one writer per target.
    _lock: lock::Lock,
}

impl AtomicDir {
    /// Starts filling `target`, which must not exist (its parent is created if needed). Takes
    /// `target`'s lock (a second writer of the same directory fails at once, naming the first)
    /// and, holding it, removes what a killed culprit left filling the same target.
    pub fn create(target: &Path) -> Result<Self> {
        if target.exists() {
            return Err(Error::run(target, "already exists; choose another --out or remove it"));
        }
        let parent = parent_of(target);
        std::fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
        let lock = lock::Lock::acquire(target, "this output directory")?;
        remove_stale_temporaries(target)?;
        let temporary = temporary_name(target, "partial")?;
        std::fs::create_dir(&temporary).map_err(Error::io(&temporary))?;
        Ok(Self { target: target.to_path_buf(), temporary, committed: false, _lock: lock })
    }

    /// Where to write the directory's files until it is committed.
    pub fn path(&self) -> &Path {
        &self.temporary
    }

    /// The directory's final place.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the directory into place; fails if the target appeared meanwhile.
    pub fn commit(mut self) -> Result<()> {
        if self.target.exists() {
            return Err(Error::run(&self.target, "appeared while this command was writing it; nothing was replaced"));
        }
        std::fs::rename(&self.temporary, &self.target).map_err(Error::io(&self.target))?;
        sync_dir(&parent_of(&self.target));
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temporary);
        }
    }
}

/// Writes `bytes` to a new file `path` inside a directory being filled (synced, no rename: the
/// directory's own rename publishes it).
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(Error::io(path))?;
    f.write_all(bytes).map_err(Error::io(path))?;
    f.sync_all().map_err(Error::io(path))
}

/// Refuses an output path that would replace one of `inputs` or a file inside one of
/// `protected` directories (a run directory, a gradient store): a report must never destroy what
/// it was computed from. Paths are compared after resolving symbolic links and `..`.
pub fn check_output(out: &Path, inputs: &[&Path], protected: &[&Path]) -> Result<()> {
    let resolve = |p: &Path| -> PathBuf {
        match p.canonicalize() {
            Ok(c) => c,
            // A file that does not exist yet: resolve its directory.
            Err(_) => match (parent_of(p).canonicalize(), p.file_name()) {
                (Ok(dir), Some(name)) => dir.join(name),
                _ => p.to_path_buf(),
            },
        }
    };
    let target = resolve(out);
    if let Some(input) = inputs.iter().find(|i| resolve(i) == target) {
        return Err(Error::Usage(format!(
            "--out {} is the input {}; write the output elsewhere",
            out.display(),
            input.display()
        )));
    }
    if let Some(dir) = protected.iter().find(|d| target.starts_with(resolve(d))) {
        return Err(Error::Usage(format!(
            "--out {} is inside {}, which culprit manages; write the output elsewhere",
            out.display(),
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file several writeback stretches long, written in pieces of every size (a byte, less
    /// than the buffer, more than the buffer, across stretch boundaries), commits byte for byte;
    /// dropped after its writeback started, it leaves nothing behind.
    #[test]
    fn files_handed_to_the_disk_as_they_are_written_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let len = (2 * WRITEBACK_BYTES + WRITEBACK_BYTES / 2 + 3) as usize;
        let bytes: Vec<u8> = (0..len).map(|k| (k.wrapping_mul(2654435761) >> 13) as u8).collect();
        let target = dir.path().join("large");
        let mut file = AtomicFile::create(&target).unwrap();
        let (mut at, mut step) = (0, 1);
        while at < len {
            let end = (at + step).min(len);
            let before = file.written - file.unsent;
            file.write_all(&bytes[at..end]).unwrap();
            // A write first starts the writeback of a full stretch, then takes its bytes.
            let kept = if before >= WRITEBACK_BYTES { 0 } else { before };
            assert!(file.written - file.unsent <= kept + (end - at) as u64);
            at = end;
            step = step * 7 + 1; // 1, 8, 57, … past the 1 MiB buffer and a writeback stretch
            if step > 3 * WRITEBACK_BYTES as usize {
                step = 1;
            }
        }
        assert_eq!(file.written, len as u64);
        // Started more than once.
        assert!(file.unsent > WRITEBACK_BYTES, "writeback started at {} of {len}", file.unsent);
        file.commit().unwrap();
        assert!(std::fs::read(&target).unwrap() == bytes, "the committed file differs from what was written");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let mut file = AtomicFile::create(&dir.path().join("dropped")).unwrap();
        file.write_all(&bytes).unwrap();
        file.write_all(&bytes[..1]).unwrap(); // starts the writeback of the first
        assert_eq!(file.unsent, len as u64);
        drop(file);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the dropped file's temporary is gone");
    }

    #[test]
    fn temporary_names_are_recognised_only_for_their_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("shard-00001.grad");
        let tmp = temporary_name(&target, "tmp").unwrap();
        let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(temporary_owner(&name, "shard-00001.grad"), Some(std::process::id()));
        assert_eq!(temporary_owner(&name, "shard-00002.grad"), None);
        for user in ["notes.tmp-1", "shard-00001.grad.tmp-123", ".shard-00001.grad.tmp-123-xyz", "x.tmp-1-abcdef01"] {
            assert_eq!(temporary_owner(user, "shard-00001.grad"), None, "{user}");
        }
        // A leftover of this target is removed; a user's file and another target's are kept.
        std::fs::write(&tmp, b"x").unwrap();
        let other = temporary_name(&dir.path().join("shard-00002.grad"), "tmp").unwrap();
        std::fs::write(&other, b"y").unwrap();
        std::fs::write(dir.path().join("my.tmp-notes"), b"z").unwrap();
        assert_eq!(remove_stale_temporaries(&target).unwrap(), 1);
        assert!(!tmp.exists() && other.exists() && dir.path().join("my.tmp-notes").exists());
    }

    #[test]
    fn an_uncommitted_file_or_directory_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut f = AtomicFile::create(&dir.path().join("a")).unwrap();
            f.write_all(b"half").unwrap();
        }
        {
            let d = AtomicDir::create(&dir.path().join("run")).unwrap();
            write_new(&d.path().join("x"), b"1").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomic(&dir.path().join("a"), b"whole").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn outputs_that_would_replace_an_input_or_a_managed_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.csv");
        std::fs::write(&data, b"a,label\n1,0\n").unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        assert!(check_output(&data, &[&data], &[]).is_err());
        assert!(check_output(&dir.path().join("./data.csv"), &[&data], &[]).is_err());
        assert!(check_output(&run.join("weights.bin"), &[], &[&run]).is_err());
        assert!(check_output(&dir.path().join("report.json"), &[&data], &[&run]).is_ok());
    }
}
