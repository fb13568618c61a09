//! Data in, a block at a time: a stored file read as a stream (gunzipped on the fly when it
//! starts with gzip's magic `1f 8b`), its stored bytes hashed (SHA-256) as they pass, so that a
//! file read again on every pass of a scan can be told to have changed. Memory: two 1 MiB
//! buffers, whatever the file's size.

use std::io::{BufRead, Read};
use std::path::Path;

use sha2::Digest;

use crate::error::{Error, Result};

/// A reader that hashes what it reads (SHA-256 of the stored bytes).
struct Hashing<'a, R> {
    inner: R,
    sha: &'a mut sha2::Sha256,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

/// Opens `path` for one read from start to end, its stored bytes added to `sha` as they are
/// read; gzip is decompressed (all members). Call [`finish`] at the end, so that the bytes
/// past the data (a gzip trailer, padding) count in the hash too.
pub fn open<'a>(path: &Path, sha: &'a mut sha2::Sha256) -> Result<Box<dyn BufRead + 'a>> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut hashing = std::io::BufReader::with_capacity(1 << 20, Hashing { inner: file, sha });
    let gzip = hashing.fill_buf().map_err(Error::io(path))?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        Box::new(std::io::BufReader::with_capacity(1 << 20, flate2::bufread::MultiGzDecoder::new(hashing)))
    } else {
        Box::new(hashing)
    })
}

/// Reads the rest of `reader` (opened by [`open`] on `path`) so that every stored byte is
/// hashed, and drops it.
pub fn finish(mut reader: Box<dyn BufRead + '_>, path: &Path) -> Result<()> {
    std::io::copy(&mut reader, &mut std::io::sink())
        .map_err(|e| Error::data(path, None, format!("cannot read it (a corrupt or truncated gzip stream?): {e}")))?;
    Ok(())
}

/// Fills `buf` from `reader` exactly; `Ok(false)` when the stream ended first (nothing or part
/// of `buf` read), an error naming `path` when it could not be read.
pub fn read_exact_or_end(reader: &mut dyn BufRead, buf: &mut [u8], path: &Path) -> Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let what = format!("cannot read it (a corrupt or truncated gzip stream?): {e}");
                return Err(Error::data(path, None, what));
            }
        }
    }
    Ok(true)
}
