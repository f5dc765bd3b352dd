"""The baseline: the paper's protocol as a plain PyTorch loop, the way one would write it without pyrobust.

Step by step over the images still in play, in batches, with torch's own random generator: noise at
``pixels`` random positions (with replacement) set to uniform values in [0, 1), a forward pass, and bookkeeping.
It is batched (not one image at a time) so the comparison is against a reasonable implementation, not a straw man.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from pyrobust.training import build_model


def torch_model_from_onnx(path, image_shape=(28, 28, 1), n_classes=10):
    """The torch twin of a model exported by ``pyrobust train --arch cnn`` (same weights)."""
    net = build_model("cnn", image_shape, n_classes)
    weights = {t.name.removeprefix("net."): torch.from_numpy(numpy_helper.to_array(t).copy())
               for t in onnx.load(str(path)).graph.initializer if t.name.startswith("net.")}
    net.load_state_dict(weights)
    return net.eval()


@torch.no_grad()
def torch_protocol(net, images: np.ndarray, labels: np.ndarray, *, pixels=28, max_steps=250, batch_size=256,
                   seed=0):
    """images: float32 (n, 28, 28, 1). Returns (first_failure, inferences)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels)
    n = x.shape[0]
    flat = x.reshape(n, -1)
    first = torch.full((n,), -1, dtype=torch.int64)
    clean = torch.cat([net(x[lo: lo + batch_size]).argmax(1) for lo in range(0, n, batch_size)])
    first[clean != y] = 0
    inferences = n
    active = torch.nonzero(first == -1).flatten()
    for step in range(1, max_steps + 1):
        if active.numel() == 0:
            break
        for lo in range(0, active.numel(), batch_size):
            ids = active[lo: lo + batch_size]
            xb = flat[ids].clone()
            pos = torch.randint(0, xb.shape[1], (ids.numel(), pixels), generator=gen)
            xb.scatter_(1, pos, torch.rand(ids.numel(), pixels, generator=gen))
            pred = net(xb.view(-1, *x.shape[1:])).argmax(1)
            first[ids[pred != y[ids]]] = step
            inferences += ids.numel()
        active = active[first[active] == -1]
    return first.numpy(), inferences
