"""The bundled autoregressive image model, LlamaGen style: a VQ tokenizer + a Llama over image tokens.

``assets/tiny-ar-shapes`` holds two parts, loaded together by ``ARImagePipeline.from_pretrained``:

- ``tokenizer/``: a small VQ-VAE (``ShapesVQ``): 32x32 RGB -> an 8x8 grid of codes from a
  256-entry codebook (l2-normalised 8-d codes, as LlamaGen's tokenizer does, so every code
  is used), and back.
- ``transformer/``: a transformers ``LlamaForCausalLM`` over one vocabulary holding the
  image codes, a null token and the prompt words. A request is the 8 word tokens of the
  prompt followed by the 64 image tokens in raster order; classifier-free guidance runs the
  same model on 8 null tokens (10% of training prompts were dropped to nulls).

Why its own small class and not a diffusers pipeline: an AR image model is a token loop, and
the methods that speed it up (speculative Jacobi decoding, ZipAR, LANTERN) replace that
loop, as the text methods replace ``generate``. The loop lives in
``backends/accel/_ar_decoding.py``; this module only holds the models and the token layout.

Recipes: ``backends/tiny/ar_image_train.py`` (``python -m backends.tiny.train shapes-vq`` then
``shapes-ar``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from backends.tiny.shapes import ASSETS, VOCAB, parse_prompt, prompt_for

AR_DIR = ASSETS / "tiny-ar-shapes"
PROMPT_LEN = 8  # "a red circle at top left on white"


def prompt_words() -> list[str]:
    words = {w for ws in VOCAB.values() for phrase in ws for w in phrase.split()}
    return sorted(words | {"a", "at", "on"})


# ----------------------------------------------------------------------------- VQ tokenizer


@dataclass
class VQConfig:
    image_size: int = 32
    width: int = 32
    codebook_size: int = 256
    code_dim: int = 8
    downsample: int = 4  # 32 -> 8x8 tokens

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                   nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ShapesVQ(nn.Module):
    """A VQ-VAE with a cosine codebook (codes and encoder outputs l2-normalised)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), _Res(w),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), _Res(2 * w),
            nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1), _Res(2 * w),
            nn.GroupNorm(8, 2 * w), nn.SiLU(), nn.Conv2d(2 * w, cfg.code_dim, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.code_dim, 2 * w, 3, padding=1), _Res(2 * w),
            nn.ConvTranspose2d(2 * w, 2 * w, 4, stride=2, padding=1), _Res(2 * w),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), _Res(w),
            nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, 3, 3, padding=1),
        )
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, dim=-1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> (normalised latents (B, D, h, w), indices (B, h, w))."""
        z = F.normalize(self.encoder(x), dim=1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = (flat @ self.codes().t()).argmax(-1)
        return z, idx.view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return self.codes()[idx].permute(0, 3, 1, 2)

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        return self.decoder(self.lookup(idx))

    def save(self, out: Path) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ShapesVQ":
        from safetensors.torch import load_file

        model = cls(VQConfig(**json.loads((Path(path) / "config.json").read_text())))
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- token layout


def _plain_words(prompt: str | None) -> str:
    """A prompt as the model's words: lower case, commas and full stops as spaces."""
    return (prompt or "").lower().replace(",", " ").replace(".", " ")


@dataclass(frozen=True)
class TokenLayout:
    """Where image codes, the null token and the prompt words sit in the Llama's vocabulary."""

    codebook_size: int
    words: tuple[str, ...]
    grid: int  # tokens per side

    @property
    def null_id(self) -> int:
        return self.codebook_size

    @property
    def prompt_len(self) -> int:
        return PROMPT_LEN

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 1 + len(self.words)

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    def word_id(self, word: str) -> int:
        return self.codebook_size + 1 + self.words.index(word) if word in self.words else self.null_id

    def prompt_ids(self, prompt: str) -> list[int]:
        """The 8 prefix tokens of a prompt; a parseable prompt is first put in its canonical
        word order ("red circle top left white" -> "a red circle at top left on white")."""
        spec = parse_prompt(prompt or "")
        words = (prompt_for(spec) if spec is not None else _plain_words(prompt)).split()
        ids = [self.word_id(w) for w in words][:PROMPT_LEN]
        return ids + [self.null_id] * (PROMPT_LEN - len(ids))

    def ignored_words(self, prompt: str) -> list[str]:
        """The words of ``prompt`` the model never sees, by the same reading as ``prompt_ids``:
        outside its vocabulary or past the prefix length; for a prompt that names a shape, colour, position and background, the words
        its canonical form leaves out."""
        spec = parse_prompt(prompt or "")
        if spec is not None:
            read = set(prompt_for(spec).split())
            return list(dict.fromkeys(w for w in _plain_words(prompt).split() if w not in read))
        words = _plain_words(prompt).split()
        return list(dict.fromkeys(w for i, w in enumerate(words) if w not in self.words or i >= PROMPT_LEN))

    def null_ids(self, prompt_ids: list[int] | None = None) -> list[int]:
        """The classifier-free guidance row: 8 null tokens whatever the prompt."""
        return [self.null_id] * PROMPT_LEN

    def to_dict(self) -> dict:
        return {"codebook_size": self.codebook_size, "words": list(self.words), "grid": self.grid,
                "prompt_len": PROMPT_LEN}


def read_layout(source: str | Path) -> TokenLayout:
    """The token layout a saved pipeline folder declares (its ``layout.json``), without
    loading any weights: what the speculative method compares to find a draft that fits."""
    cfg = json.loads((Path(source) / "layout.json").read_text())
    return TokenLayout(cfg["codebook_size"], tuple(cfg["words"]), cfg["grid"])


def llama_config(layout: TokenLayout, hidden: int = 128, layers: int = 4, heads: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=layout.vocab_size, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=PROMPT_LEN + layout.image_tokens + 8,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=layout.null_id, eos_token_id=layout.null_id,
        pad_token_id=layout.null_id, attention_bias=False,
    )


# ----------------------------------------------------------------------------- the pipeline


class ARImagePipeline:
    """VQ tokenizer + Llama transformer + token layout; no loop of its own (see module doc)."""

    def __init__(self, vq: ShapesVQ, transformer, layout: TokenLayout):
        self.vq = vq
        self.transformer = transformer
        self.layout = layout

    @classmethod
    def from_pretrained(cls, source: str | Path, dtype: torch.dtype = torch.float32) -> "ARImagePipeline":
        from transformers import LlamaForCausalLM

        root = Path(source)
        layout = read_layout(root)
        vq = ShapesVQ.from_pretrained(root / "tokenizer").to(dtype)
        transformer = LlamaForCausalLM.from_pretrained(root / "transformer", dtype=dtype).eval()
        return cls(vq, transformer, layout)

    def save_pretrained(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.vq.save(out / "tokenizer")
        self.transformer.save_pretrained(out / "transformer")
        (out / "layout.json").write_text(json.dumps(self.layout.to_dict(), indent=2))

    def to(self, device: torch.device) -> "ARImagePipeline":
        self.vq.to(device)
        self.transformer.to(device)
        return self

    def token_logits(self, ids: torch.Tensor, position_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None,
                     prefix: bool = False, cache_position: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the image codes (rows, n, codebook) after ``ids``: one vocabulary, so the
        prefix and the image tokens go through the same embedding and head (``ARSession``).
        ``cache_position``: where a static cache writes (``static_cache``)."""
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        if cache_position is not None:
            kwargs["cache_position"] = cache_position
        out = self.transformer(input_ids=ids, position_ids=position_ids, cache=cache, use_cache=True, **kwargs)
        return out.logits[..., : self.layout.codebook_size]

    def static_cache_config(self):
        """The config a ``StaticCache`` for this transformer is sized from (``static_cache``)."""
        return self.transformer.config

    def codebook_vectors(self) -> torch.Tensor:
        """The VQ code vectors (codebook, dim): latent neighbours for lantern and gsd."""
        return self.vq.codes()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, size: int | None = None) -> list[Image.Image]:
        """Image tokens (B, grid*grid) -> PIL images (upscaled to ``size`` if given)."""
        g = self.layout.grid
        x = self.vq.decode_indices(tokens.view(-1, g, g).long()).float().clamp(-1, 1)
        arr = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images = [Image.fromarray(a) for a in arr]
        if size and size != images[0].size[0]:
            images = [im.resize((size, size), Image.BILINEAR) for im in images]
        return images


def tiny_random_pipeline(seed: int = 0, layers: int = 2, hidden: int = 64) -> ARImagePipeline:
    """A random-weight pipeline of the real layout (tests: no assets needed, seconds to build)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    vq = ShapesVQ(VQConfig(width=16)).eval().requires_grad_(False)
    layout = TokenLayout(vq.cfg.codebook_size, tuple(prompt_words()), vq.cfg.grid)
    transformer = LlamaForCausalLM(llama_config(layout, hidden=hidden, layers=layers, heads=4)).eval()
    return ARImagePipeline(vq, transformer, layout)
