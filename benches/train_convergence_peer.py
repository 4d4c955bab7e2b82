"""MONAI + PyTorch peer of the overfit test's training (tests/learning.rs): the
same resampled phantom cases, the same transforms and hyperparameters, so the
Dice reached after N iterations can be compared with the train step's.

    python benches/train_convergence_peer.py CASE_DIR... --iterations 100 --lr 1e-3 --val-every 50

Also the peer of benches/train_loop.rs (speed: `--val-every 0`, last line s/it).

Each CASE_DIR holds image.nii.gz and label.nii.gz (e.g. a `resample` step's
cases under runs/<pipeline>/prep/). torch 2.15.0, monai 1.6.1.
"""
import argparse
import time

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import SwinUNETR
from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd,
                              LoadImaged, RandCropByPosNegLabeld,
                              ScaleIntensityRanged, SpatialPadd)
from monai.networks.utils import one_hot

p = argparse.ArgumentParser()
p.add_argument("cases", nargs="+")
p.add_argument("--iterations", type=int, default=100)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--val-every", type=int, default=50)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

pre = Compose([
    LoadImaged(keys=["image", "label"]),
    EnsureChannelFirstd(keys=["image", "label"]),
    ScaleIntensityRanged(keys=["image"], a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
    CropForegroundd(keys=["image", "label"], source_key="image", allow_smaller=True),
    # The train step pads a case smaller than the patch (symmetric, zeros).
    SpatialPadd(keys=["image", "label"], spatial_size=(64, 64, 32)),
])
crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(64, 64, 32),
                              pos=1, neg=1, num_samples=1, image_key="image", image_threshold=0)
crop.set_random_state(0)
data = [pre({"image": f"{c}/image.nii.gz", "label": f"{c}/label.nii.gz"}) for c in a.cases]

model = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-5)
metric = DiceMetric(include_background=False, reduction="mean_batch")

def validate():
    model.eval()
    per = []
    with torch.no_grad():
        for d in data:
            x = d["image"][None].float()
            y = d["label"][None].long()
            logits = sliding_window_inference(x, (64, 64, 32), 4, model, overlap=0.25)
            pred = one_hot(logits.argmax(1, keepdim=True), 14)
            metric.reset()
            metric(pred, one_hot(y, 14))
            per.append(metric.aggregate().numpy())
    model.train()
    d = np.nanmean(np.stack(per), 0)
    return float(np.nanmean(d)), d

t0 = time.perf_counter()
step_times = []
for it in range(1, a.iterations + 1):
    ts = time.perf_counter()
    s = crop(data[(it - 1) % len(data)])[0]
    x, y = s["image"][None].float(), s["label"][None].long()
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    step_times.append(time.perf_counter() - ts)
    if a.val_every and it % a.val_every == 0:
        m, d = validate()
        print(f"it {it} loss {loss.item():.3f} val mean fg Dice {m:.3f} "
              f"{np.round(d, 2).tolist()} ({time.perf_counter() - t0:.0f} s)", flush=True)

# Seconds per iteration (patch sampling included), the first (warm-up) left out.
rest = step_times[1:] or step_times
print(f"monai train loop: {sum(rest) / len(rest):.3f} s/it over {len(rest)} iterations, "
      f"threads={torch.get_num_threads()}", flush=True)
