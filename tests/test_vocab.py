"""The captioner's vocabulary (astar.pipelines.vocab)."""

from __future__ import annotations

import json

import pytest

from astar.pipelines.vocab import (
    EOS_ID,
    PAD_ID,
    UNK_ID,
    VocabConfig,
    Vocabulary,
    VocabularyError,
)

CAPTIONS = [
    "A dog runs.",
    "a dog jumps",
    "The cat runs!",
    "a bird",
]


@pytest.fixture
def vocabulary() -> Vocabulary:
    return Vocabulary.build(CAPTIONS)


def test_special_tokens_have_fixed_ids(vocabulary):
    assert vocabulary.words[:3] == ("<pad>", "<eos>", "<unk>")
    assert (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    assert "<bos>" not in vocabulary  # the first word comes from fc7


def test_words_ordered_by_count_then_alphabet(vocabulary):
    # a:3, dog:2, runs:2, then bird, cat, jumps, the (1 each, alphabetical)
    assert vocabulary.words[3:] == ("a", "dog", "runs", "bird", "cat", "jumps", "the")
    assert len(vocabulary) == 10
    assert vocabulary.max_length == 3  # longest caption in words


def test_min_count_sends_rare_words_to_unknown():
    vocabulary = Vocabulary.build(CAPTIONS, min_count=2)
    assert vocabulary.words[3:] == ("a", "dog", "runs")
    assert vocabulary.encode("a cat runs") == [3, UNK_ID, 5, EOS_ID]
    assert vocabulary.unknown_rate(["a cat runs", "the bird"]) == pytest.approx(3 / 5)


def test_encode_normalises_appends_eos_and_truncates_keeping_eos(vocabulary):
    assert vocabulary.encode("A DOG, runs!") == [3, 4, 5, EOS_ID]
    assert vocabulary.encode("zebra") == [UNK_ID, EOS_ID]
    assert vocabulary.encode("") == [EOS_ID]
    short = Vocabulary.build(CAPTIONS, max_length=2)
    assert short.encode("a dog runs") == [3, 4, EOS_ID]


def test_decode_stops_at_eos_and_skips_padding(vocabulary):
    assert vocabulary.decode([3, 4, 5, EOS_ID, 6, 7]) == "a dog runs"
    assert vocabulary.decode([3, PAD_ID, 4]) == "a dog"
    assert vocabulary.decode([UNK_ID, 5]) == "<unk> runs"
    assert vocabulary.decode(vocabulary.encode("the cat jumps")) == "the cat jumps"
    with pytest.raises(VocabularyError, match="outside the vocabulary"):
        vocabulary.decode([99])


def test_dict_and_file_round_trip(vocabulary, tmp_path):
    again = Vocabulary.from_dict(json.loads(json.dumps(vocabulary.to_dict())))
    assert again == vocabulary
    assert again.words == vocabulary.words and again.max_length == vocabulary.max_length
    path = vocabulary.save(tmp_path / "vocab.json")
    assert Vocabulary.load(path) == vocabulary


def test_from_dict_refuses_shifted_or_foreign_vocabularies(vocabulary):
    data = vocabulary.to_dict()
    with pytest.raises(VocabularyError, match="special tokens"):
        Vocabulary.from_dict({**data, "special_tokens": ["<pad>", "<bos>", "<eos>", "<unk>"]})
    with pytest.raises(VocabularyError, match="format"):
        Vocabulary.from_dict({**data, "version": 99}, origin="ckpt.pt")
    with pytest.raises(VocabularyError, match="duplicate"):
        Vocabulary.from_dict({**data, "words": ["a", "a"]})
    with pytest.raises(VocabularyError, match="max_length"):
        Vocabulary.from_dict({**data, "max_length": "10"})


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "vocab.json"
    bad.write_text("{not json")
    with pytest.raises(VocabularyError, match=r"vocab\.json: not valid JSON"):
        Vocabulary.load(bad)


def test_nothing_to_build_from_is_an_error():
    with pytest.raises(VocabularyError, match="no words"):
        Vocabulary.build(["", "..."])


def test_config_validation():
    with pytest.raises(VocabularyError, match="min_count"):
        VocabConfig(min_count=0)
    with pytest.raises(VocabularyError, match="source"):
        VocabConfig(source="all")  # type: ignore[arg-type]
