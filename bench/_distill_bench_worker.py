"""Worker of `bench/distill_step.py`: times DMD2 rounds, one way per sub-command.

    python -m bench._distill_bench_worker flashctl --config CFG.json --out DIR   (under torchrun)
    python -m bench._distill_bench_worker minimal  --config CFG.json --out DIR   (one process)

`flashctl`: `DistillJob.round` on DeepSpeed ZeRO-3 engines (CPU accelerator, gloo), every
rank writes `DIR/{tag}-r{rank}.json` (`tag` from CFG).

`minimal`: a single-file DMD2 loop in plain PyTorch + diffusers classes (no DeepSpeed, no
flashctl trainer code): the same transformer weights, batch, K critic updates, student steps
(the k of every micro-step is given in CFG so both sides run the same number of forwards),
the same CFG teacher calls, torch.optim.AdamW with the same settings and gradient clipping,
and the same prompt encoding (text encoder for each micro-step's prompts; the constant "" negative
encoded once).
Writes `DIR/minimal.json`.

Both record per round: wall time, and the time spent building the conditioning (data + text
encoder), so the trainer overhead can be read without the encoding.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ flashctl


def persistent_fraction(engine) -> float:
    """Fraction of the parameters (elements) every rank keeps whole under ZeRO-3: those below
    `stage3_param_persistence_threshold` (ds_persist), plus any not partitioned at all."""
    total = whole = 0
    for p in engine.module.parameters():
        n = p.ds_numel if hasattr(p, "ds_tensor") else p.numel()
        total += n
        whole += n if (not hasattr(p, "ds_tensor") or getattr(p, "ds_persist", False)) else 0
    return whole / max(total, 1)


def run_flashctl(cfg: dict[str, Any], out: Path) -> None:
    """Time `DistillJob.round` under the spec of `cfg` on this rank."""
    import torch

    from flashctl.distill.engine import barrier, full_param_bytes, init_distributed, local_param_bytes
    from flashctl.distill.worker import DistillJob
    from flashctl.spec import load_spec

    spec = load_spec(REPO / "experiments" / "tiny-cpu.yaml", cfg["overrides"])
    info = init_distributed("cpu")
    t0 = time.perf_counter()
    job = DistillJob(spec, out / f"run-w{info.world_size}", info)
    setup_s = time.perf_counter() - t0

    # Instrument (not replace) the conditioning step: time spent in data + text encoding.
    encode = job.conditioning
    cond_s = [0.0]

    def timed_conditioning(task: str):
        t = time.perf_counter()
        c = encode(task)
        cond_s[0] += time.perf_counter() - t
        return c

    job.conditioning = timed_conditioning  # type: ignore[method-assign]
    rounds = []
    for step in range(cfg["warmup"] + cfg["rounds"]):
        barrier()
        cond_s[0] = 0.0
        t = time.perf_counter()
        m = job.round(step)
        rounds.append({"step": step, "seconds": time.perf_counter() - t, "conditioning_s": cond_s[0],
                       "k_generator": int(m["train/student_step"]), "loss_generator": m["train/loss_generator"],
                       "loss_critic": m["train/loss_critic"]})
    _write(out / f"{cfg['tag']}-r{info.rank}.json", {
        "rank": info.rank, "world_size": info.world_size, "threads": torch.get_num_threads(),
        "setup_s": setup_s, "rounds": rounds,
        "student_local_param_bytes": local_param_bytes(job.student),
        "critic_local_param_bytes": local_param_bytes(job.critic),
        "student_full_param_bytes": full_param_bytes(job.student),
        "student_persistent_fraction": persistent_fraction(job.student),
    })
    barrier()


# ------------------------------------------------------------------------------------- minimal


def run_minimal(cfg: dict[str, Any], out: Path) -> None:
    """The plain-PyTorch DMD2 loop; see the module docstring."""
    import pyarrow as pa
    import torch
    import torch.nn.functional as F
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    teacher_dir = Path(cfg["teacher"])
    t0 = time.perf_counter()
    teacher = QwenImageTransformer2DModel.from_pretrained(teacher_dir, subfolder="transformer").eval()
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher_dir, subfolder="text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir / "tokenizer")
    # The pipeline only as the official prompt encoder (template + hidden-state drop).
    encoder = QwenImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                                transformer=None)
    vae_cfg = json.loads((teacher_dir / "vae" / "config.json").read_text())
    f = 2 ** len(vae_cfg["temperal_downsample"]) * 2  # VAE factor x 2x2 patch

    adam = {"lr": cfg["lr_critic"], "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    opt_c = torch.optim.AdamW(critic.parameters(), **adam)
    opt_g = torch.optim.AdamW(student.parameters(), **{**adam, "lr": cfg["lr_generator"]})
    setup_s = time.perf_counter() - t0

    # prompts of the prepared T2I rows, read straight from the Arrow shards
    prompts, sizes = [], set()
    for shard in sorted(Path(cfg["data"]).glob("**/*.arrow")):
        t = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all().select(["task", "prompt", "width", "height"])
        for row in t.to_pylist():
            if row["task"] == "t2i":
                prompts.append(row["prompt"])
                sizes.add((row["height"], row["width"]))
    if len(sizes) != 1:
        raise SystemExit(f"minimal loop expects one image size, got {sorted(sizes)}")
    (h, w), = sizes
    B, K, S, shift, cfg_scale = cfg["batch_size"], cfg["critic_updates"], cfg["student_steps"], cfg["shift"], cfg["cfg_scale"]
    seq, ch = (h // f) * (w // f), teacher.config.in_channels
    img_shapes = [[(1, h // f, w // f)]] * B
    base = torch.linspace(1.0, 1.0 / S, S, dtype=torch.float64)
    sigmas = torch.cat([shift * base / (1 + (shift - 1) * base), torch.zeros(1, dtype=torch.float64)]).float()
    cursor = [0]

    def encode(texts: list[str]):
        e, m = encoder.encode_prompt(texts, device=torch.device("cpu"))
        return e, (None if m is None or bool(m.all()) else m)

    with torch.no_grad():  # the constant CFG negative, encoded once (as flashctl does)
        e_neg, m_neg = encode([""])
        negative = (e_neg.expand(B, *e_neg.shape[1:]), None if m_neg is None else m_neg.expand(B, *m_neg.shape[1:]))

    def next_cond():
        i = cursor[0]
        batch = [prompts[(i + j) % len(prompts)] for j in range(B)]
        cursor[0] = i + B
        with torch.no_grad():
            return encode(batch), negative

    def velocity(model, x, t, cond):
        e, m = cond
        return model(hidden_states=x, timestep=t.expand(B), encoder_hidden_states=e, encoder_hidden_states_mask=m,
                     img_shapes=img_shapes, return_dict=False)[0]

    def bc(t):
        return t.view(-1, 1, 1)

    def simulate(cond, k, noise, grad):
        x = noise
        with torch.no_grad():
            for i in range(k):
                x = x + (sigmas[i + 1] - sigmas[i]) * velocity(student, x, sigmas[i], cond)
        with torch.set_grad_enabled(grad):
            return x - sigmas[k] * velocity(student, x, sigmas[k], cond)

    rounds = []
    for step in range(cfg["warmup"] + cfg["rounds"]):
        cond_s = 0.0
        t_round = time.perf_counter()
        for micro in range(K + 1):
            k = cfg["ks"][step][micro]
            tc = time.perf_counter()
            pos, neg = next_cond()
            cond_s += time.perf_counter() - tc
            noise = torch.randn(B, seq, ch)
            if micro < K:  # critic: flow matching on detached student samples
                x0 = simulate(pos, k, noise, grad=False)
                t = torch.rand(B)
                eps = torch.randn_like(x0)
                v = velocity(critic, (1 - bc(t)) * x0 + bc(t) * eps, t, pos)
                loss_c = F.mse_loss(v, eps - x0)
                opt_c.zero_grad(set_to_none=True)
                loss_c.backward()
                torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
                opt_c.step()
            else:  # generator: DMD2 distribution matching with the CFG teacher
                x = simulate(pos, k, noise, grad=True)
                tau = cfg["tau_min"] + (cfg["tau_max"] - cfg["tau_min"]) * torch.rand(B)
                x_tau = (1 - bc(tau)) * x.detach() + bc(tau) * torch.randn_like(x)
                with torch.no_grad():
                    fake = x_tau - bc(tau) * velocity(critic, x_tau, tau, pos)
                    v_c, v_u = velocity(teacher, x_tau, tau, pos), velocity(teacher, x_tau, tau, neg)
                    real = x_tau - bc(tau) * (v_u + cfg_scale * (v_c - v_u))
                    g = (fake - real) / (x.detach() - real).abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-6)
                loss_g = 0.5 * F.mse_loss(x, (x - g).detach())
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt_g.step()
        rounds.append({"step": step, "seconds": time.perf_counter() - t_round, "conditioning_s": cond_s,
                       "k_generator": cfg["ks"][step][K], "loss_generator": float(loss_g),
                       "loss_critic": float(loss_c)})
    params = sum(p.numel() * p.element_size() for p in student.parameters())
    _write(out / "minimal.json", {"threads": torch.get_num_threads(), "setup_s": setup_s, "rounds": rounds,
                                  "student_full_param_bytes": params, "image_size": [h, w], "seq": seq})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["flashctl", "minimal"])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = json.loads(args.config.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    (run_flashctl if args.mode == "flashctl" else run_minimal)(cfg, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
