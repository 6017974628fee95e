"""Training the toy model within a fixed time budget: the VAE first, then the UNet and the text encoder together.

Data is generated on the fly on the training device (scenes from a seeded CPU generator, rendered on the
GPU), so there is no dataset to store and no epoch: every batch is new. Both stages run until their share of the
budget is spent and stop after a whole step; the finish (latent scale, samples, evaluation, saving) has a reserve.

- VAE: L1 + MSE reconstruction in -1..1 with a small KL term, sampling the posterior so that the decoder tolerates
  latents that are slightly off, as a diffusion model's are. Then the latent normalisation (shift and scale to
  zero mean and unit variance of the posterior means) and the latent-preview colours are fitted on fresh images.
- Diffusion: eps prediction on SD's scaled-linear schedule (beta 0.00085..0.012, 1000 steps: ComfyUI's defaults
  for SD1.5, read from ComfyUI's ModelSamplingDiscrete) with min-SNR-5 loss weights, 10% empty captions for
  classifier-free guidance, AdamW, warm-up then cosine decay over the stage's time, EMA weights (saved), bf16
  autocast on CUDA. Batches are drawn from a pool of encoded examples that is renewed by an eighth of a batch
  per step (LatentPool).
- Finish: samples with an Euler loop on ComfyUI's "normal" schedule and CFG, read back by toyworld.judge (object
  and scene accuracy of the generations against their captions), VAE reconstruction PSNR, the weights as fp16
  safetensors, metrics.json (losses, timings, accuracies, parameter counts), loss.png and samples.png.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import captions, judge, models, plots, render, world


@dataclass
class TrainConfig:
    out: str
    weights_dir: str
    name: str = "toyworld"
    budget_seconds: float = 480.0      # everything, from the process start to the last file written
    vae_fraction: float = 0.2          # of the training time (budget minus the finish reserve)
    finish_seconds: float = 50.0       # reserve for latent fit, sampling, evaluation and saving
    batch: int = 256
    vae_batch: int = 32
    lr: float = 4e-4
    vae_lr: float = 4e-4
    warmup_steps: int = 200
    kl_weight: float = 1e-5
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    image_size: int = 256
    seed: int = 0
    device: str = "cuda"
    max_vae_steps: int | None = None   # step caps (the smoke run); None: time alone decides
    max_steps: int | None = None
    fit_images: int = 512              # latent normalisation and preview fit
    eval_images: int = 256             # generated and judged at the end
    grid_images: int = 16
    sample_steps: int = 20
    cfg: float = 5.0
    shard_mib: float = 15.0            # the GPU machine returns files of at most 16 MiB
    log_every: int = 50
    pool_batches: int = 64             # encoded examples kept for reuse: pool_batches * batch of them
    fresh_fraction: float = 0.125      # of a batch, newly rendered and encoded each step (the rest is reused)
    min_snr: float | None = 5.0        # min-SNR-gamma loss weights (None: the plain eps loss)
    resume: list[str] | None = None    # weights files of an earlier run: keep its VAE, train its UNet further
    profile_steps: int = 0             # > 0: print the GPU kernel table of that many diffusion steps
    compile: str | None = None         # torch.compile mode for the diffusion step's forwards (None: eager)


@dataclass
class Clock:
    start: float
    config: TrainConfig
    marks: dict = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.start

    @property
    def train_end(self) -> float:
        return self.config.budget_seconds - self.config.finish_seconds

    def vae_end(self, train_start: float) -> float:
        return train_start + self.config.vae_fraction * (self.train_end - train_start)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _images(n: int, seed: int, size: int, device) -> tuple[torch.Tensor, world.Scenes]:
    scenes = world.sample_scenes(n, seed=seed, device=device)
    return render.render(scenes, size)[0], scenes


class SceneStream:
    """Training batches of scenes. Scenes are drawn on the CPU (so a seed means the same data on any device)
    for `chunk` steps at once and moved to the device in one copy: a small host-to-device copy per step would
    make the host wait for the device every step."""

    def __init__(self, batch: int, seed: int, device, chunk: int = 256):
        self.batch, self.seed, self.device, self.chunk = batch, seed, device, chunk
        self._scenes, self._first = None, None

    def at(self, step: int) -> world.Scenes:
        first = step - step % self.chunk
        if first != self._first:
            self._scenes = world.sample_scenes(self.batch * self.chunk, seed=self.seed + first, device=self.device)
            self._first = first
        i = (step - first) * self.batch
        return self._scenes[i:i + self.batch]


class LatentPool:
    """Encoded training examples (normalised latents and caption tokens) that steps draw their batches from.

    Each step encodes only `fresh` new scenes, in place of the oldest ones, and draws its batch at random from the
    pool: an example serves about batch / fresh steps before it is replaced, and the scenes never repeat. (On the
    H100 this did not shorten the step: rendering and encoding were not what it waited for.)"""

    def __init__(self, stream: SceneStream, encode, size: int, fresh: int, generator: torch.Generator):
        self.stream, self.encode, self.fresh, self.g = stream, encode, fresh, generator
        chunks = [self._encode(i) for i in range(-(-size // stream.batch))]
        self.latents = torch.cat([c[0] for c in chunks])[:size]
        self.tokens = torch.cat([c[1] for c in chunks])[:size]
        self._chunk, self._left, self._next, self._oldest = None, 0, len(chunks), 0

    def _encode(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        scenes = self.stream.at(index)
        return self.encode(scenes), captions.token_ids(scenes)

    def refresh(self) -> None:
        """Replaces the `fresh` oldest examples by new ones (whole stream batches are encoded and used up in
        slices, so the encoder always runs at full batch width)."""
        n = len(self.latents)
        take = self.fresh
        while take:
            if not self._left:
                self._chunk, self._left = self._encode(self._next), self.stream.batch
                self._next += 1
            k = min(take, self._left, n - self._oldest)
            lo = self.stream.batch - self._left
            self.latents[self._oldest:self._oldest + k] = self._chunk[0][lo:lo + k]
            self.tokens[self._oldest:self._oldest + k] = self._chunk[1][lo:lo + k]
            self._oldest = (self._oldest + k) % n
            self._left -= k
            take -= k

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(self.latents), (size,), device=self.latents.device, generator=self.g)
        return self.latents[i], self.tokens[i]


def _step_seed(cfg: TrainConfig, stage: int, step: int) -> int:
    return (cfg.seed * 1_000_003 + stage * 100_000_007 + step) % (2**62)


def _lr_factor(step: int, frac: float, warmup: int) -> float:
    """Linear warm-up, then constant to half the stage's time, then cosine down to 10%."""
    w = min(1.0, (step + 1) / max(1, warmup))
    decay = 1.0 if frac < 0.5 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - 0.5) / 0.5)))
    return w * decay


class _Log:
    """Loss means over `every` steps, read from the device only then (one sync per window)."""

    def __init__(self, name: str, every: int):
        self.name, self.every = name, every
        self.curve: list[tuple[int, float]] = []
        self._sum, self._n = None, 0

    def add(self, step: int, loss: torch.Tensor, clock: Clock, extra: str = "") -> None:
        self._sum = loss.detach().float() if self._sum is None else self._sum + loss.detach().float()
        self._n += 1
        if self._n == self.every:
            self.flush(step, clock, extra)

    def flush(self, step: int, clock: Clock, extra: str = "") -> None:
        if self._n:
            value = float(self._sum) / self._n
            self.curve.append((step, value))
            print(f"[{clock.now():6.1f}s] {self.name} step {step:6d} loss {value:.5f}{extra}", flush=True)
        self._sum, self._n = None, 0


# --- stage 1: VAE -------------------------------------------------------------------------------------------------

def _vae_posterior(vae, x):
    moments = vae.quant_conv(vae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def train_vae(cfg: TrainConfig, clock: Clock, device: torch.device):
    vae = models.build_vae(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    log = _Log("vae", cfg.log_every)
    stream = SceneStream(cfg.vae_batch, _step_seed(cfg, 1, 0), device)
    g = torch.Generator(device=device).manual_seed(_step_seed(cfg, 1, 1))
    deadline = clock.vae_end(clock.now())
    t0, step = clock.now(), 0
    while clock.now() < deadline and (cfg.max_vae_steps is None or step < cfg.max_vae_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, (clock.now() - t0) / max(1e-9, deadline - t0), 100)
        with torch.no_grad():
            x = render.render(stream.at(step), cfg.image_size)[0] * 2 - 1
        with _autocast(device):
            mean, logvar = _vae_posterior(vae, x)
            z = mean + torch.randn(mean.shape, device=device, generator=g, dtype=mean.dtype) * (0.5 * logvar).exp()
            rec = vae.decode(z).float()
        kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1 - logvar.float()).mean()
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        log.add(step, loss, clock)
        step += 1
    log.flush(step, clock)
    vae.eval().requires_grad_(False)
    clock.marks["vae_steps"] = step
    clock.marks["vae_seconds"] = clock.now() - t0
    return vae, log.curve


@torch.no_grad()
def fit_latents(cfg: TrainConfig, vae, device) -> dict:
    """Latent normalisation (shift, scale: the posterior means get zero mean and unit variance, as SD's 0.18215
    gives its VAE unit variance) and the linear latent -> RGB preview, on fresh images; plus the VAE's
    reconstruction PSNR."""
    means, images = [], []
    chunk = min(cfg.fit_images, 64)
    for i in range(0, cfg.fit_images, chunk):
        x = _images(chunk, _step_seed(cfg, 3, i), cfg.image_size, device)[0]
        with _autocast(device):
            mean, _ = _vae_posterior(vae, x * 2 - 1)
        means.append(mean.float())
        images.append(x)
    mean = torch.cat(means)
    x = torch.cat(images)
    shift, scale = float(mean.mean()), 1.0 / float(mean.std())
    factors, bias = models.fit_latent_preview(((mean - shift) * scale).cpu(), x.cpu())
    with _autocast(device):
        rec = ((vae.decode(mean[:64]).float() + 1) / 2).clamp(0, 1)
    mse = float((rec - x[:64]).square().mean())
    return {"latent_scale": scale, "latent_shift": shift, "rgb_factors": factors, "rgb_bias": bias,
            "vae_psnr_db": 10 * math.log10(1 / max(mse, 1e-12))}


# --- stage 2: UNet + text encoder ---------------------------------------------------------------------------------

def _schedule():
    """(alphas_cumprod [1000], ModelSamplingDiscrete) from ComfyUI itself: the model is trained on exactly the
    schedule ComfyUI samples it with."""
    import comfy.model_sampling
    ms = comfy.model_sampling.ModelSamplingDiscrete()
    return 1.0 / (1.0 + ms.sigmas.double() ** 2), ms


class DiffusionStep:
    """One optimizer step of the UNet and text encoder, with the EMA update, on a batch drawn from a LatentPool.

    `cfg.compile` runs the forward passes through torch.compile (a torch.compile mode name, e.g. "default" or
    "max-autotune-no-cudagraphs"): on the H200 a batch-256 step took 127 ms eager and 72 ms compiled
    (benchmarks/train_step.py), after two to three minutes of compiling. The modules themselves stay uncompiled:
    their parameters and state dicts (what is saved) are the same either way."""

    def __init__(self, cfg: TrainConfig, unet, text, pool: LatentPool, generator: torch.Generator,
                 device: torch.device):
        self.cfg, self.unet, self.text, self.pool, self.g, self.device = cfg, unet, text, pool, generator, device
        unet.train()
        text.train()
        self.params = list(unet.parameters()) + list(text.parameters())
        fused = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.01, **fused)
        self.ema_unet, self.ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
        self.ema_params = list(self.ema_unet.parameters()) + list(self.ema_text.parameters())
        for p in self.ema_params:
            p.requires_grad_(False)
        self.alphas_cumprod = _schedule()[0].to(device, torch.float32)
        mode = cfg.compile
        self._unet_forward = torch.compile(unet, mode=mode) if mode else unet
        self._text_forward = torch.compile(models.encode_tokens, mode=mode) if mode else models.encode_tokens

    def __call__(self, step: int, lr: float) -> torch.Tensor:
        """The step's plain eps loss (a device tensor: reading it would wait for the device)."""
        cfg, g, device = self.cfg, self.g, self.device
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            self.pool.refresh()
            z0, tokens = self.pool.batch(cfg.batch)
            drop = torch.rand(cfg.batch, device=device, generator=g) < cfg.caption_dropout
            tokens = torch.where(drop[:, None], captions.empty_token_ids(cfg.batch, device), tokens)
            t = torch.randint(0, len(self.alphas_cumprod), (cfg.batch,), device=device, generator=g)
            noise = torch.randn(z0.shape, device=device, generator=g)
            a = self.alphas_cumprod[t][:, None, None, None]
            x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with _autocast(device):
            context = self._text_forward(self.text, tokens)
            eps = self._unet_forward(x_t, t.float(), context=context, transformer_options={})
        per_example = (eps.float() - noise).square().mean(dim=(1, 2, 3))
        loss = per_example.mean()  # logged: the plain eps loss, comparable across runs and weightings
        if cfg.min_snr is not None:
            # Min-SNR-gamma (Hang et al. 2023): the nearly clean steps, whose eps error is the largest but matters
            # least to the image, count less; the noisy steps that decide the layout count fully.
            snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
            objective = (per_example * snr.clamp(max=cfg.min_snr) / snr).mean()
        else:
            objective = loss
        self.opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        return loss


def latent_pool(cfg: TrainConfig, device: torch.device, vae, norm: tuple[float, float], first_step: int,
                generator: torch.Generator) -> LatentPool:
    """The pool of encoded examples a diffusion run starts from; a resumed run (`first_step` > 0) draws other
    scenes than the runs before it: the seeds move on with the steps."""
    stream = SceneStream(cfg.batch, _step_seed(cfg, 2, first_step), device)

    def encode(scenes):
        x = render.render(scenes, cfg.image_size)[0]
        with _autocast(device):
            return (_vae_posterior(vae, x * 2 - 1)[0].float() - norm[0]) * norm[1]

    with torch.no_grad():
        return LatentPool(stream, encode, cfg.pool_batches * cfg.batch,
                          max(1, round(cfg.fresh_fraction * cfg.batch)), generator)


def train_diffusion(cfg: TrainConfig, clock: Clock, device: torch.device, vae, norm: tuple[float, float],
                    start: tuple | None = None, first_step: int = 0):
    """`start`: (unet, text) to continue from (a resumed run), else fresh ones. `first_step` numbers the loss
    curve on from an earlier run's steps; the optimizer starts afresh (its state is not saved: it would double the
    weights files) with a short warm-up."""
    unet, text = start or (models.build_unet(device), models.build_text_encoder(device))
    g = torch.Generator(device=device).manual_seed(_step_seed(cfg, 2, first_step + 1))
    t_pool = clock.now()
    pool = latent_pool(cfg, device, vae, norm, first_step, g)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"[{clock.now():6.1f}s] latent pool of {len(pool.latents)} encoded in {clock.now() - t_pool:.1f}s; "
          f"{pool.fresh} new per step", flush=True)
    train_step = DiffusionStep(cfg, unet, text, pool, g, device)
    log = _Log("diffusion", cfg.log_every)
    profiler = _step_profiler(cfg.profile_steps) if cfg.profile_steps else None
    t0, step = clock.now(), 0
    deadline = clock.train_end
    while clock.now() < deadline and (cfg.max_steps is None or step < cfg.max_steps):
        frac = (clock.now() - t0) / max(1e-9, deadline - t0)
        lr = cfg.lr * _lr_factor(step, frac, cfg.warmup_steps)
        loss = train_step(step, lr)
        log.add(first_step + step, loss, clock, f" lr {lr:.2e}" if (step + 1) % cfg.log_every == 0 else "")
        step += 1
        if profiler is not None:
            profiler.step()
            if step == cfg.profile_steps + 2:
                profiler.stop()
                profiler = None
    log.flush(first_step + step, clock)
    clock.marks["diffusion_steps"] = step
    clock.marks["diffusion_seconds"] = clock.now() - t0
    return train_step.ema_unet, train_step.ema_text, log.curve


def _step_profiler(steps: int):
    """A started torch profiler that, after two warm-up steps, records `steps` steps and prints where their time
    went (what to speed up next: the step's budget is fixed, so its speed is the model's quality)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    def report(prof):
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60), flush=True)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=2, active=steps, repeat=1),
                   on_trace_ready=report)
    prof.start()
    return prof


# --- sampling and evaluation --------------------------------------------------------------------------------------

def normal_sigmas(model_sampling, steps: int) -> torch.Tensor:
    """ComfyUI's "normal" scheduler (comfy.samplers.normal_scheduler) for a schedule whose smallest sigma is not 0,
    as SD's is; written out because comfy.samplers imports every model family (torchvision among them)."""
    ms = model_sampling
    timesteps = torch.linspace(ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min), steps)
    return torch.tensor([float(ms.sigma(t)) for t in timesteps] + [0.0])


@torch.no_grad()
def sample(unet, text, vae, norm: tuple[float, float], tokens: torch.Tensor, seed: int, steps: int, cfg_scale: float,
           device, latent_size: int) -> torch.Tensor:
    """Images [N, 3, H, W] in 0..1 by Euler on ComfyUI's "normal" schedule with classifier-free guidance (what a
    KSampler with euler/normal does, written out so that training needs no ComfyUI graph)."""
    _, ms = _schedule()
    sigmas = normal_sigmas(ms, steps).to(device)
    n = tokens.shape[0]
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, 4, latent_size, latent_size, device=device, generator=g) * sigmas[0]
    with _autocast(device):
        ctx = torch.cat([models.encode_tokens(text, tokens), models.encode_tokens(text,
                                                                                  captions.empty_token_ids(n, device))])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        t = ms.timestep(sigma.cpu()).float().to(device).expand(2 * n)
        xin = torch.cat([x, x]) / (sigma ** 2 + 1).sqrt()
        with _autocast(device):
            eps = unet(xin, t, context=ctx, transformer_options={}).float()
        cond, uncond = eps.chunk(2)
        eps = uncond + cfg_scale * (cond - uncond)
        denoised = x - sigma * eps
        x = denoised + (x - denoised) / sigma * sigmas[i + 1]  # Euler step: d = (x - denoised) / sigma
    with _autocast(device):
        return ((vae.decode(x / norm[1] + norm[0]).float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def evaluate(cfg: TrainConfig, unet, text, vae, norm: tuple[float, float], device) -> tuple[dict, torch.Tensor, list[str]]:
    latent = cfg.image_size // models.LATENT_DOWNSCALE
    scenes = world.sample_scenes(cfg.eval_images, seed=_step_seed(cfg, 4, 0), device=device)
    chunk = 64
    images = torch.cat([sample(unet, text, vae, norm, captions.token_ids(scenes[i:i + chunk]), seed=cfg.seed + i,
                               steps=cfg.sample_steps, cfg_scale=cfg.cfg, device=device, latent_size=latent)
                        for i in range(0, len(scenes), chunk)])
    ok = judge.objects_correct(images, scenes)
    present = scenes.present
    result = {
        "eval_images": len(scenes),
        "object_accuracy": float(ok[present].float().mean()),
        "scene_accuracy": float(ok.all(dim=1).float().mean()),
        "sampler": f"euler/normal, {cfg.sample_steps} steps, cfg {cfg.cfg}",
    }
    n = min(cfg.grid_images, len(scenes))
    truth = render.render(scenes[:n], cfg.image_size)[0]
    grid = torch.stack([truth, images[:n]], 1).flatten(0, 1)  # truth and sample side by side
    return result, grid, captions.captions(scenes[:n])


def _resume(cfg: TrainConfig, device: torch.device):
    """The networks, latent fit and training summary of the weights in `cfg.resume`. Continuing from the saved
    (EMA) weights rather than the raw ones loses the last steps' noise, not their progress."""
    sd, meta = models.load_weights([Path(p) for p in cfg.resume])
    unet, text, vae = models.build_unet(device), models.build_text_encoder(device), models.build_vae(device)
    for prefix, module in ((models.UNET_PREFIX, unet), (models.TEXT_PREFIX + models.CLIP_NAME + ".transformer.",
                                                        text), (models.VAE_PREFIX, vae)):
        part = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    vae.eval().requires_grad_(False)
    fit = {"latent_shift": float(meta["latent_shift"]), "latent_scale": float(meta["latent_scale"]),
           "rgb_factors": json.loads(meta["latent_rgb_factors"]),
           "rgb_bias": json.loads(meta["latent_rgb_factors_bias"])}
    fit["vae_psnr_db"] = _vae_psnr(cfg, vae, device)
    return vae, unet, text, fit, json.loads(meta.get("training", "{}"))


@torch.no_grad()
def _vae_psnr(cfg: TrainConfig, vae, device) -> float:
    x = _images(min(cfg.fit_images, 64), _step_seed(cfg, 3, 0), cfg.image_size, device)[0]
    with _autocast(device):
        rec = ((vae.decode(_vae_posterior(vae, x * 2 - 1)[0]).float() + 1) / 2).clamp(0, 1)
    return 10 * math.log10(1 / max(float((rec - x).square().mean()), 1e-12))


def run(cfg: TrainConfig, start: float | None = None) -> dict:
    clock = Clock(start if start is not None else time.monotonic(), cfg)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    models.import_comfy()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{clock.now():6.1f}s] device {device}, budget {cfg.budget_seconds:.0f}s "
          f"(finish reserve {cfg.finish_seconds:.0f}s)", flush=True)

    earlier: dict = {}
    if cfg.resume:
        vae, unet, text, fit, earlier = _resume(cfg, device)
        vae_curve, clock.marks["vae_steps"] = [], 0
        start, first_step = (unet, text), earlier.get("diffusion_steps_total", earlier.get("diffusion_steps", 0))
        print(f"[{clock.now():6.1f}s] resumed from {cfg.resume[0]} after {first_step} diffusion steps; the VAE and "
              f"latent normalisation are kept", flush=True)
    else:
        vae, vae_curve = train_vae(cfg, clock, device)
        fit = fit_latents(cfg, vae, device)
        start, first_step = None, 0
    norm = (fit["latent_shift"], fit["latent_scale"])
    print(f"[{clock.now():6.1f}s] latent shift {norm[0]:.4f} scale {norm[1]:.4f}, VAE PSNR "
          f"{fit['vae_psnr_db']:.1f} dB", flush=True)
    unet, text, diff_curve = train_diffusion(cfg, clock, device, vae, norm, start, first_step)
    t_eval = clock.now()
    evaluation, grid, grid_captions = evaluate(cfg, unet, text, vae, norm, device)
    clock.marks["eval_seconds"] = clock.now() - t_eval
    print(f"[{clock.now():6.1f}s] generations judged: object accuracy {evaluation['object_accuracy']:.3f}, "
          f"scene accuracy {evaluation['scene_accuracy']:.3f}", flush=True)

    training = {"seed": cfg.seed, "vae_steps": earlier.get("vae_steps", clock.marks["vae_steps"]),
                "diffusion_steps": clock.marks["diffusion_steps"],
                "diffusion_steps_total": first_step + clock.marks["diffusion_steps"], "batch": cfg.batch,
                # runs may differ in batch size: the examples seen are the comparable measure of training
                "examples_total": earlier.get("examples_total", first_step * earlier.get("batch", cfg.batch))
                + clock.marks["diffusion_steps"] * cfg.batch, "compile": cfg.compile,
                "runs": earlier.get("runs", 1) + 1 if cfg.resume else 1,
                "final_diffusion_loss": diff_curve[-1][1] if diff_curve else None,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    sd = models.full_state_dict(unet, text, vae)
    meta = models.metadata(fit["latent_shift"], fit["latent_scale"], fit["rgb_factors"], fit["rgb_bias"], training)
    paths = models.save_weights(cfg.weights_dir, cfg.name, sd, meta, int(cfg.shard_mib * 2**20))
    counts = models.parameter_counts(sd)
    plots.loss_curves({"VAE": vae_curve, "UNet + text encoder": diff_curve}, out / "loss.png")
    plots.image_grid(grid, out / "samples.png", columns=8)
    clock.marks["total_seconds"] = clock.now()
    metrics = {
        "config": asdict(cfg), "parameters": counts, "parameters_total": sum(counts.values()),
        "weights": [str(p) for p in paths], "weights_bytes": sum(p.stat().st_size for p in paths),
        "latent": {k: fit[k] for k in ("latent_shift", "latent_scale", "vae_psnr_db")},
        "evaluation": evaluation, "timings": clock.marks, "training": training,
        "loss": {"vae": vae_curve, "diffusion": diff_curve},
        "samples_png": "pairs of (generator's render, model's sample), row by row",
        "samples_captions": grid_captions,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"[{clock.now():6.1f}s] wrote {', '.join(p.name for p in paths)} ({models.gib(metrics['weights_bytes'])}, "
          f"{sum(counts.values()):,} parameters) and metrics.json, loss.png, samples.png to {out}", flush=True)
    return metrics
