"""Context parallelism (``backends.parallel`` under torchrun) matches one process.

Two CPU ranks over gloo run the tiny dummy Flux pipeline with the transformer's sequence
split by diffusers (Ulysses: all-to-all over heads; ring: K/V passed around with LSE
merging). The final latents and the decoded image must equal those of the same pipeline
and seed run in this process without parallelism. This is a correctness check of the
wiring only; the feature and any speed-up are for GPUs. CPU needs the test aid
``tests/_cp_cpu_shim.py``, activated in the subprocess only via a temporary sitecustomize.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _cp_cpu_shim

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS = 3
TIMEOUT_S = 120  # a hang guard; a run takes ~20-60 s on 2 busy cores

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed"),
    pytest.mark.skipif(torch.distributed.is_available() and not torch.distributed.is_gloo_available(),
                       reason="torch.distributed has no gloo backend"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_REFERENCE: list[tuple[np.ndarray, np.ndarray]] = []


def reference() -> tuple[np.ndarray, np.ndarray]:
    """Final latents and decoded image of one process, no parallelism, same code path."""
    if _REFERENCE:
        return _REFERENCE[0]
    from backends.parallel import generate, load_pipeline, parse_args

    args = parse_args(["--dummy", "--steps", str(STEPS)])
    pipe = load_pipeline(args, torch.device("cpu"), torch.float32)
    image, latents = generate(pipe, args)
    assert latents is not None
    _REFERENCE.append((image, latents))
    return image, latents


def run_torchrun(tmp_path: Path, mode: str) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Launch torchrun, compute the one-process reference while it runs, return both."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_cp_cpu_shim.sitecustomize_source(str(TESTS)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(site), str(REPO), env.get("PYTHONPATH", "")) if p),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TORCHELASTIC_ERROR_FILE="")
    out = tmp_path / "cp.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "backends.parallel", "--dummy", "--steps", str(STEPS),
           f"--{mode}", "2", "--out", str(out), "--npy"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        ref = reference()  # overlaps with the ranks' start-up (imports dominate the wall time)
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{log[-4000:]}")
    finally:
        if proc.poll() is None:  # the reference failed: do not leave the ranks running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, log[-4000:]
    assert '"world_size": 2' in log, log[-4000:]
    assert out.exists()
    return np.load(out.with_suffix(".npy")), np.load(out.with_suffix(".latents.npy")), ref


RING = pytest.param("ring", marks=pytest.mark.skipif(
    not os.environ.get("FASTGEN_TEST_CP_RING"),
    reason="ring: a second torchrun launch would break the 90 s budget on 2 CPUs; set FASTGEN_TEST_CP_RING=1"))


@pytest.mark.parametrize("mode", ["ulysses", RING])
def test_two_cpu_ranks_match_one_process(tmp_path, mode):
    image, latents, (ref_image, ref_latents) = run_torchrun(tmp_path, mode)
    assert latents.shape == ref_latents.shape and image.shape == ref_image.shape
    diff = max(float(np.abs(latents - ref_latents).max()), float(np.abs(image - ref_image).max()))
    print(f"{mode}: max abs difference vs one process = {diff:.3g}")
    assert diff < 1e-5
    assert float(np.abs(latents).max()) > 0.1  # not a trivially zero output


def test_refuses_cpu_without_shim():
    """Without the test aid, the entry point says why CPU cannot run it instead of crashing."""
    if torch.accelerator.device_count() > 0:
        pytest.skip("an accelerator is present")
    from types import SimpleNamespace

    from backends.parallel import enable_context_parallel

    pipe = SimpleNamespace(transformer=SimpleNamespace(enable_parallelism=None, _cp_plan={}))
    args = SimpleNamespace(attention_backend=None, ring=1, ulysses=2, anything=False)
    with pytest.raises(SystemExit, match="test aid"):
        enable_context_parallel(pipe, args, 2, torch.device("cpu"))
