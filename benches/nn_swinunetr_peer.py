"""PyTorch/MONAI peer of benches/nn_swinunetr.rs: one measurement per process.

usage: nn_swinunetr_peer.py FEATURE SIZE forward|train|train-ckpt ITERS THREADS
Prints "seconds_per_iteration peak_rss_kib". Forward uses use_flash_attention=True (MONAI's
fastest inference path) under no_grad; train is forward + DiceCELoss backward + AdamW step.
"""

import sys
import time

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import SwinUNETR


def vm_hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main():
    feature, size, mode, iters, threads = sys.argv[1:6]
    feature, size, iters = int(feature), int(size), int(iters)
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=14, feature_size=feature,
                      use_flash_attention=(mode == "forward"),
                      use_checkpoint=(mode == "train-ckpt"))
    x = torch.randn(1, 1, size, size, size)
    y = torch.randint(0, 14, (1, 1, size, size, size))
    if mode == "forward":
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

        def step():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(iters):
        step()
    print((time.perf_counter() - t) / iters, vm_hwm_kib())


if __name__ == "__main__":
    main()
