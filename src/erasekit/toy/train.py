"""Training of the embedded world: data bank, VAE, detector, UNet. Meant for a GPU; resumable in short runs.

    python -m erasekit.toy.train --stage all --workdir .cache/train --minutes 9 --export src/erasekit/toy/weights

Every stage keeps a checkpoint (safetensors + JSON, no pickle) under ``workdir`` and continues from it, so a
run cut off after at most ten minutes loses at most one checkpoint interval; exports (float16 safetensors, the
shipped format) are written at the end of every stage. The data bank is a deterministic function of the seed:
a fresh machine re-renders the same images. Caption states are encoded once for the whole finite caption
catalogue and looked up per sample, which is what makes a step cheap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.toy import architecture as arch
from erasekit.toy.captions import CaptionSampler
from erasekit.toy.detector import DETECTOR_FILE, LABELS, ToyDetector
from erasekit.toy.render import render_batch
from erasekit.toy.world import COLORS, SHAPE_LABELS, TEXTURES, Scene

STAGES = ("bank", "vae", "detector", "unet")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data bank
def _render_chunk(args):
    start, count, size = args
    imgs, scenes = render_batch(range(start, start + count), size)
    codes = np.array([[SHAPE_LABELS.index(s.shape), COLORS.index(s.color), TEXTURES.index(s.texture)] for s in scenes])
    return imgs, codes


def render_bank(n: int, seed_offset: int, size: int = arch.IMAGE_SIZE, workers: int | None = None):
    """Images (n, size, size, 3) uint8 and label codes (n, 3) for seeds seed_offset .. seed_offset+n-1."""
    chunk = 2000
    jobs = [(seed_offset + i, min(chunk, n - i), size) for i in range(0, n, chunk)]
    workers = workers or max(1, os.cpu_count() or 1)
    if workers == 1 or len(jobs) == 1:
        parts = [_render_chunk(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_or_render_bank(workdir: Path, n: int, seed_offset: int = 0):
    path = workdir / f"bank_{n}_{seed_offset}.npz"
    if path.is_file():
        z = np.load(path)
        return z["images"], z["codes"]
    t = time.time()
    images, codes = render_bank(n, seed_offset)
    np.savez(path, images=images, codes=codes)
    log(f"rendered bank of {n} images in {time.time() - t:.1f}s")
    return images, codes


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC on any device -> float NCHW in [-1, 1]."""
    # contiguous: a channels-last view made CPU GroupNorm/conv training several times slower
    return images_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


# ----------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None, meta: dict, ema=None):
    """Model, EMA and optimizer tensors as safetensors, the rest as JSON; written atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    if opt is not None:
        for i, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(path: Path, model, opt=None, ema=None) -> dict | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    if opt is not None:
        sd = opt.state_dict()
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        sd["state"] = state
        opt.load_state_dict(sd)
    return json.loads(path.with_suffix(".json").read_text())


def export_fp16(module: torch.nn.Module, path: Path) -> None:
    """The shipped format: floating tensors in float16 (half the size), integer buffers as they are."""
    from safetensors.torch import save_file

    sd = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


# ----------------------------------------------------------------------------------------------- text states
def load_minilm(device):
    """MiniLM from the pip package, or from a float16 copy with a pruned vocabulary (ERASEKIT_MINILM_DIR)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    carried = os.environ.get("ERASEKIT_MINILM_DIR")
    if not carried:
        from erasekit.toy.text_encoder import load_text_encoder, load_tokenizer

        return load_tokenizer(), load_text_encoder().to(device)
    from safetensors import safe_open
    from safetensors.torch import load_file

    tok = BertTokenizer.from_pretrained(carried)
    tok.model_max_length = arch.MAX_TOKENS
    model = BertModel(BertConfig.from_pretrained(carried), add_pooling_layer=False)
    sd = load_file(os.path.join(carried, "pruned_fp16.safetensors"))
    with safe_open(os.path.join(carried, "pruned_fp16.safetensors"), "pt") as f:
        word_key = f.metadata()["word_key"]
    ids, rows = sd.pop("pruned.word_ids"), sd.pop("pruned.word_rows")
    sd.pop("embeddings.position_ids", None)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    with torch.no_grad():
        emb = dict(model.named_parameters())[word_key]
        emb.zero_()
        emb[ids] = rows.float()
    return tok, model.eval().to(device)


@torch.no_grad()
def encode_catalogue(texts: list[str], device) -> torch.Tensor:
    tok, model = load_minilm(device)
    out = []
    for i in range(0, len(texts), 512):
        ids = tok(texts[i : i + 512], padding="max_length", max_length=arch.MAX_TOKENS, truncation=True, return_tensors="pt")
        out.append(model(ids.input_ids.to(device))[0].float())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- stages
class Trainer:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.export = Path(args.export)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.deadline = time.time() + args.minutes * 60
        torch.manual_seed(args.seed)
        self._bank = None
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals made CPU convolutions many times slower
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def time_left(self) -> float:
        return self.deadline - time.time()

    def bank(self):
        if self._bank is None:
            images, codes = load_or_render_bank(self.workdir, self.args.bank_size, 0)
            self._bank = (torch.from_numpy(images).to(self.device), torch.from_numpy(codes).to(self.device))
        return self._bank

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # --- VAE
    def make_vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL(**arch.VAE_CONFIG).to(self.device)

    def train_vae(self):
        a = self.args
        images, _ = self.bank()
        vae = self.make_vae()
        opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, weight_decay=0.0)
        ckpt = self.workdir / "vae.safetensors"
        meta = load_checkpoint(ckpt, vae, opt) or {"step": 0}
        step, g = meta["step"], torch.Generator(device=self.device).manual_seed(a.seed + meta["step"])
        t0, last_save = time.time(), time.time()
        while step < a.vae_steps and self.time_left() > 30:
            idx = torch.randint(0, len(images), (a.vae_batch,), device=self.device, generator=g)
            x = to_float(images[idx])
            for pg in opt.param_groups:
                pg["lr"] = cosine_lr(step, a.vae_steps, a.vae_lr, 200)
            with self.autocast():
                post = vae.encode(x).latent_dist
                z = post.sample(generator=g)
                rec = vae.decode(z).sample
            rec = rec.float()
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + a.kl_weight * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 200 == 0:
                log(f"vae step {step} loss {loss.item():.4f} ({step - meta['step']} steps in {time.time() - t0:.0f}s)")
            if time.time() - last_save > 120:
                save_checkpoint(ckpt, vae, opt, {"step": step})
                last_save = time.time()
        save_checkpoint(ckpt, vae, opt, {"step": step})
        # scaling factor: unit variance latents, as SD's 0.18215 does for its VAE
        with torch.no_grad(), self.autocast():
            z = vae.encode(to_float(images[:4096])).latent_dist.sample()
        scale = float(1.0 / z.float().std())
        with torch.no_grad():
            x = to_float(images[-512:])
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
            psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec, x)))
        self._write_meta(vae_scaling_factor=scale, vae_steps=step, vae_psnr_db=round(psnr, 2))
        export_fp16(vae, self.export / "vae.safetensors")
        log(f"vae done at step {step}: scaling factor {scale:.4f}, PSNR {psnr:.2f} dB")
        return step >= a.vae_steps

    def _write_meta(self, **kw):
        path = self.export / "meta.json"
        meta = json.loads(path.read_text()) if path.is_file() else {}
        meta.update(kw)
        meta["image_size"] = arch.IMAGE_SIZE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=1, sort_keys=True))

    def load_trained_vae(self):
        from erasekit.toy.pipeline import _load_into

        vae = self.make_vae()
        ckpt = self.workdir / "vae.safetensors"
        if not load_checkpoint(ckpt, vae):
            _load_into(vae, self.export / "vae.safetensors")
        vae.requires_grad_(False).eval()
        scale = json.loads((self.export / "meta.json").read_text())["vae_scaling_factor"]
        return vae, scale

    # --- detector
    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """x in [-1, 1]. Random flips, blur, noise and tone shifts: generated images look like this."""
        n = len(x)
        flip = torch.rand(n, device=x.device, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        blur = torch.rand(n, device=x.device, generator=g) < 0.3
        k = torch.tensor([1.0, 2.0, 1.0], device=x.device)
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
        x = torch.where(blur[:, None, None, None], xb, x)
        x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, device=x.device, generator=g) - 0.5))
        x = x + 0.1 * (torch.rand(n, 3, 1, 1, device=x.device, generator=g) - 0.5)
        x = x + torch.randn(x.shape, device=x.device, generator=g) * 0.04 * torch.rand(n, 1, 1, 1, device=x.device, generator=g)
        return x.clamp(-1, 1)

    def train_detector(self):
        a = self.args
        images, codes = self.bank()
        vae, _ = self.load_trained_vae()
        det = ToyDetector().to(self.device)
        opt = torch.optim.AdamW(det.parameters(), lr=a.det_lr, weight_decay=1e-4)
        ckpt = self.workdir / "detector.safetensors"
        meta = load_checkpoint(ckpt, det, opt) or {"step": 0}
        step, g = meta["step"], torch.Generator(device=self.device).manual_seed(a.seed + 1 + meta["step"])
        # half of every batch are VAE round trips (blurred, slightly off in colour, as generated images are),
        # drawn from a pool computed once: a VAE pass per batch would dominate the step on a CPU
        pool_n = min(len(images), a.det_pool)
        with torch.no_grad(), self.autocast():
            pool = torch.cat([vae.decode(vae.encode(to_float(images[i : i + 512])).latent_dist.sample(generator=g)).sample.float().clamp(-1, 1)
                              for i in range(0, pool_n, 512)])
        log(f"detector: {pool_n} VAE round trips pooled")
        det.train()
        half = a.det_batch // 2
        while step < a.det_steps and self.time_left() > 30:
            idx = torch.randint(0, len(images), (a.det_batch - half,), device=self.device, generator=g)
            pidx = torch.randint(0, pool_n, (half,), device=self.device, generator=g)
            x = (self.augment(torch.cat([to_float(images[idx]), pool[pidx]]), g) + 1) / 2
            y = torch.cat([codes[idx], codes[pidx]])
            for pg in opt.param_groups:
                pg["lr"] = cosine_lr(step, a.det_steps, a.det_lr, 100)
            with self.autocast():
                out = det(x)
            is_shape = y[:, 0] != 0  # colour is undefined without a shape
            loss = F.cross_entropy(out["shape"].float(), y[:, 0]) + F.cross_entropy(out["texture"].float(), y[:, 2])
            loss = loss + (F.cross_entropy(out["color"].float(), y[:, 1], reduction="none") * is_shape).sum() / is_shape.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 200 == 0:
                log(f"detector step {step} loss {loss.item():.4f}")
        save_checkpoint(ckpt, det, opt, {"step": step})
        det.eval()
        acc = self.detector_accuracy(det, vae)
        self._write_meta(detector_steps=step, detector_heldout_accuracy=acc)
        export_fp16(det, self.export / DETECTOR_FILE)
        log(f"detector done at step {step}: held-out accuracy {acc}")
        return step >= a.det_steps

    @torch.no_grad()
    def detector_accuracy(self, det, vae, n: int = 5000) -> dict:
        imgs, codes = render_bank(n, 10_000_000, workers=1)  # seeds never in the bank
        x = to_float(torch.from_numpy(imgs).to(self.device))
        y = torch.from_numpy(codes).to(self.device)
        res = {}
        for name, xin in (("render", x), ("vae_roundtrip", vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1))):
            out = det((xin + 1) / 2)
            shape_ok = out["shape"].argmax(-1) == y[:, 0]
            m = y[:, 0] != 0
            res[name] = {
                "shape": round(float(shape_ok.float().mean()), 4),
                "color": round(float((out["color"].argmax(-1) == y[:, 1])[m].float().mean()), 4),
                "texture": round(float((out["texture"].argmax(-1) == y[:, 2]).float().mean()), 4),
            }
        return res

    # --- UNet
    def train_unet(self):
        from diffusers import DDPMScheduler, UNet2DConditionModel

        a = self.args
        images, codes = self.bank()
        vae, scale = self.load_trained_vae()
        lat_path = self.workdir / f"latents_{a.bank_size}.safetensors"
        if lat_path.is_file():
            from safetensors.torch import load_file

            stats = load_file(str(lat_path))
            mean, std = stats["mean"].to(self.device), stats["std"].to(self.device)
        else:
            t = time.time()
            means, stds = [], []
            with torch.no_grad(), self.autocast():
                for i in range(0, len(images), 2048):
                    d = vae.encode(to_float(images[i : i + 2048])).latent_dist
                    means.append(d.mean.float())
                    stds.append(d.std.float())
            mean, std = torch.cat(means), torch.cat(stds)
            from safetensors.torch import save_file

            save_file({"mean": mean.cpu().contiguous(), "std": std.cpu().contiguous()}, str(lat_path))
            log(f"encoded {len(images)} latents in {time.time() - t:.1f}s")
        sampler = CaptionSampler(p_drop=a.p_drop, p_partial=a.p_partial)
        states_path = self.workdir / "caption_states.safetensors"
        if states_path.is_file():
            from safetensors.torch import load_file

            states = load_file(str(states_path))["states"].float().to(self.device)
        else:
            t = time.time()
            states = encode_catalogue([c.text for c in sampler.captions], self.device)
            from safetensors.torch import save_file

            save_file({"states": states.cpu().contiguous()}, str(states_path))
            log(f"encoded {len(states)} captions in {time.time() - t:.1f}s")
        keys = [(SHAPE_LABELS[s], COLORS[c], TEXTURES[t]) for s, c, t in codes.cpu().tolist()]
        unet = UNet2DConditionModel(**arch.UNET_CONFIG).to(self.device)
        ema = UNet2DConditionModel(**arch.UNET_CONFIG).to(self.device).requires_grad_(False)
        ema.load_state_dict(unet.state_dict())
        opt = torch.optim.AdamW(unet.parameters(), lr=a.unet_lr, weight_decay=0.01)
        ckpt = self.workdir / "unet.safetensors"
        meta = load_checkpoint(ckpt, unet, opt, ema)
        if meta is None and a.init_unet:
            from erasekit.toy.pipeline import _load_into

            _load_into(unet, Path(a.init_unet))
            ema.load_state_dict(unet.state_dict())
            log(f"initialised UNet from {a.init_unet}")
        meta = meta or {"step": a.init_step}
        noise_sched = DDPMScheduler(**{k: v for k, v in arch.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
        acp = noise_sched.alphas_cumprod.to(self.device)
        step = meta["step"]
        ema_params, unet_params = list(ema.parameters()), list(unet.parameters())
        g = torch.Generator(device=self.device).manual_seed(a.seed + 2 + step)
        rng = np.random.default_rng(a.seed + step)
        t0, last_save, last_step = time.time(), time.time(), step
        while step < a.unet_steps and self.time_left() > 40:
            idx = torch.randint(0, len(images), (a.unet_batch,), device=self.device, generator=g)
            cap = torch.from_numpy(sampler.sample([keys[i] for i in idx.tolist()], rng)).to(self.device)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, device=self.device, generator=g)) * scale
            t = torch.randint(0, 1000, (len(idx),), device=self.device, generator=g)
            eps = torch.randn(z0.shape, device=self.device, generator=g)
            ab = acp[t].view(-1, 1, 1, 1)
            zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
            for pg in opt.param_groups:
                pg["lr"] = cosine_lr(step, a.unet_steps, a.unet_lr, 500)
            with self.autocast():
                pred = unet(zt, t, states[cap]).sample
            loss = F.mse_loss(pred.float(), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            step += 1
            with torch.no_grad():
                d = min(a.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema_params, unet_params, 1 - d)
            if step % 250 == 0:
                rate = (step - last_step) / (time.time() - t0)
                log(f"unet step {step} loss {loss.item():.4f} ({rate:.1f} steps/s)")
            if time.time() - last_save > 120:
                save_checkpoint(ckpt, unet, opt, {"step": step}, ema=ema)
                export_fp16(ema, self.export / "unet.safetensors")
                last_save = time.time()
        save_checkpoint(ckpt, unet, opt, {"step": step}, ema=ema)
        export_fp16(ema, self.export / "unet.safetensors")
        self._write_meta(unet_steps=step, unet_batch=a.unet_batch, caption_dropout=a.p_drop, bank_size=a.bank_size, seed=a.seed)
        log(f"unet saved at step {step}")
        return step >= a.unet_steps


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every erasekit command (not argparse's usage box)
        from erasekit.errors import ErasekitError

        raise ErasekitError(message)


def check_args(args) -> None:
    """Every count and rate bounded and finite before any work (``--minutes nan`` would disable the time limit)."""
    from erasekit.checks import finite, integer
    from erasekit.limits import MAX_BATCH, MAX_IMAGES, MAX_OPTIMISATION_STEPS, MAX_SEED, MAX_TRAIN_MINUTES

    finite("--minutes", args.minutes, low=0, low_open=True, high=MAX_TRAIN_MINUTES)
    integer("--seed", args.seed, low=0, high=MAX_SEED)
    for name in ("bank_size", "det_pool"):
        integer(f"--{name.replace('_', '-')}", getattr(args, name), low=1, high=MAX_IMAGES)
    for name in ("vae_steps", "det_steps", "unet_steps", "init_step"):
        integer(f"--{name.replace('_', '-')}", getattr(args, name), low=0, high=MAX_OPTIMISATION_STEPS)
    for name in ("vae_batch", "det_batch", "unet_batch"):
        integer(f"--{name.replace('_', '-')}", getattr(args, name), low=1, high=MAX_BATCH)
    for name in ("vae_lr", "kl_weight", "det_lr", "unet_lr"):
        finite(f"--{name.replace('_', '-')}", getattr(args, name), low=0)
    for name in ("ema_decay", "p_drop", "p_partial"):
        finite(f"--{name.replace('_', '-')}", getattr(args, name), low=0, high=1)


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    p.add_argument("--workdir", default=".cache/train")
    p.add_argument("--export", default=str(Path(__file__).resolve().parent / "weights"))
    p.add_argument("--minutes", type=float, default=9.0, help="stop (after saving) before this much wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bank-size", type=int, default=50_000)
    p.add_argument("--vae-steps", type=int, default=2400)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--det-steps", type=int, default=1500)
    p.add_argument("--det-batch", type=int, default=128)
    p.add_argument("--det-lr", type=float, default=2e-3)
    p.add_argument("--det-pool", type=int, default=10_000, help="VAE round trips pooled for the detector")
    p.add_argument("--unet-steps", type=int, default=16000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=6e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-drop", type=float, default=0.1)
    p.add_argument("--p-partial", type=float, default=0.25)
    p.add_argument("--init-unet", default=None, help="float16 UNet weights to start from when no checkpoint exists")
    p.add_argument("--init-step", type=int, default=0, help="the step those weights were saved at (for the LR schedule)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    tr = Trainer(args)
    log(f"device {tr.device}, stage {args.stage}, {args.minutes} min")
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        if tr.time_left() < 40:
            log(f"out of time before stage {stage}; rerun to continue")
            break
        if stage == "bank":
            tr.bank()
        elif stage == "vae":
            if (tr.export / "vae.safetensors").is_file() and args.stage == "all" and (tr.workdir / "vae.json").is_file() \
                    and json.loads((tr.workdir / "vae.json").read_text())["step"] >= args.vae_steps:
                continue
            if not tr.train_vae():
                break
        elif stage == "detector":
            done = tr.workdir / "detector.json"
            if args.stage == "all" and done.is_file() and json.loads(done.read_text())["step"] >= args.det_steps:
                continue
            if not tr.train_detector():
                break
        elif stage == "unet":
            tr.train_unet()
    log("finished")


if __name__ == "__main__":
    main()
