"""The Image tab's Stream mode: a frame sequence in, img2img'd frames out (StreamDiffusion).

``run_stream`` checks the request and the stream options, loads the model through the
studio's manager, fits the frames to the model's size, runs ``backends.stream`` under
the model's lock, saves the output frames as a clip and writes the history row (failed
runs too), like ``Studio.generate`` does for one image. The row records the stream's
options as the method ``streamdiffusion`` and its frames-per-second in the metrics; the
input frames themselves are not kept (a rerun from History is refused with one line).

In-process only: a stream holds the model for its whole sequence, which the Ray executor's
one-request-per-call contract does not express.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

from backends.control import CancelToken, RunCancelled
from backends.stream import StreamSession, StreamStats, stream_config
from backends.types import MethodChoice, Request, Result, StudioError, ValidationError
from studio.validation import validate_request

log = logging.getLogger(__name__)

MAX_STREAM_FRAMES = 240
VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".mov", ".avi", ".mkv", ".apng")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class StreamOutcome:
    run_id: int
    frames: list[Image.Image]
    stats: StreamStats
    output_path: str
    result: Result


def read_frames(paths: list[str | Path] | None, limit: int = MAX_STREAM_FRAMES) -> list[Image.Image]:
    """The frames of uploaded files, in order: each video or animated GIF gives all its
    frames, each image one. One-line errors for anything unreadable. Decoding stops at the
    first frame past ``limit`` (a long clip is refused without decoding all of it)."""
    frames: list[Image.Image] = []
    for path in paths or []:
        name = Path(str(path)).name
        suffix = Path(name).suffix.lower()
        try:
            if suffix in VIDEO_SUFFIXES:
                import imageio.v3 as iio

                for array in iio.imiter(str(path)):  # decoded one by one: stop past the limit
                    frames.append(Image.fromarray(array).convert("RGB"))
                    if len(frames) > limit:
                        break
            elif suffix in IMAGE_SUFFIXES:
                with Image.open(path) as image:
                    frames.append(image.convert("RGB"))
            else:
                raise ValidationError(f"{name}: not a video, GIF or image ({', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)})")
        except StudioError:
            raise
        except (OSError, ValueError, UnidentifiedImageError, RuntimeError):
            raise ValidationError(f"{name} could not be read as a video or image") from None
        if len(frames) > limit:
            raise ValidationError(f"too many frames: the stream takes at most {limit}")
    return frames


def fit_frames(frames: list[Image.Image], height: int, width: int) -> list[Image.Image]:
    """Frames resized to the run's size (the stream's frames must all be that size)."""
    return [f.convert("RGB") if f.size == (width, height) else f.convert("RGB").resize((width, height), Image.BILINEAR)
            for f in frames]


def frames_to_gif_bytes(frames: list[Image.Image], fps: int = 8) -> bytes:
    """An animated GIF of ``frames`` (tests, the bundled demo sequence)."""
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return buffer.getvalue()


def stream_request(request: Request | dict) -> Request:
    """The request a stream runs: an image request without an init image (the frames are)."""
    request = validate_request(request)
    if request.modality != "image":
        raise ValidationError("the stream mode runs image models")
    if request.params.get("init_image") is not None:
        raise ValidationError("a stream takes frames, not an init image")
    if request.methods:
        raise ValidationError("the stream mode takes its own options, not acceleration methods")
    return request


def check_stream_cost(request: Request, frames: int, max_cost: float | None) -> float:
    """A stream costs one image run per frame (``studio.limits``' units); over ``--max-cost``
    it is refused with one line, as any request is."""
    from studio.limits import estimate_cost

    cost = estimate_cost(request) * frames
    if max_cost is not None and max_cost > 0 and cost > max_cost:
        raise ValidationError(f"this stream would cost about {cost:,.0f} units (width x height x steps / 1e6 per "
                              f"frame, {frames} frames), over the limit of {max_cost:,.0f} set by --max-cost: use "
                              "fewer frames or steps, or start the studio with a higher --max-cost")
    return cost


def run_stream(studio, request: Request | dict, frames: list[Image.Image], options: dict[str, Any] | None = None,
               progress: Callable[[int, int, str], None] | None = None, cancel: Any = None,
               fps: int = 8) -> StreamOutcome:
    """Run ``frames`` through the stream and keep the result in history (a failure too)."""
    request = stream_request(request)
    config = stream_config(options)
    if not frames:
        raise ValidationError("no frames: upload a video, an animated GIF or images")
    if len(frames) > MAX_STREAM_FRAMES:
        raise ValidationError(f"too many frames: the stream takes at most {MAX_STREAM_FRAMES}")
    check_stream_cost(request, len(frames), studio.max_cost)
    recorded = request.replace(methods=[MethodChoice("streamdiffusion", dataclasses.asdict(config))])
    token = CancelToken(studio.time_limit_s, parent=cancel)
    try:
        backend = studio.manager.get("image", request.model)
        session, outputs = _run(backend, request, config, frames, progress, token)
    except ValidationError:
        raise  # refused: not a run
    except RunCancelled as exc:
        studio._record_failure(recorded, str(exc), None, status=exc.status)
        raise
    except StudioError as exc:
        studio._record_failure(recorded, str(exc), None)
        raise
    except Exception as exc:
        log.exception("stream failed")
        message = "the stream failed unexpectedly; the server log has the details"
        studio._record_failure(recorded, message, None)
        raise StudioError(message) from exc
    stats = session.stats
    result = Result(output=outputs, timings={"total": stats.seconds}, total_seconds=stats.seconds,
                    model_evals=stats.model_evals, method_stats={"streamdiffusion": stats.as_dict()},
                    device=str(backend.device), extra={"fps": stats.fps})
    run_id, path = _keep(studio, recorded, result, outputs, fps)
    return StreamOutcome(run_id, outputs, stats, str(path), result)


def _keep(studio, recorded: Request, result: Result, outputs: list[Image.Image], fps: int) -> tuple[int, Path]:
    """Save the clip and write the run's row (no row, no file), as ``Studio`` keeps a run:
    a failure here is a failed row and one line naming only the exception type (a disk or
    database message can carry server paths or SQL)."""
    path = None
    try:
        path = studio.outputs.save("video", outputs, fps=fps)
        result.output_path = str(path)
        run_id = studio.history.record_run(recorded, result, status="ok", output_path=studio.outputs.relative(path),
                                           metrics={"fps": round(result.extra.get("fps", 0.0), 3),
                                                    "frames": len(outputs)})
    except Exception as exc:
        if path is not None:
            path.unlink(missing_ok=True)  # no row, no file
        log.exception("could not keep the stream's output")
        message = (f"the stream finished but its output could not be saved ({type(exc).__name__}); "
                   "check the free space of the data dir")
        studio._record_failure(recorded, message, None)
        raise StudioError(message) from exc
    return run_id, path


def _run(backend, request: Request, config, frames, progress, token: CancelToken):
    pipe = getattr(backend, "pipe", None)
    if pipe is None or getattr(pipe, "vae", None) is None:
        raise ValidationError("the stream mode needs an image diffusion model with a VAE")
    params = request.params
    default_h, default_w = backend.default_size()
    height, width = int(params.get("height") or default_h), int(params.get("width") or default_w)
    frames = fit_frames(frames, height, width)
    with backend.lock:
        token.start()
        session = StreamSession(
            pipe, request.prompt, request.negative_prompt, seed=request.seed, steps=int(params.get("steps", 25)),
            strength=float(params.get("strength") if params.get("strength") is not None else 0.5),
            guidance=float(params.get("guidance", 1.0)), height=height, width=width, config=config)

        def report(done: int, total: int) -> None:
            token.check()
            if progress is not None:
                progress(done, total, "frames")

        outputs = session.run(frames, report)
    return session, outputs


def demo_frames(size: int = 64, moving: int = 12, still: int = 4) -> list[Image.Image]:
    """The bundled frame sequence: a red circle moving right on white (the video model's
    renderer, ``backends.tiny.video_models``), then ``still`` near-copies of its last
    frame (one corner pixel differs, as sensor noise would; a GIF merges exact copies),
    which the similarity filter should skip."""
    from backends.tiny.video_models import ClipSpec, render_clip

    frames = render_clip(ClipSpec("circle", "red", "moving right", "white"), size=size, frames=moving)
    for i in range(still):
        copy = frames[moving - 1].copy()
        copy.putpixel((i, 0), (200, 200, 200))
        frames.append(copy)
    return frames


def demo_clip(studio, fps: int = 8) -> Path:
    """The bundled sequence as an animated GIF in the studio's exports folder (the Stream
    section's "use the bundled clip" button)."""
    path = studio.exports.new_file("moving-shapes.gif")
    path.write_bytes(frames_to_gif_bytes(demo_frames(), fps))
    return path


class LiveStream:
    """A webcam stream: one ``StreamSession`` fed one frame per event (the Stream
    section's webcam input). Output lags input by the stream batch's k-1 frames; until the
    first frame is out, ``push`` returns None. The model's lock is held per frame, so a
    run in another tab can go between two frames (the session keeps its own schedule).
    Live frames are not kept in history: there is no end of the run to record."""

    def __init__(self, studio, request: Request | dict, options: dict[str, Any] | None = None):
        from studio.limits import check_cost

        self.request = stream_request(request)
        self.config = stream_config(options)
        check_cost(self.request, studio.max_cost)  # each pushed frame is one image run
        self.time_limit_s = studio.time_limit_s
        self.backend = studio.manager.get("image", self.request.model)
        pipe = getattr(self.backend, "pipe", None)
        if pipe is None or getattr(pipe, "vae", None) is None:
            raise ValidationError("the stream mode needs an image diffusion model with a VAE")
        params = self.request.params
        default_h, default_w = self.backend.default_size()
        self.height, self.width = int(params.get("height") or default_h), int(params.get("width") or default_w)
        with self.backend.lock:
            self.session = StreamSession(
                pipe, self.request.prompt, self.request.negative_prompt, seed=self.request.seed,
                steps=int(params.get("steps", 25)),
                strength=float(params.get("strength") if params.get("strength") is not None else 0.5),
                guidance=float(params.get("guidance", 1.0)), height=self.height, width=self.width, config=self.config)
        self.last: Image.Image | None = None

    def matches(self, request: Request, options: dict[str, Any] | None) -> bool:
        """Whether this stream runs ``request`` with ``options`` (else the caller starts a new one)."""
        mine = (self.request.model, self.request.prompt, self.request.negative_prompt, self.request.seed,
                self.request.params, dataclasses.asdict(self.config))
        try:
            theirs = stream_request(request)
            config = stream_config(options)
        except ValidationError:
            return False
        return mine == (theirs.model, theirs.prompt, theirs.negative_prompt, theirs.seed, theirs.params,
                        dataclasses.asdict(config))

    def push(self, frame: Image.Image, cancel: Any = None) -> Image.Image | None:
        """One frame in; the studio's time limit (``--time-limit``) holds per frame, counted
        once the model's lock is held, and ``cancel`` stops it at the next model call."""
        from backends.base import _stop_hook

        frame = fit_frames([frame], self.height, self.width)[0]
        token = CancelToken(self.time_limit_s, parent=cancel)
        with self.backend.lock:
            token.start()
            token.check()
            with _stop_hook(self.backend.denoiser, token):
                out = self.session.push(frame)
        if out:
            self.last = out[-1]
        return self.last
