"""Tiny code language models: a deep narrow Llama target and a 1-layer draft.

Both are trained on CPU from Python's own standard library source with one shared
byte-level BPE tokenizer, so the draft can serve as ``assistant_model`` for speculative
decoding of the target (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding": a cheap model proposes k tokens, the target checks them in one
forward and keeps the longest agreeing prefix, so greedy output is unchanged).

Shapes follow from CPU forward cost being mostly a fixed amount per layer (see
``CALIBRATION.md``): a 12-layer target against a 1-layer draft gives a draft/target cost
ratio near 0.1, which is what speculation needs to pay.

    python -m backends.tiny.train code-lm --which all          # tokenizer, draft, target
    python -m backends.tiny.train code-lm --which draft --minutes 8
    python -m backends.tiny.train code-lm --which draft --resume \
        --distill-from assets/tiny-code-llama --minutes 20      # draft distilled from the target
    python -m backends.tiny.train code-lm --which bench         # decoding speed report

Outputs: ``assets/tiny-code-llama/`` and ``assets/tiny-code-draft/``, each a
``LlamaForCausalLM`` folder (safetensors, tokenizer, generation_config.json,
training_report.json) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


@dataclass
class CodeLMConfig:
    """One model and its training recipe.

    n_layer: depth; on CPU a forward costs roughly a fixed amount per layer, so depth
        sets the target/draft cost ratio that speculative decoding lives on.
    hidden / intermediate: width; the target stays narrow (256) so that 12 layers train
        enough tokens in ~40 minutes on one core and fit in < 20 MB stored as float16.
    context: training window in tokens (random windows of the concatenated corpus).
    batch_size: windows per optimizer step.
    lr / min_lr_frac / warmup_steps: AdamW peak rate, cosine floor, linear warm-up.
        The cosine runs over the *time* budget, since the budget is minutes, not steps.
    minutes: wall-clock training budget (evaluation and saving come on top).
    checkpoint_minutes: how often the model is saved while training.
    bf16_autocast: mixed precision for the training forward (evaluation is float32).
    init_from_draft: start from the trained draft (``grow_from_draft``) instead of random.
    """

    name: str = "tiny-code-llama"
    n_layer: int = 12
    hidden: int = 256
    n_head: int = 4
    n_kv_head: int = 4
    intermediate: int = 512
    context: int = 256
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    minutes: float = 40.0
    checkpoint_minutes: float = 5.0
    bf16_autocast: bool = True
    init_from_draft: bool = False
    seed: int = 0


TARGET = CodeLMConfig(lr=1.5e-3, warmup_steps=50, init_from_draft=True)
DRAFT = CodeLMConfig(
    name="tiny-code-draft", n_layer=1, hidden=256, n_head=4, n_kv_head=4,
    intermediate=768, batch_size=16, lr=3e-3, warmup_steps=50, minutes=8.0,
    checkpoint_minutes=4.0,
)
VOCAB_SIZE = 4096
HELDOUT_EVERY = 20  # every 20th file (sorted order) is held out
SAMPLE_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\nclass Config:\n    def __init__(self",
    "for i in range(",
]


# ----------------------------------------------------------------------------- data

def stdlib_files() -> tuple[list[Path], list[Path]]:
    """The stdlib's *.py files (tests excluded), sorted, split by file into train/held-out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = rel.parts
        if parts[0] == "site-packages" or any(p in {"test", "tests"} for p in parts):
            continue
        if any(p.startswith("test_") or p == "idle_test" for p in parts):
            continue
        files.append(path)
    train = [p for i, p in enumerate(files) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [p for i, p in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], folder: Path):
    """Byte-level BPE (GPT-2 style: lossless on any text, whitespace runs kept)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((read_text(p) for p in files), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False, model_max_length=1024,
    )
    sample = "class A:\n    def f(self, x):\n\t\treturn x  # tab\n\n\n    x = '  é '\n"
    assert fast.decode(fast.encode(sample)) == sample, "tokenizer is not lossless"
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def encode_files(tok, files: list[Path]) -> torch.Tensor:
    """One token stream: bos, file, eos, bos, file, eos, ..."""
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch([read_text(p) for p in files]):
        ids += [tok.bos_token_id, *enc.ids, tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- model

def build_model(cfg: CodeLMConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        intermediate_size=cfg.intermediate, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def grow_from_draft(target, draft) -> None:
    """Depth growth: start the target from the trained 1-layer draft (same width).

    Embedding (tied head), final norm and layer 0 come from the draft; the draft's MLP
    channels are cut to the target's width by keeping those with the largest
    gate*up*down norm. The other layers start as identities (o_proj and down_proj zero),
    so the target starts close to the draft's function and only has to improve on it.
    Trained from scratch on this 1-core budget, the 12-layer target stayed far behind
    the draft (held-out perplexity 222 after 20 minutes against the draft's 37).
    """
    t, d = target.model, draft.model
    t.embed_tokens.weight.copy_(d.embed_tokens.weight)
    t.norm.weight.copy_(d.norm.weight)
    src, dst = d.layers[0], t.layers[0]
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if ".mlp." not in "." + k},
                        strict=False)
    keep = (src.mlp.gate_proj.weight.norm(dim=1) * src.mlp.up_proj.weight.norm(dim=1)
            * src.mlp.down_proj.weight.norm(dim=0)).topk(dst.mlp.gate_proj.out_features).indices
    dst.mlp.gate_proj.weight.copy_(src.mlp.gate_proj.weight[keep])
    dst.mlp.up_proj.weight.copy_(src.mlp.up_proj.weight[keep])
    dst.mlp.down_proj.weight.copy_(src.mlp.down_proj.weight[:, keep])
    for layer in t.layers[1:]:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def lr_at(cfg: CodeLMConfig, step: int, time_frac: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(time_frac, 1.0)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cos)


@torch.no_grad()
def heldout_perplexity(model, ids: torch.Tensor, context: int = 256,
                       max_tokens: int | None = None, batch: int = 16) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the held-out stream."""
    model.eval()
    n = (len(ids) - 1) // context
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // context))
    total, count = 0.0, 0
    for start in range(0, n, batch):
        rows = range(start, min(n, start + batch))
        x = torch.stack([ids[r * context: (r + 1) * context] for r in rows])
        y = torch.stack([ids[r * context + 1: (r + 1) * context + 1] for r in rows])
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total += loss.item()
        count += y.numel()
    return math.exp(total / count)


def save_model(model, tok, folder: Path, report: dict) -> None:
    """Weights stored as float16 (halves the size); config says float32, so
    ``from_pretrained`` upcasts them on load and CPU inference runs in float32."""
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model.half().save_pretrained(folder, safe_serialization=True)
    model.float()
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(folder)
    (folder / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


def repeated_line_fraction(text: str) -> float:
    """Share of non-blank generated lines that repeat an earlier one (a loop detector)."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if not lines:
        return 0.0
    seen, repeats = set(), 0
    for line in lines:
        repeats += line in seen
        seen.add(line)
    return round(repeats / len(lines), 3)


@torch.no_grad()
def greedy_samples(model, tok, prompts=SAMPLE_PROMPTS, new_tokens: int = 80) -> list[dict]:
    model.eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        text = tok.decode(gen[0, ids.shape[1]:])
        out.append({"prompt": prompt, "completion": text,
                    "repeated_line_fraction": repeated_line_fraction(text)})
    return out


# ----------------------------------------------------------------------------- training

def train_lm(cfg: CodeLMConfig, tok, train_ids: torch.Tensor, held_ids: torch.Tensor,
             folder: Path, resume: bool = False, draft_folder: Path | None = None,
             teacher_folder: Path | None = None, distill_weight: float = 0.9) -> dict:
    """Train for cfg.minutes; with `resume`, start from the weights saved in `folder` (a
    fresh optimizer, short warm-up and a new cosine over the new budget: a warm restart).

    With `teacher_folder` (the draft distilled from the target, DistillSpec-style: Zhou et
    al. 2024), the loss is ``distill_weight`` x KL(teacher || model) + the rest x next-token
    cross-entropy. Speculative decoding lives on the draft agreeing with the target, and
    a draft trained on the corpus alone stopped agreeing once the target got better
    (1.7 tokens per target forward at 5 drafted)."""
    model, previous = build_model(cfg, tok), {}
    if resume and (folder / "model.safetensors").exists():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        previous = json.loads((folder / "training_report.json").read_text())
        cfg = dataclasses.replace(cfg, warmup_steps=min(cfg.warmup_steps, 20))
        print(f"[{cfg.name}] resuming after {previous['tokens_seen']} tokens", flush=True)
    elif cfg.init_from_draft and draft_folder is not None:
        from transformers import AutoModelForCausalLM

        grow_from_draft(model, AutoModelForCausalLM.from_pretrained(draft_folder, dtype=torch.float32))
        print(f"[{cfg.name}] grown from {draft_folder.name}: held-out ppl (16k tokens) "
              f"{heldout_perplexity(model, held_ids, cfg.context, max_tokens=16384):.2f}", flush=True)
    teacher = None
    if teacher_folder is not None:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32).eval()
        print(f"[{cfg.name}] distilling from {teacher_folder.name} (weight {distill_weight})", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{cfg.name}] {n_params / 1e6:.2f} M params, {len(train_ids)} train tokens, "
          f"{cfg.minutes} min", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    budget = cfg.minutes * 60
    start = last_ckpt = time.perf_counter()
    step, tokens_seen, ema_loss = 0, 0, None

    earlier_phases = previous.get("phases", [
        {k: previous[k] for k in ("train_minutes", "tokens_seen", "steps")}] if previous else [])

    def report(status: str, ppl: float, sec: float) -> dict:
        return {
            "status": status, "model": cfg.name, "config": dataclasses.asdict(cfg),
            "params": n_params, "tokens_seen": tokens_seen + previous.get("tokens_seen", 0),
            "steps": step + previous.get("steps", 0),
            "train_minutes": round(sec / 60 + previous.get("train_minutes", 0), 2),
            "phases": earlier_phases + [
                {"train_minutes": round(sec / 60, 2), "tokens_seen": tokens_seen, "steps": step}],
            "train_loss_ema": round(ema_loss or 0, 4),
            "heldout_perplexity": round(ppl, 3), "heldout_tokens": len(held_ids),
            "train_corpus_tokens": len(train_ids),
            "corpus": "CPython stdlib *.py (tests excluded), every 20th file held out",
        **({"distilled_from": teacher_folder.name, "distill_weight": distill_weight} if teacher is not None else {}),
            "weights_dtype": "float16 on disk, float32 on load",
        }

    while (elapsed := time.perf_counter() - start) < budget:
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, elapsed / budget)
        starts = torch.randint(0, len(train_ids) - cfg.context - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([train_ids[s: s + cfg.context] for s in starts.tolist()])
        y = torch.stack([train_ids[s + 1: s + cfg.context + 1] for s in starts.tolist()])
        # bfloat16 autocast: ~1.45x faster on a CPU with avx512_bf16; weights stay float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        if teacher is not None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                target_logp = teacher(input_ids=x).logits.float().log_softmax(-1)
            kl = torch.nn.functional.kl_div(logits.float().log_softmax(-1).reshape(-1, logits.size(-1)),
                                            target_logp.reshape(-1, logits.size(-1)),
                                            log_target=True, reduction="batchmean")
            loss = distill_weight * kl + (1 - distill_weight) * loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"[{cfg.name}] step {step} {elapsed / 60:.1f} min loss {ema_loss:.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {tokens_seen / elapsed:.0f} tok/s",
                  flush=True)
        if time.perf_counter() - last_ckpt > cfg.checkpoint_minutes * 60:
            ppl = heldout_perplexity(model, held_ids, cfg.context, max_tokens=16384)
            save_model(model, tok, folder, report("checkpoint (ppl on 16k held-out tokens)",
                                                  ppl, time.perf_counter() - start))
            print(f"[{cfg.name}] checkpoint, held-out ppl (16k tokens) {ppl:.2f}", flush=True)
            last_ckpt = time.perf_counter()

    train_sec = time.perf_counter() - start
    model.half().float()  # evaluate exactly the weights that get stored
    ppl = heldout_perplexity(model, held_ids, cfg.context)
    final = report("done", ppl, train_sec)
    final["samples"] = greedy_samples(model, tok)
    save_model(model, tok, folder, final)
    print(f"[{cfg.name}] done: {tokens_seen} tokens, held-out ppl {ppl:.3f}", flush=True)
    for s in final["samples"]:
        print(f"--- {s['prompt']!r}\n{s['completion']}", flush=True)
    return final


# ----------------------------------------------------------------------------- benchmark

@torch.no_grad()
def forward_ms(model, cache_len: int = 200, new_tokens: int = 1, repeats: int = 50) -> float:
    """Median ms of one forward of `new_tokens` tokens on top of a `cache_len` KV cache."""
    from transformers import DynamicCache

    model.eval()
    vocab = model.config.vocab_size
    prefix = torch.randint(3, vocab, (1, cache_len), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, past_key_values=cache, use_cache=True)
    new = torch.randint(3, vocab, (1, new_tokens), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(cache_len, cache_len + new_tokens).unsqueeze(0)
    times = []
    for i in range(repeats + 5):
        t = time.perf_counter()
        model(input_ids=new, past_key_values=cache, use_cache=True, position_ids=pos,
              cache_position=pos[0])
        times.append(time.perf_counter() - t)
        cache.crop(-new_tokens)  # drop the tokens just added (v5: negative = remove)
    return 1000 * statistics.median(times[5:])


CODE_EDIT_PROMPT = '''def parse_header(line):
    """Split a header line into a name and a value."""
    name, sep, value = line.partition(":")
    if not sep:
        raise ValueError("not a header: %r" % line)
    name = name.strip().lower()
    value = value.strip()
    return name, value


# The same function, rewritten with a docstring that says what it returns:
def parse_header(line):
'''


@torch.no_grad()
def benchmark(folder: Path, draft_folder: Path, new_tokens: int = 128, repeats: int = 7) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    target = AutoModelForCausalLM.from_pretrained(folder).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_folder).eval()
    result: dict = {"threads": torch.get_num_threads(), "cache_len": 200, "forward_ms": {
        "target_1": forward_ms(target, 200, 1), "target_6": forward_ms(target, 200, 6),
        "draft_1": forward_ms(draft, 200, 1)}}
    f = result["forward_ms"]
    result["forward_ms"] = {k: round(v, 3) for k, v in f.items()}
    result["draft_target_cost_ratio"] = round(f["draft_1"] / f["target_1"], 3)

    ids = tok(CODE_EDIT_PROMPT, return_tensors="pt").input_ids
    result["prompt_tokens"] = ids.shape[1]
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    modes = {"greedy": {}}
    for k in (4, 5, 6, 8):
        modes[f"assistant_{k}"] = {"assistant_model": draft, "num_assistant_tokens": k,
                                   "num_assistant_tokens_schedule": "constant",
                                   "assistant_confidence_threshold": 0.0}
    modes["prompt_lookup_10"] = {"prompt_lookup_num_tokens": 10}
    for extra in modes.values():
        target.generate(ids, **common, **extra)  # warm-up
    # modes interleaved round by round, so a change in machine load hits all of them alike
    times = {name: [] for name in modes}
    outputs = {}
    for _ in range(repeats):
        for name, extra in modes.items():
            t = time.perf_counter()
            outputs[name] = target.generate(ids, **common, **extra)
            times[name].append(time.perf_counter() - t)
    reference = outputs["greedy"]
    rows = {}
    for name, out in outputs.items():
        n = out.shape[1] - ids.shape[1]
        rows[name] = {"tokens_per_s": round(n / statistics.median(times[name]), 1),
                      "same_as_greedy": bool(torch.equal(out, reference))}
    base = rows["greedy"]["tokens_per_s"]
    for row in rows.values():
        row["speedup"] = round(row["tokens_per_s"] / base, 3)
    result["generate_128"] = rows
    result["greedy_output"] = tok.decode(reference[0, ids.shape[1]:])
    result["note"] = ("medians of 7 interleaved runs on a shared 2-core machine; greedy_output is what "
                      "every mode generated (a repetitive output flatters drafts and prompt lookup)")
    return result


# ----------------------------------------------------------------------------- entry point

def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.tiny.train code-lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=["target", "draft", "tokenizer", "all", "bench"], default="all")
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget per model (default: target 40, draft 8)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "assets")
    p.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "code-lm",
                   help="scratch folder for the shared tokenizer (git-ignored)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true",
                   help="continue from the model already in the output folder")
    p.add_argument("--distill-from", type=Path, default=None,
                   help="a trained target folder: train (the draft) to match its next-token distribution")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))

    target_dir, draft_dir = args.out / TARGET.name, args.out / DRAFT.name
    tok_dir = args.work / "tokenizer"  # shared by both models, copied into each folder
    if args.which == "bench":
        result = benchmark(target_dir, draft_dir)
        (target_dir / "decoding_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0

    from transformers import AutoTokenizer

    train_files, held_files = stdlib_files()
    if args.which in {"tokenizer", "all"} or not (tok_dir / "tokenizer.json").exists():
        tok = train_tokenizer(train_files, tok_dir)
        print(f"tokenizer: {len(tok)} tokens, {len(train_files)} train / {len(held_files)} "
              f"held-out files -> {tok_dir}", flush=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if args.which == "tokenizer":
        return 0
    train_ids, held_ids = encode_files(tok, train_files), encode_files(tok, held_files)
    for which, cfg, folder in (("draft", DRAFT, draft_dir), ("target", TARGET, target_dir)):
        if args.which in {which, "all"}:
            if args.minutes is not None:
                cfg = dataclasses.replace(cfg, minutes=args.minutes,
                                          checkpoint_minutes=min(cfg.checkpoint_minutes,
                                                                 max(args.minutes / 2, 0.05)))
            train_lm(cfg, tok, train_ids, held_ids, folder, resume=args.resume,
                     draft_folder=draft_dir if (draft_dir / "model.safetensors").exists() else None,
                     teacher_folder=args.distill_from if which == "draft" else None)
    return 0
