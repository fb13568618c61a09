//! The kinds of model a run can hold, and what the workspace needs to know of each: how to
//! rebuild the trained model from the run, how to read data the way the run reads it, and how to
//! train one afresh (retraining from scratch, for purges and the LDS).
//!
//! Everything above this (the store, fitting, tracing, auditing, purging, evaluating) is written
//! once, generically over [`Kind`]; the commands pick the kind from the run's `config.json` with
//! [`dispatch!`](crate::dispatch).

use burn::tensor::{DType, Device};
use culprit_models::{Batch, Features, Gpt, Model, Network, Tokens, TrainConfig, TrainReport};

use super::run::{ModelSpec, Run};
use crate::data::{DataSpec, Dataset, Preprocessing};
use crate::error::Result;

/// A kind of model a run can hold.
pub trait Kind: 'static {
    /// The model type.
    type Model: Model<Batch = Self::Batch>;
    /// Its batches.
    type Batch: Batch + crate::data::ListedLabel;

    /// The run's trained model on `device`, in the dtype it trains in.
    fn model(run: &Run, device: &Device) -> Result<Self::Model>;

    /// Examples from `spec`, read and preprocessed as the run's training data was.
    fn load(run: &Run, spec: &DataSpec) -> Result<Dataset<Self::Batch>>;

    /// The dtype curvature is computed in: f64 for the classifiers (small models, exact
    /// methods), f32 for language models (their size makes f64 twice the cost for no gain in the
    /// Kronecker methods they use).
    fn curvature_dtype() -> DType;

    /// The text of each token of the examples `rows` of `data`; `None` for kinds whose examples
    /// are not token sequences.
    fn token_pieces(run: &Run, data: &Self::Batch, rows: &[usize]) -> Result<Option<Vec<Vec<String>>>>;

    /// Trains a model of shape `model` afresh on `data` with `training` (its seed included).
    fn train(
        model: &ModelSpec,
        training: &TrainConfig,
        data: &Self::Batch,
        device: &Device,
        progress: &mut dyn culprit_models::Progress,
    ) -> Result<(Self::Model, TrainReport)>;
}

/// The reference classifiers, on rows of features.
pub struct Classifier;

/// Language models, on token sequences.
pub struct Language;

impl Kind for Classifier {
    type Model = Network;
    type Batch = Features;

    fn model(run: &Run, device: &Device) -> Result<Network> {
        run.network(device)
    }

    fn load(run: &Run, spec: &DataSpec) -> Result<Dataset> {
        run.config.model.classifier()?;
        Dataset::load(spec, Preprocessing::Reuse(&run.manifest))
    }

    fn curvature_dtype() -> DType {
        DType::F64
    }

    fn token_pieces(_: &Run, _: &Features, _: &[usize]) -> Result<Option<Vec<Vec<String>>>> {
        Ok(None)
    }

    fn train(
        model: &ModelSpec,
        training: &TrainConfig,
        data: &Features,
        device: &Device,
        progress: &mut dyn culprit_models::Progress,
    ) -> Result<(Network, TrainReport)> {
        Ok(culprit_models::train::train(model.classifier()?, training, data, device, progress)?)
    }
}

impl Kind for Language {
    type Model = Gpt;
    type Batch = Tokens;

    fn model(run: &Run, device: &Device) -> Result<Gpt> {
        run.gpt(device)
    }

    fn load(run: &Run, spec: &DataSpec) -> Result<Dataset<Tokens>> {
        let language = run.config.model.language()?;
        Dataset::load_corpus(spec, &run.tokenizer()?, &language.tokenizer, language.gpt.context)
    }

    fn curvature_dtype() -> DType {
        DType::F32
    }

    fn token_pieces(run: &Run, data: &Tokens, rows: &[usize]) -> Result<Option<Vec<Vec<String>>>> {
        let tokenizer = run.tokenizer()?;
        Ok(Some(rows.iter().map(|&r| tokenizer.pieces(data.tokens(r))).collect()))
    }

    fn train(
        model: &ModelSpec,
        training: &TrainConfig,
        data: &Tokens,
        device: &Device,
        progress: &mut dyn culprit_models::Progress,
    ) -> Result<(Gpt, TrainReport)> {
        let config = &model.language()?.gpt;
        let fresh = Gpt::init(config, training.seed, device, DType::F32)?;
        Ok(culprit_models::train::train_model(fresh, training, data, progress)?)
    }
}

/// Runs `$body` with `$kind` bound to the run's [`Kind`]: `dispatch!(run, K => f::<K>(…))`.
#[macro_export]
macro_rules! dispatch {
    ($run:expr, $kind:ident => $body:expr) => {
        match &$run.config.model {
            $crate::workspace::run::ModelSpec::Classifier(_) => {
                type $kind = $crate::workspace::kind::Classifier;
                $body
            }
            $crate::workspace::run::ModelSpec::Language(_) => {
                type $kind = $crate::workspace::kind::Language;
                $body
            }
        }
    };
}

/// Whether a run holds a classifier or a language model.
pub fn is_language(run: &Run) -> bool {
    matches!(run.config.model, ModelSpec::Language(_))
}
