"""The training script: a tiny configuration learns, and a checkpoint resumes exactly."""

import pytest
import torch

from xception_fast import train

TINY = "--synthetic 16 --num-classes 3 --image-size 71 --batch-size 8 --lr 0.01 --quiet"


def run(extra: str):
    return train.train(train.parse_args(f"{TINY} {extra}".split()))


def test_loss_falls_on_a_learnable_synthetic_set():
    result = run("--epochs 4 --polyak-decay 0.5")
    losses = result["losses"]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses


def test_checkpoint_resumes_exactly(tmp_path):
    straight = run(f"--epochs 2 --checkpoint-dir {tmp_path / 'a'}")
    run(f"--epochs 1 --checkpoint-dir {tmp_path / 'b'}")
    resumed = run(f"--epochs 2 --resume {tmp_path / 'b' / 'epoch1.pt'} --checkpoint-dir {tmp_path / 'b'}")
    assert resumed["losses"] == straight["losses"][2:]
    a = torch.load(tmp_path / "a" / "epoch2.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "epoch2.pt", weights_only=False)
    for key in ("model", "average"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["scheduler"] == b["scheduler"]


@pytest.mark.parametrize("recipe,optimizer", [("imagenet", torch.optim.SGD), ("jft", torch.optim.RMSprop)])
def test_recipes(recipe, optimizer):
    r = train.RECIPES[recipe]
    model = torch.nn.Linear(2, 2)
    opt = train.build_optimizer(model, r, r.lr, 1e-5)
    assert isinstance(opt, optimizer) and opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-5
    if recipe == "imagenet":
        assert (r.lr, r.decay, r.drop_rate) == (0.045, 0.94, 0.5)
        assert train.decay_steps(r, steps_per_epoch=100, global_batch=32) == 200  # every 2 epochs
    else:
        assert (r.lr, r.decay, r.fc_layers) == (0.001, 0.9, (4096, 4096))
        assert train.decay_steps(r, steps_per_epoch=100, global_batch=1000) == 3000  # every 3M samples
