//! Batches built on worker threads ahead of the model, so a training step
//! never waits for patch sampling.
//!
//! Determinism does not depend on thread timing: batch `i` is a pure
//! function of `(seed, i)`. Its case is position `i mod n` of epoch
//! `i div n`'s shuffled order (like `DataLoader(shuffle=True, batch_size=1)`
//! with `num_samples` crops flattened into the batch), and its patches come
//! from a ChaCha8 stream numbered `i`. So resuming at iteration `k` simply
//! starts the loader at `k`, and any number of workers gives the same batches.
//!
//! Workers claim indices from a shared counter, stay at most `capacity`
//! batches ahead of the consumer, and the consumer reorders what arrives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::error::Result;
use super::sampler::{sample_patches, SamplerConfig, SamplingCase};

/// One batch: `num_samples` patches of one case, stacked.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The iteration this batch belongs to.
    pub iteration: usize,
    /// The case the patches come from.
    pub case: String,
    /// Intensities, `[n, d, h, w]` C order.
    pub image: Vec<f32>,
    /// Class ids, same layout.
    pub label: Vec<u8>,
    /// `[n, d, h, w]`.
    pub shape: [usize; 4],
}

impl Batch {
    /// The image as [n, 1, d, h, w] f32 and the label as [n, 1, d, h, w] u8 on `device`.
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let [n, d, h, w] = self.shape;
        let image = Tensor::from_slice(&self.image, (n, 1, d, h, w), &Device::Cpu)?;
        let label = Tensor::from_slice(&self.label, (n, 1, d, h, w), &Device::Cpu)?;
        Ok((image.to_device(device)?, label.to_device(device)?))
    }
}

/// The case index used by batch `iteration` (epoch-wise shuffled order).
pub fn case_for(iteration: usize, n_cases: usize, seed: u64) -> usize {
    let epoch = iteration / n_cases;
    let mut order: Vec<usize> = (0..n_cases).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0f_e90c);
    rng.set_stream(epoch as u64);
    order.shuffle(&mut rng);
    order[iteration % n_cases]
}

/// Builds batch `iteration` (what each worker does).
pub fn build_batch(
    cases: &[SamplingCase],
    cfg: &SamplerConfig,
    seed: u64,
    iteration: usize,
) -> Batch {
    let ci = case_for(iteration, cases.len(), seed);
    let case = &cases[ci];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(iteration as u64);
    let patches = sample_patches(case, cfg, &mut rng);
    let [d, h, w] = patches[0].shape;
    let mut image = Vec::with_capacity(patches.len() * d * h * w);
    let mut label = Vec::with_capacity(image.capacity());
    for p in &patches {
        image.extend_from_slice(&p.image);
        label.extend_from_slice(&p.label);
    }
    Batch {
        iteration,
        case: case.id.clone(),
        image,
        label,
        shape: [patches.len(), d, h, w],
    }
}

struct Shared {
    claim: AtomicUsize,
    consumed: Mutex<usize>,
    wake: Condvar,
    stop: AtomicBool,
}

/// Produces batches `start..end` in order from worker threads.
pub struct BatchLoader {
    rx: Option<Receiver<Batch>>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Batch>,
    next: usize,
    end: usize,
    waited: Duration,
}

impl BatchLoader {
    /// Starts `workers` threads that keep up to `capacity` batches ready.
    pub fn spawn(
        cases: Arc<Vec<SamplingCase>>,
        cfg: SamplerConfig,
        seed: u64,
        start: usize,
        end: usize,
        workers: usize,
        capacity: usize,
    ) -> Self {
        let capacity = capacity.max(1);
        let (tx, rx) = sync_channel(capacity);
        let shared = Arc::new(Shared {
            claim: AtomicUsize::new(start),
            consumed: Mutex::new(start),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let handles = (0..workers.max(1))
            .map(|_| {
                let (tx, shared, cases, cfg) =
                    (tx.clone(), shared.clone(), cases.clone(), cfg.clone());
                std::thread::spawn(move || loop {
                    let i = shared.claim.fetch_add(1, Ordering::SeqCst);
                    if i >= end {
                        return;
                    }
                    // Stay at most `capacity` batches ahead of the consumer.
                    {
                        let mut consumed = shared.consumed.lock().unwrap();
                        while i >= *consumed + capacity && !shared.stop.load(Ordering::SeqCst) {
                            consumed = shared.wake.wait(consumed).unwrap();
                        }
                    }
                    if shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let batch = build_batch(&cases, &cfg, seed, i);
                    if tx.send(batch).is_err() {
                        return;
                    }
                })
            })
            .collect();
        BatchLoader {
            rx: Some(rx),
            shared,
            workers: handles,
            pending: BTreeMap::new(),
            next: start,
            end,
            waited: Duration::ZERO,
        }
    }

    /// The next batch in order, or `None` after `end`.
    pub fn next_batch(&mut self) -> Option<Batch> {
        if self.next >= self.end {
            return None;
        }
        let t0 = Instant::now();
        while !self.pending.contains_key(&self.next) {
            let b = self.rx.as_ref()?.recv().ok()?;
            self.pending.insert(b.iteration, b);
        }
        self.waited += t0.elapsed();
        let b = self.pending.remove(&self.next);
        self.next += 1;
        *self.shared.consumed.lock().unwrap() = self.next;
        self.shared.wake.notify_all();
        b
    }

    /// Total time the consumer spent blocked waiting for data.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        // Dropping the receiver unblocks workers stuck in `send`.
        self.rx = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
