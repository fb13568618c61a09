//! Elementary functions of tensors (exp, log, softmax, tanh, sigmoid, gelu) that are correct in
//! f64 on every backend; every model and measurement calls these, never burn's directly.
//!
//! Why: cubecl's shader compilers (WGSL and SPIR-V, behind the wgpu backend) lower exp, log, tanh,
//! erf, sin, cos and powf to the shading language's built-ins, which exist for 32-bit floats only.
//! On f64 tensors they return garbage: on Mesa's lavapipe exp(f64) gave denormals (5e-315 for
//! exp(0)), log was off by a factor 4e3 and sigmoid had f32 precision (2e-7), while +, ×, ÷, sqrt,
//! matmul, max and sums were exact (tests/gpu checks all of them). culprit's convex models train in
//! f64 and every curvature method works on the f64 objective, so on such a device these functions
//! are built from f64 arithmetic instead:
//!
//! - exp(x) = e^(n−1) · e · p(r), n = round(x) ∈ [−745, 710], r = x − n ∈ [−½, ½]: e^(n−1) from a
//!   1456-entry table computed on the host by `f64::exp`, p the degree-14 Taylor polynomial of e^r
//!   (remainder ½¹⁵/15! = 2.3e-17). Relative error a few ulp; x < −745 gives 0, x above ln(f64::MAX)
//!   = 709.78 gives ∞.
//!   Cost: one gather and about 30 elementwise operations.
//! - log(x) = y₂, two Newton steps yₖ₊₁ = yₖ + x·e^(−yₖ) − 1 from y₀ = the f32 logarithm (relative
//!   error 1e-7 squared twice): full f64 precision for x in f32's normal range [1.2e-38, 3.4e38],
//!   which holds where culprit uses it (the sum of a log-sum-exp lies in [1, classes]); log 0 = −∞.
//! - tanh(x) = t(x⁺) − t(−x⁻), t(y) = (1 − e^(−2y))/(1 + e^(−2y)) on y ≥ 0: absolute error ≤ 3e-16,
//!   derivative 1 at 0.
//! - sigmoid(x) = 1/(1 + e^(−x)).
//! - gelu(x) = ½x(1 + erf(x/√2)), erf(z) = (2/√π)·e^(−z²)·Σₙ 2ⁿz^(2n+1)/(2n+1)!! (all terms
//!   positive, no cancellation), z clamped to ±5.9 where erf is ±1 to f64, 96 terms: absolute
//!   error ≤ 1e-14 (measured 5e-15 for |x| ≤ 7), at about 200 elementwise operations per call.
//!
//! burn's derivatives of √x and x² go through powf too, so `sqrt` and `square` are here as well.
//!
//! f32 tensors, and every tensor on the CPU backends, take burn's own functions unchanged.

use burn::tensor::{DType, Device, Tensor, TensorData};

/// The range of n = round(x) in exp: x is clamped to [−745, ln(f64::MAX) = 709.78], and the table
/// holds e^(n−1) (e^710 itself overflows), multiplied by e after the polynomial.
const EXP_LOW: i32 = -745;
const EXP_HIGH: i32 = 710;
/// ln(f64::MAX): e^x is finite up to here.
const EXP_LIMIT: f64 = 709.782_712_893_384;

/// Whether burn's own f64 exp/log/tanh/erf are correct on `device`: false for the cubecl
/// backends (wgpu), whose shader compilers lower them to 32-bit built-ins. The device's `Debug`
/// text is the only public view of which backend it dispatches to in burn 0.22.
pub fn native_f64_transcendentals(device: &Device) -> bool {
    !is_cube(device)
}

/// Whether `device` dispatches to a cubecl backend (wgpu in culprit's builds).
pub(crate) fn is_cube(device: &Device) -> bool {
    format!("{device:?}").contains("Cube(")
}

/// Whether `t` needs the f64 arithmetic forms of this module.
fn emulated<const D: usize>(t: &Tensor<D>) -> bool {
    t.dtype() == DType::F64 && !native_f64_transcendentals(&t.device())
}

/// e^x elementwise.
pub fn exp<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if emulated(&x) { exp_f64(x) } else { x.exp() }
}

/// The natural logarithm elementwise.
pub fn log<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if emulated(&x) { log_f64(x) } else { x.log() }
}

/// √x elementwise, for finite x ≥ 0. burn's own forward is exact in f64 on the GPU, but its derivative is computed as
/// x^(−½)/2 with powf, which is not: here the derivative is 1/(2√x) from a division.
pub fn sqrt<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !emulated(&x) || !x.device().is_autodiff() {
        return x.sqrt();
    }
    let root = x.clone().detach().sqrt();
    // Value √x; gradient 1/(2√x) through the zero-valued x − x̄ (at x = 0 the denominator is the
    // smallest normal f64, so the value stays 0 and the derivative is huge, as it should be).
    root.clone() + (x.clone() - x.detach()) / root.mul_scalar(2.0).clamp_min(f64::MIN_POSITIVE)
}

/// x² elementwise, as x·x (burn's `square` differentiates through powf, wrong in f64 on the GPU).
pub fn square<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * x
}

/// tanh elementwise.
pub fn tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if emulated(&x) { tanh_f64(x) } else { burn::tensor::activation::tanh(x) }
}

fn tanh_f64<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    // tanh(x) = t(x⁺) − t(−x⁻), x⁺ = relu(x), x⁻ = x − x⁺, t(y) = (1 − e^(−2y))/(1 + e^(−2y)) for
    // y ≥ 0: no exponential overflows, and unlike |x|·sign(x) the derivative at 0 is 1
    // (relu'(0) = 0, so x⁻ carries it).
    let t = |y: Tensor<D>| {
        let a = exp_f64(y.mul_scalar(-2.0));
        (a.clone().neg().add_scalar(1.0)) / a.add_scalar(1.0)
    };
    let positive = burn::tensor::activation::relu(x.clone());
    let negative = x - positive.clone();
    t(positive) - t(negative.neg())
}

/// The logistic function 1/(1 + e^−x) elementwise.
pub fn sigmoid<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if emulated(&x) { sigmoid_f64(x) } else { burn::tensor::activation::sigmoid(x) }
}

fn sigmoid_f64<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    exp_f64(x.neg()).add_scalar(1.0).recip()
}

/// GELU with the exact normal CDF, x·Φ(x), elementwise.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if emulated(&x) { gelu_f64(x) } else { burn::tensor::activation::gelu(x) }
}

fn gelu_f64<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let z = x.clone().mul_scalar(std::f64::consts::FRAC_1_SQRT_2).clamp(-5.9, 5.9);
    let z2 = z.clone() * z.clone();
    let mut term = z.clone();
    let mut sum = z.clone();
    for n in 1..=96 {
        term = term * z2.clone().mul_scalar(2.0 / (2 * n + 1) as f64);
        sum = sum + term.clone();
    }
    let erf = exp_f64(z2.neg()) * sum.mul_scalar(2.0 / std::f64::consts::PI.sqrt());
    x.clone().mul_scalar(0.5) * erf.add_scalar(1.0)
}

/// log softmax along `dim`: x − max − log Σ e^(x − max).
pub fn log_softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    if emulated(&x) { log_softmax_f64(x, dim) } else { burn::tensor::activation::log_softmax(x, dim) }
}

fn log_softmax_f64<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let shifted = x.clone() - x.max_dim(dim).detach();
    shifted.clone() - log_f64(exp_f64(shifted).sum_dim(dim))
}

/// softmax along `dim`.
pub fn softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    if emulated(&x) { softmax_f64(x, dim) } else { burn::tensor::activation::softmax(x, dim) }
}

fn softmax_f64<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let e = exp_f64(x.clone() - x.max_dim(dim).detach());
    e.clone() / e.sum_dim(dim)
}

/// e^x from f64 arithmetic (module documentation).
fn exp_f64<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    let dims = x.dims();
    let numel: usize = dims.iter().product();
    let table: Vec<f64> = (EXP_LOW..=EXP_HIGH).map(|n| f64::from(n - 1).exp()).collect();
    let table =
        Tensor::<1>::from_data(TensorData::new(table, [(EXP_HIGH - EXP_LOW + 1) as usize]), (&device, DType::F64));
    let clamped = x.clone().clamp(f64::from(EXP_LOW), EXP_LIMIT);
    // n = round(x) in f32 (exact for |n| ≤ 745; a neighbour of the nearest integer only moves r to
    // ±(½ + 5e-5)); no gradient flows through n.
    let n = clamped.clone().detach().cast(DType::F32).round();
    let index = n.clone().add_scalar(f64::from(-EXP_LOW)).int().reshape([numel]);
    let scale = table.select(0, index).reshape(dims);
    let r = clamped - n.cast(DType::F64);
    // Horner: p(r) = Σ_{k ≤ 14} r^k/k!, coefficients from the top.
    let mut p = r.clone().mul_scalar(1.0 / factorial(14)).add_scalar(1.0 / factorial(13));
    for k in (0..13).rev() {
        p = (p * r.clone()).add_scalar(1.0 / factorial(k));
    }
    let out = p.mul_scalar(std::f64::consts::E) * scale;
    // Beyond the clamp: e^x = ∞ above, NaN stays NaN.
    let overflow = x.clone().greater_elem(EXP_LIMIT);
    let out = out.mask_fill(overflow, f64::INFINITY);
    let nan = x.clone().is_nan();
    out.mask_where(nan, x)
}

/// The natural logarithm from f64 arithmetic (module documentation).
fn log_f64<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let mut y = x.clone().detach().cast(DType::F32).log().cast(DType::F64);
    for _ in 0..2 {
        y = y.clone() + x.clone() * exp_f64(y.neg()) - 1.0;
    }
    let zero = x.clone().equal_elem(0.0);
    y.mask_fill(zero, f64::NEG_INFINITY)
}

fn factorial(k: u32) -> f64 {
    (1..=k).map(f64::from).product()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: &[f64]) -> Tensor<2> {
        Tensor::<2>::from_data(TensorData::new(values.to_vec(), [values.len() / 4, 4]), (&Device::flex(), DType::F64))
    }

    fn read(t: Tensor<2>) -> Vec<f64> {
        t.into_data().try_to_vec::<f64>().unwrap()
    }

    /// Largest |got − want| / max(|want|, floor).
    fn worst(got: Tensor<2>, want: Tensor<2>, floor: f64) -> f64 {
        read(got).iter().zip(read(want)).map(|(g, w)| (g - w).abs() / w.abs().max(floor)).fold(0.0, f64::max)
    }

    /// The f64 arithmetic forms against burn's CPU functions (exact in f64), on the CPU backend
    /// where they are not chosen by default; tests/gpu runs them where they are.
    #[test]
    fn arithmetic_forms_match_the_cpu_functions_within_a_few_ulp() {
        let xs: Vec<f64> = (-400..400).map(|k| f64::from(k) * 0.0173 + 1e-3).collect();
        let x = || tensor(&xs);
        let wide = || x().mul_scalar(100.0);
        let e = worst(exp_f64(wide()), wide().exp(), 0.0);
        assert!(e < 2e-15, "exp_f64: {e:e}");
        let e = worst(log_f64(x().abs().mul_scalar(1e3)), x().abs().mul_scalar(1e3).log(), 0.0);
        assert!(e < 1e-15, "log_f64: {e:e}");
        let e = worst(tanh_f64(x()), x().tanh(), 1.0);
        assert!(e < 1e-15, "tanh_f64: {e:e}");
        let e = worst(sigmoid_f64(wide()), burn::tensor::activation::sigmoid(wide()), 1e-300);
        assert!(e < 1e-14, "sigmoid_f64: {e:e}");
        let e = worst(gelu_f64(x()), burn::tensor::activation::gelu(x()), 1.0);
        assert!(e < 1e-14, "gelu_f64: {e:e}");
        let e = worst(log_softmax_f64(wide(), 1), burn::tensor::activation::log_softmax(wide(), 1), 1.0);
        assert!(e < 1e-14, "log_softmax_f64: {e:e}");
        let e = worst(softmax_f64(wide(), 1), burn::tensor::activation::softmax(wide(), 1), 1e-300);
        assert!(e < 1e-13, "softmax_f64: {e:e}");
        let e = read(exp_f64(tensor(&[-1e4, 710.0, f64::NAN, f64::NEG_INFINITY, 709.2, 709.7, 709.78, -700.3])));
        assert!(e[0] < 1e-300 && e[1] == f64::INFINITY && e[2].is_nan() && e[3] < 1e-300, "{e:?}");
        for (got, x) in e[4..].iter().zip([709.2f64, 709.7, 709.78, -700.3]) {
            assert!((got - x.exp()).abs() <= 4.0 * f64::EPSILON * x.exp(), "exp({x}): {got} vs {}", x.exp());
        }
        assert_eq!(read(log_f64(tensor(&[0.0, 1.0, 2.0, 4.0])))[0], f64::NEG_INFINITY);
    }

    /// Gradients through the arithmetic forms equal the derivatives of the functions.
    #[test]
    fn arithmetic_forms_differentiate_correctly() {
        let device = Device::flex().autodiff();
        let mut xs: Vec<f64> = (-20..20).map(|k| f64::from(k) * 0.31 + 0.05).collect();
        xs[0] = 0.0;
        let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [10, 4]), (&device, DType::F64)).require_grad();
        // log |x| + 1 (finite at 0), √(x² + 1): the derivatives at x = 0 are defined.
        let y = exp_f64(x.clone()).sum()
            + log_f64(x.clone().abs().add_scalar(1.0)).sum()
            + tanh_f64(x.clone()).sum()
            + sqrt(square(x.clone()).add_scalar(1.0)).sum();
        let g = x.grad(&y.backward()).unwrap().into_data().try_to_vec::<f64>().unwrap();
        for (g, x) in g.iter().zip(&xs) {
            let want = x.exp() + x.signum() * f64::from(u8::from(*x != 0.0)) / (x.abs() + 1.0) + 1.0 - x.tanh().powi(2)
                + x / (x * x + 1.0).sqrt();
            assert!((g - want).abs() < 1e-13 * want.abs().max(1.0), "x = {x}: {g} vs {want}");
        }
    }
}
