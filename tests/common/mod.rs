//! Helpers shared by the tests.

use std::path::{Path, PathBuf};

/// `../shared` beside the checkout, or `None` (with a printed reason) when it is absent.
pub fn shared(what: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let dir = std::env::var_os("CULPRIT_SHARED").map(PathBuf::from).unwrap_or(dir);
    if dir.join(what).exists() {
        Some(dir)
    } else {
        eprintln!("skipped: {} not found (the shared data folder is absent)", dir.join(what).display());
        None
    }
}

/// The digits CSV shipped in the repository.
pub fn digits_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv")
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Gzip-compresses bytes.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}
