//! A gradient shard written while its rows are still being computed.
//!
//! [`super::write_shard`] writes a shard whose rows are all in memory; a store build computes
//! them batch by batch, and writing (encoding, the CRC-32, copying into the page cache, the final
//! `fsync`) costs as much as a fifth of the gradients themselves on a disk of about 1 GB/s. A
//! [`ShardStream`] hands each batch's rows to a thread of its own that encodes, checksums and
//! writes them into the shard's temporary file while the next batch is computed (the file hands
//! each 4 MiB to the disk as it goes, [`crate::io::AtomicFile`]); `finish` waits for it, syncs
//! and renames the file into place. The file format is [`super::write_shard`]'s
//! byte for byte (same container, same checksum).
//!
//! Nothing is lost or half-written: until `finish` succeeds the shard exists only as its
//! temporary file, which is removed when the stream is dropped unfinished (an error in a later
//! batch, a non-finite row) before the drop returns, so before the caller's shard lock is
//! released. A row count that does not match the header is refused at `finish`.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use super::{Dtype, SHARD_FORMAT, ShardHeader};
use crate::error::{Error, Result};
use crate::io::AtomicFile;

/// Batches of rows in flight between the computing thread and the writer, at most.
const IN_FLIGHT: usize = 4;

enum Message {
    Rows(Vec<f32>),
    Finish,
}

/// A shard file being written from batches of rows (see the module documentation).
pub struct ShardStream {
    sender: Option<SyncSender<Message>>,
    writer: Option<JoinHandle<Result<usize>>>,
    path: PathBuf,
}

impl ShardStream {
    /// Starts writing the shard `path` with `header`: its temporary file is created now.
    pub fn create(path: &Path, header: &ShardHeader) -> Result<Self> {
        let file = AtomicFile::create(path)?;
        let (sender, receiver) = sync_channel(IN_FLIGHT);
        let header = header.clone();
        let writer = std::thread::Builder::new()
            .name("shard writer".into())
            .spawn(move || write_rows(file, &header, receiver))
            .map_err(Error::io(path))?;
        Ok(Self { sender: Some(sender), writer: Some(writer), path: path.to_path_buf() })
    }

    /// Hands the next rows (row-major, whole rows) to the writer; blocks while it is
    /// [`IN_FLIGHT`] batches behind. A write error is reported here or at [`Self::finish`].
    pub fn push(&mut self, rows: Vec<f32>) -> Result<()> {
        let sender = self.sender.as_ref().expect("pushed before finish");
        if sender.send(Message::Rows(rows)).is_err() {
            // The writer stopped: its error says why.
            return Err(self.join().err().unwrap_or_else(|| self.stopped()));
        }
        Ok(())
    }

    /// Waits for every row to be written, checks that the header's rows all came, syncs and
    /// renames the shard into place; returns its size in bytes.
    pub fn finish(mut self) -> Result<usize> {
        let sender = self.sender.take().expect("finished once");
        let sent = sender.send(Message::Finish).is_ok();
        drop(sender);
        let written = self.join();
        if !sent && written.is_ok() {
            return Err(self.stopped());
        }
        written
    }

    fn join(&mut self) -> Result<usize> {
        self.sender = None;
        match self.writer.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(self.stopped()),
            None => Err(self.stopped()),
        }
    }

    fn stopped(&self) -> Error {
        Error::run(&self.path, "the shard's writer thread stopped before the shard was complete")
    }
}

impl Drop for ShardStream {
    /// Unfinished: the writer sees the channel close without [`Message::Finish`] and removes the
    /// temporary file; waiting for it here keeps that inside the caller's shard lock.
    fn drop(&mut self) {
        self.sender = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: the container's head, then every batch encoded and checksummed as it
/// comes, then (on [`Message::Finish`] with every row there) the checksum, sync and rename.
fn write_rows(mut file: AtomicFile, header: &ShardHeader, receiver: Receiver<Message>) -> Result<usize> {
    let temporary = file.temporary().to_path_buf();
    let expected = header.rows * header.row_len;
    let mut values = 0usize;
    let mut buffer = Vec::new();
    let mut w = SHARD_FORMAT.writer(&mut file, header).map_err(Error::io(&temporary))?;
    loop {
        match receiver.recv() {
            Ok(Message::Rows(rows)) => {
                values += rows.len();
                if values > expected {
                    return Err(Error::run(&temporary, format!("more than the header's {expected} values")));
                }
                let bytes: &[u8] = if header.dtype == Dtype::F32 && cfg!(target_endian = "little") {
                    bytemuck::cast_slice(&rows)
                } else {
                    buffer.clear();
                    header.dtype.encode(&rows, &mut buffer);
                    &buffer
                };
                w.write_payload(bytes).map_err(Error::io(&temporary))?;
            }
            Ok(Message::Finish) => break,
            // Dropped unfinished: the file is removed with `file`.
            Err(_) => return Err(Error::run(&temporary, "the shard was abandoned unfinished")),
        }
    }
    if values != expected {
        return Err(Error::run(&temporary, format!("{values} values were written, the header says {expected}")));
    }
    let (_, size) = w.finish().map_err(Error::io(&temporary))?;
    file.commit()?;
    Ok(size as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{GradientStore, StoreKey, StoreManifest, write_shard};

    fn header(dtype: Dtype, rows: usize, row_len: usize) -> ShardHeader {
        let key = StoreKey { weights_sha256: "w".into(), data_sha256: "d".into(), projection: "none".into(), seed: 0 };
        GradientStore::expected_header(&StoreManifest::new(key, dtype, rows, row_len, vec![], rows), 0)
    }

    /// A streamed shard is byte for byte the one written from memory, for every element type.
    #[test]
    fn streamed_shards_equal_written_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, row_len) = (37, 13);
        let values: Vec<f32> = (0..rows * row_len).map(|k| (k as f32 * 0.37).sin()).collect();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let h = header(dtype, rows, row_len);
            let (a, b) = (dir.path().join("a"), dir.path().join("b"));
            write_shard(&a, &h, &values).unwrap();
            let mut stream = ShardStream::create(&b, &h).unwrap();
            for batch in values.chunks(5 * row_len) {
                stream.push(batch.to_vec()).unwrap();
            }
            let size = stream.finish().unwrap();
            let (wa, wb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
            assert_eq!(wa, wb, "{dtype:?}");
            assert_eq!(size, wb.len());
        }
    }

    /// Abandoned or short: no shard and no temporary file are left.
    #[test]
    fn unfinished_shards_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let h = header(Dtype::F32, 4, 3);
        let path = dir.path().join("s");
        let mut stream = ShardStream::create(&path, &h).unwrap();
        stream.push(vec![1.0; 6]).unwrap();
        drop(stream);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "dropped: nothing left");
        let mut stream = ShardStream::create(&path, &h).unwrap();
        stream.push(vec![1.0; 6]).unwrap();
        let error = stream.finish().unwrap_err().to_string();
        assert!(error.contains("6 values were written, the header says 12"), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "short: nothing left");
    }
}
