"""Auto-tune (studio.tune): the floor, the search space, the search, the held-out
confirmation, resume, cancel, and the CLI's JSON."""

from __future__ import annotations

import json
import threading

import pytest
import sqlalchemy

from backends.types import MethodChoice, ValidationError
from conftest import DB_KINDS
from studio.measure import Timed
from studio.presets import Preset
from studio.tune import list_studies, run_tune, split_prompts
from studio.tune_spec import TuneSpec, build_space, parse_floor, spec_from_dict


# -- the floor ---------------------------------------------------------------------------

def test_floor_parses_the_documented_forms():
    floor = parse_floor("adherence>=-5, psnr>=28 and ssim>=0.95", "image")
    assert [str(c) for c in floor.clauses] == ["adherence>=-5", "psnr>=28", "ssim>=0.95"]
    assert floor.met({"adherence": -4.0, "psnr": 28.0, "ssim": 0.96})
    assert not floor.met({"adherence": -6.0, "psnr": 30.0, "ssim": 0.99})
    assert not floor.met({"psnr": 30.0, "ssim": 0.99})  # adherence not measured: never met
    assert parse_floor("exact", "text").exact and parse_floor("lsd<=6", "audio").met({"lsd": 5.5})
    assert not parse_floor("lsd<=6", "audio").met({"lsd": 6.5})
    assert parse_floor("token_agreement>=0.9", "text").met({"token_agreement": 0.95})


@pytest.mark.parametrize("text, modality, says", [
    ("sharpness>=3", "image", "unknown metric 'sharpness'"),
    ("lsd<=6", "image", "it is a audio metric"),
    ("psnr>=28", "text", "unknown metric 'psnr'"),
    ("perplexity<=+2%", "text", "does not report held-out perplexity"),
    ("psnr", "image", "needs a comparison and a number"),
    ("exact>=1", "image", "'exact' takes no value"),
    ("psnr>=28%", "image", "'%' only applies"),
    ("", "image", "give a quality floor"),
])
def test_floor_refusals_are_one_line(text, modality, says):
    with pytest.raises(ValidationError) as info:
        parse_floor(text, modality)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_adherence_needs_a_graded_model():
    with pytest.raises(ValidationError, match="task grader"):
        TuneSpec("image", "dummy-sd", "adherence>=-5").checked()
    TuneSpec("image", "tiny-sd-shapes", "adherence>=-5").checked()


def test_spec_from_json_is_strict():
    with pytest.raises(ValidationError, match="unknown tune key 'trails'"):
        spec_from_dict({"modality": "image", "model": "dummy-sd", "floor": "psnr>=20", "trails": 3})
    with pytest.raises(ValidationError, match="'trials' must be a whole number"):
        spec_from_dict({"modality": "image", "model": "dummy-sd", "floor": "psnr>=20", "trials": "3"})
    with pytest.raises(ValidationError, match="unknown acceleration method"):
        spec_from_dict({"modality": "image", "model": "dummy-sd", "floor": "psnr>=20", "methods": ["warp"]})
    spec = spec_from_dict({"modality": "image", "model": "dummy-sd", "floor": "psnr>=20", "prompts": ["a", "b"]})
    assert spec.prompts == ("a", "b")


@pytest.mark.parametrize("body, says", [
    ('{"modality": "image", "model": "dummy-sd", "floor": "psnr>=20", "floor": "exact"}', "appears twice"),
    ('{"modality": "image", "model": "dummy-sd", "floor": "psnr>=20", "minutes": NaN}', "not a number JSON allows"),
    ('[1, 2]', "must be a JSON object"),
    ('{"modality": "image", "model": "dummy-sd", "floor": "psnr>=20", "params": {"steps": 0}}', "steps"),
    ('{"modality": "image", "model": "dummy-sd", "floor": "psnr>=20", "trials": 0}', "trials must be"),
    ("not json", "not valid JSON"),
])
def test_tune_endpoint_body_is_checked_strictly(body, says):
    from studio.tune_spec import parse_tune_json

    with pytest.raises(ValidationError) as info:
        parse_tune_json(body)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_split_is_deterministic_and_disjoint():
    prompts = [f"p{i}" for i in range(8)]
    tune, held = split_prompts(prompts, 0.5, 3)
    assert (tune.prompts, held.prompts) == tuple(c.prompts for c in split_prompts(prompts, 0.5, 3))
    assert sorted(tune.prompts + held.prompts) == sorted(prompts) and len(tune.prompts) == 4
    assert all(seed == 3 + prompts.index(p) for p, seed in zip(held.prompts, held.seeds))


# -- the search space --------------------------------------------------------------------

class FakeTrial:
    """Answers optuna's suggest calls from a fixed table (the first choice otherwise)."""

    def __init__(self, picks):
        self.picks, self.asked, self.choices = picks, [], {}

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        self.choices[name] = list(choices)
        value = self.picks.get(name, choices[0])
        assert value in choices
        return value

    def suggest_int(self, name, low, high, step=1, log=False):
        self.asked.append(name)
        return self.picks.get(name, low)

    def suggest_float(self, name, low, high, step=None, log=False):
        self.asked.append(name)
        return self.picks.get(name, low)


def test_space_has_one_choice_per_slot_and_respects_the_allowed_list():
    space = build_space("image", "dit", None, {"steps": 20}, exact=False)
    slots = dict(space.groups)
    assert {s.name for s in slots["dit-cache"]} >= {"teacache", "first_block_cache", "faster_cache", "pab"}
    assert "compile" not in space.methods and any("compile" in n for n in space.notes)
    assert "deepcache" not in space.methods  # a UNet method: not for a DiT
    # faster_cache holds dit-cache and guidance: cfg_truncation's slot is then not offered
    trial = FakeTrial({"slot:dit-cache": "faster_cache"})
    chosen = space.suggest(trial)
    assert [m.name for m in chosen] == ["faster_cache"] and "slot:guidance" not in trial.asked
    both = space.suggest(FakeTrial({"slot:dit-cache": "teacache", "slot:guidance": "cfg_truncation"}))
    assert {m.name for m in both} == {"teacache", "cfg_truncation"}
    # sampler steps stay below the baseline's; implementation switches are fixed
    assert space.bounds[("sampler", "steps")] == (4, 20)
    assert "rescale" not in [p.name for p in space.params["teacache"]]
    assert "kernel" not in [p.name for p in space.params["int8_attention"]]  # triton/sage: not on every device
    weights = FakeTrial({"slot:weights": "weight_quant"})
    space.suggest(weights)
    assert "weight_quant.weights" in weights.asked and "fp8" not in weights.choices["weight_quant.weights"]
    narrowed = build_space("image", "unet", ["deepcache", "teacache"], {"steps": 20}, exact=False)
    assert narrowed.methods == ["deepcache"] and any("apply to this model (unet): teacache" in n for n in narrowed.notes)


def test_exact_floor_searches_lossless_methods_only():
    space = build_space("text", "causal-lm", None, {}, exact=True)
    lossless = {"layer_skip", "lookahead", "prompt_lookup", "speculative", "static_cache", "prefix_cache",
                "token_recycling", "retrieval_draft", "dynamic_tree"}
    assert space.methods and all(name in lossless for name in space.methods)
    assert len(space.groups) == 1  # all share the decoder slot: one of them or none
    assert any("snapkv" in n for n in space.notes)


def test_a_parameter_another_replaces_is_not_drawn_and_does_not_tell_runs_apart():
    """fast_dllm reads ``threshold`` only while ``factor`` is 0: with a factor drawn the
    threshold stays at its default, and two configurations that differ only in it are
    one run (measured once)."""
    from studio.tune_spec import canonical_config

    space = build_space("text", "diffusion-lm", ["fast_dllm"], {}, exact=False)
    with_factor = FakeTrial({"slot:dllm-decoding": "fast_dllm", "fast_dllm.factor": 1.5, "fast_dllm.threshold": 0.5})
    (chosen,) = space.suggest(with_factor)
    assert "fast_dllm.threshold" not in with_factor.asked and chosen.params["threshold"] == 0.9
    assert chosen.params["factor"] == 1.5
    rule = FakeTrial({"slot:dllm-decoding": "fast_dllm", "fast_dllm.factor": 0.0, "fast_dllm.threshold": 0.5})
    (chosen,) = space.suggest(rule)
    assert rule.asked.index("fast_dllm.factor") < rule.asked.index("fast_dllm.threshold")
    assert chosen.params["threshold"] == 0.5
    same = [MethodChoice("fast_dllm", {"factor": 1.5, "threshold": t}) for t in (0.5, 0.9)]
    assert canonical_config([same[0]]) == canonical_config([same[1]])
    differ = [MethodChoice("fast_dllm", {"threshold": t}) for t in (0.5, 0.9)]
    assert canonical_config([differ[0]]) != canonical_config([differ[1]])
    assert "fast_dllm.threshold" not in space.trial_params(same[:1])
    assert space.trial_params(differ[:1])["fast_dllm.threshold"] == 0.5


def test_a_conditional_parameter_is_drawn_after_its_controller_and_checked_at_import():
    from backends.accel.base import MethodConfig, MethodSpec, Param, param
    from studio.tune_spec import sampling_order

    def p(name, only_if=None):
        return Param(name, "float", 0.0, 0.0, 1.0, only_if=only_if)

    # b waits for c; a and d keep their places
    assert [x.name for x in sampling_order([p("a"), p("b", ("c", 0.0)), p("c"), p("d")])] == ["a", "c", "b", "d"]

    class Loops(MethodConfig):
        x: float = param(0.0, min=0, max=1, help="x", only_if=("x", 0.0))

    class Chain(MethodConfig):
        x: float = param(0.0, min=0, max=1, help="x", only_if=("y", 0.0))
        y: float = param(0.0, min=0, max=1, help="y", only_if=("z", 0.0))
        z: float = param(0.0, min=0, max=1, help="z")

    class Untakeable(MethodConfig):
        x: float = param(0.0, min=0, max=1, help="x", only_if=("mode", "nonee"))
        mode: str = param("a", choices=("a", "b"), help="mode")

    for config in (Loops, Chain, Untakeable):
        with pytest.raises(TypeError, match="read only"):
            MethodSpec("m", "m", ("text",), (), "m", config=config)


# -- the tuner with a fake runner: known speeds and qualities ----------------------------

PROMPTS = ("p0", "p1", "p2", "p3")
HELD = set(split_prompts(list(PROMPTS), 0.5, 0)[1].prompts)


class FakeRunner:
    """deepcache: 3x, psnr 40 on the tune prompts but 20 on the held-out ones;
    cfg_truncation: 2x, psnr 35 everywhere; both: 3.5x (deepcache's quality)."""

    device, parallel = "fake-device", 1

    def __init__(self, url, cancel_after=None, cancel=None):
        self.storage_url, self.saved, self.calls = url, [], 0
        self.cancel_after, self.cancel = cancel_after, cancel

    def family(self, modality, model):
        return "unet"

    def run(self, request, cancel):
        self.calls += 1
        if self.cancel_after and self.calls >= self.cancel_after:
            self.cancel.set()
        names = {m.name for m in request.methods}
        speed = {frozenset(): 1.0, frozenset({"deepcache"}): 3.0, frozenset({"cfg_truncation"}): 2.0,
                 frozenset({"deepcache", "cfg_truncation"}): 3.5}[frozenset(names)]
        return Timed(1.0 / speed, (tuple(sorted(names)), request.prompt), None, self.device)

    def warm(self, request, cancel):
        pass

    def quality(self, modality, reference, output):
        names, prompt = output
        if not names:
            return {"psnr": 100.0, "ssim": 1.0, "exact": 1.0}
        psnr = (20.0 if prompt in HELD else 40.0) if "deepcache" in names else 35.0
        return {"psnr": psnr, "ssim": 0.9, "exact": 0.0}

    def task(self, modality, model, outputs, prompts):
        return None

    def shipped_presets(self, modality, model):
        return [Preset("fake fast", "image", "fake", {}, [MethodChoice("deepcache", {"interval": 3, "branch": 0})])]

    def save_preset(self, preset):
        self.saved.append(preset)


def fake_spec(**changes):
    values = dict(modality="image", model="fake", floor="psnr>=30", prompts=PROMPTS, trials=6, repeats=1,
                  methods=("deepcache", "cfg_truncation"), confirm_top=8, compare_singles=True)
    return TuneSpec(**{**values, **changes})


@pytest.mark.parametrize("workers", [1, 3])  # 3: trials asked in batches, measured together
def test_winner_is_the_fastest_meeting_the_floor_on_held_out_prompts(tmp_path, workers):
    runner = FakeRunner(f"sqlite:///{tmp_path / 'opt.db'}")
    runner.parallel = workers
    result = run_tune(runner, fake_spec())
    assert result.best_tune is not None and "deepcache" in result.best_tune.config  # fastest on the tune prompts
    assert result.best_tune.speedup >= 3.0
    assert result.winner is not None and [m.name for m in result.winner.heldout.methods] == ["cfg_truncation"]
    assert result.winner.heldout.speedup.median == pytest.approx(2.0)
    assert result.winner.heldout.figures["psnr"] == 35.0 and result.winner.tune.speedup == pytest.approx(2.0)
    shipped = [c for c in result.confirmed if c.kind == "shipped"]
    assert len(shipped) == 1 and not shipped[0].feasible and result.best_shipped is None
    assert {c.kind for c in result.confirmed} == {"tuned", "shipped", "single"}
    assert len(runner.saved) == 1 and runner.saved[0].methods[0].name == "cfg_truncation"
    assert "fake-device" in runner.saved[0].description and "2.00x" in runner.saved[0].description
    data = result.to_dict()
    json.dumps(data)
    assert data["winner"]["heldout"]["speedup"] == 2.0 and data["winner"]["device"] == "fake-device"


def test_a_configuration_slower_than_the_baseline_is_no_winner(tmp_path):
    class SlowCfg(FakeRunner):
        def run(self, request, cancel):
            timed = super().run(request, cancel)
            if [m.name for m in request.methods] == ["cfg_truncation"]:
                timed.seconds = 1.0 / 0.9
            return timed

    runner = SlowCfg(f"sqlite:///{tmp_path / 'opt.db'}")
    result = run_tune(runner, fake_spec())
    assert result.winner is None and not runner.saved
    assert any("not faster than the baseline" in note for note in result.notes)
    assert not any("shipped preset" in note for note in result.notes)  # it fails the floor held-out
    from studio.ui.tune import result_markdown

    shown = result_markdown(result)  # the headline says why nothing was saved: not the floor, the speed
    assert "none was faster than the baseline there: nothing saved" in shown
    assert "No configuration met the floor" not in shown


class RefusesDeepCache(FakeRunner):
    """A UNet too shallow for any DeepCache setting: every such configuration is refused
    at attach (a ValidationError), before any timed run."""

    def refuse(self, request):
        if any(m.name == "deepcache" for m in request.methods):
            raise ValidationError("DeepCache branch must be below 2 for this UNet")

    def run(self, request, cancel):
        self.refuse(request)
        return super().run(request, cancel)

    def warm(self, request, cancel):
        self.refuse(request)


def _states(runner, result):
    import optuna

    study = optuna.load_study(study_name=result.study, storage=runner.storage_url)
    return study.trials


def test_configurations_the_model_refuses_cost_no_budget(tmp_path):
    """The 40-trial tune of tiny-sd-shapes spent 30 trials on DeepCache branches this UNet
    refuses: such trials are recorded (failed, marked unfit) but do not use the budget."""
    runner = RefusesDeepCache(f"sqlite:///{tmp_path / 'opt.db'}")
    result = run_tune(runner, fake_spec(trials=4, confirm_top=2))
    trials = _states(runner, result)
    unfit = [t for t in trials if t.user_attrs.get("unfit")]
    budgeted = [t for t in trials if not t.user_attrs.get("unfit")]
    assert unfit and all(t.state.name == "FAIL" for t in unfit)
    assert len(budgeted) == 4  # the budget bought four trials the model could run
    assert result.winner is not None and [m.name for m in result.winner.heldout.methods] == ["cfg_truncation"]


def test_refused_configurations_are_bounded(tmp_path):
    class RefusesAll(RefusesDeepCache):
        def refuse(self, request):
            if request.methods:
                raise ValidationError("nothing fits this model")

    runner = RefusesAll(f"sqlite:///{tmp_path / 'opt.db'}")
    result = run_tune(runner, fake_spec(trials=2, confirm_top=1))
    trials = _states(runner, result)
    assert len(trials) <= 2 * (1 + 3)  # the budget, plus at most three refused per budgeted trial
    assert result.winner is None
    from studio.ui.tune import result_markdown

    assert "No configuration met the floor on the held-out prompts: nothing saved" in result_markdown(result)


def test_a_faster_shipped_preset_is_pointed_out(tmp_path):
    class FastPreset(FakeRunner):
        def run(self, request, cancel):
            if [m.name for m in request.methods] == ["sampler"]:  # the preset, outside the allowed methods
                return Timed(1.0 / 2.5, (("cfg_truncation",), request.prompt), None, self.device)
            return super().run(request, cancel)

        def shipped_presets(self, modality, model):
            return [Preset("fake sampler", "image", "fake", {}, [MethodChoice("sampler", {"steps": 10})])]

    result = run_tune(FastPreset(f"sqlite:///{tmp_path / 'opt.db'}"), fake_spec(compare_singles=False))
    assert [m.name for m in result.winner.heldout.methods] == ["cfg_truncation"]
    assert result.best_shipped.label == "fake sampler"
    assert any("'fake sampler' was faster at this floor" in note for note in result.notes)
    from benchmarks.tune import beats_shipped

    assert not beats_shipped(result)  # --shipped-tier keeps the faster shipped preset


def test_a_winner_at_least_as_fast_as_the_shipped_presets_may_replace_them(tmp_path):
    from benchmarks.tune import beats_shipped

    result = run_tune(FakeRunner(f"sqlite:///{tmp_path / 'opt.db'}"), fake_spec())
    assert result.best_shipped is None and beats_shipped(result)  # the shipped one fails the floor held-out


def test_a_baseline_that_changes_between_runs_is_reported(tmp_path):
    class Drifting(FakeRunner):
        def run(self, request, cancel):
            timed = super().run(request, cancel)
            if not request.methods:  # the baseline's output differs on every run
                timed.result = ((), f"{request.prompt} #{self.calls}")
            return timed

        def quality(self, modality, reference, output):
            if not output[0]:
                return {"psnr": 100.0 if reference == output else 50.0, "ssim": 1.0, "exact": float(reference == output)}
            return super().quality(modality, reference, output)

    result = run_tune(Drifting(f"sqlite:///{tmp_path / 'opt.db'}"), fake_spec(trials=2))
    assert any("differed between runs" in note for note in result.notes)
    assert list_studies(f"sqlite:///{tmp_path / 'none.db'}") == []  # no tune yet: no optuna tables made
    assert not {"studies", "trials"} & set(sqlalchemy.inspect(
        sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'none.db'}")).get_table_names())


def test_cancel_stops_the_search_and_keeps_what_was_made(tmp_path):
    cancel = threading.Event()
    runner = FakeRunner(f"sqlite:///{tmp_path / 'opt.db'}", cancel_after=5, cancel=cancel)
    result = run_tune(runner, fake_spec(trials=20), cancel=cancel)
    assert result.cancelled and result.winner is None and not runner.saved
    assert len(result.trials) < 20 and runner.calls < 10
    again = FakeRunner(runner.storage_url)
    resumed = run_tune(again, fake_spec(trials=3))  # the same study resumes
    assert resumed.study == result.study and len(resumed.trials) >= len(result.trials)


def test_a_study_of_other_settings_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'opt.db'}"
    run_tune(FakeRunner(url), fake_spec(trials=1, study="mine"))
    with pytest.raises(ValidationError, match="other settings"):
        run_tune(FakeRunner(url), fake_spec(trials=1, study="mine", floor="psnr>=10"))


# -- on a real (tiny) model, through the Studio, on SQLite and PostgreSQL ----------------

@pytest.fixture(params=DB_KINDS)
def db_kind(request):
    return request.param


def tiny_spec(**changes):
    values = dict(modality="image", model="dummy-sd", floor="ssim>=0.5", prompts=("a red circle", "a blue square",
                  "a green triangle", "a red square"), params={"steps": 8, "guidance": 5.0}, trials=2, repeats=1,
                  methods=("deepcache", "cfg_truncation"), confirm_top=2)
    return TuneSpec(**{**values, **changes})


def test_tiny_tune_confirms_saves_and_resumes(studio_factory, db_kind):
    # A winner must be faster than the baseline on the held-out prompts: at 8 steps DeepCache
    # and CFG truncation skip ~half of dummy-sd's UNet work, far outside a paired ratio's
    # noise even on a loaded machine (the winner logic itself is tested with fixed timings
    # above, FakeRunner).
    studio = studio_factory()
    first = run_tune(studio, tiny_spec())
    assert first.new_trials == 2 and len(first.trials) >= 1 and first.pareto
    assert first.winner is not None and first.winner.heldout.speedup is not None
    assert first.winner.heldout.figures["ssim"] >= 0.5 and len(first.heldout_prompts) == 2
    preset = studio.presets.get(first.preset)
    assert preset.methods == first.winner.heldout.methods and preset.params == {"steps": 8, "guidance": 5.0}
    assert "cpu" in preset.description and "held-out speedup" in preset.description
    groups = {row.compare_group for row in studio.history.query(limit=500)}
    assert any(g and g.endswith("-heldout") for g in groups) and any(g and g.endswith("-t0") for g in groups)
    rows_before = studio.history.count()
    # a second run of the same study continues from its stored trials: one more, none redone
    second = run_tune(studio, tiny_spec(trials=3))
    assert second.study == first.study and second.new_trials == 1
    assert len(second.trials) + sum(1 for t in second.trials if t.state != "COMPLETE") >= len(first.trials)
    listed = {s["study"]: s for s in list_studies(studio.history.engine.url.render_as_string(hide_password=False))}
    assert listed[first.study]["trials"] == 3 and listed[first.study]["model"] == "dummy-sd"
    assert listed[first.study]["best_heldout_speedup"] is not None
    assert studio.history.count() > rows_before


# -- the CLI -----------------------------------------------------------------------------

def test_cli_writes_parseable_json(tmp_path, capsys):
    from benchmarks.tune import main

    out = tmp_path / "tune.json"
    assert main(["--modality", "image", "--model", "dummy-sd", "--floor", "ssim>=0.5", "--trials", "2",
                 "--prompts", "4", "--steps", "4", "--repeats", "1", "--methods", "deepcache,cfg_truncation",
                 "--data-dir", str(tmp_path / "data"), "--json", str(out), "--shipped-tier", "fast",
                 "--shipped-dir", str(tmp_path)]) == 0
    data = json.loads(out.read_text())
    winner = data["winner"]
    assert winner["config"] and winner["methods"] and winner["device"] == "cpu"
    assert winner["heldout"]["speedup"] > 0 and winner["tune"]["speedup"] > 0
    assert winner["heldout"]["speedup_min"] <= winner["heldout"]["speedup"] <= winner["heldout"]["speedup_max"]
    assert "ssim" in winner["heldout"]["quality"]
    assert {r["kind"] for r in data["confirmed"]} >= {"tuned", "single"}
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "winner" in printed
    shipped = json.loads((tmp_path / "dummy-sd-fast.json").read_text())  # the shipped preset re-chosen held-out
    assert shipped["methods"] == winner["methods"] and "held-out speedup" in shipped["description"]


def test_tune_endpoint_runs_and_refuses_in_one_line(studio_factory):
    """``/tune`` served by the Tune tab (alone in a Blocks, so the test stays short)."""
    import gradio as gr
    from gradio_client import Client

    from conftest import free_port
    from studio.ui.tune import build_tune_tab

    studio = studio_factory()
    with gr.Blocks() as demo:
        build_tune_tab(studio)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        body = {"modality": "image", "model": "dummy-sd", "floor": "ssim>=0.5", "trials": 1, "repeats": 1,
                "prompts": ["a red circle", "a blue square"], "params": {"steps": 4}, "methods": ["deepcache"]}
        reply = json.loads(client.predict(json.dumps(body), api_name="/tune"))
        assert reply["winner"], reply["notes"]
        assert reply["winner"]["config"] == "deepcache" and reply["preset"] == "dummy-sd tuned [ssim>=0.5]"
        with pytest.raises(Exception) as info:
            client.predict(json.dumps({**body, "floor": "sharpness>=3"}), api_name="/tune")
        message = str(info.value)
        assert "unknown metric 'sharpness'" in message and "Traceback" not in message
    finally:
        demo.close()


def test_cli_takes_the_users_prompts():
    import argparse

    from benchmarks.tune import spec_from_args

    args = argparse.Namespace(modality="image", model="dummy-sd", floor="psnr>=20", prompt=["a", "b"], prompts=8,
                              prompt_kind="mixed", params=None, steps=4, guidance=None, max_new_tokens=None, seed=7,
                              trials=3, minutes=None, methods="deepcache", split=0.5, repeats=1, top=3,
                              no_singles=True, study=None, no_save=False)
    spec = spec_from_args(args)
    assert spec.prompt_list() == ["a", "b"] and spec.params == {"steps": 4} and spec.methods == ("deepcache",)
    assert [c.seeds for c in split_prompts(spec.prompt_list(), spec.split, spec.seed)] in ([[7], [8]], [[8], [7]])


def test_a_tuned_candidate_equal_to_a_preset_or_single_method_is_measured_once(tmp_path):
    """The tiny-sd-shapes tune measured ``cfg_truncation + deepcache`` (tuned) and the shipped
    ``deepcache + cfg_truncation`` twice in one held-out run (2.32x and 2.41x): the same
    configuration in another order, or with its defaults spelled out, is measured once."""
    from studio.tune_spec import canonical_config

    class Counting(FakeRunner):
        def __init__(self, url):
            super().__init__(url)
            self.heldout_runs: dict[str, int] = {}

        def run(self, request, cancel):
            if request.compare_group.endswith("heldout") and request.methods:
                key = canonical_config(request.methods)
                self.heldout_runs[key] = self.heldout_runs.get(key, 0) + 1
            return super().run(request, cancel)

        def shipped_presets(self, modality, model):
            return [Preset("fake both", "image", "fake", {}, [MethodChoice("deepcache", {"interval": 3}),
                                                              MethodChoice("cfg_truncation", {})]),
                    Preset("fake cfg", "image", "fake", {}, [MethodChoice("cfg_truncation", {"fraction": 0.5})])]

    runner = Counting(f"sqlite:///{tmp_path / 'opt.db'}")
    result = run_tune(runner, fake_spec(floor="psnr>=10"))
    both = canonical_config([MethodChoice("cfg_truncation", {}), MethodChoice("deepcache", {})])
    assert both in {canonical_config(c.heldout.methods) for c in result.confirmed if c.kind == "tuned"}
    assert runner.heldout_runs and set(runner.heldout_runs.values()) == {len(HELD)}  # one measurement each
    by_label = {c.label: c for c in result.confirmed}
    tuned_both = next(c for c in result.confirmed if c.kind == "tuned" and canonical_config(c.heldout.methods) == both)
    assert by_label["fake both"].heldout is tuned_both.heldout  # one figure for both rows
    assert by_label["fake cfg"].heldout is next(c for c in result.confirmed if c.kind == "single"
                                                and c.label == "cfg_truncation").heldout
    assert any("is the configuration of fake both" in note for note in result.notes)


def test_a_study_of_another_search_space_is_not_resumed(tmp_path):
    """optuna cannot resume a study whose parameters had other choices: the default name
    holds the space (a new study), a named one is refused in one line."""
    from backends.accel.base import Limits

    class Shallow(FakeRunner):
        def limits(self, modality, model, names):
            return {"deepcache": Limits(ranges={"branch": (None, 1)}), "cfg_truncation": Limits()}

    url = f"sqlite:///{tmp_path / 'opt.db'}"
    first = run_tune(FakeRunner(url), fake_spec(trials=1, confirm_top=1))
    again = run_tune(Shallow(url), fake_spec(trials=1, confirm_top=1))
    assert again.study != first.study and again.study.startswith(first.study.rsplit(" ", 1)[0])
    run_tune(FakeRunner(url), fake_spec(trials=1, confirm_top=1, study="mine"))
    with pytest.raises(ValidationError, match="made with another search space") as info:
        run_tune(Shallow(url), fake_spec(trials=1, confirm_top=1, study="mine"))
    assert "\n" not in str(info.value)


def test_the_empty_configuration_is_pruned_unmeasured():
    """The audio re-run measured "baseline" (every slot none) as a trial: it is pruned instead."""
    import optuna

    from studio.tune import _ask_batch

    space = build_space("image", "unet", ["deepcache"], {"steps": 20}, exact=False)
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.enqueue_trial({"slot:deepcache": "none"})
    batch, settled = _ask_batch(study, space, {}, 1)
    assert batch == [] and settled == 1
    [trial] = study.get_trials()
    assert trial.state.name == "PRUNED" and "baseline" in trial.user_attrs["error"]
