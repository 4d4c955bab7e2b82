//! Swin window attention `softmax((q·scale)·kᵀ + bias + mask)·v` as one autograd op.
//!
//! Why one op: built from tensor ops, every `n×n` intermediate (logits, the biased and masked
//! logits, the probabilities, their gradients) is a graph node, and Candle's backward zero-fills
//! and adds a gradient buffer per node — at f24 64³ that is ~44 M floats per node in the first
//! stage. Here the graph holds one node and no `n×n` tensor at all: as in flash attention, the
//! backward recomputes each row's probabilities from q, k, the bias and the mask (bit for bit
//! those of the forward: the same code, no reductions across the row but the softmax's own)
//! instead of keeping them (they were 0.5 GB per Swin block of the first stage at f48 96³). It
//! computes dq, dk, dv and the bias gradient per (window, head) in one pass, and the
//! relative-position bias gradient comes out `[h,n,n]` (summed over windows), not `[nW,h,n,n]`.
//!
//! On CPU (f32/f64) the kernels below run, vectorised as in [`super::softmax_cpu`]; elsewhere the
//! same formula is composed from tensor ops.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};

use super::ops::{softmax_last, Carried};
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
    /// Element offset of token i's head hh in window b, in rows of `parts·C` (`parts` = 3 for
    /// qkv `[Bw,n,3,h,hd]`, 1 for `[Bw,n,h,hd]`), part `s`.
    fn at(&self, parts: usize, b: usize, i: usize, s: usize, hh: usize) -> usize {
        ((b * self.n + i) * parts + s) * self.c() + hh * self.hd
    }
    /// The `[n,hd]` rows of (window b, head hh, part s) copied out of `x`.
    fn rows<T: Copy>(&self, x: &[T], parts: usize, b: usize, s: usize, hh: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(self.n * self.hd);
        for i in 0..self.n {
            let a = self.at(parts, b, i, s, hh);
            out.extend_from_slice(&x[a..a + self.hd]);
        }
        out
    }
    /// Writes `[n,hd]` rows back where [`Dims::rows`] read them.
    ///
    /// # Safety
    /// `x` must point to a live buffer of `Bw·n·parts·C` elements, and no other thread may write
    /// (window b, head hh, part s) meanwhile.
    unsafe fn put_rows<T: Copy>(
        &self,
        x: SyncPtr<T>,
        parts: usize,
        b: usize,
        s: usize,
        hh: usize,
        v: &[T],
    ) {
        for i in 0..self.n {
            let a = self.at(parts, b, i, s, hh);
            // SAFETY: in bounds and exclusive, by the caller's contract.
            unsafe {
                std::ptr::copy_nonoverlapping(v[i * self.hd..].as_ptr(), x.0.add(a), self.hd)
            };
        }
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
    let same = |t: &Tensor| t.device().is_cpu() && t.dtype() == qkv.dtype();
    let cpu = same(qkv) && same(bias) && mask.is_none_or(same);
    if !cpu || !matches!(qkv.dtype(), DType::F32 | DType::F64) {
        return composite(qkv, bias, mask, scale, dims);
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
    qkv.apply_op2(
        &bias,
        WindowAttention {
            out: Carried::new(out),
            mask,
            scale,
            dims,
        },
    )
}

/// The same formula from tensor ops (CUDA, other dtypes).
fn composite(
    qkv: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    d: Dims,
) -> Result<Tensor> {
    // [Bw,n,3,h,hd] -> [3,Bw,h,n,hd]
    let qkv = qkv.permute((2, 0, 3, 1, 4))?;
    let q = (qkv.get(0)? * scale)?;
    let (k, v) = (qkv.get(1)?, qkv.get(2)?);
    let z = q.matmul(&k.t()?)?.broadcast_add(bias)?;
    let z = match mask {
        Some(m) => z
            .reshape((d.bw / d.nw, d.nw, d.h, d.n, d.n))?
            .broadcast_add(&m.unsqueeze(1)?)?
            .reshape((d.bw, d.h, d.n, d.n))?,
        None => z,
    };
    // [Bw,h,n,hd] -> [Bw,n,h,hd]
    softmax_last(&z)?
        .matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .contiguous()
}

/// Borrows the contiguous CPU data of `t` as `&[T]` for the duration of `f`.
fn with_slice<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("window_attention: CPU tensors expected")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("window_attention: contiguous tensors expected")
    };
    Ok(f(&T::cpu_storage_as_slice(s)?[a..b]))
}

fn forward_t<T: Real>(
    qkv: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    d: Dims,
) -> Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    let out = with_slice::<T, _>(qkv, |qkv| {
        with_slice::<T, _>(bias, |bias| match mask {
            Some(m) => with_slice::<T, _>(m, |m| forward(qkv, bias, Some(m), scale, d)),
            None => Ok(forward(qkv, bias, None, scale, d)),
        })
    })???;
    Tensor::from_vec(out, (d.bw, d.n, d.h, d.hd), &dev)
}

/// `m` `[rows, cols]` → `[cols, rows]`.
#[inline(always)]
fn transpose<T: Real>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::zero(); rows * cols];
    for (j, r) in m.chunks_exact(cols).enumerate() {
        for (c, &v) in r.iter().enumerate() {
            t[c * rows + j] = v;
        }
    }
    t
}

/// `y += a·x`.
#[inline(always)]
fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + a * x;
    }
}

/// Row i of the probabilities, `softmax((q_i·scale)·kᵀ + bias_i + mask_i)`, into `p` (`z` is
/// scratch). The forward and the backward both call this, so they get the same bits.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn probs_row<'p, T: Real>(
    i: usize,
    q: &[T],
    kt: &[T],
    bias: &[T],
    mask: Option<&[T]>,
    scale: T,
    z: &mut [T],
    p: &'p mut [MaybeUninit<T>],
) -> &'p [T] {
    let n = z.len();
    let hd = q.len() / n;
    z.fill(T::zero());
    for (d, &qd) in q[i * hd..(i + 1) * hd].iter().enumerate() {
        axpy(z, qd * scale, &kt[d * n..(d + 1) * n]);
    }
    for (z, &b) in z.iter_mut().zip(&bias[i * n..(i + 1) * n]) {
        *z = *z + b;
    }
    if let Some(m) = mask {
        for (z, &b) in z.iter_mut().zip(&m[i * n..(i + 1) * n]) {
            *z = *z + b;
        }
    }
    softmax_row_into(z, p);
    // SAFETY: softmax_row_into wrote all n probabilities.
    unsafe { std::slice::from_raw_parts(p.as_ptr() as *const T, n) }
}

dispatch!(forward_task<T>(q: &[T], k: &[T], v: &[T], bias: &[T], mask: Option<&[T]>, scale: T,
                          out: &mut [T]) => {
    let n = bias.len().isqrt();
    let hd = q.len() / n;
    let (kt, vt) = (transpose(k, n, hd), transpose(v, n, hd));
    let mut z = vec![T::zero(); n];
    let mut p = vec![MaybeUninit::new(T::zero()); n];
    for i in 0..n {
        let pr = probs_row(i, q, &kt, bias, mask, scale, &mut z, &mut p);
        for (d, o) in out[i * hd..(i + 1) * hd].iter_mut().enumerate() {
            *o = dot(pr, &vt[d * n..(d + 1) * n]);
        }
    }
});

/// Forward on slices: qkv `[Bw,n,3,h,hd]` → out `[Bw,n,h,hd]`, one task per (window, head).
fn forward<T: Real>(qkv: &[T], bias: &[T], mask: Option<&[T]>, scale: f64, d: Dims) -> Vec<T> {
    use rayon::prelude::*;
    let n = d.n;
    let scale = T::from_f64(scale);
    let mut out = vec![T::zero(); d.bw * n * d.c()];
    let op = SyncPtr(out.as_mut_ptr());
    (0..d.tasks()).into_par_iter().for_each(|t| {
        let op = op;
        let (b, hh) = (t / d.h, t % d.h);
        let [q, k, v] = [0, 1, 2].map(|s| d.rows(qkv, 3, b, s, hh));
        let mask = mask.map(|m| &m[(b % d.nw) * n * n..(b % d.nw + 1) * n * n]);
        let bias = &bias[hh * n * n..(hh + 1) * n * n];
        let mut o = vec![T::zero(); n * d.hd];
        forward_task(&q, &k, &v, bias, mask, scale, &mut o);
        // SAFETY: task t alone writes (window b, head hh) of `out`, which outlives the loop.
        unsafe { d.put_rows(op, 1, b, 0, hh, &o) };
    });
    out
}

dispatch!(backward_task<T>(q: &[T], k: &[T], v: &[T], bias: &[T], mask: Option<&[T]>, g: &[T],
                           scale: T, dq: &mut [T], dk: &mut [T], dv: &mut [T], db: &mut [T]) => {
    let n = db.len().isqrt();
    let hd = q.len() / n;
    let (kt, vt) = (transpose(k, n, hd), transpose(v, n, hd));
    let (mut dkt, mut dvt) = (vec![T::zero(); hd * n], vec![T::zero(); hd * n]);
    let mut dz = vec![T::zero(); n];
    let (mut z, mut p) = (vec![T::zero(); n], vec![MaybeUninit::new(T::zero()); n]);
    for i in 0..n {
        let pr = probs_row(i, q, &kt, bias, mask, scale, &mut z, &mut p);
        let gr = &g[i * hd..(i + 1) * hd];
        // dv_j += p_ij·g_i; dp_i = g_i·vᵀ
        dz.fill(T::zero());
        for (d, &gd) in gr.iter().enumerate() {
            axpy(&mut dvt[d * n..(d + 1) * n], gd, pr);
            axpy(&mut dz, gd, &vt[d * n..(d + 1) * n]);
        }
        // softmax: dz = p·(dp − Σ dp·p)
        let s = dot(&dz, pr);
        for (z, &p) in dz.iter_mut().zip(pr) {
            *z = p * (*z - s);
        }
        for (b, &z) in db[i * n..(i + 1) * n].iter_mut().zip(&dz) {
            *b = *b + z;
        }
        // logits = (q·scale)·kᵀ: dq_i = scale·(dz_i·k), dk_j += dz_ij·(q_i·scale)
        for d in 0..hd {
            dq[i * hd + d] = dot(&dz, &kt[d * n..(d + 1) * n]) * scale;
            axpy(&mut dkt[d * n..(d + 1) * n], q[i * hd + d] * scale, &dz);
        }
    }
    for j in 0..n {
        for d in 0..hd {
            dk[j * hd + d] = dkt[d * n + j];
            dv[j * hd + d] = dvt[d * n + j];
        }
    }
});

/// Window groups of the backward's bias-gradient sum: fixed, so that the sum's order (groups in
/// order, windows in order inside each) does not depend on the thread count.
const BIAS_GROUPS: usize = 8;

/// Backward on slices: (qkv, bias, mask, output gradient) → (dqkv `[Bw,n,3,h,hd]`, dbias
/// `[h·n·n]`). Tasks are (head, window group); each writes its windows' dq, dk, dv and sums its
/// windows' bias gradient, and the groups' sums are added in order.
fn backward<T: Real>(
    qkv: &[T],
    bias: &[T],
    mask: Option<&[T]>,
    g: &[T],
    scale: f64,
    d: Dims,
) -> (Vec<T>, Vec<T>) {
    use rayon::prelude::*;
    let (n, hd) = (d.n, d.hd);
    let scale = T::from_f64(scale);
    let mut dqkv = vec![T::zero(); 3 * d.bw * n * d.c()];
    let dp = SyncPtr(dqkv.as_mut_ptr());
    let groups = BIAS_GROUPS.min(d.bw);
    let per_group = d.bw.div_ceil(groups);
    let partials: Vec<Vec<T>> = (0..d.h * groups)
        .into_par_iter()
        .map(|task| {
            let dp = dp;
            let (hh, grp) = (task / groups, task % groups);
            let mut db = vec![T::zero(); n * n];
            let mut dqkv = [0; 3].map(|_| vec![T::zero(); n * hd]);
            for b in grp * per_group..((grp + 1) * per_group).min(d.bw) {
                let [q, k, v] = [0, 1, 2].map(|s| d.rows(qkv, 3, b, s, hh));
                let gt = d.rows(g, 1, b, 0, hh);
                let mask = mask.map(|m| &m[(b % d.nw) * n * n..(b % d.nw + 1) * n * n]);
                let [dq, dk, dv] = &mut dqkv;
                backward_task(
                    &q,
                    &k,
                    &v,
                    &bias[hh * n * n..(hh + 1) * n * n],
                    mask,
                    &gt,
                    scale,
                    dq,
                    dk,
                    dv,
                    &mut db,
                );
                for (s, part) in dqkv.iter().enumerate() {
                    // SAFETY: (window b, head hh) belongs to this task alone.
                    unsafe { d.put_rows(dp, 3, b, s, hh, part) };
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

/// The autograd node: carries the forward's output; backward recomputes the probabilities.
struct WindowAttention {
    out: Carried,
    mask: Option<Tensor>,
    scale: f64,
    dims: Dims,
}

impl candle_core::CustomOp2 for WindowAttention {
    fn name(&self) -> &'static str {
        "window-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
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
            with_slice::<T, _>(qkv, |qkv| {
                with_slice::<T, _>(bias, |bias| {
                    with_slice::<T, _>(g, |g| match mask {
                        Some(m) => {
                            with_slice::<T, _>(m, |m| backward(qkv, bias, Some(m), g, scale, d))
                        }
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
        for mask in [None, Some(&mask)] {
            let d = Dims {
                nw: if mask.is_some() { 2 } else { 1 },
                ..d
            };
            let want = composite(&qkv, &bias, mask, scale, d).unwrap();
            // no autograd
            let got = window_attention(&qkv, &bias, mask, scale).unwrap();
            assert!(max_diff(&got, &want) < 1e-14);
            // with autograd: the same output, and the composite's gradients
            let (vq, vb) = (
                Var::from_tensor(&qkv).unwrap(),
                Var::from_tensor(&bias).unwrap(),
            );
            let w = rnd(&[4, 19, 2, 3], 4, 1.0);
            let loss = |y: Tensor| (y * &w).unwrap().sum_all().unwrap();
            let y = window_attention(vq.as_tensor(), vb.as_tensor(), mask, scale).unwrap();
            assert!(max_diff(&y, &want) < 1e-14);
            let g = loss(y).backward().unwrap();
            let c = composite(vq.as_tensor(), vb.as_tensor(), mask, scale, d).unwrap();
            let gc = loss(c).backward().unwrap();
            for v in [&vq, &vb] {
                let (a, b) = (
                    g.get(v.as_tensor()).unwrap(),
                    gc.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(a, b) < 1e-13,
                    "gradient differs by {}",
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
