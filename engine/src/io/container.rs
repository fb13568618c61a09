//! The one binary container of every culprit file (weights, gradient-store shards, curvature
//! factors, self-influence caches). Layout (all integers little-endian), specified in
//! `docs/FORMAT.md`:
//!
//! ```text
//! offset  size  field
//! 0       8     magic: b"CULPRIT" + one letter naming the kind (W, G, C, S)
//! 8       4     format version (u32)
//! 12      4     header length H (u32)
//! 16      H     header: UTF-8 JSON, the kind's own fields
//! 16+H    pad   zero bytes up to a multiple of the kind's alignment (8 or 64)
//! P       N     payload: the kind's own bytes (f64 arrays, f32/f16/bf16 rows)
//! P+N     4     CRC-32 (IEEE) of every byte before it
//! ```
//!
//! [`Format::parse`] checks, in this order and with a message naming the file for each: the
//! length against the smallest possible file, the magic, the version against the ones this
//! culprit reads, the header length against the file, and the checksum; every later read of the
//! payload is bounds-checked ([`Arrays`]). Writing streams the payload through the checksum
//! ([`ContainerWriter`]), so a gigabyte shard costs one pass.

use std::io::Write;
use std::ops::RangeInclusive;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Bytes before the header: magic, version, header length.
const PREAMBLE: usize = 16;

/// One kind of culprit file.
#[derive(Clone, Debug)]
pub struct Format {
    /// The magic bytes.
    pub magic: &'static [u8; 8],
    /// The version written.
    pub version: u32,
    /// The versions read.
    pub readable: RangeInclusive<u32>,
    /// The payload starts at a multiple of this many bytes.
    pub align: usize,
    /// What the file is, for messages ("gradient shard").
    pub what: &'static str,
}

/// A parsed container: its version, header and payload, borrowed from the file's bytes.
#[derive(Clone, Copy, Debug)]
pub struct Container<'a> {
    /// The format version of the file.
    pub version: u32,
    /// The JSON header.
    pub header: &'a [u8],
    /// The payload.
    pub payload: &'a [u8],
}

impl Format {
    /// Offset of the payload for a header of `header_len` bytes.
    pub fn payload_offset(&self, header_len: usize) -> usize {
        (PREAMBLE + header_len).next_multiple_of(self.align)
    }

    /// The bytes before the payload: preamble, header and padding.
    fn head(&self, header: &impl Serialize) -> Vec<u8> {
        let json = serde_json::to_vec(header).expect("plain data serialises");
        let mut head = Vec::with_capacity(self.payload_offset(json.len()));
        head.extend_from_slice(self.magic);
        head.extend_from_slice(&self.version.to_le_bytes());
        head.extend_from_slice(&(json.len() as u32).to_le_bytes());
        head.extend_from_slice(&json);
        head.resize(self.payload_offset(json.len()), 0);
        head
    }

    /// The whole file in memory.
    pub fn encode(&self, header: &impl Serialize, payload: &[u8]) -> Vec<u8> {
        let mut out = self.head(header);
        out.extend_from_slice(payload);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Writes the file to `path` atomically (see [`crate::io::AtomicFile`]).
    pub fn write_file(&self, path: &Path, header: &impl Serialize, payload: &[u8]) -> Result<()> {
        super::write_atomic(path, &self.encode(header, payload))
    }

    /// Starts streaming a file into `out`: writes the head; the payload follows through
    /// [`ContainerWriter::write_payload`].
    pub fn writer<W: Write>(&self, out: W, header: &impl Serialize) -> std::io::Result<ContainerWriter<W>> {
        let mut w = ContainerWriter { out, crc: crc32fast::Hasher::new(), written: 0 };
        w.write_payload(&self.head(header))?;
        Ok(w)
    }

    /// Parses and verifies a file's bytes (see the module documentation).
    pub fn parse<'a>(&self, path: &Path, bytes: &'a [u8]) -> Result<Container<'a>> {
        self.parse_sized(path, bytes, None)
    }

    /// [`Format::parse`], also checking before the checksum that the payload holds exactly
    /// `payload_len` bytes when given (so a cut file is reported as truncated, not corrupted).
    pub fn parse_sized<'a>(&self, path: &Path, bytes: &'a [u8], payload_len: Option<usize>) -> Result<Container<'a>> {
        let bad = |message: String| Error::run(path, message);
        if bytes.len() < PREAMBLE + 4 {
            return Err(bad(format!("not a culprit {} (too short: {} bytes)", self.what, bytes.len())));
        }
        if &bytes[..8] != self.magic {
            return Err(bad(format!("not a culprit {} (bad magic)", self.what)));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if !self.readable.contains(&version) {
            return Err(bad(format!(
                "{} format version {version}; this culprit reads versions {}..={} (write it again with this culprit)",
                self.what,
                self.readable.start(),
                self.readable.end()
            )));
        }
        let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        let start = self.payload_offset(header_len);
        if start + 4 > bytes.len() {
            return Err(bad(format!(
                "truncated {}: its header promises {header_len} bytes, the file holds {}",
                self.what,
                bytes.len()
            )));
        }
        if let Some(expected) = payload_len
            && bytes.len() != start + expected + 4
        {
            return Err(bad(format!(
                "truncated or oversized {}: {} bytes, expected {}",
                self.what,
                bytes.len(),
                start + expected + 4
            )));
        }
        let (body, footer) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(footer.try_into().expect("4 bytes"));
        let actual = crc32fast::hash(body);
        if stored != actual {
            return Err(bad(format!(
                "corrupted {}: CRC-32 {actual:08x}, the footer says {stored:08x} (checksum mismatch)",
                self.what
            )));
        }
        Ok(Container { version, header: &body[PREAMBLE..PREAMBLE + header_len], payload: &body[start..] })
    }

    /// Reads, parses and verifies `path`; returns its version, header and payload.
    pub fn read_file<H: DeserializeOwned>(&self, path: &Path) -> Result<(u32, H, Vec<u8>)> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        let c = self.parse(path, &bytes)?;
        Ok((c.version, c.header(path, self.what)?, c.payload.to_vec()))
    }
}

impl Container<'_> {
    /// The header as `H`, with an error naming the file.
    pub fn header<H: DeserializeOwned>(&self, path: &Path, what: &str) -> Result<H> {
        serde_json::from_slice(self.header).map_err(|e| Error::run(path, format!("unreadable {what} header: {e}")))
    }
}

/// Streams a container: every byte goes through the checksum; [`ContainerWriter::finish`]
/// appends it.
pub struct ContainerWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> ContainerWriter<W> {
    /// Writes payload bytes.
    pub fn write_payload(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.written += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    /// Appends the checksum; returns the writer and the bytes written in all.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        let crc = self.crc.finalize().to_le_bytes();
        self.out.write_all(&crc)?;
        Ok((self.out, self.written + 4))
    }
}

/// Named little-endian f64 arrays in a payload, one after the other, each with its shape listed
/// in the header ([`ArrayInfo`]). Reads are bounds-checked against the payload.
#[derive(Debug, Default)]
pub struct Arrays {
    infos: Vec<ArrayInfo>,
    values: Vec<Vec<f64>>,
}

/// One named f64 array: its name and row-major shape.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArrayInfo {
    /// Name.
    pub name: String,
    /// Shape (row-major).
    pub shape: Vec<usize>,
}

impl Arrays {
    /// No arrays.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an array of `shape` (its length must be the shape's product).
    pub fn push(&mut self, name: impl Into<String>, shape: Vec<usize>, values: Vec<f64>) {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "array length matches its shape");
        self.infos.push(ArrayInfo { name: name.into(), shape });
        self.values.push(values);
    }

    /// The arrays' names and shapes, for the header.
    pub fn infos(&self) -> &[ArrayInfo] {
        &self.infos
    }

    /// The payload: every array's values, in order.
    pub fn payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * self.values.iter().map(Vec::len).sum::<usize>());
        for v in &self.values {
            v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        out
    }

    /// Splits a payload into the arrays `infos` lists, checking every bound.
    pub fn parse(path: &Path, infos: &[ArrayInfo], payload: &[u8]) -> Result<Self> {
        let mut offset = 0usize;
        let mut values = Vec::with_capacity(infos.len());
        for a in infos {
            let count = a.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let end = count.and_then(|c| c.checked_mul(8)).and_then(|b| b.checked_add(offset));
            let bytes = end.and_then(|end| payload.get(offset..end)).ok_or_else(|| {
                Error::run(path, format!("truncated: array `{}` of shape {:?} runs past the end", a.name, a.shape))
            })?;
            values.push(bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect());
            offset += bytes.len();
        }
        if offset != payload.len() {
            return Err(Error::run(path, format!("{} bytes after the last array", payload.len() - offset)));
        }
        Ok(Self { infos: infos.to_vec(), values })
    }

    /// Removes and returns array `name` with its shape; an error naming the file if it is absent
    /// or its shape is not `expected` (when given).
    pub fn take(&mut self, path: &Path, name: &str, expected: Option<&[usize]>) -> Result<(Vec<usize>, Vec<f64>)> {
        let i = self
            .infos
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::run(path, format!("lacks array `{name}`")))?;
        let info = self.infos.remove(i);
        let values = self.values.remove(i);
        if let Some(shape) = expected
            && shape != info.shape.as_slice()
        {
            return Err(Error::run(
                path,
                format!("array `{name}` has shape {:?}, the model needs {shape:?}", info.shape),
            ));
        }
        Ok((info.shape, values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST: Format = Format { magic: b"CULPRITT", version: 2, readable: 1..=2, align: 64, what: "test file" };

    #[test]
    fn a_container_round_trips_and_every_damage_is_named() {
        let path = Path::new("x.bin");
        let mut arrays = Arrays::new();
        arrays.push("a", vec![2, 3], (0..6).map(f64::from).collect());
        arrays.push("b", vec![1], vec![7.5]);
        let bytes = TEST.encode(&serde_json::json!({ "arrays": arrays.infos() }), &arrays.payload());
        assert_eq!(bytes.len() % 4, 0);
        let c = TEST.parse(path, &bytes).unwrap();
        assert_eq!(c.version, 2);
        assert_eq!(c.payload.len(), 56);
        assert_eq!((bytes.len() - 4 - c.payload.len()) % 64, 0, "the payload is aligned");
        let header: serde_json::Value = c.header(path, "test").unwrap();
        let infos: Vec<ArrayInfo> = serde_json::from_value(header["arrays"].clone()).unwrap();
        let mut back = Arrays::parse(path, &infos, c.payload).unwrap();
        assert_eq!(back.take(path, "b", Some(&[1])).unwrap().1, vec![7.5]);
        assert!(back.take(path, "a", Some(&[3, 2])).is_err());

        let err = |b: &[u8]| TEST.parse(path, b).unwrap_err().to_string();
        assert!(err(&bytes[..10]).contains("too short"));
        let mut magic = bytes.clone();
        magic[3] = b'x';
        assert!(err(&magic).contains("bad magic"));
        let mut version = bytes.clone();
        version[8] = 9;
        assert!(err(&version).contains("version 9"));
        let mut flipped = bytes.clone();
        flipped[100] ^= 1;
        assert!(err(&flipped).contains("corrupted"));
        let mut long_header = bytes.clone();
        long_header[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(err(&long_header).contains("truncated"));
        assert!(Arrays::parse(path, &infos, &c.payload[..40]).unwrap_err().to_string().contains("truncated"));
        let huge = vec![ArrayInfo { name: "h".into(), shape: vec![usize::MAX, 4] }];
        assert!(Arrays::parse(path, &huge, c.payload).is_err());
    }
}
