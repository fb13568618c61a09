//! Kronecker projection of per-example (a, δ) pairs on the GPU (cache step, `kron:KINxKOUT`
//! stores; LoGra, Choe et al. 2024).
//!
//! For one example, with aₜ the layer's input at position t (augmented by a constant 1 for the
//! bias), δₜ its output gradient and P_in (m × k_in), P_out (o × k_out) the projections, the row
//! is the projected gradient
//!
//! G̃ = P_inᵀ (Σₜ aₜ δₜᵀ) P_out = Σₜ ãₜ δ̃ₜᵀ,  ãₜ = P_inᵀ aₜ,  δ̃ₜ = P_outᵀ δₜ  (k_in × k_out).
//!
//! The plain-burn route projects both factors of the whole batch (two batched matmuls writing
//! B·L·(k_in + k_out) values) and then multiplies them (a third). The kernel does it in one
//! launch: one cube per example (or per up to 16 examples, when an example has at most four
//! positions and would leave most of the cube's 256 units idle) takes the positions in chunks,
//! projects a chunk's ãₜ and δ̃ₜ into shared memory (a unit takes one column of P and four
//! consecutive positions at a time, so each P value read serves four multiply-adds) and adds the
//! chunk's outer products to the k_in·k_out cells of the rows it owns, so nothing but the rows is
//! written to device memory. A side whose
//! projection is the identity (k at least the dimension) is read as is.
//!
//! Which route `cache` takes is measured, not assumed: [`kron_project_tuned`] times both on the
//! first batch of each layer shape and keeps the faster. On lavapipe (a CPU) burn's autotuned,
//! vectorised matmuls win by 5–6× (README); a real GPU has not run it yet.
//!
//! Cost per example: L·(m·k_in + o·k_out) multiply-adds for the projections and L·k_in·k_out for
//! the outer products, as the plain route; device memory traffic B·(m + o)·L·4 bytes read and
//! B·k_in·k_out·4 written (plus ⌈L/C⌉ rereads of the row for chunks of C positions).
//! Tolerance: f32 accumulation in a different order from burn's matmuls; the comparison test
//! allows 1e-5 of the largest value.
//!
//! burn sees the kernel through the backend-extension route ([`KroneckerProjectionBackend`],
//! implemented for `CubeBackend` and, lazily, for burn's fusion wrapper around it), so the
//! tensors never leave the device.

use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use cubecl::prelude::*;

/// Units per cube.
const UNITS: usize = 256;

/// Shared memory the chunk's projected factors may use, in f32 values (12 KiB: below the 16 KiB
/// every wgpu adapter offers a workgroup).
const SHARED_VALUES: usize = 3072;

/// The largest k_in + k_out the kernel takes (a chunk of one position must fit in shared memory).
pub const MAX_FACTOR_LEN: usize = SHARED_VALUES;

/// The projected gradients of `examples` consecutive examples per cube (module docs; more than
/// one only when an example has too few positions to keep the cube's units busy). `input` is
/// `[batch, inputs, L]`, `output_grad` `[batch, outputs, L]`, `p_in` `inputs × k_in`, `p_bias`
/// the bias row `k_in` (read only with `bias`), `p_out` `outputs × k_out`; `out`
/// `[batch, k_in·k_out]`. Without `project_in` the input side is the identity (k_in = inputs,
/// plus 1 with `bias`), likewise `project_out`. Shared memory: `a_values` = examples·chunk·k_in
/// and `d_values` = examples·chunk·k_out.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn kron_project_kernel(
    input: &[f32],
    output_grad: &[f32],
    p_in: &[f32],
    p_bias: &[f32],
    p_out: &[f32],
    out: &mut [f32],
    batch: u32,
    inputs: u32,
    outputs: u32,
    positions: u32,
    #[comptime] k_in: usize,
    #[comptime] k_out: usize,
    #[comptime] examples: usize,
    #[comptime] chunk: usize,
    #[comptime] a_values: usize,
    #[comptime] d_values: usize,
    #[comptime] bias: bool,
    #[comptime] project_in: bool,
    #[comptime] project_out: bool,
) {
    let first = CUBE_POS_X as usize * examples;
    let mut count = batch as usize - first;
    if count > examples {
        count = examples;
    }
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let l = positions as usize;
    let cells = k_in * k_out;
    let mut sa = Shared::<[f32]>::new_slice(a_values);
    let mut sd = Shared::<[f32]>::new_slice(d_values);
    let mut t0 = 0usize;
    while t0 < l {
        let mut c = l - t0;
        if c > chunk {
            c = chunk;
        }
        // ãₜ and δ̃ₜ of the chunk's positions: sa[(e·c + t)·k_in + k], sd[(e·c + t)·k_out + k].
        let a_side = Side { first, count, features: inputs as usize, positions: l, t0, c, unit, units };
        project_positions(input, p_in, p_bias, &mut sa, a_side, k_in, bias, project_in);
        let d_side = Side { first, count, features: outputs as usize, positions: l, t0, c, unit, units };
        project_positions(output_grad, p_out, p_bias, &mut sd, d_side, k_out, false, project_out);
        sync_cube();
        let mut cell = unit;
        while cell < count * cells {
            let e = cell / cells;
            let i = (cell % cells) / k_out;
            let j = cell % k_out;
            let mut acc = 0.0f32;
            for t in 0..c {
                acc += sa[(e * c + t) * k_in + i] * sd[(e * c + t) * k_out + j];
            }
            let at = first * cells + cell;
            if t0 == 0 {
                out[at] = acc;
            } else {
                out[at] += acc;
            }
            cell += units;
        }
        sync_cube();
        t0 += chunk;
    }
}

/// Where one side's chunk lies: the cube's examples first..first + count, each a `[features,
/// positions]` slab of the source, and the chunk's positions t0..t0 + c; the unit and how many
/// units share the work.
#[derive(CubeType, Clone, Copy)]
struct Side {
    first: usize,
    count: usize,
    features: usize,
    positions: usize,
    t0: usize,
    c: usize,
    unit: usize,
    units: usize,
}

/// One side's projected factors for a chunk of positions of the cube's examples into `dst`
/// (dst[(e·c + t)·k + j]). A work item is one example, one column j of P and four consecutive
/// positions, so each P value read serves four multiply-adds and the four source reads are
/// contiguous (positions are the source's inner dimension); positions past the chunk reread its
/// last one and are not stored. Without `project` the side is the identity (the source itself,
/// then the bias's constant 1 where `bias`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn project_positions(
    src: &[f32],
    p: &[f32],
    p_bias: &[f32],
    dst: &mut Shared<[f32]>,
    side: Side,
    #[comptime] k: usize,
    #[comptime] bias: bool,
    #[comptime] project: bool,
) {
    let c = side.c;
    let groups = c.div_ceil(4);
    let mut item = side.unit;
    while item < side.count * groups * k {
        let e = item / (groups * k);
        let t = ((item / k) % groups) * 4;
        let j = item % k;
        let base = (side.first + e) * side.features * side.positions + side.t0;
        let mut t1 = t + 1;
        if t1 >= c {
            t1 = c - 1;
        }
        let mut t2 = t + 2;
        if t2 >= c {
            t2 = c - 1;
        }
        let mut t3 = t + 3;
        if t3 >= c {
            t3 = c - 1;
        }
        let mut v0 = 0.0f32;
        let mut v1 = 0.0f32;
        let mut v2 = 0.0f32;
        let mut v3 = 0.0f32;
        if project {
            for i in 0..side.features {
                let w = p[i * k + j];
                let row = base + i * side.positions;
                v0 += src[row + t] * w;
                v1 += src[row + t1] * w;
                v2 += src[row + t2] * w;
                v3 += src[row + t3] * w;
            }
            if bias {
                let w = p_bias[j];
                v0 += w;
                v1 += w;
                v2 += w;
                v3 += w;
            }
        } else {
            if j < side.features {
                let row = base + j * side.positions;
                v0 = src[row + t];
                v1 = src[row + t1];
                v2 = src[row + t2];
                v3 = src[row + t3];
            } else {
                v0 = 1.0f32;
                v1 = 1.0f32;
                v2 = 1.0f32;
                v3 = 1.0f32;
            }
        }
        let at = e * c;
        dst[(at + t) * k + j] = v0;
        if t + 1 < c {
            dst[(at + t + 1) * k + j] = v1;
        }
        if t + 2 < c {
            dst[(at + t + 2) * k + j] = v2;
        }
        if t + 3 < c {
            dst[(at + t + 3) * k + j] = v3;
        }
        item += side.units;
    }
}

/// The output's shape, `[batch, k_in·k_out]`.
fn projected_shape(input: &Shape, k_in: &usize, k_out: &usize) -> Shape {
    Shape::from([input[0], k_in * k_out])
}

/// burn's view of the kernel: implemented for `CubeBackend` (the launch) and, generated here,
/// for burn's fusion wrapper (a lazy custom operation) and for `Dispatch` (routing by device).
/// Values only: the operation has no backward.
#[backend_extension(Cube: cfg(feature = "gpu"), Fusion: cfg(feature = "gpu"))]
pub trait KroneckerProjectionBackend: Backend {
    /// Rows `[batch, k_in·k_out]` of Σₜ (P_inᵀaₜ)(P_outᵀδₜ)ᵀ (module docs). `p_in`, `p_bias` and
    /// `p_out` are read only when `project_in`, `bias && project_in` and `project_out` say so
    /// (pass any tensor otherwise).
    #[fusion(dtype = input, shape = projected_shape(input, k_in, k_out))]
    #[allow(clippy::too_many_arguments)]
    fn kron_project(
        input: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        p_in: FloatTensor<Self>,
        p_bias: FloatTensor<Self>,
        p_out: FloatTensor<Self>,
        k_in: usize,
        k_out: usize,
        bias: bool,
        project_in: bool,
        project_out: bool,
    ) -> FloatTensor<Self>;
}

impl KroneckerProjectionBackend for CubeBackend {
    fn kron_project(
        input: CubeTensor,
        output_grad: CubeTensor,
        p_in: CubeTensor,
        p_bias: CubeTensor,
        p_out: CubeTensor,
        k_in: usize,
        k_out: usize,
        bias: bool,
        project_in: bool,
        project_out: bool,
    ) -> CubeTensor {
        use burn_cubecl::kernel::into_contiguous;
        let [b, m, l] = dims3(&input);
        let [b2, o, l2] = dims3(&output_grad);
        assert!(b == b2 && l == l2, "inputs and output gradients of different batches or positions");
        assert!(k_in + k_out <= MAX_FACTOR_LEN, "k_in + k_out = {} exceeds {MAX_FACTOR_LEN}", k_in + k_out);
        assert!(
            project_in || k_in == m + usize::from(bias),
            "an identity input side has k_in = inputs (+1 for the bias)"
        );
        assert!(project_out || k_out == o, "an identity output side has k_out = outputs");
        let [input, output_grad, p_in, p_bias, p_out] =
            [input, output_grad, p_in, p_bias, p_out].map(|t| into_contiguous(t));
        for t in [&input, &output_grad, &p_in, &p_bias, &p_out] {
            assert_eq!(t.dtype, DType::F32, "the Kronecker projection kernel reads f32");
        }
        if project_in {
            assert_eq!(p_in.meta.shape().num_elements(), m * k_in, "P_in is inputs × k_in");
            assert!(!bias || p_bias.meta.shape().num_elements() == k_in, "the bias row has k_in values");
        }
        if project_out {
            assert_eq!(p_out.meta.shape().num_elements(), o * k_out, "P_out is outputs × k_out");
        }
        let client = input.client.clone();
        let device = input.device.clone();
        let cells = k_in * k_out;
        let handle = client.empty(b * cells * size_of::<f32>());
        let out = CubeTensor::new_contiguous(client.clone(), device, Shape::from([b, cells]), handle, DType::F32);
        if b == 0 || cells == 0 {
            return out;
        }
        let (examples, chunk) = cube_shape(l, k_in, k_out);
        let len = |t: &CubeTensor| t.meta.shape().num_elements();
        // SAFETY: the kernel reads input[(e·m + i)·l + t] and output_grad[(e·o + i)·l + t] for
        // e < b, i < m (o), t < l; P_in, the bias row and P_out within the sizes checked above, and
        // only where their flags say; it writes out[e·cells + c] for e < b, c < cells; shared
        // memory examples·chunk·k_in and examples·chunk·k_out values.
        unsafe {
            kron_project_kernel::launch_unchecked(
                &client,
                CubeCount::Static(b.div_ceil(examples) as u32, 1, 1),
                CubeDim::new_1d(UNITS as u32),
                BufferArg::from_raw_parts(input.handle.clone(), len(&input)),
                BufferArg::from_raw_parts(output_grad.handle.clone(), len(&output_grad)),
                BufferArg::from_raw_parts(p_in.handle.clone(), len(&p_in)),
                BufferArg::from_raw_parts(p_bias.handle.clone(), len(&p_bias)),
                BufferArg::from_raw_parts(p_out.handle.clone(), len(&p_out)),
                BufferArg::from_raw_parts(out.handle.clone(), b * cells),
                b as u32,
                m as u32,
                o as u32,
                l as u32,
                k_in,
                k_out,
                examples,
                chunk,
                examples * chunk * k_in,
                examples * chunk * k_out,
                bias,
                project_in,
                project_out,
            );
        }
        out
    }
}

/// (examples a cube, positions a chunk) for L positions: several examples a cube where one has
/// too few positions to keep its units busy (four positions make one work item per column of
/// P), then as many positions a chunk as shared memory holds. The chunk is not clamped to L: the
/// kernel stops at the last position by itself, and one shader then serves every sequence length
/// above four (batches of documents vary in length).
fn cube_shape(l: usize, k_in: usize, k_out: usize) -> (usize, usize) {
    let examples = if l <= 4 { (UNITS / k_in.max(k_out)).clamp(1, 16) } else { 1 };
    let examples = examples.min((SHARED_VALUES / (l.max(1) * (k_in + k_out))).max(1));
    (examples, (SHARED_VALUES / (examples * (k_in + k_out))).max(1))
}

fn dims3(t: &CubeTensor) -> [usize; 3] {
    let shape = t.meta.shape();
    assert_eq!(shape.num_dims(), 3, "factors are [batch, features, positions]");
    [shape[0], shape[1], shape[2]]
}

/// One layer's projections as the engine keeps them: P_in split into its input rows and its bias
/// row (`None`: the input side is exact), P_out (`None`: exact).
pub struct KroneckerSides<'a> {
    /// P_in's input rows (`inputs × k_in`) and, for a layer with a bias, its bias row (`1 × k_in`).
    pub p_in: Option<(&'a Tensor<2>, Option<&'a Tensor<2>>)>,
    /// P_out (`outputs × k_out`).
    pub p_out: Option<&'a Tensor<2>>,
    /// Whether the layer has a bias (a constant-1 input).
    pub bias: bool,
}

/// The rows `[batch, k_in·k_out]` of Σₜ ãₜ δ̃ₜᵀ for a layer's inputs `[batch, inputs, L]` and
/// output gradients `[batch, outputs, L]`, by the kernel, where it applies: f32 tensors on a
/// wgpu device (a cubecl one), k_in + k_out ≤ [`MAX_FACTOR_LEN`]. `None` otherwise: the caller
/// takes the plain route. The tensors lose their autodiff association (values only).
pub fn kron_project(input: &Tensor<3>, output_grad: &Tensor<3>, sides: &KroneckerSides) -> Option<Tensor<2>> {
    let (k_in, k_out) = kernel_widths(input, output_grad, sides)?;
    let plain = |t: &Tensor<2>| t.clone().inner().into_dispatch();
    let placeholder = || input.clone().inner().into_dispatch();
    let (p_in, p_bias) = match sides.p_in {
        Some((w, b)) => (plain(w), b.map_or_else(placeholder, plain)),
        None => (placeholder(), placeholder()),
    };
    let p_out = sides.p_out.map_or_else(placeholder, plain);
    let out = <Dispatch as KroneckerProjectionBackend>::kron_project(
        input.clone().inner().into_dispatch(),
        output_grad.clone().inner().into_dispatch(),
        p_in,
        p_bias,
        p_out,
        k_in,
        k_out,
        // An exact input side appends the bias's 1 by itself; a projected one adds the bias row.
        match sides.p_in {
            Some((_, row)) => row.is_some(),
            None => sides.bias,
        },
        sides.p_in.is_some(),
        sides.p_out.is_some(),
    );
    Some(Tensor::<2>::from_dispatch(out))
}

/// (k_in, k_out) of the layer's projected factors where [`kron_project`] takes these tensors: f32
/// on a cubecl (wgpu) device, k_in + k_out ≤ [`MAX_FACTOR_LEN`], and at least one position (with
/// none the rows are zeros, which the plain route gives); `None` otherwise.
fn kernel_widths(input: &Tensor<3>, output_grad: &Tensor<3>, sides: &KroneckerSides) -> Option<(usize, usize)> {
    let [_, m, positions] = input.dims();
    let [_, o, _] = output_grad.dims();
    let k_in = sides.p_in.map_or(m + usize::from(sides.bias), |(w, _)| w.dims()[1]);
    let k_out = sides.p_out.map_or(o, |p| p.dims()[1]);
    let on_cube = format!("{:?}", input.device()).contains("Cube(");
    let all_f32 = [input.dtype(), output_grad.dtype()].iter().all(|d| *d == DType::F32)
        && sides.p_in.is_none_or(|(w, b)| w.dtype() == DType::F32 && b.is_none_or(|b| b.dtype() == DType::F32))
        && sides.p_out.is_none_or(|p| p.dtype() == DType::F32);
    (on_cube && all_f32 && k_in + k_out <= MAX_FACTOR_LEN && positions > 0).then_some((k_in, k_out))
}

/// Which route projects a layer of one shape faster on one device: the fused kernel (`true`) or
/// burn's three matmuls, keyed by (device, inputs, outputs, positions rounded up to a power of two
/// (batches of documents vary in length), k_in, k_out, sides).
type RouteKey = (String, [usize; 5], [bool; 3]);
static FASTER_ROUTE: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<RouteKey, bool>>> =
    std::sync::LazyLock::new(Default::default);

/// The routes chosen so far (a poisoned lock still holds valid choices).
fn faster_route() -> std::sync::MutexGuard<'static, std::collections::HashMap<RouteKey, bool>> {
    FASTER_ROUTE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The route [`kron_project_tuned`] chose for each shape it has seen, as (inputs, outputs,
/// positions rounded up to a power of two, k_in, k_out, fused).
pub fn tuned_routes() -> Vec<(usize, usize, usize, usize, usize, bool)> {
    let mut out: Vec<_> =
        faster_route().iter().map(|((_, [m, o, l, ki, ko], _), fused)| (*m, *o, *l, *ki, *ko, *fused)).collect();
    out.sort_unstable();
    out
}

/// [`kron_project`] or the plain-burn route, whichever ran faster for this layer shape on this
/// device (burn's autotune, applied to the choice between the two): the first call for a shape
/// runs each route twice and times the second run (the first pays shader compilation and burn's
/// own matmul autotune), then keeps the faster; later calls take it directly. `None` where the
/// kernel does not apply (see [`kron_project`]); the caller then takes the plain route itself.
/// The first call for a shape costs four projections instead of one. `CULPRIT_KRON_PROJECTION`
/// = `fused` or `matmul` takes that route without timing (tests use it to run each route inside
/// `cache`); anything else, or unset, times.
pub fn kron_project_tuned(input: &Tensor<3>, output_grad: &Tensor<3>, sides: &KroneckerSides) -> Option<Tensor<2>> {
    let (k_in, k_out) = kernel_widths(input, output_grad, sides)?;
    let [_, m, l] = input.dims();
    let [_, o, _] = output_grad.dims();
    let key: RouteKey = (
        format!("{:?}", input.device()),
        [m, o, l.next_power_of_two(), k_in, k_out],
        [sides.bias, sides.p_in.is_some(), sides.p_out.is_some()],
    );
    match std::env::var("CULPRIT_KRON_PROJECTION").as_deref() {
        Ok("fused") => return kron_project(input, output_grad, sides),
        Ok("matmul") => return Some(reference_kron_project(input, output_grad, sides)),
        _ => {}
    }
    let known = faster_route().get(&key).copied();
    match known {
        Some(true) => kron_project(input, output_grad, sides),
        Some(false) => Some(reference_kron_project(input, output_grad, sides)),
        None => {
            // Timed between device syncs (burn's `into_data` reads lazily: it does not wait).
            let device = input.device();
            let timed = |run: &dyn Fn() -> Tensor<2>| {
                let _ = device.sync();
                let started = std::time::Instant::now();
                let out = run();
                let _ = device.sync();
                (started.elapsed(), out)
            };
            let fused = || kron_project(input, output_grad, sides).expect("the kernel applies (checked above)");
            let plain = || reference_kron_project(input, output_grad, sides);
            timed(&fused);
            let (fused_time, fused_out) = timed(&fused);
            timed(&plain);
            let (plain_time, plain_out) = timed(&plain);
            let take_fused = fused_time < plain_time;
            faster_route().insert(key, take_fused);
            Some(if take_fused { fused_out } else { plain_out })
        }
    }
}

/// The plain-burn route, and the kernel's reference: ã = P_inᵀa (+ the bias row) and δ̃ = P_outᵀδ
/// by two batched matmuls, then Σₜ ãₜδ̃ₜᵀ by a third, on the tensors' device. An exact input side appends the
/// constant 1 for the bias.
pub fn reference_kron_project(input: &Tensor<3>, output_grad: &Tensor<3>, sides: &KroneckerSides) -> Tensor<2> {
    let [b, _, l] = input.dims();
    let a = input.clone().swap_dims(1, 2);
    let pa = match sides.p_in {
        Some((w, bias)) => {
            let [m, k] = w.dims();
            let mut pa = a.matmul(w.clone().reshape([1, m, k]));
            if let Some(row) = bias {
                pa = pa + row.clone().reshape([1, 1, k]);
            }
            pa
        }
        None if sides.bias => {
            let ones = Tensor::ones([b, l, 1], (&a.device(), a.dtype()));
            Tensor::cat(vec![a, ones], 2)
        }
        None => a,
    };
    let d = output_grad.clone().swap_dims(1, 2);
    let pd = match sides.p_out {
        Some(p) => {
            let [o, k] = p.dims();
            d.matmul(p.clone().reshape([1, o, k]))
        }
        None => d,
    };
    let [_, _, k_in] = pa.dims();
    let [_, _, k_out] = pd.dims();
    pa.swap_dims(1, 2).matmul(pd).reshape([b, k_in * k_out])
}
