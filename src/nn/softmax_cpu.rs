//! Vectorised CPU softmax kernels: a branch-free `exp`, the softmax of one row and of many (the
//! window attention built on them is [`super::attention`]).
//!
//! Why: with the scalar loops (libm `expf` per element, NaN-aware `max`, serial sums) the
//! softmax was 40% of a SwinUNETR forward (f24, 64³). Here every loop is written so that LLVM
//! vectorises it (16 accumulator lanes for the reductions, a branch-free polynomial `exp`), and
//! each kernel is compiled three times — AVX-512F, AVX2, baseline — picked once per task at run
//! time. No fused multiply-add is used, so all three give bitwise the same results.

use num_traits::Float;
use std::mem::MaybeUninit;

/// Element types of the kernels: `exp` is the polynomial below for f32 and libm's for f64 (the
/// f64 path is what the finite-difference tests use).
pub(crate) trait Real: Float + candle_core::WithDType + Send + Sync {
    fn exp_v(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn exp_v(self) -> f32 {
        exp_f32(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp_v(self) -> f64 {
        self.exp()
    }
}

/// `exp(x)` in f32 within 2 ulp of the exact value on [-87, 88]; 0 below -87.3 (where the exact
/// value is subnormal: next to the row's maximum, whose exp is 1, it does not change a softmax).
/// Cody–Waite reduction `x = k·ln2 + r`, |r| ≤ ln2/2, and Cephes' degree-7 polynomial for e^r.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that k·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to an integer (ties to even) held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.0);
    let t = xc * LOG2E + ROUND;
    let k = t - ROUND;
    let ki = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(((ki + 127) as u32) << 23);
    let y = er * scale;
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

const LANES: usize = 16;

/// In place: `z ← softmax(z)`, written to `out` (same length).
#[inline(always)]
pub(crate) fn softmax_row_into<T: Real>(z: &mut [T], out: &mut [MaybeUninit<T>]) {
    // max (exact in any order)
    let mut m = [T::neg_infinity(); LANES];
    let mut chunks = z.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    let mut mx = T::neg_infinity();
    for &v in m.iter().chain(chunks.remainder()) {
        mx = if v > mx { v } else { mx };
    }
    // exp and sum, 16 lanes then the remainder, in a fixed order
    let mut s = [T::zero(); LANES];
    let mut chunks = z.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = (c[l] - mx).exp_v();
            c[l] = e;
            s[l] = s[l] + e;
        }
    }
    let mut sum = T::zero();
    for v in chunks.into_remainder() {
        *v = (*v - mx).exp_v();
        sum = sum + *v;
    }
    for v in s {
        sum = sum + v;
    }
    let inv = T::one() / sum;
    for (o, &v) in out.iter_mut().zip(z.iter()) {
        o.write(v * inv);
    }
}

/// `Σ a·b` with 16 lanes, in a fixed order.
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut s = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            s[l] = s[l] + x[l] * y[l];
        }
    }
    let mut sum = T::zero();
    for (&x, &y) in ra.iter().zip(rb) {
        sum = sum + x * y;
    }
    for v in s {
        sum = sum + v;
    }
    sum
}

/// Compiles `$body` (a call of an `#[inline(always)]` kernel) for AVX-512F, AVX2 and the
/// baseline, and runs the widest one this CPU supports.
macro_rules! dispatch {
    ($name:ident < $t:ident > ( $($arg:ident : $ty:ty),* ) => $body:expr) => {
        fn $name<$t: Real>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide<$t: Real>($($arg: $ty),*) { $body }
                #[target_feature(enable = "avx2")]
                unsafe fn mid<$t: Real>($($arg: $ty),*) { $body }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { wide::<$t>($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { mid::<$t>($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use dispatch;

dispatch!(plain_rows<T>(x: &[T], n: usize, out: &mut [MaybeUninit<T>]) => {
    let mut z = vec![T::zero(); n];
    for (x, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        z.copy_from_slice(x);
        softmax_row_into(&mut z, o);
    }
});

/// Softmax over rows of `n`.
pub(crate) fn softmax<T: Real>(x: &[T], n: usize) -> Vec<T> {
    use rayon::prelude::*;
    let rows = (4096 / n).max(1);
    let mut out = Vec::with_capacity(x.len());
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(t, o)| {
            let start = t * rows * n;
            plain_rows(&x[start..start + o.len()], n, o);
        });
    // SAFETY: every element was written above.
    unsafe { out.set_len(x.len()) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_the_exact_exponential() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            let ulp = f32::EPSILON as f64 * exact.abs();
            worst = worst.max(((exp_f32(x) as f64) - exact).abs() / ulp);
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
