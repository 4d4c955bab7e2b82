//! Swin window attention `softmax((q·scale)·kᵀ + bias + mask)·v` as one autograd op.
//!
//! Why one op: built from tensor ops, every `n×n` intermediate (logits, the biased and masked
//! logits, the probabilities, their gradients) is a graph node, and Candle's backward zero-fills
//! and adds a gradient buffer per node — at f24 64³ that is ~44 M floats per node in the first
//! stage. Here the graph holds one node and no `n×n` tensor at all: as in flash attention, the
//! backward recomputes each (window, head)'s probabilities from q, k, the bias and the mask (bit
//! for bit those of the forward: the same calls on the same inputs) instead of keeping them
//! (they were 0.5 GB per Swin block of the first stage at f48 96³). The relative-position bias
//! gradient comes out `[h,n,n]` (summed over windows in a fixed order), not `[nW,h,n,n]`.
//!
//! On CPU (f32/f64) each (window, head) is a few single-threaded gemm calls on strided views of
//! the tokens, with the softmax and its gradient in vector loops as in [`super::softmax_cpu`];
//! elsewhere the same formula is composed from tensor ops.

use std::mem::MaybeUninit;

use candle_core::{DType, Result, Tensor, D};

use super::carried::{attach2, Backward2};
use super::cpu_data::with_slice;
use super::fused;
use super::matmul::matmul as mm;
use super::ops::softmax_last;
use super::softmax_cpu::{dispatch, dot, softmax_row_into, Real};
use super::SyncPtr;

/// Shapes of one attention call: `t = Bw·h` (window, head) tasks of `n` tokens, head dim `hd`,
/// `nw` mask windows (1 without a mask).
#[derive(Clone, Copy, Debug)]
struct Dims {
    bw: usize,
    h: usize,
    n: usize,
    hd: usize,
    nw: usize,
}

impl Dims {
    fn tasks(&self) -> usize {
        self.bw * self.h
    }
    /// Channels per token (`h·hd`).
    fn c(&self) -> usize {
        self.h * self.hd
    }
}

/// Window attention: qkv `[Bw,n,3,h,hd]` (MONAI's `qkv` linear output `[Bw,n,3C]` as it is,
/// unscaled), bias `[h,n,n]`, mask `[nW,n,n]` for shifted windows (window `b` uses
/// `mask[b % nW]`, as MONAI's `view(B // nW, nW, …)`), `scale` = hd^-½ → `[Bw,n,h,hd]` (the
/// input of MONAI's `proj` once reshaped to `[Bw,n,C]`). MONAI's order of operations:
/// `q·scale`, `q·kᵀ`, `+ bias`, `+ mask`, softmax, `·v`. Reading and writing the tokens' own
/// layout spares the two permuted copies MONAI makes.
pub fn window_attention(
    qkv: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (bw, n, three, h, hd) = qkv.dims5()?;
    let nw = mask.map(|m| m.dim(0)).transpose()?.unwrap_or(1);
    let mask_ok = mask.is_none_or(|m| m.dims() == [nw, n, n] && bw % nw == 0);
    if three != 3 || bias.dims() != [h, n, n] || !mask_ok {
        candle_core::bail!(
            "window_attention: qkv {:?}, bias {:?} and mask {:?} do not fit",
            qkv.dims(),
            bias.dims(),
            mask.map(|m| m.dims())
        );
    }
    let dims = Dims { bw, h, n, hd, nw };
    let same = |t: &Tensor| fused::applies(t) && t.dtype() == qkv.dtype();
    if !(same(qkv) && same(bias) && mask.is_none_or(same)) {
        return generic(qkv, bias, mask, scale, dims);
    }
    let (qkv, bias) = (qkv.contiguous()?, bias.contiguous()?);
    let mask = mask.map(|m| m.contiguous()).transpose()?;
    let tracked = qkv.track_op() || bias.track_op();
    let out = match qkv.dtype() {
        DType::F32 => forward_t::<f32>(&qkv, &bias, mask.as_ref(), scale, dims)?,
        _ => forward_t::<f64>(&qkv, &bias, mask.as_ref(), scale, dims)?,
    };
    if !tracked {
        return Ok(out);
    }
    attach2(
        &qkv,
        &bias,
        out,
        WindowAttentionBackward { mask, scale, dims },
    )
}

/// q·scale, k and v of qkv `[Bw,n,3,h,hd]`, each `[Bw,h,n,hd]` and packed (`get` copies a
/// strided slice; cuBLAS would not multiply a view whose rows lie `3·h·hd` apart).
fn split_qkv(qkv: &Tensor, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
    // [Bw,n,3,h,hd] -> [3,Bw,h,n,hd]
    let qkv = qkv.permute((2, 0, 3, 1, 4))?;
    Ok(((qkv.get(0)? * scale)?, qkv.get(1)?, qkv.get(2)?))
}

/// `softmax(q'·kᵀ + bias + mask)` `[Bw,h,n,n]` from tensor ops, q' = q·scale.
fn probs_composite(
    q: &Tensor,
    k: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    d: Dims,
) -> Result<Tensor> {
    let z = mm(q, &k.t()?)?.broadcast_add(bias)?;
    let z = match mask {
        Some(m) => z
            .reshape((d.bw / d.nw, d.nw, d.h, d.n, d.n))?
            .broadcast_add(&m.unsqueeze(1)?)?
            .reshape((d.bw, d.h, d.n, d.n))?,
        None => z,
    };
    softmax_last(&z)
}

/// The same formula from tensor ops, differentiated by Candle (the reference in tests).
fn composite(
    qkv: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    d: Dims,
) -> Result<Tensor> {
    let (q, k, v) = split_qkv(qkv, scale)?;
    // [Bw,h,n,hd] -> [Bw,n,h,hd]
    mm(&probs_composite(&q, &k, bias, mask, d)?, &v)?
        .transpose(1, 2)?
        .contiguous()
}

/// Off the fused CPU path (CUDA, other dtypes): the forward from tensor ops on detached inputs,
/// attached as one node whose backward ([`GenericBackward`]) recomputes the probabilities, so
/// the graph keeps no `n×n` tensor here either. Differentiated by Candle, the composite kept
/// about eight per Swin block (4.8 of the 6.2 GB of graph at f12 64³).
fn generic(
    qkv: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    d: Dims,
) -> Result<Tensor> {
    let out = composite(&qkv.detach(), &bias.detach(), mask, scale, d)?;
    let mask = mask.cloned();
    attach2(
        qkv,
        bias,
        out,
        GenericBackward {
            mask,
            scale,
            dims: d,
        },
    )
}

/// [`generic`]'s backward from tensor ops. With p the probabilities and g the output gradient
/// `[Bw,h,n,hd]`: dv = pᵀ·g, dz = p ⊙ (g·vᵀ − rowsum(p ⊙ g·vᵀ)), dq = scale·dz·k, dk = dzᵀ·q',
/// dbias = Σ_windows dz.
struct GenericBackward {
    mask: Option<Tensor>,
    scale: f64,
    dims: Dims,
}

impl Backward2 for GenericBackward {
    fn name(&self) -> &'static str {
        "window-attention-generic"
    }

    fn backward(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = split_qkv(&qkv.detach(), self.scale)?;
        let p = probs_composite(&q, &k, &bias.detach(), self.mask.as_ref(), self.dims)?;
        // [Bw,n,h,hd] -> [Bw,h,n,hd]
        let g = g.detach().transpose(1, 2)?.contiguous()?;
        let dv = mm(&p.t()?, &g)?;
        let dp = mm(&g, &v.t()?)?;
        let dz = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
        let dq = (mm(&dz, &k)? * self.scale)?;
        let dk = mm(&dz.t()?, &q)?;
        let dbias = dz.sum(0)?;
        // [3,Bw,h,n,hd] -> [Bw,n,3,h,hd]
        let dqkv = Tensor::stack(&[dq, dk, dv], 0)?
            .permute((1, 3, 0, 2, 4))?
            .contiguous()?;
        Ok((Some(dqkv), Some(dbias)))
    }
}

/// The op's name in errors.
const WHAT: &str = "window_attention";

fn forward_t<T: Real>(
    qkv: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    d: Dims,
) -> Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    let out = with_slice::<T, _>(qkv, WHAT, |qkv| {
        with_slice::<T, _>(bias, WHAT, |bias| match mask {
            Some(m) => with_slice::<T, _>(m, WHAT, |m| forward(qkv, bias, Some(m), scale, d)),
            None => Ok(forward(qkv, bias, None, scale, d)),
        })
    })???;
    Tensor::from_vec(out, (d.bw, d.n, d.h, d.hd), &dev)
}

/// A strided matrix view: element (r, c) at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

impl<T> Mat<T> {
    fn rows(ptr: *const T, rs: usize) -> Self {
        Self {
            ptr,
            rs: rs as isize,
            cs: 1,
        }
    }
    /// The transpose, as a view.
    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m×n] = a[m×k]·b[k×n]` (dst rows `dst_rs` apart), single-threaded gemm.
///
/// # Safety
/// Every view must address live memory for its shape, and `dst` must not be written by anyone
/// else meanwhile.
unsafe fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    a: Mat<T>,
    b: Mat<T>,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Where one (window, head) task's q, k, v start in qkv `[Bw,n,3,h,hd]`, and its output rows in
/// `[Bw,n,h,hd]`.
fn task_offsets(d: Dims, b: usize, hh: usize) -> ([usize; 3], usize) {
    let c = d.c();
    let qkv = b * d.n * 3 * c + hh * d.hd;
    ([qkv, qkv + c, qkv + 2 * c], b * d.n * c + hh * d.hd)
}

/// One task's probabilities `softmax((q·scale)·kᵀ + bias + mask)` into `p` `[n×n]`, and q·scale
/// into `qs` `[n×hd]`. The forward and the backward both call this, so they get the same bits.
///
/// # Safety
/// `q` and `k` must address `[n×hd]` rows `3C` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn probs<T: Real>(
    d: Dims,
    q: *const T,
    k: *const T,
    bias: &[T],
    mask: Option<&[T]>,
    scale: T,
    qs: &mut [T],
    p: &mut Vec<T>,
) {
    let (n, hd, rs) = (d.n, d.hd, 3 * d.c());
    for i in 0..n {
        for c in 0..hd {
            // SAFETY: (i, c) lies inside the caller's q rows.
            qs[i * hd + c] = unsafe { *q.add(i * rs + c) } * scale;
        }
    }
    let mut z = vec![T::zero(); n * n];
    // SAFETY: z is n×n; qs is n×hd; k addresses n rows of hd, read as kᵀ.
    unsafe {
        matmul(
            n,
            n,
            hd,
            z.as_mut_ptr(),
            n,
            Mat::rows(qs.as_ptr(), hd),
            Mat::rows(k, rs).t(),
        )
    };
    p.clear();
    p.reserve(n * n);
    logits_to_probs(&mut z, bias, mask, &mut p.spare_capacity_mut()[..n * n], n);
    // SAFETY: logits_to_probs wrote all n×n probabilities.
    unsafe { p.set_len(n * n) };
}

/// Task (window `b`, head `hh`) up to its probabilities: [`probs`] on its q and k rows, its
/// head's bias and its window's mask. Returns [`task_offsets`]. The forward and the backward
/// both start so.
#[allow(clippy::too_many_arguments)]
fn task_probs<T: Real>(
    d: Dims,
    b: usize,
    hh: usize,
    qkv: &[T],
    bias: &[T],
    mask: Option<&[T]>,
    scale: T,
    qs: &mut [T],
    p: &mut Vec<T>,
) -> ([usize; 3], usize) {
    let nn = d.n * d.n;
    let offsets = task_offsets(d, b, hh);
    let [q, k, _] = offsets.0;
    let mask = mask.map(|m| &m[(b % d.nw) * nn..(b % d.nw + 1) * nn]);
    let bias = &bias[hh * nn..(hh + 1) * nn];
    // SAFETY: window_attention checked qkv's shape against d, so the q and k rows of every
    // (window, head) lie inside qkv.
    unsafe {
        probs(
            d,
            qkv.as_ptr().add(q),
            qkv.as_ptr().add(k),
            bias,
            mask,
            scale,
            qs,
            p,
        )
    };
    offsets
}

dispatch!(logits_to_probs<T>(z: &mut [T], bias: &[T], mask: Option<&[T]>,
                             p: &mut [MaybeUninit<T>], n: usize) => {
    for (z, &b) in z.iter_mut().zip(bias) {
        *z = *z + b;
    }
    if let Some(m) = mask {
        for (z, &b) in z.iter_mut().zip(m) {
            *z = *z + b;
        }
    }
    for (zr, pr) in z.chunks_exact_mut(n).zip(p.chunks_exact_mut(n)) {
        softmax_row_into(zr, pr);
    }
});

dispatch!(softmax_grad<T>(dz: &mut [T], p: &[T], db: &mut [T], n: usize) => {
    // softmax: dz = p·(dp − Σ dp·p), and the bias gradient sums dz over windows
    for ((zr, pr), br) in dz.chunks_exact_mut(n).zip(p.chunks_exact(n)).zip(db.chunks_exact_mut(n)) {
        let s = dot(zr, pr);
        for ((z, &p), b) in zr.iter_mut().zip(pr).zip(br) {
            *z = p * (*z - s);
            *b = *b + *z;
        }
    }
});

/// Forward on slices: qkv `[Bw,n,3,h,hd]` → out `[Bw,n,h,hd]`, one task per (window, head):
/// `P = softmax(...)` then `O = P·V`, both products by gemm on strided views of the tokens.
fn forward<T: Real>(qkv: &[T], bias: &[T], mask: Option<&[T]>, scale: f64, d: Dims) -> Vec<T> {
    use rayon::prelude::*;
    let (n, hd, c) = (d.n, d.hd, d.c());
    let scale = T::from_f64(scale);
    let mut out = vec![T::zero(); d.bw * n * c];
    let op = SyncPtr(out.as_mut_ptr());
    (0..d.tasks()).into_par_iter().for_each(|t| {
        let op = op;
        let (b, hh) = (t / d.h, t % d.h);
        let (mut qs, mut p) = (vec![T::zero(); n * hd], Vec::new());
        let ([_, _, v], o) = task_probs(d, b, hh, qkv, bias, mask, scale, &mut qs, &mut p);
        // SAFETY: the offsets address this task's rows inside qkv and out; task t alone writes
        // its (window, head) columns of out, which outlives the loop.
        unsafe {
            matmul(
                n,
                hd,
                n,
                op.0.add(o),
                c,
                Mat::rows(p.as_ptr(), n),
                Mat::rows(qkv.as_ptr().add(v), 3 * c),
            );
        }
    });
    out
}

/// Window groups of the backward's bias-gradient sum: fixed, so that the sum's order (groups in
/// order, windows in order inside each) does not depend on the thread count.
const BIAS_GROUPS: usize = 8;

/// Backward on slices: (qkv, bias, mask, output gradient) → (dqkv `[Bw,n,3,h,hd]`, dbias
/// `[h·n·n]`). Per (window, head): P again, `dV = Pᵀ·G`, `dP = G·Vᵀ`,
/// `dZ = P∘(dP − rowsum(dP∘P))`, `dQ = scale·dZ·K`, `dK = dZᵀ·(Q·scale)`. Tasks are (head,
/// window group); each sums its windows' dZ into its bias gradient, and the groups' sums are
/// added in order.
fn backward<T: Real>(
    qkv: &[T],
    bias: &[T],
    mask: Option<&[T]>,
    g: &[T],
    scale: f64,
    d: Dims,
) -> (Vec<T>, Vec<T>) {
    use rayon::prelude::*;
    let (n, hd, c) = (d.n, d.hd, d.c());
    let scale = T::from_f64(scale);
    let mut dqkv = vec![T::zero(); 3 * d.bw * n * c];
    let dp = SyncPtr(dqkv.as_mut_ptr());
    let groups = BIAS_GROUPS.min(d.bw);
    let per_group = d.bw.div_ceil(groups);
    let partials: Vec<Vec<T>> = (0..d.h * groups)
        .into_par_iter()
        .map(|task| {
            let dp = dp;
            let (hh, grp) = (task / groups, task % groups);
            let mut db = vec![T::zero(); n * n];
            let (mut qs, mut p) = (vec![T::zero(); n * hd], Vec::new());
            let mut dz = vec![T::zero(); n * n];
            let mut dq = vec![T::zero(); n * hd];
            let (base, gb) = (qkv.as_ptr(), g.as_ptr());
            for b in grp * per_group..((grp + 1) * per_group).min(d.bw) {
                let ([q, k, v], o) = task_probs(d, b, hh, qkv, bias, mask, scale, &mut qs, &mut p);
                // SAFETY: the offsets address (window b, head hh) inside qkv, g and dqkv; this
                // task alone owns that window and head, so no one else writes its dq, dk, dv.
                unsafe {
                    let gm = Mat::rows(gb.add(o), c);
                    let pm = Mat::rows(p.as_ptr(), n);
                    matmul(n, hd, n, dp.0.add(v), 3 * c, pm.t(), gm);
                    matmul(
                        n,
                        n,
                        hd,
                        dz.as_mut_ptr(),
                        n,
                        gm,
                        Mat::rows(base.add(v), 3 * c).t(),
                    );
                }
                softmax_grad(&mut dz, &p, &mut db, n);
                let zm = Mat::rows(dz.as_ptr(), n);
                // SAFETY: as above; dq is a local n×hd buffer.
                unsafe {
                    matmul(
                        n,
                        hd,
                        n,
                        dq.as_mut_ptr(),
                        hd,
                        zm,
                        Mat::rows(base.add(k), 3 * c),
                    );
                    matmul(
                        n,
                        hd,
                        n,
                        dp.0.add(k),
                        3 * c,
                        zm.t(),
                        Mat::rows(qs.as_ptr(), hd),
                    );
                    for i in 0..n {
                        for e in 0..hd {
                            *dp.0.add(q + i * 3 * c + e) = dq[i * hd + e] * scale;
                        }
                    }
                }
            }
            db
        })
        .collect();
    let mut dbias = vec![T::zero(); d.h * n * n];
    for (task, part) in partials.into_iter().enumerate() {
        let hh = task / groups;
        for (o, v) in dbias[hh * n * n..(hh + 1) * n * n].iter_mut().zip(part) {
            *o = *o + v;
        }
    }
    (dqkv, dbias)
}

/// The autograd node's backward: recomputes the probabilities.
struct WindowAttentionBackward {
    mask: Option<Tensor>,
    scale: f64,
    dims: Dims,
}

impl Backward2 for WindowAttentionBackward {
    fn name(&self) -> &'static str {
        "window-attention"
    }

    fn backward(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.detach().contiguous()?;
        let (d, scale) = (self.dims, self.scale);
        let dev = candle_core::Device::Cpu;
        let bias = bias.contiguous()?;
        fn run<T: Real>(
            qkv: &Tensor,
            bias: &Tensor,
            mask: Option<&Tensor>,
            g: &Tensor,
            scale: f64,
            d: Dims,
        ) -> Result<(Vec<T>, Vec<T>)> {
            with_slice::<T, _>(qkv, WHAT, |qkv| {
                with_slice::<T, _>(bias, WHAT, |bias| {
                    with_slice::<T, _>(g, WHAT, |g| match mask {
                        Some(m) => with_slice::<T, _>(m, WHAT, |m| {
                            backward(qkv, bias, Some(m), g, scale, d)
                        }),
                        None => Ok(backward(qkv, bias, None, g, scale, d)),
                    })
                })
            })???
        }
        let mask = self.mask.as_ref();
        let (dqkv, dbias) = match qkv.dtype() {
            DType::F32 => {
                let (a, b) = run::<f32>(qkv, &bias, mask, &g, scale, d)?;
                (
                    Tensor::from_vec(a, qkv.shape(), &dev)?,
                    Tensor::from_vec(b, bias.shape(), &dev)?,
                )
            }
            _ => {
                let (a, b) = run::<f64>(qkv, &bias, mask, &g, scale, d)?;
                (
                    Tensor::from_vec(a, qkv.shape(), &dev)?,
                    Tensor::from_vec(b, bias.shape(), &dev)?,
                )
            }
        };
        Ok((Some(dqkv), Some(dbias)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rnd(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let len: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f64> = (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Bw = 4 windows of n = 19 tokens (not a multiple of the 16 lanes), h = 2, hd = 3, with a
    /// mask of nW = 2 windows holding MONAI's −100.
    fn inputs() -> (Tensor, Tensor, Tensor) {
        let qkv = rnd(&[4, 19, 3, 2, 3], 1, 2.0);
        let bias = rnd(&[2, 19, 19], 2, 1.0);
        let m = rnd(&[2, 19, 19], 3, 1.0);
        let mask = m
            .ge(0.3)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .affine(-100.0, 0.0)
            .unwrap();
        (qkv, bias, mask)
    }

    #[test]
    fn fused_forward_and_gradients_match_the_tensor_op_composite() {
        let (qkv, bias, mask) = inputs();
        let d = Dims {
            bw: 4,
            h: 2,
            n: 19,
            hd: 3,
            nw: 2,
        };
        let scale = 3f64.powf(-0.5);
        // The fused CPU op, and the generic one (its forward and backward from tensor ops).
        let paths = [None, Some(&mask)]
            .into_iter()
            .flat_map(|m| [(m, false), (m, true)]);
        for (mask, generic) in paths {
            let path = |f: &dyn Fn() -> Tensor| {
                if generic {
                    crate::nn::with_generic_ops(f)
                } else {
                    f()
                }
            };
            let d = Dims {
                nw: if mask.is_some() { 2 } else { 1 },
                ..d
            };
            let want = composite(&qkv, &bias, mask, scale, d).unwrap();
            // no autograd
            let got = path(&|| window_attention(&qkv, &bias, mask, scale).unwrap());
            assert!(max_diff(&got, &want) < 1e-14);
            // with autograd: the same output, and the composite's gradients
            let (vq, vb) = (
                Var::from_tensor(&qkv).unwrap(),
                Var::from_tensor(&bias).unwrap(),
            );
            let w = rnd(&[4, 19, 2, 3], 4, 1.0);
            let loss = |y: Tensor| (y * &w).unwrap().sum_all().unwrap();
            let y =
                path(&|| window_attention(vq.as_tensor(), vb.as_tensor(), mask, scale).unwrap());
            assert!(max_diff(&y, &want) < 1e-14);
            let g = crate::nn::with_generic_ops(|| loss(y).backward().unwrap());
            let c = composite(vq.as_tensor(), vb.as_tensor(), mask, scale, d).unwrap();
            let gc = loss(c).backward().unwrap();
            for v in [&vq, &vb] {
                let (a, b) = (
                    g.get(v.as_tensor()).unwrap(),
                    gc.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(a, b) < 1e-13,
                    "generic {generic}: gradient differs by {}",
                    max_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn f32_attention_matches_f64() {
        let (qkv, bias, mask) = inputs();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let want = window_attention(&qkv, &bias, Some(&mask), 0.5).unwrap();
        let got = window_attention(&f(&qkv), &f(&bias), Some(&f(&mask)), 0.5).unwrap();
        assert!(max_diff(&got.to_dtype(DType::F64).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        let (qkv, bias, mask) = inputs();
        let err =
            window_attention(&qkv, &bias.narrow(0, 0, 1).unwrap(), Some(&mask), 0.5).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        let err = window_attention(
            &qkv,
            &bias,
            Some(&mask.narrow(0, 0, 1).unwrap().repeat((3, 1, 1)).unwrap()),
            0.5,
        )
        .unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }
}
