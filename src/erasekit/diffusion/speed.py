"""Generation at the speed of the GPU, opt-in: ``generate(..., fast=True)`` or `accelerate(pipe)`.

What it does, all of it image-preserving (results equal the eager path up to kernel rounding; tests/test_speed.py
states the tolerance):

- channels-last memory format for the UNet and VAE convolutions (in place; parameter names and values unchanged,
  so weight edits, fingerprints and hooks see the same module);
- ``torch.compile`` of the UNet's forward (default mode, ``dynamic=False``): compiled once per input shape and
  reused for every later batch. A smaller final batch is padded up to a shape that is already compiled (the padding
  rows are copies of the last row and are dropped), so a run compiles once, not once more for its remainder;
- the batch size chosen from free GPU memory (`auto_batch_size`), measured with one small UNet call;
- ``torch.compile`` of the VAE decoder too (decoding is about a tenth of SD-1.x generation at batch 64), with the
  same padding to an already-compiled batch size;
- cuDNN's autotuner for the convolutions (``cudnn_benchmark``), and, opt-in, inductor settings for
  convolution-heavy UNets (``tuned_kernels``: 1x1 convolutions as matrix products, coordinate-descent tuning of the
  generated kernels' launch shapes, no epilogue fusion into templates), passed to this ``torch.compile`` call only;
- the VAE decoding a whole batch in one call (``decode_batch``: cap it to bound memory);
- half precision on CUDA is the CLI's ``--dtype auto`` already; training loops (textual inversion, ESD) run under
  `train_autocast`: bf16 autocast on CUDA, nothing on the CPU (no bf16 units there: slower).
- compilation cached on disk (`use_compile_cache`: inductor's FX-graph and AOT-autograd caches in one folder per
  user, ``~/.cache/erasekit/inductor``, or ``$ERASEKIT_COMPILE_CACHE``, or a bench's ``compile_cache``): a later
  process loads the kernels instead of generating them again; `compile_stats` counts seconds, graphs and hits;
- `auto_fast`: the rule of ``fast: auto`` (bench, ``erasekit generate``): compiled on CUDA once the UNet rows repay
  a cold compilation, eager on the CPU.

The compiled forward shares the UNet's parameters: weight edits copied in place (`Target.active`) are seen without
recompiling. Anything that changes images (max-autotune kernels, reduced-precision reductions) is not here and
would be a separate, never-default mode.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

_ATTR = "_erasekit_fast_unet"
_BY_PRECISION = "_erasekit_fast_unets"  # precision -> the FastUNet made for it (_ATTR is the one in use)


@dataclass
class SpeedOptions:
    channels_last: bool = True
    compile: bool = True
    compile_vae: bool = True  # the VAE decoder through torch.compile as well
    # INDUCTOR_TUNING for both compiled modules (default mode only). Off by default: on an H100 it made SD-1.4-shaped
    # generation 1% faster (4.39 against 4.35 images/s, within noise) for a 391 s compilation instead of 95 s.
    tuned_kernels: bool = False
    cudnn_benchmark: bool = True  # cuDNN picks the fastest algorithm per convolution shape (CUDA)
    mode: str | None = None  # torch.compile mode; None = default (max-autotune takes > 8 minutes on SD's UNet)
    backend: str = "inductor"  # torch.compile backend ("aot_eager": tracing without code generation, for tests)
    decode_batch: int | None = None  # VAE images per decode call (None: the whole batch at once)
    # "fp8": the UNet's linear layers and 1x1 convolutions multiply in float8 inside the fast call (images change:
    # keyed apart; `erasekit.diffusion.fp8`); "fp8-conv" (experimental): its 3x3 convolutions too; "fp8-torchao":
    # the linear layers through torchao's float8 recipe (erasekit[fp8]). CUDA compute capability 8.9+ only, unless
    # fp8_any_device (tests, script checks: the same arithmetic through the CPU's torch._scaled_mm).
    precision: str = "default"
    fp8_any_device: bool = False


# Inductor settings for convolution-heavy diffusion models (those the diffusers team recommends for its UNets); they
# change which kernels run, not what is computed.
INDUCTOR_TUNING = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False}


def _compile(module_or_fn, options: SpeedOptions):
    extra = {}
    if options.tuned_kernels and options.backend == "inductor" and options.mode is None:
        extra["options"] = dict(INDUCTOR_TUNING)
    return torch.compile(module_or_fn, mode=options.mode, backend=options.backend, dynamic=False, **extra)


class FastUNet:
    """Callable like the UNet (``unet(x, t, **kwargs).sample``), through its compiled forward, with batch padding
    to already-compiled shapes. ``.device``, ``.dtype``, ``.config`` are the UNet's."""

    def __init__(self, unet, options: SpeedOptions):
        self.unet = unet
        self.options = options
        self.fp8 = None  # the UNet's FP8 layers (precision "fp8"): re-quantised when edits change weights
        if options.precision != "default":
            from erasekit.diffusion.fp8 import FP8_MODES, convert_unet

            backend, convs = FP8_MODES[options.precision]
            self.fp8 = convert_unet(unet, backend, options.fp8_any_device, convs=convs)
        self.compiled = _compile(unet, options) if options.compile else unet
        self.batch_sizes: set[int] = set()  # batch sizes compiled so far (per the other dims' shapes, see _key)
        self.calls = 0

    def __getattr__(self, name):  # device, dtype, config, ...
        return getattr(self.unet, name)

    def _padded_size(self, key, n: int) -> int:
        fits = [b for k, b in self.batch_sizes if k == key and b >= n]
        return min(fits) if fits else n

    def __call__(self, x: torch.Tensor, t, encoder_hidden_states=None, added_cond_kwargs=None, **kwargs):
        n = x.shape[0]
        from erasekit.diffusion.attention import capture_variant

        key = (tuple(x.shape[1:]), None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape[1:]),
               x.dtype, str(x.device), capture_variant(self.unet))
        size = self._padded_size(key, n)
        self.batch_sizes.add((key, size))
        self.calls += 1
        if size != n:
            x = _pad(x, size)
            encoder_hidden_states = _pad(encoder_hidden_states, size)
            if added_cond_kwargs:
                added_cond_kwargs = {k: _pad(v, size) for k, v in added_cond_kwargs.items()}
            if torch.is_tensor(t) and t.ndim == 1 and len(t) == n:
                t = _pad(t, size)
        # The timestep as a tensor on the UNet's device: a graph input, not a per-step constant (no step recompiles,
        # no host-to-device copy inside the graph).
        t = t.to(x.device) if torch.is_tensor(t) else torch.as_tensor(t, device=x.device)
        if self.options.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fp8 is not None:
            self.fp8.refresh()  # weights an edit changed since the last call (Target.active copies in place)
        with self.fp8.on(self.options.precision == "fp8-conv") if self.fp8 is not None else contextlib.nullcontext():
            out = self.compiled(x, t, encoder_hidden_states=encoder_hidden_states,
                                added_cond_kwargs=added_cond_kwargs, **kwargs)
        sample = out.sample if hasattr(out, "sample") else out[0]
        if size != n:
            sample = sample[:n]
        return _Output(sample.contiguous())


class FastDecoder:
    """``vae.decode(z).sample`` through a compiled decode, with batch padding to already-compiled shapes."""

    def __init__(self, vae, options: SpeedOptions):
        self.vae = vae
        self.options = options
        self.compiled = _compile(vae.decode, options)
        self.batch_sizes: set[tuple] = set()

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        key = (tuple(z.shape[1:]), z.dtype, str(z.device))
        fits = [b for k, b in self.batch_sizes if k == key and b >= n]
        size = min(fits) if fits else n
        self.batch_sizes.add((key, size))
        if size != n:
            z = _pad(z, size)
        if self.options.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.compiled(z).sample[:n]


class _Output:
    def __init__(self, sample):
        self.sample = sample


def _pad(v, size: int):
    if v is None or not torch.is_tensor(v) or v.ndim == 0 or v.shape[0] >= size:
        return v
    extra = v[-1:].expand(size - v.shape[0], *v.shape[1:])
    return torch.cat([v, extra])


def accelerate(pipe, options: SpeedOptions | None = None, precision: str | None = None) -> FastUNet:
    """Make ``pipe`` fast (idempotent: the second call returns the first call's `FastUNet`). Compilation is cached
    on disk (`use_compile_cache`, unless the caller chose a folder already), so a later process does not recompile.
    ``precision`` ("default" / "fp8"; None: ``options``', else the current one's) picks the fast UNet of that
    precision, made once per pipeline (they share the pipeline's weights and its compiled decoder)."""
    fast = getattr(pipe, _ATTR, None)
    want = precision or (options.precision if options is not None else
                         fast.options.precision if fast is not None else "default")
    from dataclasses import replace

    from erasekit.diffusion.fp8 import PRECISIONS

    if want not in PRECISIONS:
        from erasekit.errors import ErasekitError

        raise ErasekitError(f"precision must be one of {', '.join(PRECISIONS)}, got {want!r}")
    made = getattr(pipe, _BY_PRECISION, {})
    if want in made:
        setattr(pipe, _ATTR, made[want])
        return made[want]
    if fast is not None:  # another precision: the same options, its own compiled UNet, the same decoder
        other = FastUNet(pipe.unet, replace(options or fast.options, precision=want))
        other.decoder = fast.decoder
        setattr(pipe, _BY_PRECISION, dict(made, **{want: other}))
        setattr(pipe, _ATTR, other)
        return other
    options = replace(options or SpeedOptions(), precision=want)
    use_compile_cache()
    from erasekit.diffusion.family import family_of

    if family_of(pipe).flow:
        from erasekit.errors import ErasekitError

        raise ErasekitError(f"fast mode compiles UNets; {family_of(pipe).name} pipelines run without --fast")
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.cudnn_benchmark and pipe.unet.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fast = FastUNet(pipe.unet, options)
    fast.decoder = FastDecoder(pipe.vae, options) if options.compile and options.compile_vae else None
    setattr(pipe, _ATTR, fast)
    setattr(pipe, _BY_PRECISION, {want: fast})
    return fast


def unet_for(pipe):
    """The fast UNet when `accelerate` was applied to ``pipe``, else the family's plain denoiser (the UNet, or
    SD3's / FLUX's transformer)."""
    fast = getattr(pipe, _ATTR, None)
    if fast is not None and fast.unet is getattr(pipe, "unet", None):
        return fast
    from erasekit.diffusion.family import family_of

    return family_of(pipe).denoiser(pipe)


def vae_decode_for(pipe, vae):
    """``z -> vae.decode(z).sample``: compiled when `accelerate` compiled ``pipe``'s decoder and ``vae`` is it."""
    fast = getattr(pipe, _ATTR, None)
    decoder = getattr(fast, "decoder", None)
    if decoder is not None and decoder.vae is vae:
        return decoder
    return lambda z: vae.decode(z).sample


def decode_batch(pipe) -> int | None:
    fast = getattr(pipe, _ATTR, None)
    return fast.options.decode_batch if fast is not None else None


def auto_batch_size(pipe, family, height: int, width: int, guidance_scale: float = 7.5, cap: int = 128,
                    headroom: float = 0.8, default: int = 32) -> int:
    """Images per batch that fit the free GPU memory: one eager UNet call at batch 2 measures the activation
    memory per UNet row; ``headroom`` of the free memory is shared among ``2`` rows per image under guidance.
    ``family`` (`erasekit.diffusion.family.family_of(pipe)`) encodes the probe's empty prompts.
    A multiple of 8 (or a power of two below 8), at most ``cap``; ``default`` on the CPU. (SD-1.4 shape, H100,
    compiled: 4.41 images/s at 64 a batch, 4.47 at 128: larger batches still help a little.)"""
    unet = family.denoiser(pipe)
    if unet.device.type != "cuda":
        return default
    rows = 2 if guidance_scale > 1.0 else 1
    from erasekit.diffusion.guidance import UNetDenoiser

    cond = family.encode(pipe, ["", ""], device=unet.device, size=(height, width)).to(unet.device, unet.dtype)
    x = torch.zeros(2, *family.latent_shape(pipe, height, width), device=unet.device, dtype=unet.dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        UNetDenoiser(unet, family)(x, torch.tensor(500.0, device=unet.device), cond)
    torch.cuda.synchronize()
    per_row = max((torch.cuda.max_memory_allocated() - base) / 2, 1)
    free, _ = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # PyTorch's cached blocks are free to it
    n = int(free * headroom / (per_row * rows))
    if n >= 8:
        n = n // 8 * 8
    else:
        n = 1 << max(n.bit_length() - 1, 0)
    return max(1, min(cap, n))


def train_autocast(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (training loops: textual inversion, ESD), nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- compilation cached on disk ---------------------------------------------------------------------------------
CACHE_ENV = "ERASEKIT_COMPILE_CACHE"  # the folder of inductor's caches; default ~/.cache/erasekit/inductor


def default_compile_cache() -> Path:
    """``$ERASEKIT_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/erasekit/inductor`` (``~/.cache/erasekit/inductor``): one
    folder per user, shared by every run, so that a bench in a fresh output folder reuses the kernels of the last."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "erasekit" / "inductor"


_cache_chosen: list[str] = []  # the folder the first call chose (inductor reads it per compilation)


def use_compile_cache(folder=None) -> Path:
    """Point inductor's on-disk caches at ``folder`` (default `default_compile_cache`) before anything compiles:
    ``TORCHINDUCTOR_CACHE_DIR`` (FX graphs, generated kernels; Triton's cache lives under it), with the FX-graph
    and AOT-autograd caches on. A process that set ``TORCHINDUCTOR_CACHE_DIR`` itself keeps its folder unless
    ``folder`` is given. Returns the folder in use."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if folder is not None:
        path = Path(folder).expanduser()
    elif os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    else:
        path = default_compile_cache()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    _cache_chosen[:] = [str(path)]
    return path


def compile_stats() -> dict:
    """What compilation has cost this process so far (cumulative): seconds (dynamo's ``entire_frame_compile``,
    of which ``backend_compile`` is inductor's), graphs compiled, and the disk caches' hits and misses (a hit is a
    graph loaded, not recompiled). `compile_delta` of two snapshots is a stage's share."""
    from torch._dynamo.utils import calculate_time_spent, counters

    spent = calculate_time_spent()
    return {"compile_s": round(spent.get("entire_frame_compile", 0.0), 3),
            "backend_compile_s": round(spent.get("backend_compile", 0.0), 3),
            "graphs": int(counters["stats"]["unique_graphs"]),
            "fx_graph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fx_graph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
            "autograd_cache_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
            "autograd_cache_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
            "cache_dir": _cache_chosen[0] if _cache_chosen else os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def compile_delta(before: dict, after: dict) -> dict:
    out = {k: (round(after[k] - before[k], 3) if isinstance(after[k], float) else after[k] - before[k])
           for k in after if isinstance(after[k], (int, float))}
    out["cache_dir"] = after.get("cache_dir")
    return out


# -- fast when it pays ----------------------------------------------------------------------------------------------
# From one H200 run (issue 23; SD-1.4 shape, 512x512, 50 DDIM steps with CFG, fp16, batch 64): eager 3.29 images/s,
# compiled 4.55, compilation about 95 s with an empty cache. Each image saves 1/3.29 - 1/4.55 = 0.084 s, so
# compilation pays from 95 / 0.084 = 1129 images, i.e. about 113,000 UNet rows (image x step x CFG branch). The rule
# counts UNet rows, so that fewer steps or no CFG need more images.
AUTO_FAST_UNET_ROWS = 113_000


def auto_fast(device, images: int, steps: int, guidance: float) -> tuple[bool, str]:
    """(fast?, why) for ``fast: auto``: compiled on CUDA when the work repays a cold compilation, eager elsewhere
    (the CPU has nothing to gain: no fused kernels worth the compile time)."""
    if torch.device(device).type != "cuda":
        return False, "eager: not on CUDA"
    rows = int(images) * int(steps) * (2 if guidance > 1.0 else 1)
    if rows >= AUTO_FAST_UNET_ROWS:
        return True, f"fast: {rows} UNet rows >= {AUTO_FAST_UNET_ROWS} (compilation repays itself)"
    return False, f"eager: {rows} UNet rows < {AUTO_FAST_UNET_ROWS} (compilation would cost more than it saves)"
