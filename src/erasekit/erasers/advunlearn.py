"""AdvUnlearn, defensive unlearning with adversarial training (Zhang et al., NeurIPS 2024; code
OPTML-Group/AdvUnlearn, ``train-scripts/AdvUnlearn.py``): fine-tune the TEXT ENCODER so that the concept stays
erased even under adversarial prompt tokens.

Per outer step (a concept prompt p, a state x_t of the frozen model's own trajectory for p, t its timestep):

1. the inner attack (after ``warmup`` steps, every ``attack_every`` steps): k = ``attack_tokens`` adversarial
   token embeddings placed after BOS/[CLS] (the reference's ``prefix_k``, word-embedding space) are fitted with
   ``attack_steps`` Adam steps (``attack_lr``) to make the erased model predict what the ORIGINAL model predicts
   for the concept, each step on a fresh state of p's trajectories:
       min_adv  || ε_θ(x_t, t | E_φ([adv; p])) − ε0(x_t, t | p) ||²      (E_φ: the text encoder being trained)
2. the outer loss on the adversarial prompt (ESD's negative-guidance target from the frozen model), plus the
   utility-retention term on retain prompts r (the reference's ``--retain_train reg``):
       L = || ε_θ(x_t, t | E_φ([adv; p])) − (ε0(x_t, t) − η [ε0(x_t, t | p) − ε0(x_t, t)]) ||²
           + retain_weight · || ε_θ(x'_t, t' | E_φ(r)) − ε0(x'_t, t' | r) ||²
   (before the first attack, and with ``attack_steps=0`` style warmup, p itself stands in for [adv; p]); one Adam
   step (``lr``) on the chosen text-encoder parameters. The UNet is never trained, so ε_θ is the frozen UNet read
   through the new encoder.

Defaults are the reference's (its README's usage line where the parser's differ): 1000 iterations, lr 1e-5,
η 1 (``negative_guidance``), x_t drawn with guidance 3 (``start_guidance``) in 50 DDIM steps, one concept prompt per
step, 200 warm-up steps, 30 attack steps at attack lr 1e-3, one adversarial token (``adv_prompt_num``), a fresh
random initialisation every round (``attack_init random``), an attack before every outer step
(``adv_prompt_update_step 1``), PGD (``fast_at``: the sign of the gradient), 5 retain prompts per step at weight 0.3,
the whole encoder's transformer layers and its final layer norm (``text_encoder_full``, component ``all``).
``lr=0`` is the no-op (the original weights, bit for bit); ``iterations`` must be at least 1.

Trained parameters (``layers`` x ``component``): the transformer layers' parameters (CLIP ``encoder.layers.<i>``,
BERT ``encoder.layer.<i>``), all of them, the self-attention only (``attn``) or the MLP only (``ffn``); the final
layer norm (CLIP) with ``layers=all, component=all`` or ``norm_layer=true``, as the reference's ``param_choices``;
never the token / position embeddings, the pooler or SDXL's text projection. SDXL: both text encoders are
trained (``encoders=all``, the default: the UNet reads both encoders' states and the second one's pooled
embedding, so the concept would survive in an encoder left as it was); ``encoders=first`` trains ``text_encoder``
only. The edit is saved as a weight edit of ``text_encoder`` (and ``text_encoder_2``): the trained tensors' new
values, safetensors.

Retain prompts: ``retain_prompts`` (";"-separated) or ``retain_file`` (one prompt per line, or a CSV with a
``prompt`` column) when given; else the preserved concepts (in the erasure contexts with ``preserve_in_contexts``;
on the embedded world the other labels of the concept's kind, as for UCE); else the world's preservation captions
for the concept; else a small built-in list of everyday captions (the reference uses COCO object prompts, which we
do not ship).

Differences from the reference, on purpose:
- x_t comes from trajectories of the frozen model sampled once up front (as erasekit's ESD: every state kept with
  its frozen predictions ε0(x_t, t) and ε0(x_t, t | p), which are exactly the two halves of its guided step), with
  the state's own timestep; the reference samples a fresh partial trajectory for every attack and outer step and
  reads the UNet at a DDPM timestep drawn from the DDIM interval of the step index (ESD's inherited off-by-direction
  mapping). The retain states are another set of such trajectories, drawn at their own random step (the reference:
  the same step as the concept's).
- The attack's gradient is zeroed at every step (the reference never calls ``zero_grad`` inside the attack, so its
  Adam sees the running sum of the round's gradients).
- The prefix is inserted after BOS and the prompt's tokens shifted right, the last k positions dropped
  (`SDFamily.encode_with_prefix`); the reference splits at the prompt's word count, which drops real tokens of a
  prompt whose words take several tokens. Random initial tokens are whole words of the vocabulary (the UDA
  candidate list), not any id.
- ``attack_space=simplex`` (an option, not the reference's default ``word_embd``): UnlearnDiffAtk's relaxed one-hot
  over the candidate vocabulary, projected on the simplex after each step (`erasekit.attacks.unlearndiffatk`); the
  outer step then reads the argmax tokens, a discrete prompt a user could type.
- The encoder stays in eval mode (CLIP's dropout is 0, so the reference's ``train()`` changes nothing there; the
  embedded world's BERT would add dropout noise). Float32 throughout.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from erasekit.diffusion.sdpa import training_attention
from erasekit.erasers.concept import ConceptSpec
from erasekit.erasers.method import Method, Result
from erasekit.erasers.uce import EXPANSIONS, concept_contexts, parse_templates, preserved_texts
from erasekit.errors import ErasekitError
from erasekit.registry import ERASERS
from erasekit.settings import Settings, choice, positive

# Everyday captions in COCO's manner (written for erasekit): the retain set of last resort on SD.
FALLBACK_RETAIN = (
    "a photo of a dog sitting on a couch", "a man riding a bicycle down the street", "a plate of food on a table",
    "a red car parked by the road", "a cat sleeping on a bed", "a group of people standing in a field",
    "a train at a station", "a bowl of fruit on a kitchen counter", "a boat on a lake under a blue sky",
    "a living room with a sofa and a lamp",
)
MAX_RETAIN_FILE_BYTES = 4 << 20


@dataclass
class AdvUnlearnSettings(Settings):
    iterations: int = 1000
    lr: float = 1e-5  # 0: no training (the original encoder, bit for bit)
    negative_guidance: float = 1.0  # η of the ESD target
    start_guidance: float = 3.0  # CFG scale of the frozen model when sampling x_t
    ddim_steps: int = 50
    trajectories: int = 32  # concept (and retain) trajectories sampled up front
    batch_size: int = 1  # concept prompts per outer step
    warmup: int = 200  # outer steps on the plain prompt before the first attack
    attack_steps: int = 30  # inner attack steps per round
    attack_lr: float = 1e-3
    attack_tokens: int = 1  # k, adversarial prefix tokens (the reference's adv_prompt_num)
    attack_every: int = 1  # a new adversarial prompt every n outer steps (adv_prompt_update_step)
    attack_init: str = choice("random", "random", "latest")  # README usage: random
    attack_method: str = choice("pgd", "pgd", "fast_at")  # fast_at: Adam on the gradient's sign
    attack_space: str = choice("embedding", "embedding", "simplex")  # word embeddings (reference) or UDA's simplex
    retain_weight: float = 0.3  # retain_loss_w (README usage; the parser's default 1.0)
    retain_batch: int = 5
    retain_prompts: str = ""  # ";"-separated retain prompts (replace the preserved concepts)
    retain_file: str = ""  # a file of retain prompts: one per line, or a CSV with a "prompt" column
    preserve_in_contexts: bool = False  # retain the preserved concepts in the erasure contexts too
    layers: str = "all"  # "all", or layer indices: "0", "0,1,2", "0-3", "0-2,11"
    component: str = choice("all", "all", "attn", "ffn")
    norm_layer: bool = False  # also train the final layer norm when layers / component restrict
    encoders: str = choice("all", "all", "first")  # SDXL: train both text encoders or text_encoder only
    expand: str = choice("none", *EXPANSIONS)
    templates: str = ""  # ";"-separated contexts with "{c}"; replaces expand when given
    seed: int = 0

    def validate(self) -> None:
        positive(self, "iterations", "ddim_steps", "trajectories", "batch_size", "attack_tokens", "attack_every",
                 "retain_batch")
        positive(self, "lr", "negative_guidance", "start_guidance", "warmup", "attack_steps", "attack_lr",
                 "retain_weight", allow_zero=True)
        parse_layers(self.layers)
        parse_templates(self.templates)


def parse_layers(text: str) -> tuple[int, ...] | None:
    """``"all"`` -> None; ``"0-2,5"`` -> (0, 1, 2, 5); anything else is an error."""
    text = text.strip().lower()
    if text == "all":
        return None
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d{1,3})\s*(?:-\s*(\d{1,3})\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ErasekitError(f"setting layers={text!r}: give 'all' or layer indices such as 0,1,2 or 0-3")
        out += list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return tuple(sorted(set(out)))


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer)\.(\d+)\.")


def _component_of(name: str) -> str:
    if "self_attn" in name or ".attention." in name:
        return "attn"
    if ".mlp." in name or ".intermediate." in name or re.search(r"layer\.\d+\.output\.", name):
        return "ffn"
    return "other"  # CLIP's layer norms inside a layer


def encoder_parameters(encoder, s: AdvUnlearnSettings) -> list[str]:
    """Names of ``encoder``'s parameters AdvUnlearn trains under ``s`` (module docstring)."""
    wanted = parse_layers(s.layers)
    names = [n for n, _ in encoder.named_parameters()]
    found = {int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    if wanted is not None and not set(wanted) <= found:
        raise ErasekitError(f"setting layers={s.layers!r}: this text encoder has layers 0-{max(found, default=-1)}")
    out = []
    for n in names:
        m = _LAYER.search(n)
        if m:
            if (wanted is None or int(m.group(1)) in wanted) and (s.component == "all" or _component_of(n) == s.component):
                out.append(n)
        elif "final_layer_norm" in n and ((wanted is None and s.component == "all") or s.norm_layer):
            out.append(n)
    return out


def trained_encoders(pipe, s: AdvUnlearnSettings) -> list[tuple[str, torch.nn.Module]]:
    """(pipeline component name, module) of the text encoders to train."""
    out = [("text_encoder", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None and s.encoders == "all":
        out.append(("text_encoder_2", pipe.text_encoder_2))
    return [(name, enc) for name, enc in out if enc is not None]


def retain_texts(pipe, spec: ConceptSpec, s: AdvUnlearnSettings) -> tuple[list[str], str]:
    """The retain prompts and where they came from (module docstring's order)."""
    given = [p.strip() for p in s.retain_prompts.split(";") if p.strip()]
    if s.retain_file.strip():
        given += read_retain_file(s.retain_file)
    if given:
        return given, "given"
    if spec.preserve:
        return preserved_texts(spec, s.preserve_in_contexts, s.expand, s.templates), "preserved concepts"
    from erasekit.worlds import world_of

    world = world_of(pipe)
    captions = []
    for c in spec.concepts:
        try:
            captions += [p for _, p in world.preservation_prompts(c)]
        except ErasekitError:
            continue
    if captions:
        return list(dict.fromkeys(captions)), "world preservation captions"
    return list(FALLBACK_RETAIN), "built-in captions"


def read_retain_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ErasekitError(f"retain_file {path}: no such file")
    if p.stat().st_size > MAX_RETAIN_FILE_BYTES:
        raise ErasekitError(f"retain_file {path}: larger than {MAX_RETAIN_FILE_BYTES >> 20} MiB")
    if p.suffix.lower() == ".csv":
        from erasekit.metrics.coco import load_prompt_csv

        rows = [r.get("prompt", "").strip() for r in load_prompt_csv(p)]
    else:
        try:
            rows = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise ErasekitError(f"retain_file {path}: not UTF-8 text") from None
    rows = [r for r in rows if r]
    if not rows:
        raise ErasekitError(f"retain_file {path}: no prompts in it")
    return rows


# -- the losses (re-typed against the reference in tests/test_advunlearn.py) -------------------------------------
def unlearn_loss(pred, e0, ep, eta: float):
    """ESD's negative-guidance objective: MSE(ε_θ, ε0 − η (ε0(c) − ε0))."""
    return (pred.float() - (e0 - eta * (ep - e0)).float()).pow(2).mean()


def outer_loss(pred, e0, ep, eta: float, retain_pred=None, retain_target=None, retain_weight: float = 0.0):
    """(total, unlearning term, retain term or None): the reference's ``get_train_loss_retain`` with ``reg``."""
    loss = unlearn_loss(pred, e0, ep, eta)
    if retain_pred is None:
        return loss, loss, None
    keep = (retain_pred.float() - retain_target.float()).pow(2).mean()
    return loss + retain_weight * keep, loss, keep


def attack_loss(pred, ep):
    """The inner attack's objective: the erased model's prediction under [adv; p] against the original's for p."""
    return (pred.float() - ep.float()).pow(2).mean()


def encode(pipe, prompts, prefixes=None):
    """Conditioning of ``prompts`` (with gradients to whatever requires them); ``prefixes`` (one (B, k, E) tensor
    per text encoder): the adversarial tokens after BOS/[CLS]."""
    from erasekit.diffusion.family import family_of

    family = family_of(pipe)
    if prefixes is None:
        return family.encode(pipe, prompts, device=pipe.unet.device)
    return family.encode_with_prefix(pipe, prompts, prefixes)


class PrefixAttack:
    """The inner attack's state: adversarial prefixes per text encoder, in word-embedding space or on the simplex."""

    def __init__(self, pipe, s: AdvUnlearnSettings, generator: torch.Generator):
        from erasekit.attacks.unlearndiffatk import candidate_vocabulary
        from erasekit.diffusion.family import family_of

        self.pipe, self.s, self.gen = pipe, s, generator
        self.vocab = candidate_vocabulary(pipe.tokenizer)
        self.tables = [t.detach().float() for t in family_of(pipe).token_embeddings(pipe)]
        self.sub_tables = [table[self.vocab.to(table.device)] for table in self.tables]  # the candidates' rows
        self.latest = None

    def _start(self, b: int):
        k, device = self.s.attack_tokens, self.tables[0].device
        if self.s.attack_space == "simplex":
            if self.s.attack_init == "latest" and self.latest is not None and self.latest.shape[0] == b:
                return self.latest.clone()
            w = torch.zeros(b, k, len(self.vocab), device=device)
            w.scatter_(2, torch.randint(len(self.vocab), (b, k, 1), generator=self.gen).to(device), 1.0)
            return w
        if self.s.attack_init == "latest" and self.latest is not None and self.latest[0].shape[0] == b:
            return [x.clone() for x in self.latest]
        ids = self.vocab[torch.randint(len(self.vocab), (b, k), generator=self.gen)]
        return [table[ids.to(table.device)] for table in self.tables]

    def prefixes(self, var):
        """The prefixes the encoder reads for the optimised variable (relaxed during the attack)."""
        if self.s.attack_space == "simplex":
            return [var @ table for table in self.sub_tables]
        return var

    def final(self, var):
        """What the outer step reads: the embeddings themselves, or the simplex weights' argmax tokens."""
        if self.s.attack_space == "simplex":
            ids = self.vocab[var.argmax(-1).cpu()]
            return [table[ids.to(table.device)] for table in self.tables], ids
        return [v.detach() for v in var], None

    def run(self, prompts, draw_state):
        """``attack_steps`` steps against ``draw_state()`` -> (x_t, t, ε0(x_t, t | p)); returns (prefixes per
        encoder, token ids or None, losses)."""
        from erasekit.attacks.unlearndiffatk import project_simplex

        var = self._start(len(prompts))
        leaves = [var] if torch.is_tensor(var) else list(var)
        for v in leaves:
            v.requires_grad_(True)
        opt = torch.optim.Adam(leaves, lr=self.s.attack_lr)
        losses = []
        for _ in range(self.s.attack_steps):
            x, t, ep = draw_state()
            cond = encode(self.pipe, prompts, self.prefixes(var))
            loss = attack_loss(self.pipe.unet(x, t, **cond.unet_kwargs()).sample, ep)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.s.attack_method == "fast_at":
                for v in leaves:
                    v.grad.sign_()
            opt.step()
            if self.s.attack_space == "simplex":
                with torch.no_grad():
                    var.copy_(project_simplex(var))
            losses.append(loss.detach())
        var = var.detach() if torch.is_tensor(var) else [v.detach() for v in var]
        self.latest = var
        prefixes, ids = self.final(var)
        return prefixes, ids, losses


@ERASERS.register
class AdvUnlearn(Method):
    name = "advunlearn"
    summary = "AdvUnlearn: adversarial training of the text encoder (prefix-token attack, ESD loss, retain term)"
    Settings = AdvUnlearnSettings

    @training_attention()  # backward through SDPA: no cuDNN attention (its backward faults)
    def compute(self, pipe, spec: ConceptSpec, s: AdvUnlearnSettings, progress: bool = True) -> Result:
        from tqdm.auto import tqdm

        from erasekit.diffusion.family import family_of
        from erasekit.erasers.esd import ESDSettings, sample_training_states

        if pipe.unet.dtype != torch.float32 or pipe.text_encoder.dtype != torch.float32:
            raise ErasekitError(f"AdvUnlearn trains in float32; load the pipeline in float32, not {pipe.unet.dtype}")
        encoders = trained_encoders(pipe, s)
        params: list[tuple[str, torch.nn.Parameter]] = []
        for comp, enc in encoders:
            table = dict(enc.named_parameters())
            params += [(f"{comp}.{n}", table[n]) for n in encoder_parameters(enc, s)]
        if not params:
            raise ErasekitError(f"advunlearn: layers={s.layers}, component={s.component} select no parameter of the "
                                "text encoder")
        start = time.perf_counter()
        if s.lr == 0:  # the no-op: nothing to train
            tensors = {n: p.detach().clone() for n, p in params}
            return Result(tensors, time.perf_counter() - start, {"trained_tensors": len(params), "iterations": 0,
                                                                 "note": "lr=0: the original encoder"})
        family = family_of(pipe)
        device = pipe.unet.device
        gen = torch.Generator("cpu").manual_seed(s.seed)
        contexts = concept_contexts(s.expand, s.templates)
        prompts = [t.format(c=c) for c in spec.concepts for t in contexts]
        prompts = [prompts[i] for i in torch.randperm(len(prompts), generator=gen).tolist()]
        retain, retain_source = retain_texts(pipe, spec, s)
        retain = [retain[i] for i in torch.randperm(len(retain), generator=gen).tolist()]
        retaining = s.retain_weight > 0 and bool(retain)
        sampling = ESDSettings(ddim_steps=s.ddim_steps, sample_guidance=s.start_guidance,
                               trajectories=max(s.trajectories, 1), seed=s.seed)
        with torch.no_grad():
            cond = family.encode(pipe, prompts, device=device)
            uncond = family.unconditional(pipe, None, device=device)
            x, t, e0, ep, which = (v.to(device) for v in sample_training_states(pipe, cond, uncond, sampling, progress))
            if retaining:
                kept = family.encode(pipe, retain, device=device)
                rx, rt, _, r_target, r_which = (v.to(device) for v in
                                          sample_training_states(pipe, kept, uncond, sampling, progress))
        sample_s = time.perf_counter() - start
        which = which.cpu()
        by_prompt = {int(i): (which == i).nonzero().view(-1) for i in which.unique()}
        usable = sorted(by_prompt)

        train = [p for _, p in params]
        originals = [p.detach().clone() for p in train]
        modules = [pipe.unet] + [enc for _, _, enc in family.encoders(pipe)]
        flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        modes = [(m, m.training) for m in modules]
        attack = PrefixAttack(pipe, s, gen)
        adv, adv_ids = None, None

        def draw_state(rows):
            """One random state of each row's concept prompt: (x_t, t, ε0(x_t, t | p), ε0(x_t, t))."""
            pick = torch.stack([by_prompt[r][torch.randint(len(by_prompt[r]), (1,), generator=gen)]
                                for r in rows]).view(-1).to(device)
            return x[pick], t[pick], ep[pick], e0[pick]

        losses, keep_losses, attack_first, attack_last, rounds = [], [], [], [], 0
        typed: list[str] = []
        try:
            for m in modules:
                m.requires_grad_(False)
                m.eval()
            optimizer = torch.optim.Adam(train, lr=s.lr)
            bar = tqdm(range(s.iterations), desc="advunlearn: training the text encoder", unit="it",
                       disable=not progress)
            rows: list[int] = []
            for i in bar:
                if i % s.attack_every == 0 or not rows:  # a new concept prompt (and adversarial prompt) per round
                    rows = [usable[int(j)] for j in torch.randint(len(usable), (s.batch_size,), generator=gen)]
                    texts = [prompts[r] for r in rows]
                    adv = None
                    if i >= s.warmup and s.attack_steps > 0:
                        adv, adv_ids, a_losses = attack.run(texts, lambda: draw_state(rows)[:3])
                        attack_first.append(a_losses[0])
                        attack_last.append(a_losses[-1])
                        rounds += 1
                        if adv_ids is not None and len(typed) < 5:
                            from erasekit.attacks.unlearndiffatk import tokens_text

                            typed.append(f"{tokens_text(pipe.tokenizer, adv_ids[0])} {texts[0]}")
                for p in train:
                    p.requires_grad_(True)
                xs, ts, eps, e0s = draw_state(rows)
                pred = pipe.unet(xs, ts, **encode(pipe, texts, adv).unet_kwargs()).sample
                r_pred = r_tgt = None
                if retaining:
                    rpick = torch.randint(len(rx), (s.retain_batch,), generator=gen).to(device)
                    rc = encode(pipe, [retain[int(j)] for j in r_which[rpick]])
                    r_pred, r_tgt = pipe.unet(rx[rpick], rt[rpick], **rc.unet_kwargs()).sample, r_target[rpick]
                loss, erase_term, keep = outer_loss(pred, e0s, eps, s.negative_guidance, r_pred, r_tgt,
                                                    s.retain_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for p in train:
                    p.requires_grad_(False)
                losses.append(erase_term.detach())
                if keep is not None:
                    keep_losses.append(keep.detach())
                if progress and len(losses) % 20 == 0:
                    bar.set_postfix(loss=f"{float(torch.stack(losses[-20:]).mean()):.4f}")
            solve_s = time.perf_counter() - start
            tensors = {n: p.detach().clone() for n, p in params}
        finally:
            with torch.no_grad():
                for p, o in zip(train, originals):
                    p.copy_(o)
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.train(mode)
        values = torch.stack(losses).tolist()
        k = max(1, len(values) // 10)
        extra = {
            "trained_tensors": len(params), "trained_parameters": sum(p.numel() for p in train),
            "components": [comp for comp, _ in encoders], "training_states": len(x), "prompts": len(prompts),
            "retain": {"source": retain_source, "prompts": len(retain) if retaining else 0,
                       "loss_last": round(float(torch.stack(keep_losses[-k:]).mean()), 6) if keep_losses else None},
            "loss_first": round(sum(values[:k]) / k, 6), "loss_last": round(sum(values[-k:]) / k, 6),
            "attack": {"rounds": rounds, "steps": rounds * s.attack_steps,
                       "loss_first": round(float(torch.stack(attack_first).mean()), 6) if attack_first else None,
                       "loss_last": round(float(torch.stack(attack_last).mean()), 6) if attack_last else None,
                       "example_prompts": typed},
            "sampling_s": round(sample_s, 3), "training_s": round(solve_s - sample_s, 3),
        }
        return Result(tensors, solve_s, extra)

