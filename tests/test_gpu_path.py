"""The GPU path on CPU: autocast precisions, gradient scaling, channels-last, compile wrapping, FLOP
counting, images/s and the MFU estimate, and a loop that runs without Ray (bench/gpu_step.py).

What needs a GPU (the prefetching side stream, pinned copies, the peaks of real devices, any speed-up) is
measured by bench/gpu_step.py on a GPU machine; no GPU was lent to this project's test runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator import load_config
from orchestrator.errors import ConfigError
from orchestrator.engine.loop import Hook, train_epochs
from orchestrator.engine.precision import Precision
from orchestrator.engine.throughput import Throughput, device_peak, mfu, peak_tflops

ROOT = Path(__file__).resolve().parents[1]


# -- config ---------------------------------------------------------------------------------------------------
def test_options_are_off_by_default():
    training = load_config(None).training
    assert (training.precision, training.channels_last, training.compile) == ("fp32", False, False)


@pytest.mark.parametrize("override, key", [
    ("training.precision=fp8", "training.precision"),
    ("training.channels_last=fast", "training.channels_last"),
    ("training.compile=1", "training.compile"),
    ("methods=[{name: independent, training: {precision: half}}]", "methods.0.training.precision"),
])
def test_bad_options_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == key


# -- the loop under each precision ----------------------------------------------------------------------------
def tiny_problem(seed: int = 0):
    """Two classes of 8x8 images told apart by the mean of their first channel: a small CNN learns it in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(64) % 2
    images = torch.randn(64, 3, 8, 8, generator=gen) * 0.5
    images[:, 0] += (labels.float() * 2 - 1).view(-1, 1, 1)
    return images, labels


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def train(precision: Precision | None, epochs: int = 6, hooks=()):
    """Loss of every epoch and the trained network, through train_epochs."""
    images, labels = tiny_problem()
    net = tiny_net()
    run = precision.prepare(net) if precision else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    losses = []

    class Record(Hook):
        def after_epoch(self, epoch, means):
            losses.append(means["loss"])

    train_epochs(run, optimizer, epochs, lr=None, precision=precision, hooks=[Record(), *hooks],
                 batches=lambda epoch: [(images[i:i + 16], labels[i:i + 16]) for i in range(0, 64, 16)],
                 loss=lambda batch, epoch: (F.cross_entropy(run(batch[0]), batch[1]), {}))
    return losses, net


def test_default_loop_is_a_plain_fp32_loop():
    """No precision object: exactly the arithmetic of a hand-written loop (CPU runs keep their numbers)."""
    losses, net = train(None, epochs=3)
    images, labels = tiny_problem()
    plain = tiny_net()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.2, momentum=0.9)
    expected = []
    for _ in range(3):
        total = 0.0
        for i in range(0, 64, 16):
            loss = F.cross_entropy(plain(images[i:i + 16]), labels[i:i + 16])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        expected.append(total / 4)
    assert losses == expected
    for a, b in zip(net.parameters(), plain.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains_on_cpu(precision):
    """bf16 and fp16 autocast both work on CPU with this torch; fp16 with a gradient scaler. The
    convolution computes in the low precision, the weights stay fp32, and the loss falls."""
    dtypes = []
    setup = Precision("cpu", precision)
    losses, net = train(setup)
    with setup.autocast():
        handle = net[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        net(tiny_problem()[0][:2])
        handle.remove()
    assert dtypes == [{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]]
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert (setup.scaler is not None) == (precision == "fp16")
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


def first_gradient(precision: Precision | None) -> torch.Tensor:
    """The first layer's weight gradient as an ``after_backward`` hook (a method's gradient surgery) sees it."""
    net, (images, labels), seen = tiny_net(), tiny_problem(), []

    class Grad(Hook):
        def after_backward(self):
            seen.append(net[0].weight.grad.clone())

    train_epochs(net, torch.optim.SGD(net.parameters(), lr=0.1), 1, lr=None, precision=precision, hooks=[Grad()],
                 batches=lambda epoch: [(images, labels)],
                 loss=lambda batch, epoch: (F.cross_entropy(net(batch[0]), batch[1]), {}))
    return seen[0]


def test_fp16_hooks_see_unscaled_gradients():
    """The scaler multiplies the loss by 2**16; the hooks see the gradient divided back (fp16 rounding aside)."""
    fp32, fp16 = first_gradient(None), first_gradient(Precision("cpu", "fp16"))
    assert fp16.abs().max() > 0
    torch.testing.assert_close(fp16, fp32, rtol=0.05, atol=1e-3)


def test_channels_last_trains_like_nchw():
    setup = Precision("cpu", channels_last=True)
    (batch,) = list(setup.batches([(tiny_problem()[0][:4], torch.zeros(4))]))
    assert batch[0].is_contiguous(memory_format=torch.channels_last) and batch[1].dim() == 1
    losses, net = train(setup, epochs=3)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    reference, _ = train(None, epochs=3)
    assert losses == pytest.approx(reference, rel=1e-4)


def test_compile_wraps_the_forward_and_keeps_the_saved_keys():
    """torch.compile is lazy: the wrapped module compiles at its first call (tens of seconds for a
    small network on this 2-core machine, so it is measured by bench/gpu_step.py, not run here)."""
    net = tiny_net()
    keys = list(net.state_dict())
    run = Precision("cpu", compile=True).prepare(net)
    assert isinstance(run, torch._dynamo.eval_frame.OptimizedModule) and run._orig_mod is net
    assert list(net.state_dict()) == keys  # the worker saves the module's own state_dict


# -- throughput and MFU ---------------------------------------------------------------------------------------
def test_flops_images_per_second_by_hand():
    """MLP 5 -> 7 -> 3, batches of 4: forward 2·(5·7 + 7·3) per image; backward 2·7·3 for the second
    layer's input gradient and 2·(5·7 + 7·3) for the weight gradients (the images need no gradient)."""
    ticks = iter(range(100))
    meter = Throughput("cpu", warmup_batches=1, clock=lambda: float(next(ticks)))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(12, 5), torch.arange(12) % 3
    train_epochs(net, torch.optim.SGD(net.parameters(), lr=0.1), 1, lr=None, hooks=[meter],
                 batches=lambda epoch: [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)],
                 loss=lambda batch, epoch: (F.cross_entropy(net(batch[0]), batch[1]), {}))
    assert meter.flops_per_image == 2 * (5 * 7 + 7 * 3) + 2 * 7 * 3 + 2 * (5 * 7 + 7 * 3)
    record = meter.record(world_size=2)
    # clock: epoch starts at 0, the warm-up batch ends at 1, the epoch at 2: 8 images in 1 s per rank
    assert (record["timed_images"], record["timed_seconds"]) == (8, 1.0)
    assert record["images_per_second_per_device"] == 8.0 and record["images_per_second"] == 16.0
    assert record["mfu"] is None and "cpu" in record["mfu_note"]


def test_a_single_batch_step_is_timed_with_its_warm_up():
    ticks = iter(range(100))
    meter = Throughput("cpu", clock=lambda: float(next(ticks)))
    meter.before_epoch(0)
    meter.after_batch((torch.zeros(5, 1),), torch.tensor(0.0))
    meter.after_epoch(0, {})
    record = meter.record()
    assert record["includes_warmup"] and record["timed_images"] == 5 and record["images_per_second"] == 2.5


def test_peak_table_and_mfu_formula():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "tf32") == 494.7
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 units
    assert peak_tflops("Tesla V100-SXM2-16GB", "tf32") == 15.7  # tf32 runs as fp32 there
    assert peak_tflops("NVIDIA A10G", "bf16") is None  # not the A10: unlisted, no guess
    assert peak_tflops("NVIDIA L4", "bf16") == 121.0 and peak_tflops("NVIDIA L40S", "bf16") == 362.1
    # 12.3 GFLOP per image at 2000 images/s on a 989.4 TFLOP/s device
    assert mfu(12.3e9, 2000.0, 989.4e12) == pytest.approx(12.3e9 * 2000 / 989.4e12)
    peak, note = device_peak(torch.device("cpu"), "bf16")
    assert peak is None and "cpu" in note


# -- without Ray ----------------------------------------------------------------------------------------------
BLOCK_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked in this test")
sys.meta_path.insert(0, NoRay())
sys.argv = ["gpu_step.py", "--device", "cpu", "--options", "bf16,channels_last", "--backbone", "small_cnn",
            "--width", "4", "--image-size", "8", "--batch-size", "4", "--batches", "1", "--warmup", "1", "--classes", "3"]
import runpy
runpy.run_path("bench/gpu_step.py", run_name="__main__")
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules)
"""


def test_the_loop_and_its_benchmark_run_without_ray():
    """A GPU machine with torch and no Ray runs bench/gpu_step.py (the loop, precision, throughput)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", BLOCK_RAY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["fp32"], ["bf16"], ["channels_last"])}
    assert set(rows) == {"fp32", "bf16", "channels_last"} and rows["fp32"][2] == "1.00"
