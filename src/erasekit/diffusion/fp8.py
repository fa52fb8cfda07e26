"""FP8 matrix products in the fast UNet, opt-in (``generate(fast="fp8")``, ``--precision fp8``, a bench's
``precision: fp8``), for GPUs with FP8 tensor cores (CUDA compute capability 8.9+: Ada, Hopper, Blackwell).

What changes: inside the fast UNet's calls (`erasekit.diffusion.speed.FastUNet`), the UNet's linear layers and 1x1
convolutions multiply in float8 (e4m3): activations quantised per row as they arrive (one scale per token or pixel),
weights per output channel, products through ``torch._scaled_mm`` (cuBLAS/CUTLASS FP8 kernels, fp32
accumulation, bf16 out), so torch.compile fuses each activation's quantisation into one kernel before the product.
Images change (FP8 keeps 3 mantissa bits): they are keyed apart (`precision_of` / `erasekit.generation.target_key`)
and recorded as ``precision: fp8``.

What stays in the model's precision: 3x3 convolutions (half the SD-1.x UNet's FLOPs; torch has no FP8
convolution), attention's own products (scaled-dot-product kernels), norms, the timestep embedding, and the
cross-attention keys and values (``attn2.to_k`` / ``to_v``: 0.4% of the FLOPs, 77 text tokens, and the weights
closed-form erasers edit, kept exact). Experimental, its own precision ``fp8-conv``: the stride-1 3x3 convolutions
too, as one FP8 product over the unfolded input (each pixel's 3x3 neighbourhood as a row of 9 x channels, written
once in float8 by the fused quantisation; one scale per image, since a row mixes nine pixels): the unfolded
activations cost 9 bytes a channel a pixel of memory traffic, which pays only where the product is long
(deeper, wider levels); measured, not assumed (scripts/bench_fp8.py).

How weight edits stay seen: the layers are the UNet's own modules (their class is switched to an FP8 subclass:
parameter names, hooks, attention processors, fingerprints unchanged; outside the fast call they compute as before,
also with gradients). Each keeps a float8 copy of its weight beside the parameter and re-quantises it before a fast
call when the parameter changed (its version counter moves on every in-place copy, which is how `Target.active`
applies and reverts edits). A quantised copy of the whole UNet would not see the defences' hooks and processors,
which are installed on the UNet itself.

torchao's float8 inference recipe (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``) does the
same for ``nn.Linear`` and is used when asked for (precision ``fp8-torchao``, ``pip install
'erasekit[fp8]'``): its per-row scaling needs bf16 weights and it replaces the weight parameter itself (edits could
no longer be copied into it), so here it quantises a bf16 shadow of each weight, re-quantised in place like ours.
Our own kernel path is the default because it also covers 1x1 convolutions and fp16 models, and runs on the CPU
(``torch._scaled_mm`` has a CPU kernel), which is how the tests check the arithmetic.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError

# Each precision names its whole arithmetic (so an image key that names the precision names how it was computed):
# precision -> (backend, 3x3 convolutions too).
FP8_MODES = {"fp8": ("scaled_mm", False), "fp8-conv": ("scaled_mm", True), "fp8-torchao": ("torchao", False)}
PRECISIONS = ("default", *FP8_MODES)
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)
# Layers that keep the model's precision (name fragments): per-sample vectors (timestep and added embeddings: one row
# per image, no speed to gain) and the cross-attention keys/values (text tokens; what closed-form edits change).
KEEP = ("time_embedding", "add_embedding", "time_emb_proj", "encoder_hid_proj", "attn2.to_k", "attn2.to_v")
BACKENDS = ("scaled_mm", "torchao")


def precision_of(fast) -> str | None:
    """The precision a ``fast`` value asks for: None (not fast: False / None), "default" (True), or one of
    `FP8_MODES` ("fp8", "fp8-conv", "fp8-torchao")."""
    if fast is None or fast is False:
        return None
    if fast is True:
        return "default"
    if isinstance(fast, str) and fast.strip().lower() in PRECISIONS:
        return fast.strip().lower()
    raise ErasekitError(f"fast must be true, false or one of {', '.join(PRECISIONS)}, got {fast!r}")


def parse_precision(value: str) -> str:
    v = str(value).strip().lower()
    if v not in PRECISIONS:
        raise ErasekitError(f"--precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return v


def fp8_supported(device) -> tuple[bool, str]:
    """(FP8 tensor cores on ``device``?, what it is)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"this run is on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    return cap >= MIN_CAPABILITY, f"{name} is compute capability {cap[0]}.{cap[1]}"


def check_fp8_device(device) -> None:
    ok, what = fp8_supported(device)
    if not ok:
        raise ErasekitError(f"precision fp8 needs a CUDA GPU with FP8 tensor cores (compute capability "
                            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: Ada, Hopper, Blackwell); {what}")


# -- quantisation ---------------------------------------------------------------------------------------------------
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 rows, float32 scales (rows, 1)) with x ~ q * scale: each row's largest magnitude maps to 448."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_matmul(x2: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 (M, K) @ W^T in FP8, W given as (N, K) float8 rows with scales (1, N); result (M, N) in x2's dtype."""
    x8, x_scale = quantize_rows(x2)
    fused_bias = bias is not None and x2.dtype == torch.bfloat16
    y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=bias if fused_bias else None,
                         out_dtype=torch.bfloat16, use_fast_accum=x2.is_cuda)
    y = y.to(x2.dtype)
    return y + bias if bias is not None and not fused_bias else y


class _State:
    """Shared by the converted layers of one UNet: whether they compute in FP8 now (only inside a fast call), the
    3x3 convolutions too (precision fp8-conv)."""

    def __init__(self, backend: str):
        self.on = False
        self.convs = False
        self.backend = backend


class _FP8Mixin:
    """The float8 copy of the layer's weight (2-D: out x in), refreshed when the parameter changes."""

    _fp8_state: _State

    def _fp8_weight_2d(self) -> torch.Tensor:
        w = self.weight
        return w.reshape(w.shape[0], -1) if w.ndim == 4 else w

    def _fp8_signature(self):
        w = self.weight
        return (w._version, w.data_ptr(), w.dtype, w.device)

    def fp8_refresh(self) -> bool:
        """Re-quantise the weight if it changed since the last time (an edit applied or reverted); True if it did."""
        sig = self._fp8_signature()
        if getattr(self, "_fp8_sig", None) == sig:
            return False
        with torch.no_grad(), torch.inference_mode(False):
            w2 = self._fp8_weight_2d().detach()
            if self._fp8_state.backend == "torchao":
                _torchao_refresh(self, w2)
            else:
                q, s = quantize_rows(w2)
                old = getattr(self, "fp8_weight", None)
                if old is not None and old.shape == q.shape and old.dtype == q.dtype and old.device == q.device:
                    old.copy_(q)  # in place: the compiled graph keeps reading the same tensors
                    self.fp8_scale.copy_(s.t())
                else:
                    self.register_buffer("fp8_weight", q, persistent=False)
                    self.register_buffer("fp8_scale", s.t().contiguous(), persistent=False)
        self._fp8_sig = self._fp8_signature()
        return True


class FP8Linear(_FP8Mixin, torch.nn.Linear):
    def forward(self, x):
        if not self._fp8_state.on:
            return super().forward(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._fp8_state.backend == "torchao":
            y = self._fp8_ao(x2.to(torch.bfloat16))
            y = y.to(x.dtype) + self.bias if self.bias is not None else y.to(x.dtype)
        else:
            y = fp8_matmul(x2, self.fp8_weight, self.fp8_scale, self.bias)
        return y.reshape(*shape[:-1], y.shape[-1])


class FP8Conv1x1(_FP8Mixin, torch.nn.Conv2d):
    """A 1x1 convolution as the matrix product it is: pixels as rows (channels-last: no copy)."""

    def forward(self, x):
        if not self._fp8_state.on:
            return super().forward(x)
        b, c, h, w = x.shape
        x2 = x.permute(0, 2, 3, 1).reshape(-1, c)
        y = fp8_matmul(x2, self.fp8_weight, self.fp8_scale, self.bias)
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory


class FP8Conv3x3(_FP8Mixin, torch.nn.Conv2d):
    """A stride-1, padding-1 3x3 convolution as one FP8 product over the unfolded input (precision fp8-conv):
    row = one output pixel's 3x3 neighbourhood (tap-major, channels minor), the weight (out, 3, 3, in) to match;
    the activation scale is one per image (a row mixes nine pixels, so no per-pixel scale fits it)."""

    def _fp8_weight_2d(self) -> torch.Tensor:
        w = self.weight
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)

    def forward(self, x):
        if not (self._fp8_state.on and self._fp8_state.convs):
            return super().forward(x)
        b, c, h, w = x.shape
        xf = x.float()
        scale = xf.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12) / E4M3_MAX  # (b, 1, 1, 1)
        xf = F.pad(xf, (1, 1, 1, 1))  # zero borders, quantised to 0 with the rest: one fused kernel
        q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).permute(0, 2, 3, 1).view(torch.uint8)  # (b, h+2, w+2, c)
        # the nine taps side by side as bytes (a copy of each shifted view; no float8 arithmetic), tap-major
        cols = torch.cat([q[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], dim=-1)
        cols = cols.view(E4M3).reshape(-1, 9 * c)
        x_scale = scale.reshape(b, 1).expand(b, h * w).reshape(-1, 1).contiguous()
        fused_bias = self.bias is not None and x.dtype == torch.bfloat16
        y = torch._scaled_mm(cols, self.fp8_weight.t(), scale_a=x_scale, scale_b=self.fp8_scale,
                             bias=self.bias if fused_bias else None, out_dtype=torch.bfloat16,
                             use_fast_accum=x.is_cuda).to(x.dtype)
        if self.bias is not None and not fused_bias:
            y = y + self.bias
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def _torchao_refresh(layer, w2: torch.Tensor) -> None:
    """torchao's float8 recipe on a bf16 shadow ``nn.Linear`` of the weight (the parameter itself stays ours)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    shadow = torch.nn.Linear(w2.shape[1], w2.shape[0], bias=False, device=w2.device, dtype=torch.bfloat16)
    shadow.weight.data.copy_(w2)
    quantize_(shadow, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    old = getattr(layer, "_fp8_ao", None)
    if old is None:
        object.__setattr__(layer, "_fp8_ao", shadow)  # not a submodule: state_dict and named_modules unchanged
        return
    new, cur = shadow.weight, old.weight
    for name in ("qdata", "scale"):  # Float8Tensor's data and scales, copied in place
        getattr(cur, name).copy_(getattr(new, name))


def _convertible(name: str, module, convs: bool = False) -> type | None:
    if any(k in name for k in KEEP):
        return None
    if type(module) is torch.nn.Linear:
        ok = module.in_features % 16 == 0 and module.out_features % 16 == 0  # the FP8 kernels' alignment
        return FP8Linear if ok else None
    if type(module) is torch.nn.Conv2d:
        one = (module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0)
               and module.dilation == (1, 1) and module.groups == 1)
        ok = one and module.in_channels % 16 == 0 and module.out_channels % 16 == 0
        if ok:
            return FP8Conv1x1
        three = (module.kernel_size == (3, 3) and module.stride == (1, 1) and module.padding == (1, 1)
                 and module.dilation == (1, 1) and module.groups == 1 and module.padding_mode == "zeros")
        ok = convs and three and module.in_channels % 16 == 0 and module.out_channels % 16 == 0
        return FP8Conv3x3 if ok else None
    return None


class FP8Layers:
    """The converted layers of one UNet: `refresh` before a fast call, `on` around it."""

    def __init__(self, unet, state: _State, layers: dict):
        self.unet, self.state, self.layers = unet, state, layers
        self.has_convs = False  # the 3x3 convolutions converted too (precision fp8-conv)

    def refresh(self) -> int:
        """Re-quantise the layers whose weights changed; how many did."""
        return sum(layer.fp8_refresh() for layer in self.layers.values())

    @contextlib.contextmanager
    def on(self, convs: bool = False):
        """FP8 products for the block (``convs``: the 3x3 convolutions too, precision fp8-conv)."""
        self.state.on, self.state.convs = True, bool(convs)
        try:
            yield
        finally:
            self.state.on = self.state.convs = False

    def names(self) -> list[str]:
        return list(self.layers)


_ATTR = "_erasekit_fp8_layers"


def convert_unet(unet, backend: str = "scaled_mm", any_device: bool = False, convs: bool = False) -> FP8Layers:
    """Switch ``unet``'s linear layers and 1x1 convolutions (but `KEEP`), with ``convs`` its stride-1 3x3
    convolutions too, to their FP8 subclasses, in place and idempotent (a later call with ``convs`` adds them).
    Refused (one error line) off FP8-capable GPUs unless ``any_device`` (tests, script checks: the CPU's
    ``torch._scaled_mm``)."""
    if backend not in BACKENDS:
        raise ErasekitError(f"fp8 backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not any_device:
        check_fp8_device(next(unet.parameters()).device)
    done = getattr(unet, _ATTR, None)
    if done is not None:
        if done.state.backend != backend:
            raise ErasekitError(f"this UNet already computes FP8 through {done.state.backend}, not {backend}")
        if convs and not done.has_convs:
            _switch(unet, done.state, done.layers, backend, convs=True)
            done.has_convs = True
            done.refresh()
        return done
    if backend == "torchao":
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise ErasekitError("fp8 backend torchao needs the torchao package: pip install 'erasekit[fp8]'") from None
    state = _State(backend)
    layers: dict = {}
    _switch(unet, state, layers, backend, convs)
    if not layers:
        raise ErasekitError("precision fp8: no layer of this UNet has FP8-compatible shapes (multiples of 16)")
    out = FP8Layers(unet, state, layers)
    out.has_convs = convs
    out.refresh()
    setattr(unet, _ATTR, out)
    return out


def _switch(unet, state: _State, layers: dict, backend: str, convs: bool) -> None:
    for name, module in unet.named_modules():
        cls = None if name in layers else _convertible(name, module, convs)
        if cls is None or (backend == "torchao" and cls is not FP8Linear):
            continue  # torchao's recipe: linear layers only (its convolutions need kernels torch does not ship)
        module.__class__ = cls
        module._fp8_state = state
        layers[name] = module
