//! The registry of curvature methods: one line per method.
//!
//! Each line names the method's `--curvature` value, its variant of [`Method`] and the type (in
//! its own file here) that implements [`CurvatureMethod`]. The macro declares the module,
//! derives [`Method`] (a `clap::ValueEnum`, with the line's doc comment as its help), gathers
//! every method's parameters into [`MethodParams`] (the flags of `culprit fit`), and dispatches
//! fitting and loading. Adding a method is one new file and one line below.

use serde::{Deserialize, Serialize};

use super::{CurvatureMethod, FitContext, Fitted, LoadContext};
use crate::error::Result;
use crate::io::container::Arrays;

macro_rules! registry {
    ($( $(#[doc = $doc:literal])* $variant:ident = $name:literal => $module:ident :: $ty:ident, )*) => {
        $( pub mod $module; )*

        /// A curvature method (`--curvature`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
        pub enum Method {
            $( $(#[doc = $doc])* #[serde(rename = $name)] #[value(name = $name)] $variant, )*
        }

        impl Method {
            /// Every registered method.
            pub const ALL: &'static [Method] = &[$(Method::$variant),*];

            /// The CLI name.
            pub fn name(self) -> &'static str {
                match self {
                    $( Method::$variant => $name, )*
                }
            }
        }

        /// Every method's own parameters: the method-specific flags of `culprit fit`.
        #[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
        #[group(skip)]
        pub struct MethodParams {
            $(
                #[allow(missing_docs)]
                #[command(flatten)]
                #[serde(default)]
                pub $module: <$module::$ty as CurvatureMethod>::Params,
            )*
        }

        impl MethodParams {
            /// Fits `method` with its parameters.
            pub(super) fn fit(&self, method: Method, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
                match method {
                    $( Method::$variant => <$module::$ty as CurvatureMethod>::fit(&self.$module, ctx), )*
                }
            }

            /// Loads what `method` fitted.
            pub(super) fn load(
                &self,
                method: Method,
                arrays: &mut Arrays,
                ctx: &LoadContext<'_>,
            ) -> Result<Box<dyn Fitted>> {
                match method {
                    $( Method::$variant => <$module::$ty as CurvatureMethod>::load(&self.$module, arrays, ctx), )*
                }
            }
        }
    };
}

registry! {
    /// Dense Hessian (closed form for logistic regression, else finite-difference columns), Cholesky.
    Exact = "exact" => exact::Exact,
    /// Dense Gauss–Newton matrix from per-class gradients, Cholesky.
    Ggn = "ggn" => ggn::Ggn,
    /// Conjugate gradient on exact Gauss–Newton products (optionally EK-FAC-preconditioned).
    Cg = "cg" => cg::Cg,
    /// LiSSA: a Neumann series on Gauss–Newton products.
    Lissa = "lissa" => lissa::Lissa,
    /// The top eigenpairs of the Gauss–Newton matrix (Arnoldi).
    Arnoldi = "arnoldi" => arnoldi::Arnoldi,
    /// K-FAC: Kronecker-factored Gauss–Newton blocks.
    Kfac = "kfac" => kfac::Kfac,
    /// EK-FAC: K-FAC's eigenbasis with re-fitted eigenvalues.
    Ekfac = "ekfac" => ekfac::Ekfac,
    /// The diagonal of the true Fisher.
    Diagonal = "diagonal" => diagonal::Diagonal,
    /// H = I: gradient dot products.
    Identity = "identity" => identity::Identity,
    /// TRAK-style (1/n)ΦᵀΦ + (λ+δ)I in a projected store's space.
    Projected = "projected" => projected::Projected,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = crate::error::Error;

    fn from_str(name: &str) -> Result<Self> {
        Method::ALL.iter().copied().find(|m| m.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
            crate::error::Error::Usage(format!("unknown curvature `{name}` (expected {})", names.join(", ")))
        })
    }
}
