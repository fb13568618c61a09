//! The gradient store: sharded, checksummed, memory-mapped files of per-example gradient rows.
//!
//! A store is a directory with a `manifest.json` ([`StoreManifest`]) and shard files
//! `shard-00000.grad`, … each holding a contiguous range of rows (format in `docs/FORMAT.md`:
//! magic `CULPRITG`, version, a JSON header, 64-byte-aligned little-endian rows, CRC-32 footer).
//!
//! A store is content-addressed by a [`StoreKey`]: the SHA-256 of the model's weights, of the
//! data manifest, and the projection with its seed. Opening it for another key is refused with an
//! error that names what differs, so a stale cache is never read silently. Every shard's header
//! and CRC are verified when the store is opened; a corrupted or truncated shard is named.

pub mod build;
pub mod stream;

use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gradients::projection::BlockLayout;
use crate::io::container::Format;
use crate::io::write_atomic;
use crate::simd::flushed;

/// Version of the shard and manifest format.
pub const STORE_VERSION: u32 = 1;
/// Row data starts at a multiple of this many bytes (for memory mapping and SIMD loads).
pub const ALIGN: usize = 64;
/// The container of a shard file: magic `CULPRITG`, rows 64-byte aligned.
pub const SHARD_FORMAT: Format =
    Format { magic: b"CULPRITG", version: STORE_VERSION, readable: 1..=1, align: ALIGN, what: "gradient shard" };

/// Element type of stored rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (11-bit significand, range ±65504).
    F16,
    /// bfloat16 (8-bit significand, the range of f32).
    Bf16,
}

impl Dtype {
    /// Parses `f32`, `f16` or `bf16`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::Usage(format!("unknown dtype `{other}` (expected f32, f16 or bf16)"))),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// Appends `values` encoded little-endian. f32 and bf16 values below f32's smallest normal
    /// magnitude (1.2e-38) are stored as zero: read back they would be subnormal f32 operands of
    /// the scoring kernel, each a microcode assist ([`crate::simd`]). f16 keeps its own
    /// subnormals, which are normal once widened to f32.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            Self::F32 => values.iter().for_each(|v| out.extend_from_slice(&flushed(*v).to_le_bytes())),
            Self::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            Self::Bf16 => {
                values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(flushed(*v)).to_le_bytes()))
            }
        }
    }

    /// Decodes little-endian bytes into `out` (whose length sets how many).
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            Self::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                }
            }
            Self::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes(c.try_into().expect("2 bytes")).to_f32();
                }
            }
            Self::Bf16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes(c.try_into().expect("2 bytes")).to_f32();
                }
            }
        }
    }
}

/// What a store's rows are a function of. Two stores with equal keys hold equal rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreKey {
    /// SHA-256 of the run's `weights.bin`.
    pub weights_sha256: String,
    /// SHA-256 of the run's data manifest (canonical JSON).
    pub data_sha256: String,
    /// The projection (`none`, `jl:K`, `kron:AxB`).
    pub projection: String,
    /// The projection's seed.
    pub seed: u64,
}

impl StoreKey {
    /// `Ok` if equal, else an error at `path` naming each part that differs.
    pub fn check(&self, expected: &StoreKey, path: &Path) -> Result<()> {
        let mut differs = Vec::new();
        if self.weights_sha256 != expected.weights_sha256 {
            differs.push("the model (its weights differ)".to_string());
        }
        if self.data_sha256 != expected.data_sha256 {
            differs.push("the data set (its manifest differs)".to_string());
        }
        if self.projection != expected.projection || self.seed != expected.seed {
            differs.push(format!(
                "the projection (store: {} seed {}, asked: {} seed {})",
                self.projection, self.seed, expected.projection, expected.seed
            ));
        }
        if differs.is_empty() {
            Ok(())
        } else {
            Err(Error::run(
                path,
                format!(
                    "stale gradient store: built for a different {}; rebuild it with `culprit cache` into another --store",
                    differs.join(" and ")
                ),
            ))
        }
    }
}

/// One shard's place in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the store directory.
    pub file: String,
    /// First row.
    pub first_row: usize,
    /// Number of rows.
    pub rows: usize,
}

/// `manifest.json` of a store: its key, row layout and shards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreManifest {
    /// Format version ([`STORE_VERSION`]).
    pub format_version: u32,
    /// What the rows are a function of.
    pub key: StoreKey,
    /// Element type.
    pub dtype: Dtype,
    /// Total rows (training examples, in data order).
    pub rows: usize,
    /// Elements per row.
    pub row_len: usize,
    /// Where each layer's block sits in a row.
    pub layout: Vec<BlockLayout>,
    /// Rows per shard (the last may hold fewer).
    pub rows_per_shard: usize,
    /// The shards, in row order.
    pub shards: Vec<ShardInfo>,
}

impl StoreManifest {
    /// A manifest laying out `rows` rows in shards of `rows_per_shard`.
    pub fn new(
        key: StoreKey,
        dtype: Dtype,
        rows: usize,
        row_len: usize,
        layout: Vec<BlockLayout>,
        rows_per_shard: usize,
    ) -> Self {
        let rows_per_shard = rows_per_shard.max(1);
        let shards = (0..rows.div_ceil(rows_per_shard))
            .map(|i| ShardInfo {
                file: format!("shard-{i:05}.grad"),
                first_row: i * rows_per_shard,
                rows: rows_per_shard.min(rows - i * rows_per_shard),
            })
            .collect();
        Self { format_version: STORE_VERSION, key, dtype, rows, row_len, layout, rows_per_shard, shards }
    }

    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let m: Self =
            serde_json::from_str(&text).map_err(|e| Error::run(&path, format!("unreadable store manifest: {e}")))?;
        if m.format_version != STORE_VERSION {
            return Err(Error::run(
                &path,
                format!("store format version {}; this culprit reads {STORE_VERSION}", m.format_version),
            ));
        }
        m.check_consistent().map_err(|problem| Error::run(&path, format!("damaged store manifest: {problem}")))?;
        Ok(m)
    }

    /// Checks the manifest agrees with itself (the shards are the layout [`StoreManifest::new`]
    /// makes of `rows` and `rows_per_shard`; the blocks, if any, tile `row_len` with the lengths
    /// their shapes imply), so a damaged one is refused here rather than misread later.
    fn check_consistent(&self) -> std::result::Result<(), String> {
        if self.rows_per_shard == 0 {
            return Err("rows_per_shard is 0".into());
        }
        let expected =
            Self::new(self.key.clone(), self.dtype, self.rows, self.row_len, Vec::new(), self.rows_per_shard).shards;
        if expected != self.shards {
            return Err(format!(
                "its {} shards are not the {} that {} rows in shards of {} make",
                self.shards.len(),
                expected.len(),
                self.rows,
                self.rows_per_shard
            ));
        }
        let mut end = 0usize;
        for b in &self.layout {
            let implied = match (b.kron, b.factored) {
                (Some((ki, ko)), true) => ki.checked_add(ko),
                (Some((ki, ko)), false) => ki.checked_mul(ko),
                (None, true) => return Err(format!("block `{}` is factored without a kron shape", b.name)),
                (None, false) => Some(b.len),
            };
            if b.offset != end || implied != Some(b.len) || b.offset.checked_add(b.len).is_none_or(|e| e > self.row_len)
            {
                return Err(format!(
                    "block `{}` (offset {}, length {}) does not fit rows of {}",
                    b.name, b.offset, b.len, self.row_len
                ));
            }
            end = b.offset + b.len;
        }
        // No layout at all is a store of plain rows (written through the library, say).
        if !self.layout.is_empty() && end != self.row_len {
            return Err(format!("its blocks cover {end} of the {} values in a row", self.row_len));
        }
        Ok(())
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("plain data") + "\n";
        write_atomic(&dir.join("manifest.json"), json.as_bytes())
    }
}

/// The JSON header inside every shard file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHeader {
    /// The store's key.
    pub key: StoreKey,
    /// Element type.
    pub dtype: Dtype,
    /// Index of this shard.
    pub shard: usize,
    /// Number of shards in the store.
    pub shards: usize,
    /// First row.
    pub first_row: usize,
    /// Rows in this shard.
    pub rows: usize,
    /// Elements per row.
    pub row_len: usize,
}

/// Streams a whole shard (header, padding, rows, CRC-32) into `out`; returns the bytes written.
///
/// The CRC is computed while writing, and f32 rows on a little-endian machine are written
/// straight from memory, so writing costs one pass over the rows.
pub fn write_shard_to(out: &mut impl Write, header: &ShardHeader, rows: &[f32]) -> std::io::Result<usize> {
    assert_eq!(rows.len(), header.rows * header.row_len, "rows do not match the header");
    let mut w = SHARD_FORMAT.writer(out, header)?;
    const CHUNK: usize = 1 << 20;
    if header.dtype == Dtype::F32 && cfg!(target_endian = "little") {
        for chunk in rows.chunks(CHUNK) {
            w.write_payload(bytemuck::cast_slice(chunk))?;
        }
    } else {
        let mut buffer = Vec::with_capacity(CHUNK * header.dtype.size());
        for chunk in rows.chunks(CHUNK) {
            buffer.clear();
            header.dtype.encode(chunk, &mut buffer);
            w.write_payload(&buffer)?;
        }
    }
    Ok(w.finish()?.1 as usize)
}

/// Writes a shard file atomically (temporary file beside it, `fsync`, rename); returns its size.
pub fn write_shard(path: &Path, header: &ShardHeader, rows: &[f32]) -> Result<usize> {
    let mut file = crate::io::AtomicFile::create(path)?;
    let tmp = file.temporary().to_path_buf();
    let size = write_shard_to(&mut file, header, rows).map_err(Error::io(&tmp))?;
    file.commit()?;
    Ok(size)
}

/// A verified, memory-mapped shard.
pub struct Shard {
    /// Where it is.
    pub path: PathBuf,
    /// Its header.
    pub header: ShardHeader,
    map: Mmap,
    data_offset: usize,
}

impl Shard {
    /// Maps and verifies a shard file against what the manifest expects.
    pub fn open(path: &Path, expected: &ShardHeader) -> Result<Shard> {
        let file = std::fs::File::open(path).map_err(Error::io(path))?;
        // SAFETY: the file is opened read-only and shard files are only ever replaced by rename,
        // never modified in place, so the mapping does not change underneath us.
        let map = unsafe { Mmap::map(&file) }.map_err(Error::io(path))?;
        let data_len = expected.rows * expected.row_len * expected.dtype.size();
        let container = SHARD_FORMAT.parse_sized(path, &map, Some(data_len))?;
        let header: ShardHeader = container.header(path, "gradient shard")?;
        let data_offset = container.payload.as_ptr() as usize - map.as_ptr() as usize;
        if header.key != expected.key {
            header.key.check(&expected.key, path)?;
        }
        if &header != expected {
            return Err(Error::run(
                path,
                format!("shard header {header:?} does not match the store manifest ({expected:?})"),
            ));
        }
        Ok(Shard { path: path.to_path_buf(), header, map, data_offset })
    }

    /// The encoded rows.
    pub fn data(&self) -> &[u8] {
        &self.map[self.data_offset..self.map.len() - 4]
    }

    /// The rows as f32 without copying, when stored as f32 on a little-endian machine.
    pub fn as_f32(&self) -> Option<&[f32]> {
        if self.header.dtype != Dtype::F32 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(self.data()).ok()
    }

    /// Decodes rows `start..start + out.len() / row_len` of this shard into `out`.
    pub fn decode_rows(&self, start: usize, out: &mut [f32]) {
        let size = self.header.dtype.size();
        let begin = start * self.header.row_len * size;
        self.header.dtype.decode(&self.data()[begin..begin + out.len() * size], out);
    }
}

/// An opened, verified gradient store.
pub struct GradientStore {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: StoreManifest,
    /// Its shards, in row order.
    pub shards: Vec<Shard>,
}

impl GradientStore {
    /// The header a shard of `manifest` must carry.
    pub fn expected_header(manifest: &StoreManifest, index: usize) -> ShardHeader {
        let info = &manifest.shards[index];
        ShardHeader {
            key: manifest.key.clone(),
            dtype: manifest.dtype,
            shard: index,
            shards: manifest.shards.len(),
            first_row: info.first_row,
            rows: info.rows,
            row_len: manifest.row_len,
        }
    }

    /// Opens a complete store, checking it was built for `expected` and verifying every shard.
    pub fn open(dir: &Path, expected: &StoreKey) -> Result<Self> {
        if !dir.join("manifest.json").is_file() {
            return Err(Error::run(dir, "no gradient store here (no manifest.json); build one with `culprit cache`"));
        }
        let manifest = StoreManifest::read(dir)?;
        manifest.key.check(expected, &dir.join("manifest.json"))?;
        let missing: Vec<&str> =
            manifest.shards.iter().filter(|s| !dir.join(&s.file).is_file()).map(|s| s.file.as_str()).collect();
        if !missing.is_empty() {
            return Err(Error::run(
                dir,
                format!(
                    "incomplete gradient store: {} of {} shards missing ({}); run `culprit cache` to finish it",
                    missing.len(),
                    manifest.shards.len(),
                    missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let shards = (0..manifest.shards.len())
            .map(|i| Shard::open(&dir.join(&manifest.shards[i].file), &Self::expected_header(&manifest, i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { dir: dir.to_path_buf(), manifest, shards })
    }

    /// Total rows.
    pub fn rows(&self) -> usize {
        self.manifest.rows
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.manifest.row_len
    }

    /// Row `r` decoded to f32.
    pub fn row(&self, r: usize) -> Vec<f32> {
        let shard = &self.shards[r / self.manifest.rows_per_shard];
        let mut out = vec![0.0; self.row_len()];
        shard.decode_rows(r - shard.header.first_row, &mut out);
        out
    }

    /// Rows of a block (as [`GradientStore::for_each_block`] gives them) in the space queries
    /// live in: a `factors` store's rows expanded into their outer products
    /// ([`crate::gradients::projection::expand_row`]); other stores' rows as they are.
    pub fn expanded_rows<'a>(&self, block: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        let layout = &self.manifest.layout;
        if !crate::gradients::projection::is_factored(layout) {
            return std::borrow::Cow::Borrowed(block);
        }
        std::borrow::Cow::Owned(
            block
                .chunks_exact(self.row_len())
                .flat_map(|row| crate::gradients::projection::expand_row(layout, row))
                .collect(),
        )
    }

    /// Calls `f(first_row, rows)` for consecutive blocks of at most `block_rows` decoded rows,
    /// in row order. f32 stores are passed through without copying.
    pub fn for_each_block(&self, block_rows: usize, mut f: impl FnMut(usize, &[f32])) {
        let len = self.row_len();
        let mut buffer = Vec::new();
        for shard in &self.shards {
            let mut start = 0;
            while start < shard.header.rows {
                let rows = block_rows.max(1).min(shard.header.rows - start);
                let first = shard.header.first_row + start;
                match shard.as_f32() {
                    Some(all) => f(first, &all[start * len..(start + rows) * len]),
                    None => {
                        buffer.resize(rows * len, 0.0);
                        shard.decode_rows(start, &mut buffer);
                        f(first, &buffer);
                    }
                }
                start += rows;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Dtype;

    fn round_trip(dtype: Dtype, values: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::new();
        dtype.encode(values, &mut bytes);
        assert_eq!(bytes.len(), values.len() * dtype.size());
        let mut out = vec![f32::NAN; values.len()];
        dtype.decode(&bytes, &mut out);
        out
    }

    #[test]
    fn stored_values_read_back_without_subnormals_and_otherwise_as_their_dtype_rounds_them() {
        let values = [1e-39f32, -1e-40, -1e-45, f32::MIN_POSITIVE, -1.5e-38, 3.0e-30, 0.25, -7.0, 0.0];
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let back = round_trip(dtype, &values);
            for (v, b) in values.iter().zip(&back) {
                assert!(*b == 0.0 || b.is_normal(), "{dtype:?}: {v:e} read back as the subnormal {b:e}");
                if v.is_normal() || *v == 0.0 {
                    // bf16 keeps 8 significant bits: within 2⁻⁸ relative.
                    assert!((b - v).abs() <= v.abs() / 256.0, "{dtype:?}: {v:e} read back as {b:e}");
                } else {
                    assert_eq!(b.to_bits(), 0.0f32.copysign(*v).to_bits(), "{dtype:?}: {v:e}");
                }
            }
        }
        // f16's own subnormals (down to 6e-8) are normal f32 once decoded, and are kept.
        let back = round_trip(Dtype::F16, &[1e-5, -3e-7, 0.5]);
        assert!((back[0] - 1e-5).abs() < 1e-7 && (back[1] + 3e-7).abs() < 6e-8 && back[2] == 0.5, "{back:?}");
        assert!(back.iter().all(|b| b.is_normal()));
    }
}
