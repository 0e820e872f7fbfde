"""Text corpora for character language models (``pfa_jax.app.text``): the fixed vocabulary, the
windows, the fortune files' cookies and their fixed split (generated files and Debian's real
ones), tiny_shakespeare through tensorflow-datasets (a real array_record copy prepared from
generated text), and ``pfa-jax train`` on a corpus: next-token loss, bits per character, the
options a corpus refuses."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pfa_jax.app import cli, spec, text
from pfa_jax.app.config import default_config, set_value

COOKIES = [f"Cookie number {i}.\n\t\t-- Author {i % 3}" for i in range(23)]


def write_fortunes(directory, cookies=COOKIES):
    """Two fortune files (cookies split between them at 15) plus the index and link a Debian
    directory has beside each, which are not text."""
    directory.mkdir(exist_ok=True)
    for name, part in (("alpha", cookies[:15]), ("beta", cookies[15:])):
        (directory / name).write_text("".join(c + "\n%\n" for c in part))
        (directory / f"{name}.dat").write_bytes(bytes(range(256)))
        (directory / f"{name}.u8").symlink_to(directory / name)
    return directory


def test_vocabulary_is_fixed_and_encoding_round_trips():
    assert len(text.VOCABULARY) == 98 and text.VOCABULARY[:3] == "\0\t\n"
    assert text.VOCABULARY[3:] == "".join(chr(c) for c in range(32, 127))
    sample = "To be,\tor not?\n~ é"
    tokens = text.encode(sample)
    assert tokens.dtype == np.int32 and tokens.tolist()[-1] == 0  # 'é' is outside
    assert [text.VOCABULARY.index(c) for c in sample[:-1]] == tokens.tolist()[:-1]
    assert text.decode(tokens) == sample[:-1] + "\0"


def test_windows_predict_every_token_but_the_first_once():
    tokens = np.arange(1, 24)
    inputs, labels = text.windows(tokens, 5)
    assert inputs.shape == labels.shape == (4, 5) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs.ravel(), tokens[:20])
    np.testing.assert_array_equal(labels.ravel(), tokens[1:21])
    with pytest.raises(ValueError, match="no window of context=30"):
        text.windows(tokens, 30)


def test_fortune_cookies_and_the_fixed_split(tmp_path):
    directory = write_fortunes(tmp_path / "fortunes")
    assert text.fortune_cookies(str(directory)) == COOKIES
    ds = text.load("fortunes", context=8, data_dir=str(directory))
    held_out = [COOKIES[i] for i in (9, 19)]
    kept = [c for i, c in enumerate(COOKIES) if i not in (9, 19)]
    for split, cookies in (("train", kept), ("test", held_out)):
        stream = text.encode("".join(c + "\n%\n" for c in cookies))
        inputs, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        count = (len(stream) - 1) // 8
        assert inputs.shape == labels.shape == (count, 8)
        np.testing.assert_array_equal(inputs.ravel(), stream[:8 * count])
        np.testing.assert_array_equal(labels.ravel(), stream[1:8 * count + 1])
    assert ds.num_classes == 98 and ds.image_shape == (8,)
    limited = text.load("fortunes", context=8, data_dir=str(directory), limit=3)
    np.testing.assert_array_equal(limited.train_images, ds.train_images[:3])
    np.testing.assert_array_equal(limited.test_labels, ds.test_labels[:3])


@pytest.mark.parametrize("call, message", [
    (lambda d: text.fortune_cookies(str(d / "absent")), "apt-get install -y fortunes"),
    (lambda d: text.load("fortunes", context=0, data_dir=str(d)), "context must be a positive"),
    (lambda d: text.load("fortunes", limit=0, data_dir=str(d)), "limit must be a positive"),
    (lambda d: text.load("wikitext", data_dir=str(d)), "valid names: fortunes, tiny_shakespeare"),
])
def test_bad_corpus_input_is_named(tmp_path, call, message):
    write_fortunes(tmp_path / "f")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call(tmp_path / "f")


@pytest.mark.skipif(not os.path.isdir(text.DEFAULT_FORTUNES_DIR),
                    reason="fortunes is not installed (apt-get install -y fortunes fortunes-min)")
def test_debian_fortunes_corpus():
    """The corpus the command and charlm_fortunes read (.ci/run installs the packages)."""
    cookies = text.fortune_cookies()
    assert len(cookies) > 10000
    ds = text.load("fortunes")
    assert ds.train_images.shape[1] == 128 and len(ds.train_images) > 15000
    assert 0.08 < len(ds.test_images) / len(ds.train_images) < 0.14
    assert np.mean(ds.train_images == 0) < 1e-3  # almost every character is in the vocabulary


def test_tiny_shakespeare_through_tfds(tmp_path):
    """The real reader over a real array_record copy of the tfds dataset, built from generated
    text by the tfds builder itself (only its download replaced)."""
    splits = {"train": "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 4,
              "validation": "All:\nSpeak, speak.\n", "test": "MENENIUS:\nWhat work's, my countrymen?\n"}

    class Fake(tfds.builder_cls("tiny_shakespeare"), skip_registration=True):
        name = "tiny_shakespeare"

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, body) for split, body in splits.items()}

    Fake(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = text.load("tiny_shakespeare", context=16, data_dir=str(tmp_path))
    for split, body in (("train", splits["train"]), ("test", splits["test"])):
        inputs, labels = text.windows(text.encode(body), 16)
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), inputs)
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), labels)


@pytest.fixture(scope="module")
def fortunes_dir(tmp_path_factory):
    cookies = [f"{'Sing a song of sixpence, ' * (1 + i % 4)}a pocket full of rye.\n\t-- {i}"
               for i in range(200)]
    return str(write_fortunes(tmp_path_factory.mktemp("corpus") / "fortunes", cookies))


@pytest.mark.slow  # 35 s; the corpus, windows and next-token loss are tested in the default tier
def test_train_a_character_model_from_the_command(fortunes_dir, tmp_path):
    out = tmp_path / "lm"
    code = cli.main(["train", "--model", "transformer_lm", "--dataset", "fortunes", "--rule",
                     "pfa", "--epochs", "2", "--batch-size", "16", "--out", str(out), "--quiet",
                     "--set", f"data_dir={fortunes_dir}", "--set", "context=32",
                     "--set", "model_options.context=32", "--set", "optimizer.name=adamw",
                     "--set", "optimizer.learning_rate=0.003", "--set", "metrics_batch_size=8"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["test_loss"] < records[0]["test_loss"]
    for record in records:
        for split in ("train", "test"):
            assert record[f"{split}_bits_per_token"] == pytest.approx(
                record[f"{split}_loss"] / np.log(2), rel=1e-5)
    assert {"block_0/attention/query", "block_1/mlp_out", "output"} <= set(records[-1]["alignment"])
    assert "block_0/attention/value" in records[-1]["gradient_alignment"]
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "fortunes" and config["context"] == 32


def test_a_corpus_defaults_to_windows_of_128():
    config = default_config()
    config.update({"dataset": "fortunes", "model": "transformer_lm"})
    resolved = spec.resolve(config)
    assert resolved.data.context == 128 and resolved.config.context == 128
    assert resolved.loss.__name__ == "next_token"


@pytest.mark.parametrize("values, message", [
    ({"dataset": "fortunes", "augment": "crop_flip"}, "augment='crop_flip' does not apply to fortunes"),
    ({"dataset": "fortunes", "holdout": 5}, "holdout=5 does not apply to fortunes"),
    ({"dataset": "fortunes", "noise_pretrain_steps": 3}, "noise_pretrain_steps=3 does not apply"),
    ({"dataset": "fashion_mnist", "context": 64}, "context=64 applies to text corpora"),
    ({"dataset": "fortunes", "robustness.noise_sigmas": (0.1,)}, "holds tokens"),
    ({"dataset": "wikitext"}, "valid: fashion_mnist, .*fortunes, tiny_shakespeare"),
])
def test_options_a_corpus_cannot_use_are_refused(values, message):
    config = default_config()
    config.update({"model": "transformer_lm"})
    for key, value in values.items():
        set_value(config, key, value)
    with pytest.raises(ValueError, match=message):
        spec.resolve(config)
