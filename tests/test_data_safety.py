"""Nothing lost, nothing exposed: history and output files (issue 15, items 1 2 5 6 8 10)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from backends.types import Request
from conftest import ServedApp
from studio.story import StoryRequest, run_story


def image_request(prompt="a red circle", **kw):
    return Request("image", "dummy-sd", prompt, seed=1, params={"steps": 1}, **kw)


def on_disk(studio, stored: str) -> Path:
    """Where a stored path points, as any reader would take it: relative to the data dir."""
    path = Path(stored)
    return path if path.is_absolute() else studio.data_dir / path


def handler(blocks, api_name: str):
    """The Python function behind a named endpoint of the real UI."""
    return next(fn.fn for fn in blocks.fns.values() if fn.api_name == api_name)


def integrity(db: Path) -> tuple[str, int]:
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0], conn.execute("SELECT count(*) FROM runs").fetchone()[0]


# -- 1: only outputs are downloadable ------------------------------------------------------
def test_database_and_its_journals_are_never_served_but_outputs_are(tmp_path):
    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path / "data"), "--device", "cpu"])
    try:
        client = Client(served.url, verbose=False)
        replies = [json.loads(client.predict(json.dumps({"modality": "image", "model": "dummy-sd", "prompt": f"p{i}",
                                                         "params": {"steps": 1}}), api_name="/run"))
                   for i in range(3)]
        db = (tmp_path / "data" / "history.db").resolve()
        assert db.with_name("history.db-wal").exists()  # the live WAL is there to be asked for
        file_url = served.url + "gradio_api/file="
        for target in (db, db.with_name("history.db-wal"), db.with_name("history.db-shm"),
                       tmp_path / "data" / "outputs" / ".." / "history.db"):
            reply = httpx.get(file_url + str(target), timeout=30)
            assert reply.status_code in (403, 404), (target, reply.status_code)
            assert b"SQLite format" not in reply.content
        assert replies[0]["output_path"].startswith("outputs/")  # the stored form, as History shows it
        output = httpx.get(served.url + replies[0]["output_url"], timeout=30)
        assert output.status_code == 200 and output.content.startswith(b"\x89PNG")
        assert served.studio.history.count() == 3
    finally:
        served.close()
    assert integrity(tmp_path / "data" / "history.db") == ("ok", 3)


# -- 2: relative paths, a moved data dir, another --db ---------------------------------------
def test_moving_the_data_dir_keeps_every_output_and_history_shows_it(studio_factory, tmp_path):
    from studio.ui import build_app

    studio = studio_factory(data_dir=tmp_path / "old")
    made = [studio.generate(image_request(f"moved {i}")) for i in range(2)]
    made.append(studio.generate(Request("text", "dummy-llama", "def f", seed=0, params={"max_new_tokens": 4})))
    stored = {o.run_id: studio.history.get(o.run_id).output_path for o in made}
    assert all(not os.path.isabs(p) and p.startswith("outputs/") for p in stored.values())
    studio.close()
    shutil.move(str(tmp_path / "old"), str(tmp_path / "new"))

    moved = studio_factory(data_dir=tmp_path / "new")
    assert moved.repaired["orphans_moved_to_trash"] == 0 and not (tmp_path / "new" / "trash").exists()
    show = handler(build_app(moved), "history_show")
    for outcome in made:
        row = moved.history.get(outcome.run_id)
        assert row.output_path == stored[outcome.run_id] and on_disk(moved, row.output_path).is_file()
        image, media, text, details = show(outcome.run_id)
        assert media and Path(media).is_file() and "file missing" not in details
        assert (image == media) if outcome.request.modality == "image" else text == outcome.result.output


def test_absolute_paths_of_older_rows_are_migrated_after_a_move(studio_factory, tmp_path):
    studio = studio_factory(data_dir=tmp_path / "old")
    outcome = studio.generate(image_request())
    old_absolute = str(Path(outcome.result.output_path).resolve())
    with sqlite3.connect(tmp_path / "old" / "history.db") as conn:  # a row as older versions wrote it
        conn.execute("UPDATE runs SET output_path = ?", (old_absolute,))
    studio.close()
    shutil.move(str(tmp_path / "old"), str(tmp_path / "new"))
    moved = studio_factory(data_dir=tmp_path / "new")
    assert moved.repaired["paths_migrated"] == 1
    row = moved.history.get(outcome.run_id)
    assert not os.path.isabs(row.output_path) and on_disk(moved, row.output_path).is_file()


def test_starting_with_another_db_moves_or_deletes_no_output(studio_factory, tmp_path):
    studio = studio_factory(data_dir=tmp_path / "d")
    files = [Path(studio.generate(image_request(f"kept {i}")).result.output_path) for i in range(2)]
    studio.close()
    other = studio_factory(data_dir=tmp_path / "d", db_url=f"sqlite:///{tmp_path / 'other.db'}")
    assert other.repaired["refused"] and other.repaired["orphans_moved_to_trash"] == 0
    assert all(f.is_file() for f in files) and not (tmp_path / "d" / "trash").exists()
    other.close()
    back = studio_factory(data_dir=tmp_path / "d")  # and the right --db still finds them all
    assert back.history.count() == 2 and all(on_disk(back, r.output_path).is_file() for r in back.history.query())


def test_a_row_whose_file_is_missing_keeps_its_path_and_shows_file_missing(studio_factory, tmp_path):
    from studio.ui import build_app

    studio = studio_factory(data_dir=tmp_path / "d")
    outcome = studio.generate(image_request())
    Path(outcome.result.output_path).unlink()
    studio.close()
    again = studio_factory(data_dir=tmp_path / "d")
    assert again.repaired["rows_with_missing_files"] == 1
    assert again.history.get(outcome.run_id).output_path  # not cleared: the file may come back
    _image, media, _text, details = handler(build_app(again), "history_show")(outcome.run_id)
    assert media is None and "file missing" in details


# -- 5: stored paths are checked before read, serve, delete -----------------------------------
def test_paths_outside_the_outputs_folder_are_never_read_or_deleted(studio_factory, tmp_path):
    from studio.ui import build_app

    studio = studio_factory(data_dir=tmp_path / "a" / "b" / "data")
    outside = tmp_path / "a" / "x"
    outside.write_text("not yours")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    link = studio.outputs.root / "link.txt"
    link.symlink_to(secret)
    hostile = {"abs": "/etc/hosts", "dotdot": "../../x", "inner_dotdot": "outputs/../../../x",
               "link": "outputs/link.txt", "abs_secret": str(secret)}
    ids = {}
    for name, path in hostile.items():
        ids[name] = studio.history.record_run(Request("text", "m", name), None, output_path=path)
    show = handler(build_app(studio), "history_show")
    for name, run_id in ids.items():
        image, media, text, details = show(run_id)
        assert image is None and media is None, name
        assert "not yours" not in text and "secret" not in text and "localhost" not in text, name
    assert studio.history.delete(list(ids.values())) == len(ids)
    assert outside.read_text() == "not yours" and secret.read_text() == "secret"
    assert Path("/etc/hosts").exists()


def test_deleting_a_row_whose_path_is_a_link_keeps_the_file_it_points_to(studio_factory):
    """Review finding: a link inside outputs/ to another run's output; deleting the row
    of the link must not delete the other run's file."""
    studio = studio_factory()
    kept = studio.generate(image_request("kept"))
    target = studio.outputs.resolve(studio.history.get(kept.run_id).output_path)
    link = studio.outputs.root / "link.png"
    link.symlink_to(target)
    hostile = studio.history.record_run(Request("image", "m", "p"), None, output_path="outputs/link.png")
    studio.history.delete([hostile])
    assert target.is_file() and studio.history.get(kept.run_id) is not None


# -- 6: CSV formulas -----------------------------------------------------------------------
def test_csv_export_neutralises_formula_cells(studio_factory):
    studio = studio_factory()
    hostile = ["=HYPERLINK(\"http://evil\")", "+1+1", "-2+3", "@SUM(A1)", "\tlead tab", "\rlead cr"]
    for i, text in enumerate(hostile):
        studio.history.record_run(Request("image", text, text, negative_prompt=text), None, status="failed",
                                  error=text)
    rows = list(csv.DictReader(io.StringIO(studio.history.export_csv())))
    assert len(rows) == len(hostile)
    for row in rows:
        for column in ("prompt", "model", "negative_prompt", "error"):
            assert not row[column].startswith(("=", "+", "-", "@", "\t", "\r")), (column, row[column])
            assert row[column][1:] in hostile  # the text itself is kept after the quote
    assert rows[0]["seed"] == "0"  # numbers stay numbers


# -- 8: interrupted stories, deleting a parent --------------------------------------------
def test_stale_running_rows_become_interrupted_at_startup(studio_factory, tmp_path):
    studio = studio_factory(data_dir=tmp_path / "d")
    story_id = studio.history.record_run(Request("story", "a + b", "a story"), None, status="running")
    studio.close()
    again = studio_factory(data_dir=tmp_path / "d")
    assert again.repaired["interrupted_runs"] == 1
    assert again.history.get(story_id).status == "interrupted"


def test_deleting_a_story_deletes_its_stages_and_all_its_files(studio_factory):
    studio = studio_factory()
    story = StoryRequest("a 2-step how-to: red shapes", "dummy-llama", "dummy-sd", steps=2, seed=1,
                         image_params={"steps": 1}, max_new_tokens=4)
    keep = studio.generate(image_request("unrelated"))
    result = run_story(studio, story)
    children = studio.history.children(result.story_id)
    child_files = [on_disk(studio, c.output_path) for c in children]
    story_files = [Path(result.html_path), Path(result.markdown_path),
                   *(Path(result.markdown_path).parent / f"step-{i}.png" for i in (1, 2))]
    assert len(children) == 4 and all(p.is_file() for p in child_files + story_files)
    assert studio.history.delete([result.story_id]) == 5
    assert studio.history.children(result.story_id) == [] and studio.history.count() == 1
    assert not any(p.exists() for p in child_files + story_files)
    assert Path(keep.result.output_path).is_file()


def test_story_files_live_in_the_outputs_folder_and_survive_the_repair(studio_factory, tmp_path):
    studio = studio_factory(data_dir=tmp_path / "d")
    result = run_story(studio, StoryRequest("a 1-step how-to", "dummy-llama", "dummy-sd", steps=1,
                                            image_params={"steps": 1}, max_new_tokens=4))
    assert studio.outputs.resolve(result.html_path) is not None
    studio.close()
    again = studio_factory(data_dir=tmp_path / "d")
    assert again.repaired["orphans_moved_to_trash"] == 0
    assert Path(result.markdown_path).is_file() and (Path(result.markdown_path).parent / "step-1.png").is_file()


def test_stories_written_by_older_versions_move_into_outputs_and_stay_linked(studio_factory, tmp_path):
    studio = studio_factory(data_dir=tmp_path / "d")
    story_id = studio.history.record_run(Request("story", "a + b", "old story"), None, status="ok")
    legacy = tmp_path / "d" / "stories" / str(story_id)
    legacy.mkdir(parents=True)
    for name in ("story.html", "story.md", "step-1.png"):
        (legacy / name).write_text(name)
    with sqlite3.connect(tmp_path / "d" / "history.db") as conn:  # as older versions stored it
        conn.execute("UPDATE runs SET output_path = ? WHERE id = ?", (str(legacy / "story.html"), story_id))
    studio.close()
    again = studio_factory(data_dir=tmp_path / "d")
    assert again.repaired["story_folders_moved"] == 1 and again.repaired["paths_migrated"] == 1
    path = again.outputs.resolve(again.history.get(story_id).output_path)
    assert path is not None and path.read_text() == "story.html" and (path.parent / "step-1.png").is_file()
    assert again.repaired["orphans_moved_to_trash"] == 0
    again.history.delete([story_id])
    assert not path.parent.exists()


def test_a_second_history_on_the_same_data_dir_never_trashes_the_first_ones_files(studio_factory, tmp_path):
    """Review finding: once the other database has a run of its own, the first history's
    files are still unmatched there, but older than its newest run: not crash leftovers."""
    first = studio_factory(data_dir=tmp_path / "d")
    files = [Path(first.generate(image_request(f"kept {i}")).result.output_path) for i in range(3)]
    first.close()
    other_db = f"sqlite:///{tmp_path / 'other.db'}"
    other = studio_factory(data_dir=tmp_path / "d", db_url=other_db)
    own = Path(other.generate(image_request("the other history's run")).result.output_path)
    other.close()
    again = studio_factory(data_dir=tmp_path / "d", db_url=other_db)
    assert again.repaired["orphans_moved_to_trash"] == 0 and again.repaired["unmatched_files_left"] == 3
    assert all(f.is_file() for f in files) and own.is_file() and not (tmp_path / "d" / "trash").exists()


def test_a_database_kept_inside_outputs_is_never_moved(studio_factory, tmp_path):
    database = tmp_path / "d" / "outputs" / "history.db"
    database.parent.mkdir(parents=True)
    studio = studio_factory(data_dir=tmp_path / "d", db_url=f"sqlite:///{database}")
    studio.generate(image_request())
    studio.close()
    again = studio_factory(data_dir=tmp_path / "d", db_url=f"sqlite:///{database}")
    assert database.is_file() and again.history.count() == 1 and not (tmp_path / "d" / "trash").exists()


def test_orphans_go_to_the_trash_never_deleted(studio_factory, tmp_path):
    studio = studio_factory(data_dir=tmp_path / "d")
    kept = studio.generate(image_request())
    orphan = studio.outputs.new_path("image")
    orphan.write_bytes(b"left by a crash")
    studio.close()
    again = studio_factory(data_dir=tmp_path / "d")
    assert again.repaired["orphans_moved_to_trash"] == 1 and not orphan.exists()
    trashed = list((tmp_path / "d" / "trash").rglob(orphan.name))
    assert len(trashed) == 1 and trashed[0].read_bytes() == b"left by a crash"
    assert on_disk(again, again.history.get(kept.run_id).output_path).is_file()


# -- 10: gradio's file cache, temp folders ---------------------------------------------------
def test_a_deleted_output_is_not_served_any_more_and_exports_leave_no_temp_folders(tmp_path, monkeypatch):
    system_tmp = tmp_path / "systmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(system_tmp / "gradio"))
    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path / "data"), "--device", "cpu"])
    try:
        client = Client(served.url, verbose=False, download_files=False)
        reply = json.loads(client.predict(json.dumps({"modality": "image", "model": "dummy-sd", "prompt": "bye",
                                                      "params": {"steps": 1}}), api_name="/run"))
        image, media, _text, _details = client.predict(reply["run_id"], api_name="/history_show")
        url = media["url"]
        assert httpx.get(url, timeout=30).status_code == 200
        client.predict(reply["run_id"], "", "", "", "", "", 1, api_name="/history_delete")
        assert served.studio.history.get(reply["run_id"]) is None
        assert httpx.get(url, timeout=30).status_code in (403, 404)
        assert httpx.get(image["url"], timeout=30).status_code in (403, 404)

        def folders():
            return sorted(str(p) for p in system_tmp.rglob("*") if p.is_dir())

        client.predict("", "", "", "", "", 1, api_name="/history_export")
        client.predict(api_name="/presets_export")
        before = folders()
        for _ in range(3):
            exported = client.predict("", "", "", "", "", 1, api_name="/history_export")
            assert httpx.get(exported["url"], timeout=30).text.startswith("id,created_at")
            client.predict(api_name="/presets_export")
        assert folders() == before
        assert len(list((tmp_path / "data" / "exports").iterdir())) <= served.studio.exports.keep
    finally:
        served.close()
