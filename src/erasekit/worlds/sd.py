"""Stable Diffusion (1.x, 2.x): the empty prompt as guide, generic prompt templates, and default judges per kind of
concept: NudeNet for nudity; where the user has configured judge models (``ERASEKIT_CLIP``, ``ERASEKIT_IMAGENET``,
``ERASEKIT_Q16``), imagenet for an ImageNet class, q16 for inappropriate content, clip for everything else."""

from __future__ import annotations

from erasekit.errors import ErasekitError
from erasekit.worlds.base import World

GENERIC_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a painting of a {}", "{}")
NUDITY_CONCEPTS = ("nudity", "nude", "naked", "nsfw")
HARM_CONCEPTS = ("inappropriate", "harm", "harmful", "unsafe", "violence")  # Q16's notion


def _is_class_of(model: str, concept: str) -> bool:
    """Whether the ImageNet classifier ``model`` (config.json only: no weights read) has ``concept`` as a class."""
    from erasekit.detectors.hf_classifier import find_label
    from erasekit.detectors.hf_models import model_folder, read_config
    from erasekit.detectors.imagenet import IMAGENETTE

    id2label = read_config(model_folder(model, "imagenet detector")).get("id2label") or {}
    label = str(IMAGENETTE[concept.strip().lower()]) if concept.strip().lower() in IMAGENETTE and len(id2label) == 1000 \
        else concept
    try:
        find_label(id2label, label, "imagenet")
    except ErasekitError:
        return False
    return not label.strip().isdigit() or label != concept


class SDWorld(World):
    name = "sd"
    default_steps = 25
    default_guidance = 7.5

    def concept_prompt(self, concept: str) -> str:
        return f"a photo of a {concept}"

    def concept_prompts(self, concept: str, seed: int = 0) -> list[str]:
        return [t.format(concept) for t in GENERIC_TEMPLATES]

    def default_detector(self, concept: str, env=None) -> str:
        """The judge for ``concept`` by its kind, among those whose models are configured (``env``: os.environ)."""
        import os

        env = os.environ if env is None else env
        text = concept.strip().lower()
        if text in NUDITY_CONCEPTS:
            return "nudenet:unlearndiffatk"
        clip, imagenet, q16 = (env.get(k, "").strip() for k in ("ERASEKIT_CLIP", "ERASEKIT_IMAGENET", "ERASEKIT_Q16"))
        if text in HARM_CONCEPTS and clip and q16:
            return "q16"
        if imagenet and _is_class_of(imagenet, concept):
            return "imagenet"
        if clip:
            return "clip"
        from erasekit.registry import DETECTORS

        raise ErasekitError(
            f"no default detector for concept {concept!r} on this model: give --detector clip:model=FOLDER (a CLIP "
            f"folder such as openai/clip-vit-large-patch14; alternatives=... for the neutral texts), imagenet:model=FOLDER "
            f"for an ImageNet class (microsoft/resnet-50), hf-classifier:model=FOLDER,label=NAME for your own "
            f"classifier (bench: detector: {{name: clip, settings: {{model: FOLDER}}}}), or set ERASEKIT_CLIP / "
            f"ERASEKIT_IMAGENET; registered: {', '.join(DETECTORS.names())}")


class SDXLWorld(SDWorld):
    """SDXL: the Stable Diffusion world with SDXL's sampler defaults (guidance 5.0, diffusers' SDXL default; 1024x1024
    comes from the UNet's sample size)."""

    name = "sdxl"
    default_steps = 25
    default_guidance = 5.0


class SD3World(SDWorld):
    """SD3 / 3.5: the Stable Diffusion world with StableDiffusion3Pipeline's sampler defaults (28 steps, guidance
    7.0; 1024x1024 from the transformer's sample size)."""

    name = "sd3"
    default_steps = 28
    default_guidance = 7.0


class FluxWorld(SDWorld):
    """FLUX.1: the Stable Diffusion world with FluxPipeline's sampler defaults: 28 steps and the distilled guidance
    3.5 (the transformer's guidance input, not classifier-free guidance; FLUX.1-schnell has no guidance input and
    ignores it). True classifier-free guidance is off unless asked for (``Target.with_true_cfg``, ``erasekit
    generate --true-cfg``)."""

    name = "flux"
    default_steps = 28
    default_guidance = 3.5
