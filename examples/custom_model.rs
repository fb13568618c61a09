//! A model defined outside culprit, attributed through the library.
//!
//! `SoftmaxRegression` below is written here with burn's tensor ops, in PyTorch's layout (the
//! weight is `[classes, features]`, as `nn.Linear` stores it, where culprit's own logistic
//! regression stores `[features, classes]`). Implementing [`culprit_models::Model`] is all it
//! takes for culprit to train it, cache its per-example gradients, fit a curvature and rank the
//! training examples behind one of its predictions:
//!
//! ```text
//! cargo run --release --example custom_model [-- QUERY_ROW]
//! ```
//!
//! It trains on rows 0..1297 of the digits shipped in `data/`, and traces row 1300 (or the row
//! given). What each call costs is in its doc comment; on digits the whole program takes about a
//! second after the build. The same ranking comes out of the command line for culprit's own
//! `logreg` on the same data (the test `library::a_model_defined_outside_the_crate_ranks_as_the_cli_does`
//! checks it):
//!
//! ```text
//! culprit train --data data/digits.csv --limit 1297 --model logreg --out run
//! culprit cache --run run && culprit fit --run run --curvature ggn
//! culprit trace --run run --data data/digits.csv --skip 1297 --index 1300 --curvature ggn
//! ```

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor, TensorData};
use culprit::curvature::{Curvature, FitOptions, Method};
use culprit::data::{DataSpec, Dataset, Preprocessing, Split};
use culprit::gradients::Measurement;
use culprit::gradients::projection::ProjectionSpec;
use culprit::objective::Objective;
use culprit::query::ScoreMode;
use culprit::query::attribute::{AttributionOptions, attribute};
use culprit::store::build::{StoreLayout, build};
use culprit::store::{Dtype, GradientStore, StoreKey};
use culprit_models::model::{LayerTap, Model, TrackedLayer, WeightLayout};
use culprit_models::{Backend, Features, Silent, TrainConfig};

/// Multinomial logistic regression, logits = W x + b, with W stored `[classes, features]`.
#[derive(Clone, Debug)]
pub struct SoftmaxRegression {
    weight: Tensor<1>,
    bias: Tensor<1>,
    layer: [TrackedLayer; 1],
}

impl SoftmaxRegression {
    /// θ = 0 (a convex model: where it starts does not change where it ends).
    pub fn zeros(features: usize, classes: usize, device: &Device) -> Self {
        let zeros = |n: usize| Tensor::from_data(TensorData::new(vec![0.0f64; n], [n]), (device, DType::F64));
        let layer = TrackedLayer {
            name: "linear".into(),
            inputs: features,
            outputs: classes,
            bias: true,
            positions: 1,
            layout: WeightLayout::OutputMajor,
            offset: 0,
        };
        Self { weight: zeros(features * classes), bias: zeros(classes), layer: [layer] }
    }
}

impl Model for SoftmaxRegression {
    type Batch = Features;

    fn describe(&self) -> String {
        format!("softmax regression {}→{}", self.layer[0].inputs, self.layer[0].outputs)
    }

    fn num_classes(&self) -> usize {
        self.layer[0].outputs
    }

    fn layers(&self) -> &[TrackedLayer] {
        &self.layer
    }

    fn parameters(&self) -> Vec<Tensor<1>> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    fn set_parameters(&mut self, parameters: Vec<Tensor<1>>) {
        let [weight, bias]: [Tensor<1>; 2] = parameters.try_into().expect("a weight and a bias");
        (self.weight, self.bias) = (weight, bias);
    }

    /// z = x Wᵀ + b; tapped, the input x and a zero probe on z.
    fn forward(&self, batch: &Features, tapped: bool) -> (Tensor<2>, Vec<LayerTap>) {
        let (inputs, classes) = (self.layer[0].inputs, self.layer[0].outputs);
        let x = batch.tensor(&self.device(), self.dtype());
        let w = self.weight.clone().reshape([classes, inputs]);
        let z = x.clone().matmul(w.transpose()) + self.bias.clone().reshape([1, classes]);
        if !tapped {
            return (z, Vec::new());
        }
        let rows = batch.len();
        let tap = LayerTap::new(x.reshape([rows, inputs, 1]), classes);
        let z = z + tap.probe.clone().reshape([rows, classes]);
        (z, vec![tap])
    }

    fn is_convex(&self) -> bool {
        true
    }
}

/// The training rows and one held-out query, from the digits shipped in the repository.
fn digits(root: &Path, query_row: usize) -> (Dataset, Dataset) {
    let csv = root.join("data/digits.csv");
    let fit = Preprocessing::Fit { normalize: Default::default(), buckets: 1 };
    let train = Dataset::load(&DataSpec { path: csv.clone(), split: Split::Train, skip: 0, limit: Some(1297) }, fit)
        .expect("the digits");
    let rest = DataSpec { path: csv, split: Split::Train, skip: 1297, limit: None };
    let query = Dataset::load(&rest, Preprocessing::Reuse(&train.manifest)).expect("the digits").select(&[query_row]);
    (train, query.expect("a held-out row, 1297..1797"))
}

/// Trains the model, caches its gradients into `store_dir`, fits the GGN and returns the top
/// `top` proponents of its prediction on digits row `query_row` as (training row, score).
///
/// Costs on digits (n = 1297, d = 650): training, L-BFGS to ‖∇L‖ < 1e-6 (≈ 50 full-batch f64
/// passes); the cache, one tapped backward per 256 examples; the fit, C = 10 backward passes per
/// chunk and an n·C·d² Gram matrix with a d³/3 Cholesky; the ranking, one solve (d²) and one pass
/// over the store (n·(in + out) multiply-adds for the factored rows).
pub fn rank(root: &Path, store_dir: &Path, query_row: usize, top: usize) -> Vec<(usize, f64)> {
    let (train, query) = digits(root, query_row);
    let device = Backend::default().autodiff_device();
    let model = SoftmaxRegression::zeros(train.dim(), train.manifest.num_classes, &device);
    // 1. Train to the objective's optimum (the library's L-BFGS, as for culprit's own logreg).
    let config = TrainConfig::defaults(true);
    let (model, _) =
        culprit_models::train::train_model(model, &config, &train.examples, &mut Silent).expect("training");
    // 2. Cache every training example's gradient, exactly, as its two factors.
    let key = StoreKey {
        weights_sha256: "example".into(),
        data_sha256: "digits".into(),
        projection: "factors".into(),
        seed: 0,
    };
    let layout = StoreLayout {
        projection: ProjectionSpec::Factors { k_in: usize::MAX, k_out: usize::MAX },
        seed: 0,
        dtype: Dtype::F32,
        batch: 256,
        rows_per_shard: None,
        part: None,
    };
    build(store_dir, key.clone(), &model, &train.examples, &layout, &mut Silent).expect("the gradient store");
    let store = GradientStore::open(store_dir, &key).expect("the gradient store");
    // 3. Fit the curvature of the objective (1/n) Σ CE + (λ/2)‖θ‖² at the trained θ.
    let objective = Objective::new(&model, train.examples.clone(), config.l2, &device);
    let curvature = Curvature::fit(&objective, &FitOptions::new(Method::Ggn)).expect("the fit");
    // 4. Rank the training examples behind the prediction on the query.
    let options = AttributionOptions {
        measurement: Measurement::Loss(culprit::gradients::Target::Predicted),
        score: ScoreMode::Raw,
        top,
        keep_all: false,
        part: (0, 1),
        combine: culprit::query::Combine::Sum,
    };
    let scores = attribute(&objective, &curvature, &store, &query.examples, None, &options).expect("the ranking");
    scores.scores.largest[0].iter().map(|s| (train.ids[s.row], s.score)).collect()
}

#[allow(dead_code)]
fn main() {
    let query_row = std::env::args().nth(1).map_or(1300, |a| a.parse().expect("a row number in 1297..1797"));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let store = std::env::temp_dir().join(format!("culprit-example-{}", std::process::id()));
    let started = std::time::Instant::now();
    let ranking = rank(&root, &store, query_row, 10);
    let _ = std::fs::remove_dir_all(&store);
    println!(
        "the training digits behind the prediction on row {query_row} (score: predicted change of its loss if removed):"
    );
    for (k, (id, score)) in ranking.iter().enumerate() {
        println!("  {:>2}. training row {id:>4}  {score:+.4e}", k + 1);
    }
    println!("in {:.2} s", started.elapsed().as_secs_f64());
}
