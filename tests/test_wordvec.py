"""Word vectors for the embedding (astar.train.wordvec), on small generated files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

import astar.train.wordvec as wordvec
from astar.pipelines.vocab import EOS_ID, PAD_ID, UNK_ID, Vocabulary
from astar.train.wordvec import WordVectorsError, detect_format, load_word_vectors

DIM = 5


@pytest.fixture
def vocabulary() -> Vocabulary:
    # ids: 3 a, 4 dog, 5 paris, 6 runs, 7 zebra
    return Vocabulary(["a", "dog", "paris", "runs", "zebra"], max_length=5)


@pytest.fixture
def file_vectors() -> dict[str, np.ndarray]:
    """A file's words in file order; "Paris" only capitalised, "dog" both ways, no "zebra"."""
    rng = np.random.default_rng(7)
    words = ["the", "Dog", "a", "runs", "Paris", "dog", "naïve", "house"]
    return {w: rng.normal(size=DIM).astype(np.float32) for w in words}


def write_binary(path, vectors, newline_after_vector=False):
    with open(path, "wb") as handle:
        handle.write(f"{len(vectors)} {DIM}\n".encode())
        for word, vector in vectors.items():
            handle.write(word.encode() + b" " + vector.astype("<f4").tobytes())
            if newline_after_vector:  # word2vec's own writer; GoogleNews has none
                handle.write(b"\n")
    return path


def write_text(path, vectors, header=True):
    lines = [f"{len(vectors)} {DIM}"] if header else []
    lines += [w + " " + " ".join(f"{x:.8g}" for x in v) for w, v in vectors.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_matrix(result, vocabulary, vectors):
    matrix = result.matrix
    assert matrix.shape == (len(vocabulary), DIM) and matrix.dtype == np.float32
    np.testing.assert_allclose(matrix[3], vectors["a"], rtol=1e-6)
    np.testing.assert_allclose(matrix[4], vectors["dog"], rtol=1e-6)  # exact beats "Dog"
    np.testing.assert_allclose(matrix[5], vectors["Paris"], rtol=1e-6)  # case-folded fallback
    np.testing.assert_allclose(matrix[6], vectors["runs"], rtol=1e-6)
    assert not matrix[PAD_ID].any()
    for row in (EOS_ID, UNK_ID, 7):  # eos, unk and the missing "zebra" start small and random
        assert np.abs(matrix[row]).max() <= 0.01 and np.abs(matrix[row]).max() > 0
    assert result.found.tolist() == [False, False, False, True, True, True, True, False]
    assert result.oov_rate == pytest.approx(1 / 5)
    assert result.file_words == len(vectors)


@pytest.mark.parametrize("newline", [False, True])
def test_word2vec_binary(tmp_path, vocabulary, file_vectors, newline, monkeypatch):
    # A tiny read block makes entries straddle block boundaries, as they do in the 3.6 GB file.
    monkeypatch.setattr(wordvec, "_BLOCK", 7)
    path = write_binary(tmp_path / "vectors.bin", file_vectors, newline)
    assert detect_format(path) == "word2vec-binary"
    result = load_word_vectors(path, vocabulary, dim=DIM)
    assert result.format == "word2vec-binary"
    check_matrix(result, vocabulary, file_vectors)


def test_word2vec_text_and_glove(tmp_path, vocabulary, file_vectors):
    text = write_text(tmp_path / "vectors.txt", file_vectors, header=True)
    glove = write_text(tmp_path / "glove.txt", file_vectors, header=False)
    assert detect_format(text) == "word2vec-text"
    assert detect_format(glove) == "glove"
    for path in (text, glove):
        check_matrix(load_word_vectors(path, vocabulary), vocabulary, file_vectors)


def test_gzipped_file(tmp_path, vocabulary, file_vectors):
    plain = write_binary(tmp_path / "vectors.bin", file_vectors)
    packed = tmp_path / "vectors.bin.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    check_matrix(load_word_vectors(packed, vocabulary), vocabulary, file_vectors)


def test_missing_rows_are_seeded(tmp_path, vocabulary, file_vectors):
    path = write_text(tmp_path / "glove.txt", file_vectors, header=False)
    first = load_word_vectors(path, vocabulary, seed=3).matrix
    np.testing.assert_array_equal(first, load_word_vectors(path, vocabulary, seed=3).matrix)
    other = load_word_vectors(path, vocabulary, seed=4).matrix
    assert not np.array_equal(first[7], other[7])
    np.testing.assert_array_equal(first[3], other[3])  # found rows do not depend on the seed


def test_glove_words_with_spaces(tmp_path):
    vocabulary = Vocabulary(["dog"], max_length=3)
    # The dimension comes from the first line, so a later word may contain spaces.
    (tmp_path / "g.txt").write_text("dog 3 4\nnew york 1 2\n")
    result = load_word_vectors(tmp_path / "g.txt", vocabulary, format="glove")
    np.testing.assert_array_equal(result.matrix[3], [3, 4])
    assert result.file_words == 2 and result.oov_rate == 0


def test_truncated_binary_file_is_an_error(tmp_path, vocabulary, file_vectors):
    path = write_binary(tmp_path / "vectors.bin", file_vectors)
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(WordVectorsError, match=r"truncated.*entry 8"):
        load_word_vectors(path, vocabulary)


def test_bad_text_files_name_the_line(tmp_path, vocabulary, file_vectors):
    path = write_text(tmp_path / "vectors.txt", file_vectors, header=False)
    lines = path.read_text().splitlines()
    lines[2] = "a 1 2"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(WordVectorsError, match=r"vectors.txt, line 3: expected a word and 5"):
        load_word_vectors(path, vocabulary)
    lines[2] = "a 1 2 x 4 5"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(WordVectorsError, match=r"line 3: the vector of 'a' is not numeric"):
        load_word_vectors(path, vocabulary)


def test_header_count_and_dimension_are_checked(tmp_path, vocabulary, file_vectors):
    path = write_text(tmp_path / "vectors.txt", file_vectors, header=True)
    with pytest.raises(WordVectorsError, match="5 dimensions, the embedding expects 300"):
        load_word_vectors(path, vocabulary, dim=300)
    text = path.read_text().replace(f"{len(file_vectors)} {DIM}", f"99 {DIM}", 1)
    path.write_text(text)
    with pytest.raises(WordVectorsError, match="promises 99 words, the file holds 8"):
        load_word_vectors(path, vocabulary, format="word2vec-text")
    with pytest.raises(WordVectorsError, match="no such"):
        load_word_vectors(tmp_path / "absent.bin", vocabulary)
