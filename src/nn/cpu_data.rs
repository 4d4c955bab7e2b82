//! Borrowing the f32/f64 data of contiguous CPU tensors, for the fused CPU kernels: every custom
//! op here checks the same things (contiguous, f32 or f64, one dtype) with the same errors.

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// The data of a contiguous f32 or f64 CPU storage.
pub(crate) enum Slice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// The elements `l` addresses in `s`; `what` names the op in errors.
pub(crate) fn slices<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Slice<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: inputs must be contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => Slice::F32(&v[a..b]),
        CpuStorage::F64(v) => Slice::F64(&v[a..b]),
        _ => candle_core::bail!("{what}: f32/f64 only"),
    })
}

/// Runs `$body` with `$($v)` bound to same-dtype slices of the storages (a custom op's
/// `cpu_fwd` arguments) and wraps the `Vec` it returns back into a `CpuStorage`.
macro_rules! with_slices {
    ($what:expr, [$(($v:ident, $s:expr, $l:expr)),+], $body:expr) => {{
        use $crate::nn::cpu_data::{slices, Slice};
        match ($(slices($s, $l, $what)?,)+) {
            ($(Slice::F32($v),)+) => CpuStorage::F32($body),
            ($(Slice::F64($v),)+) => CpuStorage::F64($body),
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!("{}: inputs of one dtype only", $what),
        }
    }};
}
pub(crate) use with_slices;

/// Borrows the contiguous CPU data of the tensor `t` as `&[T]` for the duration of `f`.
pub(crate) fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("{what}: CPU tensors expected")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous tensors expected")
    };
    Ok(f(&T::cpu_storage_as_slice(s)?[a..b]))
}
