"""Generate the images of `AttackInputs` into a folder, resumably (the image store of `erasekit.image_store`).

Each image's record holds the usual generation settings plus ``attack`` and ``inputs``, a hash of the inputs
other than prompt and seed (the learned vectors, the image's inverted latent). The image store keys an image by
fixed fields (prompt, seed, settings, model fingerprint, ``edit``), so ``inputs`` is also folded into the
``edit`` field (``"<edit>|<inputs>"``): an image is reused only when its latent / learned vectors are the same.
"""

from __future__ import annotations

from collections import defaultdict

from erasekit.attacks.base import AttackInputs


def generate_inputs(pipe, inputs: AttackInputs, out_dir, *, steps: int | None = None, batch_size: int = 32,
                    negative_prompt: str | None = None, model: str = "", edit: str | None = None,
                    progress: bool = True) -> tuple[list[dict], int]:
    """Generate image i of ``inputs`` into ``out_dir`` unless it is already there; returns the records in
    order and how many images were generated."""
    from tqdm.auto import tqdm

    from erasekit.generation import default_settings, generate, image_size
    from erasekit.image_store import read_index, record_key, save_images, write_grid
    from erasekit.models.fingerprint import fingerprint

    default_steps, default_guidance = default_settings(pipe)
    height, width = image_size(pipe)
    base = dict(
        steps=int(steps or default_steps), eta=0.0, scheduler=type(pipe.scheduler).__name__, height=height,
        width=width, negative_prompt=negative_prompt, model=model, fingerprint=fingerprint(pipe),
    )
    input_ids = inputs.input_ids()
    wanted = []
    for i in range(len(inputs)):
        g = inputs.guidance[i] if inputs.guidance is not None else None
        wanted.append(dict(
            inputs.items[i], **base,
            guidance=float(default_guidance if g is None else g),
            prompt=inputs.prompts[i], seed=int(inputs.seeds[i]),
            edit=edit, attack=inputs.attack, inputs=input_ids[i],
        ))
    done = read_index(out_dir)
    todo = [i for i, rec in enumerate(wanted) if record_key(rec) not in done]
    by_guidance: dict[float, list[int]] = defaultdict(list)
    for i in todo:
        by_guidance[wanted[i]["guidance"]].append(i)
    bar = tqdm(total=len(todo), unit="img", desc="generating", disable=not progress or not todo, leave=False)
    for guidance, group in by_guidance.items():
        for start in range(0, len(group), batch_size):
            idx = group[start : start + batch_size]
            prompts = [inputs.prompts[i] for i in idx]
            kwargs = {}
            if inputs.latents is not None:
                kwargs["latents"] = inputs.latents[idx]
            if inputs.learned is not None:
                kwargs["prompt_embeds"] = inputs.learned.encode(pipe, prompts)
                prompts = None
            images = generate(pipe, prompts, [inputs.seeds[i] for i in idx], steps=base["steps"], guidance=guidance,
                              batch_size=batch_size, negative_prompt=negative_prompt, progress=False, **kwargs)
            for rec in save_images(images, out_dir, [wanted[i] for i in idx], grid=False):
                done[rec["key"]] = rec
            bar.update(len(idx))
    bar.close()
    records = [done[record_key(rec)] for rec in wanted]
    if records:
        write_grid(out_dir, records)
    return records, len(todo)
