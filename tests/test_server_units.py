"""The language server's pieces without a client: positions, settings, suggestion shapes, the model worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lsprotocol import types

from inference.quantize import QUANTIZATIONS
from kv_cache.choices import IDLE_ROWS, SPLICE_MODES
from lsp_server.completion import DRAFT_METHODS, LAYOUTS, REFRESH_POLICIES, SCOPES, Suggestion
from lsp_server.options import LOG_LEVELS, ServerOptions, parse_options, to_wire
from lsp_server.positions import (
    UTF8,
    UTF16,
    PositionError,
    choose_encoding,
    offset_at,
    position_at,
    range_to_edit,
    same_line,
    units,
)
from lsp_server.suggestions import ShownSuggestions, completion_items, hover_markdown, inline_items
from lsp_server.worker import SKIPPED, ModelWorker

PIECES = ["a", "b", " ", "é", "中", "文", "😀", "𝔘", "\n", "\r\n", "\r", "\t"]
texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


def _reference_position(text: str, offset: int, encoding: str) -> types.Position:
    """Split on the LSP line breaks and count code units with Python's codecs."""
    before = text[:offset].replace("\r\n", "\n").replace("\r", "\n")
    line = before.count("\n")
    column = before[before.rfind("\n") + 1:]
    width = len(column.encode("utf-16-le")) // 2 if encoding == UTF16 else len(column.encode("utf-8"))
    return types.Position(line, width)


def _boundaries(text: str) -> list[int]:
    """Offsets a position can address: not between the two characters of a CRLF."""
    return [i for i in range(len(text) + 1) if not (0 < i < len(text) and text[i - 1] == "\r" and text[i] == "\n")]


# -- positions ---------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(texts, st.data(), st.sampled_from([UTF16, UTF8]))
def test_position_round_trip_matches_the_codecs(text, data, encoding):
    offset = data.draw(st.sampled_from(_boundaries(text)))
    position = position_at(text, offset, encoding)
    assert position == _reference_position(text, offset, encoding)
    assert offset_at(text, position, encoding) == offset


@settings(max_examples=200, deadline=None)
@given(texts, st.data(), st.sampled_from([UTF16, UTF8]), st.text(alphabet="x😀\n中", max_size=4))
def test_range_edit_in_code_units_applies_like_the_editor(text, data, encoding, new):
    bounds = _boundaries(text)
    a, b = sorted(data.draw(st.lists(st.sampled_from(bounds), min_size=2, max_size=2)))
    rng = types.Range(position_at(text, a, encoding), position_at(text, b, encoding))
    edit = range_to_edit(text, rng, new, encoding)
    assert edit.apply(text) == text[:a] + new + text[b:]


def test_emoji_counts_two_utf16_units_and_four_utf8_bytes():
    text = "x😀y\n中z"
    assert offset_at(text, types.Position(0, 3), UTF16) == 2  # after the emoji
    assert offset_at(text, types.Position(0, 5), UTF8) == 2
    assert offset_at(text, types.Position(1, 1), UTF16) == 5  # after 中
    assert offset_at(text, types.Position(1, 3), UTF8) == 5
    assert units("😀中", UTF16) == 3 and units("😀中", UTF8) == 7


def test_column_inside_a_surrogate_pair_rounds_down_to_the_character():
    assert offset_at("a😀b", types.Position(0, 2), UTF16) == 1


def test_column_past_the_line_end_clamps_to_the_line_end():
    assert offset_at("ab\r\ncd", types.Position(0, 99), UTF16) == 2


def test_line_past_the_end_is_an_error_for_a_cursor():
    with pytest.raises(PositionError):
        offset_at("one\ntwo", types.Position(5, 0), UTF16)


def test_range_ending_past_the_last_line_means_the_end_of_the_text():
    rng = types.Range(types.Position(0, 0), types.Position(3, 0))
    assert range_to_edit("one\ntwo", rng, "X", UTF16).apply("one\ntwo") == "X"


def test_reversed_range_is_an_error():
    rng = types.Range(types.Position(1, 0), types.Position(0, 1))
    with pytest.raises(PositionError):
        range_to_edit("one\ntwo", rng, "", UTF16)


def test_lone_cr_is_a_line_break():
    assert offset_at("a\rb", types.Position(1, 0), UTF16) == 2


def test_same_line_means_no_line_break_between_the_offsets():
    text = "ab\r\ncd\ref\ngh"
    assert same_line(text, 0, 2) and same_line(text, 2, 0) and same_line(text, 4, 6)
    assert not same_line(text, 2, 4) and not same_line(text, 6, 7) and not same_line(text, 0, len(text))


def test_utf8_is_chosen_only_when_offered():
    assert choose_encoding(None) == UTF16
    assert choose_encoding(["utf-16"]) == UTF16
    assert choose_encoding(["utf-16", "utf-8"]) == UTF8
    assert choose_encoding([types.PositionEncodingKind.Utf8]) == UTF8


# -- settings ----------------------------------------------------------------------------------------------

def test_settings_default_without_input():
    assert parse_options(None) == (ServerOptions(), [])


def test_settings_read_camel_case_inside_or_outside_a_section():
    options, warnings = parse_options({"superpie": {"maxTokens": 12, "cacheMode": "full", "automaticDrafts": 2,
                                                    "layout": "prefix"}})
    assert (options.max_tokens, options.cache_mode, options.automatic_drafts, options.layout) == (12, "full", 2,
                                                                                                  "prefix")
    assert warnings == []
    assert parse_options({"drafts": 5})[0].drafts == 5


def test_unknown_and_invalid_settings_warn_and_keep_the_value_below():
    base = ServerOptions(drafts=4)
    options, warnings = parse_options({"drafts": 0, "scope": "paragraph", "speculative": 1, "colour": "red",
                                       "maxTokens": True, "memoryBudgetMb": float("nan")}, base)
    assert options == base
    assert len(warnings) == 6
    assert any("colour" in w for w in warnings) and any("using 4" in w for w in warnings)


def test_settings_that_are_not_an_object_warn():
    options, warnings = parse_options(["drafts", 3])
    assert options == ServerOptions() and len(warnings) == 1


def test_draft_method_is_a_checked_setting_that_reaches_each_request():
    options, warnings = parse_options({"draftMethod": "superposed"})
    assert (options.draft_method, warnings) == ("superposed", [])
    assert options.completion(3).draft_method == "superposed"
    options, warnings = parse_options({"draftMethod": "batched"})  # the old internal name of beam search
    assert options.draft_method == ServerOptions().draft_method and "draftMethod" in warnings[0]


@pytest.mark.parametrize("bad", [0, -5, "big", True, float("inf"), 2.0**30])
def test_persist_max_mb_is_a_checked_setting(bad):
    options, warnings = parse_options({"persistMaxMb": 64})
    assert (options.persist_max_mb, warnings) == (64.0, [])
    options, warnings = parse_options({"persistMaxMb": bad})
    assert options.persist_max_mb == ServerOptions().persist_max_mb
    assert len(warnings) == 1 and "persistMaxMb" in warnings[0]


def test_wire_names_round_trip():
    options = ServerOptions(drafts=2, memory_budget_mb=64.0, log_level="debug", draft_method="sampled",
                            persist_max_mb=32.0, idle_rows="fp32")
    assert parse_options(to_wire(options)) == (options, [])


def test_the_editor_clients_know_every_setting_and_its_default():
    """The VS Code manifest and settings list and the Neovim settings list name exactly the server's options."""
    clients = Path(__file__).resolve().parents[1] / "editor-clients"
    wire = to_wire(ServerOptions())
    manifest = json.loads((clients / "vscode" / "package.json").read_text())["contributes"]["configuration"]
    contributed = {key.removeprefix("superpie."): spec.get("default") for key, spec in manifest["properties"].items()
                   if key.removeprefix("superpie.").split(".")[0] not in ("enable", "server", "trace")}
    assert contributed == wire
    keys_ts = (clients / "vscode" / "src" / "settings.ts").read_text().split("SERVER_OPTION_KEYS = [", 1)[1]
    assert re.findall(r"'(\w+)'", keys_ts.split("]", 1)[0]) == list(wire)
    config_lua = (clients / "neovim" / "lua" / "superpie" / "config.lua").read_text()
    assert re.findall(r"'(\w+)'", config_lua.split("M.server_options = {", 1)[1].split("}", 1)[0]) == list(wire)


def test_the_vscode_manifest_offers_exactly_the_choices_the_server_accepts():
    manifest = json.loads((Path(__file__).resolve().parents[1] / "editor-clients" / "vscode" / "package.json")
                          .read_text())["contributes"]["configuration"]["properties"]
    choices = {"quantization": QUANTIZATIONS, "draftMethod": DRAFT_METHODS, "scope": SCOPES, "layout": LAYOUTS,
               "cacheMode": SPLICE_MODES, "idleRows": IDLE_ROWS, "refresh": REFRESH_POLICIES, "logLevel": LOG_LEVELS}
    offered = {key.removeprefix("superpie."): spec["enum"] for key, spec in manifest.items()
               if "enum" in spec and key != "superpie.trace.server"}
    assert {key: sorted(values) for key, values in offered.items()} == \
        {key: sorted(values) for key, values in choices.items()}
    for key, values in offered.items():  # where the manifest describes each choice, it describes every one
        assert len(manifest[f"superpie.{key}"].get("enumDescriptions", values)) == len(values)


# -- suggestions -------------------------------------------------------------------------------------------

def test_typed_through_returns_the_rest_of_matching_suggestions():
    shown = ShownSuggestions("x = \nend", 4, (Suggestion("foo(1)", -0.1), Suggestion("bar", -0.5)), 3)
    rest = shown.continue_at("x = fo\nend", 6)
    assert rest == [Suggestion("o(1)", -0.1)]


def test_typed_through_misses_after_any_other_change():
    shown = ShownSuggestions("x = \nend", 4, (Suggestion("foo", -0.1),), 3)
    assert shown.continue_at("x = f\nEnd", 5) is None  # suffix changed
    assert shown.continue_at("y = f\nend", 5) is None  # prefix changed
    assert shown.continue_at("x = \nend", 3) is None  # cursor moved back


def test_inline_item_range_covers_the_replaced_suffix_in_utf16_units():
    text = "f(😀)\n"
    items = inline_items(text, 2, [Suggestion("x, y)", -0.2, replace_suffix=2)], UTF16)
    assert items[0].range == types.Range(types.Position(0, 2), types.Position(0, 5))
    assert inline_items(text, 2, [Suggestion("x", -0.2)], UTF16)[0].range is None


def test_inline_items_extend_the_selected_completion_or_are_dropped():
    text = "obj.ap\n"
    selected = types.SelectedCompletionInfo(types.Range(types.Position(0, 4), types.Position(0, 6)), "append")
    items = inline_items(text, 6, [Suggestion("pend(x)", -0.1), Suggestion("ply()", -0.2)], UTF16, selected, 4)
    assert [i.insert_text for i in items] == ["append(x)"]
    assert items[0].range == selected.range


def test_completion_items_insert_at_the_cursor_best_first():
    items = completion_items("total = su", 10, [Suggestion("m(values)", -0.1), Suggestion("per()", -0.9)],
                             UTF16, "python")
    assert [i.sort_text for i in items] == ["00", "01"]
    assert items[0].text_edit.new_text == "m(values)"
    assert items[0].text_edit.range == types.Range(types.Position(0, 10), types.Position(0, 10))
    assert items[0].filter_text.startswith("su")


def test_hover_markdown_lists_drafts_with_scores():
    md = hover_markdown([Suggestion("a ``` b", -0.25), Suggestion("c", -1.5)], "python")
    assert "2 drafts" in md and "-0.25" in md and "-1.50" in md
    assert "````python\na ``` b\n````" in md  # the fence outgrows the text's own backticks


# -- the model worker --------------------------------------------------------------------------------------

def test_worker_runs_jobs_in_submission_order():
    worker = ModelWorker()
    seen: list[int] = []
    futures = [worker.submit(lambda i=i: seen.append(i)) for i in range(50)]
    for f in futures:
        f.result(timeout=5)
    worker.stop()
    assert seen == list(range(50))


def test_front_jobs_run_before_queued_jobs_and_in_their_own_order():
    """A settings change and the stats read after it both go to the front: the read must see the change."""
    worker = ModelWorker()
    release = threading.Event()
    seen: list[str] = []
    blocker = worker.submit(lambda: release.wait(5))
    futures = [worker.submit(lambda: seen.append("edit")),
               worker.submit(lambda: seen.append("configure"), front=True),
               worker.submit(lambda: seen.append("stats"), front=True)]
    release.set()
    assert blocker.result(timeout=5)
    for f in futures:
        f.result(timeout=5)
    worker.stop()
    assert seen == ["configure", "stats", "edit"]


def test_cancelled_queued_job_is_skipped_and_running_job_sees_its_event():
    worker = ModelWorker()
    started = threading.Event()
    cancel_running, cancel_queued = threading.Event(), threading.Event()

    def long_job() -> int:
        started.set()
        steps = 0
        while not cancel_running.is_set() and steps < 500:
            time.sleep(0.01)
            steps += 1
        return steps

    running = worker.submit(long_job, kind="complete", cancel=cancel_running)
    queued = worker.submit(lambda: "ran", kind="complete", cancel=cancel_queued)
    assert started.wait(5)
    cancel_queued.set()
    cancel_running.set()
    assert running.result(timeout=5) < 500
    assert queued.result(timeout=5) is SKIPPED
    worker.stop()


def _wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.005)


def test_idle_steps_run_only_while_nothing_is_queued():
    calls: list[str] = []
    remaining = [5]

    def idle() -> bool:
        calls.append("idle")
        remaining[0] -= 1
        return remaining[0] > 0

    worker = ModelWorker(idle)
    _wait_until(lambda: remaining[0] <= 0)
    # A job is a barrier: had the idle steps gone on after the fifth said nothing remains, they would come
    # before it (the worker has no delay before its first idle steps).
    worker.submit(lambda: calls.append("job")).result(timeout=5)
    assert calls == ["idle"] * 5 + ["job"]
    _wait_until(lambda: len(calls) == 7)  # a job wakes the idle work once more (after the idle delay)...
    worker.submit(lambda: calls.append("job 2")).result(timeout=5)
    assert calls == ["idle"] * 5 + ["job", "idle", "job 2"]  # ...once
    worker.stop()


class IdleJob:
    """An idle-priority job that runs until stopped, counting its steps (as a decode checks its cancel event)."""

    def __init__(self) -> None:
        self.cancel, self.started, self.stops = threading.Event(), threading.Event(), 0

    def run(self) -> str:
        self.started.set()
        while not self.cancel.wait(0.005):
            pass
        return "stopped"

    def stop(self) -> None:
        self.stops += 1
        self.cancel.set()

    def submit(self, worker: ModelWorker):
        return worker.submit_idle(self.run, kind="prefetch", cancel=self.cancel, stop=self.stop)


def test_a_job_stops_the_running_idle_job_and_runs_after_it():
    worker = ModelWorker()
    idle = IdleJob()
    idle_future = idle.submit(worker)
    assert idle.started.wait(5)
    assert worker.has_work(("prefetch",))
    job = worker.submit(lambda: "job")
    assert idle.stops == 1  # told at once, on the submitting thread
    assert idle_future.result(timeout=5) == "stopped" and job.result(timeout=5) == "job"
    worker.stop()


def test_a_waiting_idle_job_is_dropped_by_a_job_or_a_newer_idle_job():
    worker = ModelWorker()
    gate = threading.Event()
    blocker = worker.submit(gate.wait)
    first, second, third = IdleJob(), IdleJob(), IdleJob()
    dropped_by_idle = first.submit(worker)
    dropped_by_job = second.submit(worker)  # replaces `first`, which never starts
    job = worker.submit(lambda: "job")  # drops `second`
    assert dropped_by_idle.result(timeout=5) is SKIPPED and dropped_by_job.result(timeout=5) is SKIPPED
    assert not first.started.is_set() and not second.started.is_set()
    last = third.submit(worker)  # waits behind the queued jobs, then runs once they are done
    gate.set()
    assert blocker.result(timeout=5) and job.result(timeout=5) == "job"
    assert third.started.wait(5) and not last.done()
    third.stop()
    assert last.result(timeout=5) == "stopped"
    worker.stop()


def test_a_failing_job_fails_its_future_not_the_worker():
    worker = ModelWorker()
    bad = worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.result(timeout=5)
    assert worker.submit(lambda: 7).result(timeout=5) == 7
    worker.stop()


# -- the command line --------------------------------------------------------------------------------------

def test_serve_parses_tcp_and_log_options(tmp_path):
    from lsp_server.cli import build_parser

    args = build_parser().parse_args(["serve", "--tcp", "127.0.0.1:2087", "--log-file", str(tmp_path / "l"),
                                      "--log-level", "debug"])
    assert args.tcp == ("127.0.0.1", 2087) and args.log_level == "debug" and args.command == "serve"


@pytest.mark.parametrize("value", ["2087", "host:", ":80", "host:99999", "host:x"])
def test_serve_rejects_a_bad_tcp_address(value):
    from lsp_server.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--tcp", value])
    assert exit_.value.code == 2


def test_the_lsp_process_never_imports_the_models_code():
    """`superpie serve` keeps the protocol and the text; the model's libraries load only in the engine process,
    so the server stays small (README: completion.py) and a crash in them cannot take the protocol down."""
    probe = ("import sys, lsp_server.cli, lsp_server.server; "
             "print(sorted(m for m in ('onnxruntime', 'onnx', 'tokenizers', 'gguf', 'tree_sitter') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
