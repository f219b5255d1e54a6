import json
import os

import pytest

from stts_jax.data import manifest


def write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


GOOD = {"video": "clips/a.mp4", "question": "What?", "options": ["x", "y", "z"], "answer": "y", "id": "a",
        "event_window": 3}


def test_read_good_manifest(tmp_path):
  p = write_lines(tmp_path / "m.jsonl", [GOOD, "", {"video": "/abs/b.mp4", "question": "Q", "answer": "free text"},
                                         {**GOOD, "id": 7, "answer": "C"}])
  examples, errors = manifest.read_manifest(p)
  assert errors == [] and len(examples) == 3
  a, b, c = examples
  assert a.video == os.path.join(str(tmp_path), "clips/a.mp4")      # relative to the manifest
  assert a.options == ("x", "y", "z") and a.answer_index == 1 and a.target_text == "B"
  assert a.extra == {"event_window": 3}
  assert b.id == "m.jsonl:3" and b.video == "/abs/b.mp4" and b.answer_index == -1 and b.target_text == "free text"
  assert c.id == "7" and c.answer_index == 2 and c.target_text == "C"
  # round trip
  out = str(tmp_path / "copy.jsonl")
  manifest.write_manifest(out, examples)
  again, _ = manifest.read_manifest(out)
  assert [(e.id, e.video, e.options, e.answer, e.extra) for e in again] == \
         [(e.id, e.video, e.options, e.answer, e.extra) for e in examples]


@pytest.mark.parametrize("line,problem", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"question": "q", "answer": "a"}), r"missing required field\(s\) \['video'\]"),
    (json.dumps({"video": "", "question": "q", "answer": "a"}), "field 'video' must be a non-empty string"),
    (json.dumps({"video": "v", "question": "q", "answer": "a", "options": "x"}), "'options' must be a non-empty list"),
    (json.dumps({"video": "v", "question": "q", "answer": "w", "options": ["x", "y"]}), "answer 'w' is neither one of the options"),
    (json.dumps({"video": "v", "question": "q", "answer": 3}), "field 'answer' must be a non-empty string"),
])
def test_bad_line_names_file_line_and_problem(tmp_path, line, problem):
  p = write_lines(tmp_path / "bad.jsonl", [GOOD, line])
  with pytest.raises(manifest.ManifestError, match=rf"bad\.jsonl:2: {problem}"):
    manifest.read_manifest(p)
  examples, errors = manifest.read_manifest(p, on_error="skip")
  assert [e.id for e in examples] == ["a"]
  assert len(errors) == 1 and "bad.jsonl:2" in errors[0]


def test_duplicate_id_invalid_utf8_and_missing_file(tmp_path):
  p = write_lines(tmp_path / "dup.jsonl", [GOOD, GOOD])
  with pytest.raises(manifest.ManifestError, match=r"dup\.jsonl:2: duplicate id 'a' \(first on line 1\)"):
    manifest.read_manifest(p)
  q = tmp_path / "bin.jsonl"
  q.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe{\n")
  with pytest.raises(manifest.ManifestError, match=r"bin\.jsonl:2: not valid UTF-8"):
    manifest.read_manifest(str(q))
  with pytest.raises(manifest.ManifestError, match="manifest file not found"):
    manifest.read_manifest(str(tmp_path / "none.jsonl"))
