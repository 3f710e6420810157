"""The server's pure pieces: settings, stats, paths, item ranges, type-through memory, the watch
on an accept, the adaptive debounce, framing."""
import json
from pathlib import Path

import pytest

from stablelm_lsp.inference.load import describe_model
from stablelm_lsp.lsp.anticipation import AcceptWatch
from stablelm_lsp.lsp.completion import ShownCompletion, Suggestion
from stablelm_lsp.lsp.debounce import AdaptiveDebounce
from stablelm_lsp.lsp.documents import Cursor, Document, PositionEncoding, split_lines
from stablelm_lsp.lsp.postprocess import Completion
from stablelm_lsp.lsp.documents import relative_path
from stablelm_lsp.lsp.items import inline_item
from stablelm_lsp.lsp.settings import _JSON_NAMES as _SERVER_SETTINGS
from stablelm_lsp.lsp.settings import Settings, SettingsError
from stablelm_lsp.lsp.stats import Stats
from stablelm_lsp.lsp.transport import FrameParser, FramingError


def test_settings_accept_camel_case_flat_or_under_a_section():
    s = Settings().merged({"maxNewTokens": 12, "debounceMs": 0, "chatModel": "x"})
    assert (s.max_new_tokens, s.debounce_ms, s.chat_model) == (12, 0, "x")
    s = Settings().merged({"stablelm": {"enabled": False, "model": ""}})
    assert s.enabled is False and s.model is None
    assert Settings().merged(None) == Settings()


def test_bad_settings_are_reported_and_the_good_ones_still_apply():
    with pytest.raises(SettingsError) as info:
        Settings().merged({"temperature": "hot", "maxNewTokens": 0, "contextTokens": 700,
                           "dtype": "int4", "template": "{prefix}", "enabled": 1, "nope": True})
    problems = " | ".join(info.value.problems)
    for name in ("temperature", "maxNewTokens", "dtype", "template", "enabled", "'nope'"):
        assert name in problems
    assert info.value.applied.context_tokens == 700
    with pytest.raises(SettingsError):
        Settings().merged(["not", "an", "object"])


def test_chat_reply_length_setting(tmp_path):
    from stablelm_lsp.inference.prompts.chat import CHAT_MAX_NEW_TOKENS
    from stablelm_lsp.lsp.cli import build_parser
    from stablelm_lsp.lsp.serve import settings_from_args

    assert Settings().chat_max_new_tokens == CHAT_MAX_NEW_TOKENS
    assert Settings().merged({"stablelm": {"chatMaxNewTokens": 100}}).chat_max_new_tokens == 100
    for bad in (0, 40_000, 1.5, "long", None):
        with pytest.raises(SettingsError, match="chatMaxNewTokens"):
            Settings().merged({"chatMaxNewTokens": bad})
    assert not Settings().model_changed(Settings().merged({"chatMaxNewTokens": 100}))
    args = build_parser().parse_args(["serve", "--chat-max-new-tokens", "77"])
    assert settings_from_args(args).chat_max_new_tokens == 77


def test_the_vscode_extension_contributes_the_server_settings_with_the_server_defaults():
    manifest = json.loads((Path(__file__).parents[1] / "editors" / "vscode" / "package.json")
                          .read_text(encoding="utf-8"))
    contributed = {key.removeprefix("stablelm."): value
                   for key, value in manifest["contributes"]["configuration"]["properties"].items()}
    server = {key: contributed[key] for key in contributed if key in _SERVER_SETTINGS}
    assert {"model", "maxNewTokens", "chatModel", "chatMaxNewTokens", "enabled"} <= set(server)
    defaults = Settings()
    for key, declared in server.items():
        default = getattr(defaults, _SERVER_SETTINGS[key])
        assert declared["default"] == ("" if default is None else default), key
        low_high = (declared.get("minimum"), declared.get("maximum"))
        for bound in filter(lambda b: b is not None, low_high):
            Settings().merged({key: bound})      # the editor's bounds are valid for the server


def test_model_changes_are_told_apart_from_other_changes():
    base = Settings()
    assert base.model_changed(base.merged({"model": "a"}))
    assert base.model_changed(base.merged({"prefixCache": False}))
    assert base.model_changed(base.merged({"speculation": False}))
    assert base.model_changed(base.merged({"decodeStep": "compile", "attention": "sdpa"}))
    with pytest.raises(SettingsError, match="decodeStep.*not one of"):
        base.merged({"decodeStep": "fast"})
    assert not base.model_changed(base.merged({"maxNewTokens": 3, "template": "{prefix}{middle}"}))


def test_models_are_named_the_same_before_and_after_loading(tmp_path, monkeypatch):
    from stablelm_lsp.models import builtin_model_path

    builtin = builtin_model_path()
    assert describe_model(None) == {"model": builtin.name, "path": str(builtin), "builtin": True}
    assert describe_model(str(builtin))["builtin"] is True
    assert describe_model("bigcode/starcoder2-3b") == {
        "model": "bigcode/starcoder2-3b", "path": None, "builtin": False}
    folder = tmp_path / "stable-code-3b"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    for given in (str(folder), str(folder) + "/", "stable-code-3b", "./stable-code-3b/.", "."):
        described = describe_model(given)
        expected = folder if given != "." else tmp_path
        assert described == {"model": expected.name, "path": str(expected), "builtin": False}, given
    monkeypatch.setenv("HOME", str(tmp_path))
    assert describe_model("~/stable-code-3b")["path"] == str(folder)


def test_stats_count_accepts_once_and_merge_across_servers(tmp_path):
    path = tmp_path / "state" / "stats.json"
    first, second = Stats(path), Stats(path)
    first.record_shown("a")
    second.record_shown("b")
    assert first.record_accepted("a") and not first.record_accepted("a")
    assert not first.record_accepted("b")          # shown by the other server
    assert second.record_accepted("b")
    first.flush()
    second.flush()
    assert json.loads(path.read_text()) == {"completionsShown": 2, "completionsAccepted": 2}
    assert Stats(path).snapshot() == {"completionsShown": 2, "completionsAccepted": 2}


def test_unreadable_stats_file_counts_from_zero(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text("{broken")
    assert Stats(path).snapshot() == {"completionsShown": 0, "completionsAccepted": 0}


def test_relative_paths_and_repository_names(tmp_path):
    root = tmp_path / "repo"
    inner = root / "sub"
    uri = (inner / "pkg" / "m.py").as_uri()
    assert relative_path(uri, [root.as_uri()]) == ("sub/pkg/m.py", "repo")
    assert relative_path(uri, [root.as_uri(), inner.as_uri()]) == ("pkg/m.py", "sub")
    assert relative_path((tmp_path / "x.py").as_uri(), [root.as_uri()]) == ("x.py", "")
    assert relative_path("untitled:Untitled-1", [root.as_uri()]) == ("Untitled-1", "")


def test_item_range_covers_replaced_closers_in_the_client_encoding():
    doc = Document("file:///a.py", 'print("\U0001F600", f(x))\n', 1)
    cursor = Cursor(0, len('print("\U0001F600", f(x'))
    item = inline_item(Completion("x)", replace=1), cursor, doc, PositionEncoding.UTF16, "id")
    assert (item.range.start.character, item.range.end.character) == (cursor.index + 1, cursor.index + 2)
    item = inline_item(Completion("x)", replace=1), cursor, doc, PositionEncoding.UTF8, "id")
    assert item.range.start.character == len('print("\U0001F600", f(x'.encode())
    assert inline_item(Completion("x"), cursor, doc, PositionEncoding.UTF16, "id").range is None
    assert item.command.arguments == [{"id": "id"}]


def test_type_through_memory_follows_matching_keys_only():
    def shown(*texts, replace=0, at=Cursor(3, 4)):
        return ShownCompletion([Suggestion(Completion(t, replace=replace)) for t in texts], at)

    memory = shown("return x", replace=1)
    (only,) = memory.suggestions
    assert memory.observe_insert(Cursor(3, 4), Cursor(3, 4), "re")
    assert memory.remainder(Cursor(3, 6)) == [Suggestion(Completion("turn x", replace=1), only.id)]
    assert memory.remainder(Cursor(3, 5)) is None
    assert not memory.observe_insert(Cursor(3, 6), Cursor(3, 6), "x")        # does not match
    assert not shown("ab", at=Cursor(0, 0)).observe_insert(Cursor(0, 0), Cursor(0, 1), "a")  # replaces
    done = shown("ab", at=Cursor(0, 0))
    assert done.observe_insert(Cursor(0, 0), Cursor(0, 0), "ab") and done.remainder(Cursor(0, 2)) is None
    # Choices: typing keeps those it follows, in their order.
    choices = shown("x + 1", "y * 2", "x - 1")
    assert choices.observe_insert(Cursor(3, 4), Cursor(3, 4), "x")
    assert [s.completion.text for s in choices.remainder(Cursor(3, 5))] == [" + 1", " - 1"]


def _frame(body: bytes, length: int | None = None) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length) + body


def test_frames_split_anywhere_are_reassembled():
    data = _frame(b'{"a": 1}') + _frame("{\"b\": \"\u00e9\U0001F600\"}".encode())
    for cut in range(len(data)):
        parser = FrameParser()
        frames = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert frames == [b'{"a": 1}', "{\"b\": \"\u00e9\U0001F600\"}".encode()]


def test_framing_errors_resynchronise_on_the_next_header():
    parser = FrameParser()
    frames = parser.feed(_frame(b'{"id": 1}', 40) + _frame(b'{"id": 2}'))
    assert isinstance(frames[0], FramingError) and frames[0].salvage == b'{"id": 1}'
    assert frames[1:] == [b'{"id": 2}']
    frames = FrameParser().feed(b"junk" * 5000 + _frame(b"{}"))
    assert isinstance(frames[0], FramingError) and frames[-1] == b"{}"
    parser = FrameParser()
    assert parser.feed(_frame(b'{"id": 3}', 100)) == [] and parser.awaiting_body
    (late,) = parser.flush_idle()
    assert late.salvage == b'{"id": 3}' and not parser.awaiting_body
    assert parser.feed(_frame(b"{}")) == [b"{}"]


def test_a_large_body_arriving_in_small_chunks_is_scanned_once():
    body = json.dumps({"text": "x = 1\n" * 500_000}).encode()
    parser = FrameParser()
    data = _frame(body)
    frames = []
    for start in range(0, len(data), 1 << 16):
        frames += parser.feed(data[start:start + (1 << 16)])
    assert frames == [body]


def test_an_accept_watch_follows_typing_and_accepting_in_any_shape_and_nothing_else():
    def watch(lines, at, text, replace=0):
        return AcceptWatch.of(lines, at, Completion(text, replace))

    lines = split_lines("a = f()\nb\n")
    closing = watch(lines, Cursor(0, 6), "x, y)", replace=1)
    for edited in ("a = f(x, y)\n",        # accepted in one edit over the auto-inserted ")"
                   "a = f(x)\n",           # typed partly
                   "a = f(x, )\n",
                   "a = f()\n"):           # typed and deleted again
        assert closing.holds([edited, "b\n", ""], 0, 0), edited
    assert not closing.holds(["a = f(z)\n", "b\n", ""], 0, 0)                # typed otherwise
    assert not closing.holds(["a = f()\n", "c\n", ""], 1, 1)                 # another line
    block = watch(split_lines("def f():\n    \nz"), Cursor(1, 4), "return 1\n    pass")
    assert block.holds(split_lines("def f():\n    return 1\n    pass\nz"), 1, 1)    # accepted
    assert block.holds(split_lines("def f():\n    return 1\n\nz"), 1, 1)          # typed to the break
    assert block.holds(split_lines("def f():\n    return 1\n    pa\nz"), 2, 2)    # and on
    assert not block.holds(split_lines("def f():\n    return 2\n\nz"), 1, 1)
    assert not block.holds(split_lines("def f():\n    return 1\n    pass\ny"), 3, 3)


def test_the_debounce_adapts_to_rhythm_and_latency_within_its_bounds():
    now = [0.0]
    debounce = AdaptiveDebounce(clock=lambda: now[0])
    assert debounce.delay("a", 0.0, 0.075) == 0.075            # nothing measured: the upper bound
    for _ in range(6):                                          # typing every 150 ms
        now[0] += 0.15
        debounce.edited("a")
    debounce.ran(0.02)                                          # answers in 20 ms: no need to wait
    assert debounce.delay("a", 0.01, 0.075) == 0.01
    for _ in range(10):
        debounce.ran(0.6)                                       # 600 ms: wait for a pause
    assert debounce.delay("a", 0.01, 0.075) == 0.075            # about one gap, within the bounds
    assert debounce.delay("a", 0.01, 0.3) == pytest.approx(0.15)
    assert debounce.delay("b", 0.01, 0.3) == 0.3                # another document's rhythm unknown
    now[0] += 5.0                                               # a pause is not rhythm
    debounce.edited("a")
    assert debounce.delay("a", 0.01, 0.3) == pytest.approx(0.15)
    assert debounce.delay("a", 0.0, 0.0) == 0.0
