"""The U-Net port: the seed's architecture and parameter counts, odd sizes, width/depth,
activation checkpointing, channels_last and autocast."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from unet.fused import inference_model
from unet.model import DoubleConv, Down, OutConv, UNet, Up, autocast_context


def seed_parameter_count(n_channels: int, n_classes: int, bilinear: bool) -> int:
    """Parameters of the seed's UNet, counted layer by layer from its definition."""

    def double_conv(cin: int, cout: int, mid: int | None = None) -> int:
        mid = mid or cout
        return 9 * cin * mid + 2 * mid + 9 * mid * cout + 2 * cout  # bias-free convs + BatchNorm

    def up(cin: int, cout: int) -> int:
        if bilinear:
            return double_conv(cin, cout, cin // 2)
        return 4 * cin * (cin // 2) + cin // 2 + double_conv(cin, cout)  # ConvTranspose2d(k=2)

    f = 2 if bilinear else 1
    return (
        double_conv(n_channels, 64)
        + double_conv(64, 128)
        + double_conv(128, 256)
        + double_conv(256, 512)
        + double_conv(512, 1024 // f)
        + up(1024, 512 // f)
        + up(512, 256 // f)
        + up(256, 128 // f)
        + up(128, 64)
        + 64 * n_classes
        + n_classes
    )


@pytest.mark.parametrize(("bilinear", "published"), [(False, 31_037_698), (True, 17_263_042)])
def test_default_widths_have_the_seed_parameter_count(bilinear: bool, published: int) -> None:
    model = UNet(3, 2, bilinear=bilinear)
    assert model.num_parameters() == seed_parameter_count(3, 2, bilinear) == published


def build_seed_layout(bilinear: bool) -> nn.Module:
    """A module with the seed's attribute names (inc, down1..4, up1..4, outc), from its own parts."""
    f = 2 if bilinear else 1
    seed = nn.Module()
    seed.inc = DoubleConv(3, 64)
    seed.down1, seed.down2, seed.down3 = Down(64, 128), Down(128, 256), Down(256, 512)
    seed.down4 = Down(512, 1024 // f)
    seed.up1, seed.up2 = Up(1024, 512 // f, bilinear), Up(512, 256 // f, bilinear)
    seed.up3, seed.up4 = Up(256, 128 // f, bilinear), Up(128, 64, bilinear)
    seed.outc = OutConv(64, 2)
    return seed


@pytest.mark.parametrize("bilinear", [False, True])
def test_seed_checkpoints_load_into_the_port(bilinear: bool) -> None:
    seed_state = build_seed_layout(bilinear).state_dict()
    model = UNet(3, 2, bilinear=bilinear)
    model.load_seed_state_dict(seed_state)
    for name, value in seed_state.items():
        assert torch.equal(model.state_dict()[UNet.seed_key_to_port(name)], value)


@pytest.mark.parametrize(("height", "width"), [(572, 572), (100, 77), (16, 16), (33, 50)])
@pytest.mark.parametrize("bilinear", [False, True])
def test_odd_input_sizes_give_full_size_logits(height: int, width: int, bilinear: bool) -> None:
    model = UNet(3, 2, bilinear=bilinear, base_channels=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, height, width))
    assert out.shape == (1, 2, height, width)


def test_width_and_depth_scale_the_network() -> None:
    small = UNet(1, 3, base_channels=8, depth=2)
    assert len(small.downs) == len(small.ups) == 2
    assert small.size_multiple == 4
    assert small.downs[-1].maxpool_conv[1].double_conv[0].out_channels == 32
    with torch.no_grad():
        assert small.eval()(torch.randn(2, 1, 40, 24)).shape == (2, 3, 40, 24)
    # The defaults are the seed's network, spelled out or not.
    explicit = UNet(3, 2, bilinear=False, base_channels=64, depth=4)
    assert [p.shape for p in explicit.parameters()] == [p.shape for p in UNet(3, 2).parameters()]


@pytest.mark.parametrize(("kwargs", "message"), [({"depth": 0}, "depth"), ({"base_channels": 0}, "base_channels")])
def test_invalid_architecture_is_rejected(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet(3, 2, **kwargs)


def _train_step(model: UNet, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    out = model(x)
    (out.square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bilinear", [False, True])
def test_checkpointing_gives_the_same_outputs_gradients_and_running_stats(bilinear: bool) -> None:
    torch.manual_seed(0)
    plain = UNet(2, 3, bilinear=bilinear, base_channels=8, depth=3).double()
    ckpt = UNet(2, 3, bilinear=bilinear, base_channels=8, depth=3).double()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.use_checkpointing()
    assert ckpt.checkpointing and not plain.checkpointing
    x = torch.randn(2, 2, 48, 40, dtype=torch.float64)

    out_plain, grads_plain = _train_step(plain, x)
    out_ckpt, grads_ckpt = _train_step(ckpt, x)

    torch.testing.assert_close(out_ckpt, out_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
    # Recomputation in backward must not update BatchNorm statistics a second time.
    for (name, buf_plain), buf_ckpt in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(buf_ckpt, buf_plain, msg=name)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from unet.model import UNet

    def status_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = UNet(3, 2, base_channels=16)
    if sys.argv[1] == "on":
        model.use_checkpointing()
    x = torch.randn(4, 3, 256, 256)
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM): imports may have set it
        f.write("5")
    loss = model(x).square().mean()
    held = status_kb("VmRSS") - before
    loss.backward()
    print(held * 1024, (status_kb("VmHWM") - before) * 1024)
    """
)


def _training_memory(mode: str) -> tuple[int, int]:
    """(bytes held between forward and backward, peak bytes of the step), in a fresh process.

    A fixed mmap threshold makes glibc return every freed tensor to the OS at once, so resident
    memory follows the live tensors instead of the allocator's cache.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, mode], capture_output=True, text=True, check=True, env=env
    )
    held, peak = result.stdout.split()
    return int(held), int(peak)


@pytest.mark.skipif(platform.system() != "Linux", reason="reads peak memory from /proc (Linux)")
def test_checkpointing_lowers_activation_and_peak_training_memory() -> None:
    held_plain, peak_plain = _training_memory("off")
    held_ckpt, peak_ckpt = _training_memory("on")
    assert held_ckpt < 0.6 * held_plain, (held_ckpt, held_plain)
    assert peak_ckpt < 0.85 * peak_plain, (peak_ckpt, peak_plain)


def test_checkpointing_is_inactive_in_eval_and_no_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    import unet.model

    calls = []

    def counting(*args, **kwargs):  # the real checkpoint, counted
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(unet.model, "checkpoint", counting)
    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=8).use_checkpointing()
    x = torch.randn(1, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    assert calls  # training with gradients: activations are checkpointed
    calls.clear()
    model.eval()
    with torch.no_grad():
        plain = UNet(3, 2, base_channels=8).eval()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x), plain(x))  # the same function
    model.train()
    with torch.no_grad():
        model(x)
    assert not calls  # neither in eval mode nor without gradients


@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_model_is_the_same_function_with_batchnorm_folded(channels_last: bool) -> None:
    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=16).eval()
    for module in model.modules():  # non-trivial statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
    fast = inference_model(model, channels_last=channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is unchanged
    with torch.no_grad():
        folded = fast(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_matches_fp32_within_dtype_tolerance(precision: str) -> None:
    if precision == "fp16" and not torch.cuda.is_available():
        precision_device = "cpu"  # fp16 autocast on CPU exists too; check it as well
    else:
        precision_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=16).eval().to(precision_device)
    x = torch.rand(1, 3, 64, 64, device=precision_device)
    with torch.no_grad():
        reference = model(x).float()
        with autocast_context(precision_device, precision):
            low = model(x)
    assert low.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    error = (low.float() - reference).abs().max() / reference.abs().max()
    assert error < 0.05, f"relative error {error:.4f} under {precision}"
    # The decision that matters downstream, the predicted class, hardly changes.
    agreement = (low.float().argmax(1) == reference.argmax(1)).float().mean()
    assert agreement > 0.97


def test_architecture_round_trips() -> None:
    model = UNet(1, 4, bilinear=True, base_channels=8, depth=3)
    clone = UNet(**model.architecture())
    assert clone.architecture() == model.architecture()
    assert [p.shape for p in clone.parameters()] == [p.shape for p in model.parameters()]
