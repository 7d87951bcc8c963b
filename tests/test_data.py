"""Data: every source and format in, validated with messages that name the fix, chat-templated, loss on
the answers (checked token by token on the tiny tokenizer), packing that keeps examples apart."""
from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest

from conftest import build_tiny_tokenizer
from ft_magics.config import TrainConfig
from ft_magics.core import data as D
from ft_magics.errors import FtUsageError

CHAT = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reset password?"},
                  {"role": "assistant", "content": "Use the reset link."}]},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return build_tiny_tokenizer(chat_template=False)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(src, **kw):
    """load_rows + normalise, as prepare() runs them."""
    ns = kw.pop("namespace", None)
    txt_mode = kw.pop("txt_mode", "auto")
    max_rows = kw.pop("max_rows", 0)
    rows, desc = D.load_rows(src, ns, txt_mode, max_rows)
    return D.normalise(rows, where=desc, **kw)


def cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict(kw)


# ============================================================================ sources
def test_jsonl_chat(tmp_path):
    recs, fmt = load(str(write_jsonl(tmp_path / "d.jsonl", CHAT)))
    assert fmt == "chat" and len(recs) == 2
    assert recs[1].messages[0] == {"role": "system", "content": "Be brief."}


def test_json_list_object_holding_a_list_and_dict_of_columns(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(CHAT))
    (tmp_path / "b.json").write_text(json.dumps({"version": 2, "data": CHAT}))
    (tmp_path / "c.json").write_text(json.dumps({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}))
    for name, want in (("a.json", "chat"), ("b.json", "chat"), ("c.json", "prompt-completion")):
        recs, fmt = load(str(tmp_path / name))
        assert (fmt, len(recs)) == (want, 2), name
    assert recs[1].messages == [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "c2"}]
    for value, kind in ((3, "int"), ("text", "str"), (None, "null")):  # it said "scalar.json is a int; --data takes
        (tmp_path / "s.json").write_text(json.dumps(value))           # a pandas DataFrame", a notebook variable's words
        with pytest.raises(FtUsageError, match=rf"s\.json holds a single JSON {kind}, not records"):
            load(str(tmp_path / "s.json"))


def test_json_file_that_is_really_json_lines(tmp_path):
    write_jsonl(tmp_path / "d.json", CHAT)
    recs, fmt = load(str(tmp_path / "d.json"))
    assert fmt == "chat" and len(recs) == 2


def test_csv_and_tsv_alpaca(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"instruction": ["Classify", "Greet"], "input": ["my card was charged twice", ""],
                       "output": ["billing", "hello"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    for name in ("d.csv", "d.tsv"):
        recs, fmt = load(str(tmp_path / name))
        assert fmt == "alpaca"
        assert recs[0].messages == [{"role": "user", "content": "Classify\n\nmy card was charged twice"},
                                    {"role": "assistant", "content": "billing"}]
        assert recs[1].messages[0]["content"] == "Greet"  # empty input: instruction alone


def test_a_missing_eval_file_is_named_as_the_eval_data(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", CHAT)
    with pytest.raises(FtUsageError, match=r"^the eval data \(--eval\): data file '.*nosuch.jsonl' does not exist"):
        D.prepare(str(tmp_path / "train.jsonl"), tok, cfg(), eval_src=str(tmp_path / "nosuch.jsonl"))


def test_csv_from_a_spreadsheet_semicolons_and_a_byte_order_mark(tmp_path):
    """Excel in many locales exports 'question;answer' with a UTF-8 byte-order mark: read as two columns
    (not one column named 'question;answer'); a comma CSV with a semicolon inside a field stays a comma CSV."""
    (tmp_path / "semi.csv").write_text("question;answer\nWhat is 1+1?;2\nWhat is 2+2?;4\n", encoding="utf-8-sig")
    recs, fmt = load(str(tmp_path / "semi.csv"))
    assert fmt.startswith("prompt-completion (columns question -> prompt, answer -> completion)")
    assert [m["content"] for m in recs[1].messages] == ["What is 2+2?", "4"]
    (tmp_path / "comma.csv").write_text('prompt,completion\n"a; b",c\nd,"e; f"\n', encoding="utf-8")
    recs, fmt = load(str(tmp_path / "comma.csv"))
    assert fmt == "prompt-completion" and [m["content"] for m in recs[0].messages] == ["a; b", "c"]
    (tmp_path / "bars.csv").write_text("prompt|completion\nhi|there\n", encoding="utf-8")
    recs, _ = load(str(tmp_path / "bars.csv"))
    assert [m["content"] for m in recs[0].messages] == ["hi", "there"]
    # spaces around the header's names ("Question , Answer"): the names are the words. Before, the format was
    # not found and the suggested --map "Question =prompt,..." failed in turn (the map's names are stripped)
    (tmp_path / "spaced.csv").write_text("Question , Answer\nWhat is 1+1?,2\n", encoding="utf-8")
    recs, fmt = load(str(tmp_path / "spaced.csv"))
    assert fmt.startswith("prompt-completion (columns Question -> prompt, Answer -> completion)")
    recs, _ = load(str(tmp_path / "spaced.csv"), column_map="Question=prompt,Answer=completion")
    assert [m["content"] for m in recs[0].messages] == ["What is 1+1?", "2"]


def test_parquet_prompt_completion(tmp_path):
    import pandas as pd

    pd.DataFrame({"prompt": ["2+2?", "3+3?"], "completion": ["4", "6"]}).to_parquet(tmp_path / "d.parquet")
    recs, fmt = load(str(tmp_path / "d.parquet"))
    assert fmt == "prompt-completion" and recs[1].messages[-1] == {"role": "assistant", "content": "6"}


def test_parquet_chat_with_nested_messages(tmp_path):
    import pandas as pd

    pd.DataFrame(CHAT).to_parquet(tmp_path / "d.parquet")
    recs, fmt = load(str(tmp_path / "d.parquet"))
    assert fmt == "chat" and recs[1].messages[-1]["content"] == "Use the reset link."


@pytest.mark.parametrize("mode,want", [
    ("document", ["first line\nsecond line\n\nthird block\n"]),
    ("lines", ["first line", "second line", "third block"]),
    ("blocks", ["first line\nsecond line", "third block"]),
    ("auto", ["first line\nsecond line", "third block"]),  # blank lines present: blocks
])
def test_txt_modes(tmp_path, mode, want):
    p = tmp_path / "d.txt"
    p.write_text("first line\nsecond line\n\nthird block\n")
    recs, fmt = load(str(p), txt_mode=mode)
    assert fmt == "text" and [r.text for r in recs] == want


def test_txt_auto_without_blank_lines_is_one_example_per_line(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("one\ntwo\nthree\n")
    assert [r.text for r in load(str(p))[0]] == ["one", "two", "three"]


def test_txt_mode_is_a_config_key_and_a_bad_value_is_refused():
    assert cfg(txt_mode="lines").txt_mode == "lines"
    with pytest.raises(FtUsageError, match="txt_mode 'line' is not one of .*did you mean 'lines'"):
        cfg(txt_mode="line")


def test_folder_of_files_and_errors_name_the_file(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", CHAT)
    write_jsonl(folder / "b.jsonl", CHAT[:1])
    (folder / "notes.md").write_text("ignored")
    recs, fmt = load(str(folder))
    assert fmt == "chat" and len(recs) == 3
    write_jsonl(folder / "c.jsonl", [{"messages": [{"role": "usr", "content": "x"}]}])
    with pytest.raises(FtUsageError, match=r"c\.jsonl, line 1, message 0: unknown role 'usr'"):
        load(str(folder))
    # files in two formats: said as such (it advised dropping a format setting that was never given)
    (folder / "c.jsonl").unlink()
    (folder / "d.csv").write_text("text\nhello\n")
    with pytest.raises(FtUsageError, match=r"d\.csv, line 2: .*This row is in the text format, while .*a\.jsonl, "
                                           r"line 1 is chat: the rows of one dataset share one format") as err:
        load(str(folder))
    assert "format setting" not in str(err.value)
    # the odd file first in name order: the message names a row of the format detected, not "the first rows"
    odd = tmp_path / "odd"
    odd.mkdir()
    write_jsonl(odd / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    write_jsonl(odd / "b.jsonl", CHAT)
    with pytest.raises(FtUsageError, match=r"a\.jsonl, line 1: the chat format needs .*This row is in the "
                                           r"prompt-completion format, while .*b\.jsonl, line 1 is chat"):
        load(str(odd))
    with pytest.raises(FtUsageError, match="drop the format setting"):  # where one was given, it still says so
        load(str(folder / "a.jsonl"), fmt="prompt-completion")


def test_saved_dataset_and_dataset_dict_folders(tmp_path):
    import datasets

    datasets.Dataset.from_list(CHAT).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT),
                          "test": datasets.Dataset.from_list(CHAT[:1])}).save_to_disk(str(tmp_path / "dd"))
    for name in ("ds", "dd"):
        recs, fmt = load(str(tmp_path / name))
        assert fmt == "chat" and len(recs) == 2, name


def test_notebook_variables_of_every_kind():
    import datasets
    import pandas as pd

    ns = {
        "df": pd.DataFrame({"question": ["q1", "q2"], "answer": ["a1", "a2"]}),
        "dicts": [{"text": "one"}, {"text": "two"}],
        "strings": ["plain one", "plain two"],
        "ds": datasets.Dataset.from_list(CHAT),
        "dd": datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT)}),
        "series": pd.Series(["s one", "s two"]),
    }
    recs, fmt = load("df", namespace=ns, column_map="question=prompt,answer=completion")
    assert fmt == "prompt-completion" and recs[0].messages[1]["content"] == "a1"
    assert [r.text for r in load("dicts", namespace=ns)[0]] == ["one", "two"]
    assert [r.text for r in load("strings", namespace=ns)[0]] == ["plain one", "plain two"]
    assert [r.text for r in load("series", namespace=ns)[0]] == ["s one", "s two"]
    assert load("ds", namespace=ns)[1] == "chat" and load("dd", namespace=ns)[1] == "chat"


def test_dataset_dict_without_train_split_says_which_splits_exist():
    import datasets

    dd = datasets.DatasetDict({"a": datasets.Dataset.from_list(CHAT), "b": datasets.Dataset.from_list(CHAT)})
    with pytest.raises(FtUsageError, match="without one split to train on \\(splits: a, b\\); put one in a "
                                           "variable first \\(part = dd\\['a'\\]\\) and pass --data part"):
        load("dd", namespace={"dd": dd})
    with pytest.raises(FtUsageError, match="variable 'empty' is an empty DatasetDict: it has no splits"):
        load("empty", namespace={"empty": datasets.DatasetDict({})})  # an IndexError escaped


def test_a_dataframe_with_two_columns_of_one_name_is_refused():
    """to_dict keeps the last column of a name: the answers trained were the other column's."""
    import pandas as pd

    df = pd.DataFrame([["q1", "a1", "z"], ["q2", "a2", "z"]], columns=["prompt", "completion", "completion"])
    with pytest.raises(FtUsageError, match="has more than one column named 'completion'; give each column its own"):
        load("df", namespace={"df": df})


def test_a_dataframe_with_multiindex_columns_maps_by_the_dotted_names_it_is_told():
    """A pivot's ('x', 'prompt') columns were named as tuples, and the --map the refusal suggested could not be typed."""
    import pandas as pd

    df = pd.DataFrame([["q1", "a1"], ["q2", "a2"]],
                      columns=pd.MultiIndex.from_tuples([("x", "prompt"), ("x", "completion")]))
    with pytest.raises(FtUsageError, match=r'For these columns: --map "x\.prompt=prompt,x\.completion=completion"'):
        load("df", namespace={"df": df})
    recs, fmt = load("df", namespace={"df": df}, column_map="x.prompt=prompt,x.completion=completion")
    assert [[m["content"] for m in r.messages] for r in recs] == [["q1", "a1"], ["q2", "a2"]]


def test_demo_dataset():
    recs, fmt = load("demo:support")
    assert fmt == "chat" and len(recs) >= 100
    with pytest.raises(FtUsageError, match="no bundled dataset 'suport' \\(did you mean 'support'\\?\\)"):
        load("demo:suport")


# ============================================================================ formats
def test_chat_content_parts_and_every_role():
    rows = [{"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look "}, {"type": "text", "value": "up x"}]},
        {"role": "assistant", "content": "calling"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
    ]}]
    recs, fmt = D.normalise(rows)
    assert fmt == "chat"
    assert [m["role"] for m in recs[0].messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert recs[0].messages[1]["content"] == "Look up x"


def test_sharegpt_roles_system_and_tools():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    rows = [{"system": "You help.", "tools": json.dumps(tools), "conversations": [
        {"from": "human", "value": "order 7?"},
        {"from": "function_call", "value": '{"name": "lookup"}'},
        {"from": "observation", "value": "shipped"},
        {"from": "gpt", "value": "It shipped."},
    ]}]
    recs, fmt = D.normalise(rows)
    assert fmt == "sharegpt"
    assert [m["role"] for m in recs[0].messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert recs[0].messages[0]["content"] == "You help." and recs[0].tools == tools


def test_prompt_completion_as_message_lists():
    rows = [{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
             "completion": [{"role": "assistant", "content": "A"}]}]
    recs, fmt = D.normalise(rows)
    assert fmt == "prompt-completion" and [m["role"] for m in recs[0].messages] == ["system", "user", "assistant"]


def test_alpaca_with_system_and_history():
    rows = [{"instruction": "And now?", "input": "", "output": "Done.", "system": "Be kind.",
             "history": [["First?", "Yes."]]}]
    recs, fmt = D.normalise(rows)
    assert fmt == "alpaca"
    assert recs[0].messages == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Done."},
    ]


def test_text_field_map_and_format_override():
    recs, fmt = D.normalise([{"body": "abc"}], text_field="body")
    assert (fmt, recs[0].text) == ("text", "abc")
    recs, fmt = D.normalise([{"q": "Q", "a": "A"}], column_map="q=prompt, a=completion")
    assert fmt == "prompt-completion" and recs[0].messages[1]["content"] == "A"
    both = [{"text": "raw", "prompt": "P", "completion": "C"}]
    assert D.normalise(both)[1] == "prompt-completion"
    recs, fmt = D.normalise(both, fmt="text")
    assert (fmt, recs[0].text) == ("text", "raw")


# ============================================================================ bad input
def test_malformed_json_line_names_file_line_and_parser_complaint(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(CHAT[0]) + "\n\n" + '{"messages": [}\n')
    with pytest.raises(FtUsageError) as e:
        load(str(p))
    msg = str(e.value)
    assert f"{p}, line 3: not valid JSON" in msg and "column 15" in msg and "Expecting value" in msg


def test_row_error_points_at_the_line_past_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(CHAT[0]) + "\n\n\n" + json.dumps({"messages": "hello"}) + "\n")
    with pytest.raises(FtUsageError, match=rf"{p}, line 4: expected a list of messages, got str"):
        load(str(p))


def test_missing_field_lists_fields_formats_and_the_map_fix(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Q?", "reply": "A.", "id": 1}])
    with pytest.raises(FtUsageError) as e:
        load(str(p))
    msg = str(e.value)
    assert "fields found (id, q, reply)" in msg
    for fmt in ("chat: messages", "sharegpt: conversations", "prompt-completion: prompt + completion",
                "alpaca: instruction + output", "text: text"):
        assert fmt in msg
    assert '--map "q=prompt,reply=completion"' in msg
    # ... and that map does fix it
    recs, fmt = load(str(p), column_map="q=prompt,reply=completion")
    assert fmt == "prompt-completion"


def test_well_known_column_pairs_need_no_map_and_the_report_says_how_they_were_read(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"Question": "Q?", "Answer": "A.", "id": 1}])
    recs, fmt = load(str(p))
    assert fmt == "prompt-completion (columns Question -> prompt, Answer -> completion)"
    assert [m["content"] for m in recs[0].messages] == ["Q?", "A."]
    recs, fmt = D.normalise([{"input": "x", "output": "y"}])
    assert fmt.startswith("prompt-completion (columns input") and recs[0].messages[1]["content"] == "y"
    recs, fmt = D.normalise([{"q": "2+2?", "a": "4"}])  # the shortest spelling of question/answer
    assert fmt == "prompt-completion (columns q -> prompt, a -> completion)" and recs[0].messages[1]["content"] == "4"
    # two plausible pairs: no guess, the error names the fix
    with pytest.raises(FtUsageError, match="--map"):
        D.normalise([{"question": "q", "answer": "a", "input": "i", "output": "o"}])


def test_unknown_column_names_suggest_a_map_in_the_data_s_column_order():
    """Columns with no known name (here German): the suggestion takes the first column as the prompt, as
    datasets put them, not the alphabetical first (which made the answer the prompt)."""
    with pytest.raises(FtUsageError, match='--map "Frage=prompt,Antwort=completion"'):
        D.normalise([{"Frage": "Wie?", "Antwort": "So."}])
    with pytest.raises(FtUsageError, match='--map "Antwort=prompt,Frage=completion"'):
        D.normalise([{"Antwort": "So.", "Frage": "Wie?"}])


def test_missing_field_in_a_later_row(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(FtUsageError, match=r"line 2: the prompt-completion format needs field\(s\) 'completion'; "
                                           r"this row has answer, prompt"):
        load(str(p))


def test_map_naming_an_absent_column():
    with pytest.raises(FtUsageError, match=r"--map names column\(s\) 'questoin' that do not exist "
                                           r"\(did you mean 'question'\?\). Columns: answer, question"):
        D.normalise([{"question": "q", "answer": "a"}], column_map="questoin=prompt")


def test_empty_inputs(tmp_path):
    (tmp_path / "zero.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    (tmp_path / "header.csv").write_text("prompt,completion\n")
    with pytest.raises(FtUsageError, match=r"zero\.jsonl is empty \(0 bytes\)"):
        load(str(tmp_path / "zero.jsonl"))
    for name in ("blank.jsonl", "header.csv"):
        with pytest.raises(FtUsageError, match=rf"{name} has no rows: it holds no examples"):
            load(str(tmp_path / name))
    with pytest.raises(FtUsageError, match="variable nothing has no rows"):
        load("nothing", namespace={"nothing": []})


def test_unknown_role_suggests_the_right_one():
    with pytest.raises(FtUsageError) as e:
        D.normalise([{"messages": [{"role": "user", "content": "x"}, {"role": "asistant", "content": "y"}]}],
                    where="data.jsonl")
    msg = str(e.value)
    assert "data.jsonl, row 1, message 1: unknown role 'asistant' (did you mean 'assistant'?)" in msg
    assert "Roles: " in msg and "observation" in msg


@pytest.mark.parametrize("row,complaint", [
    ({"instruction": "i", "output": ["not", "a", "string"]}, "field 'output' must be a string, got list"),
    ({"messages": "hello"}, "expected a list of messages, got str"),
    ({"messages": []}, "the list of messages is empty"),
    ({"messages": [{"role": "user", "content": {"x": 1}}]}, "content must be a string or a list of text parts, got dict"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "u"}]}]}, "content part of type 'image'"),
    ({"messages": [{"role": "user", "text": "x"}]}, "no 'content' field \\(fields: role, text\\)"),
    ({"messages": ["hi", 3]}, "message 1: the dialog.s utterances are plain strings"),
    ({"prompt": None, "completion": "c"}, "field 'prompt' is missing or null"),
    ({"instruction": "i", "output": "o", "history": "no"}, "'history' must be a list"),
])
def test_wrong_types_are_named(row, complaint):
    with pytest.raises(FtUsageError, match=complaint):
        D.normalise([row], where="v")


def test_unreadable_files(tmp_path, monkeypatch):
    p = write_jsonl(tmp_path / "locked.jsonl", CHAT)
    real_open = open

    def deny(path, *a, **kw):
        if Path(path) == p:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(D, "open", deny, raising=False)  # tests run as root: chmod 000 would not stop a read
    with pytest.raises(FtUsageError, match=rf"cannot read {p}: Permission denied"):
        load(str(p))
    monkeypatch.undo()
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(FtUsageError, match=r"latin\.jsonl, line 2: not UTF-8 text"):
        load(str(tmp_path / "latin.jsonl"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(FtUsageError, match=r"cannot parse .*broken\.parquet"):
        load(str(tmp_path / "broken.parquet"))
    (tmp_path / "d.xlsx").write_bytes(b"x")
    with pytest.raises(FtUsageError, match="unsupported file type '.xlsx'"):
        load(str(tmp_path / "d.xlsx"))


def test_chat_template_refusing_a_row_names_the_row(tmp_path):
    strict = build_tiny_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    p = write_jsonl(tmp_path / "d.jsonl", [CHAT[0], {"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}])
    with pytest.raises(FtUsageError) as e:
        D.prepare(str(p), strict, cfg())
    msg = str(e.value)
    assert f"{p}, line 2: the model's chat template refused this conversation (roles: user, user, assistant)" in msg
    assert "Conversation roles must alternate" in msg


def test_json_object_with_train_and_test_lists_uses_train(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"train": CHAT, "test": CHAT[:1]}))
    assert len(load(str(tmp_path / "d.json"))[0]) == 2
    (tmp_path / "e.json").write_text(json.dumps({"a": CHAT, "b": CHAT[:1]}))
    with pytest.raises(FtUsageError, match="several lists of records \\(a, b\\) and none is called 'train'"):
        load(str(tmp_path / "e.json"))


def test_csv_row_errors_name_the_row(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion\n"multi\nline",ok\nx,\n')
    recs, _ = load(str(tmp_path / "d.csv"))  # an empty cell is an empty string, not a missing field
    assert recs[0].messages[0]["content"] == "multi\nline" and recs[1].messages[1]["content"] == ""
    (tmp_path / "e.csv").write_text("instruction,output\nhi,there\n")
    with pytest.raises(FtUsageError, match=r"e\.csv, line 2: the prompt-completion format needs"):
        load(str(tmp_path / "e.csv"), fmt="prompt-completion")


def test_missing_file_and_missing_variable():
    with pytest.raises(FtUsageError, match="'train_rows' is neither a file nor a variable in this notebook "
                                           "\\(did you mean 'train_row'\\?\\)"):
        load("train_rows", namespace={"train_row": [{"text": "x"}], "n": 3})
    with pytest.raises(FtUsageError, match="data file 'nope/d.jsonl' does not exist"):
        load("nope/d.jsonl", namespace={})


def test_file_larger_than_memory_is_refused_and_max_rows_streams(tmp_path, monkeypatch):
    import pandas as pd

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)]
    jl = write_jsonl(tmp_path / "big.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "big.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "big.parquet")
    (tmp_path / "big.txt").write_text("\n".join(f"line {i}" for i in range(50)))
    (tmp_path / "big.json").write_text(json.dumps(rows))
    monkeypatch.setattr(D, "_available_memory", lambda: 900)
    with pytest.raises(FtUsageError) as e:
        load(str(jl))
    msg = str(e.value)
    assert "loading it whole needs about" in msg and "900 B is free" in msg and "max_rows" in msg
    for name in ("big.jsonl", "big.csv", "big.parquet", "big.txt"):
        recs, _ = load(str(tmp_path / name), max_rows=7)
        assert len(recs) == 7, name
    assert recs[0].text == "line 0" and recs[-1].text == "line 6"
    with pytest.raises(FtUsageError, match="big.json is .* loading it whole"):  # plain JSON cannot stream
        load(str(tmp_path / "big.json"), max_rows=7)
    monkeypatch.undo()
    assert len(load(str(jl))[0]) == 50


def test_streaming_reader_stops_early(tmp_path):
    """max_rows really stops reading: a malformed line past the limit is never parsed."""
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n{broken\n")
    assert [r.text for r in load(str(p), max_rows=2)[0]] == ["a", "b"]
    with pytest.raises(FtUsageError, match="line 3"):
        load(str(p))


# ============================================================================ loss masks, token by token
def expected_chat(tok, pieces):
    """Token ids and labels built piece by piece: (text, carries_loss). Pieces split at special tokens, so
    tokenising them one at a time gives the same ids as tokenising the whole text."""
    ids, labels = [], []
    for text, loss in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if loss else [-100] * len(part)
    return ids, labels


def test_loss_on_assistant_turns_only_multi_turn(tok):
    rec = D.normalise([{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
        {"role": "user", "content": "again"}, {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "thanks"},
    ]}])[0][0]
    ex = D.tokenize_record(tok, rec)
    S, E = "<|im_start|>", "<|im_end|>"
    want_ids, want_labels = expected_chat(tok, [
        (S, 0), ("system\nBe brief.", 0), (E, 0), ("\n", 0),
        (S, 0), ("user\nhello", 0), (E, 0), ("\n", 0),
        (S, 0), ("assistant\n", 0), ("world", 1), (E, 1), ("\n", 1),
        (S, 0), ("user\nagain", 0), (E, 0), ("\n", 0),
        (S, 0), ("tool\n42", 0), (E, 0), ("\n", 0),
        (S, 0), ("assistant\n", 0), ("thanks", 1), (E, 1), ("\n", 1),
    ])
    assert ex.input_ids == want_ids
    assert ex.labels == want_labels
    assert D.show_loss_tokens(tok, ex).count("⟦") == 2


def test_loss_on_the_completion_only(tok):
    rec = D.normalise([{"prompt": "reset password?", "completion": "Use the link."}])[0][0]
    ex = D.tokenize_record(tok, rec)
    want_ids, want_labels = expected_chat(tok, [
        ("<|im_start|>", 0), ("user\nreset password?", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0), ("Use the link.", 1), ("<|im_end|>", 1), ("\n", 1),
    ])
    assert (ex.input_ids, ex.labels) == (want_ids, want_labels)


def test_conversation_opening_with_an_answer_keeps_its_header_out_of_the_loss(tok):
    rec = D.normalise([{"messages": [{"role": "assistant", "content": "Welcome!"},
                                     {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])[0][0]
    ex = D.tokenize_record(tok, rec)
    want_ids, want_labels = expected_chat(tok, [
        ("<|im_start|>", 0), ("assistant\n", 0), ("Welcome!", 1), ("<|im_end|>", 1), ("\n", 1),
        ("<|im_start|>", 0), ("user\nhi", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant\n", 0), ("hello", 1), ("<|im_end|>", 1), ("\n", 1),
    ])
    assert (ex.input_ids, ex.labels) == (want_ids, want_labels)


def test_loss_marks_exactly_each_answer_for_any_text(tok):
    """Property: for arbitrary user/assistant text, the loss-bearing tokens decode to exactly each answer
    followed by <|im_end|> and a newline, and nothing else carries loss."""
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    text = st.text(alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz ABC?!.,:0123\n")), min_size=1,
                   max_size=40).filter(lambda t: t.strip())

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(text, text), min_size=1, max_size=3))
    def check(turns):
        msgs = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        ex = D.tokenize_record(tok, D.normalise([{"messages": msgs}])[0][0])
        segments, cur = [], []
        for t, lab in zip(ex.input_ids, ex.labels):
            if lab != -100:
                assert lab == t
                cur.append(t)
            elif cur:
                segments.append(tok.decode(cur))
                cur = []
        if cur:
            segments.append(tok.decode(cur))
        assert segments == [a + "<|im_end|>\n" for _, a in turns]

    check()


def test_pack_property():
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=80, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=32), min_size=1, max_size=40), st.integers(32, 80))
    def check(lengths, max_len):
        exs = [D.TokenizedExample(list(range(100 * i, 100 * i + n)), list(range(100 * i, 100 * i + n)))
               for i, n in enumerate(lengths)]
        rows = D.pack(exs, max_len)
        assert all(len(r.input_ids) <= max_len for r in rows)
        assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in exs for t in e.input_ids)
        # every example sits whole, in order, with positions 0..n-1
        for r in rows:
            for start in [i for i, p in enumerate(r.position_ids) if p == 0]:
                first = r.input_ids[start]
                n = lengths[first // 100]
                assert r.input_ids[start:start + n] == list(range(first, first + n))
                assert r.position_ids[start:start + n] == list(range(n))
        # best fit never leaves two rows that would fit in one
        sizes = sorted(len(r.input_ids) for r in rows)
        assert len(sizes) < 2 or sizes[0] + sizes[1] > max_len

    check()


def test_train_on_all(tok):
    rec = D.normalise(CHAT)[0][1]
    ex = D.tokenize_record(tok, rec, train_on="all")
    assert ex.labels == ex.input_ids and ex.n_loss_tokens == len(ex.input_ids) - 1  # the first is never predicted


def test_plain_rendering_without_chat_template(plain_tok):
    rec = D.normalise([{"instruction": "hello", "output": "world"}])[0][0]
    ex = D.tokenize_record(plain_tok, rec)
    prompt = plain_tok("hello\n", add_special_tokens=False)["input_ids"]
    answer = plain_tok("world", add_special_tokens=False)["input_ids"]
    eos = plain_tok.eos_token_id
    assert ex.input_ids == prompt + answer + [eos]
    assert ex.labels == [-100] * len(prompt) + answer + [eos]
    text_ex = D.tokenize_record(plain_tok, D.Record(text="hello world"))
    assert text_ex.labels == text_ex.input_ids and text_ex.input_ids[-1] == eos


def test_answer_cut_away_by_truncation_is_reported_and_dropped(tok):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    rows = [{"prompt": long_prompt, "completion": "billing"}, {"prompt": "hi", "completion": "hello world"}]
    train, _, report = D.prepare(rows, tok, cfg(max_seq_len=32))
    assert report.dropped_no_answer == 1 and report.truncated == 1 and len(train) == 1
    assert all(e.n_loss_tokens > 0 for e in train)
    assert "Dropped    1 example (<list>, index 0) whose answer was cut away entirely by truncation" in report.text()
    # (it read "1 truncated, 0 dropped" above "Dropped 1 example")
    assert ("1 of 2 examples exceed max_seq_len=32: 1 truncated (1 of them cut before their answer: dropped, below), "
            "0 dropped whole (overlong: truncate)") in report.text()
    # every answer cut away: the error says where the answers begin and what max_seq_len would keep them
    start = next(i for i, lab in enumerate(D.tokenize_record(tok, D.normalise(rows[:1])[0][0]).labels) if lab != -100)
    assert 32 < start and max(len(e.input_ids) for e in D.tokenize_records(tok, D.normalise(rows[:1])[0])) <= 128
    with pytest.raises(FtUsageError, match=rf"max_seq_len=32 cut away every answer: the answers begin after "
                                           rf"{start} to {start} tokens of prompt\. Raise max_seq_len above {start} "
                                           rf"\(--max-seq-len 128 keeps every example whole\)"):
        D.prepare(rows[:1], tok, cfg(max_seq_len=32))


def test_overlong_drop_and_partial_truncation_keeps_answer_start(tok):
    rows = [{"prompt": "hi", "completion": "The quick brown fox jumps over the lazy dog. " * 6},
            {"prompt": "hi", "completion": "ok"}]
    train, _, report = D.prepare(rows, tok, cfg(max_seq_len=24, overlong="drop"))
    assert (report.dropped_overlong, len(train)) == (1, 1)
    train, _, report = D.prepare(rows, tok, cfg(max_seq_len=24))
    assert report.truncated == 1 and len(train) == 2 and len(train[0].input_ids) == 24
    assert train[0].n_loss_tokens > 0


# ============================================================================ split, report, warnings
def test_eval_fraction_is_reproducible_with_the_seed(tok):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    recs, _ = D.normalise(rows)
    a_train, a_eval = D.split(recs, 0.25, seed=7)
    b_train, b_eval = D.split(recs, 0.25, seed=7)
    c_train, c_eval = D.split(recs, 0.25, seed=8)
    key = lambda rs: [r.messages[0]["content"] for r in rs]  # noqa: E731
    assert key(a_eval) == key(b_eval) and key(a_train) == key(b_train)
    assert key(a_eval) != key(c_eval)
    assert len(a_eval) == 10 and sorted(key(a_train) + key(a_eval)) == sorted(key(recs))
    _, evals, report = D.prepare(rows, tok, cfg(eval_fraction=0.25, seed=7))
    assert (report.train_rows, report.eval_rows, len(evals)) == (30, 10, 10)
    assert "30 train / 10 eval (eval_fraction 0.25, seed 7)" in report.text()
    _, _, report = D.prepare(rows, tok, cfg(eval_fraction=0.25), eval_src=rows[:4])  # both given: --eval wins
    assert report.train_rows == 40 and "eval_fraction 0.25 is not used" in report.text()
    _, _, big = D.prepare([{"prompt": f"q{i}", "completion": "an answer"} for i in range(1200)], tok, cfg())
    assert "1,200 rows -> 1,200 train / 0 eval" in big.text() and f"; {big.loss_tokens:,} loss-bearing" in big.text()
    assert big.loss_tokens >= 1000 and "0 of 1,200 examples exceed" in big.text()
    with pytest.raises(FtUsageError, match="leaves no training rows out of 1: give more rows, set eval_fraction: 0 "
                                           ".*--eval"):
        D.split(recs[:1], 0.5, seed=1)


def test_eval_as_a_separate_source(tok, tmp_path):
    ev = write_jsonl(tmp_path / "ev.jsonl", CHAT)
    _, evals, report = D.prepare(CHAT * 3, tok, cfg(eval_fraction=0.5), eval_src=str(ev))
    assert (report.train_rows, report.eval_rows, len(evals)) == (6, 2, 2)
    assert f"eval from {ev}" in report.text()


def test_length_stats():
    r = D.DataReport(source="s", format="text", rows=100, train_rows=100, eval_rows=0,
                     lengths=list(range(100, 0, -1)))
    assert r.stats() == {"min": 1, "median": 50, "p95": 95, "max": 100}


def test_quality_warnings():
    recs, _ = D.normalise([{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "c", "completion": " "}])
    w = " ".join(D.quality_warnings(recs))
    assert "only 3 examples" in w and "1 exact duplicate example: 1 example appears more than once (up to 2 times)" in w
    four, _ = D.normalise([{"prompt": "a", "completion": "b"}] * 4)  # said "3 duplicates (they weigh double)"
    assert "3 exact duplicate examples: 1 example appears more than once (up to 4 times)" in " ".join(
        D.quality_warnings(four))
    many, _ = D.normalise([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(120)])
    assert D.quality_warnings(many) == []


def test_examples_with_an_empty_answer_are_dropped_not_trained_to_end_the_turn(tok):
    """An empty or blank answer was kept with a warning "nothing to learn from them", yet its end-of-turn token
    carried loss: the model learned to answer those prompts with nothing. Such examples are dropped and counted;
    a tool-call turn without text is an answer."""
    rows = [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(6)]
    rows += [{"prompt": "blank", "completion": "   "}, {"prompt": "empty", "completion": ""}]
    train, _, report = D.prepare(rows, tok, cfg())
    assert len(train) == 6 and report.dropped_empty == 2
    assert "Dropped    2 examples (<list>, indexes 6, 7) with no answer to learn from (empty or blank" in report.text()
    assert all("blank" not in tok.decode(e.input_ids) and "empty" not in tok.decode(e.input_ids) for e in train)
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}] + CHAT
    train, _, report = D.prepare(chat, tok, cfg())
    assert (len(train), report.dropped_empty) == (len(CHAT), 1)
    everything, _, report = D.prepare(rows, tok, cfg(train_on="all"))  # the prompt is learned too: kept
    assert len(everything) == 8 and report.dropped_empty == 0


def test_token_statistics_describe_the_examples_that_can_train(tok):
    """The Tokens line's min/median/max (and the Length line's count) took in rows then dropped as empty: a
    one-word prompt with a blank answer set the minimum, though nothing of it trained."""
    rows = [{"prompt": f"question number {i} " * 3, "completion": f"the answer is {i} " * 3} for i in range(6)]
    kept, _, report = D.prepare(rows, tok, cfg())
    shortest = min(report.lengths)
    rows += [{"prompt": "q", "completion": "  "}, {"prompt": "q", "completion": ""}]
    train, _, report = D.prepare(rows, tok, cfg())
    assert len(train) == 6 and report.dropped_empty == 2
    assert len(report.lengths) == 6 and min(report.lengths) == shortest
    assert f"Tokens     min {shortest} / " in report.text() and "of 6 examples exceed" in report.text()


def test_a_blank_prompt_is_named_in_the_report_and_still_trains(tok, tmp_path):
    """An empty or whitespace-only prompt (a CSV's empty cell) trained silently as the answer to no question."""
    rows = [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(6)]
    rows += [{"prompt": "   ", "completion": "orphan one"}, {"prompt": "", "completion": "orphan two"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, report = D.prepare(str(path), tok, cfg())
    assert len(train) == 8  # kept: an unconditioned answer can be meant
    text = " ".join(report.warnings)
    assert "2 examples have an empty prompt (a blank user turn: " in text
    assert "d.jsonl, lines 7, 8): they train the answer to no question" in text
    assert D.places(["a.csv, row 2", "a.csv, row 5", "a.csv, row 9", "a.csv, row 11"]) == "a.csv, rows 2, 5, 9 and 1 more"
    assert D.places(["<list>, row 3"]) == "<list>, row 3" and D.places(["x", "y"]) == "x; y"
    _, _, fine = D.prepare(rows[:6], tok, cfg())
    assert not any("empty prompt" in w for w in fine.warnings)
    # a spreadsheet's blank rows are dropped, and still counted in the rows named after them (they were not)
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("prompt,completion\nq1,a1\n,\n,\nq2,a2\n,an answer to nothing\nq3,a3\n")
    _, _, report = D.prepare(str(sheet), tok, cfg())
    assert "sheet.csv, line 6): it trains the answer to no question" in " ".join(report.warnings)
    # named by the line it starts on, as the file's refusals name theirs: blank lines and a quoted cell's line
    # breaks counted too (it said 'row 3' for what is line 7)
    sheet.write_text('prompt,completion\nq1,a1\n\n"a prompt\nover two lines",a2\n\n,an answer to nothing\nq3,a3\n')
    _, _, report = D.prepare(str(sheet), tok, cfg())
    assert "sheet.csv, line 7): it trains the answer to no question" in " ".join(report.warnings)


def test_truncate_prompt_keeps_the_answer_and_both_ends_of_the_prompt(tok):
    """Long documents with short answers (summaries, questions over a text) were dropped whole past max_seq_len:
    truncation cut the answer away."""
    doc = {"prompt": "Summarise this. " + " ".join(f"w{i}" for i in range(300)) + " Now: in one line?",
           "completion": "It lists words."}
    rows = [doc] + [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(5)]
    train, _, report = D.prepare(rows, tok, cfg(max_seq_len=64))  # the default cuts the end: the answer goes
    assert len(train) == 5 and report.dropped_no_answer == 1
    assert "or set overlong: truncate_prompt to keep their answers" in report.text()
    train, _, report = D.prepare(rows, tok, cfg(max_seq_len=64, overlong="truncate_prompt"))
    assert len(train) == 6 and report.prompt_cut == 1 and report.dropped_no_answer == 0
    whole = D.tokenize_records(tok, D.normalise([doc])[0], "answers")[0]
    cut = max(train, key=lambda e: len(e.input_ids))
    assert len(cut.input_ids) == 64
    first = next(i for i, lab in enumerate(cut.labels) if lab != -100)
    assert cut.labels[first:] == whole.labels[-(64 - first):]  # the whole answer, with its loss
    assert cut.input_ids[:first // 2] == whole.input_ids[:first // 2]  # the prompt's start: template, instruction
    text = tok.decode(cut.input_ids)
    assert "Summarise this." in text and "Now: in one line?" in text and "w150" not in text
    assert "1 kept with the middle of their prompt cut, 0 truncated" in report.text()
    # an answer longer than max_seq_len leaves too little prompt: its end is cut as by truncate
    long_answer = {"prompt": "Say it", "completion": " ".join(f"a{i}" for i in range(200))}
    train, _, report = D.prepare([long_answer] * 2, tok, cfg(max_seq_len=64, overlong="truncate_prompt"))
    assert report.truncated == 2 and report.prompt_cut == 0 and "Say it" in tok.decode(train[0].input_ids)


def test_report_text_has_everything(tok):
    _, _, report = D.prepare(CHAT * 5, tok, cfg(max_seq_len=64, eval_fraction=0.2, seed=3))
    text = report.text()
    lengths = sorted(report.lengths)
    assert f"Tokens     min {lengths[0]} / median " in text and f"max {lengths[-1]} per example" in text
    assert "chat format, 10 rows -> 8 train / 2 eval" in text
    assert "Rendering  the tokenizer's chat template; loss on the answers only" in text
    assert "5 exact duplicate examples" in text or "exact duplicate" in text
    assert "Example    (text between ⟦ and ⟧ carries loss)" in text and "⟦" in text


def _mixed_records():
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": "hello " * (1 + i % 3)},
                          {"role": "user", "content": "again?"}, {"role": "assistant", "content": f"yes {i}"}]}
            for i in range(7)]
    rows += [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(6)]
    recs = D.normalise(rows[:7])[0] + D.normalise(rows[7:])[0] + D.normalise([{"text": "plain words here"}])[0]
    return recs


@pytest.mark.parametrize("train_on", ["answers", "all"])
@pytest.mark.parametrize("which", ["chat-template", "no-template"])
def test_batched_tokenisation_equals_one_record_at_a_time(tok, plain_tok, which, train_on, monkeypatch):
    """tokenize_records encodes the rendered texts in batches (chunks of ENCODE_BATCH): the same ids and
    labels as tokenize_record on each record, multi-turn chats, prompt/completion and text alike."""
    t = tok if which == "chat-template" else plain_tok
    D.forget_tokenized()
    monkeypatch.setattr(D, "ENCODE_BATCH", 4)  # several chunks, and a short last one
    recs = _mixed_records()
    got = D.tokenize_records(t, recs, train_on)
    want = [D.tokenize_record(t, r, train_on) for r in recs]
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    assert all(e.n_loss_tokens > 0 for e in got) and any(-100 in e.labels for e in got) == (train_on == "answers")


def test_tokenised_records_are_remembered_until_the_data_or_tokenizer_changes(tok, monkeypatch):
    D.forget_tokenized()
    calls = []
    real_call = type(tok).__call__

    def counting(self, *a, **kw):
        calls.append(1)
        return real_call(self, *a, **kw)

    monkeypatch.setattr(type(tok), "__call__", counting)
    recs = _mixed_records()
    first = D.tokenize_records(tok, recs)
    n = len(calls)
    assert n > 0
    again = D.tokenize_records(tok, list(recs))  # the same records, as a new list: a cell run again
    assert len(calls) == n and [e.input_ids for e in again] == [e.input_ids for e in first]
    assert again is not first  # a list of its own: callers may drop or reorder examples
    D.tokenize_records(tok, recs, train_on="all")  # another labelling: tokenised again
    assert len(calls) > n
    n = len(calls)
    changed = recs[:-1] + D.normalise([{"text": "other words"}])[0]
    D.tokenize_records(tok, changed)
    assert len(calls) > n
    for k in range(D.TOKENIZED_CACHE_ENTRIES):  # more record lists than the cache keeps
        D.tokenize_records(tok, recs[:k + 1])
    assert len(D._TOKENIZED) == D.TOKENIZED_CACHE_ENTRIES  # the oldest went
    n = len(calls)
    D.forget_tokenized()
    D.tokenize_records(tok, changed)
    assert len(calls) > n


# ============================================================================ packing
def _examples(tok, n=9, train_on="answers"):
    rows = [{"prompt": f"Question {i}: the quick brown fox?", "completion": "Answer: jumps " * (1 + i % 4)}
            for i in range(n)]
    recs, _ = D.normalise(rows)
    return D.tokenize(recs, tok, 512, train_on)


def test_pack_layout(tok):
    exs = _examples(tok)
    packed = D.pack(exs, 128)
    assert len(packed) < len(exs)
    assert all(len(r.input_ids) <= 128 for r in packed)
    assert sum(len(r.input_ids) for r in packed) == sum(len(e.input_ids) for e in exs)
    assert sorted(t for r in packed for t in r.input_ids) == sorted(t for e in exs for t in e.input_ids)
    for r in packed:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert starts[0] == 0
        assert all(r.labels[s] == -100 for s in starts)  # nothing learns to predict the next example's start
        assert all(r.position_ids[i + 1] in (0, r.position_ids[i] + 1) for i in range(len(r.position_ids) - 1))


def _sum_loss(model, batch):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum").item(), int((labels[:, 1:] != -100).sum())


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return {impl: AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
            for impl in ("sdpa", "eager")}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on", ["answers", "all"])
def test_packed_loss_equals_unpacked_loss(tok, tiny_models, impl, train_on):
    import torch

    model = tiny_models[impl]
    exs = _examples(tok, train_on=train_on)
    total, count = 0.0, 0
    for e in exs:  # one at a time: nothing else to attend to
        s, c = _sum_loss(model, {"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels])})
        total, count = total + s, count + c
    packed = D.pack(exs, 128)
    assert len(packed) < len(exs) and max(len(p.input_ids) for p in packed) > 64  # really packed
    for flatten in (False, True):
        batch = D.collate_packed([p.features() for p in packed], tok.pad_token_id, flatten=flatten)
        s, c = _sum_loss(model, batch)
        assert c == count
        assert s == pytest.approx(total, rel=1e-4)
        # the training loss path (core.speed's chunked loss, which runs the decoder itself) keeps them apart too
        from ft_magics.core.speed import causal_lm_chunked_loss

        with torch.no_grad():
            mean = causal_lm_chunked_loss(model, batch).item()
        assert mean * count == pytest.approx(total, rel=1e-4)
        # and so does the trainer's attention on the CPU (its own causal attention must keep the packed rows'
        # examples apart, or hand their block mask to SDPA)
        from ft_magics.core import speed

        real, docs_seen = speed.packed_documents, []

        def recording(*a, **kw):
            docs = real(*a, **kw)
            docs_seen.append(docs is not None)
            return docs

        speed.packed_documents = recording
        try:
            with torch.no_grad(), speed.attention_for(batch, model):
                mean = speed.causal_lm_chunked_loss(model, batch).item()
        finally:
            speed.packed_documents = real
        assert mean * count == pytest.approx(total, rel=1e-4)
        if impl == "sdpa":  # the packed mask is taken by ft_magics' own attention, with the documents
            assert docs_seen and all(docs_seen)
    # the control: the same rows without position_ids (examples see each other) give another loss
    leak, _ = _sum_loss(model, {"input_ids": batch["input_ids"], "labels": batch["labels"], "use_cache": False})
    assert abs(leak - total) > 1e-3 * total


def test_packing_check_refuses_attention_that_cannot_isolate(tok, tiny_models):
    import torch

    class NoPositions(torch.nn.Module):
        """A model whose attention ignores position_ids (as some custom implementations do)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = type("C", (), {"_attn_implementation": "custom_kernel"})()

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, use_cache=False)

    assert D.check_packing_isolation(tiny_models["sdpa"], tok) == (True, "sdpa")
    assert D.check_packing_isolation(NoPositions(tiny_models["sdpa"]), tok) == (False, "custom_kernel")
    with pytest.raises(FtUsageError, match="attention implementation \\('custom_kernel'\\) lets packed examples "
                                           "attend to each other.*Set packing: false"):
        D.prepare(CHAT * 3, tok, cfg(packing=True), model=NoPositions(tiny_models["sdpa"]))
    train, _, report = D.prepare(CHAT * 3, tok, cfg(packing=True, max_seq_len=128), model=tiny_models["sdpa"])
    assert len(train) < 6 and all(t.position_ids is not None for t in train)
    assert "examples kept apart by sdpa attention with position_ids restarting" in report.text()


# ============================================================================ through the session and the magic
def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad", ["malformed", "missing_field", "unknown_role", "missing_variable", "empty"])
def test_bad_data_leaves_the_model_untouched(tiny_session, tmp_path, bad):
    import torch

    paths = {
        "malformed": tmp_path / "m.jsonl", "missing_field": tmp_path / "f.jsonl",
        "unknown_role": tmp_path / "r.jsonl", "empty": tmp_path / "e.jsonl",
    }
    paths["malformed"].write_text(json.dumps(CHAT[0]) + "\n{oops\n")
    write_jsonl(paths["missing_field"], [{"q": "q", "reply": "a"}])
    write_jsonl(paths["unknown_role"], [{"messages": [{"role": "narrator", "content": "x"}]}])
    paths["empty"].write_text("")
    src = "no_such_var" if bad == "missing_variable" else str(paths[bad])
    model = tiny_session.model
    before = _state(model)
    with pytest.raises(FtUsageError):
        tiny_session.train("bot", src, {"max_steps": 2, "batch_size": 2, "packing": True})
    assert tiny_session.model is model and not hasattr(model, "peft_config")
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not (tiny_session.adapters_dir / "bot").exists() and not tiny_session.adapters


def test_lora_train_prints_the_data_report(shell, tiny_model_dir, capsys):
    from IPython.core.error import UsageError

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    capsys.readouterr()
    shell.user_ns["qa"] = [{"q": f"reset password {i}?", "reply": "Use the reset link."} for i in range(10)]
    with pytest.raises(UsageError, match='--map "q=prompt,reply=completion"'):
        shell.run_cell_magic("lora_train", "bot --data qa --no-widgets", "max_steps: 2\n")
    assert not Path("adapters/bot").exists()
    shell.run_cell_magic(
        "lora_train", 'bot --data qa --map "q=prompt,reply=completion" --eval-fraction 0.2 --seed 5 '
        "--max-steps 2 --batch-size 2 --no-widgets", "max_seq_len: 64\n")
    out = capsys.readouterr().out
    assert "variable qa: prompt-completion format, 10 rows -> 8 train / 2 eval (eval_fraction 0.2, seed 5)" in out
    assert "Rendering  the tokenizer's chat template; loss on the answers only" in out
    assert "Tokens     min " in out and " / median " in out and " / p95 " in out
    assert "0 of 8 examples exceed max_seq_len=64" in out
    assert "Warning    only 8 examples" in out
    assert "⟦Use the reset link.<|im_end|>\n  ⟧" in out
    assert (Path("adapters/bot") / "adapter_config.json").exists()


def test_lora_train_txt_mode_flag_and_packing(shell, tiny_model_dir, capsys, tmp_path):
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    (tmp_path / "notes.txt").write_text("\n".join(f"hello world {i}, thanks!" for i in range(12)))
    capsys.readouterr()
    shell.run_cell_magic("lora_train", f"notes --data {tmp_path / 'notes.txt'} --txt-mode lines --no-widgets",
                         "max_steps: 2\nbatch_size: 2\nmax_seq_len: 64\npacking: true\n")
    out = capsys.readouterr().out
    assert "text format, 12 rows -> 12 train / 0 eval" in out
    assert "Packing    12 examples -> " in out and "kept apart by sdpa attention" in out
    rows = int(out.split("Packing    12 examples -> ")[1].split(" rows")[0])
    assert rows < 12 and f"Training 'notes': 12 examples packed into {rows} rows, 2 steps" in out
    assert (Path("adapters/notes") / "adapter_config.json").exists()
    shell.run_cell_magic("lora_train", f"doc --data {tmp_path / 'notes.txt'} --txt-mode document --no-widgets",
                         "max_steps: 1\nmax_seq_len: 512\n")
    out = capsys.readouterr().out
    assert "text format, 1 row -> 1 train" in out and "Training 'doc': 1 example, 1 step on" in out


def test_glob_pattern_reads_every_matching_file_in_name_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "b.jsonl", CHAT[1:])
    write_jsonl(tmp_path / "parts" / "a.jsonl", CHAT[:1])
    (tmp_path / "parts" / "c.md").write_text("not data")
    rows, desc = D.load_rows("parts/*.jsonl")
    assert desc == "parts/*.jsonl" and len(rows) == 2
    assert rows[0] == CHAT[0] and rows.locs[0].startswith("parts/a.jsonl") and rows.locs[1].startswith("parts/b.jsonl")
    assert len(D.load_rows("**/b.jsonl")[0]) == 1  # recursive
    with pytest.raises(FtUsageError, match=r"the pattern 'parts/\*\.csv' matches no data file"):
        D.load_rows("parts/*.csv")
    with pytest.raises(FtUsageError, match=r"1 other paths match, none a"):
        D.load_rows("parts/*.md")


def test_hub_dataset_id_goes_through_load_dataset_and_offline_failure_says_what_to_do(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "_hub_unreachable", lambda: None)  # the Hub as if online: load_dataset is faked
    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        if name == "owner/offline":
            raise ConnectionError("Couldn't reach 'owner/offline' on the Hub (LocalEntryNotFoundError)")
        return datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}] * 3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, desc = D.load_rows("owner/name")
    assert calls[-1] == ("owner/name", "train") and len(rows) == 3 and desc == "hub:owner/name"
    D.load_rows("owner/name:test", max_rows=2)
    assert calls[-1] == ("owner/name", "test[:2]")
    with pytest.raises(FtUsageError, match=r"not a local file or folder, and loading it as a Hugging Face Hub "
                                           r"dataset failed: ConnectionError: Couldn't reach.*save_to_disk"):
        D.load_rows("owner/offline")
    # a local path wins over the Hub, and a missing file with a data suffix stays a missing file
    n = len(calls)
    with pytest.raises(FtUsageError, match=r"data file 'owner/data\.jsonl' does not exist"):
        D.load_rows("owner/data.jsonl")
    (tmp_path / "local").mkdir()
    write_jsonl(tmp_path / "local" / "x.jsonl", CHAT)
    assert len(D.load_rows("local/x.jsonl")[0]) == 2 and len(calls) == n


def test_text_format_notes_an_unused_answer_like_column(tok, tmp_path):
    src = write_jsonl(tmp_path / "cls.jsonl", [{"text": f"great movie {i}", "label": i % 2} for i in range(4)])
    _, _, report = D.prepare(str(src), tok, TrainConfig.from_dict({"max_seq_len": 64}))
    note = [w for w in report.warnings if "is not used" in w]
    assert note and "--map \"text=prompt,label=completion\"" in note[0]
    assert "loss on every token" in report.text()  # text format: nothing is an answer
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": f"great movie {i}", "id": i} for i in range(4)])
    _, _, report = D.prepare(str(plain), tok, TrainConfig.from_dict({"max_seq_len": 64}))
    assert not [w for w in report.warnings if "is not used" in w]


def test_byte_order_marks_crlf_and_a_json_array_named_jsonl_are_read(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode() + b"\r\n")
    assert D.load_rows(str(bom))[0] == rows
    arr = tmp_path / "arr.jsonl"
    arr.write_text(json.dumps(rows, indent=1))
    assert D.load_rows(str(arr))[0] == rows
    js = tmp_path / "bom.json"
    js.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert D.load_rows(str(js))[0] == rows
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbfHello there.\nSecond line.\n")
    assert D.load_rows(str(txt), txt_mode="lines")[0][0] == {"text": "Hello there."}
    broken = tmp_path / "broken.json"  # a broken array over several lines: an error, not an endless retry
    broken.write_text('[\n{"prompt": "a", "completion": "b"},\n{"prompt": \n')
    with pytest.raises(FtUsageError, match="not valid JSON"):
        D.load_rows(str(broken))


def test_chats_without_an_assistant_message_say_what_is_missing(tok, tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "u"}]}] * 3)
    with pytest.raises(FtUsageError, match=r"no example has an answer to learn from: in the chat format the loss is "
                                           r"on the assistant messages, and every one of the 3 examples has none"):
        D.prepare(str(src), tok, TrainConfig.from_dict({"max_seq_len": 64}))
    _, _, report = D.prepare(str(src), tok, TrainConfig.from_dict({"max_seq_len": 64, "train_on": "all"}))
    assert report.train_rows == 3


def test_a_format_setting_that_does_not_fit_names_the_format_the_rows_are_in():
    with pytest.raises(FtUsageError, match=r"the chat format needs field\(s\) 'messages'; this row has completion, "
                                           r"prompt\. This row is in the prompt-completion format: drop the format "
                                           r"setting \(auto detects it\) or use format: prompt-completion"):
        D.normalise([{"prompt": "p", "completion": "c"}], fmt="chat")
    with pytest.raises(FtUsageError, match=r"This row is in the alpaca format"):
        D.normalise([{"instruction": "i", "input": "", "output": "o"}], fmt="text")
    with pytest.raises(FtUsageError, match=r"This row is in the prompt-completion format"):  # a well-known pair
        D.normalise([{"question": "q", "answer": "a"}], fmt="chat")
    with pytest.raises(FtUsageError, match=r"text_field \(--text-field\) names column\(s\) 'body' that do not exist"):
        D.normalise([{"text": "t"}], text_field="body")


def test_the_suggested_map_is_in_the_datas_own_column_names_when_a_map_was_given():
    with pytest.raises(FtUsageError, match=r'--map "instruction=prompt,output=completion"'):
        D.normalise([{"instruction": "i", "input": "", "output": "o"}], column_map="instruction=prompt")


# ============================================================================ preference pairs, nested columns, tool calls
def test_preference_pairs_are_named_and_the_map_trains_on_the_chosen_answers(tok, tmp_path):
    plain = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": f"say {i}", "chosen": f"{i}", "rejected": "no"}
                                                  for i in range(4)])
    with pytest.raises(FtUsageError, match=r"preference pairs \(chosen, prompt, rejected\).*would not use 'rejected'"
                                           r".*--map \"prompt=prompt,chosen=completion\""):
        D.prepare(str(plain), tok, cfg())
    train, _, report = D.prepare(str(plain), tok, cfg(map="prompt=prompt,chosen=completion"))
    assert len(train) == 4 and report.format == "prompt-completion"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chats = write_jsonl(tmp_path / "conv.jsonl", [{"chosen": conv, "rejected": conv[:1] + [
        {"role": "assistant", "content": "go away"}]}] * 2)
    # before: the suggestion was --map "chosen=prompt,rejected=completion", training on the rejected answers
    with pytest.raises(FtUsageError, match=r'preference pairs.*--map "chosen=messages"'):
        D.prepare(str(chats), tok, cfg())
    train, _, report = D.prepare(str(chats), tok, cfg(map="chosen=messages"))
    assert report.format == "chat" and "hello" in tok.decode([t for t in train[0].labels if t != -100])


def test_trl_conversational_pairs_with_a_prompt_column_are_pointed_at_prompt_and_completion(tok, tmp_path):
    user = [{"role": "user", "content": "How do I reset my password?"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": f"Use the link {i}."}],
             "rejected": [{"role": "assistant", "content": "No idea."}]} for i in range(4)]
    data = write_jsonl(tmp_path / "pref_conv.jsonl", rows)
    # before: --map "chosen=messages", which trained the answers with no question before them
    with pytest.raises(FtUsageError, match=r'--map "prompt=prompt,chosen=completion"'):
        D.prepare(str(data), tok, cfg())
    train, _, report = D.prepare(str(data), tok, cfg(map="prompt=prompt,chosen=completion"))
    assert "How do I reset my password?" in tok.decode(train[0].input_ids)
    assert not [w for w in report.warnings if "are not used" in w]
    # whole conversations, no prompt column: chosen=messages, and no note that 'chosen' is unused
    conv = [{"chosen": user + [{"role": "assistant", "content": "Use the link."}],
             "rejected": user + [{"role": "assistant", "content": "No."}]}] * 2
    implicit = write_jsonl(tmp_path / "implicit.jsonl", conv)
    with pytest.raises(FtUsageError, match=r'--map "chosen=messages"'):
        D.prepare(str(implicit), tok, cfg())
    _, _, report = D.prepare(str(implicit), tok, cfg(map="chosen=messages"))
    assert not [w for w in report.warnings if "not used" in w]


def test_conversations_written_as_json_text_in_a_csv_are_read_as_conversations(tok, tmp_path):
    import csv

    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I reset my password?"}]
    with open(tmp_path / "pc.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        for i in range(3):
            w.writerow([json.dumps(user), json.dumps([{"role": "assistant", "content": f"Use the link {i}."}])])
    train, _, report = D.prepare(str(tmp_path / "pc.csv"), tok, cfg())
    text = tok.decode(train[0].input_ids)
    assert '"role"' not in text and "Be brief." in text and "How do I reset my password?" in text
    assert tok.decode([t for t in train[0].labels if t != -100]).startswith("Use the link 0.")
    with open(tmp_path / "pairs.csv", "w", newline="") as f:  # TRL's implicit-prompt pairs, saved to a table
        w = csv.writer(f)
        w.writerow(["chosen", "rejected"])
        for i in range(3):
            w.writerow([json.dumps(user + [{"role": "assistant", "content": f"Use the link {i}."}]),
                        json.dumps(user + [{"role": "assistant", "content": "No."}])])
    pairs, _, report = D.prepare(str(tmp_path / "pairs.csv"), tok, cfg(objective="dpo"))
    assert len(pairs) == 3 and "How do I reset my password?" in tok.decode(pairs[0].chosen.input_ids)
    assert '"role"' not in tok.decode(pairs[0].chosen.input_ids)
    # a cell that only looks like a list stays text
    assert D.conversation_cell('[1, 2] and "role"') == '[1, 2] and "role"'
    assert D.conversation_cell('[{"role": "user"') == '[{"role": "user"'


def test_a_text_column_beside_alpaca_rows_is_named_as_unused(tok, tmp_path):
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"{i}", "text": f"### Instruction: Say {i} ### {i}"}
            for i in range(3)]
    _, _, report = D.prepare(str(write_jsonl(tmp_path / "alpaca.jsonl", rows)), tok, cfg())
    note = [w for w in report.warnings if "column 'text' is not used" in w]
    assert report.format == "alpaca" and note and "format: text" in note[0]
    _, _, report = D.prepare(str(write_jsonl(tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "text"}
                                                                         for r in rows])), tok, cfg())
    assert not [w for w in report.warnings if "not used" in w]


def test_the_small_set_warning_counts_the_examples_that_train_after_the_drops(tok, tmp_path):
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}" if i % 4 else ""} for i in range(120)]  # 30 without an answer
    _, _, report = D.prepare(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, cfg())
    few = [w for w in report.warnings if "usual guidance" in w]
    assert few == ["only 90 examples train (of 120 rows read; the others were dropped, see above); the usual guidance "
                   "is 100-500 high-quality examples at the least."]
    _, _, report = D.prepare(str(write_jsonl(tmp_path / "e.jsonl", [r for r in rows if r["completion"]][:20])), tok,
                             cfg())
    assert [w for w in report.warnings if "usual guidance" in w] == [
        "only 20 examples train; the usual guidance is 100-500 high-quality examples at the least."]


def test_files_from_windows_and_spreadsheets_load_or_say_the_fix_that_keeps_their_characters(tmp_path):
    """A tester's files: the Latin-1 advice garbled a Windows file's quotes and euro signs into control characters,
    one bad byte got advice that garbled every other accent, a UTF-16 .txt table trained as plain text, Excel's
    sep=; line became a column, a 140k-character TSV cell was refused, and Windows line ends stayed in cells."""
    rows = [(f"Question {i}: café?", f"Answer {i}: “quoted” €5 — ok") for i in range(6)]
    (tmp_path / "win.csv").write_bytes(("prompt,completion\n" + "".join(f'"{p}","{c}"\n' for p, c in rows))
                                       .encode("cp1252"))
    with pytest.raises(FtUsageError, match=r"Windows-1252 .*encoding='cp1252'"):
        D.load_rows(str(tmp_path / "win.csv"))
    good = ("prompt,completion\n" + "".join(f'"{p}","{c}"\n' for p, c in rows)).encode()
    (tmp_path / "onebad.csv").write_bytes(good.replace("Question 3: café".encode(), "Question 3: café".encode("latin-1")))
    with pytest.raises(FtUsageError, match=r"onebad.csv, line 5: not UTF-8 text .*while the rest of the file is UTF-8"
                                           r".*do not convert the whole file"):
        D.load_rows(str(tmp_path / "onebad.csv"))
    (tmp_path / "excel.txt").write_text("prompt\tcompletion\nhi\tthere\n", encoding="utf-16")
    with pytest.raises(FtUsageError, match=r"UTF-16 text.*with_suffix\('\.tsv'\).*named \.tsv"):
        D.load_rows(str(tmp_path / "excel.txt"))
    (tmp_path / "nobom.txt").write_bytes("hello there\nmore text\n".encode("utf-16-le"))  # valid UTF-8, NULs and all
    with pytest.raises(FtUsageError, match=r"UTF-16 text.*encoding='utf-16-le'"):
        D.load_rows(str(tmp_path / "nobom.txt"))
    (tmp_path / "sep.csv").write_text("sep=;\nprompt;completion\nQ0;A0, ok\nQ1;A1, ok\n")
    (tmp_path / "semi.csv").write_text("question;answer, short\nQ0;A0, ok\nQ1;A1, ok\n")
    assert D.load_rows(str(tmp_path / "sep.csv"))[0] == [{"prompt": "Q0", "completion": "A0, ok"},
                                                         {"prompt": "Q1", "completion": "A1, ok"}]
    assert D.load_rows(str(tmp_path / "semi.csv"))[0][0] == {"question": "Q0", "answer, short": "A0, ok"}
    (tmp_path / "nan.jsonl").write_text('{"prompt": "q", "completion": "a"}\n{"prompt": NaN, "completion": "x"}\n')
    with pytest.raises(FtUsageError, match=r"nan\.jsonl, line 2: NaN is not a JSON value"):  # (a blank prompt)
        D.load_rows(str(tmp_path / "nan.jsonl"))
    (tmp_path / "inf.json").write_text('[{"prompt": "q", "completion": -Infinity}]')  # trained the answer '-inf'
    with pytest.raises(FtUsageError, match=r"inf\.json: -Infinity is not a JSON value.*Write null"):
        D.load_rows(str(tmp_path / "inf.json"))
    (tmp_path / "extra.csv").write_text("sep=;\nprompt;completion\nQ0;A0\nQ1;A1;more\n")  # the hint in its separator
    with pytest.raises(FtUsageError, match=r"extra\.csv, line 4: 3 fields .*contains ';' \(\"like; this\"\)"):
        D.load_rows(str(tmp_path / "extra.csv"))
    (tmp_path / "long.tsv").write_text("prompt\tcompletion\n" + "x" * 140_000 + "\tA\n")
    assert len(D.load_rows(str(tmp_path / "long.tsv"))[0][0]["prompt"]) == 140_000
    (tmp_path / "bomkey.jsonl").write_text(json.dumps({"\ufeffprompt": "q", "completion": "a"}) + "\n")  # DictReader's
    assert load(str(tmp_path / "bomkey.jsonl"))[1] == "prompt-completion"  # key of an Excel CSV: was no format
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "moved.jsonl")
    with pytest.raises(FtUsageError, match=r"gone.jsonl' is a link to .*moved.jsonl, which does not exist"):
        D.load_rows(str(tmp_path / "gone.jsonl"))
    (tmp_path / "twins.csv").write_text("Prompt,prompt,completion\nq0,Q0,a0\n")
    _, _, report = D.prepare(str(tmp_path / "twins.csv"), build_tiny_tokenizer(), cfg())
    assert "column 'Prompt' is not used: 'prompt' is read as the prompt (the two differ only in letter case" in \
        " ".join(report.warnings)
    (tmp_path / "crlf.csv").write_bytes(b'prompt,completion\r\n"Line one\r\nLine two","A"\r\n,\r\n,\r\n"Q","B"\r\n')
    assert D.load_rows(str(tmp_path / "crlf.csv"))[0] == [{"prompt": "Line one\nLine two", "completion": "A"},
                                                          {"prompt": "Q", "completion": "B"}]  # blank rows: none


def test_json_spread_over_lines_or_lines_in_a_json_file_are_read_or_named_by_the_right_line(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    (tmp_path / "pretty.jsonl").write_text("\n".join(json.dumps(r, indent=2) for r in rows) + "\n")  # jq's output
    assert D.load_rows(str(tmp_path / "pretty.jsonl"))[0] == rows
    (tmp_path / "obj.jsonl").write_text(json.dumps({"train": rows}, indent=2))
    assert D.load_rows(str(tmp_path / "obj.jsonl"))[0] == rows
    lines = [json.dumps(r) for r in rows * 3]
    lines[6] = lines[6][:12]
    (tmp_path / "lines.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(FtUsageError, match=r"lines.json, line 7: not valid JSON .*holds JSON lines"):
        D.load_rows(str(tmp_path / "lines.json"))
    (tmp_path / "cut.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FtUsageError, match=r"cut.jsonl, line 7: not valid JSON \(Unterminated string"):
        D.load_rows(str(tmp_path / "cut.jsonl"))


def test_a_column_of_nested_objects_is_not_suggested_as_text(tok, tmp_path):
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"data": {"prompt": "a", "completion": "b"}}] * 2)
    with pytest.raises(FtUsageError, match="cannot tell the dataset format") as err:
        D.prepare(str(nested), tok, cfg())
    assert "--map \"data=text\"" not in str(err.value)
    convs = write_jsonl(tmp_path / "dialog.jsonl", [{"dialog": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "yo"}]}] * 2)
    with pytest.raises(FtUsageError, match='--map "dialog=messages"'):
        D.prepare(str(convs), tok, cfg())


TOOL_ROWS = [{"messages": [
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."}]}] * 2


def _tool_template(tok, lists_tools: bool, writes_calls: bool):
    """A copy of ``tok`` whose ChatML-style template may print the tool list up front and may write calls."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = (
        ("{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}" if lists_tools else "")
        + "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
        + ("{% for c in m.get('tool_calls') or [] %}<call>{{ c['function']['name'] }}</call>{% endfor %}"
           if writes_calls else "")
        + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return t


def test_tool_calls_reach_a_template_that_writes_them_and_are_refused_by_one_that_drops_them(tok, tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", TOOL_ROWS)
    # the tiny ChatML template writes only role and content: the call would be an empty, loss-bearing turn
    with pytest.raises(FtUsageError, match=r"tools.jsonl, line 1: an assistant turn calls 'get_weather' .*"
                                           r"does not write tool calls.*empty answer"):
        D.prepare(str(path), tok, cfg())
    # a template that prints the tool list up front but drops the calls: the name in the list is no call
    listed = write_jsonl(tmp_path / "listed.jsonl", [dict(r, tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]) for r in TOOL_ROWS])
    with pytest.raises(FtUsageError, match="does not write tool calls"):
        D.prepare(str(listed), _tool_template(tok, lists_tools=True, writes_calls=False), cfg())
    with_tools = _tool_template(tok, lists_tools=False, writes_calls=True)
    train, _, _ = D.prepare(str(path), with_tools, cfg())
    learned = with_tools.decode([t for t in train[0].labels if t != -100])
    assert "get_weather" in learned and "It is sunny." in learned and "sunny" not in learned.replace("It is sunny.", "")


def test_sharegpt_function_calls_are_tool_calls_where_the_template_writes_them_and_json_text_elsewhere(tok, tmp_path):
    """ShareGPT's function_call turns (LLaMA-Factory, Glaive) trained as their JSON text even under a template with
    a tool-call format of its own (the model learned the wrong one), and a template that drops the tools' schemas
    (the demo's) left them out without a word."""
    schema = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})
    rows = [{"conversations": [{"from": "human", "value": "weather in Oslo?"}, {"from": "function_call", "value": call},
                               {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}],
             "tools": json.dumps(schema)}] * 3
    path = write_jsonl(tmp_path / "fc.jsonl", rows)
    writes = _tool_template(tok, lists_tools=True, writes_calls=True)
    train, _, report = D.prepare(str(path), writes, cfg())
    learned = writes.decode([t for t in train[0].labels if t != -100])
    assert "<call>get_weather</call>" in learned and '"arguments"' not in learned and "It is sunny." in learned
    assert '"get_weather"' in writes.decode(train[0].input_ids)  # the schema, in the prompt
    assert not [w for w in report.warnings if "tool" in w]
    for t in (tok, _tool_template(tok, lists_tools=False, writes_calls=False)):  # no tool format: the text, as written
        train, _, report = D.prepare(str(path), t, cfg())
        learned = t.decode([x for x in train[0].labels if x != -100])
        assert call in learned and "It is sunny." in learned
        assert any(w.startswith("3 examples with tools: this model's chat template does not write the tools' "
                                "schemas") for w in report.warnings), report.warnings
        assert any(w.startswith("3 examples with function_call turns") for w in report.warnings)
    # a call written as an object reads as one written as JSON text; a value that is no call stays the turn's text,
    # counted in the report
    as_object = [{"conversations": [dict(m, value=json.loads(m["value"])) if m["from"] == "function_call" else m
                                    for m in rows[0]["conversations"]]}]
    assert D.normalise(as_object)[0][0].messages[1]["tool_calls"] == D.normalise(rows[:1])[0][0].messages[1]["tool_calls"]
    odd = [{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "lookup(x)"},
                              {"from": "gpt", "value": "done"}]}] * 2
    train, _, report = D.prepare(odd, tok, cfg())
    assert "lookup(x)" in tok.decode([x for x in train[0].labels if x != -100])
    assert any(w.startswith("2 examples with function_call turns that are not a call as JSON") for w in report.warnings)


def test_openai_legacy_function_call_is_a_tool_call_and_developer_is_the_system_role(tok, tmp_path):
    """A 'function_call' turn (OpenAI's older format) was read as an empty assistant answer: it trained the model
    to end its turn at once. The 'developer' role (OpenAI's newer system message) refused the whole dataset."""
    legacy = [{"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}]}] * 2
    recs, _ = D.normalise(legacy)
    assert [m["role"] for m in recs[0].messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert recs[0].messages[2]["tool_calls"] == [{"type": "function", "function": legacy[0]["messages"][2]["function_call"]}]
    path = write_jsonl(tmp_path / "legacy.jsonl", legacy)
    with pytest.raises(FtUsageError, match="does not write tool calls"):  # as a tool_calls turn is refused
        D.prepare(str(path), tok, cfg())
    with_tools = _tool_template(tok, lists_tools=False, writes_calls=True)
    train, _, _ = D.prepare(str(path), with_tools, cfg())
    assert "<call>get_weather</call>" in with_tools.decode([t for t in train[0].labels if t != -100])
    bad = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "function_call": "x"}]}]
    with pytest.raises(FtUsageError, match="message 1: function_call must be an object with 'name' and 'arguments'"):
        D.normalise(bad)


def test_a_system_field_beside_messages_joins_the_conversation():
    """A top-level 'system' field was used for ShareGPT, prompt/completion and alpaca rows, and silently dropped
    for chat 'messages' rows."""
    rows = [{"system": "Be terse.", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"system": "Ignored.", "messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}]}]
    recs, fmt = D.normalise(rows)
    assert fmt == "chat" and recs[0].messages[0] == {"role": "system", "content": "Be terse."}
    assert [m["content"] for m in recs[1].messages] == ["Own.", "hi", "yo"]  # the conversation's own system wins


def ev_rows(examples, tok):
    """The user turn of each tokenised example (prompt/completion rows), decoded: which rows these are."""
    import re

    return [{"content": re.search(r"user\n(.*?)<\|im_end\|>", tok.decode(e.input_ids)).group(1)} for e in examples]


def test_a_dataset_dict_s_held_out_split_becomes_the_eval_data(tok, tmp_path):
    """A DatasetDict (a variable, a dict of record lists, or one saved to disk) with 'train' and 'validation' or
    'test': training reads 'train', and the other split was silently left unused. Now it is the eval data
    (said in the report), unless --eval names other data; %lora_eval --data on it scores that split."""
    import datasets

    from ft_magics.config import TrainConfig
    from ft_magics.core.data import prepare
    from ft_magics.core.evaluation import heldout_examples

    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(12)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:9]),
                               "test": datasets.Dataset.from_list(rows[9:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    ns = {"dd": dd, "lists": {"train": rows[:8], "validation": rows[8:11], "test": rows[11:]}}
    cfg = TrainConfig.from_dict({})
    for src, n_train, n_eval, said in (("dd", 9, 3, "eval from the 'test' split of variable dd"),
                                       ("lists", 8, 3, "eval from the 'validation' split of variable lists"),
                                       (str(tmp_path / "saved"), 9, 3, f"eval from the 'test' split of {tmp_path / 'saved'}")):
        train, ev, report = prepare(src, tok, cfg, namespace=ns)
        assert (len(train), len(ev), report.split) == (n_train, n_eval, said), src
    train, ev, report = prepare("dd", tok, TrainConfig.from_dict({"eval_fraction": 0.2}), namespace=ns)
    assert report.split.endswith("(eval_fraction not used)") and len(ev) == 3
    train, ev, report = prepare("dd", tok, cfg, namespace=ns, eval_src="lists")  # --eval wins
    # its eval split, as %lora_eval --data lists scores (it was its train split: the run's eval loss, keep_best and
    # early stopping measured rows the user meant for training)
    assert len(ev) == 3 and report.split == "eval from the 'validation' split of variable lists"
    assert [m["content"] for m in ev_rows(ev, tok)] == ["q8?", "q9?", "q10?"]
    assert len(heldout_examples("dd", tok, namespace=ns)) == 3
    one_split = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    assert prepare("one", tok, cfg, namespace={"one": one_split})[2].split == "no eval data"


def test_ultrafeedback_style_splits_train_on_the_objective_s_split_and_evaluate_on_its_test_split(tok, tmp_path):
    """UltraFeedback names its splits train_prefs / test_prefs (pairs), train_sft / test_sft and train_gen /
    test_gen, and has no 'train': such a DatasetDict (a variable, saved to disk, or a JSON object of record
    lists) was refused. A preference run now reads the *_prefs pair, SFT the *_sft pair; a dataset with one
    train_* split trains on it whatever the objective."""
    import datasets

    from ft_magics.config import TrainConfig
    from ft_magics.core.data import prepare

    pairs = [{"prompt": f"How do I reset password {i}?", "chosen": "Category: account\nAnswer: Use the link.",
              "rejected": "No idea."} for i in range(10)]
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(7)]
    splits = {"train_prefs": pairs[:8], "test_prefs": pairs[8:], "train_sft": chats[:5], "test_sft": chats[5:],
              "train_gen": chats[:2], "test_gen": chats[2:3]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    dd.save_to_disk(str(tmp_path / "uf"))
    (tmp_path / "uf.json").write_text(json.dumps(splits))
    ns = {"uf": dd, "uf_lists": splits, "prefs_only": datasets.DatasetDict(
        {"train_prefs": datasets.Dataset.from_list(pairs[:8]), "test_prefs": datasets.Dataset.from_list(pairs[8:])})}
    dpo, sft = TrainConfig.from_dict({"objective": "dpo"}), TrainConfig.from_dict({})
    for src in ("uf", "uf_lists", str(tmp_path / "uf"), str(tmp_path / "uf.json")):
        train, ev, report = prepare(src, tok, dpo, namespace=ns)
        assert (len(train), len(ev)) == (8, 2) and "'test_prefs' split" in report.split, src
        train, ev, report = prepare(src, tok, sft, namespace=ns)
        assert (len(train), len(ev)) == (5, 2) and "'test_sft' split" in report.split, src
    train, ev, report = prepare("prefs_only", tok, dpo, namespace=ns)
    assert (len(train), len(ev)) == (8, 2)


def test_a_hub_dataset_named_without_a_split_evaluates_on_its_validation_split(tok, tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "_hub_unreachable", lambda: None)
    splits = {"owner/both": ["train", "test", "validation"], "owner/trainonly": ["train"]}
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name: splits[name])
    sizes = {"train": 9, "validation": 3, "test": 5}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None: datasets.Dataset.from_list(
        [{"prompt": f"{split} {i}", "completion": "c"} for i in range(sizes[split.split("[")[0]])]))
    cfg = TrainConfig.from_dict({})
    train, ev, report = D.prepare("owner/both", tok, cfg)
    assert (len(train), len(ev), report.split) == (9, 3, "eval from the 'validation' split of hub:owner/both")
    assert D.prepare("owner/both:train", tok, cfg)[2].split == "no eval data"  # a split named: that split alone
    assert D.prepare("owner/trainonly", tok, cfg)[2].split == "no eval data"


def test_a_json_file_with_train_and_test_lists_evaluates_on_the_test_list(tok, tmp_path):
    """{"train": [...], "test": [...]} in a .json file: training read 'train' and dropped 'test' unseen."""
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(10)]
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": rows[:7], "test": rows[7:]}))
    train, ev, report = D.prepare(str(path), tok, TrainConfig.from_dict({}))
    assert (len(train), len(ev), report.split) == (7, 3, f"eval from the 'test' split of {path}")
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": "1.0", "data": rows}))
    assert D.prepare(str(tmp_path / "wrapped.json"), tok, TrainConfig.from_dict({}))[2].split == "no eval data"


def test_a_variable_named_like_a_folder_is_the_variable_and_expressions_are_named(tmp_path, monkeypatch):
    """In a notebook `--data parts` with a DataFrame `parts` and a folder parts/ read the folder, silently.
    The variable now wins and the Data line says how to read the folder; an expression such as
    uf['train_prefs'] (its quotes lost to the flag parser) said "matches no data file"."""
    from ft_magics.core.data import load_rows

    monkeypatch.chdir(tmp_path)
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n"
                                                       for i in range(5)))
    ns = {"parts": [{"prompt": "x", "completion": "y"}] * 2, "uf": [{"text": "t"}]}
    rows, desc = load_rows("parts", ns)
    assert len(rows) == 2 and desc == "variable parts (not the folder parts: --data ./parts reads that)"
    assert len(load_rows("./parts", ns)[0]) == 5 and len(load_rows("parts", {})[0]) == 5
    for expr in ("uf[train_prefs]", "uf.head(5)", "uf[:10]"):
        with pytest.raises(FtUsageError, match=r"not an expression .*train_rows = uf\[\.\.\.\]"):
            load_rows(expr, ns)


def test_a_control_character_in_json_is_reported_once():
    import tempfile

    from ft_magics.core.data import load_rows

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "bad.jsonl"
        p.write_text('{"text": "ok"}\n{"text": "a\tb"}\n')
        with pytest.raises(FtUsageError) as err:
            load_rows(str(p))
    assert "line 2: not valid JSON (Invalid control character at column" in str(err.value)


def test_map_reaches_integer_columns_and_fields_inside_objects():
    """A DataFrame with columns 0 and 1 was told to use --map "0=prompt,1=completion", which then failed
    ("names column(s) '0', '1' that do not exist ... Columns: 0, 1"); a field inside a column of objects could
    not be named at all, and the message did not say how."""
    import pandas as pd

    df = pd.DataFrame({0: ["q1", "q2"], 1: ["a1", "a2"]})
    with pytest.raises(FtUsageError, match='--map "0=prompt,1=completion"'):
        D.normalise(df.to_dict(orient="records"))
    recs, fmt = D.normalise(df.to_dict(orient="records"), column_map="0=prompt,1=completion")
    assert fmt.startswith("prompt-completion") and recs[1].messages[-1]["content"] == "a2"
    nested = [{"meta": {"id": i}, "data": {"q": f"question {i}", "r": f"reply {i}"}} for i in range(3)]
    recs, _ = D.normalise(nested, column_map="data.q=prompt,data.r=completion")
    assert [m["content"] for m in recs[2].messages] == ["question 2", "reply 2"]
    with pytest.raises(FtUsageError, match=r'named with dots, e.g. --map "data.q=prompt"'):
        D.normalise(nested, column_map="q=prompt,r=completion")


def test_a_hub_id_without_network_is_refused_at_once_naming_the_local_path(tmp_path, monkeypatch):
    """Offline, `--data owner/name` (or a mistyped local folder shaped like one) printed ~20 s of datasets'
    retries before its error. Without a route to the Hub it is refused at once, naming the local path looked
    for; in offline mode (HF_HUB_OFFLINE=1) datasets is asked, as it reads its cache."""
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    called = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: called.append(a))
    with pytest.raises(FtUsageError, match=r"not a local file or folder \(looked for .*owner/name\).*no-such-host"
                                           r"\.invalid cannot be reached from this machine"):
        D.load_rows("owner/name")
    assert called == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert D._hub_unreachable() is None


def test_the_data_line_says_when_eval_loss_cannot_compare_or_cannot_happen(tok, tmp_path):
    """--eval in the text format beside chat training (loss on every token against loss on the answers) was
    accepted without a word, and its eval loss printed beside the training loss; eval_steps without eval data
    was silent too."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Plain text to read.\n\nAnother block of text.\n")
    _, ev, report = D.prepare(CHAT * 3, tok, cfg(), eval_src=str(corpus))
    assert ev and "in the text format, not chat: its loss is on every token, training's on the answers" in report.split
    _, _, report = D.prepare(CHAT * 3, tok, cfg(), eval_src=CHAT)
    assert "do not compare" not in report.split
    _, _, report = D.prepare(CHAT * 3, tok, cfg(eval_steps=2))
    assert "eval_steps: 2 has nothing to evaluate: give --eval FILE or eval_fraction: 0.1" in report.text()


def test_dropped_eval_examples_are_counted_by_their_cause(tok, tmp_path):
    """An eval row with an empty answer was reported as 'Dropped 1 eval example (too long, or no answer token
    left)'."""
    rows = [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(6)]
    evals = write_jsonl(tmp_path / "e.jsonl", rows[:2] + [{"prompt": "q9", "completion": ""}])
    _, ev, report = D.prepare(rows, tok, cfg(), eval_src=str(evals))
    assert len(ev) == 2 and "Dropped    1 eval example (1 with an empty or blank answer, or none)" in report.text()


def test_overlong_split_trains_a_long_document_whole_in_consecutive_rows(tok, tmp_path):
    """Continued pre-training on a document longer than max_seq_len kept its first max_seq_len tokens only
    (the report even said how long max_seq_len would have to be). overlong: split makes consecutive rows of
    it, every token in exactly one row; a chat example cannot be split (its later rows lose the prompt)."""
    doc = tmp_path / "book.txt"
    doc.write_text(" ".join(f"word{i}" for i in range(400)))
    whole = D.tokenize_records(tok, D.normalise(D.load_rows(str(doc), txt_mode="document")[0])[0], "all")[0]
    train, _, report = D.prepare(str(doc), tok, cfg(max_seq_len=64, overlong="split"), txt_mode="document")
    assert len(whole.input_ids) > 3 * 64 and len(train) == math.ceil(len(whole.input_ids) / 64)
    assert [t for e in train for t in e.input_ids] == whole.input_ids and all(len(e.input_ids) <= 64 for e in train)
    assert f"split into {len(train)} rows of at most 64 tokens (overlong: split)" in report.text()
    assert f"only {len(train)} examples train" in report.text() and "only 1 example" not in report.text()  # (said 1)
    _, _, truncated = D.prepare(str(doc), tok, cfg(max_seq_len=64), txt_mode="document")
    assert "overlong: split trains on all of it" in truncated.text()
    with pytest.raises(FtUsageError, match="overlong: split cuts a long example .* chat format"):
        D.prepare(CHAT, tok, cfg(max_seq_len=16, overlong="split"))
    from ft_magics.config import TrainConfig

    with pytest.raises(FtUsageError, match="overlong: split does not apply to objective: dpo"):
        TrainConfig.from_dict({"objective": "dpo", "overlong": "split"})


def _with_context(n):
    from types import SimpleNamespace

    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=n))


def test_rows_past_the_model_context_window_are_named_in_the_data_report(tok):
    """The warning came from training alone: a --dry-run (the data report) said nothing of it."""
    rows = [{"prompt": "hi", "completion": "word " * n} for n in (5, 300, 500)]
    _, _, report = D.prepare(rows, tok, cfg(max_seq_len=2048), model=_with_context(256))
    note = next(w for w in report.warnings if "context window" in w)
    assert note.startswith("2 training rows longer than the model's context window (256 tokens)")
    assert "max_seq_len: 256" in note and note in report.text()
    _, _, report = D.prepare(rows, tok, cfg(max_seq_len=2048), model=_with_context(4096))
    assert not any("context window" in w for w in report.warnings)
    _, _, report = D.prepare(rows, tok, cfg(max_seq_len=2048))  # no model, no window known
    assert not any("context window" in w for w in report.warnings)


def test_length_advice_never_points_past_the_model_context(tok):
    """The data report and the cut-answer refusals advised a --max-seq-len the model cannot read (beyond its
    max_position_embeddings), which training then warned about and %lora_eval refused."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    rows = [{"prompt": long_prompt, "completion": "billing"}, {"prompt": "hi", "completion": "hello world"}]
    _, _, report = D.prepare(rows, tok, cfg(max_seq_len=32))  # no model: the advice as before
    longest = max(report.lengths)
    assert f"--max-seq-len {-(-longest // 64) * 64} keeps every example whole" in report.text()
    _, _, report = D.prepare(rows, tok, cfg(max_seq_len=32), model=_with_context(longest + 4))
    assert f"--max-seq-len {longest + 4} keeps every example whole" in report.text()  # capped at the window
    _, _, report = D.prepare(rows, tok, cfg(max_seq_len=32), model=_with_context(40))
    assert "--max-seq-len" not in report.text()
    assert f"the longest ({longest} tokens) is beyond the model's context window (40)" in report.text()
    # every answer begins past the window: raising max_seq_len cannot help, so the refusal says to shorten
    with pytest.raises(FtUsageError, match=r"cut away every answer.*The model reads at most 20 tokens \(its context "
                                           r"window\), so shorten the prompts\.$"):
        D.prepare(rows[:1], tok, cfg(max_seq_len=16), model=_with_context(20))


def test_rows_with_a_prompt_and_no_answer_say_the_answers_are_missing():
    """Rows holding only a prompt were told to --map "prompt=text", which trains on the questions as text."""
    with pytest.raises(FtUsageError, match=r"prompt column \('prompt'\) but no answer column \(fields: id, prompt\)"
                                           r".*as 'completion'.*plain text instead: --map \"prompt=text\""):
        D.normalise([{"prompt": "How do I reset my password?", "id": 1}])
    with pytest.raises(FtUsageError, match="cannot tell the dataset format"):  # nothing prompt-like: as before
        D.normalise([{"foo": "x", "bar": 1}])


def test_a_latin1_csv_and_a_null_answer_say_how_to_go_on(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("prompt,completion\ncaf\xe9,cr\xe8me\n".encode("latin-1"))
    with pytest.raises(FtUsageError, match=r"not UTF-8 text\. Save it as UTF-8, or read it in a cell with its "
                                           r"encoding \(it looks like Latin-1 \(Western European\): pandas\.read_csv\(path, encoding='latin-1', dtype=str, "
                                           r"keep_default_na=False\): every field as the text written"):
        D.load_rows(str(p))
    with pytest.raises(FtUsageError, match=r"field 'completion' is missing or null\. Fill it, or drop such rows "
                                           r"\(for a DataFrame: df\.dropna\(subset=\['completion'\]\)\)"):
        D.normalise([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}])


def test_csv_fields_are_the_text_written_never_type_guessed(tmp_path):
    """pandas guesses column types: a column of numbers lost its leading zeros and trailing decimals
    ('02134' -> 2134, '0.50' -> 0.5) and a column of True/False became booleans, which were then refused."""
    (tmp_path / "d.csv").write_text("prompt,completion\nzip of Boston?,02134\nhalf?,0.50\n")
    recs, _ = load(str(tmp_path / "d.csv"))
    assert [r.messages[1]["content"] for r in recs] == ["02134", "0.50"]
    (tmp_path / "b.tsv").write_text("question\tanswer\nis the sky blue?\tTrue\nis grass red?\tFalse\n")
    recs, _ = load(str(tmp_path / "b.tsv"))
    assert [r.messages[1]["content"] for r in recs] == ["True", "False"]


@pytest.mark.parametrize("body,line", [("p1,c1,EXTRA\np2,c2\n", 2), ("p1,c1\np2,c2,EXTRA\n", 3)])
def test_a_csv_row_with_an_extra_field_is_refused_by_its_line(tmp_path, body, line):
    """A first data row with one field too many made pandas read the first column as an index: every column
    shifted by one without a word (the prompts became completions)."""
    (tmp_path / "d.csv").write_text("prompt,completion\n" + body)
    with pytest.raises(FtUsageError, match=rf"d\.csv, line {line}: 3 fields where the header has 2 "
                                           r"\(prompt, completion\)\. Put quotes around a field"):
        load(str(tmp_path / "d.csv"))


def test_a_csv_row_with_a_missing_field_or_a_header_naming_a_column_twice_is_refused(tmp_path):
    """A short row's missing answer was read as empty (the row then dropped as 'no answer'), and a second
    'prompt' in the header became an unused 'prompt.1': both without a word."""
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\n\nc\n\"e\",\n")
    with pytest.raises(FtUsageError, match=r"d\.csv, line 4: 1 field where the header has 2: completion is missing, "
                                           r"and would be read as empty\. Add the missing field"):
        load(str(tmp_path / "d.csv"))
    (tmp_path / "ok.csv").write_text("prompt,input,completion\na,,b\nc,d,e\n")  # empty fields written: fine
    assert len(load(str(tmp_path / "ok.csv"))[0]) == 2
    (tmp_path / "h.tsv").write_text("prompt\tprompt \tcompletion\na\tb\tc\n")
    with pytest.raises(FtUsageError, match=r"h\.tsv: the header names more than one column 'prompt'; give each"):
        load(str(tmp_path / "h.tsv"))


def test_a_json_object_of_columns_of_different_lengths_says_so(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"prompt": ["a", "b", "c"], "completion": ["x", "y"]}))
    with pytest.raises(FtUsageError, match=r"columns of different lengths \(prompt: 3 entries, completion: 2 "
                                           r"entries\)"):
        load(str(tmp_path / "d.json"))
    (tmp_path / "e.json").write_text(json.dumps({"prompt": ["a", "b"], "completion": ["x", "y"]}))
    assert len(load(str(tmp_path / "e.json"))[0]) == 2  # equal columns are rows


def test_sharegpt_conversations_with_role_and_content_keys():
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    recs, fmt = load([{"conversations": conv}])
    assert fmt == "sharegpt" and recs[0].messages == conv
    with pytest.raises(FtUsageError, match=r"message 0: no role \(fields: speaker, text\)\. Each message needs "
                                           r"'role' and 'content'"):
        load([{"conversations": [{"speaker": "user", "text": "hi"}]}])


def test_messages_written_as_json_text_in_a_csv_column(tmp_path):
    conv = [{"role": "user", "content": "hi, you"}, {"role": "assistant", "content": "yo"}]
    import csv

    with open(tmp_path / "d.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["messages"], [json.dumps(conv)]])
    recs, fmt = load(str(tmp_path / "d.csv"))
    assert fmt == "chat" and recs[0].messages == conv
    with pytest.raises(FtUsageError, match="starts like a JSON list but is not valid JSON"):
        load([{"messages": '[{"role": "user", "content": "hi"'}])


def test_a_wrong_field_in_a_nested_map_is_named_with_the_fields_there_are():
    rows = [{"data": {"q": "hi", "a": "yo"}}] * 2
    recs, _ = load(rows, column_map="data.q=prompt,data.a=completion")
    assert recs[0].messages[0]["content"] == "hi"
    with pytest.raises(FtUsageError, match=r"--map names 'data\.x', which does not exist \(did you mean "
                                           r"'data\.q'\?\)\. The fields in 'data': a, q\."):
        load(rows, column_map="data.x=prompt,data.a=completion")
    with pytest.raises(FtUsageError, match=r"--map names 'data\.q\.z', but 'data\.q' holds text, not objects"):
        load(rows, column_map="data.q.z=prompt,data.a=completion")


def test_question_answer_beside_a_text_column_suggests_the_pair_with_the_question(tok):
    rows = [{"question": f"q{i}?", "answer": f"a{i}", "text": f"passage {i}"} for i in range(4)]
    notes = " ".join(D.prepare(rows, tok, cfg(max_seq_len=64))[2].warnings)
    assert '--map "question=prompt,answer=completion"' in notes and "text=prompt" not in notes


def test_a_boolean_answer_in_json_says_to_write_it_as_text():
    with pytest.raises(FtUsageError, match=r"field 'completion' is a boolean \(true\), not text\. Write the answer "
                                           r"as the text the model should produce"):
        load([{"prompt": "is the sky blue?", "completion": True}])
    with pytest.raises(FtUsageError, match=r"field 'prompt' is a boolean \(true\), not text\. Write it as the text the "
                                           r"model should read"):  # a prompt is no answer
        load([{"prompt": True, "completion": "x"}])


def test_a_sentence_and_label_dataset_is_told_the_map_that_keeps_the_label():
    """--map "sentence=text" was suggested: trained as text, the label column is silently dropped."""
    with pytest.raises(FtUsageError, match=r'--map "sentence=prompt,label=completion"'):
        load([{"sentence": "good movie", "label": "positive"}])


def test_format_fields_are_found_in_any_letter_case():
    """Instruction / Input / Output columns were missed as alpaca, and the input/output pair was read as prompt and
    completion: every example trained with the instruction dropped (an empty prompt here)."""
    rows = [{"Instruction": "do x", "Input": "", "Output": "ok"}, {"Instruction": "do y", "Input": "ctx", "Output": "ok2"}]
    recs, fmt = load(rows)
    assert fmt == "alpaca (columns Instruction -> instruction, Input -> input, Output -> output)"
    assert recs[0].messages[0] == {"role": "user", "content": "do x"}
    assert recs[1].messages[0] == {"role": "user", "content": "do y\n\nctx"}
    recs, fmt = load([{"Messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    assert fmt.startswith("chat") and recs[0].messages[1]["content"] == "yo"


def test_chat_tools_written_as_json_text_are_read():
    """A 'tools' column of JSON text (a CSV, a parquet string column) was dropped without a word for chat rows:
    the tool calls trained without the schemas the prompt shows at inference."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    recs, _ = load([dict(TOOL_ROWS[0], tools=json.dumps(tools))])
    assert recs[0].tools == tools
    with pytest.raises(FtUsageError, match=r"index 0: 'tools' is text but not valid JSON .*give a JSON list of function"):
        load([dict(TOOL_ROWS[0], tools='[{"type": "function"')])


@pytest.mark.parametrize("spec,msg", [("question=prompt,notes=prompt", r"'question' and 'notes' both map to 'prompt'"),
                                      ("question=prompt,question=completion", r"column 'question' is mapped twice")])
def test_a_map_that_sends_two_columns_to_one_field_or_one_column_twice_is_refused(spec, msg):
    """The prompt became the notes (the question dropped), or the last entry for a column won, without a word."""
    rows = [{"question": "q1", "answer": "a1", "notes": "n1"}]
    with pytest.raises(FtUsageError, match=msg):
        load(rows, column_map=spec)


def test_a_variable_of_several_record_lists_says_how_to_pick_one():
    with pytest.raises(FtUsageError, match=r"variable 'jd' holds several lists of records \(examples, meta\) and none "
                                           r"is called 'train'; put one in a variable first \(part = jd\['examples'\]\)"):
        load("jd", namespace={"jd": {"examples": CHAT, "meta": CHAT[:1]}})


def test_prompt_side_columns_left_out_of_a_known_pair_are_named(tok):
    """Dolly (instruction, context, response) trained on the instruction alone and OpenOrca (system_prompt,
    question, response) on the question alone, without a word."""
    def notes(rows, **kw):
        return [w for w in D.prepare(rows, tok, cfg(max_seq_len=64, **kw))[2].warnings if "not used" in w]

    dolly = [{"instruction": f"i{i}", "context": "c", "response": "r", "category": "x"} for i in range(3)]
    assert notes(dolly) == ["column 'context' is not used: the prompt is 'instruction' alone. To include it, --map "
                            "\"context=input,response=output\" reads the rows as alpaca: 'instruction', a blank line, "
                            "then 'context'."]
    recs, _ = load(dolly, column_map="context=input,response=output")  # the fix it names works
    assert recs[0].messages[-2]["content"] == "i0\n\nc" and recs[0].messages[-1]["content"] == "r"
    assert notes(dolly, map="context=input,response=output") == []
    orca = [{"id": i, "system_prompt": "Be brief.", "question": f"q{i}", "response": "r"} for i in range(3)]
    assert notes(orca) == ['column \'system_prompt\' is not used: the rows are read as prompt and completion. It is a '
                           'system prompt: --map "system_prompt=system" puts it before each prompt.']
    recs, _ = load(orca, column_map="system_prompt=system")  # the fix it names works
    assert recs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert notes(orca, map="system_prompt=system") == []
    assert notes([{"prompt": "p", "completion": "c", "id": 1}] * 3) == []


def test_tsv_quotes_are_text_unless_the_file_quotes_fields_as_csv_does(tmp_path):
    """A hand-written TSV was read with CSV quoting: '"Hello" she said' lost its quotes and a stray quote merged the
    next rows into one prompt (6 rows read as 4). A file that wraps fields in quotes (pandas' writer, for a field
    holding a tab or a line break) is still read with them."""
    import pandas as pd

    (tmp_path / "h.tsv").write_text('prompt\tcompletion\n"Hello" she said\tgreeting\nq2\ta2\n"Quoted start\t5 ft 11\n'
                                    'q4\ta4\nq5\tsays "bye"\nq6\ta6\n')
    recs, _ = load(str(tmp_path / "h.tsv"))
    assert [r.messages[0]["content"] for r in recs] == ['"Hello" she said', "q2", '"Quoted start', "q4", "q5", "q6"]
    assert recs[4].messages[1]["content"] == 'says "bye"'
    rows = [{"prompt": "two\nlines", "completion": 'a "quoted"\tanswer'}, {"prompt": "plain", "completion": "ok"}]
    pd.DataFrame(rows).to_csv(tmp_path / "p.tsv", sep="\t", index=False)
    recs, _ = load(str(tmp_path / "p.tsv"))
    assert [(r.messages[0]["content"], r.messages[1]["content"]) for r in recs] == [(x["prompt"], x["completion"])
                                                                                    for x in rows]
    # a file quoted as CSV with one field whose quote closes early: those quotes were dropped without a word
    (tmp_path / "m.tsv").write_text('prompt\tcompletion\n"What, exactly?"\tan answer\nq2\t"Quoted" she said\n')
    with pytest.raises(FtUsageError, match=r"m\.tsv, line 3: the field \"Quoted\" she said opens a quote that closes "
                                           r"before the field ends.*or wrap no field in quotes"):
        load(str(tmp_path / "m.tsv"))
    (tmp_path / "m.csv").write_text('prompt,completion\nq1,"fine ""quoted"" text"\nq2,"Quoted" she said\nq3,5" screen\n')
    with pytest.raises(FtUsageError, match=r"m\.csv, line 3: .*read as CSV, its quotes would be lost"):
        load(str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text('prompt,completion\nq1,"fine ""quoted"" text"\nq3,5" screen\n')
    assert [r.messages[1]["content"] for r in load(str(tmp_path / "m.csv"))[0]] == ['fine "quoted" text', '5" screen']


def test_eval_data_gets_the_blank_prompt_and_special_token_warnings(tok):
    """A blank prompt or a pasted '<|im_end|>' in the eval data was named nowhere, though the eval loss scores it."""
    train = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    evals = [{"prompt": " ", "completion": "x"}, {"prompt": "hi", "completion": "bye<|im_end|>"}]
    _, _, report = D.prepare(train, tok, cfg(), eval_src=evals)
    assert ("eval data: 1 example has an empty prompt (a blank user turn: <list>, index 0): its answer is scored as the "
            "answer to no question.") in " ".join(report.warnings)
    assert any(w.startswith("eval data: the data's text spells special tokens of the tokenizer: '<|im_end|>' "
                            "(1 example), first at <list>, index 1. Each is read as that token, not as text, and the eval "
                            "loss scores it as one.") for w in report.warnings)
    _, _, report = D.prepare(train, tok, cfg(), eval_src=train[:2])
    assert not any(w.startswith("eval data:") for w in report.warnings)


def test_eval_rows_all_dropped_for_length_are_refused_with_the_length_that_fits(tok):
    """Every eval row cut to no answer: the run went on with 'no eval data', and keep_best / early_stopping did
    nothing, without a word of why."""
    train = [{"prompt": f"q{i}", "completion": "a"} for i in range(8)]
    long_eval = [{"prompt": "word " * 200, "completion": "answer"}] * 3
    with pytest.raises(FtUsageError, match=r"every one of the 3 eval examples was dropped: at max_seq_len=64 none "
                                           r"keeps a token of its answer.*--max-seq-len \d+ keeps every example whole"):
        D.prepare(train, tok, cfg(max_seq_len=64), eval_src=long_eval)
    _, evals, _ = D.prepare(train, tok, cfg(max_seq_len=512), eval_src=long_eval)
    assert len(evals) == 3


def test_a_folder_skips_hidden_files_as_a_glob_does(tmp_path):
    """A macOS '._a.jsonl' resource fork (binary) made the whole folder fail; a hidden file was read as data."""
    folder = tmp_path / "fold"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", CHAT)
    (folder / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07\xff\xfe binary")
    write_jsonl(folder / ".hidden.jsonl", CHAT)
    assert len(load(str(folder))[0]) == 2


def _pc(tag, n):
    return [{"prompt": f"{tag}q{i}", "completion": f"{tag}a{i}"} for i in range(n)]


def _prompts(examples, tok):
    return sorted(re.search(r"(\w)q\d", tok.decode(e.input_ids)).group(1) for e in examples)


@pytest.mark.parametrize("layout", ["files", "subfolders", "hub shards", "glob"])
def test_a_folder_or_glob_of_split_files_trains_on_train_and_evaluates_on_its_eval_split(tmp_path, tok, layout,
                                                                                        monkeypatch):
    """A folder holding train.jsonl and test.jsonl trained on both (the test rows too) and held nothing out;
    %lora_eval --data FOLDER scored the training rows. File names (or subfolders) that name splits are read
    as a DatasetDict's splits are."""
    from ft_magics.core.evaluation import heldout_examples

    monkeypatch.chdir(tmp_path)
    d = tmp_path / "sp"
    name = {"files": "{}.jsonl", "subfolders": "{}/part0.jsonl", "hub shards": "data-{}-00000-of-00001.jsonl",
            "glob": "{}.jsonl"}[layout]
    for split, tag, n in (("train", "t", 5), ("test", "e", 3), ("validation", "v", 2)):
        (d / name.format(split)).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(d / name.format(split), _pc(tag, n))
    write_jsonl(d / "notes.jsonl", _pc("n", 1))
    src = "sp/*.jsonl" if layout == "glob" else "sp"
    train, evals, report = D.prepare(src, tok, cfg())
    assert _prompts(train, tok) == ["t"] * 5 and _prompts(evals, tok) == ["v"] * 2  # validation before test
    line = report.text().splitlines()[0]
    assert "(split by file name: " in line and "trains, " in line and "validation" in line and "not read: " in line
    assert "notes.jsonl" in line and "-> 5 train / 2 eval (eval from " in line
    assert _prompts(heldout_examples(src, tok), tok) == ["v"] * 2  # %lora_eval --data sp scores the held-out split
    train, evals, _ = D.prepare(src, tok, cfg(), eval_src=[{"prompt": "xq0", "completion": "x"}])
    assert _prompts(train, tok) == ["t"] * 5 and _prompts(evals, tok) == ["x"]  # --eval wins
    # a train split and no eval split: the files that name no split were left out without a word
    only = tmp_path / "only"
    (only / name.format("train")).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(only / name.format("train"), _pc("t", 5))
    write_jsonl(only / "notes.jsonl", _pc("n", 1))
    train, _, report = D.prepare("only/*.jsonl" if layout == "glob" else "only", tok, cfg())
    line = report.text().splitlines()[0]
    assert _prompts(train, tok) == ["t"] * 5 and "; not read: " in line and "notes.jsonl" in line


def test_a_folder_of_files_without_split_names_trains_on_all_of_them(tmp_path, tok):
    for i, tag in enumerate("ab"):
        write_jsonl(tmp_path / f"part-{i}.jsonl", _pc(tag, 2))
    write_jsonl(tmp_path / "contest.jsonl", _pc("c", 1))  # 'test' inside a word names no split
    train, evals, report = D.prepare(str(tmp_path), tok, cfg())
    assert _prompts(train, tok) == ["a", "a", "b", "b", "c"] and not evals
    assert "split by file name" not in report.text()


def test_text_field_trains_on_that_column_beside_chat_or_prompt_columns():
    """--text-field was ignored without a word where the rows also held messages or prompt/completion."""
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "notes": "some notes"}]
    recs, fmt = load(rows, text_field="notes")
    assert fmt == "text" and recs[0].text == "some notes"
    recs, fmt = load([{"prompt": "q", "completion": "a", "notes": "n"}], text_field="notes")
    assert fmt == "text" and recs[0].text == "n"


def test_preference_eval_pairs_all_dropped_for_length_are_refused_too(tok):
    train = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(8)]
    long_eval = [{"prompt": "word " * 200, "chosen": "good", "rejected": "bad"}] * 3
    with pytest.raises(FtUsageError, match=r"every one of the 3 eval examples was dropped: at max_seq_len=64"):
        D.prepare(train, tok, cfg(max_seq_len=64, objective="dpo"), eval_src=long_eval)


def test_an_assistant_message_of_weight_0_is_context_not_loss(tok, plain_tok, tmp_path):
    """OpenAI's chat fine-tuning format marks an assistant message ``weight: 0`` to keep it as context only. The
    weight was ignored: the turn trained like any other. Now its tokens carry no loss, with a chat template and
    without; a row whose every answer has weight 0 is dropped and counted; another weight is refused by row."""
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "WRONG", "weight": 0},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "right", "weight": 1}]
    rec = D.normalise([{"messages": convo}])[0][0]
    assert rec.weights == [0, 1] and all("weight" not in m for m in rec.messages)
    for t in (tok, plain_tok):
        ex = D.tokenize_record(t, rec)
        shown = D.show_loss_tokens(t, ex)
        assert shown.count("⟦") == 1 and "⟦right" in shown and "WRONG" in shown.replace("⟦right", "")
        unweighted = D.tokenize_record(t, D.normalise([{"messages": [dict(m) for m in convo]}])[0][0])
        assert unweighted.input_ids == ex.input_ids  # the same text; only the labels differ
    plain = D.normalise([{"messages": [{k: v for k, v in m.items() if k != "weight"} for m in convo]}])[0][0]
    assert D.show_loss_tokens(tok, D.tokenize_record(tok, plain)).count("⟦") == 2
    assert D.fingerprint([rec]) != D.fingerprint([plain])  # a resumed run notices the weights changed
    assert D.normalise([rec.to_json()])[0][0].weights == [0, 1]  # written out (an exported job) and read back

    context_only = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    rows = [{"messages": [dict(m) for m in convo]} for _ in range(3)] + [context_only]
    train, _, report = D.prepare(rows, tok, cfg())
    assert len(train) == 3 and report.dropped_unweighted == 1 and report.dropped_empty == 0
    assert "1 example (<list>, index 3) whose every answer has weight 0" in report.text()
    with pytest.raises(FtUsageError, match="every assistant message has weight 0"):
        D.prepare([context_only] * 2, tok, cfg())
    _, _, report = D.prepare(rows, tok, cfg(train_on="all"))
    assert any("weights are not applied" in w for w in report.warnings)

    bad = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}]
    with pytest.raises(FtUsageError, match=r"line 1, message 1: weight 0.5 is not 0 or 1"):
        load(str(write_jsonl(tmp_path / "w.jsonl", bad)))


def test_split_names_training_and_eval_pair_up_and_a_lone_test_split_is_named(tok):
    """'training' beside 'validation' looked for a 'validationing' split, so the validation rows went unused, and
    an 'eval' split was not one of the names held out; a dataset whose only split is 'test' trained on it without
    a word. Now the pairs are found and the lone split is named in the Data line."""
    import datasets

    from ft_magics.config import TrainConfig
    from ft_magics.core.data import prepare

    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(12)]
    cfg = TrainConfig.from_dict({})
    ns = {"a": {"training": rows[:9], "validation": rows[9:]},
          "b": datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:10]),
                                     "eval": datasets.Dataset.from_list(rows[10:])}),
          "c": datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}),
          "d": {"validation": rows[:6]}, "e": {"TRAIN": rows[:7], "VALIDATION": rows[7:]}}
    for name, n_train, n_eval, split in (("a", 9, 3, "validation"), ("b", 10, 2, "eval"), ("e", 7, 5, "VALIDATION")):
        train, ev, report = prepare(name, tok, cfg, namespace=ns)
        assert (len(train), len(ev), report.split) == (n_train, n_eval, f"eval from the '{split}' split of variable {name}")
        assert "only split" not in report.source
    for name, n, split in (("c", 12, "test"), ("d", 6, "validation")):
        train, ev, report = prepare(name, tok, cfg, namespace=ns)
        assert len(train) == n and report.source == f"variable {name}, split '{split}' (its only split, so it trains)"


def test_column_names_with_spaces_around_them_are_read_as_their_fields(tok, tmp_path):
    """A CSV header written "prompt, completion" (or a DataFrame read from one) has a column ' completion': it
    was not found as a field, nor as the pair, nor by --map completion=...; now the spaces do not matter."""
    import pandas as pd

    csv = tmp_path / "spaced.csv"
    csv.write_text("prompt, completion\nhello, world\nhow are you?, fine\n", encoding="utf-8")
    records, fmt = load(str(csv))
    assert fmt.startswith("prompt-completion") and records[0].messages[-1]["content"].strip() == "world"
    df = pd.DataFrame({" Question ": ["q1?", "q2?"], "Answer ": ["a1", "a2"], "id": [1, 2]})
    records, fmt = load(df)
    assert fmt.startswith("prompt-completion") and [m["content"] for m in records[1].messages] == ["q2?", "a2"]
    df = pd.DataFrame({" ask": ["q1?"], "reply ": ["a1"], " role": ["x"]})
    records, _ = load(df, column_map="ask=prompt, reply=completion")
    assert [m["content"] for m in records[0].messages] == ["q1?", "a1"]
    chat = [{"messages": [{"role": " User", "content": "hi"}, {"role": "assistant ", "content": "yo"}]}]
    assert [m["role"] for m in load(chat)[0][0].messages] == ["user", "assistant"]


def test_eval_data_with_columns_of_its_own_takes_eval_map_or_needs_none(tok, tmp_path):
    """--map renamed --eval's columns too, so eval data whose columns differ (already prompt/completion, or named
    otherwise) could not be given at all. Now eval data without map's columns is read as it is, eval_map
    (--eval-map) maps it, and eval data that has some of them is refused with eval_map named."""
    from ft_magics.config import TrainConfig
    from ft_magics.core.data import prepare

    train = write_jsonl(tmp_path / "t.jsonl", [{"ask": f"q{i}?", "reply": f"a{i}"} for i in range(8)])
    plain = write_jsonl(tmp_path / "e1.jsonl", [{"prompt": "p?", "completion": "c"}] * 2)
    other = write_jsonl(tmp_path / "e2.jsonl", [{"ask": "p?", "said": "c"}] * 3)
    cfg = TrainConfig.from_dict({"map": {"ask": "prompt", "reply": "completion"}})
    _, ev, report = prepare(str(train), tok, cfg, eval_src=str(plain))
    assert len(ev) == 2 and report.format.startswith("prompt-completion")
    with pytest.raises(FtUsageError, match=r"'reply' that do not exist.*give the eval data's own with eval_map"):
        prepare(str(train), tok, cfg, eval_src=str(other))
    cfg = TrainConfig.from_dict({"map": "ask=prompt,reply=completion", "eval_map": "ask=prompt,said=completion"})
    _, ev, _ = prepare(str(train), tok, cfg, eval_src=str(other))
    assert len(ev) == 3 and "⟦c" in D.show_loss_tokens(tok, ev[0])
    same = write_jsonl(tmp_path / "e3.jsonl", [{"ask": "p?", "reply": "c"}] * 4)  # map's columns: map applies
    assert len(prepare(str(train), tok, TrainConfig.from_dict({"map": "ask=prompt,reply=completion"}),
                       eval_src=str(same))[1]) == 4


def test_an_answer_inside_a_conversational_prompt_is_context_only(tok):
    """TRL's conversational prompt/completion: the prompt may hold earlier turns, answers included. Those answers
    carried loss like the completion; the prompt is context, so only the completion does."""
    row = {"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "EARLIER"},
                      {"role": "user", "content": "Q2"}],
           "completion": [{"role": "assistant", "content": "A2"}]}
    rec = D.normalise([row])[0][0]
    shown = D.show_loss_tokens(tok, D.tokenize_record(tok, rec))
    assert shown.count("⟦") == 1 and "⟦A2" in shown and "EARLIER" in shown


def test_the_unused_column_hint_under_text_field_says_to_drop_it_and_a_clash_names_text_field(tok, tmp_path):
    """With text_field: prompt, the hint said --map "prompt=prompt,completion=completion"; following it failed
    with 'the text format needs field(s) text ... drop the format setting', a setting never made. The hint now
    says to drop text_field, and text_field beside a map of the same column names the clash."""
    src = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)])
    _, _, report = D.prepare(str(src), tok, TrainConfig.from_dict({"text_field": "prompt"}))
    note, = [w for w in report.warnings if "is not used" in w]
    assert 'drop text_field and use --map "prompt=prompt,completion=completion"' in note
    with pytest.raises(FtUsageError, match=r"text_field 'prompt' trains that column as plain text, but --map maps "
                                           r"it to 'prompt': drop text_field"):
        D.prepare(str(src), tok, TrainConfig.from_dict({"text_field": "prompt", "map": "prompt=prompt,completion=completion"}))
    train, _, report = D.prepare(str(src), tok, TrainConfig.from_dict({"map": "prompt=prompt,completion=completion"}))
    assert report.format.startswith("prompt-completion") and len(train) == 4


def test_eval_examples_that_are_also_training_examples_are_named(tok, tmp_path):
    """--eval the training file itself (or a validation split cut from train) gave an eval loss on rows the
    model trained on without a word; the report now says how many eval examples are also in training."""
    from ft_magics.config import TrainConfig

    rows = [{"prompt": f"q{i}?", "completion": f"a{i}"} for i in range(10)]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    part = write_jsonl(tmp_path / "e.jsonl", rows[:3] + [{"prompt": "new?", "completion": "new"}])
    for eval_src, said in ((src, "10 of the 10 eval examples also appear in the training data"),
                           (part, "3 of the 4 eval examples also appear in the training data")):
        _, _, report = D.prepare(str(src), tok, TrainConfig.from_dict({}), eval_src=str(eval_src))
        assert any(w.startswith(said) for w in report.warnings), report.warnings
    _, _, report = D.prepare(str(src), tok, TrainConfig.from_dict({"eval_fraction": 0.2}))
    assert not any("also appear in the training data" in w for w in report.warnings)


def test_a_json_file_of_splits_each_a_dict_of_columns_reads_as_splits(tmp_path):
    """{"train": {columns}, "test": {columns}} was refused as "cannot tell the dataset format from the fields found
    (test, train)" with a --map that could not help."""
    cols = {"train": {"question": [f"q{i}" for i in range(6)], "answer": [f"a{i}" for i in range(6)]},
            "test": {"question": ["tq"], "answer": ["ta"]}}
    (tmp_path / "s.json").write_text(json.dumps(cols))
    rows, _ = D.load_rows(str(tmp_path / "s.json"))
    assert rows[0] == {"question": "q0", "answer": "a0"} and len(rows) == 6
    assert rows.held_out == ("test", [{"question": "tq", "answer": "ta"}])
    rows, _ = D.load_rows("v", {"v": cols})
    assert len(rows) == 6 and rows.held_out[0] == "test"


def test_an_empty_split_is_not_trained_on_nor_taken_for_a_dict(tmp_path):
    """{"train": [], "test": [...]} in a JSON file trained on the test split and evaluated on it too (an empty list
    did not count as a split); as a variable, {"train": [...], "test": []} was refused as "a dict"."""
    import datasets

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    for what, src, ns in (("s.json", str(tmp_path / "s.json"), None), ("variable 'v'", "v", {"v": {"train": [], "test": rows}}),
                          ("variable 'dd'", "dd", {"dd": datasets.DatasetDict({"train": datasets.Dataset.from_list([]),
                                                                                "test": datasets.Dataset.from_list(rows)})})):
        (tmp_path / "s.json").write_text(json.dumps({"train": [], "validation": [], "test": rows}))
        with pytest.raises(FtUsageError, match=r"its 'train' split is empty.*\('test' holds 5 records\)"):
            D.load_rows(src, ns)
    with pytest.raises(FtUsageError, match=r"or put one in a variable first \(part = v\['test'\]\)"):
        D.load_rows("v", {"v": {"train": [], "test": rows}})
    # an empty eval split: the train split trains, with no eval data (not an eval set of nothing)
    (tmp_path / "e.json").write_text(json.dumps({"train": rows, "test": []}))
    for src, ns in ((str(tmp_path / "e.json"), None), ("v", {"v": {"train": rows, "test": []}}),
                    ("dd", {"dd": datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                                        "test": datasets.Dataset.from_list([])})})):
        got, _ = D.load_rows(src, ns)
        assert len(got) == 5 and getattr(got, "held_out", None) is None, src


def test_conversations_written_as_role_keyed_exchanges_or_plain_utterances_read_as_chats(tok):
    """[{"user": .., "assistant": ..}, ...] and a dialog's list of utterances were "cannot tell the dataset format"
    with no --map that could help; rows of a list in memory were named "row 1" for what Python calls rows[0]."""
    turns = [{"turns": [{"assistant": "hello", "user": "hi"}, {"human": f"n{i}", "gpt": f"{i}"}]} for i in range(3)]
    dialog = [{"dialog": ["hi", "hello!", f"num {i}?", f"{i}"]} for i in range(3)]
    for rows, col in ((turns, "turns"), (dialog, "dialog")):
        with pytest.raises(FtUsageError, match=f'--map "{col}=messages"'):
            D.prepare(rows, tok, cfg())
        train, _, report = D.prepare(rows, tok, cfg(map=f"{col}=messages"))
        assert report.format == "chat"
    recs, _ = D.normalise(turns, column_map="turns=messages")
    assert [(m["role"], m["content"]) for m in recs[0].messages] == [
        ("user", "hi"), ("assistant", "hello"), ("user", "n0"), ("assistant", "0")]
    recs, _ = D.normalise(dialog, column_map="dialog=messages")
    assert [m["role"] for m in recs[2].messages] == ["user", "assistant"] * 2 and recs[2].messages[3]["content"] == "2"
    with pytest.raises(FtUsageError, match=r"row 2, message 1: the dialog's utterances are plain strings \(message 0 "
                                           r"is one\), and this one is a number"):
        D.normalise([dialog[0], {"dialog": ["hi", 5]}], column_map="dialog=messages")
    recs, _ = D.normalise([{"dialog": ["only a question"]}], column_map="dialog=messages")  # no answer: dropped later
    assert recs[0].messages == [{"role": "user", "content": "only a question"}]
    ok = {"prompt": "q", "completion": "a"}
    with pytest.raises(FtUsageError, match=r"^variable v, index 2: "):
        D.prepare("v", tok, cfg(), namespace={"v": [ok, ok, {"prompt": "q", "completion": 3.5j}]})


def test_the_example_of_a_long_prompt_still_shows_where_the_loss_falls(tok):
    """The report's Example was cut after 600 characters: behind a long system prompt (a tool schema) it never
    reached the answer, so the dry run could not show what carries loss."""
    system = "You are a tool user. " * 60
    rows = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": "What is the weather?"},
                          {"role": "assistant", "content": "Sunny and warm today."}]}] * 3
    _, _, report = D.prepare(rows, tok, cfg(max_seq_len=2048))
    assert "⟦Sunny and warm today." in report.example and "What is the weather?" in report.example
    assert " characters] … " in report.example and len(report.example) < 600


def test_a_folder_with_a_dataset_info_json_beside_its_files_is_read_by_its_files(tmp_path):
    """LLaMA-Factory's data/ folder (and some hub downloads) hold dataset_info.json beside the data files: the folder
    was taken for a save_to_disk folder and refused ("neither a Dataset directory nor a DatasetDict directory"), and
    without split names the metadata file was read as a row."""
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    for name in ("split", "plain"):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / ("train.jsonl" if name == "split" else "mine.jsonl"), rows)
        (tmp_path / name / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}))
    write_jsonl(tmp_path / "split" / "test.jsonl", rows[:3])
    read, _ = D.load_rows(str(tmp_path / "split"))
    assert len(read) == 8 and read.file_splits is not None
    read, _ = D.load_rows(str(tmp_path / "plain"))
    assert list(read) == rows


def test_a_column_of_true_false_verdicts_beside_the_answers_is_named(tok, tmp_path):
    """KTO-style rows (prompt, completion, label: true/false) trained every answer as a good one without a word,
    those labelled false too; the report now says the column is not used and how to keep the good rows."""
    from ft_magics.config import TrainConfig

    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(6)]
    _, _, report = D.prepare(rows, tok, TrainConfig.from_dict({}))
    note, = [w for w in report.warnings if "true/false verdicts" in w]
    assert "column 'label'" in note and "the 3 marked false too" in note
    csv = tmp_path / "kto.csv"
    csv.write_text("prompt,completion,desirable\nq1,a1,True\nq2,a2,False\n", encoding="utf-8")
    _, _, report = D.prepare(str(csv), tok, TrainConfig.from_dict({}))
    assert any("column 'desirable' holds true/false verdicts" in w for w in report.warnings)
    tools = [dict(r, label=True, parallel_tool_calls=False) for r in rows]  # OpenAI's field: no verdict
    _, _, report = D.prepare(tools, tok, TrainConfig.from_dict({}))
    assert not any("verdicts" in w for w in report.warnings)
    all_good = [dict(r, label=True) for r in rows]
    _, _, report = D.prepare(all_good, tok, TrainConfig.from_dict({}))
    assert not any("verdicts" in w for w in report.warnings)


def test_a_model_folder_a_folder_of_subfolders_and_a_mixed_list_say_what_they_are(tmp_path, tiny_model_dir, tok):
    """--data on a model folder read config.json and tokenizer.json as data and listed their keys; a folder whose
    data sits in a subfolder said it held no data files; a list of dicts and strings said 'item 1 is a str; a
    list must hold dicts or strings'."""
    with pytest.raises(FtUsageError, match=r"holds a model \(config.json and weights\), not data.*%qlora_load"):
        load(str(tiny_model_dir))
    (tmp_path / "f" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "f" / "sub" / "x.jsonl", [{"text": "hi"}])
    with pytest.raises(FtUsageError, match=r"its subfolders are not searched, and sub/ holds data: --data .*f/sub reads"):
        load(str(tmp_path / "f"))
    # with data of its own too, the subfolders' files were left out without a word (half the data)
    write_jsonl(tmp_path / "f" / "top.jsonl", [{"text": "hello there"}] * 4)
    (tmp_path / "f" / "sub" / "deeper").mkdir()
    write_jsonl(tmp_path / "f" / "sub" / "deeper" / "y.jsonl", [{"text": "more"}] * 4)
    _, _, report = D.prepare(str(tmp_path / "f"), tok, cfg())
    pattern = str(tmp_path / "f" / "**" / "*.jsonl")
    assert f"not read: sub/deeper/y.jsonl, sub/x.jsonl in its subfolders (a folder's own files are read; --data " \
           f"'{pattern}' reads every level)" in report.text()
    assert len(D.prepare(pattern, tok, cfg())[0]) == 9  # what it advises reads them all
    with pytest.raises(FtUsageError, match=r"item 1 is a str \(item 0 is a dict: the items may not be both\)"):
        load([{"prompt": "q", "completion": "a"}, "a string"])


def test_eval_fraction_on_a_few_rows_says_how_much_it_holds_out(tok):
    """eval_fraction 0.1 of 3 rows holds out one row, a third of the data, without a word."""
    from ft_magics.config import TrainConfig

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    train, ev, report = D.prepare(rows, tok, TrainConfig.from_dict({"eval_fraction": 0.1}))
    assert (len(train), len(ev)) == (2, 1)
    assert "1 row of 3 held out, 33% of the data: too few rows for that fraction" in report.split
    _, _, report = D.prepare(rows * 10, tok, TrainConfig.from_dict({"eval_fraction": 0.1}))
    assert "too few rows" not in report.split


@pytest.mark.parametrize("name", ["d.txt", "d.json", "d.jsonl", "d.csv"])
def test_a_file_not_in_utf8_is_refused_with_the_conversion_that_fits_it(tmp_path, name):
    """Every such file was told to be read with pandas.read_csv(encoding='latin-1'): wrong for text and JSON, and
    for UTF-16 (Windows' 'Unicode' text) it gives text full of NUL characters."""
    body = {"d.txt": "café au lait\n", "d.json": '[{"prompt": "café", "completion": "b"}]',
            "d.jsonl": '{"prompt": "café", "completion": "b"}\n', "d.csv": "prompt,completion\ncafé,b\n"}[name]
    path = tmp_path / name
    path.write_text(body, encoding="utf-16")
    with pytest.raises(FtUsageError, match=r"is UTF-16 text, not UTF-8: save it as UTF-8 \(in Python: .*"
                                           r"encoding='utf-16'\), encoding='utf-8'\)\)"):
        load(str(path))
    path.write_text(body, encoding="latin-1")
    with pytest.raises(FtUsageError) as err:
        load(str(path))
    message = str(err.value)
    assert "not UTF-8" in message and "UTF-16" not in message
    assert ("read_csv" in message) == (name == "d.csv")  # pandas advice only for a CSV


def test_overlong_drop_of_every_example_says_so_not_that_answers_are_missing(tok):
    """Text dropped whole by overlong: drop was blamed on 'all answers empty ... check the answer fields'."""
    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 20}] * 2
    with pytest.raises(FtUsageError, match=r"no training example is left: 2 examples longer than max_seq_len=64 were "
                                           r"dropped \(overlong: drop\)\. Use overlong: truncate or split"):
        D.prepare(rows, tok, cfg(max_seq_len=64, overlong="drop"))


def test_a_plain_model_is_asked_in_the_layout_it_was_trained_on(plain_tok):
    """Without a chat template, training writes each answer followed by a blank line, and the prompt of a later
    turn (chat, --answers on multi-turn rows) joined earlier messages with single line breaks: a layout the
    adapter never saw. The prompt is now the training text up to where the answer starts."""
    from ft_magics.core.inference import build_prompt

    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    text, spans = D._render_plain(msgs)
    assert build_prompt(plain_tok, "Q2", "SYS", msgs[1:3]) == text[:spans[-1][0]] == "SYS\n\nQ1\nA1\n\nQ2\n"
    text, spans = D._render_plain(msgs[1:2] + [{"role": "assistant", "content": "A"}])
    assert build_prompt(plain_tok, "Q1") == text[:spans[-1][0]]


def test_a_split_of_a_dataset_dict_variable_is_named_with_a_colon():
    """--data dd:test was "data file 'dd:test' does not exist": the Hub's owner/name:split spelling, for a
    variable, now reads that split."""
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(_pc("t", 3)),
                               "test": datasets.Dataset.from_list(_pc("e", 2))})
    recs, _ = load("dd:test", namespace={"dd": dd})
    assert [r.messages[0]["content"] for r in recs] == ["eq0", "eq1"]
    with pytest.raises(FtUsageError, match=r"variable 'dd' has no split 'tset' \(did you mean 'test'\?\); its splits: "
                                           r"train, test"):
        load("dd:tset", namespace={"dd": dd})


def test_compressed_data_files_are_read_through_their_decompressor(tmp_path, monkeypatch, tok):
    """train.jsonl.gz, data.csv.bz2, notes.txt.xz read as their uncompressed twins, alone, in a folder, by a glob and
    as split files; a file cut short is refused with its cause (it was refused as an unknown type before)."""
    import bz2
    import gzip
    import lzma

    import pandas as pd

    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"q{i} é", "completion": f"a{i}"} for i in range(5)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(body))
    assert D.load_rows("train.jsonl.gz")[0] == rows
    assert D.load_rows("train.jsonl.gz", max_rows=2)[0] == rows[:2]  # streamed
    assert D.load_rows(str(tmp_path / "train.jsonl.gz"))[0].locs[1].endswith("train.jsonl.gz, line 2")
    csv_text = pd.DataFrame(rows).to_csv(index=False)
    (tmp_path / "data.csv.bz2").write_bytes(bz2.compress(csv_text.encode()))
    assert D.load_rows("data.csv.bz2")[0] == rows
    (tmp_path / "notes.txt.xz").write_bytes(lzma.compress("first line\nsecond line\n".encode()))
    assert D.load_rows("notes.txt.xz", txt_mode="lines")[0] == [{"text": "first line"}, {"text": "second line"}]
    (tmp_path / "recs.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))
    assert D.load_rows("recs.json.gz")[0] == rows
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress((tmp_path / "t.parquet").read_bytes()))
    assert D.load_rows("t.parquet.gz")[0] == rows

    split = tmp_path / "split"
    split.mkdir()
    for name, tag, n in (("train", "t", 5), ("test", "e", 2)):
        (split / f"{name}.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in _pc(tag, n)).encode()))
    for src in ("split", "split/*.gz"):  # the folder's test file evaluates, as an uncompressed one does
        train, evals, report = D.prepare(src, tok, cfg())
        assert _prompts(train, tok) == ["t"] * 5 and _prompts(evals, tok) == ["e"] * 2, src

    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(body)[:-12])
    with pytest.raises(FtUsageError, match=r"cut\.jsonl\.gz ends early: the compressed file is cut short"):
        D.load_rows("cut.jsonl.gz")
    (tmp_path / "plain.gz").write_bytes(gzip.compress(body))
    with pytest.raises(FtUsageError, match=r"unsupported file type '\.gz'.*each also compressed: \.gz, \.bz2, \.xz"):
        D.load_rows("plain.gz")
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "x"}\n{oops}\n'))
    with pytest.raises(FtUsageError, match=r"bad\.jsonl\.gz, line 2: not valid JSON"):
        D.load_rows("bad.jsonl.gz")


def test_a_spreadsheet_s_empty_trailing_columns_are_not_columns(tmp_path):
    """An Excel or Sheets export ends its rows in empty columns ('Question ,  Answer,,'): with two of them the file
    was refused ("the header names more than one column ''"), with one it trained. Columns with no name and no
    data are dropped; two unnamed columns that hold data are still refused."""
    (tmp_path / "x.csv").write_text("Question ,  Answer,,\nHow do I reset it?,Use the link.,,\nWhere is it?,Here.,,\n")
    rows = D.load_rows(str(tmp_path / "x.csv"))[0]
    assert rows == [{"Question": "How do I reset it?", "Answer": "Use the link."},
                    {"Question": "Where is it?", "Answer": "Here."}]
    (tmp_path / "y.csv").write_text("q,a,,\nhi,there,note,more\nho,hum,,\n")  # two unnamed columns with data
    with pytest.raises(FtUsageError, match=r"y\.csv: the header names more than one column ''"):
        D.load_rows(str(tmp_path / "y.csv"))


def test_a_spreadsheet_file_is_told_how_to_read_it(tmp_path):
    (tmp_path / "faq.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    with pytest.raises(FtUsageError, match=r"unsupported file type '\.xlsx'.*A spreadsheet: read it in a cell, "
                                           r"df = pandas\.read_excel\(.*faq\.xlsx', dtype=str\).*then --data df"):
        D.load_rows(str(tmp_path / "faq.xlsx"))


def test_openai_tool_call_turns_without_a_content_field_are_read_as_calls(tok, tmp_path):
    """OpenAI's fine-tuning docs write an assistant tool call with no 'content' key: it was refused ("no 'content'
    field"), while the same row with "content": null trained."""
    row = {"messages": [{"role": "user", "content": "weather in SF?"},
                        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                            "name": "get_weather", "arguments": '{"city": "SF"}'}}]},
                        {"role": "tool", "tool_call_id": "c1", "content": "21.0"},
                        {"role": "assistant", "content": "It is 21 C."}]}
    recs, _ = D.normalise([row])
    assert recs[0].messages[1]["content"] == "" and recs[0].messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    with pytest.raises(FtUsageError, match=r"message 0: no 'content' field \(fields: role, tool_calls\)"):
        D.normalise([{"messages": [{"role": "user", "tool_calls": []}]}])  # only an assistant turn may be a bare call


def test_a_dataframe_s_empty_cells_read_as_a_csv_file_s_and_a_null_names_the_user_s_column(tok):
    """pandas reads an empty cell as NaN: a DataFrame with one was refused, while the same CSV file given by path
    dropped the row and counted it; and the refusal's fix named 'completion', a column the DataFrame lacks."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"Question": ["a?", "b?", "c?"], "Answer": ["x", float("nan"), "z"]})
    train, _, report = D.prepare(df, tok, cfg())
    assert len(train) == 2 and report.dropped_empty == 1
    with pytest.raises(FtUsageError, match=r"field 'Answer' is missing or null\. Fill it, or drop such rows \(for a "
                                           r"DataFrame: df\.dropna\(subset=\['Answer'\]\)\)"):
        D.normalise([{"Question": "a?", "Answer": "x"}, {"Question": "b?", "Answer": None}])
    with pytest.raises(FtUsageError, match=r"field 'reply' is missing or null"):
        D.normalise([{"q": "a?", "reply": None}], column_map="q=prompt,reply=completion")


def test_a_null_in_a_table_is_an_empty_cell_wherever_the_table_comes_from(tok, tmp_path):
    """A parquet file's null, a datasets table's and a DataFrame object column's None were refused ("missing or
    null"), while the same table's text column (NaN) or a CSV file's empty cell dropped the row and counted it."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"prompt": ["a?", "b?", "c?", None], "completion": ["x", None, "z", "w"]}, dtype=object)
    df.to_parquet(tmp_path / "t.parquet")
    df.astype(str).where(df.notna(), "").to_csv(tmp_path / "t.csv", index=False)
    seen = []
    for src in (df, str(tmp_path / "t.parquet"), str(tmp_path / "t.csv")):
        train, _, report = D.prepare(src, tok, cfg())
        seen.append((len(train), report.dropped_empty, any("blank prompt" in w or "empty prompt" in w
                                                           for w in report.warnings)))
    assert seen == [(3, 1, True)] * 3, seen
    (tmp_path / "m.parquet").unlink(missing_ok=True)
    pd.DataFrame({"messages": [CHAT[0]["messages"], None]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(FtUsageError, match=r"m\.parquet, row 2: the messages are missing \(an empty or null cell\)"):
        D.prepare(str(tmp_path / "m.parquet"), tok, cfg())
    write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a?", "completion": None}])  # JSON wrote its null: refused
    with pytest.raises(FtUsageError, match=r"n\.jsonl, line 1: field 'completion' is missing or null"):
        D.prepare(str(tmp_path / "n.jsonl"), tok, cfg())


def test_messages_about_odd_rows_point_at_the_row_and_a_fix_that_keeps_the_data(tok, tmp_path):
    """Four messages that misled: a row lacking its answer was told to use --map "prompt=text" (which trains every
    row's question as plain text and drops every answer); a list ['ok', 5] blamed item 0; a dict of columns of
    different lengths was told a dict is no data at all; a DataFrame's row was named by its position, so "row 4" of a
    filtered frame was not df.loc[4]."""
    pd = pytest.importorskip("pandas")
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    del rows[3]["completion"]
    with pytest.raises(FtUsageError, match=r"m\.jsonl, line 4: .*needs field\(s\) 'completion'; this row has prompt\. "
                                           r"The dataset's other rows have 'completion': add it to this row, or remove "
                                           r"the row\.$"):
        load(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    for items, complaint in ((["ok", 5, None], r"item 1 is an int \(item 0 is a string\)"),
                             (["a", "b", None], r"item 2 is None \(item 0 is a string\)"),
                             ([{"text": "a"}, "b"], r"item 1 is a str \(item 0 is a dict: the items may not be both\)")):
        with pytest.raises(FtUsageError, match=complaint):
            D.load_rows("v", {"v": items})
    with pytest.raises(FtUsageError, match=r"variable 'v' is a dict of columns of different lengths \(prompt 2, "
                                           r"completion 1\)"):
        D.load_rows("v", {"v": {"prompt": ["a", "b"], "completion": ["c"]}})
    df = pd.DataFrame({"prompt": [f"Q{i}" for i in range(6)], "completion": [f"A{i}" for i in range(6)]},
                      index=[10, 20, 30, 40, 50, 60], dtype=object)
    df.loc[40, "completion"] = True
    with pytest.raises(FtUsageError, match=r", index 40: field 'completion' is a boolean"):
        D.prepare(df, tok, cfg())
    df.loc[40, "completion"], df.loc[50, "prompt"] = "A3", ""
    _, _, report = D.prepare(df.sample(frac=1, random_state=1), tok, cfg())
    assert any("a blank user turn: <DataFrame>, index 50)" in w for w in report.warnings), report.warnings


def test_a_jsonl_line_that_is_no_object_is_named_in_json_s_words(tmp_path):
    for line, kind in (("null", "JSON null"), ('"text"', "a JSON string"), ("[1]", "a JSON array"), ("3", "a JSON number")):
        (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
        with pytest.raises(FtUsageError, match=rf"d\.jsonl, line 2: {kind}, where each line is one example, an object"):
            D.load_rows(str(tmp_path / "d.jsonl"))


def test_a_chat_without_an_assistant_turn_is_dropped_and_left_out_of_the_token_lines(tok):
    chats = [{"messages": [{"role": "user", "content": f"question number {i} " * 3},
                           {"role": "assistant", "content": f"answer {i} " * 3}]} for i in range(6)]
    lone = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    train, _, report = D.prepare(chats + [lone], tok, cfg())
    assert len(train) == 6 and report.dropped_empty == 1 and len(report.lengths) == 6
    assert "0 of 6 examples exceed" in report.text() and "or no assistant turn at all" in report.text()


def test_a_variable_holding_a_path_says_how_to_read_the_file(tmp_path):
    with pytest.raises(FtUsageError, match=r"variable 'path' is a str; .* write --data \$path \(IPython puts"):
        D.load_rows("path", namespace={"path": str(tmp_path / "qa.csv")})


def test_a_special_token_spelled_in_the_data_is_warned_about(tok):
    """'<|im_end|>' written inside an answer is read as the end-of-turn token: the model learned to stop there,
    and the printed example could not show it (it decodes to the same text)."""
    end = next(t for t in tok.all_special_tokens if "end" in t)
    rows = [{"prompt": f"q{i}", "completion": f"It is {end} literally." if i < 2 else f"a{i}"} for i in range(6)]
    _, _, report = D.prepare(rows, tok, cfg())
    warned = [w for w in report.warnings if "spells special tokens" in w]
    assert len(warned) == 1 and f"{end!r} (2 examples)" in warned[0] and "first at <list>, index 0" in warned[0]
    _, _, clean = D.prepare([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)], tok, cfg())
    assert not [w for w in clean.warnings if "spells special tokens" in w]


def test_answers_cut_away_at_the_model_s_context_are_not_told_to_raise_max_seq_len():
    """A prompt longer than the model reads: the Dropped line said 'raise max_seq_len to keep them' just under the
    line saying no max_seq_len keeps it whole."""
    def text(max_len, context):
        return D.DataReport(source="s", format="prompt-completion", rows=3, train_rows=3, eval_rows=0, lengths=[9000, 9, 9],
                            dropped_no_answer=1, max_seq_len=max_len, context=context).text()
    assert "prompts alone fill the 512 tokens the model reads: shorten those prompts" in text(512, 512)
    assert "raise max_seq_len to keep them" not in text(512, 512)
    assert "raise max_seq_len to keep them" in text(256, 2048)


def test_blank_plain_texts_are_dropped_and_counted_as_texts(tok):
    """A text of spaces trained as whitespace + end of text while an empty one was dropped, the Dropped line spoke
    of answers and turns, and a warning counted the empty ones a second time."""
    train, _, report = D.prepare(["hello world", "", "   ", "\n\t", "more text here"], tok, cfg())
    assert len(train) == 2 and report.dropped_empty == 3
    text = report.text()
    assert "Dropped    3 examples (<list>, indexes 1, 2, 3) with no text to learn from (empty or blank)" in text
    assert "answer" not in text
    assert not [w for w in report.warnings if "empty" in w]


def test_a_conversation_without_an_assistant_turn_is_dropped_with_that_reason_named(tok):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)] + [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}]
    train, _, report = D.prepare(rows, tok, cfg())
    assert len(train) == 4 and report.dropped_empty == 1
    assert "with no answer to learn from (empty or blank: it would teach the model to end its turn at once; or no " \
           "assistant turn at all)" in report.text()


def test_reading_a_large_dataset_reports_its_progress_and_an_interrupt_there_ends_in_one_line(tok, shell,
                                                                                             tiny_model_dir,
                                                                                             monkeypatch):
    """41,000 rows took 35 s with nothing on the screen, and the stop button then printed 40 lines of traceback
    through the tokenizer."""
    from IPython.core.error import UsageError

    from ft_magics.core.events import Message
    from ft_magics.session import Session, _progress_lines

    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(2500)]
    seen = []
    with D.data_progress(lambda stage, done, total: seen.append((stage, done, total))):
        D.prepare(rows, tok, cfg())
    assert [s for s in seen if s[0] == "rendering"] == [("rendering", 1024, 2500), ("rendering", 2048, 2500),
                                                        ("rendering", 2500, 2500)]
    assert seen[-1] == ("tokenising", 2500, 2500)
    from ft_magics.core.events import Recorder

    recorder = Recorder()
    report = _progress_lines([recorder], after_s=0.0, every_s=0.0)
    report("tokenising", 1024, 2500)
    report("tokenising", 2500, 2500)  # done: the data report follows at once
    texts = [e.text for e in recorder.events if isinstance(e, Message)]
    assert len(texts) == 1 and texts[0].startswith("reading the data: tokenising 1,024 of 2,500 examples (41%), ")
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "prepare_data", interrupted)
    with pytest.raises(UsageError, match="%%lora_train big interrupted before its first step: nothing was trained or "
                                         "saved, and the model and adapters are as they were"):
        shell.run_line_magic("lora_train", "big --data demo:support --max-steps 2 --no-widgets")


def test_a_file_cut_short_and_a_headerless_table_are_named_for_what_they_are(tok, tmp_path):
    """A JSONL file whose last line stops mid-object was refused as any bad line; a CSV without its header line had
    its first row suggested as column names in a --map that --map itself refuses (a name holding a comma)."""
    rows = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(3)]
    (tmp_path / "cut.jsonl").write_text("\n".join(rows) + "\n" + rows[0][:20] + "\n\n")
    with pytest.raises(FtUsageError, match=r"cut.jsonl, line 4: not valid JSON \(Unterminated string .*\)\. It is the "
                                           r"file's last line and it stops mid-object: the file looks cut short"):
        D.load_rows(str(tmp_path / "cut.jsonl"))
    (tmp_path / "mid.jsonl").write_text(rows[0][:20] + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(FtUsageError, match=r"mid.jsonl, line 1: .*Each line of a \.jsonl file must be one JSON") as err:
        D.load_rows(str(tmp_path / "mid.jsonl"))
    assert "cut short" not in str(err.value)
    (tmp_path / "noheader.csv").write_text('How do I reset?,"Go to settings, then security."\n'
                                           "Where is my order?,Check the orders page.\n")
    with pytest.raises(FtUsageError, match=r"cannot tell the dataset format") as err:
        D.prepare(str(tmp_path / "noheader.csv"), tok, cfg())
    assert "--map \"" not in str(err.value)
    assert ("The column names read like a first row of data, not names: a table's first line names its columns, so "
            "add one (e.g. prompt,completion) at the top of the file (no --map can name a column holding ',' or '=')."
            ) in str(err.value)
    (tmp_path / "named.csv").write_text("Question,Reply\nWhere is my order?,Check the orders page.\n")
    with pytest.raises(FtUsageError, match=r'For these columns: --map "Question=prompt,Reply=completion"\.$'):
        D.prepare(str(tmp_path / "named.csv"), tok, cfg())


def test_sharegpt_keys_in_capitals_read_as_the_list_key_does():
    """'Conversations' was matched whatever its case, but its messages' 'From'/'Value' were refused as no role."""
    recs, fmt = load([{"Conversations": [{"From": "human", "Value": "hi"}, {"From": "gpt", "Value": "yo"}]}])
    assert fmt.startswith("sharegpt") and recs[0].messages == [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]
    recs, _ = load([{"messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}]}])
    assert recs[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_a_percentage_for_a_fraction_says_how_to_write_it():
    from ft_magics.config import TrainConfig

    with pytest.raises(FtUsageError, match=r"^eval_fraction must be a number, got '10%' \(a percentage is written as "
                                           r"a fraction here: 0\.1 for 10%\)\.$"):
        TrainConfig.from_dict({"eval_fraction": "10%"})
    with pytest.raises(FtUsageError, match=r"^eval_fraction must be in \[0, 1\) \(got 10\); it is a fraction of the "
                                           r"rows: 0\.1 holds out 10%\.$"):
        TrainConfig.from_dict({"eval_fraction": 10})
    with pytest.raises(FtUsageError, match=r"^eval_fraction must be in \[0, 1\) \(got 150\)\.$"):
        TrainConfig.from_dict({"eval_fraction": 150})


def test_dropped_rows_are_named_where_they_are(tok, tmp_path):
    """'Dropped 2 examples with no answer' named no rows, though the blank-prompt warning beside it did."""
    rows = [{"prompt": f"q{i}", "completion": "" if i in (2, 5) else f"a{i}"} for i in range(8)]
    _, _, report = D.prepare(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, cfg())
    line = next(ln for ln in report.text().splitlines() if ln.startswith("Dropped"))
    assert line.startswith("Dropped    2 examples (") and "d.jsonl, lines 3, 6)" in line, line
    _, _, report = D.prepare([{"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "yo", "weight": w}]} for w in (1, 0)],
                             tok, cfg())
    assert "Dropped    1 example (<list>, index 1) whose every answer has weight 0" in report.text()


def test_an_adapters_card_names_why_rows_were_dropped(tiny_session):
    rows = [{"prompt": f"Question {i}?", "completion": "" if i < 2 else "Category: account"} for i in range(12)]
    run = tiny_session.train("dr2", rows, {"max_steps": 1, "batch_size": 4}, listeners=[])
    assert run.record["data"]["dropped"] == {"dropped_empty": 2}
    assert "10 trained on, 2 dropped (2 with no answer (empty or blank))" in tiny_session.adapter_card("dr2")


def test_a_stray_file_in_a_data_folder_is_named_with_the_pattern_that_leaves_it_out(tok, tmp_path):
    """A notes.txt beside a folder's parquet parts was refused as rows "in another format" with advice to convert
    columns, not to move the file out or read the parquet files alone."""
    import pandas as pd

    (tmp_path / "fold").mkdir()
    pd.DataFrame([{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2"}]).to_parquet(
        tmp_path / "fold" / "part1.parquet")
    (tmp_path / "fold" / "notes.txt").write_text("some notes here\n")
    with pytest.raises(FtUsageError, match=r"\(if notes\.txt is no part of the data, move it out of the folder, or "
                                           r"read the folder's \.parquet files alone: --data '.*fold/\*\.parquet'\)"):
        D.prepare(str(tmp_path / "fold"), tok, cfg())
    train, _, _ = D.prepare(str(tmp_path / "fold" / "*.parquet"), tok, cfg())  # the pattern it names reads
    assert len(train) == 2
