"""Load a Stable Diffusion pipeline from a spec: "toy", a local diffusers folder, or a hub id.

The pipeline class follows the folder's ``model_index.json`` ``_class_name``: SD-1.x/2.x folders load as
`StableDiffusionPipeline`, SDXL base folders as `StableDiffusionXLPipeline` (both text encoders required). A
refiner-only folder (img2img, no first text encoder) and pipeline types erasekit does not support are refused
with one line naming the class.

Every pipeline comes back as its folder describes it (its own scheduler included) with the progress bar off.
erasekit samples with DDIM built from the pipeline's scheduler config (the same noise schedule; the model family's
stated default, `erasekit.diffusion.family`), whatever scheduler the folder names, so all methods sample the same
way on every model; images record the scheduler used.

Weights are read from safetensors files only (``use_safetensors=True``): pickled weights (.bin, .pt, .ckpt,
.pkl) can run arbitrary code when loaded. A folder whose component has only pickled weights is refused, naming
the files; ``allow_pickle=True`` (the CLI's --allow-pickle) loads them, for folders you trust.
"""

from __future__ import annotations

import json
from pathlib import Path

from erasekit.errors import ErasekitError

TOY_SPEC = "toy"
# The weight files diffusers / transformers look for inside a component folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Pickle-based weight formats: loading one runs torch's unpickler.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ALLOW_PICKLE_HINT = "pass --allow-pickle (allow_pickle=True) only if you trust where the folder came from"


def load_pipeline(spec: str, device=None, dtype=None, *, allow_download: bool = False, allow_pickle: bool = False):
    """A `StableDiffusionPipeline` (or `StableDiffusionXLPipeline` for SDXL) for ``spec``, moved to ``device``/``dtype`` when given.

    ``allow_download``: for hub ids, fetch from the hub when the model is not in the local cache
    (off by default: benchmarks should never depend on the network).
    ``allow_pickle``: also load pickled weights (.bin, ...) where a component has no safetensors; off by
    default, since unpickling can run arbitrary code.
    """
    spec = str(spec).strip()
    if not spec:
        raise ErasekitError("empty model spec; use 'toy', a diffusers pipeline folder or a hub id")
    if spec == TOY_SPEC:
        from erasekit.toy.pipeline import build_toy_pipeline

        pipe = build_toy_pipeline()
    elif Path(spec).expanduser().exists():
        pipe = _load_folder(Path(spec).expanduser(), allow_pickle)
    elif _looks_like_path(spec):
        raise ErasekitError(f"{spec}: no such folder (a model is 'toy', a diffusers pipeline folder or a hub id)")
    else:
        pipe = _load_hub(spec, allow_download, allow_pickle)
    check_components(pipe, spec)
    pipe.set_progress_bar_config(disable=True)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    if spec != TOY_SPEC:  # NaN weights make black images, a "perfect eraser" (#18); checked on the device (fast)
        from erasekit.validity import check_finite_pipeline

        check_finite_pipeline(pipe, spec)
    return pipe


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a separator is meant as a path.
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1


def _safetensors_kwargs(allow_pickle: bool) -> dict:
    # use_safetensors=True: safetensors or an error; None (diffusers' default): safetensors where present, else pickle.
    return {"use_safetensors": None if allow_pickle else True}


SD_CLASSES = ("StableDiffusionPipeline",)
SDXL_CLASSES = ("StableDiffusionXLPipeline",)
REFINER_CLASSES = ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
# Flow-matching transformer pipelines (`erasekit.diffusion.sd3`, `erasekit.diffusion.flux`): kind -> class name.
FLOW_CLASSES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# The components each kind needs (weights, then tokenizers); SD3 may go without T5 (diffusers' zeros).
KIND_COMPONENTS = {
    "sd": (("unet", "vae", "text_encoder"), ("tokenizer",)),
    "sdxl": (("unet", "vae", "text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")),
    "sd3": (("transformer", "vae", "text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")),
    "flux": (("transformer", "vae", "text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")),
}


def pipeline_kind(index: dict, where: str) -> str:
    """"sd", "sdxl", "sd3" or "flux" for a model_index.json's contents; `ErasekitError` (one line) for anything
    else."""
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name in (None, "", *SD_CLASSES):
        return "sd"  # folders written by hand (tests, the embedded world) may lack _class_name
    for kind, cls in FLOW_CLASSES.items():
        if name == cls:
            return kind
    components = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    if name in SDXL_CLASSES or (name in REFINER_CLASSES and "text_encoder" in components):
        if "text_encoder_2" not in components or "tokenizer_2" not in components:
            raise ErasekitError(f"{where}: an SDXL pipeline without its second text encoder (text_encoder_2 and "
                                f"tokenizer_2 in model_index.json): erasekit needs both of SDXL's text encoders")
        return "sdxl"
    if name in REFINER_CLASSES:
        raise ErasekitError(f"{where}: an SDXL refiner ({name}, no first text encoder): erasekit works on text-to-image "
                            f"models; use the SDXL base model")
    raise ErasekitError(f"{where}: pipeline type {name} is not supported (erasekit supports Stable Diffusion 1.x/2.x, "
                        f"SDXL, SD3 and FLUX.1: StableDiffusionPipeline, StableDiffusionXLPipeline, "
                        f"StableDiffusion3Pipeline, FluxPipeline)")


def _from_pretrained(source: str, kind: str = "sd", **kwargs):
    if kind in FLOW_CLASSES:
        import diffusers

        return getattr(diffusers, FLOW_CLASSES[kind]).from_pretrained(source, **kwargs)
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_pretrained(source, add_watermarker=False, **kwargs)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False, **kwargs)


def _hub_kind(spec: str, allow_download: bool) -> str:
    """The pipeline kind of a hub model from its model_index.json (cache first); "sd" if it cannot be read."""
    try:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(spec, "model_index.json", local_files_only=True)
        except Exception:
            if not allow_download:
                return "sd"
            path = hf_hub_download(spec, "model_index.json")
        index = json.loads(Path(path).read_text())
    except Exception:
        return "sd"  # the load below reports what is wrong
    return pipeline_kind(index, spec)


def read_model_index(folder: Path) -> dict:
    """``folder/model_index.json`` as a mapping; `ErasekitError` for anything else (a list, bad JSON, binary)."""
    path = folder / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ErasekitError(f"corrupt {path}: {_first_line(exc)}") from None
    if not isinstance(index, dict):
        raise ErasekitError(f"corrupt {path}: expected a mapping of components, got a {type(index).__name__}")
    return index


def check_components(pipe, where: str) -> None:
    """The components fit each other: a UNet from another model (SD-2's in an SD-1 folder) fails here, in one line,
    not at the first matrix product."""
    if getattr(pipe, "unet", None) is None:
        return _check_transformer_components(pipe, where)
    unet = pipe.unet.config
    widths = [enc.config.hidden_size for enc in (getattr(pipe, "text_encoder", None),
                                                 getattr(pipe, "text_encoder_2", None)) if enc is not None]
    cross = unet.cross_attention_dim
    if isinstance(cross, int) and widths and sum(widths) != cross:
        raise ErasekitError(f"{where}: the UNet reads text states of width {cross} but the text encoder(s) give "
                            f"{'+'.join(map(str, widths))}: a UNet or text encoder from another model")
    latent = getattr(pipe.vae.config, "latent_channels", None)
    if latent is not None and (unet.in_channels != latent or unet.out_channels != latent):
        raise ErasekitError(f"{where}: the UNet takes {unet.in_channels} and gives {unet.out_channels} channels but "
                            f"the VAE's latents have {latent}: a UNet or VAE from another model (or an inpainting UNet)")


def _check_transformer_components(pipe, where: str) -> None:
    """SD3 / FLUX: the transformer reads the T5 width and the pooled width its text encoders give, and the VAE's
    latent channels (FLUX: packed 2x2, four times as many)."""
    cfg = pipe.transformer.config
    from erasekit.diffusion.family import family_of

    family = family_of(pipe)
    t5 = getattr(pipe, "text_encoder_3" if family.name == "sd3" else "text_encoder_2", None)
    if t5 is not None and int(t5.config.d_model) != int(cfg.joint_attention_dim):
        raise ErasekitError(f"{where}: the transformer reads text states of width {cfg.joint_attention_dim} but the T5 "
                            f"encoder gives {t5.config.d_model}: a transformer or text encoder from another model")
    if family.name == "sd3":
        pooled = sum(int(e.config.projection_dim) for e in (pipe.text_encoder, pipe.text_encoder_2))
    else:
        pooled = int(pipe.text_encoder.config.hidden_size)
    if pooled != int(cfg.pooled_projection_dim):
        raise ErasekitError(f"{where}: the transformer reads pooled text embeddings of width {cfg.pooled_projection_dim} "
                            f"but the CLIP encoder(s) give {pooled}: a transformer or text encoder from another model")
    latent = int(pipe.vae.config.latent_channels)
    if family.latent_channels(pipe) != latent:
        raise ErasekitError(f"{where}: the transformer takes {cfg.in_channels} input channels but the VAE's latents have "
                            f"{latent}: a transformer or VAE from another model")


def _load_folder(folder: Path, allow_pickle: bool = False):
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise ErasekitError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    check_pipeline_folder(folder, allow_pickle=allow_pickle)
    kind = pipeline_kind(read_model_index(folder), str(folder))
    try:
        return _from_pretrained(str(folder), kind=kind, **_safetensors_kwargs(allow_pickle),
                                **_pooler_free_text_encoder(folder, allow_pickle))
    except ErasekitError:
        raise
    except Exception as exc:  # diffusers raises OSError/ValueError/RuntimeError/... with long messages
        raise ErasekitError(f"cannot load the pipeline in {folder}: {_first_line(exc)}") from exc


def _pooler_free_text_encoder(folder: Path, allow_pickle: bool = False) -> dict:
    """A BERT text encoder saved without a pooler (the embedded world's), loaded without one.

    Otherwise transformers adds a randomly initialised pooler on every load: the images are the same (the pipeline
    reads the token states, not the pooled output) but the pipeline's fingerprint would change with each load.
    """
    index = read_model_index(folder)
    if index.get("text_encoder", [None, None])[1] != "BertModel":
        return {}
    from safetensors import safe_open

    sub = folder / "text_encoder"
    keys: set[str] = set()
    for path in sub.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    if not keys or any(k.startswith("pooler.") for k in keys):  # no safetensors (pickle allowed): diffusers' way
        return {}
    from transformers import BertModel

    return {"text_encoder": BertModel.from_pretrained(str(sub), add_pooling_layer=False,
                                                      **_safetensors_kwargs(allow_pickle))}


NOT_LOADED = ("safety_checker", "feature_extractor")  # erasekit loads pipelines without a safety checker


def pickle_only_components(folder: Path) -> dict[str, list[Path]]:
    """Components of ``folder`` (those model_index.json lists and erasekit loads) holding pickled weight
    files but no safetensors, with those files."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    names = [k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None and k not in NOT_LOADED] \
        if isinstance(index, dict) else []
    found: dict[str, list[Path]] = {}
    for sub in (folder / n for n in sorted(names)):
        if not sub.is_dir():
            continue
        files = [p for p in sub.iterdir() if p.is_file()]
        pickles = sorted(p for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            found[sub.name] = pickles
    return found


def check_pipeline_folder(folder: Path, allow_pickle: bool = False) -> None:
    """Fail early, naming the file, when a component's weights are missing, unreadable or (unless
    ``allow_pickle``) only pickled.

    diffusers' own errors for these cases are long and do not always say which file is at fault.
    """
    from safetensors import safe_open

    index = read_model_index(folder)
    if not allow_pickle:
        pickled = pickle_only_components(folder)
        if pickled:
            files = ", ".join(str(p.relative_to(folder)) for ps in pickled.values() for p in ps)
            raise ErasekitError(f"{folder} has pickled weights only ({files}); erasekit loads safetensors only, as "
                                f"unpickling can run code: convert them to safetensors, or {ALLOW_PICKLE_HINT}")
    kind = pipeline_kind(index, str(folder))
    weights_needed, tokenizers_needed = KIND_COMPONENTS[kind]
    for name in weights_needed:
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            raise ErasekitError(f"{folder} has no {name} component (model_index.json)")
        sub = folder / name
        weights = sorted(p for p in sub.glob("*") if p.suffix in WEIGHT_SUFFIXES + PICKLE_SUFFIXES) if sub.is_dir() else []
        if not weights:
            raise ErasekitError(f"missing weight file in {sub} (expected *.safetensors)")
        for path in weights:
            if path.suffix != ".safetensors":
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as exc:
                raise ErasekitError(f"corrupt weight file {path}: {_first_line(exc)}") from exc
            if path.stat().st_size < _declared_size(path):
                raise ErasekitError(f"corrupt weight file {path}: truncated")
    for name in tokenizers_needed:
        entry = index.get(name)
        sub = folder / name
        if not isinstance(entry, list) or entry[0] is None or not sub.is_dir() or not any(sub.iterdir()):
            raise ErasekitError(f"{folder} has no {name}/ folder (or model_index.json lists none): the prompts "
                                f"cannot be tokenized; copy it from the model this folder came from")


def _declared_size(path: Path) -> int:
    """The file size a safetensors header promises (8-byte length + header + the largest data offset)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def _load_hub(spec: str, allow_download: bool, allow_pickle: bool = False):
    safe = _safetensors_kwargs(allow_pickle)
    kind = _hub_kind(spec, allow_download)
    try:
        return _from_pretrained(spec, kind=kind, local_files_only=True, **safe)
    except Exception as exc:
        local_error = exc
    if allow_download:
        try:
            return _from_pretrained(spec, kind=kind, **safe)
        except Exception as exc:
            local_error = exc
    if not allow_pickle and _means_no_safetensors(local_error):
        raise ErasekitError(
            f"model {spec!r} has no safetensors weights (only pickled ones); erasekit loads safetensors only, as "
            f"unpickling can run code: {ALLOW_PICKLE_HINT}; cause: {_first_line(local_error)}"
        ) from local_error
    raise ErasekitError(
        f"cannot load model {spec!r}: not 'toy', not a local diffusers folder, and not available offline from the hub "
        f"(download it first, e.g. `hf download {spec}`); cause: {_first_line(local_error)}"
    ) from local_error


def _means_no_safetensors(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "safetensors" in text and any(w in text for w in ("could not find", "not found", "no file", "missing"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
