//! A language model through the whole pipeline by the CLI (train, cache, fit, trace
//! `--measure completion --per-token`), against a brute-force reference: with exact gradients
//! (`--project none`) and the identity curvature a raw score is (1/n) ∇m(query)ᵀ∇ℓ(document),
//! computed here from the model by autodiff, one document at a time. Needs no shared data: the
//! corpus is written by the test.

use std::path::Path;
use std::process::Command;

use burn::tensor::DType;
use culprit::gradients::{Measurement, Target, gradient_rows_f64, per_example_gradients};
use culprit_models::{Backend, Batch, Gpt};

pub(crate) fn culprit(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").output().unwrap();
    assert!(o.status.success(), "culprit {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// 30 short functions of three shapes, with provenance.
pub(crate) fn corpus(dir: &Path) -> std::path::PathBuf {
    let mut lines = String::new();
    for i in 0..30 {
        let text = match i % 3 {
            0 => format!("def add_{i}(a, b):\n    return a + b + {i}"),
            1 => format!("def name_{i}(self):\n    return self.name_{i}"),
            _ => format!("def check_{i}(x):\n    if x > {i}:\n        return True\n    return False"),
        };
        lines.push_str(&serde_json::json!({ "text": text, "source": format!("lib/m{}.py:{}", i % 4, i) }).to_string());
        lines.push('\n');
    }
    let path = dir.join("corpus.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

/// `train` arguments for a one-layer GPT (width 16, two heads, context 48) on `corpus`.
pub(crate) fn small_gpt(corpus: &Path, out: &Path, epochs: usize) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--model", "gpt", "--data"].map(String::from).to_vec();
    args.push(corpus.to_str().unwrap().into());
    let rest = ["--context", "48", "--layers", "1", "--heads", "2", "--width", "16", "--batch", "8", "--lr", "3e-3"];
    args.extend(rest.map(String::from));
    args.extend(["--epochs".into(), epochs.to_string(), "--seed".into(), "3".into(), "--out".into()]);
    args.push(out.to_str().unwrap().into());
    args
}

/// A queries file of one prompt and the completion whose log-probability is traced.
pub(crate) fn completion_query(dir: &Path) -> std::path::PathBuf {
    let queries = dir.join("queries.jsonl");
    std::fs::write(&queries, "{\"prompt\": \"def add_7(a, b):\\n    return \", \"completion\": \"a + b + 7\"}\n")
        .unwrap();
    queries
}

/// The scores of the brute-force reference: (1/n) ∇m(query)ᵀ∇ℓ(document) for every document.
pub(super) fn brute_force(run: &Path, corpus: &Path, queries: &Path) -> Vec<f64> {
    use culprit::workspace::kind::{Kind, Language};
    let run = culprit::workspace::Run::open(run).unwrap();
    let device = Backend::default().autodiff_device();
    let gpt: Gpt = Gpt::from_flat(&run.config.model.language().unwrap().gpt, &run.theta, &device, DType::F64).unwrap();
    let spec = |path: &Path| culprit::data::DataSpec {
        path: path.to_path_buf(),
        split: culprit::data::Split::Train,
        skip: 0,
        limit: None,
    };
    let docs = <Language as Kind>::load(&run, &spec(corpus)).unwrap();
    let query = <Language as Kind>::load(&run, &spec(queries)).unwrap().examples.slice(0..1);
    let labels = query.labels().into_owned();
    let m = Measurement::LogProbability(Target::Label);
    let q = gradient_rows_f64(&per_example_gradients(&gpt, &query, &labels, m));
    let n = docs.len();
    (0..n)
        .map(|i| {
            let doc = docs.examples.slice(i..i + 1);
            let labels = doc.labels().into_owned();
            let g = gradient_rows_f64(&per_example_gradients(&gpt, &doc, &labels, Measurement::TRAINING_LOSS));
            assert_eq!(g.len(), q.len());
            q.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>() / n as f64
        })
        .collect()
}

#[test]
fn a_language_model_trace_is_the_brute_force_gradient_product_and_splits_by_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let corpus = corpus(dir);
    let run = dir.join("run");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    culprit(&small_gpt(&corpus, &run, 3).iter().map(String::as_str).collect::<Vec<_>>());
    culprit(&["cache", "--run", &s(&run), "--project", "none"]);
    culprit(&["fit", "--run", &s(&run), "--curvature", "identity"]);
    let queries = completion_query(dir);
    let out = dir.join("trace.json");
    culprit(&[
        "trace",
        "--run",
        &s(&run),
        "--data",
        &s(&queries),
        "--index",
        "0",
        "--measure",
        "completion",
        "--curvature",
        "identity",
        "--per-token",
        "--top",
        "6",
        "--format",
        "json",
        "--out",
        &s(&out),
    ]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let reference = brute_force(&run, &corpus, &queries);
    let largest = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    // A proponent raised the completion's log-probability: removing it would lower it (sign −1).
    assert_eq!(report["proponent_sign"].as_i64(), Some(-1));
    let mut sorted = reference.clone();
    sorted.sort_by(f64::total_cmp);
    let listed = report["proponents"][0].as_array().unwrap();
    assert_eq!(listed.len(), 6);
    for (rank, influence) in listed.iter().enumerate() {
        let id = influence["train_index"].as_u64().unwrap() as usize;
        let score = influence["score"].as_f64().unwrap();
        // f32 store and model against the f64 reference: 1e-3 of the largest score.
        assert!(
            (score - reference[id]).abs() <= 1e-3 * largest,
            "document {id}: culprit {score}, brute force {}",
            reference[id]
        );
        // The ranking is the reference's, up to scores within that tolerance.
        assert!((score - sorted[rank]).abs() <= 1e-3 * largest, "rank {rank}: {score} vs {}", sorted[rank]);
        assert!(influence["source"].as_str().unwrap().starts_with("lib/m"), "provenance kept");
        let tokens = influence["per_token"].as_array().expect("--per-token fills every listed document");
        let parts: f64 = tokens.iter().map(|t| t["score"].as_f64().unwrap()).sum();
        assert!((parts - score).abs() <= 1e-4 * largest, "document {id}: parts sum to {parts}, score {score}");
        let text: String = tokens.iter().map(|t| t["token"].as_str().unwrap()).collect();
        assert!(text.starts_with("def "), "the tokens spell the document: {text:?}");
    }

    // Projected (LoGra kron:8x8) gradients, EK-FAC, RelatIF, several queries and their combined
    // ranking: the per-token parts still sum to every listed score.
    let store = dir.join("kron");
    culprit(&["cache", "--run", &s(&run), "--project", "kron:8x8", "--store", &s(&store)]);
    culprit(&["fit", "--run", &s(&run), "--curvature", "ekfac"]);
    std::fs::write(
        &queries,
        "{\"prompt\": \"def add_7(a, b):\\n    return \", \"completion\": \"a + b + 7\"}\n{\"prompt\": \"def name_4(self):\\n\", \"completion\": \"    return self.name_4\"}\n",
    )
    .unwrap();
    // Both combinations: with `strongest` a combined entry is split by the query it came from.
    for combine in ["sum", "strongest"] {
        culprit(&[
            "trace",
            "--run",
            &s(&run),
            "--data",
            &s(&queries),
            "--index",
            "0,1",
            "--measure",
            "completion",
            "--curvature",
            "ekfac",
            "--store",
            &s(&store),
            "--score",
            "relatif",
            "--combine",
            combine,
            "--per-token",
            "--top",
            "4",
            "--format",
            "json",
            "--out",
            &s(&out),
        ]);
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let mut rankings: Vec<&serde_json::Value> = report["proponents"].as_array().unwrap().iter().collect();
        rankings.extend(report["opponents"].as_array().unwrap());
        rankings.push(&report["combined"]["proponents"]);
        rankings.push(&report["combined"]["opponents"]);
        let mut checked = 0;
        for influence in rankings.iter().flat_map(|r| r.as_array().unwrap()) {
            let score = influence["score"].as_f64().unwrap();
            let parts: f64 =
                influence["per_token"].as_array().unwrap().iter().map(|t| t["score"].as_f64().unwrap()).sum();
            assert!((parts - score).abs() <= 1e-3 * score.abs().max(1e-6), "{combine}: parts {parts}, score {score}");
            checked += 1;
        }
        assert!(checked >= 12, "{combine}: {checked} listed documents");
    }
}

#[test]
fn a_bpe_learnt_here_trains_a_model_and_a_query_is_split_where_its_tokens_are() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let corpus = corpus(dir);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let tokenizer = dir.join("tokenizer.json");
    let said = culprit(&["tokenizer", "--data", &s(&corpus), "--vocab", "300", "--out", &s(&tokenizer)]);
    assert!(said.starts_with("tokenizer of 300 tokens learnt from 30 texts"), "{said}");
    let bytes_per_token: f64 =
        said.split(" bytes per token").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes_per_token > 2.0, "{said}");
    let run = dir.join("run");
    let common = ["--context", "48", "--layers", "1", "--heads", "2", "--width", "16", "--epochs", "1"];
    let (corpus_arg, tokenizer_arg, run_arg) = (s(&corpus), s(&tokenizer), s(&run));
    let train = ["train", "--model", "gpt", "--data", &corpus_arg, "--tokenizer", &tokenizer_arg, "--out", &run_arg];
    culprit(&[&train[..], &common[..]].concat());
    // The same text split before and after the indentation's last space: GPT-2's pre-tokenizer
    // joins that space to `return`, so both are the same tokens with the same completion.
    let queries = dir.join("queries.jsonl");
    let lines = [
        serde_json::json!({ "prompt": "def add_3(a, b):\n    ", "completion": "return a + b + 3" }),
        serde_json::json!({ "prompt": "def add_3(a, b):\n   ", "completion": " return a + b + 3" }),
    ];
    std::fs::write(&queries, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let csv = culprit(&["predict", "--run", &s(&run), "--data", &s(&queries)]);
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert_eq!(rows[0][1..], rows[1][1..], "{csv}");
    let t =
        culprit::data::tokenizer::Tokenizer::Bpe(Box::new(culprit::data::tokenizer::Bpe::load(&tokenizer).unwrap()));
    let whole = t.encode("def add_3(a, b):\n    return a + b + 3");
    let (tokens, split) = t.encode_query("def add_3(a, b):\n    ", "return a + b + 3");
    assert_eq!(tokens, whole);
    assert_eq!(rows[0][1], (whole.len() - split).to_string(), "{csv}");
    assert!(t.decode(&whole[split..]).starts_with(" return"), "{}", t.decode(&whole[split..]));
}
