"""Interleaved text-and-image stories: a language model plans, the image backend draws.

Seed papers on interleaved generation (ISG, CoMM, Mini-DALLE3) find that a language
model planning the text and prompting an image model beats unified models on coherence.
Here the planner is:

* an instruction-tuned LLM (its tokenizer has a chat template) asked for ``Step k: ...
  | Image: ...`` lines, parsed leniently; or
* template-driven for the bundled models, whose vocabularies are tiny: the steps and
  image prompts come from a template over the shapes vocabulary, and the code LM writes
  each step's text as a Python snippet (an illustrated coding how-to).

Consistency across images: one seed for every image and a shared style suffix (the
background), so entities and style stay put. Every stage is a normal studio run with
its own accelerations; the story is a parent row in history with the runs as children.
"""

from __future__ import annotations

import base64
import html
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from backends.types import MethodChoice, Request, StudioError, ValidationError

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
STEP_LINE = re.compile(r"^\s*(?:step\s*)?(\d+)[:.)-]\s*(.+?)\s*\|\s*image\s*:\s*(.+)$", re.IGNORECASE)


@dataclass
class StoryRequest:
    request: str
    text_model: str
    image_model: str
    steps: int = 4
    seed: int = 0
    text_methods: list[MethodChoice] = field(default_factory=list)
    image_methods: list[MethodChoice] = field(default_factory=list)
    image_params: dict = field(default_factory=lambda: {"steps": 25, "guidance": 5.0})
    max_new_tokens: int = 48


@dataclass
class StoryStep:
    index: int
    text: str
    image_prompt: str
    text_run_id: int | None = None
    image_run_id: int | None = None
    image_path: str | None = None
    text_seconds: float = 0.0
    image_seconds: float = 0.0


@dataclass
class StoryResult:
    story_id: int
    title: str
    steps: list[StoryStep]
    timings: dict[str, float]
    html_path: str
    markdown_path: str


def template_plan(request: str, steps: int, seed: int) -> list[tuple[str, str]]:
    """Steps over the bundled shapes vocabulary; words of the request steer the choice
    (a colour or shape it names is used first), the background is shared by all steps."""
    rng = random.Random(f"{request}|{seed}")
    words = request.lower()
    colours = [c for c in COLOURS if c in words] or list(COLOURS)
    shapes = [s for s in SHAPES if s in words] or list(SHAPES)
    background = "black" if "black" in words or "night" in words else "white"
    positions = list(POSITIONS)
    rng.shuffle(positions)
    plan = []
    for i in range(steps):
        shape, colour = shapes[i % len(shapes)], colours[(i + rng.randrange(len(colours))) % len(colours)]
        position = positions[i % len(positions)]
        prompt = f"a {colour} {shape} at {position} on {background}"
        plan.append((f"Step {i + 1}: draw {prompt}.", prompt))
    return plan


def parse_llm_plan(text: str, steps: int) -> list[tuple[str, str]]:
    plan = []
    for line in text.splitlines():
        match = STEP_LINE.match(line)
        if match:
            plan.append((f"Step {match.group(1)}: {match.group(2)}", match.group(3).strip()))
    return plan[:steps]


def llm_plan_prompt(request: str, steps: int) -> str:
    return (f"Plan {request!r} in exactly {steps} steps. Answer with {steps} lines and nothing else, each "
            f"formatted as: Step N: <one sentence> | Image: <a short picture description>")


def run_story(studio, story: StoryRequest, progress=None, cancel=None) -> StoryResult:
    """Plan, write and draw a story; every stage is a history run under one parent row.
    ``cancel`` (a CancelToken) stops the stage in progress at its next step; the story is
    then recorded as cancelled (or timeout) like any run."""
    if not story.request.strip():
        raise ValidationError("the story request is empty: say what the story or how-to is about")
    if not 1 <= story.steps <= 8:
        raise ValidationError("a story has between 1 and 8 steps")
    started = time.perf_counter()
    parent = Request("story", f"{story.text_model} + {story.image_model}", story.request, seed=story.seed,
                     params={"steps": story.steps, "image_params": story.image_params},
                     methods=[*story.text_methods, *story.image_methods])
    story_id = studio.history.record_run(parent, None, status="running")
    timings = {"plan": 0.0, "text": 0.0, "images": 0.0}
    try:
        t0 = time.perf_counter()
        plan = plan_steps(studio, story, story_id, cancel)
        timings["plan"] = time.perf_counter() - t0
        out_steps = []
        for i, (step_text, image_prompt) in enumerate(plan):
            if progress:
                progress(i, len(plan), f"step {i + 1}")
            step = StoryStep(i + 1, step_text, image_prompt)
            text_request = Request("text", story.text_model, step_prompt(step_text), seed=story.seed,
                                   params={"max_new_tokens": story.max_new_tokens}, methods=story.text_methods)
            text_outcome = studio.generate(text_request, parent_id=story_id, cancel=cancel)
            step.text = f"{step_text}\n\n{text_outcome.result.output.strip()}"
            step.text_run_id, step.text_seconds = text_outcome.run_id, text_outcome.result.total_seconds
            image_request = Request("image", story.image_model, image_prompt, seed=story.seed,
                                    params=story.image_params, methods=story.image_methods)
            image_outcome = studio.generate(image_request, parent_id=story_id, cancel=cancel)
            step.image_run_id, step.image_path = image_outcome.run_id, image_outcome.result.output_path
            step.image_seconds = image_outcome.result.total_seconds
            timings["text"] += step.text_seconds
            timings["images"] += step.image_seconds
            out_steps.append(step)
        timings["total"] = time.perf_counter() - started
        html_path, md_path = export_story(studio.outputs.new_story_folder(story_id), story.request, out_steps,
                                          studio.outputs)
    except StudioError as exc:  # a cancelled or timed-out stage carries its own status
        studio.history.finish_run(story_id, status=getattr(exc, "status", "failed"), error=str(exc),
                                  timings={**timings, "total": time.perf_counter() - started})
        raise
    studio.history.finish_run(story_id, status="ok", timings=timings, output_path=studio.outputs.relative(html_path),
                              metrics={"steps": [stored_step(s, studio.outputs) for s in out_steps]})
    return StoryResult(story_id, story.request, out_steps, timings, str(html_path), str(md_path))


def plan_steps(studio, story: StoryRequest, story_id: int, cancel=None) -> list[tuple[str, str]]:
    """An LLM plan when the text model can follow instructions, else the template."""
    described = studio.describe_model("text", story.text_model)
    if described.get("chat_template"):
        outcome = studio.generate(Request("text", story.text_model, llm_plan_prompt(story.request, story.steps),
                                          seed=story.seed, params={"max_new_tokens": min(2048, 64 * story.steps),
                                                                   "chat_template": True}),
                                  parent_id=story_id, cancel=cancel)
        plan = parse_llm_plan(outcome.result.output, story.steps)
        if len(plan) == story.steps:
            return plan
    return template_plan(story.request, story.steps, story.seed)


def step_prompt(step_text: str) -> str:
    """What the text model continues for one step: a commented Python function, which the
    bundled code LM writes well and an instruction LLM reads as a request."""
    name = re.sub(r"[^a-z0-9]+", "_", step_text.lower()).strip("_")[:40]
    return f"# {step_text}\ndef {name}():\n"


STORY_CLASS = "fastgen-story"
# Every rule is scoped to the story's own container: the same markup is shown inside the
# studio page (gr.HTML), where a bare ``body{...}`` rule would restyle every tab.
STORY_CSS = (f".{STORY_CLASS}{{font-family:sans-serif;max-width:720px;margin:auto}}"
             f".{STORY_CLASS} img{{image-rendering:pixelated;width:256px}}"
             f".{STORY_CLASS} pre{{background:#f6f6f6;color:#222;padding:8px;white-space:pre-wrap}}")
# Only the downloadable file, a page of its own, may style its body.
DOCUMENT_CSS = "body{margin:0;padding:16px}"


def step_image(step: StoryStep, outputs=None) -> Path | None:
    """A step's image file, read only from inside the outputs folder when one is given."""
    if not step.image_path:
        return None
    source = outputs.resolve(step.image_path) if outputs is not None else Path(step.image_path)
    return source if source is not None and source.is_file() else None


def story_fragment(title: str, steps: list[StoryStep], outputs=None) -> str:
    """The story as one self-contained ``<div>`` (images embedded, CSS scoped to the div):
    shown in the studio page as is, and the body of the downloadable story.html."""
    parts = [f"<div class='{STORY_CLASS}'><style>{STORY_CSS}</style>", f"<h1>{html.escape(title)}</h1>"]
    for step in steps:
        heading, _, body = step.text.partition("\n\n")
        source = step_image(step, outputs)
        encoded = base64.b64encode(source.read_bytes()).decode() if source is not None else ""
        parts += [f"<h2>{html.escape(heading)}</h2>", f"<pre>{html.escape(body)}</pre>",
                  f"<img alt='{html.escape(step.image_prompt)}' src='data:image/png;base64,{encoded}'>"]
    parts.append("</div>")
    return "\n".join(parts)


def stored_step(step: StoryStep, outputs) -> dict:
    """A step as the story row keeps it: its image path relative to the data dir, like
    every stored path, so the story survives a moved data dir."""
    data = dict(step.__dict__)
    if step.image_path and outputs.resolve(step.image_path) is not None:
        data["image_path"] = outputs.relative(step.image_path)
    return data


def export_story(folder: Path, title: str, steps: list[StoryStep], outputs=None) -> tuple[Path, Path]:
    """Write story.html (images embedded) and story.md (images copied beside it), in the
    story's own folder under outputs/ so that deleting the story removes them. A step
    image is read only from inside the outputs folder."""
    folder.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    for step in steps:
        heading, _, body = step.text.partition("\n\n")
        image_name = f"step-{step.index}.png"
        source = step_image(step, outputs)
        if source is not None:
            shutil.copyfile(source, folder / image_name)
        md += [f"## {heading}", "", "```python", body, "```", "", f"![{step.image_prompt}]({image_name})", ""]
    document = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{DOCUMENT_CSS}</style></head><body>\n{story_fragment(title, steps, outputs)}\n</body></html>")
    html_path, md_path = folder / "story.html", folder / "story.md"
    html_path.write_text(document, encoding="utf-8")
    md_path.write_text("\n".join(md), encoding="utf-8")
    return html_path, md_path
