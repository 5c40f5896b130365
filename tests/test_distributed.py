"""SyncBatchNorm through the fused path: two gloo processes under torchrun against one process."""

import os
import subprocess
import sys

import torch

import xception_fast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workers.sync_bn_model import batch, build  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "workers", "sync_bn_worker.py")


def test_sync_batchnorm_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    # The workers import the same xception_fast as this process, installed or from a checkout.
    package_root = os.path.dirname(os.path.dirname(xception_fast.__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          WORKER, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = build()
    x, grad = batch()
    x.requires_grad_(True)
    y = model(x)
    y.backward(grad)

    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, rtol=1e-9, atol=1e-10)
    for i, p in enumerate(model.parameters()):
        # DDP averages the two ranks' gradients; one process on the whole batch sums them.
        torch.testing.assert_close(ranks[0]["grads"][i] * 2, p.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ranks[1]["grads"][i], ranks[0]["grads"][i])
    for r in ranks:
        for got, expected in zip(r["buffers"], model.buffers()):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # Plain DDP: per-rank statistics differ from the whole batch's, but the averaged gradients agree.
    for g0, g1 in zip(ranks[0]["ddp_grads"], ranks[1]["ddp_grads"]):
        torch.testing.assert_close(g0, g1)
