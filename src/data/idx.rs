//! IDX image sets (MNIST, Fashion-MNIST), raw or gzip-compressed.
//!
//! Format (LeCun et al.): a big-endian header `0x00 0x00 type ndims`, then `ndims` u32 sizes, then
//! the values. Images are `type = 0x08` (u8), `ndims = 3` (count, rows, columns); labels are u8
//! with `ndims = 1`. A folder holds `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.

use std::path::{Path, PathBuf};

use super::{RawData, contents, head, read_stored};
use crate::error::{Error, Result};

/// The split of an IDX folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// `train-*` files.
    #[default]
    Train,
    /// `t10k-*` files.
    Test,
}

impl Split {
    /// Parses `train` or `test`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "train" => Ok(Self::Train),
            "test" => Ok(Self::Test),
            other => Err(Error::Usage(format!("unknown split `{other}` (expected train or test)"))),
        }
    }

    /// The file-name prefix of the split: `train` or `t10k`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "t10k",
        }
    }
}

/// Finds `{prefix}-{stem}` or `{prefix}-{stem}.gz` in `dir`.
fn find(dir: &Path, split: Split, stem: &str) -> Result<PathBuf> {
    let name = format!("{}-{stem}", split.prefix());
    for candidate in [dir.join(&name), dir.join(format!("{name}.gz"))] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(Error::data(dir, None, format!("no {name} or {name}.gz in this folder (expected MNIST's file names)")))
}

/// Parses an IDX header; returns the dimension sizes and the offset of the data, checking that
/// `bytes` (the whole file) hold exactly the data it promises.
fn header(path: &Path, bytes: &[u8], ndims: u8) -> Result<(Vec<usize>, usize)> {
    let (dims, start) = parse_header(path, bytes, ndims)?;
    let expected = start + dims.iter().product::<usize>();
    if bytes.len() != expected {
        return Err(Error::data(
            path,
            None,
            format!(
                "IDX header promises {} bytes of data ({}) but the file holds {}",
                expected - start,
                dims.iter().map(ToString::to_string).collect::<Vec<_>>().join("x"),
                bytes.len() - start
            ),
        ));
    }
    Ok((dims, start))
}

/// Parses the IDX header at the start of `bytes` (at least its 4 + 4·`ndims` bytes): the
/// dimension sizes and the offset of the data.
fn parse_header(path: &Path, bytes: &[u8], ndims: u8) -> Result<(Vec<usize>, usize)> {
    if bytes.len() < 4 {
        return Err(Error::data(path, None, format!("truncated IDX file: {} bytes, no header", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(Error::data(
            path,
            None,
            format!("not an IDX u8 file: magic {:02x}{:02x}{:02x}{:02x}", bytes[0], bytes[1], bytes[2], bytes[3]),
        ));
    }
    if bytes[3] != ndims {
        return Err(Error::data(path, None, format!("IDX file has {} dimensions, expected {ndims}", bytes[3])));
    }
    let start = 4 + 4 * ndims as usize;
    if bytes.len() < start {
        return Err(Error::data(path, None, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..ndims as usize)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    Ok((dims, start))
}

/// One split's two files as read (decompressed), their SHA-256, and where their data start.
struct SplitFiles {
    images_path: PathBuf,
    images: Vec<u8>,
    images_sha: String,
    ioff: usize,
    labels_path: PathBuf,
    labels: Vec<u8>,
    labels_sha: String,
    loff: usize,
    /// Images, height, width.
    n: usize,
    h: usize,
    w: usize,
}

/// Reads one split's images and labels files and checks their headers agree.
///
/// Each file is decompressed whole and checked against its header, unless the SHA-256 of both
/// as stored is in `checked` (files culprit read whole and checked before: a run's training
/// data, when the run was trained). Then each is decompressed only as far as the first
/// `reach(images)` rows go, which for the first 5000 of MNIST's 60,000 images is a twelfth of
/// the work; the rows past them are neither read nor checked.
fn read_split(
    dir: &Path,
    split: Split,
    checked: &[&str],
    reach: impl FnOnce(usize) -> Result<usize>,
) -> Result<SplitFiles> {
    let images_path = find(dir, split, "images-idx3-ubyte")?;
    let labels_path = find(dir, split, "labels-idx1-ubyte")?;
    let (images, images_sha) = read_stored(&images_path)?;
    let (labels, labels_sha) = read_stored(&labels_path)?;
    let known = checked.contains(&images_sha.as_str()) && checked.contains(&labels_sha.as_str());
    let (images, idims, ioff, labels, ldims, loff) = if known {
        let (idims, ioff) = parse_header(&images_path, &head(&images_path, &images, 16)?, 3)?;
        let (ldims, loff) = parse_header(&labels_path, &head(&labels_path, &labels, 8)?, 1)?;
        let rows = reach(idims[0].min(ldims[0]))?;
        let images = prefix(&images_path, images, ioff, rows, idims[1].saturating_mul(idims[2]))?;
        let labels = prefix(&labels_path, labels, loff, rows, 1)?;
        (images, idims, ioff, labels, ldims, loff)
    } else {
        let (images, labels) = (contents(&images_path, images, None)?, contents(&labels_path, labels, None)?);
        let (idims, ioff) = header(&images_path, &images, 3)?;
        let (ldims, loff) = header(&labels_path, &labels, 1)?;
        (images, idims, ioff, labels, ldims, loff)
    };
    if idims[0] != ldims[0] {
        let what = format!("{} labels for {} images in {}", ldims[0], idims[0], images_path.display());
        return Err(Error::data(&labels_path, None, what));
    }
    let (n, h, w) = (idims[0], idims[1], idims[2]);
    Ok(SplitFiles { images_path, images, images_sha, ioff, labels_path, labels, labels_sha, loff, n, h, w })
}

/// The first `offset + rows · row_bytes` bytes of a stored IDX file's contents; an error
/// naming the file when they are fewer.
fn prefix(path: &Path, stored: Vec<u8>, offset: usize, rows: usize, row_bytes: usize) -> Result<Vec<u8>> {
    let Some(len) = rows.checked_mul(row_bytes).and_then(|b| b.checked_add(offset)) else {
        return Err(Error::data(path, None, format!("{rows} rows of {row_bytes} bytes do not fit in memory")));
    };
    let bytes = contents(path, stored, Some(len))?;
    if bytes.len() < len {
        let what = format!("truncated IDX file: {rows} rows need {len} bytes, it holds {}", bytes.len());
        return Err(Error::data(path, None, what));
    }
    Ok(bytes)
}

/// Loads one split of an IDX folder. Pixels stay raw (0..255); the caller normalises.
pub fn load(dir: &Path, split: Split) -> Result<RawData> {
    Ok(load_selected(dir, split, 0, None, &[])?.0)
}

/// Loads the rows `--skip skip --limit limit` select of one split of an IDX folder, and the
/// source row of the first: only those images are converted to f32. Both files are read whole
/// (their SHA-256 identifies the data); they are decompressed whole and checked against their
/// headers unless their SHA-256 is in `checked` ([`read_split`]).
pub fn load_selected(
    dir: &Path,
    split: Split,
    skip: usize,
    limit: Option<usize>,
    checked: &[&str],
) -> Result<(RawData, usize)> {
    let select = |n: usize| super::selected_rows(dir, n, skip, limit, &format!("the source has {n} rows"));
    let SplitFiles { images_path, images, images_sha, ioff, labels_path, labels, labels_sha, loff, n, h, w } =
        read_split(dir, split, checked, |n| select(n).map(|rows| rows.end))?;
    let rows = select(n)?;
    let pixels = h * w;
    let features: Vec<f32> =
        images[ioff + rows.start * pixels..ioff + rows.end * pixels].iter().map(|&p| f32::from(p)).collect();
    let labels: Vec<u32> = labels[loff + rows.start..loff + rows.end].iter().map(|&l| u32::from(l)).collect();
    let raw = RawData {
        features,
        labels,
        shape: culprit_models::InputShape { channels: 1, height: h, width: w },
        texts: None,
        files: vec![(images_path, images_sha), (labels_path, labels_sha)],
        rows: rows.len(),
        columns: None,
    };
    Ok((raw, rows.start))
}

/// Calls `visit(row, image bytes, label)` for every example of one split of an IDX folder, in
/// order (the headers checked as for loading); returns the images file's path.
pub(crate) fn for_each_example(dir: &Path, split: Split, mut visit: impl FnMut(usize, &[u8], u8)) -> Result<PathBuf> {
    let f = read_split(dir, split, &[], Ok)?;
    let pixels = f.h * f.w;
    for row in 0..f.n {
        visit(row, &f.images[f.ioff + row * pixels..f.ioff + (row + 1) * pixels], f.labels[f.loff + row]);
    }
    Ok(f.images_path)
}

/// The images, rows and columns one split's images file promises (its header only, read
/// through gzip): what loading it would hold, before reading it.
pub fn dims(dir: &Path, split: Split) -> Result<(usize, usize, usize)> {
    use sha2::Digest;
    let path = find(dir, split, "images-idx3-ubyte")?;
    let mut sha = sha2::Sha256::new();
    let mut reader = super::stream::open(&path, &mut sha)?;
    let mut head = [0u8; 16];
    if !super::stream::read_exact_or_end(&mut *reader, &mut head, &path)? {
        return Err(Error::data(&path, None, "truncated IDX header"));
    }
    let (d, _) = parse_header(&path, &head, 3)?;
    Ok((d[0], d[1], d[2]))
}

/// What [`read_image_blocks`] calls for each block: `(first row, pixels, labels)`, a byte each.
pub type EachImageBlock<'a> = dyn FnMut(usize, &[u8], &[u8]) -> Result<()> + 'a;

/// What a streamed read of one split of an IDX folder found ([`read_image_blocks`]).
#[derive(Clone, Debug)]
pub struct IdxStream {
    /// Images.
    pub n: usize,
    /// Rows of an image.
    pub height: usize,
    /// Columns of an image.
    pub width: usize,
    /// The images and labels files, with the SHA-256 of each as stored.
    pub files: Vec<(PathBuf, String)>,
}

/// Streams one split of an IDX folder: calls `each(first, pixels, labels)` for consecutive
/// blocks of at most `per_block` images in order (`first` the row of the block's first, its
/// pixels one byte each, row-major), holding one block; the headers are checked as for loading,
/// and a file that ends early or holds more than its header promises is refused, naming it.
pub fn read_image_blocks(
    dir: &Path,
    split: Split,
    per_block: usize,
    each: &mut EachImageBlock<'_>,
) -> Result<IdxStream> {
    use sha2::Digest;
    let images_path = find(dir, split, "images-idx3-ubyte")?;
    let labels_path = find(dir, split, "labels-idx1-ubyte")?;
    let (mut images_sha, mut labels_sha) = (sha2::Sha256::new(), sha2::Sha256::new());
    let mut images = super::stream::open(&images_path, &mut images_sha)?;
    let mut labels = super::stream::open(&labels_path, &mut labels_sha)?;
    let truncated = |path: &Path| Error::data(path, None, "truncated IDX header");
    let (mut ihead, mut lhead) = ([0u8; 16], [0u8; 8]);
    if !super::stream::read_exact_or_end(&mut *images, &mut ihead, &images_path)? {
        return Err(truncated(&images_path));
    }
    if !super::stream::read_exact_or_end(&mut *labels, &mut lhead, &labels_path)? {
        return Err(truncated(&labels_path));
    }
    let (idims, _) = parse_header(&images_path, &ihead, 3)?;
    let (ldims, _) = parse_header(&labels_path, &lhead, 1)?;
    if idims[0] != ldims[0] {
        let what = format!("{} labels for {} images in {}", ldims[0], idims[0], images_path.display());
        return Err(Error::data(&labels_path, None, what));
    }
    let (n, h, w) = (idims[0], idims[1], idims[2]);
    let per_block = per_block.max(1);
    let (mut pixels, mut ys) = (vec![0u8; per_block * h * w], vec![0u8; per_block]);
    let ended = |path: &Path, at: usize| {
        Error::data(path, None, format!("IDX header promises {n} examples but the file ends after {at}"))
    };
    for first in (0..n).step_by(per_block) {
        let count = per_block.min(n - first);
        let (block, labels_block) = (&mut pixels[..count * h * w], &mut ys[..count]);
        if !super::stream::read_exact_or_end(&mut *images, block, &images_path)? {
            return Err(ended(&images_path, first));
        }
        if !super::stream::read_exact_or_end(&mut *labels, labels_block, &labels_path)? {
            return Err(ended(&labels_path, first));
        }
        each(first, block, labels_block)?;
    }
    for (reader, path) in [(&mut images, &images_path), (&mut labels, &labels_path)] {
        if super::stream::read_exact_or_end(&mut **reader, &mut [0u8; 1], path)? {
            return Err(Error::data(path, None, format!("holds more data than its header promises ({n} examples)")));
        }
    }
    super::stream::finish(images, &images_path)?;
    super::stream::finish(labels, &labels_path)?;
    let files =
        vec![(images_path, super::hex(&images_sha.finalize())), (labels_path, super::hex(&labels_sha.finalize()))];
    Ok(IdxStream { n, height: h, width: w, files })
}

/// Writes one split of an IDX folder (uncompressed, MNIST's names): `pixels` are
/// `labels.len() × height × width` values, rounded and clamped into 0..=255. Each file is written
/// atomically.
pub fn write(dir: &Path, split: Split, height: usize, width: usize, pixels: &[f32], labels: &[u32]) -> Result<()> {
    let n = labels.len();
    let mut images = Vec::with_capacity(16 + pixels.len());
    images.extend_from_slice(&[0, 0, 0x08, 3]);
    for d in [n, height, width] {
        images.extend_from_slice(&(d as u32).to_be_bytes());
    }
    images.extend(pixels.iter().map(|&p| p.round().clamp(0.0, 255.0) as u8));
    let mut label_bytes = Vec::with_capacity(8 + n);
    label_bytes.extend_from_slice(&[0, 0, 0x08, 1]);
    label_bytes.extend_from_slice(&(n as u32).to_be_bytes());
    for &y in labels {
        let y =
            u8::try_from(y).map_err(|_| Error::data(dir, None, format!("label {y} does not fit an IDX u8 file")))?;
        label_bytes.push(y);
    }
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    crate::io::write_atomic(&dir.join(format!("{}-images-idx3-ubyte", split.prefix())), &images)?;
    crate::io::write_atomic(&dir.join(format!("{}-labels-idx1-ubyte", split.prefix())), &label_bytes)
}
