"""Concept images and the masks of where the concept is in them, for MACE's attention loss.

- ``truth`` (the embedded world): the renderer draws the background first and the shape over it from the same
  seeded stream, so the image rendered again without the shape is its background exactly; the shape's pixels are
  those that differ. A shape concept's mask is the shape, a texture's the background around it.
- ``folder``: one mask image per concept image, same file stem (white = the concept), e.g. from Grounded-SAM.
- ``attention`` (the documented substitute for Grounded-SAM, whose weights cannot be fetched here): the original
  model's cross-attention of the concept's tokens on the noised image, averaged over layers and a few timesteps,
  above ``threshold`` times its maximum.
- ``none``: everywhere (MACE's setting for artistic styles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from erasekit.errors import ErasekitError


def world_label(text: str) -> str:
    """The embedded world's label named in ``text`` ("star shape" -> "star")."""
    from erasekit.toy import world

    words = text.lower().split()
    for table in (world.SHAPE_WORDS, world.TEXTURE_WORDS, world.COLOR_WORDS):
        for label, synonyms in table.items():
            if label in words or any(s in text.lower() for s in synonyms):
                return label
    raise ErasekitError(f"mace: {text!r} names none of the embedded world's shapes, textures or colours; "
                        "give image_folder=<concept images>")


def rendered_with_truth(concept: str, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered images of a world label and their ground-truth masks (n, size, size) bool."""
    from erasekit.attacks.images import render_concept_images
    from erasekit.toy.render import render_seed
    from erasekit.toy.world import NONE, Scene, concept_kind

    label = world_label(concept)
    images, truth = render_concept_images(label, n, size, seed=seed)
    masks = np.empty((n, size, size), bool)
    for i, t in enumerate(truth):
        background, _ = render_seed(seed + i, size, scene=Scene(shape=NONE, color=t["color"], texture=t["texture"]))
        shape = np.abs(images[i].astype(int) - background.astype(int)).max(-1) > 0
        masks[i] = ~shape if concept_kind(label) == "texture" else shape
    return images, masks


def folder_images_and_masks(image_folder: str, mask_folder: str, concept: str, size: tuple[int, int]):
    """Images of ``image_folder`` (or its subfolder named after ``concept``) and, when given, their masks."""
    from erasekit.attacks.images import image_files, load_image_folder

    root = Path(image_folder)
    if not root.is_dir():
        raise ErasekitError(f"mace: image_folder {image_folder} is not a folder")
    folder = root / concept if (root / concept).is_dir() else root
    images, names = load_image_folder(folder, size)
    if not mask_folder:
        return images, None
    mroot = Path(mask_folder)
    if not mroot.is_dir():
        raise ErasekitError(f"mace: mask_folder {mask_folder} is not a folder")
    mfolder = mroot / concept if (mroot / concept).is_dir() else mroot
    stems = [Path(n).stem for n in names]
    mask_stems = [p.stem for p in image_files(mfolder)]
    if sorted(stems) != sorted(mask_stems):
        missing = sorted(set(stems) - set(mask_stems))[:3]
        extra = sorted(set(mask_stems) - set(stems))[:3]
        raise ErasekitError(f"mace: the masks in {mfolder} do not match the images in {folder} (one mask per image, "
                            f"same file stem): missing {missing or 'none'}, unmatched {extra or 'none'}")
    mask_images, mask_names = load_image_folder(mfolder, size)  # readable images first, then their sizes
    check_mask_sizes(folder, names, {p.stem: p for p in image_files(mfolder)})
    by_stem = {Path(n).stem: m for n, m in zip(mask_names, mask_images)}
    masks = np.stack([by_stem[s].mean(-1) > 127 for s in stems])
    return images, masks


def check_mask_sizes(folder: Path, names: list[str], masks: dict[str, Path]) -> None:
    """Each mask must have its image's pixel size (read from the headers): a mask of another size was made for
    another image (or a crop of it), and resizing both to the model's size would misplace the region."""
    from PIL import Image

    for name in names:
        with Image.open(folder / name) as im, Image.open(masks[Path(name).stem]) as mask:
            if im.size != mask.size:
                raise ErasekitError(f"mace: mask {masks[Path(name).stem]} is {mask.size[0]}x{mask.size[1]} pixels, "
                                    f"its image {folder / name} {im.size[0]}x{im.size[1]}: a mask must have its "
                                    "image's size")


@torch.no_grad()
def attention_masks(pipe, latents: torch.Tensor, states: torch.Tensor, token_positions: list[int],
                    threshold: float, seed: int) -> np.ndarray:
    """(n, h, w) bool at latent resolution: where the original model attends to the concept's tokens."""
    from diffusers import DDPMScheduler

    from erasekit.diffusion.attention import capture_cross_attention
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.guidance import UNetDenoiser

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    n_train = sched.config.num_train_timesteps
    gen = torch.Generator().manual_seed(seed)
    h, w = latents.shape[-2:]
    total = torch.zeros(len(latents), h, w)
    cond = family_of(pipe).from_states(pipe, states)
    for frac in (0.3, 0.5, 0.7):
        t = torch.full((len(latents),), int(frac * n_train), dtype=torch.long)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        with capture_cross_attention(pipe.unet, token_positions) as cap:
            UNetDenoiser(pipe.unet)(noisy.to(pipe.unet.device), t[0].to(pipe.unet.device), cond)
        total += cap.aggregate((h, w)).float().cpu()
    peak = total.flatten(1).max(1).values.clamp_min(1e-12)
    return (total / peak[:, None, None] > threshold).numpy()
