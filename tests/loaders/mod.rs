//! Data loaders on good and malformed files: every malformed case must name the file, the row
//! where one applies, and the problem.

use culprit::data::{DataSpec, Dataset, Normalization, NormalizeMode, Preprocessing, Split};

use crate::common::{gzip, write};

fn fit() -> Preprocessing<'static> {
    Preprocessing::Fit { normalize: NormalizeMode::Max, buckets: 32 }
}

fn spec(path: &std::path::Path) -> DataSpec {
    DataSpec { path: path.to_path_buf(), split: Split::Train, skip: 0, limit: None }
}

fn load_err(path: &std::path::Path) -> String {
    Dataset::load(&spec(path), fit()).expect_err("malformed input must fail").to_string()
}

/// An IDX image file of `n` images `h×w` with pixel (i, r, c) = (i + r + c) mod 256.
fn idx_images(n: usize, h: usize, w: usize) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        b.extend_from_slice(&(d as u32).to_be_bytes());
    }
    for i in 0..n {
        for r in 0..h {
            for c in 0..w {
                b.push(((i + r + c) % 256) as u8);
            }
        }
    }
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 1];
    b.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    b.extend_from_slice(labels);
    b
}

#[test]
fn idx_folder_loads_raw_and_gzipped_with_pixels_in_unit_range() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train-images-idx3-ubyte", &idx_images(5, 3, 4));
    write(dir.path(), "train-labels-idx1-ubyte", &idx_labels(&[0, 1, 2, 1, 0]));
    write(dir.path(), "t10k-images-idx3-ubyte.gz", &gzip(&idx_images(2, 3, 4)));
    write(dir.path(), "t10k-labels-idx1-ubyte.gz", &gzip(&idx_labels(&[2, 0])));
    let train = Dataset::load(&spec(dir.path()), fit()).unwrap();
    assert_eq!(train.len(), 5);
    assert_eq!(train.dim(), 12);
    assert_eq!((train.manifest.shape.height, train.manifest.shape.width), (3, 4));
    assert_eq!(train.manifest.num_classes, 3);
    assert_eq!(train.manifest.normalization, Normalization::Scale { divisor: 255.0 });
    // Example 2, row 1, column 3: (2 + 1 + 3) / 255.
    assert!((train.examples.features()[2 * 12 + 4 + 3] - 6.0 / 255.0).abs() < 1e-7);
    assert_eq!(train.manifest.files.len(), 2);
    assert_eq!(train.manifest.files[0].sha256.len(), 64);

    let mut test_spec = spec(dir.path());
    test_spec.split = Split::Test;
    let test = Dataset::load(&test_spec, Preprocessing::Reuse(&train.manifest)).unwrap();
    assert_eq!(test.labels(), vec![2, 0]);
    assert_eq!(test.ids, vec![0, 1]);
}

#[test]
fn idx_skip_and_limit_convert_only_the_selected_images_and_keep_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train-images-idx3-ubyte", &idx_images(7, 2, 3));
    write(dir.path(), "train-labels-idx1-ubyte", &idx_labels(&[0, 1, 2, 3, 4, 5, 6]));
    let reuse = Dataset::load(&spec(dir.path()), fit()).unwrap();
    let selected = DataSpec { skip: 2, limit: Some(3), ..spec(dir.path()) };
    let part = Dataset::load(&selected, Preprocessing::Reuse(&reuse.manifest)).unwrap();
    assert_eq!(part.ids, vec![2, 3, 4]);
    assert_eq!(part.labels(), vec![2, 3, 4]);
    // Pixel (i, r, c) = (i + r + c) / 255 for the source's row i, read from the file's bytes.
    for (k, i) in (2..5).enumerate() {
        for (p, v) in part.examples.features()[k * 6..(k + 1) * 6].iter().enumerate() {
            let want = (i + p / 3 + p % 3) as f32 / 255.0;
            assert!((v - want).abs() < 1e-7, "row {i}, pixel {p}: {v} vs {want}");
        }
    }
    // The whole source's digest, whatever is selected; a selection past the end is an error.
    assert_eq!(part.manifest.files[0].sha256, reuse.manifest.files[0].sha256);
    let e = Dataset::load(&DataSpec { skip: 7, ..spec(dir.path()) }, fit()).unwrap_err().to_string();
    assert!(e.contains("no examples selected: the source has 7 rows, --skip 7"), "{e}");
}

#[test]
fn idx_truncated_mismatched_and_foreign_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = idx_images(4, 2, 2);
    images.truncate(images.len() - 3);
    write(dir.path(), "train-images-idx3-ubyte", &images);
    write(dir.path(), "train-labels-idx1-ubyte", &idx_labels(&[0, 1, 0, 1]));
    let e = load_err(dir.path());
    assert!(e.contains("train-images-idx3-ubyte") && e.contains("promises 16 bytes") && e.contains("holds 13"), "{e}");

    write(dir.path(), "train-images-idx3-ubyte", &idx_images(4, 2, 2));
    write(dir.path(), "train-labels-idx1-ubyte", &idx_labels(&[0, 1, 0]));
    let e = load_err(dir.path());
    assert!(e.contains("train-labels-idx1-ubyte") && e.contains("3 labels for 4 images"), "{e}");

    write(dir.path(), "train-labels-idx1-ubyte", b"PK\x03\x04 not idx");
    let e = load_err(dir.path());
    assert!(e.contains("train-labels-idx1-ubyte") && e.contains("not an IDX"), "{e}");

    let empty = tempfile::tempdir().unwrap();
    let e = load_err(empty.path());
    assert!(e.contains("no train-images-idx3-ubyte"), "{e}");

    let gz = tempfile::tempdir().unwrap();
    let mut broken = gzip(&idx_images(4, 2, 2));
    broken.truncate(broken.len() / 2);
    write(gz.path(), "train-images-idx3-ubyte.gz", &broken);
    write(gz.path(), "train-labels-idx1-ubyte", &idx_labels(&[0, 1, 0, 1]));
    let e = load_err(gz.path());
    assert!(e.contains("train-images-idx3-ubyte.gz") && e.contains("gzip"), "{e}");
}

#[test]
fn csv_loads_with_label_column_anywhere_and_skip_limit_keep_source_ids() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "t.csv", b"a,label,b\n1,0,2\n-4,1,8\n3,2,0\n5,1,1\n");
    let d = Dataset::load(&DataSpec { path: p.clone(), split: Split::Train, skip: 1, limit: Some(2) }, fit()).unwrap();
    assert_eq!(d.ids, vec![1, 2]);
    assert_eq!(d.labels(), vec![1, 2]);
    // Max-abs over the selected rows is 8.
    assert_eq!(d.examples.features(), vec![-0.5, 1.0, 0.375, 0.0]);
    let std = Dataset::load(&spec(&p), Preprocessing::Fit { normalize: NormalizeMode::Standard, buckets: 32 }).unwrap();
    let col0: Vec<f32> = std.examples.features().chunks(2).map(|r| r[0]).collect();
    let mean: f32 = col0.iter().sum::<f32>() / 4.0;
    let var: f32 = col0.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
    assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "mean {mean} var {var}");
}

#[test]
fn csv_malformed_files_name_the_row_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &[&str]); 5] = [
        ("nolabel.csv", b"a,b\n1,2\n", &["nolabel.csv", "row 0", "no `label` column"]),
        ("ragged.csv", b"a,label\n1,0\n1,2,3\n", &["ragged.csv", "row 2", "3 fields, the header has 2"]),
        ("nan.csv", b"a,label\n1,0\nx,1\n", &["nan.csv", "row 2", "column `a`", "not a number"]),
        ("badlabel.csv", b"a,label\n1,0\n2,-1\n", &["badlabel.csv", "row 2", "label `-1`"]),
        ("empty.csv", b"a,label\n", &["empty.csv", "no data rows"]),
    ];
    for (name, bytes, needles) in cases {
        let e = load_err(&write(dir.path(), name, bytes));
        for n in needles {
            assert!(e.contains(n), "{name}: `{e}` lacks `{n}`");
        }
    }
}

#[test]
fn jsonl_loads_plain_and_gzipped_and_rejects_lines_without_text() {
    let dir = tempfile::tempdir().unwrap();
    let body = b"{\"text\": \"win money now\", \"label\": 1}\n{\"text\": \"meeting at noon\", \"label\": 0}\n\n{\"text\": \"money money\", \"label\": \"1\"}\n";
    let plain = write(dir.path(), "t.jsonl", body);
    let gz = write(dir.path(), "t.jsonl.gz", &gzip(body));
    let a = Dataset::load(&spec(&plain), fit()).unwrap();
    let b = Dataset::load(&spec(&gz), fit()).unwrap();
    assert_eq!(a.examples.features(), b.examples.features());
    assert_eq!(a.labels(), vec![1, 0, 1]);
    assert_eq!(a.dim(), 32);
    assert_eq!(a.texts.as_ref().unwrap()[2], "money money");
    for row in a.examples.features().chunks(32) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    let e = load_err(&write(dir.path(), "bad.jsonl", b"{\"text\": \"ok\", \"label\": 0}\n{\"label\": 1}\n"));
    assert!(e.contains("bad.jsonl") && e.contains("row 2") && e.contains("no `text` field"), "{e}");
    let e = load_err(&write(dir.path(), "bad2.jsonl", b"{\"text\": \"ok\", \"label\": 0}\nnot json\n"));
    assert!(e.contains("row 2") && e.contains("not a JSON object"), "{e}");
}

/// A run's training files (their SHA-256 in its manifest) are decompressed only as far as the
/// selected rows reach: the rows come out as the pixel formula says and as a whole read gives
/// them; past the rows, a file the manifest vouches for is not read (a defect there goes
/// unseen), while the same file unvouched for is refused; rows the contents do not hold are an
/// error naming the file.
#[test]
fn idx_files_a_run_was_trained_on_are_read_only_as_far_as_the_selected_rows() {
    use culprit::data::{FileDigest, read_stored};
    let dir = tempfile::tempdir().unwrap();
    let labels: Vec<u8> = (0..40).map(|i| (i % 10) as u8).collect();
    write(dir.path(), "train-images-idx3-ubyte.gz", &gzip(&idx_images(40, 3, 4)));
    write(dir.path(), "train-labels-idx1-ubyte.gz", &gzip(&idx_labels(&labels)));
    let trained = Dataset::load(&spec(dir.path()), fit()).unwrap();
    let mut unvouched = trained.manifest.clone();
    unvouched.files.clear();
    for (skip, limit) in [(0, Some(5)), (7, Some(1)), (33, None), (0, None)] {
        let selected = DataSpec { skip, limit, ..spec(dir.path()) };
        let part = Dataset::load(&selected, Preprocessing::Reuse(&trained.manifest)).unwrap();
        let whole = Dataset::load(&selected, Preprocessing::Reuse(&unvouched)).unwrap();
        let rows: Vec<usize> = (skip..limit.map_or(40, |l| skip + l)).collect();
        assert_eq!(part.ids, rows);
        assert_eq!(part.labels(), rows.iter().map(|&i| (i % 10) as u32).collect::<Vec<_>>());
        for (k, &i) in rows.iter().enumerate() {
            for p in 0..12 {
                let want = (i + p / 4 + p % 4) as f32 / 255.0;
                assert_eq!(part.examples.features()[k * 12 + p], want, "row {i}, pixel {p}");
            }
        }
        assert_eq!(part.examples.features(), whole.examples.features());
        assert_eq!(part.manifest.files, whole.manifest.files, "the digests are of the whole files");
    }

    // Contents past the header's 40 images, or 15 images where it promises 40.
    let vouched_for = |images: &[u8]| {
        let path = write(dir.path(), "train-images-idx3-ubyte.gz", &gzip(images));
        let mut m = trained.manifest.clone();
        m.files[0] = FileDigest { path: path.clone(), sha256: read_stored(&path).unwrap().1 };
        m
    };
    let mut long = idx_images(40, 3, 4);
    long.extend_from_slice(&[7; 5]);
    let m = vouched_for(&long);
    let first_ten = DataSpec { limit: Some(10), ..spec(dir.path()) };
    assert_eq!(Dataset::load(&first_ten, Preprocessing::Reuse(&m)).unwrap().len(), 10);
    let e = Dataset::load(&first_ten, Preprocessing::Reuse(&unvouched)).unwrap_err().to_string();
    assert!(e.contains("train-images-idx3-ubyte.gz") && e.contains("promises 480 bytes"), "{e}");

    let mut short = idx_images(40, 3, 4);
    short.truncate(16 + 15 * 12);
    let m = vouched_for(&short);
    assert_eq!(Dataset::load(&first_ten, Preprocessing::Reuse(&m)).unwrap().len(), 10);
    let twenty = DataSpec { limit: Some(20), ..spec(dir.path()) };
    let e = Dataset::load(&twenty, Preprocessing::Reuse(&m)).unwrap_err().to_string();
    assert!(
        e.contains("train-images-idx3-ubyte.gz")
            && e.contains("truncated IDX file: 20 rows need 256 bytes, it holds 196"),
        "{e}"
    );
}

#[test]
fn reusing_a_manifest_rejects_data_that_does_not_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let train = Dataset::load(&spec(&write(dir.path(), "a.csv", b"x,y,label\n1,2,0\n3,4,1\n")), fit()).unwrap();
    let e = Dataset::load(&spec(&write(dir.path(), "b.csv", b"x,label\n1,0\n")), Preprocessing::Reuse(&train.manifest))
        .unwrap_err()
        .to_string();
    assert!(e.contains("b.csv") && e.contains("1 features but the model takes 2"), "{e}");
    let e = Dataset::load(
        &spec(&write(dir.path(), "c.csv", b"x,y,label\n1,0,0\n1,1,5\n")),
        Preprocessing::Reuse(&train.manifest),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("c.csv") && e.contains("row 2") && e.contains("label 5 is outside the model's 2 classes"),
        "{e}"
    );
}

#[test]
fn mnist_from_shared_matches_published_hashes() {
    let Some(shared) = crate::common::shared("data/mnist") else { return };
    let d = Dataset::load(
        &DataSpec { path: shared.join("data/mnist"), split: Split::Test, skip: 0, limit: Some(10) },
        fit(),
    )
    .unwrap();
    assert_eq!(d.labels(), vec![7, 2, 1, 0, 4, 1, 4, 9, 5, 9]);
    assert!(d.examples.features().iter().all(|v| (0.0..=1.0).contains(v)));
    let (_, digest) = culprit::data::read_file(&shared.join("data/mnist/t10k-labels-idx1-ubyte.gz")).unwrap();
    assert_eq!(digest, d.manifest.files[1].sha256);
}
