//! Step 2 of the pipeline: inverse-curvature products x = (H + δI)⁻¹ q.
//!
//! H is the Hessian of the training objective L(θ) = (1/n) Σᵢ CE + (λ/2)‖θ‖² at the trained θ, or
//! its Gauss–Newton approximation G (exact for linear models, positive semi-definite always); δ
//! is extra damping (`--damping`, default 0), reported with every result. Influence scores
//! (step 3) precondition each query gradient q with one of these:
//!
//! | method | what | cost to fit | cost per solve | exact? |
//! |---|---|---|---|---|
//! | `exact` | dense H (closed form for logreg, else finite-difference columns), Cholesky | d products or n·d²·C; d³/3 | d² | yes |
//! | `ggn` | dense G from per-class gradients, Cholesky | n·C·d² + d³/3 | d² | yes (G) |
//! | `cg` | conjugate gradient on G products, optionally K-FAC-preconditioned | (K-FAC) | iterations × product | to tolerance |
//! | `lissa` | Neumann series on G products | – | depth × product | to tolerance |
//! | `arnoldi` | top-k eigenpairs of G from a Krylov space | m products | k·d | in the top-k subspace |
//! | `kfac`, `ekfac` | Kronecker-factored G per layer | C backward passes per pass | Σ m·o·(m+o) | approximation |
//! | `identity` | H = I: gradient dot products | – | d | no (a baseline) |
//! | `projected` | TRAK-style (1/n)ΦᵀΦ + (λ+δ)I of a projected store, Cholesky | n·k² + k³/3 | k² | no (a projected empirical Fisher) |
//!
//! Iterative methods check their relative residual ‖(H+δI)x − q‖/‖q‖ with the exact operator and
//! fail with [`CurvatureError::NotConverged`] rather than return a silently wrong answer.
//!
//! `culprit fit` stores the fitted factors in `RUN_DIR/curvature/METHOD.bin` (format in
//! `docs/FORMAT.md`), tied to the run's weights and data like the gradient store.

pub mod dense;
pub mod iterative;
pub mod kronecker;
pub mod operators;

use std::path::{Path, PathBuf};

use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use iterative::{Arnoldi, ConjugateGradient, Eigenpairs, Lissa, SolveInfo};
use kronecker::{KroneckerFactors, KroneckerLayer};
use operators::{Damped, GaussNewton, LinearOperator, Objective};

/// Numerical failures of curvature methods.
#[derive(Debug, thiserror::Error)]
pub enum CurvatureError {
    /// An iterative solver stopped above its tolerance.
    #[error(
        "{method} did not converge: relative residual {residual:.3e} after {iterations} iterations (tolerance {tolerance:.1e})"
    )]
    NotConverged {
        /// The method.
        method: String,
        /// Iterations used.
        iterations: usize,
        /// Residual reached.
        residual: f64,
        /// Target.
        tolerance: f64,
    },
    /// The operator is not positive definite where the method needs it to be.
    #[error("{method}: the curvature is not positive definite: {detail}")]
    NotPositiveDefinite {
        /// The method.
        method: String,
        /// What was seen.
        detail: String,
    },
    /// The model is too large for a dense method.
    #[error(
        "{method} builds a dense {params}×{params} matrix; it is for models up to {limit} parameters (use cg, kfac or ekfac)"
    )]
    TooLarge {
        /// The method.
        method: String,
        /// Parameters.
        params: usize,
        /// Limit.
        limit: usize,
    },
    /// Inconsistent parameters.
    #[error("{0}")]
    Config(String),
}

/// A curvature method (`--curvature`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Dense Hessian.
    Exact,
    /// Dense Gauss–Newton.
    Ggn,
    /// Conjugate gradient on GGN products.
    Cg,
    /// LiSSA on GGN products.
    Lissa,
    /// Top-k eigenpairs.
    Arnoldi,
    /// K-FAC.
    Kfac,
    /// EK-FAC.
    Ekfac,
    /// H = I.
    Identity,
    /// TRAK-style: (1/n) ΦᵀΦ + (λ + δ)I in a projected store's space.
    Projected,
}

impl Method {
    /// Parses the CLI name.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "exact" => Self::Exact,
            "ggn" => Self::Ggn,
            "cg" => Self::Cg,
            "lissa" => Self::Lissa,
            "arnoldi" => Self::Arnoldi,
            "kfac" => Self::Kfac,
            "ekfac" => Self::Ekfac,
            "identity" => Self::Identity,
            "projected" => Self::Projected,
            other => {
                return Err(Error::Usage(format!(
                    "unknown curvature `{other}` (expected exact, ggn, cg, lissa, arnoldi, kfac, ekfac, projected or identity)"
                )));
            }
        })
    }

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Ggn => "ggn",
            Self::Cg => "cg",
            Self::Lissa => "lissa",
            Self::Arnoldi => "arnoldi",
            Self::Kfac => "kfac",
            Self::Ekfac => "ekfac",
            Self::Identity => "identity",
            Self::Projected => "projected",
        }
    }
}

/// Parameters of a fit (`culprit fit`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FitOptions {
    /// The method.
    pub method: Method,
    /// Extra damping δ.
    pub damping: f64,
    /// CG parameters.
    pub cg: ConjugateGradient,
    /// Precondition CG with K-FAC.
    pub precondition: bool,
    /// LiSSA parameters (scale 0 = estimate from the top eigenvalue).
    pub lissa: Lissa,
    /// Arnoldi parameters.
    pub arnoldi: Arnoldi,
    /// Examples per chunk when sweeping the data.
    pub chunk: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            method: Method::Cg,
            damping: 0.0,
            cg: ConjugateGradient::default(),
            precondition: false,
            lissa: Lissa::default(),
            arnoldi: Arnoldi::default(),
            chunk: 1024,
        }
    }
}

/// Fitted curvature: whatever a method precomputes, ready to solve.
#[derive(Clone, Debug)]
pub enum Factors {
    /// Cholesky factor of H + δI.
    Dense(dense::Cholesky),
    /// Nothing precomputed (products at solve time), or K-FAC factors as CG's preconditioner.
    Iterative(Option<KroneckerFactors>),
    /// Top eigenpairs.
    Arnoldi(Eigenpairs),
    /// Kronecker factors.
    Kronecker(KroneckerFactors),
    /// Nothing.
    Identity,
    /// Cholesky factor of (1/n) ΦᵀΦ + (λ + δ)I in the space of the store with this key.
    Projected {
        /// The k×k factor.
        cholesky: dense::Cholesky,
        /// The store's key (projection and seed, weights, data).
        store: crate::store::StoreKey,
    },
}

/// A fitted curvature with the options it was fitted with.
#[derive(Clone, Debug)]
pub struct Curvature {
    /// Options.
    pub options: FitOptions,
    /// Factors.
    pub factors: Factors,
    /// Seconds the fit took.
    pub fit_seconds: f64,
}

impl Curvature {
    /// Fits `options.method` to `objective`.
    pub fn fit(objective: &Objective, options: &FitOptions) -> Result<Self> {
        let started = std::time::Instant::now();
        let damping = options.damping;
        if !(damping >= 0.0) {
            return Err(Error::Usage("--damping must be ≥ 0".into()));
        }
        let factors = match options.method {
            Method::Exact | Method::Ggn => {
                let h = dense::build(objective, options.method.name())?;
                Factors::Dense(dense::Cholesky::new(h, damping, options.method.name())?)
            }
            Method::Cg => Factors::Iterative(if options.precondition {
                Some(kronecker::fit(objective, true, options.chunk)?)
            } else {
                None
            }),
            Method::Lissa => Factors::Iterative(None),
            Method::Arnoldi => {
                let ggn = GaussNewton::new(objective, options.chunk);
                Factors::Arnoldi(options.arnoldi.eigenpairs(&ggn)?)
            }
            Method::Kfac => Factors::Kronecker(kronecker::fit(objective, false, options.chunk)?),
            Method::Ekfac => Factors::Kronecker(kronecker::fit(objective, true, options.chunk)?),
            Method::Identity => Factors::Identity,
            Method::Projected => {
                return Err(Error::Usage(
                    "the projected curvature is fitted from a projected gradient store (Curvature::fit_projected)"
                        .into(),
                ));
            }
        };
        Ok(Self { options: options.clone(), factors, fit_seconds: started.elapsed().as_secs_f64() })
    }

    /// Fits the TRAK-style curvature M = (1/n) ΦᵀΦ + (λ + δ)I of a projected store's rows Φ
    /// (n × k; a `factors` store's rows expanded into their k_in·k_out blocks) and factors it. Cost n·k² + k³/3. The damping lives in the projected space: it is
    /// the ridge TRAK adds to ΦᵀΦ (Park et al. 2023), not λ mapped through the projection.
    pub fn fit_projected(store: &crate::store::GradientStore, options: &FitOptions, l2: f64) -> Result<Self> {
        let started = std::time::Instant::now();
        let layout = &store.manifest.layout;
        let k: usize = layout.iter().map(crate::gradients::projection::BlockLayout::query_len).sum();
        let n = store.rows() as f64;
        let mut gram = Mat::<f64>::zeros(k, k);
        store.for_each_block(1024, |_, block| {
            let rows = store.expanded_rows(block);
            let count = rows.len() / k;
            let b = Mat::<f64>::from_fn(count, k, |i, j| f64::from(rows[i * k + j]));
            gram += b.transpose() * &b;
        });
        let mut m = Mat::<f64>::from_fn(k, k, |i, j| gram[(i, j)] / n);
        for i in 0..k {
            m[(i, i)] += l2;
        }
        let cholesky = dense::Cholesky::new(m, options.damping, "projected")?;
        Ok(Self {
            options: options.clone(),
            factors: Factors::Projected { cholesky, store: store.manifest.key.clone() },
            fit_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// M⁻¹ q for queries already in a projected store's space (the projected curvature only).
    pub fn solve_projected(&self, queries: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let Factors::Projected { cholesky, .. } = &self.factors else {
            return Err(Error::Usage("only the projected curvature solves in a store's projected space".into()));
        };
        let k = cholesky.factor.nrows();
        let mut q = Mat::<f64>::from_fn(k, queries.len(), |i, j| f64::from(queries[j][i]));
        cholesky.solve(&mut q);
        Ok((0..queries.len()).map(|j| (0..k).map(|i| q[(i, j)] as f32).collect()).collect())
    }

    /// Solves (H + δI) x = q for each query. `objective` is needed by the matrix-free methods.
    /// Returns the solutions and, for iterative methods, how each solve ended.
    pub fn solve(&self, objective: &Objective, queries: &[Vec<f64>]) -> Result<Vec<(Vec<f64>, Option<SolveInfo>)>> {
        let damping = self.options.damping;
        let specs = objective.network.layers();
        match &self.factors {
            Factors::Dense(chol) => {
                let d = chol.factor.nrows();
                let mut q = Mat::<f64>::from_fn(d, queries.len(), |i, j| queries[j][i]);
                chol.solve(&mut q);
                Ok((0..queries.len()).map(|j| ((0..d).map(|i| q[(i, j)]).collect(), None)).collect())
            }
            Factors::Iterative(pre) => {
                let ggn = GaussNewton::new(objective, self.options.chunk);
                let op = Damped { inner: &ggn, damping };
                queries
                    .iter()
                    .map(|q| {
                        let (x, info) = match self.options.method {
                            Method::Lissa => {
                                let mut lissa = self.options.lissa.clone();
                                if lissa.scale <= 0.0 {
                                    // Safe scale: 1.1 × the top eigenvalue (a few power iterations).
                                    let top = Arnoldi { iterations: 20, top_k: 1, seed: 0 }.eigenpairs(&op)?;
                                    lissa.scale = 1.1 * top.values[0];
                                }
                                let sample = |v: &[f64], rows: Option<&[usize]>| match rows {
                                    Some(r) => {
                                        let mut out = ggn.apply_rows(v, r);
                                        out.iter_mut().zip(v).for_each(|(o, x)| *o += damping * x);
                                        out
                                    }
                                    None => op.apply(v),
                                };
                                lissa.solve(&op, &sample, objective.len(), q)?
                            }
                            _ => match pre {
                                Some(k) => {
                                    let m = |r: &[f64]| k.solve(specs, r, damping);
                                    self.options.cg.solve(&op, q, Some(&m))?
                                }
                                None => self.options.cg.solve(&op, q, None)?,
                            },
                        };
                        Ok((x, Some(info)))
                    })
                    .collect()
            }
            Factors::Arnoldi(e) => Ok(queries.iter().map(|q| (e.solve(q, damping), None)).collect()),
            Factors::Kronecker(k) => Ok(queries.iter().map(|q| (k.solve(specs, q, damping), None)).collect()),
            Factors::Identity => Ok(queries.iter().map(|q| (q.clone(), None)).collect()),
            Factors::Projected { .. } => Err(Error::Usage(
                "the projected curvature works in the store's projected space; culprit trace and audit use it there"
                    .into(),
            )),
        }
    }
}

/// First bytes of a curvature file.
pub const CURVATURE_MAGIC: &[u8; 8] = b"CULPRITC";
/// Version of the curvature file format.
pub const CURVATURE_VERSION: u32 = 1;

/// One named f64 array in a curvature file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayInfo {
    /// Name.
    pub name: String,
    /// Shape (row-major).
    pub shape: Vec<usize>,
}

/// The JSON header of a curvature file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CurvatureHeader {
    /// SHA-256 of the run's weights.
    pub weights_sha256: String,
    /// SHA-256 of the run's data manifest.
    pub data_sha256: String,
    /// The fit's options.
    pub options: FitOptions,
    /// The objective's λ.
    pub l2: f64,
    /// Seconds the fit took.
    pub fit_seconds: f64,
    /// The arrays that follow, in order.
    pub arrays: Vec<ArrayInfo>,
    /// For the projected curvature: the key of the store it was fitted on.
    #[serde(default)]
    pub store: Option<crate::store::StoreKey>,
}

fn mat_values(m: &Mat<f64>) -> Vec<f64> {
    let (r, c) = (m.nrows(), m.ncols());
    (0..r * c).map(|k| m[(k / c, k % c)]).collect()
}

fn mat_from(values: &[f64], r: usize, c: usize) -> Mat<f64> {
    Mat::from_fn(r, c, |i, j| values[i * c + j])
}

impl Curvature {
    fn arrays(&self) -> Vec<(ArrayInfo, Vec<f64>)> {
        let info = |name: &str, shape: Vec<usize>| ArrayInfo { name: name.into(), shape };
        let kron = |k: &KroneckerFactors| {
            k.layers
                .iter()
                .enumerate()
                .flat_map(|(l, layer)| {
                    [
                        (info(&format!("q_a.{l}"), vec![layer.m, layer.m]), mat_values(&layer.q_a)),
                        (info(&format!("q_s.{l}"), vec![layer.o, layer.o]), mat_values(&layer.q_s)),
                        (info(&format!("eigenvalues.{l}"), vec![layer.m, layer.o]), layer.eigenvalues.clone()),
                    ]
                })
                .collect::<Vec<_>>()
        };
        match &self.factors {
            Factors::Dense(c) | Factors::Projected { cholesky: c, .. } => {
                let d = c.factor.nrows();
                vec![(info("cholesky", vec![d, d]), mat_values(&c.factor))]
            }
            Factors::Iterative(Some(k)) | Factors::Kronecker(k) => kron(k),
            Factors::Iterative(None) | Factors::Identity => vec![],
            Factors::Arnoldi(e) => {
                let d = e.vectors.first().map_or(0, Vec::len);
                vec![
                    (info("eigenvalues", vec![e.values.len()]), e.values.clone()),
                    (info("eigenvectors", vec![e.values.len(), d]), e.vectors.concat()),
                ]
            }
        }
    }

    /// Writes `path` atomically: magic, version, JSON header, f64 arrays, CRC-32.
    pub fn save(&self, path: &Path, weights_sha256: &str, data_sha256: &str, l2: f64) -> Result<()> {
        let arrays = self.arrays();
        let header = CurvatureHeader {
            weights_sha256: weights_sha256.into(),
            data_sha256: data_sha256.into(),
            options: self.options.clone(),
            l2,
            fit_seconds: self.fit_seconds,
            arrays: arrays.iter().map(|a| a.0.clone()).collect(),
            store: match &self.factors {
                Factors::Projected { store, .. } => Some(store.clone()),
                _ => None,
            },
        };
        let json = serde_json::to_vec(&header).expect("plain data");
        let mut out = Vec::new();
        out.extend_from_slice(CURVATURE_MAGIC);
        out.extend_from_slice(&CURVATURE_VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.resize(out.len().next_multiple_of(8), 0);
        for (_, values) in &arrays {
            values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        }
        crate::run::write_atomic(path, &out)
    }

    /// Reads and verifies a curvature file written for these weights and data.
    pub fn load(
        path: &Path,
        weights_sha256: &str,
        data_sha256: &str,
        specs: &[culprit_models::LayerSpec],
    ) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        if bytes.len() < 20 || &bytes[..8] != CURVATURE_MAGIC {
            return Err(Error::run(path, "not a culprit curvature file"));
        }
        let (body, footer) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(footer.try_into().expect("4 bytes")) {
            return Err(Error::run(path, "corrupted curvature file (CRC-32 mismatch)"));
        }
        let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        if version != CURVATURE_VERSION {
            return Err(Error::run(
                path,
                format!("curvature format version {version}; this culprit reads {CURVATURE_VERSION}"),
            ));
        }
        let len = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
        let header: CurvatureHeader = serde_json::from_slice(&body[16..16 + len])
            .map_err(|e| Error::run(path, format!("unreadable curvature header: {e}")))?;
        let mut stale = Vec::new();
        if header.weights_sha256 != weights_sha256 {
            stale.push("model (its weights differ)");
        }
        if header.data_sha256 != data_sha256 {
            stale.push("data set");
        }
        if !stale.is_empty() {
            return Err(Error::run(
                path,
                format!("stale curvature: fitted for a different {}; run `culprit fit` again", stale.join(" and ")),
            ));
        }
        let mut offset = (16 + len).next_multiple_of(8);
        let mut arrays = std::collections::HashMap::new();
        for a in &header.arrays {
            let count: usize = a.shape.iter().product();
            if offset + 8 * count > body.len() {
                return Err(Error::run(path, "truncated curvature file"));
            }
            let values: Vec<f64> = body[offset..offset + 8 * count]
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8")))
                .collect();
            offset += 8 * count;
            arrays.insert(a.name.clone(), (a.shape.clone(), values));
        }
        let mut take = |name: &str| {
            arrays.remove(name).ok_or_else(|| Error::run(path, format!("curvature file lacks array `{name}`")))
        };
        let kron = |take: &mut dyn FnMut(&str) -> Result<(Vec<usize>, Vec<f64>)>| -> Result<KroneckerFactors> {
            let mut layers = Vec::new();
            for l in 0..specs.len() {
                let (sa, qa) = take(&format!("q_a.{l}"))?;
                let (ss, qs) = take(&format!("q_s.{l}"))?;
                let (_, ev) = take(&format!("eigenvalues.{l}"))?;
                layers.push(KroneckerLayer {
                    m: sa[0],
                    o: ss[0],
                    q_a: mat_from(&qa, sa[0], sa[0]),
                    q_s: mat_from(&qs, ss[0], ss[0]),
                    eigenvalues: ev,
                });
            }
            Ok(KroneckerFactors { layers, l2: header.l2 })
        };
        let factors = match header.options.method {
            Method::Exact | Method::Ggn => {
                let (shape, values) = take("cholesky")?;
                Factors::Dense(dense::Cholesky { factor: mat_from(&values, shape[0], shape[1]) })
            }
            Method::Cg if header.options.precondition => Factors::Iterative(Some(kron(&mut take)?)),
            Method::Cg | Method::Lissa => Factors::Iterative(None),
            Method::Arnoldi => {
                let (_, values) = take("eigenvalues")?;
                let (shape, vectors) = take("eigenvectors")?;
                Factors::Arnoldi(Eigenpairs {
                    values,
                    vectors: vectors.chunks(shape[1].max(1)).map(<[f64]>::to_vec).collect(),
                })
            }
            Method::Kfac | Method::Ekfac => Factors::Kronecker(kron(&mut take)?),
            Method::Identity => Factors::Identity,
            Method::Projected => {
                let (shape, values) = take("cholesky")?;
                let store = header
                    .store
                    .clone()
                    .ok_or_else(|| Error::run(path, "projected curvature without its store key"))?;
                Factors::Projected {
                    cholesky: dense::Cholesky { factor: mat_from(&values, shape[0], shape[1]) },
                    store,
                }
            }
        };
        Ok(Self { options: header.options, factors, fit_seconds: header.fit_seconds })
    }
}

/// Where `culprit fit` stores a method's factors.
pub fn curvature_path(run_dir: &Path, method: Method) -> PathBuf {
    run_dir.join("curvature").join(format!("{}.bin", method.name()))
}
