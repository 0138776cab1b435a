from pathlib import Path

import pytest

from backends.types import MethodChoice, ValidationError
from studio.story import StoryRequest, parse_llm_plan, run_story, template_plan


def test_template_plan_follows_the_request_and_shares_the_background():
    plan = template_plan("a 3-step how-to with blue squares at night", 3, seed=1)
    assert len(plan) == 3
    assert all("square" in prompt and prompt.endswith("on black") for _, prompt in plan)
    assert template_plan("x", 3, 1) == template_plan("x", 3, 1)


def test_llm_plan_parser_is_lenient():
    text = "Sure!\nStep 1: Mix flour | Image: a bowl of flour\n2) Bake it | image: an oven\nThanks"
    assert parse_llm_plan(text, 2) == [("Step 1: Mix flour", "a bowl of flour"), ("Step 2: Bake it", "an oven")]


def test_story_run_makes_n_texts_n_images_all_in_history(studio_factory):
    studio = studio_factory()
    story = StoryRequest("a 3-step how-to: red shapes", "dummy-llama", "dummy-sd", steps=3, seed=4,
                         image_methods=[MethodChoice("deepcache", {"interval": 2})], image_params={"steps": 3},
                         max_new_tokens=8)
    result = run_story(studio, story)
    assert len(result.steps) == 3 and all(s.text and s.image_path for s in result.steps)
    parent = studio.history.get(result.story_id)
    assert parent.status == "ok" and parent.modality == "story" and parent.total_seconds > 0
    children = studio.history.children(result.story_id)
    assert [c.modality for c in children] == ["text", "image"] * 3
    assert all(c.status == "ok" for c in children)
    assert all(c.methods == [{"name": "deepcache", "params": {"interval": 2, "branch": 0}}]
               for c in children if c.modality == "image")
    html, md = Path(result.html_path).read_text(), Path(result.markdown_path).read_text()
    assert html.count("<img") == 3 and md.count("![") == 3 and html.count("<h2>") == 3
    assert all((Path(result.markdown_path).parent / f"step-{i}.png").is_file() for i in (1, 2, 3))


def test_bad_story_requests_are_refused(studio_factory):
    studio = studio_factory()
    with pytest.raises(ValidationError):
        run_story(studio, StoryRequest("  ", "dummy-llama", "dummy-sd"))
    with pytest.raises(ValidationError):
        run_story(studio, StoryRequest("ok", "dummy-llama", "dummy-sd", steps=20))
    assert studio.history.count() == 0


def test_two_histories_on_one_data_dir_keep_their_own_story_files(studio_factory, tmp_path):
    """Review finding: story ids repeat across databases; each story writes a folder of its
    own and deleting one story never removes another history's story files."""
    from studio.story import StoryRequest, run_story

    first = studio_factory(data_dir=tmp_path / "d")
    story = StoryRequest("two steps", "dummy-llama", "dummy-sd", steps=1, image_params={"steps": 1})
    mine = run_story(first, story)
    other = studio_factory(data_dir=tmp_path / "d", db_url=f"sqlite:///{tmp_path / 'other.db'}")
    theirs = run_story(other, story)
    assert mine.story_id == theirs.story_id and mine.html_path != theirs.html_path
    other.history.delete([theirs.story_id])
    assert Path(mine.html_path).is_file() and not Path(theirs.html_path).exists()


def test_a_cancelled_story_stops_and_is_recorded_as_cancelled(studio_factory):
    """Trust issue: Cancel in every tab, the Story tab included: a token set while a stage
    runs stops that stage at its next step, and the story row says cancelled."""
    import threading

    from backends.control import CancelToken, RunCancelled

    studio = studio_factory()
    token, started, cancelled = CancelToken(), threading.Event(), threading.Event()

    def progress(done, total, stage):
        started.set()
        cancelled.wait(30)  # the story goes on only once the other thread has cancelled: no race

    def cancel_from_another_thread():
        started.wait(30)
        token.cancel("test")
        cancelled.set()

    story = StoryRequest("a 3-step how-to: circles", "dummy-llama", "dummy-sd", steps=3, image_params={"steps": 2})
    canceller = threading.Thread(target=cancel_from_another_thread)
    canceller.start()
    with pytest.raises(RunCancelled):
        run_story(studio, story, progress=progress, cancel=token)
    canceller.join()
    parent = next(r for r in studio.history.query(limit=20) if r.modality == "story")
    assert parent.status == "cancelled"
    children = studio.history.children(parent.id)
    assert [c.status for c in children] == ["cancelled"]  # the first stage stopped, nothing ran after it


def test_the_story_tab_has_a_cancel_that_stops_its_run(tmp_path):
    from gradio_client import Client

    from conftest import ServedApp

    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path), "--device", "cpu"])
    try:
        client = Client(served.url, verbose=False)
        assert "/story_cancel" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    finally:
        served.close()
