"""The auto-tune's search space knows the loaded model (``Method.limits``): for every
bundled family, each value the space can propose (every choice, every range end, and the
ends of a range bounded by another parameter) attaches to the model without a refusal, and
a value outside the model's limits is refused in one line before any work."""

from __future__ import annotations

import pytest
import torch

from backends.accel.base import instantiate, methods_for
from backends.executor import method_limits
from backends.plan import attached
from backends.types import MethodChoice, Request, ValidationError
from studio.tune_spec import NONE, build_space

torch.set_num_threads(1)

# methods whose attach needs what this test does not build (a GPU, a paired draft model)
# are still in the space; ``attach`` runs for each, so a refusal there fails the test
CHEAP = {"retrieval_draft": {"corpus_tokens": 10_000}}  # the smallest datastore: the search keeps the default


class ExtremeTrial:
    """Answers optuna's suggest calls: the named slot's method, one parameter at one end
    of its range (or one of its choices), every other parameter at its default clamped
    into the range the space offers, every other slot empty."""

    def __init__(self, slot: str, method: str, param: str | None, pick):
        self.slot, self.method, self.param, self.pick = slot, method, param, pick
        self.defaults = {}

    def _mine(self, name: str) -> bool:
        return name == f"{self.method}.{self.param}"

    def suggest_categorical(self, name, choices):
        if name.startswith("slot:"):
            return self.method if name == f"slot:{self.slot}" else NONE
        if self._mine(name):
            assert self.pick in choices
            return self.pick
        default = self.defaults.get(name)
        return default if default in choices else choices[0]

    def suggest_int(self, name, low, high, step=1, log=False):
        return int(self._number(name, low, high))

    def suggest_float(self, name, low, high, step=None, log=False):
        return self._number(name, low, high)

    def _number(self, name, low, high):
        assert low <= high, f"{name}: empty range {low}..{high}"
        if self._mine(name):
            return low if self.pick == "low" else high
        return min(high, max(low, self.defaults.get(name, low)))


def proposals(space):
    """Every (method, params) the space proposes at its extremes, one parameter at a time."""
    out = []
    for slot, specs in space.groups:
        for spec in specs:
            defaults = {f"{spec.name}.{k}": v for k, v in spec.defaults().items()}
            picks = [(None, None)]
            for p in space.params[spec.name]:
                if p.kind in ("bool", "choice"):  # a switch's sides: those the model takes
                    picks += [(p.name, c) for c in space.choices(spec.name, p)]
                else:
                    picks += [(p.name, "low"), (p.name, "high")]
            for name, pick in picks:
                trial = ExtremeTrial(slot, spec.name, name, pick)
                trial.defaults = defaults
                for choice in space.suggest(trial):
                    out.append((choice.name, choice.params))
    return out


def attach_each(backend, request: Request, space) -> list[str]:
    """Attach every proposal to ``backend`` (then remove it); the refusals, one line each."""
    refused = []
    for name, params in proposals(space):
        params = {**params, **CHEAP.get(name, {})}
        choice = MethodChoice(name, params)
        try:
            [method] = instantiate([choice], request.modality, backend.family)
            method.check_limits(backend)
            with attached(backend, backend.build_plan(request), [method]):
                pass
        except ValidationError as exc:
            refused.append(f"{name}({params}): {exc}")
    return refused


def tiny_audio_unet_backend():
    """The bundled audio family's layout (a UNet sampled with DDIM), small and random."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from backends.audio import AudioBackend
    from backends.tiny import audio_data as ad
    from backends.tiny.audio_models import build_audio_tokenizer
    from backends.tiny.audio_pipeline import SynthAudioPipeline
    from backends.tiny.image_models import tiny_clip_text_model

    torch.manual_seed(0)
    tok = build_audio_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=ad.N_MELS, in_channels=2, out_channels=1, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=4,
    )
    pipe = SynthAudioPipeline(unet=unet.eval(), text_encoder=tiny_clip_text_model(len(tok), 16).eval(),
                              tokenizer=tok, scheduler=DDIMScheduler(), griffin_lim_iters=2)
    return AudioBackend("tiny-ddim-audio", pipe, torch.device("cpu"), torch.float32)


MODELS = [  # modality, model, request params (a short run)
    ("image", "dummy-sd", {"steps": 4}),
    ("image", "dummy-flux", {"steps": 4}),
    ("video", "dummy-wan", {"steps": 4}),
    ("audio", "tiny-ddim-audio", {"steps": 4, "seconds": 0.5}),
    ("text", "dummy-llama", {"max_new_tokens": 4}),
    ("audio", "dummy-musicgen", {"seconds": 0.5}),
    ("text", "dummy-dllm", {"max_new_tokens": 8}),
    ("image", "dummy-ar", {"guidance": 1.5}),
]


def load(studio_factory, modality, model):
    if model == "tiny-ddim-audio":
        return tiny_audio_unet_backend()
    return studio_factory().manager.get(modality, model)


@pytest.mark.parametrize("modality, model, params", MODELS, ids=[m[1] for m in MODELS])
def test_the_space_offers_nothing_the_model_refuses(studio_factory, modality, model, params):
    backend = load(studio_factory, modality, model)
    names = [cls.spec.name for cls in methods_for(modality, backend.family)]
    limits = method_limits(backend, names)
    space = build_space(modality, backend.family, None, params, exact=False, limits=limits)
    request = Request(modality, backend.model_id, "a red circle", seed=1, params=params)
    assert space.methods
    assert attach_each(backend, request, space) == []


def test_without_the_models_limits_the_space_offers_what_it_refuses(studio_factory):
    """The test above can fail: the Configs' own space proposes DeepCache branches past
    this UNet's depth and, on a noise-prediction model, flow-only solvers and sway sampling."""
    backend = tiny_audio_unet_backend()
    space = build_space("audio", backend.family, None, {"steps": 4}, exact=False)
    request = Request("audio", backend.model_id, "a red circle", seed=1, params={"steps": 4, "seconds": 0.5})
    refused = attach_each(backend, request, space)
    assert any(r.startswith("deepcache") and "branch" in r for r in refused)
    assert any(r.startswith("sway_sampling") for r in refused)


def test_the_models_limits_narrow_each_known_case(studio_factory):
    from backends.accel.base import get_method

    sd = studio_factory().manager.get("image", "dummy-sd")
    audio = tiny_audio_unet_backend()
    flux = studio_factory().manager.get("image", "dummy-flux")
    llama = studio_factory().manager.get("text", "dummy-llama")
    names = ["deepcache", "sampler", "sway_sampling", "weight_quant", "dynamic_quant", "retrieval_draft",
             "token_recycling"]

    def space(backend, modality, params):
        specs = [get_method(n).spec for n in names]
        allowed = [s.name for s in specs if backend.family in s.families and modality in s.modalities]
        return build_space(modality, backend.family, allowed, params, exact=False,
                           limits=method_limits(backend, allowed))

    # 3 levels: branch 0 or 1 (the Config allows up to 3)
    assert len(sd.pipe.unet.up_blocks) == 3 and space(sd, "image", {"steps": 8}).bounds[("deepcache", "branch")] == (0, 1)
    assert space(audio, "audio", {"steps": 8}).bounds[("deepcache", "branch")] == (0, 1)  # 3 levels
    audio_space = space(audio, "audio", {"steps": 8})
    assert "sway_sampling" not in audio_space.methods
    assert any("sway_sampling (sway sampling needs a flow-matching model" in n for n in audio_space.notes)
    sampler = audio_space.params["sampler"]
    assert "pndm" in audio_space.choices("sampler", next(p for p in sampler if p.name == "scheduler"))
    flux_space = space(flux, "image", {"steps": 8})
    flux_choices = flux_space.choices("sampler", next(p for p in flux_space.params["sampler"]
                                                     if p.name == "scheduler"))
    assert "pndm" not in flux_choices and "ddim" not in flux_choices and "dpmpp_2m" in flux_choices
    assert "lcm" not in flux_choices
    # dummy-flux: 2 double + 4 single blocks; skipping 3 at each end leaves one single block, 4 none
    assert flux_space.bounds[("weight_quant", "skip_blocks")] == (0, 3)
    assert flux_space.bounds[("dynamic_quant", "skip_blocks")] == (0, 3)
    # dummy-llama: 2 layers: skipping 1 at each end leaves nothing with the I/O layers kept
    llama_space = space(llama, "text", {})
    assert ("weight_quant", "skip_blocks") not in llama_space.bounds
    text_space = llama_space
    trial = ExtremeTrial("decoder", "retrieval_draft", "depth", "high")
    trial.defaults = {"retrieval_draft.tree_size": 1}
    [choice] = text_space.suggest(trial)
    assert choice.params["tree_size"] >= choice.params["depth"] == 16


def test_a_value_past_the_models_limits_is_refused_in_one_line_before_any_work(studio_factory):
    backend = studio_factory().manager.get("image", "dummy-sd")
    request = Request("image", "dummy-sd", "a red circle", seed=1, params={"steps": 2},
                      methods=[MethodChoice("deepcache", {"branch": 2})])
    with pytest.raises(ValidationError, match=r"deepcache: branch must be at most 1 for this model, got 2") as info:
        backend.run(request)
    assert "\n" not in str(info.value)
    text = studio_factory().manager.get("text", "dummy-llama")
    bad = Request("text", "dummy-llama", "def f():", seed=1, params={"max_new_tokens": 2},
                  methods=[MethodChoice("retrieval_draft", {"depth": 8, "tree_size": 4})])
    with pytest.raises(ValidationError, match=r"tree_size must be at least depth \(8\), got 4"):
        text.run(bad)


def test_a_switch_narrowed_by_the_model_changes_the_study_signature():
    """A bool switch the model narrows to one side (static_cache.compile on a model without a
    compile path) is still a searched parameter, and optuna's stored distribution for it
    differs, so a study made with both sides must not resume in the narrowed space."""
    from backends.accel.base import Limits

    def space(compile_choices):
        return build_space("image", "ar-image", ["static_cache"], {}, exact=True,
                           limits={"static_cache": Limits(choices={"compile": compile_choices})})

    narrowed, both = space((False,)), space((False, True))
    switch = next(p for p in narrowed.params["static_cache"] if p.name == "compile")
    assert narrowed.choices("static_cache", switch) == [False] and both.choices("static_cache", switch) == [False, True]
    assert narrowed.signature() != both.signature()
    assert space((False,)).signature() == narrowed.signature()
