#!/usr/bin/env python3
"""Peer timings for benches/volume_bench.rs (run by it; prints JSON).

Reads DIR/ct.nii.gz and DIR/label.nii.gz (written by tsdistill), then times,
best of 3 each: nibabel read (raw int16 via dataobj, no float conversion,
like ours), nibabel write (default compresslevel 1), SimpleITK Resample
(linear image, nearest label) on MONAI's output grid, and MONAI Spacingd
(bilinear, nearest) on already-loaded MetaTensors. Also writes
DIR/ct_nibabel.nii.gz so the Rust side can time reading a nibabel-written file.
Versions used: nibabel 5.4.2, SimpleITK 2.5.7, MONAI 1.6.1, torch as installed.
"""

import json
import os
import sys
import time
import warnings

import nibabel as nib
import numpy as np

warnings.filterwarnings("ignore")


def best(f, reps=3):
    t_best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best, out


def main(d):
    import SimpleITK as sitk
    import monai
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacingd

    ct, lab = os.path.join(d, "ct.nii.gz"), os.path.join(d, "label.nii.gz")
    res = {}
    res["nib_read_ours"], img = best(lambda: np.asarray(nib.load(ct).dataobj))
    aff = nib.load(ct).affine
    nimg = nib.Nifti1Image(img, aff)
    out = os.path.join(d, "ct_nibabel.nii.gz")
    res["nib_write"], _ = best(lambda: nib.save(nimg, out))
    res["nib_read_nib"], _ = best(lambda: np.asarray(nib.load(out).dataobj))
    label = np.asarray(nib.load(lab).dataobj)

    # MONAI on loaded tensors (channel first).
    data = {"image": MetaTensor(torch.from_numpy(img[None].astype(np.float32)), affine=torch.tensor(aff)),
            "label": MetaTensor(torch.from_numpy(label[None].astype(np.float32)), affine=torch.tensor(aff))}
    sp = Spacingd(keys=["image", "label"], pixdim=(1.5, 1.5, 2.0), mode=("bilinear", "nearest"))
    res["monai_spacingd"], m = best(lambda: sp(dict(data)))
    m_aff = np.asarray(m["image"].affine, dtype=np.float64)
    shape = [int(s) for s in m["image"].shape[1:]]
    res["monai_vs_ours_shape"] = shape

    # SimpleITK on the same grid (LPS: flip x, y).
    flip = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(m_aff[:3, :3], axis=0)
    direction = flip @ (m_aff[:3, :3] / spacing)
    origin = flip @ m_aff[:3, 3]
    s_img, s_lab = sitk.ReadImage(ct), sitk.ReadImage(lab)

    def resample(src, interp, pixel):
        r = sitk.ResampleImageFilter()
        r.SetSize(shape)
        r.SetOutputSpacing([float(s) for s in spacing])
        r.SetOutputOrigin([float(o) for o in origin])
        r.SetOutputDirection([float(v) for v in direction.ravel()])
        r.SetInterpolator(interp)
        r.SetOutputPixelType(pixel)
        return r.Execute(src)

    res["sitk_image"], _ = best(lambda: resample(s_img, sitk.sitkLinear, sitk.sitkFloat32))
    res["sitk_label"], _ = best(lambda: resample(s_lab, sitk.sitkNearestNeighbor, sitk.sitkUInt8))
    res["sitk_resample"] = res["sitk_image"] + res["sitk_label"]
    res["versions"] = {
        "nibabel": nib.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "monai": monai.__version__,
        "torch": torch.__version__,
        "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])
