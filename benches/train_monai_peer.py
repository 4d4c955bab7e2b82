"""MONAI + PyTorch peer of the train step's inner loop on CPU, same config as
the tests' tiny run: SwinUNETR(feature_size=12, out_channels=14), one patch
32×32×64 per step, DiceCELoss(to_onehot_y=True, softmax=True), AdamW(1e-4, 1e-5).

    target/venv/bin/python benches/train_monai_peer.py [depth] [steps]

Prints seconds per iteration (median of `steps` after one warm-up).
torch 2.15.0, monai 1.6.1.
"""
import statistics
import sys
import time

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import SwinUNETR

torch.manual_seed(0)
torch.set_num_threads(int(torch.get_num_threads()))
shape = [int(v) for v in (sys.argv[1].split("x") if len(sys.argv) > 1 else ["32", "32", "64"])]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
n = int(sys.argv[3]) if len(sys.argv) > 3 else 1
model = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
x = torch.randn(n, 1, *shape)
y = torch.randint(0, 14, (n, 1, *shape))
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    if i:
        times.append(time.perf_counter() - t)
print(f"monai swinunetr f12 {n}x{shape} threads={torch.get_num_threads()}: "
      f"{statistics.median(times):.3f} s/it ({1/statistics.median(times):.3f} it/s)")
