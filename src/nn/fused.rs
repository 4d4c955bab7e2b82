//! Where the fused CPU kernels apply, and a switch that turns them off.
//!
//! On the CPU, in f32 and f64, the model's convolutions, norms, window attention, window
//! gather, LeakyReLU, softmax and the DiceCE loss run as hand-written kernels. Everywhere else
//! (CUDA, other dtypes) they are composed from Candle's tensor ops and differentiated by Candle.
//! [`with_generic_ops`] runs that second path on the CPU, so the code a GPU executes can be
//! checked against MONAI on a machine without one.

use std::cell::Cell;

use candle_core::{DType, Tensor};

thread_local! {
    static GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// True where a fused CPU kernel applies to `x`: f32/f64 on the CPU, outside
/// [`with_generic_ops`].
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && !GENERIC.with(Cell::get)
}

/// Runs `f` with every op of this crate on its generic path (Candle tensor ops, the path CUDA
/// takes), on whatever device its tensors live. Applies to ops called on this thread during
/// `f`, forward and backward alike; meant for tests and for comparing the two paths.
pub fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GENERIC.with(|g| g.replace(true)));
    f()
}
