"""Benchmark configs: YAML -> validated dataclasses.

A config names a model, the concepts to erase (with their target / preservation prompts; default: the model's
world's), the methods (a weight edit -- uce, rece, esd-x, esd-u with settings -- or "original", plus optional
inference-time defences by registered name), the scenarios (any of `erasekit.attacks.scenarios.scenario_names()`),
images per cell, seeds, sampler settings, the detector and the batch size. Unknown keys are rejected with the key
named; every value is range-checked before a model is loaded. Shipped presets live in ``presets/*.yaml``
(``quick``, ``full``); ``--set key=value`` changes any value by its dotted path (``images_per_cell=8``,
``sampler.steps=10``, ``methods.1.settings.epochs=1``, ``attacks.ti.steps=50``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from erasekit.errors import ErasekitError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "quick"


# -- the config ------------------------------------------------------------------------------------------------
@dataclass
class PreservePrompt:
    prompt: str
    label: str | None = None  # the concept the prompt asks for (prompt following is checked for it)


@dataclass
class ConceptConfig:
    name: str
    target_prompts: list[str] | None = None  # text scenario's prompts (None: the world's prompts naming the concept)
    preserve_prompts: list[PreservePrompt] | None = None  # None: the world's (other shapes / textures in captions)
    images: str | None = None  # folder of concept images for embedding / latent scenarios (toy: rendered)
    # an I2P-layout CSV (prompt, evaluation_seed, evaluation_guidance): the text and unlearndiffatk scenarios' prompts,
    # seeds and guidance, row i for image i (the papers' nudity.csv); read, never downloaded
    prompts_csv: str | None = None
    # Several concepts erased at once (mass erasure, `erasekit.bench.groups`): ``name`` labels the group, ``erase``
    # and/or ``concepts_file`` (one a line, read into ``erase``) list them, ``retain`` the concepts whose prompts
    # must survive (default: the world's other labels of their kind); the summary's harmonic table gives H_o.
    erase: list[str] | None = None
    concepts_file: str | None = None
    retain: list[str] | None = None


@dataclass
class DefenceConfig:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)  # "concept" is filled in with the cell's concept


@dataclass
class MethodConfig:
    name: str  # the label in tables ("original", "uce", "rece+irece", ...)
    edit: str | None = None  # "original" or a registered eraser; None: the name when it is one of those
    settings: dict[str, Any] = field(default_factory=dict)  # on top of the world's (tuned) defaults
    words: str | list[str] = "name"  # what to erase: "name", "synonyms" (the world's names for it) or a list
    # "world": the set the world's tuned settings for this method assume (`World.method_preserve`; the CLI's default
    # too), "none", "others" (the world's other labels of its kind) or a list
    preserve: str | list[str] = "world"
    defences: list[DefenceConfig] = field(default_factory=list)

    def edit_name(self) -> str:
        return self.edit if self.edit is not None else self.name


@dataclass
class SamplerConfig:
    steps: int | None = None  # None: the world's
    guidance: float | None = None


@dataclass
class DetectorConfig:
    name: str | None = None  # a registered detector; None: the world's default for each concept
    preset: str | None = None  # for detectors with presets (nudenet: unlearndiffatk, rece, ...)
    threshold: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # a judge's settings (clip: model, alternatives, ...)

    def spec(self) -> str | None:
        if self.name is None:
            return None
        return f"{self.name}:{self.preset}" if self.preset else self.name


@dataclass
class FeatureConfig:
    features: str  # dinov2, clip, or toy (the embedded world's detector)
    model: str | None = None  # the extractor's transformers folder (dinov2: $ERASEKIT_DINOV2, clip: $ERASEKIT_CLIP)


@dataclass
class QualityConfig:
    """Image-quality metrics on the preservation images (`erasekit.bench.quality`)."""

    clip_score: str | None = None  # a CLIP model folder: CLIP score of images vs their prompts (None: off)
    fd: list[FeatureConfig] = field(default_factory=list)  # Fréchet distances, one per feature extractor
    kid: bool = False  # KID on the same features
    reference: str = "original"  # "original" (same prompts and seeds) or a folder of reference images
    prompts: str | None = None  # a COCO-captions CSV (prompt, evaluation_seed, image_id): the preservation prompts
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    device: str = "auto"
    batch_size: int = 64


@dataclass
class PreservationConfig:
    enabled: bool = True
    images: int | None = None  # images per method and concept (None: images_per_cell)


@dataclass
class BenchConfig:
    model: str = "toy"
    concepts: list[ConceptConfig] = field(default_factory=lambda: [ConceptConfig("star")])
    methods: list[MethodConfig] = field(default_factory=lambda: [MethodConfig("original")])
    scenarios: list[str] = field(default_factory=lambda: ["text"])
    images_per_cell: int = 20
    seed: int = 0  # image i of a cell has seed ``seed + i`` (the same across methods: paired comparisons)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    batch_size: int = 32  # images per forward pass; results do not depend on it
    attack_batch_size: int = 32  # batch of attacks' own work (inversion); fixed so results never depend on batch_size
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)  # attack name or alias -> settings
    preservation: PreservationConfig = field(default_factory=PreservationConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    device: str = "auto"
    dtype: str = "auto"
    # GPU: compiled UNet/decoder, channels-last (images within a few levels; keyed apart). "auto": compiled on CUDA
    # when the bench's work repays the compilation (`erasekit.diffusion.speed.auto_fast`), eager on the CPU.
    fast: bool | str = "auto"
    batching: str = "auto"  # cell | shared | auto (`erasekit.bench.stages.resolve_batching`); results do not depend on it
    compile_cache: str | None = None  # inductor's cache folder (None: ERASEKIT_COMPILE_CACHE or ~/.cache/erasekit/inductor)
    description: str = ""
    # "fp8": fast mode with FP8 products in the UNet's linear layers (`erasekit.diffusion.fp8`; CUDA 8.9+), recorded in
    # every row (``precision``) and keyed apart; implies fast ("fp8-conv", experimental: the 3x3 convolutions too).
    # "default": the dtype's own products.
    precision: str = "default"

    # -- what determines the results ------------------------------------------------------------------------
    def identity(self) -> dict:
        """The config without the knobs that do not change a result (batch size, device, description)."""
        d = to_dict(self)
        for key in ("batch_size", "device", "description", "batching", "compile_cache"):
            d.pop(key, None)
        if d.get("fast") in (False, "auto"):  # the runner resolves "auto" first (`resolve_fast`)
            d.pop("fast", None)  # configs written before fast mode existed keep their keys
        if d.get("precision") == "default":
            d.pop("precision", None)  # as fast: configs written before fp8 existed keep their keys
        for c in d["concepts"]:
            for key in ("prompts_csv", "erase", "concepts_file", "retain"):
                if c.get(key) is None:
                    c.pop(key, None)  # as fast: configs without a prompt CSV or a group keep their keys
        if not d["detector"].get("settings"):
            d["detector"].pop("settings", None)  # as fast: configs without judge settings keep their keys
        d["quality"].pop("device", None)
        d["quality"].pop("batch_size", None)
        if not (self.quality.clip_score or self.quality.fd or self.quality.prompts):
            d.pop("quality", None)  # no quality metrics: the key of before
        return d

    def preservation_images(self) -> int:
        return self.preservation.images or self.images_per_cell


# -- loading --------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str):
    """``value`` as type ``tp`` (a dataclass, list[...], dict[str, ...], X | None, scalars), or ErasekitError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except ErasekitError as exc:
                errors.append(str(exc))
        raise ErasekitError(errors[-1] if len(errors) == 1 else
                            f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {_show(value)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if tp is PreservePrompt and isinstance(value, str):
            value = {"prompt": value}
        if tp is DefenceConfig and isinstance(value, str):
            value = {"name": value}
        if tp is ConceptConfig and isinstance(value, str):
            value = {"name": value}
        if tp is MethodConfig and isinstance(value, str):
            value = {"name": value}
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ErasekitError(f"{where}: expected a list, got {_show(value)}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ErasekitError(f"{where}: expected a mapping, got {_show(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ErasekitError(f"{where}: keys must be text, got {_show(k)}")
            out[k] = _convert(v, args[1], f"{where}.{k}")
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ErasekitError(f"{where}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ErasekitError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ErasekitError(f"{where}: expected a finite number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ErasekitError(f"{where}: expected text, got {_show(value)}")
        return value
    raise ErasekitError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _show(value: Any) -> str:
    from erasekit.limits import shown

    if isinstance(value, (list, dict)):  # never build the repr of a huge value: its type and length
        return f"a {type(value).__name__} of {len(value)}"
    return shown(repr(value) if isinstance(value, str) else value)


def from_dict(cls, data: Any, where: str = "config"):
    """A ``cls`` dataclass from a mapping; unknown keys and wrong types are `ErasekitError`s naming the key."""
    if not isinstance(data, Mapping):
        raise ErasekitError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}, "
                            f"got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ErasekitError(f"{where}: unknown key {str(key)!r}; known keys: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ErasekitError(f"{where}: missing key {missing[0]!r}")
    return cls(**kwargs)


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# -- validation -------------------------------------------------------------------------------------------------
def validate(cfg: BenchConfig) -> BenchConfig:
    """Range and name checks that need no model: registered names, counts, settings of every component."""
    from erasekit.attacks.scenarios import scenario_names, split_settings
    from erasekit.checks import finite, integer
    from erasekit.limits import MAX_BATCH, MAX_GUIDANCE, MAX_IMAGES, MAX_STEPS
    from erasekit.registry import ATTACKS, DEFENCES, DETECTORS, ERASERS, PROBES

    if not cfg.model.strip():
        raise ErasekitError("config: model is empty (toy, a diffusers folder or a hub id)")
    if not cfg.concepts:
        raise ErasekitError("config: concepts is empty")
    names = [c.name.strip() for c in cfg.concepts]
    for i, c in enumerate(cfg.concepts):
        if not c.name.strip():
            raise ErasekitError(f"config: concepts[{i}].name is empty")
        _plain_text(f"config: concepts[{i}].name", c.name)
        for p in c.target_prompts or []:
            if not p.strip() or ";" in p:
                raise ErasekitError(f"config: concepts[{i}].target_prompts: a prompt is empty or holds ';': {p!r}")
        if c.target_prompts is not None and not c.target_prompts:
            raise ErasekitError(f"config: concepts[{i}].target_prompts is an empty list (leave it out for the world's)")
        for p in c.preserve_prompts or []:
            if not p.prompt.strip():
                raise ErasekitError(f"config: concepts[{i}].preserve_prompts holds an empty prompt")
        if c.prompts_csv is not None and not Path(c.prompts_csv).expanduser().is_file():
            raise ErasekitError(f"config: concepts[{i}].prompts_csv {c.prompts_csv}: no such file (the presets read "
                                "a CSV you downloaded; nothing is downloaded)")
    if len(set(names)) != len(names):
        raise ErasekitError("config: a concept is listed twice")
    validate_groups(cfg)  # entries that erase several concepts at once (concepts files read here)
    names = member_names(cfg)
    if not cfg.methods:
        raise ErasekitError("config: methods is empty")
    labels = [m.name for m in cfg.methods]
    if len(set(labels)) != len(labels):
        raise ErasekitError(f"config: two methods are named {[x for x in labels if labels.count(x) > 1][0]!r}")
    for i, m in enumerate(cfg.methods):
        where = f"config: methods[{i}] ({m.name})"
        if not m.name.strip() or any(ch in m.name for ch in "/\\") or not m.name.isprintable():
            raise ErasekitError(f"config: methods[{i}].name must be a plain label, got {_show(m.name)}")
        edit = m.edit_name()
        if edit != "original":
            if edit not in ERASERS.classes():
                raise ErasekitError(f"{where}: unknown edit {edit!r}; use original or one of "
                                    f"{', '.join(ERASERS.classes())}")
            ERASERS.get(edit).Settings.parse(m.settings)
        elif m.settings:
            raise ErasekitError(f"{where}: settings belong to a weight edit; 'original' has none")
        for key in ("words", "preserve"):
            value = getattr(m, key)
            allowed = ("name", "synonyms") if key == "words" else ("world", "none", "others")
            if isinstance(value, str) and value not in allowed:
                raise ErasekitError(f"{where}: {key} must be {' or '.join(allowed)} or a list of texts, got {value!r}")
            if isinstance(value, list) and (not value or not all(v.strip() for v in value)):
                raise ErasekitError(f"{where}: {key} must list non-empty texts")
        for j, d in enumerate(m.defences):
            cls = DEFENCES.get(d.name)
            for concept in names:
                cls.from_overrides(defence_settings(cls, d.settings, concept))  # parses and validates
    if not cfg.scenarios:
        raise ErasekitError("config: scenarios is empty")
    known = scenario_names()
    for s in cfg.scenarios:
        if s not in known:
            raise ErasekitError(f"config: unknown scenario {s!r}; available: {', '.join(known)}")
    if len(set(cfg.scenarios)) != len(cfg.scenarios):
        raise ErasekitError("config: a scenario is listed twice")
    integer("config: images_per_cell", cfg.images_per_cell, low=1, high=MAX_IMAGES)
    integer("config: seed", cfg.seed, low=0, high=2**62)
    integer("config: batch_size", cfg.batch_size, low=1, high=MAX_BATCH)
    integer("config: attack_batch_size", cfg.attack_batch_size, low=1, high=MAX_BATCH)
    if cfg.preservation.images is not None:
        integer("config: preservation.images", cfg.preservation.images, low=1, high=MAX_IMAGES)
    if cfg.sampler.steps is not None:
        integer("config: sampler.steps", cfg.sampler.steps, low=1, high=MAX_STEPS)
    if cfg.sampler.guidance is not None:
        finite("config: sampler.guidance", cfg.sampler.guidance, low=0, high=MAX_GUIDANCE)
    if cfg.detector.name is not None:
        spec = cfg.detector.spec()
        DETECTORS.split(spec)  # unknown detector or preset: ErasekitError naming the choices
    elif cfg.detector.preset is not None:
        raise ErasekitError("config: detector.preset needs detector.name")
    if cfg.detector.settings:
        if cfg.detector.name is None:
            raise ErasekitError("config: detector.settings needs detector.name")
        from erasekit.detectors import check_spec

        check_spec(cfg.detector.spec(), cfg.detector.settings)
    from erasekit.bench.quality import validate_quality

    validate_quality(cfg)
    if cfg.detector.threshold is not None:
        finite("config: detector.threshold", cfg.detector.threshold, low=0)
    flat = {f"{a}.{k}": v for a, values in cfg.attacks.items() for k, v in (values or {}).items()}
    for name, values in split_settings(flat).items():  # unknown attacks / keys / types
        (ATTACKS.get(name) if name in ATTACKS else PROBES.get(name)).from_overrides(values)  # ranges, used or not
    from erasekit.runtime import DTYPE_NAMES

    if cfg.dtype not in DTYPE_NAMES:
        raise ErasekitError(f"config: dtype must be one of {', '.join(DTYPE_NAMES)}, got {cfg.dtype!r}")
    if isinstance(cfg.fast, str) and cfg.fast != "auto":
        raise ErasekitError(f"config: fast must be true, false or auto, got {cfg.fast!r}")
    from erasekit.diffusion.fp8 import PRECISIONS

    if cfg.precision not in PRECISIONS:
        raise ErasekitError(f"config: precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.precision != "default" and cfg.fast is False:
        raise ErasekitError(f"config: precision {cfg.precision} runs in fast mode: set fast to true or auto, not false")
    if cfg.batching not in ("auto", "cell", "shared"):
        raise ErasekitError(f"config: batching must be auto, cell or shared, got {cfg.batching!r}")
    if cfg.compile_cache is not None and not cfg.compile_cache.strip():
        raise ErasekitError("config: compile_cache must name a folder (or be left out)")
    return cfg


def fast_value(cfg: BenchConfig):
    """What generation takes as ``fast`` (`erasekit.generation.target_key`): False, True, or the FP8 precision ("fp8",
    "fp8-conv": it implies fast). Call after `resolve_fast`."""
    return cfg.precision if cfg.precision != "default" else cfg.fast is True


# -- entries that erase several concepts at once (mass erasure, #24; expanded by `erasekit.bench.groups`) ---------
def is_group(c) -> bool:
    return c.erase is not None or c.concepts_file is not None


def validate_groups(cfg) -> None:
    """Read concepts files into ``erase`` and check every group entry (called by `validate`; `erasekit.bench.groups`
    expands them)."""
    from erasekit.erasers.concept_list import concept_list
    from erasekit.registry import ERASERS

    seen: dict[str, str] = {c.name.strip(): f"concepts[{i}]" for i, c in enumerate(cfg.concepts) if not is_group(c)}
    groups = []
    for i, c in enumerate(cfg.concepts):
        where = f"config: concepts[{i}] ({c.name})"
        if not is_group(c):
            if c.retain is not None:
                raise ErasekitError(f"{where}: retain belongs to an entry that erases several concepts (erase: [...])")
            continue
        for key in ("target_prompts", "images", "prompts_csv"):
            if getattr(c, key) is not None:
                raise ErasekitError(f"{where}: {key} belongs to one concept; list it as its own entry, not in a group")
        members = concept_list(c.erase or [], c.concepts_file, where=f"{where}.erase")
        c.erase, c.concepts_file = members, None
        for m in members:
            if m == c.name.strip():
                raise ErasekitError(f"{where}: the group's name is one of its concepts; name the group apart")
            if m in seen:
                raise ErasekitError(f"{where}: {m!r} is also in {seen[m]}; a concept belongs to one entry")
            seen[m] = f"concepts[{i}]"
        if c.retain is not None:
            if not c.retain or not all(r.strip() for r in c.retain):
                raise ErasekitError(f"{where}: retain must list non-empty texts (leave it out for the world's)")
            both = sorted(set(r.strip() for r in c.retain) & set(members))
            if both:
                raise ErasekitError(f"{where}: {both[0]!r} is both erased and retained")
        groups.append(c)
    if not groups:
        return
    for j, m in enumerate(cfg.methods):
        edit = m.edit_name()
        if edit in ERASERS.classes() and not getattr(ERASERS.get(edit), "several_concepts", True):
            g = groups[0]
            raise ErasekitError(f"config: methods[{j}] ({m.name}): {edit} erases one concept at a time; "
                                f"{g.name} erases {len(g.erase)} at once (use uce, rece, speed or mace)")


def member_names(cfg) -> list[str]:
    """The plan's concepts: each single entry, and each group's members in its place (no world needed)."""
    out = []
    for c in cfg.concepts:
        out.extend(c.erase if is_group(c) else [c.name])
    return out


def defence_settings(cls, settings: dict, concept: str) -> dict:
    """A defence's settings for one concept: "{concept}" in a text replaced, "concept" filled in when it has one."""
    out = {k: v.replace("{concept}", concept) if isinstance(v, str) else v for k, v in settings.items()}
    if "concept" in cls.Settings.keys() and "concept" not in out:
        out["concept"] = concept
    return out


def _plain_text(where: str, text: str) -> None:
    if not text.isprintable():
        raise ErasekitError(f"{where} holds control characters: {_show(text)}")


# -- files, presets, --set ----------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml(text: str, where: str) -> dict:
    from erasekit import safe_yaml

    data = safe_yaml.load(text, where)  # no aliases, no duplicate keys, size bounded
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ErasekitError(f"{where}: expected a mapping at the top level, got {_show(data)}")
    return data


def load_raw(preset: str | None) -> tuple[dict, str]:
    """(the raw mapping, where it came from) for a preset name or a YAML file path."""
    preset = preset or DEFAULT_PRESET
    if preset in preset_names():
        path = PRESETS_DIR / f"{preset}.yaml"
    else:
        path = Path(preset)
        if path.suffix not in (".yaml", ".yml"):
            raise ErasekitError(f"--preset {preset}: no such preset ({', '.join(preset_names())}) and not a .yaml file")
        if not path.is_file():
            raise ErasekitError(f"--preset {preset}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ErasekitError(f"--preset {preset}: cannot read it ({type(exc).__name__})") from None
    return read_yaml(text, str(path)), str(path)


def apply_sets(raw: dict, pairs: Mapping[str, str]) -> dict:
    """``{"sampler.steps": "10"}``: set the value (parsed as YAML) at its dotted path; list items by index."""
    import copy

    raw = copy.deepcopy(raw)
    for path, text in pairs.items():
        value = read_yaml(f"v: {text}" if text.strip() else "v: ''", f"--set {path}")["v"]
        parts = path.split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ErasekitError(f"--set {path}: {part!r} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    if node[int(part)] is None or isinstance(node[int(part)], str):
                        node[int(part)] = {"name": node[int(part)]} if isinstance(node[int(part)], str) else {}
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {}
                    node = node[part]
            else:
                raise ErasekitError(f"--set {path}: {'.'.join(parts[:i])} is not a mapping or list")
    return raw


def parse_config(raw: Any, where: str = "config") -> BenchConfig:
    """Validated `BenchConfig` from a raw mapping (everything but `ErasekitError` is a bug)."""
    try:
        cfg = from_dict(BenchConfig, raw, where)
    except RecursionError:
        raise ErasekitError(f"{where}: nested too deeply") from None
    return validate(cfg)


def load_config(preset: str | None = None, sets: Mapping[str, str] | None = None) -> BenchConfig:
    raw, where = load_raw(preset)
    return parse_config(apply_sets(raw, sets or {}), where)
