"""The device checks of ``--device cuda`` (issue 17), as one script for a machine with a GPU.

1. Ring products on the device against torch's int64 kernel on the CPU, bit for bit, on the
   bench UNet's matmul / convolution shapes and on all-ones limbs (the largest float64 sums),
   with the time of each side.
2. Channel staging: device tensors sent and received over three real TLS meshes (threads of
   this process) arrive intact, and the wire bytes equal those of host tensors.
3. One secure forward of the bench UNet (``bench/bench_unet_forward.py``) with the ring products
   on the device next to the same forward on the CPU: error, bytes, rounds, seconds.

Exits non-zero on any mismatch. ``--device cpu:0`` runs the same code paths without a GPU (a
dry run of the script itself; the transfers are host copies).

    python bench/check_cuda.py [--device cuda] [--skip-forward]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

from cipherdm_torch.protocols.replicated.ring import ring_product

# (op, left shape, right shape, options): the bench UNet's product shapes, batch 1 and 4
SHAPES = [
    (torch.matmul, (1, 196, 8), (8, 8), {}),            # attention q/k/v projections
    (torch.matmul, (1, 196, 8), (1, 8, 196), {}),       # attention logits
    (torch.matmul, (4, 196, 196), (4, 196, 8), {}),     # attention values, batch 4
    (F.conv2d, (1, 4, 28, 28), (4, 4, 3, 3), {"padding": 1}),
    (F.conv2d, (4, 8, 14, 14), (8, 8, 3, 3), {"padding": 1}),
    (F.conv2d, (1, 4, 28, 28), (4, 4, 3, 3), {"padding": 1, "stride": 2}),
    (F.conv2d, (2, 8, 14, 14), (8, 4, 3, 3), {"padding": 1, "groups": 2}),
    (F.conv_transpose2d, (1, 8, 7, 7), (8, 4, 4, 4), {"stride": 2, "padding": 1}),
]


def _ring(shape, g):
    return torch.randint(-2 ** 63, 2 ** 63 - 1, shape, generator=g, dtype=torch.long)


def check_products(device: torch.device) -> int:
    g = torch.Generator().manual_seed(0)
    bad = 0
    print(f"1. ring products on {device} vs the CPU int64 kernel")
    for op, xs, ys, kw in SHAPES:
        x, y = _ring(xs, g), _ring(ys, g)
        t0 = time.perf_counter()
        ref = op(x, y, **kw)
        cpu_s = time.perf_counter() - t0
        ring_product(op, x, y, device=device, **kw)  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        got = ring_product(op, x, y, device=device, **kw)
        dev_s = time.perf_counter() - t0
        ok = got.device == x.device and torch.equal(got, ref)
        bad += not ok
        print(f"   {op.__name__:<17} {str(xs):<16} {str(ys):<14} {'equal' if ok else 'DIFFERENT'}"
              f"  int64 CPU {cpu_s * 1e3:7.2f} ms, limbs on {device} {dev_s * 1e3:7.2f} ms")
    ones = torch.full((3, 4096), -1, dtype=torch.long)  # all-ones limbs: the largest sums
    ok = torch.equal(ring_product(torch.matmul, ones, ones.t(), device=device), ones @ ones.t())
    bad += not ok
    print(f"   all-ones limbs, 4096 terms: {'equal' if ok else 'DIFFERENT'}")
    return bad


def check_staging(device: torch.device) -> int:
    from cipherdm_torch.mpc import identity
    from cipherdm_torch.mpc.channel import Mesh

    print(f"2. channel staging of {device} tensors over three TLS meshes")
    with tempfile.TemporaryDirectory() as folder:
        identity.create(folder)
        meshes = [Mesh(identity.load(folder, r, 3), timeout=60) for r in range(3)]
        addresses = [m.listen() for m in meshes]
        threads = [threading.Thread(target=m.connect, args=(addresses,)) for m in meshes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            x = torch.arange(200_000, dtype=torch.long, device=device) * 7
            sent0 = meshes[1].stats()["wire_sent"]
            work = meshes[1].isend(x, 0)
            got = torch.full_like(x, -1)
            meshes[0].recv(got, 1)
            work.wait()
            wire_device = meshes[1].stats()["wire_sent"] - sent0
            sent0 = meshes[1].stats()["wire_sent"]
            work = meshes[1].isend(x.cpu(), 0)
            meshes[0].recv(torch.empty_like(x.cpu()), 1)
            work.wait()
            wire_host = meshes[1].stats()["wire_sent"] - sent0
        finally:
            for m in meshes:
                m.close()
    ok = got.device == x.device and torch.equal(got, x) and wire_device == wire_host
    print(f"   {'intact' if ok else 'BROKEN'}: {x.numel()} elements on {got.device}, wire "
          f"{wire_device} B (host tensors: {wire_host} B)")
    return int(not ok)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-forward", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA on this machine: run with --device cpu:0 for a dry run", file=sys.stderr)
        return 2
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    bad = check_products(device) + check_staging(device)
    if not args.skip_forward:
        import bench_unet_forward

        suffix = "cuda" if device.type == "cuda" else str(device)
        print("3. secure forward of the bench UNet, ring products on the CPU vs on the device")
        bench_unet_forward.main(["--variants", "optimised+rss", f"optimised+rss@{suffix}"])
    print("all device checks passed" if not bad else f"{bad} device check(s) FAILED")
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
