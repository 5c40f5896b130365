"""`python -m xception_fast.train`: train Xception with the paper's recipes (works under torchrun).

Recipes (Chollet 2017, section 4.3):
- imagenet: SGD, momentum 0.9, learning rate 0.045 decayed by 0.94 every 2 epochs, dropout 0.5.
- jft: RMSprop, momentum 0.9, learning rate 0.001 decayed by 0.9 every 3,000,000 samples.
Both: weight decay 1e-5, Polyak averaging of the weights (an exponential moving average, with the
BatchNorm buffers) for evaluation. Data from an ImageFolder directory (`--data DIR` with `train/`
and `val/` inside) or a built-in synthetic set (`--synthetic N`). Checkpoints are written at the end
of every epoch and `--resume` continues from one exactly (model, optimizer, schedule, average,
random state).

    python -m xception_fast.train --synthetic 512 --image-size 128 --epochs 2 --amp bf16
    torchrun --nproc_per_node=8 -m xception_fast.train --data /imagenet --amp bf16 --sync-bn
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

import xception_fast
from xception_fast import backends

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Recipe:
    optimizer: str
    lr: float
    decay: float
    decay_every_samples: int | None  # None: decay every `decay_every_epochs` epochs
    decay_every_epochs: int
    drop_rate: float
    fc_layers: tuple[int, ...]


RECIPES = {
    "imagenet": Recipe("sgd", 0.045, 0.94, None, 2, 0.5, ()),
    "jft": Recipe("rmsprop", 0.001, 0.9, 3_000_000, 0, 0.0, (4096, 4096)),
}


class SyntheticImages(Dataset):
    """Learnable random data: each class is a fixed random image plus per-sample noise."""

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(num_classes, 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(num_classes, (size,), generator=generator)
        self.noise_seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        noise = torch.randn(self.templates.shape[1:], generator=torch.Generator().manual_seed(self.noise_seed + i))
        return self.templates[self.labels[i]] + noise, int(self.labels[i])


def build_datasets(args):
    if args.data is None:
        train = SyntheticImages(args.synthetic, args.num_classes, args.image_size, args.seed)
        val = SyntheticImages(max(args.synthetic // 4, 1), args.num_classes, args.image_size, args.seed + 10**6)
        return train, val
    from torchvision import datasets, transforms

    normalize = transforms.Normalize([0.5] * 3, [0.5] * 3)  # Keras-ported Xception preprocessing
    train = datasets.ImageFolder(os.path.join(args.data, "train"), transforms.Compose([
        transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        normalize]))
    val = datasets.ImageFolder(os.path.join(args.data, "val"), transforms.Compose([
        transforms.Resize(int(args.image_size * 333 / 299)), transforms.CenterCrop(args.image_size),
        transforms.ToTensor(), normalize]))
    return train, val


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float, weight_decay: float):
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.RMSprop(model.parameters(), lr, momentum=0.9, weight_decay=weight_decay)


def decay_steps(recipe: Recipe, steps_per_epoch: int, global_batch: int) -> int:
    """Optimizer steps between two learning-rate decays."""
    if recipe.decay_every_samples is not None:
        return max(math.ceil(recipe.decay_every_samples / global_batch), 1)
    return recipe.decay_every_epochs * steps_per_epoch


class Progress:
    """One line of progress: carriage-return updates on a terminal, plain lines in a log."""

    def __init__(self, enabled: bool):
        self.enabled, self.tty = enabled, sys.stdout.isatty()

    def update(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty and not final:
            print("\r" + text, end="", flush=True)
        else:
            print(("\r" if self.tty else "") + text, flush=True)


def evaluate(model: nn.Module, loader, device, amp_dtype, channels_last: bool) -> tuple[float, float]:
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for images, labels in loader:
            images, labels = _to_device(images, labels, device, channels_last)
            logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
    return loss_sum / max(total, 1), correct / max(total, 1)


def _to_device(images, labels, device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train(args) -> dict:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    progress = Progress(rank == 0 and not args.quiet)
    torch.manual_seed(args.seed)

    recipe = RECIPES[args.recipe]
    model = xception_fast.xception(num_classes=args.num_classes, drop_rate=recipe.drop_rate,
                                   fc_layers=recipe.fc_layers, backend=args.backend).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.polyak_decay), use_buffers=True)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model

    train_set, val_set = build_datasets(args)
    if distributed:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(args.seed))
    loader = DataLoader(train_set, args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
                        pin_memory=device.type == "cuda")
    val_loader = DataLoader(val_set, args.batch_size, sampler=SequentialSampler(val_set), num_workers=args.workers)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {args.batch_size} is larger than the {len(train_set)} training images")

    lr = args.lr if args.lr is not None else recipe.lr
    optimizer = build_optimizer(model, recipe, lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, decay_steps(recipe, steps_per_epoch,
                                                                       args.batch_size * world), recipe.decay)
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        average.load_state_dict(state["average"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch = state["epoch"]

    history = []
    for epoch in range(start_epoch, args.epochs):
        if distributed:
            sampler.set_epoch(epoch)
        else:
            sampler.generator.manual_seed(args.seed + epoch)  # the order depends on the epoch alone
        net.train()
        started, seen = time.perf_counter(), 0
        for step, (images, labels) in enumerate(loader):
            if args.max_steps is not None and step >= args.max_steps:
                break
            images, labels = _to_device(images, labels, device, args.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = nn.functional.cross_entropy(net(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            average.update_parameters(model)
            history.append(loss.item())
            seen += images.shape[0] * world
            rate = seen / (time.perf_counter() - started)
            progress.update(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} "
                            f"loss {history[-1]:.4f} lr {scheduler.get_last_lr()[0]:.5f} {rate:.1f} img/s")
        progress.update(f"epoch {epoch + 1}/{args.epochs} done, last loss {history[-1]:.4f}", final=True)
        if rank == 0 and args.checkpoint_dir:
            os.makedirs(args.checkpoint_dir, exist_ok=True)
            torch.save({"model": model.state_dict(), "average": average.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch + 1,
                        "args": vars(args)}, os.path.join(args.checkpoint_dir, f"epoch{epoch + 1}.pt"))

    val_loss, val_acc = evaluate(average.module, val_loader, device, amp_dtype, args.channels_last)
    progress.update(f"evaluation (Polyak-averaged weights): loss {val_loss:.4f}, top-1 {val_acc:.4f}", final=True)
    if distributed:
        dist.destroy_process_group()
    return {"losses": history, "val_loss": val_loss, "val_top1": val_acc, "model": model}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m xception_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data", help="ImageFolder root with train/ and val/")
    data.add_argument("--synthetic", type=int, default=1024, help="size of the synthetic set (default)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="imagenet")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--polyak-decay", type=float, default=0.9999)
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--backend", default="auto", choices=("auto",) + backends.provider_names())
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (torchrun)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", default=None, help="checkpoint file to continue from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
