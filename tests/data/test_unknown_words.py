"""Words the backbone's tokenizer does not know: the backbone method, the report, the data
check and the stop before training (``data.allow_unknown_answers``)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fedumm.cli import main
from fedumm.data.records import Sample
from fedumm.data.vocabulary import (
    UnknownAnswersError,
    check_answers,
    split_words,
    unknown_word_report,
)
from fedumm.models.reference.micro import MICRO_IMAGE_SIZE
from fedumm.models.reference.text_tokenizer import TextTokenizer
from fedumm.models.vocabulary import tokenizer_unknown_words
from makers import run_cli


def test_reference_unknown_words_are_the_words_outside_its_vocabulary(micro_checkpoint):
    from fedumm.models.reference.backbone import ReferenceBackbone

    text = "Is there a beige Triangle left of the banana? yes, twice."
    # known after lower-casing: is there a triangle left of the ? yes , .
    expected = ["beige", "banana", "twice"]
    assert TextTokenizer.default().unknown_words(text) == expected
    assert ReferenceBackbone.load(micro_checkpoint).unknown_words(text) == expected
    assert TextTokenizer.default().unknown_words("what color is the circle?") == []
    assert split_words("what's left?") == ["what", "'", "s", "left", "?"]


def _word_level(with_unk: bool) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, "what": 2, "color": 3, "is": 4, "the": 5, "?": 6}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                   unk_token="[UNK]" if with_unk else None)


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                  .alphabet(), show_progress=False)
    tok.train_from_iterator(["what color is the square"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_hf_tokenizer_unknown_words_through_its_unk_token():
    tok = _word_level(True)
    assert tok.unk_token_id == 0
    assert tokenizer_unknown_words(tok, "What colour is the kumquat, mate?") == [
        "colour", "kumquat", ",", "mate"]
    assert tokenizer_unknown_words(tok, "what color is the?") == []
    # a byte-level BPE knows every string; no unk token: nothing is unknown
    bpe = _byte_level()
    assert bpe.unk_token_id is None
    assert tokenizer_unknown_words(bpe, "Qu'est-ce que c'est, kumquat? 字") == []


def _und(i: int, question: str, answer: str) -> Sample:
    return Sample(id=f"q{i}", task="understanding", image=None, text=question,
                  answer=answer)


def _gen(i: int, prompt: str) -> Sample:
    return Sample(id=f"g{i}", task="generation", image=None, text=prompt)


def test_report_counts_shares_and_the_most_frequent_unknown_words():
    known = {"what", "color", "is", "the", "a", "photo", "of", "red", "circle", "square", "?"}

    def unknown(text: str) -> list[str]:
        return [w for w in split_words(text) if w not in known]

    train = [_und(0, "what color is the kumquat?", "red"),          # 6 words, 1 unknown
             _und(1, "what color is the kumquat?", "orange"),       # again; answer unknown
             _und(2, "what hue is the fig?", "red"),                # 6 words, 2 unknown
             _gen(3, "a photo of a red circle"),                    # 6 words, 0
             _gen(4, "a photo of a teal teal square")]              # 7 words, 2 (teal twice)
    val = [_und(5, "what color is the circle?", "maroon")]
    report = unknown_word_report({"train": train, "val": val}, unknown)
    q = report["train"]["question"]
    assert (q["texts"], q["texts_with_unknown"], q["words"], q["unknown"]) == (3, 3, 18, 4)
    assert q["share"] == round(4 / 18, 6)
    assert q["top"] == [["kumquat", 2], ["fig", 1], ["hue", 1]]  # ties alphabetical
    a = report["train"]["answer"]
    assert (a["words"], a["unknown"], a["texts_with_unknown"], a["top"]) == (
        3, 1, 1, [["orange", 1]])
    p = report["train"]["prompt"]
    assert (p["words"], p["unknown"], p["top"]) == (13, 2, [["teal", 2]])
    assert report["val"]["answer"]["top"] == [["maroon", 1]]
    assert report["val"]["prompt"] == {"texts": 0, "texts_with_unknown": 0, "words": 0,
                                       "unknown": 0, "share": 0.0, "top": []}
    many = [_und(i, "q", f"w{i % 12} w{i % 12}") for i in range(24)]
    assert len(unknown_word_report({"t": many}, unknown)["t"]["answer"]["top"]) == 10

    with pytest.raises(UnknownAnswersError, match=r"1 of 3 train answers .*'orange' \(1\).*"
                       r"data\.allow_unknown_answers=true"):
        check_answers(report, allow=False)
    check_answers(report, allow=True)


@pytest.fixture()
def files(tmp_path):
    """LLaVA files exported at the micro model's image size, with an unknown question word
    and an unknown answer word."""
    out = tmp_path / "files"
    assert main(["data", "export", "--format", "llava", "--scenes", "8", "--out", str(out),
                 "--image-size", str(MICRO_IMAGE_SIZE)]) == 0
    records = json.loads((out / "llava.json").read_text())
    records[0]["conversations"][0]["value"] = "<image>\nwhat colour is the ring?"
    records[1]["conversations"][1]["value"] = "magenta"
    held_out = [{**r, "id": f"val-{r['id']}"} for r in records]  # known words only
    (out / "val.json").write_text(json.dumps(held_out))
    (out / "llava.json").write_text(json.dumps(records))
    return out


def test_data_check_reports_unknown_words_of_a_files_config(files, capsys):
    args = ["data", "check", "data.format=files", f"data.understanding={files}/llava.json",
            f"data.generation={files}/t2i", "data.heldout_fraction=0"]
    assert main([*args, "--json"]) == 0
    unknown = json.loads(capsys.readouterr().out)["unknown_words"]
    assert unknown["backbone"] == "reference"
    assert unknown["train"]["question"]["top"] == [["colour", 1]]
    assert unknown["train"]["answer"]["top"] == [["magenta", 1]]
    assert unknown["train"]["prompt"]["unknown"] == 0
    assert "magenta" in unknown["run_stops"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train: words unknown to the tokenizer: question 1/" in out
    assert "colour (1)" in out and "a run would stop: 1 of" in out
    # a backbone that cannot be built: one line, and the check goes on
    assert main([*args, "backbone.path=/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert "unknown words: not checked: the backbone could not be built" in out
    assert out.rstrip().endswith("ok: every record and image path was read and checked")


def test_a_run_with_unknown_training_answers_stops_unless_allowed(files, micro_checkpoint,
                                                                 tmp_path):
    args = ["run", "configs/quickstart.yaml", "data.format=files",
            f"data.understanding={files}/llava.json", f"data.generation={files}/t2i",
            f"data.understanding_val={files}/val.json", f"backbone.path={micro_checkpoint}",
            f"data.image_size={MICRO_IMAGE_SIZE}", "rounds=1", "clients=2",
            "partition.method=iid", "train.max_steps=1", "train.batch_size=4", "eval.max_vqa=2",
            "eval.max_gen=1", "train.threads=1", "--quiet"]
    code, err = run_cli([*args, "--out", str(tmp_path / "stopped")])
    assert code == 2, err
    assert err.startswith("fedumm: error: 1 of ") and "'magenta' (1)" in err
    assert "data.allow_unknown_answers=true" in err
    assert not (tmp_path / "stopped" / "checkpoint").exists()  # stopped before training
    code, err = run_cli([*args, "data.allow_unknown_answers=true", "--out",
                         str(tmp_path / "allowed")])
    assert code == 0, err
    data = json.loads((tmp_path / "allowed" / "data.json").read_text())["unknown_words"]
    assert data["train"]["answer"]["top"] == [["magenta", 1]]
