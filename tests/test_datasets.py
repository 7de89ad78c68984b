"""Dataset adapters and the normalised dataset form (astar.pipelines.datasets, prepare-dataset)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from astar.pipelines.cli import prepare_dataset as prepare_cli
from astar.pipelines.datasets import (
    SPLITS,
    Dataset,
    DatasetError,
    PrepareConfig,
    prepare_dataset,
    read_folder,
    read_generic,
    read_msrvtt_official,
    read_msrvtt_sentences,
    read_msvd_corpus,
    read_msvd_mapping,
    read_msvd_sents,
    read_mvad,
)
from astar.pipelines.vocab import VocabConfig, Vocabulary

# --------------------------------------------------------------------------------------------
# Helpers


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def generic_csv(tmp_path, rows, header="video_id,caption,split"):
    return write(tmp_path / "captions.csv", "\n".join([header, *rows]) + "\n")


def small_mapping(tmp_path):
    """Clips vid1 (train), vid1201 (val), vid1301 (test): the standard split by number."""
    return write(
        tmp_path / "youtube_mapping.txt",
        "abc_1_5 vid1\nde_f_G_10_20 vid1201\nxyz_0_3 vid1301\n",
    )


# --------------------------------------------------------------------------------------------
# MSVD


def test_msvd_s2vt_real_files(shared_data):
    msvd = shared_data / "msvd"
    sents = [msvd / f"sents_{s}_lc_nopunc.txt" for s in ("train", "val", "test")]
    dataset = prepare_dataset(read_msvd_sents(sents, msvd / "youtube_mapping.txt"))
    summary = dataset.summary
    assert summary["videos"] == 1970 and summary["captions"] == 80_827
    counts = {s: summary["splits"][s]["videos"] for s in ("train", "val", "test")}
    assert counts == {"train": 1200, "val": 100, "test": 670}
    assert {s: summary["splits"][s]["captions"] for s in counts} == {
        "train": 48_774,
        "val": 4_290,
        "test": 27_763,
    }
    assert summary["videos_without_captions"]["count"] == 0
    assert dataset.split("val").videos["id"].iloc[0] == "vid1201"
    first = dataset.videos.iloc[0]
    assert (first["id"], first["start"], first["end"]) == ("vid1", 5.0, 15.0)  # -4wsuPCjDBc_5_15
    # The paper's V = 12594 is all splits' words plus two special tokens (ours has three).
    paper = Vocabulary.build(dataset.captions["normalized"].tolist(), normalized=True)
    assert len(paper) - 3 == 12594 - 2
    assert len(dataset.vocabulary) < len(paper)
    assert summary["vocabulary"]["unknown_rate"]["train"] == 0
    assert 0 < summary["vocabulary"]["unknown_rate"]["test"] < 0.05


def test_msvd_corpus_shared_subsets(shared_data):
    """The shared CSVs: English-only val/test rows with a leading index column."""
    msvd = shared_data / "msvd"
    annotations = read_msvd_corpus(
        [msvd / "raw_val.csv", msvd / "raw_test.csv"], msvd / "youtube_mapping.txt"
    )
    with pytest.raises(DatasetError, match=r"no words .* \('train',\) \(--vocab paper"):
        prepare_dataset(annotations)  # no training captions to build a vocabulary from
    paper = PrepareConfig(vocab=VocabConfig(source="paper"))
    dataset = prepare_dataset(annotations, paper)
    splits = dataset.summary["splits"]
    assert (splits["val"]["videos_with_captions"], splits["val"]["captions"]) == (100, 4291)
    assert (splits["test"]["videos_with_captions"], splits["test"]["captions"]) == (670, 27768)
    # The training clips have no rows in these files: reported, not dropped.
    assert dataset.summary["videos_without_captions"]["count"] == 1200
    assert len(dataset.videos) == 1970
    with pytest.raises(DatasetError, match="videos without captions: 1200"):
        prepare_dataset(annotations, PrepareConfig(strict=True, vocab=paper.vocab))


def test_msvd_corpus_original_layout(tmp_path):
    mapping = small_mapping(tmp_path)
    corpus = write(
        tmp_path / "MSR Video Description Corpus.csv",
        "VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description\n"
        "abc,1,5,1,clean,10,English,A cat sits.\n"
        'abc,1,5,2,clean,10,English,"A cat, sitting."\n'
        "abc,1,5,3,clean,10,German,Eine Katze sitzt.\n"
        "de_f_G,10.0,20.0,4,clean,10,English,Dogs run\n"  # floats from a re-saved CSV
        "xyz,0,3,5,clean,10,English,A bird flies\n"
        "gone,1,2,6,clean,10,English,Not in the mapping\n",
    )
    dataset = prepare_dataset(read_msvd_corpus([corpus], mapping))
    assert dataset.captions_by_video("train") == {"vid1": ["A cat sits.", "A cat, sitting."]}
    assert dataset.captions_by_video("val", normalized=True) == {"vid1201": ["dogs run"]}
    assert dataset.captions_by_video("test") == {"vid1301": ["A bird flies"]}
    left_out = dataset.summary["left_out"]
    assert left_out["other_language"]["count"] == 1
    assert left_out["unmapped_clips"]["examples"] == ["gone_1_2"]
    video = dataset.videos.set_index("id").loc["vid1201"]
    assert (video["start"], video["end"]) == (10.0, 20.0)  # youtube id with "_" in it


def test_msvd_sents_errors_name_file_and_line(tmp_path):
    mapping = small_mapping(tmp_path)
    sents = write(tmp_path / "sents_train_lc_nopunc.txt", "vid1\ta cat\nvid9\ta dog\n")
    with pytest.raises(DatasetError, match=r"sents_train_lc_nopunc.txt, line 2: 'vid9' is not in"):
        read_msvd_sents([sents], mapping)
    sents = write(tmp_path / "sents_train_lc_nopunc.txt", "vid1\ta cat\nvid1201\ta dog\n")
    with pytest.raises(DatasetError, match=r"line 2: vid1201 belongs to the val split"):
        read_msvd_sents([sents], mapping)
    sents = write(tmp_path / "sents_train_lc_nopunc.txt", "vid1 a cat without a tab\n")
    with pytest.raises(DatasetError, match=r"line 1: expected 'vidN<TAB>caption'"):
        read_msvd_sents([sents], mapping)
    duplicate = write(tmp_path / "map.txt", "a_1_2 vid1\nb_1_2 vid1\n")
    with pytest.raises(DatasetError, match=r"map.txt, line 2: vid1 already given"):
        read_msvd_mapping(duplicate)


def test_sents_lines_split_only_on_newline(tmp_path):
    """A stray \\r or U+2028 inside a caption must not start a new record."""
    mapping = small_mapping(tmp_path)
    sents = write(tmp_path / "sents.txt", "vid1\ta cat\rsits\r\nvid1\ta dog\u2028runs\n")
    dataset = prepare_dataset(read_msvd_sents([sents], mapping))
    assert dataset.captions_by_video("train", normalized=True) == {
        "vid1": ["a cat sits", "a dog runs"]
    }


# --------------------------------------------------------------------------------------------
# MSR-VTT


def official_json(path, splits, captions_per_video=1, sen_offset=0):
    """A videodatainfo.json following official_format_readme.txt."""
    videos = [
        {
            "id": i,
            "video_id": f"video{i}",
            "category": i % 20,
            "url": f"https://www.youtube.com/watch?v={i}",
            "start time": 1.5 * i,
            "end time": 1.5 * i + 10,
            "split": split,
        }
        for i, split in splits
    ]
    sentences = [
        {
            "sen_id": sen_offset + k * len(videos) + n,
            "video_id": v["video_id"],
            "caption": f"clip {n}",
        }
        for n, v in enumerate(videos)
        for k in range(captions_per_video)
    ]
    info = {"year": "2016", "version": "1.0", "description": "test", "contributor": "t"}
    path.write_text(json.dumps({"info": info, "videos": videos, "sentences": sentences}))
    return path


@pytest.fixture(scope="module")
def msrvtt_full(tmp_path_factory):
    """The full 10,000-video structure (one caption each): train_val and test files."""
    root = tmp_path_factory.mktemp("msrvtt")
    train_val = [(i, "train") for i in range(6513)] + [(i, "validate") for i in range(6513, 7010)]
    test = [(i, "test") for i in range(7010, 10000)]
    return [
        official_json(root / "train_val_videodatainfo.json", train_val),
        official_json(root / "test_videodatainfo.json", test, sen_offset=10**6),
    ]


def test_msrvtt_official_standard_split(msrvtt_full):
    dataset = prepare_dataset(read_msrvtt_official(msrvtt_full))
    counts = {s: v["videos"] for s, v in dataset.summary["splits"].items()}
    assert counts == {"train": 6513, "val": 497, "test": 2990}
    assert dataset.split("val").videos["id"].iloc[0] == "video6513"
    assert dataset.split("test").videos["id"].iloc[-1] == "video9999"
    assert dataset.videos.set_index("id").loc["video2", "start"] == 3.0


def test_msrvtt_paper_split_is_seeded_and_recorded(msrvtt_full):
    first = read_msrvtt_official(msrvtt_full, scheme="paper", seed=5)
    dataset = prepare_dataset(first)
    counts = {s: v["videos"] for s, v in dataset.summary["splits"].items()}
    assert counts == {"train": 5513, "val": 497, "test": 1000}
    test_ids = set(dataset.split("test").videos["id"])
    assert all(int(v.removeprefix("video")) < 6513 for v in test_ids)  # from the training set
    assert dataset.summary["source"]["seed"] == 5
    assert dataset.summary["left_out"]["original_test_set"]["count"] == 2990
    again = prepare_dataset(read_msrvtt_official(msrvtt_full, scheme="paper", seed=5))
    assert set(again.split("test").videos["id"]) == test_ids
    other = prepare_dataset(read_msrvtt_official(msrvtt_full, scheme="paper", seed=6))
    assert set(other.split("test").videos["id"]) != test_ids


def test_msrvtt_official_errors_name_the_key(tmp_path):
    path = official_json(tmp_path / "v.json", [(0, "train"), (1, "holdout")])
    with pytest.raises(DatasetError, match=r"v.json: videos\[1\].split: unknown split 'holdout'"):
        read_msrvtt_official([path])
    path = official_json(tmp_path / "v.json", [(0, "train"), (0, "test")])
    with pytest.raises(DatasetError, match=r"videos\[1\]: duplicate video_id 'video0'"):
        read_msrvtt_official([path])
    path = official_json(tmp_path / "v.json", [(0, "train")], captions_per_video=2)
    data = json.loads(path.read_text())
    data["sentences"][1]["sen_id"] = data["sentences"][0]["sen_id"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"sentences\[1\]: duplicate sen_id 0"):
        read_msrvtt_official([path])
    data["sentences"] = [{"sen_id": 0, "video_id": "video7", "caption": "x"}]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="not among the videos"):
        read_msrvtt_official([path])
    path.write_text(json.dumps({"videos": []}))
    with pytest.raises(DatasetError, match="missing key 'sentences'"):
        read_msrvtt_official([path])


def test_msrvtt_sentence_files_real(shared_data):
    msrvtt = shared_data / "msrvtt"
    annotations = read_msrvtt_sentences({"val": msrvtt / "val.json", "test": msrvtt / "test.json"})
    summary = prepare_dataset(annotations, PrepareConfig(vocab=VocabConfig(source="paper"))).summary
    assert (summary["splits"]["val"]["videos"], summary["splits"]["val"]["captions"]) == (497, 9940)
    assert (summary["splits"]["test"]["videos"], summary["splits"]["test"]["captions"]) == (
        2990,
        59800,
    )


def test_msrvtt_sentence_files_refuse_duplicates(tmp_path):
    val = write(tmp_path / "val.json", '{"video1": {"1": "a cat"}}')
    test = write(tmp_path / "test.json", '{"video1": {"2": "a dog"}}')
    with pytest.raises(DatasetError, match=r"test.json: \['video1'\]: video also in .*val.json"):
        read_msrvtt_sentences({"val": val, "test": test})
    write(tmp_path / "test.json", '{"video2": {"2": "a dog", "2": "a cat"}}')
    with pytest.raises(DatasetError, match=r"test.json: duplicate key '2'"):
        read_msrvtt_sentences({"test": test})


# --------------------------------------------------------------------------------------------
# M-VAD


def lsmdc_line(clip, start, end, sentence=None):
    fields = [clip, start, end, start, end] + ([sentence] if sentence is not None else [])
    return "\t".join(fields)


def test_mvad_lsmdc_files(tmp_path):
    clip, other = "3001_MOVIE_00.00.01.000-00.00.03.500", "1001_Other_01.02.27.034-01.02.29.000"
    lines = [
        lsmdc_line(clip, "00.00.01.000", "00.00.03.500", "SOMEONE runs."),
        lsmdc_line(clip, "00.00.01.000", "00.00.03.500", "He stops."),
        lsmdc_line(other, "01.02.27.034", "01.02.29.000", "A car."),
    ]
    train = write(tmp_path / "LSMDC16_annos_training.csv", "\n".join(lines))
    blind = write(
        tmp_path / "LSMDC16_annos_blindtest.csv",
        lsmdc_line("3002_MOVIE_00.10.00.000-00.10.02.000", "00.10.00.000", "00.10.02.000"),
    )
    dataset = prepare_dataset(read_mvad({"train": train, "test": blind}))
    assert dataset.captions_by_video("train") == {
        clip: ["SOMEONE runs.", "He stops."],
        other: ["A car."],
    }
    assert dataset.videos.set_index("id").loc[other, "start"] == pytest.approx(3747.034)
    assert dataset.summary["videos_without_captions"]["examples"] == [
        "3002_MOVIE_00.10.00.000-00.10.02.000"
    ]
    only = prepare_dataset(read_mvad({"train": train}, mvad_only=True))
    assert list(only.videos["id"]) == [clip]
    assert only.summary["left_out"]["not_mvad"]["count"] == 1


def test_mvad_errors(tmp_path):
    bad = write(tmp_path / "train.csv", "clip\t00.00.01.000\tonly three\n")
    with pytest.raises(DatasetError, match=r"train.csv, line 1: expected 6 tab-separated"):
        read_mvad({"train": bad})
    bad = write(tmp_path / "train.csv", lsmdc_line("c", "0.0.1", "00.00.02.000", "x") + "\n")
    with pytest.raises(DatasetError, match=r"line 1: expected a time stamp"):
        read_mvad({"train": bad})
    line = lsmdc_line("c", "00.00.01.000", "00.00.02.000", "x")
    train, val = write(tmp_path / "a.csv", line), write(tmp_path / "b.csv", line)
    with pytest.raises(DatasetError, match=r"b.csv, line 1: clip c is also in .*a.csv"):
        read_mvad({"train": train, "val": val})
    with pytest.raises(DatasetError, match="unknown split 'blind'"):
        read_mvad({"blind": train})


# --------------------------------------------------------------------------------------------
# Generic


def test_generic_csv_with_splits(tmp_path):
    path = generic_csv(
        tmp_path,
        ["v1,A cat.,train", 'v1,"A cat, sitting",train', "v2,NA,validation", "v3,null,test"],
    )
    dataset = prepare_dataset(read_generic(path))
    assert dataset.captions_by_video("train") == {"v1": ["A cat.", "A cat, sitting"]}
    # "NA" and "null" are captions, not missing values.
    assert dataset.captions_by_video("val") == {"v2": ["NA"]}
    assert dataset.captions_by_video("test", normalized=True) == {"v3": ["null"]}


def test_generic_without_split_column_is_split_by_seed(tmp_path):
    rows = [f"v{i},caption number {i}" for i in range(50)]
    path = generic_csv(tmp_path, rows, header="video_id,caption")
    first = prepare_dataset(read_generic(path, seed=1))
    counts = {s: v["videos"] for s, v in first.summary["splits"].items()}
    assert counts == {"train": 40, "val": 5, "test": 5}
    assert first.summary["source"]["seed"] == 1
    again = prepare_dataset(read_generic(path, seed=1))
    pd.testing.assert_frame_equal(first.videos, again.videos)
    other = prepare_dataset(read_generic(path, seed=2))
    assert list(other.videos["split"]) != list(first.videos["split"])


def test_generic_json_forms(tmp_path):
    records = write(
        tmp_path / "a.json",
        json.dumps(
            [
                {"video_id": "v1", "caption": "A cat", "split": "train"},
                {"video_id": "v2", "caption": "A dog", "split": "test"},
            ]
        ),
    )
    dataset = prepare_dataset(read_generic(records))
    assert dataset.captions_by_video("test") == {"v2": ["A dog"]}
    lists = write(tmp_path / "b.json", json.dumps({f"v{i}": ["a", "b"] for i in range(10)}))
    dataset = prepare_dataset(read_generic(lists))
    assert len(dataset.captions) == 20 and dataset.summary["source"]["split"] == "seeded"


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (["v1,a cat,train", "v2,a dog"], None, r"captions.csv, line 3: expected 3 fields, found 2"),
        (["v1,a cat,train", "v2,a dog,holdout"], None, r"line 3: unknown split 'holdout'"),
        (["v1,a cat,train", "v1,a dog,test"], None, r"line 3: video 'v1' is in split 'test'"),
        (["v1,a cat"], "video,caption", r"line 1: missing column\(s\) \['video_id'\]"),
        (['v1,"a cat,train'], None, r"captions.csv, line \d+: malformed CSV"),
        ([",a cat,train"], None, r"line 2: empty video_id"),
    ],
)
def test_generic_csv_errors_name_the_line(tmp_path, rows, header, message):
    path = generic_csv(tmp_path, rows, header=header or "video_id,caption,split")
    with pytest.raises(DatasetError, match=message):
        read_generic(path)


def test_generic_json_errors(tmp_path):
    bad = write(tmp_path / "a.json", '[{"video_id": "v1", "caption": "x"},\n {"video_id": }]')
    with pytest.raises(DatasetError, match=r"a.json, line 2 column \d+: malformed JSON"):
        read_generic(bad)
    bad = write(tmp_path / "a.json", '[{"video_id": "v1", "text": "x"}]')
    with pytest.raises(DatasetError, match=r"a.json: \[0\]: missing key 'caption'"):
        read_generic(bad)
    bad = write(tmp_path / "a.json", '{"v1": "not a list"}')
    with pytest.raises(DatasetError, match=r"\['v1'\]: expected list"):
        read_generic(bad)


# --------------------------------------------------------------------------------------------
# Videos on disk, problems, strictness


def test_videos_found_by_id_with_any_extension(tmp_path):
    videos = tmp_path / "videos"
    for name in ("v1.avi", "sub/v2.mkv", ".hidden/v3.mp4", "v4.txt.bak"):
        write(videos / name, "x")
    path = generic_csv(tmp_path, ["v1,a,train", "v2,b,train", "v3,c,val", "v4,d,test"])
    dataset = prepare_dataset(read_generic(path), PrepareConfig(videos_dir=videos))
    paths = dict(zip(dataset.videos["id"], dataset.videos["path"], strict=True))
    assert paths["v1"] == str((videos / "v1.avi").resolve())
    assert paths["v2"] == str((videos / "sub/v2.mkv").resolve())
    assert paths["v3"] == ""  # hidden folders are not searched
    missing = dataset.summary["missing_videos"]
    # "v4.txt.bak" is video "v4.txt": the last extension only is dropped.
    assert missing["count"] == 2 and missing["examples"] == ["v3", "v4"]
    assert dataset.summary["splits"]["train"]["videos_on_disk"] == 2
    assert list(dataset.video_files()["id"]) == ["v1", "v2"]
    with pytest.raises(DatasetError, match=r"strict: missing videos: 2 \(e.g. v3, v4\)"):
        prepare_dataset(read_generic(path), PrepareConfig(videos_dir=videos, strict=True))
    write(videos / "v1.mp4", "x")
    with pytest.raises(DatasetError, match="2 files could be video 'v1'"):
        prepare_dataset(read_generic(path), PrepareConfig(videos_dir=videos))


def test_empty_captions_are_counted_not_kept(tmp_path):
    path = generic_csv(tmp_path, ["v1,a cat,train", "v1,...,train", "v2,,train", "v3,a dog,test"])
    dataset = prepare_dataset(read_generic(path))
    assert dataset.summary["empty_captions"]["count"] == 2
    assert dataset.summary["empty_captions"]["examples"] == ["v1: '...'", "v2: ''"]
    assert dataset.summary["videos_without_captions"]["examples"] == ["v2"]
    assert list(dataset.captions["normalized"]) == ["a cat", "a dog"]
    with pytest.raises(DatasetError, match="empty captions: 2"):
        prepare_dataset(read_generic(path), PrepareConfig(strict=True))


def test_vocabulary_from_train_or_all_splits(tmp_path):
    path = generic_csv(tmp_path, ["v1,a cat a cat,train", "v2,a dog,val", "v3,bird,test"])
    train = prepare_dataset(read_generic(path), PrepareConfig(vocab=VocabConfig(min_count=2)))
    assert train.vocabulary.words[3:] == ("a", "cat")
    paper = prepare_dataset(read_generic(path), PrepareConfig(vocab=VocabConfig(source="paper")))
    assert paper.vocabulary.words[3:] == ("a", "cat", "bird", "dog")
    assert train.summary["vocabulary"]["unknown_rate"]["val"] == 0.5
    assert train.encoded_captions("val") == {"v2": [[3, 2, 1]]}


# --------------------------------------------------------------------------------------------
# Saving and loading


@pytest.fixture
def saved(tmp_path):
    videos = tmp_path / "out" / "videos"
    write(videos / "v1.mp4", "x")
    path = generic_csv(tmp_path, ["v1,A cat.,train", "v2,A dog\u2028runs|||,test"])
    dataset = prepare_dataset(read_generic(path), PrepareConfig(videos_dir=videos))
    return dataset, dataset.save(tmp_path / "out")


def test_save_and_load_round_trip(saved):
    dataset, root = saved
    loaded = Dataset.load(root)
    pd.testing.assert_frame_equal(loaded.videos, dataset.videos, check_dtype=False)
    pd.testing.assert_frame_equal(loaded.captions, dataset.captions, check_dtype=False)
    assert loaded.vocabulary == dataset.vocabulary and loaded.summary == dataset.summary
    # Paths under the dataset directory are stored relative to it; the sanitised caption is
    # one line, so the CSV stays one record per line.
    assert (root / "videos.csv").read_text().splitlines()[1] == "v1,videos/v1.mp4,train,,"
    assert (root / "video_files.csv").read_text() == "id,path\nv1,videos/v1.mp4\n"
    assert loaded.captions_by_video("test") == {"v2": ["A dog runs"]}
    assert len((root / "captions.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        ("summary.json", None, r"missing summary.json"),
        ("videos.csv", ("split", "splt"), r"videos.csv, line 1: missing column\(s\) \['split'\]"),
        ("videos.csv", ("v2,,test", "v2,,exam"), r"videos.csv, line 3: unknown split 'exam'"),
        ("videos.csv", ("v2,,test", "v1,,test"), r"videos.csv, line 3: duplicate video id 'v1'"),
        ("captions.csv", ("v2,", "v9,"), r"captions.csv, line 3: video 'v9' is not in"),
        ("captions.csv", ("runs,test", "runs,train"), r"line 3: split 'train' differs"),
        ("summary.json", ('"version": 1', '"version": 7'), r"format version 7"),
        ("vocab.json", ('"<eos>"', '"<bos>"'), r"vocab.json: special tokens"),
    ],
)
def test_load_refuses_malformed_directories(saved, file, edit, message):
    _, root = saved
    if edit is None:
        (root / file).unlink()
    else:
        text = (root / file).read_text()
        assert edit[0] in text
        (root / file).write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(DatasetError, match=message):
        Dataset.load(root)


# --------------------------------------------------------------------------------------------
# The command line


def test_prepare_dataset_cli(tmp_path):
    videos = tmp_path / "videos"
    write(videos / "v1.mp4", "x")
    path = generic_csv(tmp_path, ["v1,a cat,train", "v2,a dog,test"])
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(
        prepare_cli, ["generic", str(path), "--videos", str(videos), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (
        "2 videos, 2 captions" in result.output and "missing videos: 1 (e.g. v2)" in result.output
    )
    assert Dataset.load(out).summary["missing_videos"]["count"] == 1
    result = runner.invoke(
        prepare_cli, ["generic", str(path), "--videos", str(videos), "--out", str(out), "--strict"]
    )
    assert result.exit_code == 1 and "strict: missing videos: 1" in result.output
    bad = generic_csv(tmp_path, ["v1,a cat,exam"])
    result = runner.invoke(prepare_cli, ["generic", str(bad), "--out", str(out)])
    assert result.exit_code == 1 and "line 2: unknown split 'exam'" in result.output


def test_prepare_dataset_cli_msvd_needs_one_source(tmp_path):
    mapping = small_mapping(tmp_path)
    result = CliRunner().invoke(
        prepare_cli, ["msvd", "--mapping", str(mapping), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "either --sents" in result.output


def test_msvd_mapping_split_boundaries(tmp_path):
    mapping = write(tmp_path / "m.txt", "a_1_2 vid1300\nb_1_2 vid1301\nc_1_2 vid1971\n")
    with pytest.raises(DatasetError, match="vid1971 is outside the standard MSVD split"):
        read_msvd_sents([], mapping)
    mapping = write(
        tmp_path / "m.txt", "a_1_2 vid1200\nb_1_2 vid1201\nc_1_2 vid1300\nd_1_2 vid1301\n"
    )
    sents = write(tmp_path / "s.txt", "vid1200\ta\nvid1201\tb\nvid1300\tc\nvid1301\td\n")
    videos = prepare_dataset(read_msvd_sents([sents], mapping)).videos
    assert list(videos["split"]) == ["train", "val", "val", "test"]
    assert np.all(videos["path"] == "")  # no videos directory given


# ---- folders in their standard layout (what the DVC pipeline reads) -----------------------------


def test_folder_msvd_from_the_real_files(shared_data, tmp_path):
    folder = tmp_path / "msvd"
    folder.mkdir()
    for name in ("youtube_mapping.txt", *(f"sents_{s}_lc_nopunc.txt" for s in SPLITS)):
        (folder / name).symlink_to(shared_data / "msvd" / name)
    write(folder / "videos" / "sub" / "-4wsuPCjDBc_5_15.avi", "x")  # vid1, a train clip
    result = CliRunner().invoke(
        prepare_cli, ["folder", "msvd", str(folder), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    dataset = Dataset.load(tmp_path / "o")
    counts = {split: dataset.summary["splits"][split]["videos"] for split in SPLITS}
    assert counts == {"train": 1200, "val": 100, "test": 670}
    assert dataset.summary["splits"]["train"]["videos_on_disk"] == 1
    assert list(dataset.video_files()["id"]) == ["vid1"]


def test_folder_msrvtt_per_split_files_and_generic(shared_data, tmp_path):
    folder = tmp_path / "msrvtt"
    folder.mkdir()
    for name in ("val.json", "test.json"):
        (folder / name).symlink_to(shared_data / "msrvtt" / name)
    annotations, videos = read_folder("msrvtt", folder)
    dataset = prepare_dataset(annotations, PrepareConfig(vocab=VocabConfig(source="paper")))
    assert dataset.summary["splits"]["val"]["videos"] == 497 and videos is None

    mine = tmp_path / "mine"
    generic_csv(mine, ["v1,a cat,train", "v2,a dog,test"]).rename(mine / "annotations.csv")
    write(mine / "videos" / "v1.mp4", "x")
    annotations, videos = read_folder("generic", mine)
    assert videos == mine / "videos"
    assert prepare_dataset(annotations, PrepareConfig(videos_dir=videos)).summary["videos"] == 2


def test_folder_errors_name_the_folder_and_the_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"no youtube_mapping.txt; a msvd folder holds"):
        read_folder("msvd", tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        read_folder("generic", tmp_path / "absent")
    (tmp_path / "train_a.tsv").write_text("")
    (tmp_path / "training_b.tsv").write_text("")
    with pytest.raises(DatasetError, match="two annotation files for the train split"):
        read_folder("mvad", tmp_path)
    result = CliRunner().invoke(prepare_cli, ["folder", "generic", str(tmp_path), "--out", "x"])
    assert result.exit_code == 1 and "annotations.csv" in result.output


# --------------------------------------------------------------------------------------------
# Bytes that are not UTF-8: reported at their own line and column


def write_bytes(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "data", "read", "message"),
    [
        (
            "captions.csv",
            b"video_id,caption,split\nv1,a c\xffat,train\n",
            read_generic,
            r"captions.csv, line 2: not UTF-8 \(byte 0xff at column 7\)$",
        ),
        (  # the bad byte far beyond the first block a text-mode reader decodes
            "captions.csv",
            b"video_id,caption,split\n" + b"v1,a cat,train\n" * 2000 + b"v2,\xe9t\xe9,train\n",
            read_generic,
            r"captions.csv, line 2002: not UTF-8 \(byte 0xe9 at column 4\)$",
        ),
        (  # a byte-order mark moves nothing; a two-byte character is one column
            "captions.csv",
            "\ufeffvideo_id,caption,split\nv1,caf\u00e9,train\nv2,".encode() + b"\xc3(,test\n",
            read_generic,
            r"captions.csv, line 3: not UTF-8 \(byte 0xc3 at column 4\)$",
        ),
        (
            "captions.json",
            b'[{"video_id": "v1", "caption": "a cat"},\n {"video_id": "v2", "caption": "\x80"}]',
            read_generic,
            r"captions.json, line 2: not UTF-8 \(byte 0x80 at column 33\)$",
        ),
    ],
)
def test_bad_bytes_are_reported_at_their_line(tmp_path, name, data, read, message):
    path = write_bytes(tmp_path / name, data)
    with pytest.raises(DatasetError, match=message):
        read(path)


def test_bad_bytes_in_msvd_files_name_their_line(tmp_path):
    mapping = small_mapping(tmp_path)
    sents = write_bytes(tmp_path / "sents_train_lc_nopunc.txt", b"vid1\ta cat\nvid1\ta \xffdog\n")
    with pytest.raises(
        DatasetError,
        match=r"sents_train_lc_nopunc.txt, line 2: not UTF-8 \(byte 0xff at column 8\)",
    ):
        read_msvd_sents([sents], mapping)
    bad_mapping = write_bytes(tmp_path / "map.txt", b"a_1_2 vid1\nb_1_2 vid2\n\xfe_1_2 vid3\n")
    with pytest.raises(DatasetError, match=r"map.txt, line 3: not UTF-8 \(byte 0xfe at column 1\)"):
        read_msvd_mapping(bad_mapping)


@pytest.mark.parametrize("file", ["videos.csv", "captions.csv", "summary.json", "vocab.json"])
def test_bad_bytes_in_a_saved_dataset_name_file_and_line(saved, file):
    _, root = saved
    lines = (root / file).read_bytes().split(b"\n")
    lines[2] = b"\xff" + lines[2]
    (root / file).write_bytes(b"\n".join(lines))
    with pytest.raises(DatasetError, match=rf"{file}, line 3: not UTF-8 \(byte 0xff at column 1\)"):
        Dataset.load(root)


def test_bad_bytes_in_the_video_list_of_extract_features_name_their_line(tmp_path):
    from astar.extract.runner import InputError, gather_videos

    listing = write_bytes(tmp_path / "list.csv", b"id,path\nfirst,v0.mkv\nsecond,v\xff1.mkv\n")
    with pytest.raises(InputError, match=r"list.csv, line 3: not UTF-8 \(byte 0xff at column 9\)"):
        gather_videos([listing])
    # Other errors of the list name the real line too, past blank and multi-line records.
    listing.write_text('id,path\n\n"first\nclip",v0.mkv\n,v1.mkv\n')
    with pytest.raises(InputError, match=r"list.csv, line 5: empty id or path"):
        gather_videos([listing])
