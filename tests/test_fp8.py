"""The FP8 fast path (`erasekit.diffusion.fp8`): the arithmetic against a re-typed reference, layers converted in
place (names, hooks, eager and gradient paths unchanged), weight edits re-quantised, images keyed and recorded
apart, refusal off FP8 GPUs in one line.

The arithmetic runs here on the CPU's ``torch._scaled_mm`` (``fp8_any_device=True``); on a GPU the same call runs
cuBLAS/CUTLASS FP8 kernels (scripts/bench_fp8.py measures images/s and pixel differences there).
"""

import json

import numpy as np
import pytest
import torch


def _reference_linear(x, w, b):
    """Re-typed: each row of x and of W scaled so its largest magnitude is 448, rounded to e4m3, multiplied in fp32,
    scaled back, rounded to bf16 (the kernel's output type), then back to x's dtype with the bias."""
    def q(t):
        t = t.float()
        s = t.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0
        return (t / s).clamp(-448, 448).to(torch.float8_e4m3fn).float(), s

    xq, xs = q(x)
    wq, ws = q(w)
    y = ((xq @ wq.t()) * xs * ws.t()).to(torch.bfloat16).to(x.dtype)
    return y + b if b is not None else y


def test_fp8_linear_equals_the_retyped_reference_and_stays_close_to_float32():
    from erasekit.diffusion.fp8 import convert_unet

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 8))  # 8 outputs: not FP8-aligned
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        exact = net(x)
        layers = convert_unet(net, any_device=True)
        assert layers.names() == ["0"]  # the unaligned layer keeps its precision
        with layers.on():
            y = net(x)
        hidden = _reference_linear(x.reshape(-1, 64), net[0].weight, net[0].bias).reshape(3, 5, 48)
        ref = net[1](hidden)
    assert torch.allclose(y, ref, rtol=1e-2, atol=1e-3)
    assert ((y - exact).norm() / exact.norm()).item() < 0.06  # FP8 (3 mantissa bits): a few percent


def test_fp8_conv1x1_is_the_pixelwise_product_and_returns_channels_last():
    from erasekit.diffusion.fp8 import convert_unet

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(32, 16, 1), torch.nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layers = convert_unet(net, any_device=True)
        assert layers.names() == ["0"]  # 3x3 convolutions stay in the model's precision
        with layers.on():
            y = net[0](x)
        rows = x.permute(0, 2, 3, 1).reshape(-1, 32)
        ref = _reference_linear(rows, net[0].weight.reshape(16, 32), net[0].bias)
        ref = ref.reshape(2, 5, 7, 16).permute(0, 3, 1, 2)
    assert y.shape == (2, 16, 5, 7) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, ref, rtol=1e-2, atol=1e-3)


def test_fp8_conv3x3_is_the_product_over_the_unfolded_input():
    """Precision fp8-conv: re-typed as F.conv2d of the dequantised input (one scale per image) and weight (one per
    output channel), bf16-rounded; only inside ``on(convs=True)``."""
    from erasekit.diffusion.fp8 import convert_unet

    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Conv2d(32, 16, 3, stride=2, padding=1))
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = net[0](x)
        layers = convert_unet(net, any_device=True, convs=True)
        assert layers.names() == ["0"]  # the stride-2 convolution keeps its precision
        with layers.on():
            plain = net[0](x)  # fp8 without convs: the 3x3 convolution computes as before
        with layers.on(convs=True):
            y = net[0](x)
        s = x.abs().amax(dim=(1, 2, 3), keepdim=True) / 448.0
        xq = (x / s).to(torch.float8_e4m3fn).float() * s
        w = net[0].weight
        ws = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 448.0
        wq = (w / ws).to(torch.float8_e4m3fn).float() * ws
        ref = torch.nn.functional.conv2d(xq, wq, padding=1).to(torch.bfloat16).float() + net[0].bias[:, None, None]
    assert torch.equal(plain, exact)
    assert y.shape == exact.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, ref, rtol=2e-2, atol=2e-3)
    assert ((y - exact).norm() / exact.norm()).item() < 0.08


def test_conversion_keeps_names_hooks_gradients_and_kept_layers(tiny_sd1):
    """In place on the UNet's own modules: the state dict and fingerprint are the same, outside a fast call the UNet
    computes bit for bit as before (gradients too), forward hooks still run, the text K/V projections are kept."""
    from erasekit.diffusion.fp8 import convert_unet
    from erasekit.models.fingerprint import fingerprint
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")
    unet = pipe.unet
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(500.0)
    c = torch.randn(2, 77, unet.config.cross_attention_dim)
    keys, fp = list(unet.state_dict()), fingerprint(pipe)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=c).sample
    layers = convert_unet(unet, any_device=True)
    assert list(unet.state_dict()) == keys and fingerprint(pipe) == fp
    assert any(n.endswith("attn1.to_q") for n in layers.names()) and any("proj_in" in n for n in layers.names())
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v")) or "time_emb" in n for n in layers.names())
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, before)
    calls = []
    name = layers.names()[1]
    handle = dict(unet.named_modules())[name].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), layers.on():
            fp8 = unet(x, t, encoder_hidden_states=c).sample
    finally:
        handle.remove()
    assert calls and not torch.equal(fp8, before)
    assert ((fp8 - before).norm() / before.norm()).item() < 0.15
    c.requires_grad_(True)
    unet(x, t, encoder_hidden_states=c).sample.sum().backward()  # eager training paths are untouched
    assert c.grad is not None and torch.isfinite(c.grad).all()
    assert convert_unet(unet, any_device=True) is layers  # idempotent


def test_fp8_layers_requantise_when_a_weight_changes_in_place():
    from erasekit.diffusion.fp8 import convert_unet

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32))
    layers = convert_unet(net, any_device=True)
    x = torch.randn(4, 32)
    assert layers.refresh() == 0  # nothing changed since the conversion
    saved = net[0].weight.detach().clone()
    with torch.inference_mode():  # as Target.active applies an edit inside generate
        with torch.no_grad():
            net[0].weight.mul_(-2.0)
        assert layers.refresh() == 1
        with layers.on():
            y = net(x)
        assert torch.allclose(y, _reference_linear(x, net[0].weight, net[0].bias), rtol=1e-2, atol=1e-3)
        with torch.no_grad():
            net[0].weight.copy_(saved)  # reverted
        assert layers.refresh() == 1
        with layers.on():
            back = net(x)
    assert torch.allclose(back, _reference_linear(x, saved, net[0].bias), rtol=1e-2, atol=1e-3)


def test_fp8_fast_generation_sees_edits_and_is_its_own_fast_unet():
    """accelerate(precision="fp8") beside the default fast UNet (one decoder); an edit applied through a Target is
    re-quantised before the fast call: the fp8 images of the edited model are near its eager ones, far from before."""
    from erasekit.diffusion import Target
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.erasers.base import WeightEdit
    from erasekit.generation import generate
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")
    opts = SpeedOptions(backend="aot_eager", fp8_any_device=True)
    default = accelerate(pipe, opts)
    fp8 = accelerate(pipe, opts, precision="fp8")
    assert fp8 is not default and fp8.fp8 is not None and default.fp8 is None and fp8.decoder is default.decoder
    assert accelerate(pipe, precision="default") is default and accelerate(pipe, precision="fp8") is fp8
    seeds = [0, 1]
    eager = generate(pipe, "a star", seeds, steps=2, progress=False)
    plain = generate(pipe, "a star", seeds, steps=2, progress=False, fast="fp8")
    assert np.abs(plain.astype(int) - eager).mean() < 8
    name = "unet." + [n for n in fp8.fp8.names() if n.endswith("attn1.to_q")][0] + ".weight"
    from erasekit.erasers.base import _parameter

    w = _parameter(pipe, name)
    edit = WeightEdit(method="test", tensors={name: (-3.0 * w).detach().clone()}, settings={}, spec={},
                      base_fingerprint=None)
    edited = Target(pipe).with_edits(edit)
    fast_edited = generate(edited, "a star", seeds, steps=2, progress=False, fast="fp8")
    eager_edited = generate(edited, "a star", seeds, steps=2, progress=False)
    assert np.abs(fast_edited.astype(int) - eager_edited).mean() < np.abs(fast_edited.astype(int) - plain).mean()
    again = generate(pipe, "a star", seeds, steps=2, progress=False, fast="fp8")  # edit reverted: re-quantised back
    assert np.abs(again.astype(int) - plain).max() <= 1


def test_fp8_images_are_keyed_and_recorded_apart(tmp_path):
    from erasekit.diffusion import Target
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.generation import GenerationInputs, generate_to_dir, target_key
    from erasekit.image_store import record_key
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")
    target = Target(pipe)
    keys = {target_key(target, v) for v in (False, True, "fp8", "fp8-conv", "fp8-torchao")}
    assert len(keys) == 5 and target_key(target, "default") == target_key(target, True)
    accelerate(pipe, SpeedOptions(compile=False, fp8_any_device=True), precision="fp8")
    inputs = GenerationInputs(["a red star"] * 2, [0, 1])
    fp8, made = generate_to_dir(target, inputs, tmp_path, steps=2, batch_size=2, progress=False, fast="fp8")
    assert made == 2 and all(r["precision"] == "fp8" and r["fast"] is True for r in fp8)
    accelerate(pipe, precision="default")
    fast, made = generate_to_dir(target, inputs, tmp_path, steps=2, batch_size=2, progress=False, fast=True)
    assert made == 2 and not any("precision" in r for r in fast)  # default-precision records as before
    assert {record_key(r) for r in fp8}.isdisjoint(record_key(r) for r in fast)
    again, made = generate_to_dir(target, inputs, tmp_path, steps=2, batch_size=2, progress=False, fast="fp8")
    assert made == 0
    index = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    assert sum(r.get("precision") == "fp8" for r in index) == 2


def test_precision_values_and_refusals():
    from erasekit.diffusion.fp8 import check_fp8_device, precision_of
    from erasekit.errors import ErasekitError

    assert [precision_of(v) for v in (False, None, True, "fp8", "FP8", "default")] == \
        [None, None, "default", "fp8", "fp8", "default"]
    with pytest.raises(ErasekitError, match="fast must be"):
        precision_of("fp4")
    with pytest.raises(ErasekitError, match=r"compute capability 8\.9\+.*this run is on cpu"):
        check_fp8_device("cpu")
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.models.tiny import tiny_sd_pipeline

    with pytest.raises(ErasekitError, match="FP8 tensor cores"):
        accelerate(tiny_sd_pipeline("sd1"), SpeedOptions(backend="aot_eager"), precision="fp8")


def test_cli_precision_fp8_is_refused_on_the_cpu_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["generate", "a star", "--model", "toy", "-n", "1", "--precision", "fp8",
                              "--device", "cpu", "--out", str(tmp_path / "g")])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: precision fp8 needs a CUDA GPU")
    res = runner.invoke(app, ["generate", "a star", "--model", "toy", "-n", "1", "--precision", "fp16",
                              "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "--precision must be one of default, fp8" in res.output
    assert not (tmp_path / "g").exists()
    res = runner.invoke(app, ["attack", "--scenario", "text", "--concept", "star", "--precision", "fp8", "--device",
                              "cpu", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and res.output.strip().startswith("error: precision fp8 needs a CUDA GPU")


def test_bench_precision_fp8_is_refused_on_the_cpu_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app

    res = CliRunner().invoke(app, ["bench", "--set", "precision=fp8", "--out", str(tmp_path / "b")])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: precision fp8 needs a CUDA GPU")
    assert not (tmp_path / "b").exists()


def test_bench_config_precision_is_validated_and_keyed():
    from erasekit.bench.spec import BenchConfig, fast_value, validate
    from erasekit.errors import ErasekitError

    base = BenchConfig()
    assert "precision" not in base.identity()  # configs written before fp8 keep their keys
    fp8 = BenchConfig(precision="fp8", fast=True)
    validate(fp8)
    assert fp8.identity()["precision"] == "fp8" and fast_value(fp8) == "fp8" and fast_value(BenchConfig(fast=True))
    with pytest.raises(ErasekitError, match="precision must be one of"):
        validate(BenchConfig(precision="int8"))
    with pytest.raises(ErasekitError, match="fp8 runs in fast mode"):
        validate(BenchConfig(precision="fp8", fast=False))


def test_torchao_backend_when_installed(monkeypatch):
    """torchao's float8 recipe (optional extra) on the same layers: its hardware check passed for the CPU here."""
    pytest.importorskip("torchao")
    import torchao.quantization.quant_api as quant_api

    from erasekit.diffusion.fp8 import convert_unet

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *a, **k: None)
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(6, 64)
    with torch.no_grad():
        exact = net(x)
        layers = convert_unet(net, backend="torchao", any_device=True)  # what precision fp8-torchao converts
        with layers.on():
            y = net(x)
        assert ((y - exact).norm() / exact.norm()).item() < 0.06
        net[0].weight.mul_(-1.0)
        assert layers.refresh() == 1
        with layers.on():
            flipped = net(x)
    assert ((flipped - (-exact + 2 * net[0].bias)).norm() / exact.norm()).item() < 0.06


def test_fp8_conv_precision_adds_the_3x3_convolutions_to_the_same_unet():
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.generation import generate
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")
    opts = SpeedOptions(compile=False, fp8_any_device=True)  # the plumbing (tracing: the test above)
    fp8 = accelerate(pipe, opts, precision="fp8")
    n_linear = len(fp8.fp8.layers)
    conv = accelerate(pipe, opts, precision="fp8-conv")
    assert conv.fp8 is fp8.fp8 and len(conv.fp8.layers) > n_linear and conv.fp8.has_convs
    eager = generate(pipe, "a star", [0, 1], steps=2, progress=False)
    a = generate(pipe, "a star", [0, 1], steps=2, progress=False, fast="fp8")
    b = generate(pipe, "a star", [0, 1], steps=2, progress=False, fast="fp8-conv")
    assert np.abs(a.astype(int) - b).max() > 0  # the 3x3 convolutions computed in FP8 only under fp8-conv
    assert np.abs(b.astype(int) - eager).mean() < 12
    assert np.abs(generate(pipe, "a star", [0, 1], steps=2, progress=False, fast="fp8").astype(int) - a).max() <= 1


@pytest.mark.slow
def test_bench_fp8_script_quick(tmp_path):
    """scripts/bench_fp8.py --quick (what the GPU run does, tiny and on the CPU): every section writes its figures."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_fp8.py"
    spec = importlib.util.spec_from_file_location("bench_fp8", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fp8.json"
    module.main(["--quick", "--toy-n", "4", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["sd14_fp8"]["fp8_layers"] > 0 and data["sd14_fp8"]["vs_default"]["images"] == 2
    assert data["toy_uce_fp8_vs_default"]["paired_images"] == 4 and "crr_difference" in data["toy_uce_fp8_vs_default"]
