"""One rank of the SyncBatchNorm test (tests/test_distributed.py): run under torchrun, gloo, CPU."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workers.sync_bn_model import build, batch  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, grad = batch()
    local = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
    results = {}

    # DDP, unchanged, with per-rank BatchNorm statistics.
    model = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp(x[local]).backward(grad[local])
    results["ddp_grads"] = [p.grad for p in model.parameters()]
    del ddp  # its reducer holds the process group: released before the group is destroyed

    # SyncBatchNorm. PyTorch's DDP refuses SyncBatchNorm on CPU modules ("only work with GPU
    # modules"), so the gradients are averaged here as DDP would average them.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build())
    a = x[local].clone().requires_grad_(True)
    y = model(a)
    y.backward(grad[local])
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    results.update(y=y.detach(), x_grad=a.grad, grads=[p.grad for p in model.parameters()],
                   buffers=[b.clone() for b in model.buffers()])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Both ranks reach the end before either tears gloo down: a rank that destroys the group while its
    # peer still has traffic in flight can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
