"""One diffusion transformer over several GPUs: diffusers' context parallelism under torchrun.

This is the "one model too big or too slow for one GPU" path. Every rank holds the whole
pipeline (text encoders, transformer, VAE), runs the same denoising loop with the same seed,
and diffusers' ``transformer.enable_parallelism(config=ContextParallelConfig(...))`` splits
the *token sequence* of every transformer forward across the ranks:

- ``--ulysses N`` (DeepSpeed-Ulysses): each rank computes Q/K/V for its 1/N of the tokens,
  one all-to-all swaps "my tokens, all heads" for "all tokens, my heads", attention runs
  locally, a second all-to-all swaps back. Two all-to-alls per attention layer; needs the
  number of attention heads and both sequence lengths (image and text tokens) divisible
  by N. Best on NVLink/NVSwitch nodes.
- ``--ring N`` (ring attention): each rank keeps its query chunk and walks all K/V chunks,
  merging partial results with their log-sum-exp. Needs an attention kernel that returns
  the LSE, so the native SDPA backend cannot do it; this script picks ``_native_cudnn`` on
  CUDA (bf16/fp16), or take ``--attention-backend flash`` with flash-attn installed.
- ``--ulysses A --ring B`` combines both (A*B ranks).

Usage (the real feature: one node, N CUDA GPUs, NCCL)::

    torchrun --nproc_per_node=4 -m backends.parallel \\
        --model black-forest-labs/FLUX.1-dev --prompt "a red fox in snow" \\
        --steps 28 --height 1024 --width 1024 --ulysses 4 --warmup 1 --out fox.png

    # any folder or hub id of a DiT pipeline whose transformer declares a ``_cp_plan``
    # (in diffusers 0.42: Flux, Flux2, Wan, QwenImage, LTX, LTX2, ChronoEdit, ...):
    torchrun --nproc_per_node=2 -m backends.parallel --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --prompt "a cat surfing" --ring 2 --out cat.png

Rank 0 saves the output and prints one JSON line of timings (load, warm-up, generation).
Without torchrun (no ``WORLD_SIZE`` in the environment) it runs the same code in one
process with no parallelism: the baseline to compare against.

Expected speed-up: only the transformer's work is divided (each rank runs attention and
MLPs on 1/N of the tokens, plus the all-to-all / K/V exchange); the text encoders and the VAE
run in full on every rank. The ceiling is therefore a little under N for the denoising loop,
approached on large images and videos (tens of thousands of tokens: 1024 px Flux, Wan video)
on NVLink-connected GPUs. At 512 px or below the sequence is short, communication dominates,
and it can be slower than one GPU. No GPU figure has been measured for this project yet:
time it with ``--warmup 1`` against the single-process run (same command without torchrun)
on the target hardware before quoting a number.

Limits:
- Memory: context parallelism splits activations, not weights; every GPU must still hold
  the whole transformer (combine with offloading or FP8 if it does not fit).
- diffusers marks ``enable_parallelism`` experimental; the API may change.
- Plain ``--ulysses``/``--ring`` need sequence lengths (and, for Ulysses, heads) divisible
  by the degree; ``--anything`` enables diffusers' "Ulysses/Ring Anything" modes that lift
  this at some cost.
- No CFG-parallel, no ``torch.compile`` here; the acceleration methods of the studio
  (caches etc.) are not applied.
- CPU: diffusers computes ``rank % torch.accelerator.device_count()``, which divides by
  zero without an accelerator, so this refuses to run on CPU; and the flash kernel that
  ring attention uses has no CPU registration. The test suite runs it on CPU with gloo only
  through the test aid ``tests/_cp_cpu_shim.py`` (patches both, in the test subprocess);
  that checks correctness (Ulysses and ring match one process to ~3e-7), not speed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m backends.parallel", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id or local folder of a diffusers DiT pipeline")
    src.add_argument("--dummy", action="store_true", help="tiny random Flux pipeline built from configs (runs anywhere)")
    p.add_argument("--prompt", default="a red circle on a white background")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (pipeline default if omitted)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses degree (all-to-all over heads)")
    p.add_argument("--ring", type=int, default=1, help="ring-attention degree")
    p.add_argument("--anything", action="store_true", help="Ulysses/Ring 'anything' mode: any sequence length")
    p.add_argument("--attention-backend", default=None,
                   help="diffusers attention backend; default: model's own for Ulysses, an LSE-capable one for ring")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--warmup", type=int, default=0, help="untimed generations before the timed one")
    p.add_argument("--out", default="parallel.png", help="image written by rank 0")
    p.add_argument("--npy", action="store_true",
                   help="also write <out>.npy (decoded float image) and <out>.latents.npy (final latents)")
    args = p.parse_args(argv)
    if args.ulysses < 1 or args.ring < 1:
        p.error("--ulysses and --ring must be >= 1")
    return args


# --------------------------------------------------------------------------- distributed


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: one process group, one device per rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    if not dist.is_available():
        raise SystemExit("this torch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # NCCL for the attention collectives; gloo for the small size exchanges of the
        # "anything" modes (what diffusers' own `diffusers-cli run --context-parallel` does).
        dist.init_process_group(backend="cpu:gloo,cuda:nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo")
    return rank, world_size, device


def cp_config(args: argparse.Namespace, world_size: int):
    from diffusers import ContextParallelConfig

    degree = args.ulysses * args.ring
    if degree != world_size:
        raise SystemExit(f"--ulysses {args.ulysses} x --ring {args.ring} = {degree}, but torchrun started {world_size} ranks")
    return ContextParallelConfig(
        ulysses_degree=args.ulysses, ring_degree=args.ring,
        ulysses_anything=args.anything and args.ring == 1,
        ring_anything=args.anything and args.ulysses == 1,
    )


def default_attention_backend(args: argparse.Namespace, device: torch.device) -> str | None:
    """Ring attention merges partial results by their log-sum-exp, which the native SDPA backend
    cannot return: pick a backend that can (cuDNN on CUDA, the CPU flash kernel on CPU)."""
    if args.attention_backend:
        return args.attention_backend
    if args.ring > 1:
        return "_native_cudnn" if device.type == "cuda" else "_native_flash"
    return None


def enable_context_parallel(pipe: Any, args: argparse.Namespace, world_size: int, device: torch.device) -> None:
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(transformer, "enable_parallelism"):
        raise SystemExit(f"{type(pipe).__name__} has no DiT `transformer` with enable_parallelism (UNet pipelines cannot)")
    if getattr(transformer, "_cp_plan", None) is None:
        raise SystemExit(f"{type(transformer).__name__} declares no context-parallel plan (_cp_plan) in this diffusers")
    if device.type == "cpu" and torch.accelerator.device_count() == 0:
        raise SystemExit("diffusers' context parallelism needs an accelerator (it divides by "
                         "torch.accelerator.device_count()); on CPU it runs only under the test aid tests/_cp_cpu_shim.py")
    backend = default_attention_backend(args, device)
    if backend:
        transformer.set_attention_backend(backend)
    transformer.enable_parallelism(config=cp_config(args, world_size))


# --------------------------------------------------------------------------- generation


def load_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    if args.dummy:
        from backends.tiny.dummy import dummy_flux_pipeline

        pipe = dummy_flux_pipeline()  # float32 weights
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype)
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)``; the same on every rank (same seed, CPU generator)."""
    params = set(inspect.signature(pipe.__call__).parameters)
    call: dict[str, Any] = {"prompt": args.prompt, "num_inference_steps": args.steps,
                            "generator": torch.Generator("cpu").manual_seed(args.seed)}
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    if args.negative_prompt is not None and "negative_prompt" in params:
        call["negative_prompt"] = args.negative_prompt
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            call[name] = getattr(args, name)
    tokenizer = getattr(pipe, "tokenizer_2", None)
    if "max_sequence_length" in params and tokenizer is not None:
        call["max_sequence_length"] = min(512, int(getattr(tokenizer, "model_max_length", 512)))
    if "output_type" in params:
        call["output_type"] = "np"
    return call


def generate(pipe: Any, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None]:
    """One generation: (decoded output as a float array, final latents or None)."""
    call = call_kwargs(pipe, args)
    final: dict[str, torch.Tensor] = {}
    params = set(inspect.signature(pipe.__call__).parameters)
    if "callback_on_step_end" in params:
        def keep_latents(p, step, timestep, kwargs):
            final["latents"] = kwargs["latents"]
            return {}

        call["callback_on_step_end"] = keep_latents
        call["callback_on_step_end_tensor_inputs"] = ["latents"]
    with torch.inference_mode():
        out = pipe(**call)
    images = getattr(out, "images", None)
    if images is None:
        images = getattr(out, "frames")
    array = np.asarray(images[0] if isinstance(images, list) else images, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    latents = final.get("latents")
    return array, None if latents is None else latents.float().cpu().numpy()


def save_output(array: np.ndarray, latents: np.ndarray | None, out: str, npy: bool) -> Path:
    from PIL import Image

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = array if array.ndim == 3 else array[0]  # a video: keep the first frame as the picture
    Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype(np.uint8)).save(path)
    if npy:
        np.save(path.with_suffix(".npy"), array)
        if latents is not None:
            np.save(path.with_suffix(".latents.npy"), latents)
    return path


def sync(device: torch.device, world_size: int) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if world_size > 1:
        torch.distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world_size, device = init_distributed()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        t0 = time.perf_counter()
        pipe = load_pipeline(args, device, dtype)
        if world_size > 1:
            enable_context_parallel(pipe, args, world_size, device)
        elif args.ulysses * args.ring > 1 and rank == 0:
            print("not under torchrun (WORLD_SIZE=1): running one process without parallelism", file=sys.stderr)
        sync(device, world_size)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            generate(pipe, args)
        sync(device, world_size)
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        array, latents = generate(pipe, args)
        sync(device, world_size)
        generate_s = time.perf_counter() - t0
        if rank == 0:
            path = save_output(array, latents, args.out, args.npy)
            print(json.dumps({
                "model": "dummy-flux" if args.dummy else args.model, "world_size": world_size,
                "ulysses": args.ulysses if world_size > 1 else 1, "ring": args.ring if world_size > 1 else 1,
                "device": str(device), "dtype": str(dtype).removeprefix("torch."), "steps": args.steps,
                "load_s": round(load_s, 4), "warmup_s": round(warmup_s, 4), "generate_s": round(generate_s, 4),
                "out": str(path),
            }), flush=True)
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
