//! Matrix products checked against the layouts a GPU accepts.
//!
//! Candle's CPU matmul takes operands of any strides; its CUDA matmul (cuBLAS strided batched
//! gemm) takes each matrix only with packed rows or packed columns, and at most two batch dims
//! that collapse to one stride. So a view the CPU multiplies without complaint (one head sliced
//! out of a qkv tensor) stops a GPU run with `MatMulNonContiguous`. Off the fused CPU path
//! (CUDA, or the CPU under [`super::with_generic_ops`]), [`matmul`] and [`broadcast_matmul`]
//! check their operands by cuBLAS's rule first and refuse what it would refuse, so the CPU
//! tests of the generic path catch such layouts before a GPU does.

use candle_core::{Result, Tensor};

use super::fused;

/// `a·b`, Candle's batched matmul, refusing off the fused CPU path what cuBLAS would refuse.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fused::applies(a) {
        check("lhs", a, true)?;
        check("rhs", b, true)?;
    }
    a.matmul(b)
}

/// Candle's `broadcast_matmul`, checked like [`matmul`]: Candle copies a broadcast operand
/// into a packed one, so only the inner matrix layout of each is checked, and the batch layout
/// of an operand that is not broadcast.
pub(crate) fn broadcast_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fused::applies(a) {
        let (ra, rb) = (a.rank(), b.rank());
        let same_batch = ra == rb && a.dims()[..ra - 2] == b.dims()[..rb - 2];
        check("lhs", a, same_batch)?;
        check("rhs", b, same_batch)?;
    }
    a.broadcast_matmul(b)
}

fn check(what: &str, t: &Tensor, with_batch: bool) -> Result<()> {
    let ok = packed_matrices(t.dims(), t.stride()) && (!with_batch || one_batch_stride(t));
    if !ok {
        candle_core::bail!(
            "matmul {what} of shape {:?} and strides {:?}: cuBLAS takes only packed rows or \
             columns and batch dims of one stride (make it contiguous first)",
            t.dims(),
            t.stride()
        )
    }
    Ok(())
}

/// The last two dims `[rows, cols]` are row-major (`cols` apart) or column-major (`rows` apart);
/// a dim of size 1 may have any stride. Mirrors candle-core 0.11's `gemm_config` (CUDA).
fn packed_matrices(dims: &[usize], stride: &[usize]) -> bool {
    let r = dims.len();
    if r < 2 {
        return true;
    }
    let (rows, cols, sr, sc) = (dims[r - 2], dims[r - 1], stride[r - 2], stride[r - 1]);
    let row_major = (sc == 1 || cols == 1) && (sr == cols || rows == 1);
    let col_major = (sc == rows || cols == 1) && (sr == 1 || rows == 1);
    row_major || col_major
}

/// The batch dims step through memory with one stride: none or one batch dim, or two where
/// the outer stride is the inner one times its size (or either has size 1).
fn one_batch_stride(t: &Tensor) -> bool {
    let (dims, stride) = (t.dims(), t.stride());
    let r = dims.len();
    match (&dims[..r.saturating_sub(2)], &stride[..r.saturating_sub(2)]) {
        ([], []) | ([_], [_]) => true,
        ([d0, d1], [s0, s1]) => *s0 == s1 * d1 || *d0 == 1 || *d1 == 1,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Hand-worked cases of cuBLAS's rule: a contiguous matrix and its transpose pass; a head
    /// viewed in a `[B,n,3,h,hd]` qkv tensor fails (rows 3·h·hd apart), as do its transpose
    /// and its batch dims; a copy of it passes.
    #[test]
    fn layouts_cublas_takes_and_refuses() {
        let x = Tensor::zeros((2, 5, 3, 4, 8), DType::F32, &Device::Cpu).unwrap();
        let k = x.permute((2, 0, 3, 1, 4)).unwrap(); // [3,2,4,5,8], a view
        let k = k.narrow(0, 1, 1).unwrap().squeeze(0).unwrap(); // [2,4,5,8], still a view
        assert_eq!(k.stride(), &[5 * 3 * 4 * 8, 8, 3 * 4 * 8, 1]);
        assert!(!packed_matrices(k.dims(), k.stride()));
        let kt = k.t().unwrap();
        assert!(!packed_matrices(kt.dims(), kt.stride()));
        assert!(!one_batch_stride(&k));
        let kc = k.contiguous().unwrap();
        assert!(packed_matrices(kc.dims(), kc.stride()) && one_batch_stride(&kc));
        let kct = kc.t().unwrap();
        assert!(packed_matrices(kct.dims(), kct.stride()) && one_batch_stride(&kct));
        // [4,1,5]: a unit dim may have any stride
        assert!(packed_matrices(&[4, 1, 5], &[5, 999, 1]));
        // three batch dims: never, even packed
        let r5 = Tensor::zeros((2, 2, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(!one_batch_stride(&r5));
        // Rows 8 apart holding 4 columns: the CPU multiplies it, cuBLAS would not; the check
        // runs only off the fused path.
        let wide = Tensor::ones((2, 6, 8), DType::F32, &Device::Cpu).unwrap();
        let q = wide.narrow(2, 0, 4).unwrap(); // [2,6,4], strides [48,8,1]
        let r = Tensor::ones((2, 4, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            matmul(&q, &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            2.0 * 6.0 * 3.0 * 4.0
        );
        let err = crate::nn::with_generic_ops(|| matmul(&q, &r)).unwrap_err();
        assert!(err.to_string().contains("cuBLAS"), "{err}");
        let qc = q.contiguous().unwrap();
        assert!(crate::nn::with_generic_ops(|| matmul(&qc, &r)).is_ok());
        let err = crate::nn::with_generic_ops(|| broadcast_matmul(&q, &r.get(0).unwrap()));
        assert!(err.unwrap_err().to_string().contains("cuBLAS"));
    }
}
