"""``python -m benchmarks --modality M --model ID --methods a,b --repeats N --json FILE``

Runs the baseline and each method configuration in the same process through
``studio.measure``, the engine Compare uses: a warm-up run each, then interleaved per
prompt (baseline, m1, m2, baseline, m1, m2, ...), so slow drift of the machine hits all
of them alike. Every speedup is the median of paired ``baseline_seconds / method_seconds``
ratios (same prompt, same repetition) from this one run, with their range; caching
methods add their ideal speedup and the efficiency measured / ideal. Timing claims come
from these ratios, never from assertions in tests.

``--methods`` takes the Compare-tab syntax, configurations separated by commas outside
parentheses: ``deepcache(interval=3),sampler(scheduler=dpmpp_2m, steps=12)+cfg_truncation``.
``--overhead`` instead measures the studio's own overhead (manager + method framework +
history + file) against calling the same pipeline directly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch

from backends.accel.base import get_method
from backends.manager import BackendManager
from backends.types import Request
from benchmarks.prompts import default_prompts
from studio import detectors, metrics
from backends.accel._eval_cost import run_ideal
from studio.compare import CompareConfig, _split_top_level, parse_config
from studio.measure import Timed, measure, summarize


def parse_methods(text: str) -> list[CompareConfig]:
    return [parse_config(part) for part in _split_top_level(text, ",")] if text else []


def build_params(args) -> dict[str, Any]:
    params = json.loads(args.params) if args.params else {}
    if args.modality == "image":
        params.setdefault("steps", args.steps)
        params.setdefault("guidance", args.guidance)
    if args.modality == "text":
        params.setdefault("max_new_tokens", args.max_new_tokens)
    return params


def lossless_flag(config: CompareConfig) -> bool | None:
    flags = [get_method(m.name).spec.lossless for m in config.methods]
    if not flags:
        return None
    if all(f is True for f in flags):
        return True
    return False if any(f is False for f in flags) else None


def run_benchmark(manager: BackendManager, modality: str, model: str, configs: list[CompareConfig],
                  prompts: list[str], params: dict, repeats: int, seed: int, warmup: bool = True,
                  log=print, calibrations: dict[str, list[dict[str, Any]]] | None = None, perplexity: bool = True) -> list[dict[str, Any]]:
    """Every configuration on every prompt through ``studio.measure`` (the engine Compare
    uses): a warm-up run each, runs interleaved per prompt, speedup = median of the paired
    ratios with their range, and the ideal speedup and efficiency of caching methods.
    ``calibrations``: per method name, calibration records handed to that method in every
    configuration (as the studio hands over its stored ones)."""
    backend = manager.get(modality, model)
    configs = [CompareConfig("baseline", [])] + [c for c in configs if not c.is_baseline]
    calibrations = calibrations or {}
    configs = [CompareConfig(c.label, [replace(m, calibrations=list(calibrations.get(m.name, [])))
                                       for m in c.methods]) for c in configs]
    requests = [[Request(modality, model, p, seed=seed + i, params=params, methods=c.methods)
                 for i, p in enumerate(prompts)] for c in configs]

    def run(config: int, case: int) -> Timed:
        result = backend.run(requests[config][case])
        return Timed(result.total_seconds, result, run_ideal(result.method_stats, result.total_seconds),
                     result.device)

    def warm(config: int, case: int) -> None:
        backend.run(requests[config][case])

    def report(done: int, total: int, label: str) -> None:
        if done == total or done % max(1, len(configs) * len(prompts)) == 0:
            log(f"{done}/{total} runs: {label}")

    measured = measure(len(configs), len(prompts), run, repeats=repeats, warm=warm if warmup else None,
                       progress=report, labels=[c.label for c in configs])
    failed = [(configs[r.index].label, r.error) for r in measured.runs if r.error]
    if failed:
        raise RuntimeError("benchmark run failed: " + "; ".join(f"{label}: {error}" for label, error in failed))
    base_last = measured.runs[0].last
    base_out = [base_last[i].output for i in range(len(prompts))]
    base_weights = base_last[0].weight_bytes
    rows = []
    for c, runs, summary in zip(configs, measured.runs, summarize(measured)):
        results = [runs.last[i] for i in range(len(prompts))]
        per_prompt = [metrics.quality(modality, b, r.output) for b, r in zip(base_out, results)]
        quality = {k: round(statistics.mean(q[k] for q in per_prompt), 4) for k in per_prompt[0]}
        task = metrics.task_score(modality, model, [r.output for r in results], prompts)
        if task:
            quality.update({f"task_{k}": round(v, 4) for k, v in task.items()})
        speed = summary.speedup
        row = {
            "method": c.label,
            "params": [m.to_dict() for m in c.methods],
            "seconds_median": round(summary.round_seconds, 4),
            "speedup": round(speed.median, 3),
            "speedup_min": round(speed.low, 3),
            "speedup_max": round(speed.high, 3),
            "pairs": speed.pairs,
            "ideal_speedup": _rounded(summary.ideal, 3),
            "efficiency": _rounded(summary.efficiency, 3),
            "quality": quality,
            "lossless": lossless_flag(c),
            "model_evals": sum(r.model_evals for r in results),
            "weight_bytes": results[0].weight_bytes,
            "weight_ratio": round(base_weights / results[0].weight_bytes, 3) if results[0].weight_bytes else None,
            "peak_memory_bytes": max(r.peak_memory_bytes for r in results),
            "method_stats": results[0].method_stats,
            "device": results[0].device,
            # studio.detectors: skipped nothing, identical to the baseline and slower, NaN/Inf, blank
            "findings": detectors.as_dicts(detectors.compared_findings(
                modality, [r.output for r in results], results[0].method_stats, baselines=base_out,
                speedup=speed.median, lossless=lossless_flag(c), is_baseline=not c.methods)),
        }
        if modality == "text":
            row.update(text_figures(results, base_out, [base_last[i] for i in range(len(prompts))]))
        if modality == "text" and getattr(backend, "family", "") == "diffusion-lm" and perplexity:
            row["quality"].update(generated_code_perplexity(prompts, [r.output for r in results], rows))
        if modality == "audio":  # seconds of audio made per second of compute (> 1: faster than real time)
            made = sum(len(r.output[0]) / r.output[1] for r in results)
            row["real_time_factor"] = round(made / max(sum(r.total_seconds for r in results), 1e-9), 3)
        if getattr(backend, "family", "") == "codec-lm":
            row.update(codec_figures(results, [base_last[i] for i in range(len(prompts))]))
        if getattr(backend, "family", "") == "ar-image":
            row.update(ar_image_figures(results))
        rows.append(row)
    if modality == "text" and perplexity and getattr(backend, "family", "") != "diffusion-lm":
        add_perplexity(backend, configs, rows, log)
    return rows


def generated_code_perplexity(prompts: list[str], outputs: list[str], rows_so_far: list[dict[str, Any]]) -> dict:
    """Diffusion LMs: perplexity of the generated code under tiny-code-llama and its change
    from the baseline row's (the first row), the figure comparable across their methods."""
    from backends.text_eval import output_perplexity

    value = output_perplexity(prompts, outputs)
    if value is None:
        return {}
    base = rows_so_far[0]["quality"].get("perplexity", value) if rows_so_far else value
    return {"perplexity": round(value, 4), "perplexity_delta_pct": round(100 * (value / base - 1), 3)}


def add_perplexity(backend, configs: list[CompareConfig], rows: list[dict[str, Any]], log=print) -> None:
    """Text rows: held-out perplexity of the model with the row's methods attached
    (``backends.text_eval``: the code corpus's held-out split) and its change in percent
    from the baseline's, under ``quality``."""
    from backends.text_eval import backend_perplexity

    base = None
    for config, row in zip(configs, rows):
        value = backend_perplexity(backend, config.methods)
        base = value if base is None else base
        row["quality"]["perplexity"] = round(value, 4)
        row["quality"]["perplexity_delta_pct"] = round(100 * (value / base - 1), 3)
        log(f"perplexity {config.label}: {value:.4f}")


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def first_divergence(tokens: list[int], baseline: list[int]) -> int:
    """Index of the first output token that differs from the baseline's (its length if none)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, baseline)) if a != b), min(len(tokens), len(baseline)))


def text_figures(results, baseline_texts, baseline_results=()) -> dict[str, Any]:
    tokens = sum(r.extra.get("tokens_generated", 0) for r in results)
    forwards = sum(r.extra.get("target_forwards", 0) or 0 for r in results)
    decode = sum(r.timings.get("decode", 0.0) for r in results)
    return {
        "tokens": tokens,
        "tokens_per_s": round(tokens / max(sum(r.total_seconds for r in results), 1e-9), 2),
        "decode_tokens_per_s": round(tokens / max(decode, 1e-9), 2),
        "tokens_per_target_forward": round(tokens / forwards, 3) if forwards else None,
        "all_exact": all(r.output == b for r, b in zip(results, baseline_texts)),
        # per prompt: the first output token that differs from the baseline's (lossy methods)
        "first_divergence": [first_divergence(r.extra.get("output_token_ids", []), b.extra.get("output_token_ids", []))
                             for r, b in zip(results, baseline_results)],
    }


def ar_image_figures(results) -> dict[str, Any]:
    """AR image models: image tokens per transformer forward (1.0 for plain sampling), the
    work the parallel token loops save."""
    tokens = sum(r.extra.get("tokens", 0) for r in results)
    forwards = sum(r.extra.get("transformer_forwards", 0) for r in results)
    return {"tokens_per_forward": round(tokens / forwards, 3) if forwards else None}


def codec_figures(results, baseline) -> dict[str, Any]:
    """Codec LMs: positions (K codes each) per target forward (the decoder's counted
    evaluations), and whether every code matched."""
    positions = sum(r.extra.get("positions", 0) for r in results)
    forwards = sum(r.model_evals for r in results)
    return {
        "positions_per_target_forward": round(positions / forwards, 3) if forwards else None,
        "all_exact": all(r.extra.get("output_codes") == b.extra.get("output_codes") for r, b in zip(results, baseline)),
    }


@torch.no_grad()
def codec_forward_ms(backend, model, context: int = 100, new_positions: int = 1, repeats: int = 20) -> float:
    """Median cost of one codec-LM forward of ``new_positions`` positions (with CFG, as
    decoding runs it) on a ``context``-position cache, rewound after every timed forward."""
    call = backend.build_plan(Request("audio", backend.model_id, "a calm piano melody", seed=0, params={"seconds": 1.0}))
    call.max_new_tokens = context + new_positions + 8
    vocab, k = model.decoder.config.vocab_size, model.decoder.num_codebooks
    gen = torch.Generator().manual_seed(0)
    session = backend.session(model, call)
    session.forward(torch.randint(0, vocab, (k, context), generator=gen).to(backend.device))
    step = torch.randint(0, vocab, (k, new_positions), generator=gen).to(backend.device)
    times = []
    for _ in range(repeats + 5):
        start = time.perf_counter()
        session.forward(step)
        times.append(time.perf_counter() - start)
        session.rewind(context)
    return 1000 * statistics.median(times[5:])


def codec_speculation_costs(backend, rows: list[dict[str, Any]], k: int = 5) -> dict[str, Any]:
    """The codec-LM version of ``speculation_costs``: per-position forward costs of target
    and draft and the speedup each row's positions-per-forward predicts."""
    costs = {"target_1_ms": codec_forward_ms(backend, backend.model),
             f"target_{k + 1}_ms": codec_forward_ms(backend, backend.model, new_positions=k + 1)}
    if backend.draft_id:
        costs["draft_1_ms"] = codec_forward_ms(backend, backend.get_draft(backend.draft_id)[0])
    predicted = {}
    for row in rows:
        t = row.get("positions_per_target_forward")
        if t and row["method"].startswith("speculative"):
            predicted[row["method"]] = round(
                t * costs["target_1_ms"] / (costs[f"target_{k + 1}_ms"] + k * costs.get("draft_1_ms", 0.0)), 3)
    return {k_: round(v, 3) for k_, v in costs.items()} | {"predicted_speedup": predicted}


@torch.no_grad()
def forward_cost_ms(model, context: int = 200, new_tokens: int = 1, repeats: int = 30,
                    explicit_mask: bool = False) -> float:
    """Median cost of one forward of ``new_tokens`` tokens on a ``context``-token KV cache
    (one cache, cropped back after every timed forward; five warm-up forwards).
    ``explicit_mask``: pass a 4-D additive mask, as lookahead's tree-shaped forwards do
    (attention then cannot use its causal fast path)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    step = torch.randint(0, vocab, (1, new_tokens), generator=gen).to(device)
    positions = torch.arange(context, context + new_tokens, device=device).unsqueeze(0)
    kwargs = {}
    if explicit_mask:
        from backends.accel.lookahead import additive_mask

        causal = torch.ones(new_tokens, new_tokens, dtype=torch.bool).tril()
        kwargs["attention_mask"] = additive_mask(causal, context, model.dtype, device)
    cache = DynamicCache(config=model.config)
    model(prefix, past_key_values=cache, use_cache=True)
    times = []
    for _ in range(repeats + 5):
        start = time.perf_counter()
        model(step, past_key_values=cache, use_cache=True, position_ids=positions, cache_position=positions[0],
              **kwargs)
        times.append(time.perf_counter() - start)
        cache.crop(-new_tokens)  # transformers 5: a negative count removes that many positions
    return 1000 * statistics.median(times[5:])


def verification_shape(row: dict[str, Any], k: int = 5) -> tuple[int, float, bool] | None:
    """(tokens in one target forward, draft forwards per round, explicit mask) for a row:
    the method's own draft length where it has one, lookahead's measured mean width; None
    for methods this cost model does not describe (layer skip drafts with part of the
    target itself; cache methods accept one token per forward)."""
    params = {m["name"]: m["params"] for m in row.get("params", [])}
    if "lookahead" in params:
        width = row.get("method_stats", {}).get("lookahead", {}).get("mean_forward_width")
        return (round(width) if width else k + 1), 0, True
    for tree_method in ("token_recycling", "retrieval_draft"):  # draft trees: the measured mean width, masked
        if tree_method in params:
            width = row.get("method_stats", {}).get(tree_method, {}).get("mean_forward_width")
            return (round(width) if width else k + 1), 0, True
    if "dynamic_tree" in params:  # one draft forward per level, then the tree
        stats = row.get("method_stats", {}).get("dynamic_tree", {})
        width, steps = stats.get("mean_forward_width"), stats.get("tree_steps")
        drafts = stats["draft_forwards"] / steps if steps else int(params["dynamic_tree"].get("depth", 4))
        return (round(width) if width else k + 1), drafts, True
    if "speculative" in params:
        stats = row.get("method_stats", {}).get("speculative", {})
        if stats.get("draft_forwards") and stats.get("target_forwards", 0) > 1:  # measured (confidence stops)
            drafts = stats["draft_forwards"] / (stats["target_forwards"] - 1)  # the prompt's forward drafts nothing
        else:
            drafts = int(params["speculative"].get("num_assistant_tokens", 5))
        return round(drafts) + 1, drafts, False
    if "prompt_lookup" in params:
        return int(params["prompt_lookup"].get("num_tokens", 10)) + 1, 0, False
    return None


def speculation_costs(backend, rows: list[dict[str, Any]], k: int = 5) -> dict[str, Any]:
    """Forward costs of target (1 token and each method's verification width) and draft,
    and the speedup they predict from each drafting method's measured acceptance: tokens
    per target forward T gives ``T * c_target(1) / (c_target(w) + d * c_draft)``, with w
    the tokens one verification forward carries (the draft length + 1 for speculative
    decoding and prompt lookup, the measured mean for lookahead's window + branches) and
    d the draft forwards per round (0 for draft-free methods). On hardware where the
    target's forward is dearer relative to the draft (a GPU and a large model), the same
    acceptance predicts a larger speedup. (Prompt lookup is costed at its full draft
    length, an upper bound: rounds without a match are narrower.)"""
    target = backend.model
    costs = {"target_1_ms": forward_cost_ms(target)}
    draft_id = getattr(backend, "draft_id", None)
    if draft_id:
        draft, _ = backend.get_draft(draft_id)
        costs["draft_1_ms"] = forward_cost_ms(draft)
    predicted = {}
    for row in rows:
        t = row.get("tokens_per_target_forward")
        if not t or row["method"] == "baseline":
            continue
        shape = verification_shape(row, k)
        if shape is None:
            continue
        width, drafts, masked = shape
        key = f"target_{width}{'_masked' if masked else ''}_ms"
        if key not in costs:
            costs[key] = forward_cost_ms(target, new_tokens=width, explicit_mask=masked)
        verify = costs[key] + drafts * costs.get("draft_1_ms", 0.0)
        predicted[row["method"]] = round(t * costs["target_1_ms"] / verify, 3)
    return {k_: round(v, 3) for k_, v in costs.items()} | {"predicted_speedup": predicted}


def studio_overhead(manager: BackendManager, model: str, prompts: list[str], params: dict, repeats: int,
                    seed: int, log=print) -> dict[str, Any]:
    """A generation through the whole studio (validation, manager, method framework with no
    method, output file, history row) vs the same pipeline called directly, interleaved."""
    from studio.service import Studio

    backend = manager.get("image", model)
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(data_dir=tmp, manager=manager)
        direct_s, studio_s = [], []
        for rep in range(repeats + 1):  # the first round warms up both paths
            d = s = 0.0
            for i, prompt in enumerate(prompts):
                request = Request("image", model, prompt, seed=seed + i, params=params)
                call = backend.pipeline_kwargs(backend.build_plan(request))
                start = time.perf_counter()
                backend.pipe(**call)
                d += time.perf_counter() - start
                start = time.perf_counter()
                studio.generate(request)
                s += time.perf_counter() - start
            if rep:
                direct_s.append(d)
                studio_s.append(s)
                log(f"repeat {rep}/{repeats}: direct {d:.3f}s, studio {s:.3f}s")
        studio.close()
    direct, through = statistics.median(direct_s), statistics.median(studio_s)
    return {"method": "studio-overhead", "params": [], "seconds_median": round(through, 4),
            "direct_seconds_median": round(direct, 4), "speedup": round(direct / through, 4),
            "overhead_pct": round(100 * (through / direct - 1), 2), "quality": {}, "lossless": True}


def fit_teacache(manager: BackendManager, args, params: dict, log) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """TeaCache's rescale curve for ``args.model`` fitted on ``args.calibrate_teacache``
    prompts that are not the measured ones; the record for the methods and a summary."""
    from backends.accel._calibration import calibration_requests, fit_rescale_curve

    texts = default_prompts(args.modality, args.calibrate_teacache, args.prompt_kind, seed=101)
    start = time.perf_counter()
    record = fit_rescale_curve(manager.get(args.modality, args.model),
                               calibration_requests(args.modality, args.model, texts, params))
    log(f"teacache rescale curve fitted on {len(texts)} prompt(s) in {time.perf_counter() - start:.1f}s: "
        f"{[round(c, 4) for c in record['coefficients']]}")
    summary = {"method": "teacache", "prompts": texts, "coefficients": record["coefficients"],
               "settings": record["settings"], "points": len(record["points"][0]), "r2": record["r2"],
               "seconds": round(time.perf_counter() - start, 2)}
    return [record], summary


def print_table(rows: list[dict[str, Any]]) -> None:
    quality_keys = list(dict.fromkeys(k for r in rows for k in r.get("quality", {})))
    extra_keys = [k for k in ("ideal_speedup", "efficiency", "weight_ratio", "tokens_per_target_forward",
                              "positions_per_target_forward", "all_exact", "overhead_pct")
                  if any(r.get(k) is not None for r in rows)]
    header = ["method", "seconds", "speedup", "range", *quality_keys, *extra_keys]
    lines = [header]
    for r in rows:
        span = f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}" if r.get("speedup_min") is not None else "-"
        lines.append([r["method"], f"{r['seconds_median']:.3f}", f"{r['speedup']:.2f}x", span,
                      *[_fmt(r.get("quality", {}).get(k)) for k in quality_keys], *[_fmt(r.get(k)) for k in extra_keys]])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print(" | ".join(str(v).ljust(w) for v, w in zip(line, widths)))
        if i == 0:
            print("-|-".join("-" * w for w in widths))
    for r in rows:
        for finding in r.get("findings") or []:
            print(f"! {r['method']}: {finding['message']}")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def benchmark_manager(args) -> BackendManager:
    """The models of a benchmark run: ``--threads`` set, offline, the dummy models when one
    of them is asked for (shared by ``python -m benchmarks`` and ``benchmarks.tune``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manager = BackendManager(device=args.device)
    if args.model.startswith("dummy-"):
        from backends.tiny.dummy import register_dummy_models

        register_dummy_models(manager)
    return manager


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", required=True, choices=["image", "video", "audio", "text"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--methods", default="", help="configurations, comma separated (Compare syntax)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="number of default prompts")
    parser.add_argument("--prompt-kind", default="mixed", choices=["code", "edit", "mixed"], help="text prompts")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--params", help="modality params as JSON (overrides --steps etc.)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--overhead", action="store_true", help="measure the studio's own overhead instead")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--no-perplexity", action="store_true",
                        help="text: skip the held-out perplexity of each configuration")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--calibrate-teacache", type=int, default=0, metavar="N",
                        help="first fit TeaCache's rescale curve for this model on N calibration prompts (seed 101, "
                             "not the measured ones) and hand it to every teacache configuration "
                             "(rescale=calibrated or auto uses it)")
    args = parser.parse_args(argv)
    manager = benchmark_manager(args)
    params = build_params(args)
    prompts = default_prompts(args.modality, args.prompts, args.prompt_kind, args.seed)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    meta_calibration = None
    if args.overhead:
        rows = [studio_overhead(manager, args.model, prompts, params, args.repeats, args.seed, log)]
    else:
        calibrations: dict[str, list[dict[str, Any]]] = {}
        if args.calibrate_teacache:
            calibrations["teacache"], meta_calibration = fit_teacache(manager, args, params, log)
        rows = run_benchmark(manager, args.modality, args.model, parse_methods(args.methods), prompts, params,
                             args.repeats, args.seed, warmup=not args.no_warmup, log=log, calibrations=calibrations,
                             perplexity=not args.no_perplexity)
    meta_costs = None
    if args.modality == "text" and not args.overhead:
        meta_costs = speculation_costs(manager.get("text", args.model), rows)
    elif args.modality == "audio" and manager.get("audio", args.model).family == "codec-lm":
        meta_costs = codec_speculation_costs(manager.get("audio", args.model), rows)
    if meta_costs:
        log(f"forward costs and predicted speedups: {meta_costs}")
    meta = {"modality": args.modality, "model": args.model, "device": str(manager.device),
            "threads": torch.get_num_threads(), "prompts": len(prompts), "params": params, "repeats": args.repeats,
            "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)}
    if meta_costs:
        meta["forward_costs"] = meta_costs
    if meta_calibration:
        meta["calibration"] = meta_calibration
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    return 0
