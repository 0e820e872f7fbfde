"""Streamed ImageNet (pfa_jax.app.streaming) and its training loop in pfa_jax.app.experiment, on a tiny real
``imagenet2012`` array_record dataset: the real tfds builder and features (JPEG images, 1000-class
labels), only its example generation replaced by a few dozen random JPEGs of varying sizes. Read
without TensorFlow (which is not installed here)."""
import io
import json
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as imagenet
import runs
from fashion_files import make_fashion_dir

from experiments import configs
from experiments import run as runner
from pfa_jax import models
from pfa_jax.app import checkpoint, cli, data, experiment, resume, spec, streaming
from pfa_jax.app.config import default_config, set_value

N_TRAIN, N_VALIDATION = 24, 10
SIZE = 16  # image_size of the tests; the recipe's 256/224 resize ratio gives 18


def fake_examples(split, n):
    """``{file_name: (jpeg bytes, label)}`` of random RGB images of varying sizes, distinct labels."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    examples = {}
    for i, label in enumerate(rng.permutation(1000)[:n]):
        height, width = (int(s) for s in rng.integers(12, 72, 2))
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(buffer, "JPEG")
        examples[f"{split}_{i}.JPEG"] = buffer.getvalue(), int(label)
    return examples


class FakeImagenet(imagenet.Builder, skip_registration=True):
    name = imagenet.Builder.name
    pkg_dir_path = imagenet.Builder._get_pkg_dir_path()  # the real builder's metadata files

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(fake_examples("train", N_TRAIN)),
                "validation": self._generate_examples(fake_examples("validation", N_VALIDATION))}

    def _generate_examples(self, examples):
        for name, (jpeg, label) in examples.items():
            yield name, {"file_name": name, "image": io.BytesIO(jpeg), "label": label}


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    FakeImagenet(data_dir=directory, file_format="array_record").download_and_prepare()
    return str(directory)


def load(imagenet_dir, **kwargs):
    return streaming.load("imagenet2012", data_dir=imagenet_dir, **{"image_size": SIZE, **kwargs})


# ------------------------------------------------------------------------------------ loading


def test_batches_have_the_right_shapes_dtypes_and_labels(imagenet_dir):
    ds = load(imagenet_dir)
    assert (ds.num_train, ds.num_test, ds.num_classes) == (N_TRAIN, N_VALIDATION, 1000)
    assert ds.image_shape == (SIZE, SIZE, 3)
    train = list(ds.train_batches(5, seed=0, epoch=0))
    assert len(train) == N_TRAIN // 5
    for batch in train:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (5, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
    labels = {name: label for name, (_, label) in fake_examples("train", N_TRAIN).items()}
    seen = np.concatenate([b["label"] for b in train])
    assert len(seen) == 20 and set(seen) <= set(labels.values())
    assert all(0 <= label < 1000 for label in seen)
    test = list(ds.eval_batches(4))
    assert [b["image"].shape for b in test] == [(4, SIZE, SIZE, 3)] * 3
    np.testing.assert_array_equal(test[-1]["mask"], [1, 1, 0, 0])
    assert not test[-1]["image"][2:].any()
    validation = sorted(label for _, label in fake_examples("validation", N_VALIDATION).values())
    assert sorted(np.concatenate([b["label"][:int(b["mask"].sum())] for b in test])) == validation
    # Standardised with the ImageNet statistics: pixel values 0 and 1 bound every channel.
    pixels = np.concatenate([b["image"] for b in train])
    low, high = (0 - np.array(streaming.MEAN)) / streaming.STD, (1 - np.array(streaming.MEAN)) / streaming.STD
    assert np.all(pixels >= low - 1e-6) and np.all(pixels <= high + 1e-6) and pixels.std() > 0.1
    assert "tensorflow" not in sys.modules  # decoded by tfds's numpy path (PIL), no TensorFlow


def test_train_crops_depend_on_seed_and_epoch_only(imagenet_dir):
    ds = load(imagenet_dir, workers=3, prefetch=1)

    def epoch(seed, number, batch_size=8):
        batches = list(ds.train_batches(batch_size, seed=seed, epoch=number))
        return np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches])

    first, again = epoch(0, 0), epoch(0, 0)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    # Another thread count and prefetch depth, or grain worker processes, give the same batches.
    for other in (load(imagenet_dir, workers=1, prefetch=0), load(imagenet_dir, processes=2)):
        np.testing.assert_array_equal(
            np.concatenate([b["image"] for b in other.train_batches(8, 0, 0)]), first[0])
    # Started at batch 1 (a run resumed mid-epoch), the epoch goes on with the same batches.
    later = [b["label"] for b in ds.train_batches(8, seed=0, epoch=0, start=1)]
    np.testing.assert_array_equal(np.concatenate(later), first[1][8:])
    second, other_seed = epoch(0, 1), epoch(1, 0)
    assert sorted(second[1]) == sorted(first[1])  # every record once per epoch
    assert not np.array_equal(second[1], first[1]) and not np.array_equal(other_seed[1], first[1])
    # The same records in epochs 0 and 1 get different crops.
    by_label = lambda images, labels: {int(label): images[i] for i, label in enumerate(labels)}
    a, b = by_label(*first), by_label(*second)
    assert all(not np.array_equal(a[label], b[label]) for label in a)


def test_eval_preprocessing_matches_a_pil_reference(imagenet_dir):
    ds = load(imagenet_dir, image_size=SIZE)
    image = next(iter(ds.eval_batches(1)))["image"][0]
    # Independently: which JPEG is validation record 0, decoded and processed with PIL directly.
    name = tfds.data_source("imagenet2012", split="validation", data_dir=imagenet_dir)[0]["file_name"]
    jpeg, _ = fake_examples("validation", N_VALIDATION)[name.decode()]
    pil = Image.open(io.BytesIO(jpeg)).convert("RGB")
    width, height = pil.size
    short = round(SIZE * 256 / 224)
    scale = short / min(width, height)
    new_width, new_height = ((short, int(height * scale)) if width <= height
                             else (int(width * scale), short))
    pil = pil.resize((new_width, new_height), Image.BILINEAR)
    left, top = int(round((new_width - SIZE) / 2)), int(round((new_height - SIZE) / 2))
    pixels = np.asarray(pil.crop((left, top, left + SIZE, top + SIZE)), np.float64) / 255
    expected = (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_crop_box_follows_the_random_resized_crop_recipe():
    rng = np.random.default_rng(0)
    for height, width in [(40, 60), (224, 224), (13, 71), (500, 375)]:
        for _ in range(200):
            top, left, h, w = streaming.crop_box(rng, height, width)
            assert 0 <= top <= height - h and 0 <= left <= width - w and h >= 1 and w >= 1
            if (h, w) != (height, width):  # not the fallback of a square-ish image
                assert 0.08 * 0.8 <= h * w / (height * width) <= 1.0
                assert 0.75 * 0.8 <= w / h <= 4 / 3 * 1.25
    # No draw fits a 1-pixel-high strip: the central crop of aspect ratio 4/3.
    assert streaming.crop_box(np.random.default_rng(0), 3, 90, attempts=0) == (0, 43, 3, 4)


def test_limit_and_unsupported_options(imagenet_dir):
    ds = load(imagenet_dir, limit=6)
    assert (ds.num_train, ds.num_test) == (6, 6)
    assert sum(int(b["mask"].sum()) for b in ds.eval_batches(4)) == 6
    images, labels = ds.arrays("train", 100)
    assert images.shape == (6, SIZE, SIZE, 3) and labels.shape == (6,)
    with pytest.raises(ValueError, match="holdout=5 is not supported for imagenet2012"):
        load(imagenet_dir, holdout=5)
    with pytest.raises(ValueError, match="pad_to=32 is not supported"):
        load(imagenet_dir, pad_to=32)
    with pytest.raises(ValueError, match="limit.*got 0"):
        load(imagenet_dir, limit=0)
    with pytest.raises(ValueError, match="pfa_jax.app.streaming.load"):
        data.load("imagenet2012", data_dir=imagenet_dir)


def test_missing_data_says_how_to_prepare_it(imagenet_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="(?s)imagenet2012 is not prepared.*ILSVRC2012_img_train"
                       r".*tfds build imagenet2012 --manual_dir MANUAL_DIR --file_format=array_record"):
        streaming.load("imagenet2012", data_dir=str(tmp_path))
    # Prepared, but as tfrecord (tfds's default), which cannot be read by index.
    tfrecord = tmp_path / "tfrecord"
    shutil.copytree(imagenet_dir, tfrecord)
    info = next(tfrecord.glob("imagenet2012/*/dataset_info.json"))
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    with pytest.raises(FileNotFoundError, match="(?s)TFRECORD.*must be prepared as array_record"):
        streaming.load("imagenet2012", data_dir=str(tfrecord))
    argv = ["train", "--dataset", "imagenet2012", "--model", "resnet18", "--quiet",
            "--set", f"data_dir={tmp_path}", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "tfds build imagenet2012 --manual_dir" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resnet18_fits_the_224_crops(imagenet_dir):
    ds = load(imagenet_dir, image_size=224)
    assert ds.image_shape == (224, 224, 3)
    experiment.check_fits(models.get("resnet18", num_classes=1000), "resnet18", ds)
    with pytest.raises(ValueError, match=r"model='lenet' does not fit imagenet2012"):
        experiment.check_fits(models.get("lenet", num_classes=1000), "lenet", load(imagenet_dir,
                                                                                  image_size=4))


# ------------------------------------------------------------------------------- training runs


def tiny_config(imagenet_dir, learning_rate=0.01, **values):
    config = default_config()
    config.optimizer.learning_rate = learning_rate
    config.update({"dataset": "imagenet2012", "data_dir": imagenet_dir, "image_size": SIZE,
                   "model_options": {"widths": (16,)}, "epochs": 2, "batch_size": 8,
                   "eval_batch_size": 4, "metrics_batch_size": 4})
    for key, value in {"rule.name": "pfa", **values}.items():
        set_value(config, key, value)
    return spec.resolve(config)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_streamed_run_records_resumes_and_measures(imagenet_dir, tmp_path):
    closing = {"sharpness.enabled": True, "sharpness.examples": 8, "sharpness.iterations": 2,
               "sharpness.probes": 2, "robustness.adversarial_epsilons": (0.01,),
               "robustness.attacks": ("fgsm",), "robustness.noise_sigmas": (0.1,),
               "robustness.examples": 6}
    summary = experiment.train_and_evaluate(tiny_config(imagenet_dir, **closing), tmp_path / "straight",
                             progress=False)
    straight = records(tmp_path / "straight")
    assert [r["epoch"] for r in straight] == [1, 2] and summary["steps"] == 2 * (N_TRAIN // 8)
    assert {"sharpness", "adversarial", "noise"} <= set(summary)
    assert set(straight[-1]["gradient_alignment"]) == {"hidden_0", "output"}

    # The record format is the in-memory path's.
    (tmp_path / "fashion").mkdir()
    fashion = make_fashion_dir(tmp_path / "fashion", 32, 8)
    experiment.train_and_evaluate(tiny_config(str(fashion), dataset="fashion_mnist", image_size=0, epochs=1),
                   tmp_path / "memory", progress=False)
    memory = records(tmp_path / "memory")[0]
    assert list(memory) == list(straight[0])
    for key in ("alignment", "gradient_alignment"):
        assert ({layer: set(v) for layer, v in memory[key].items()}
                == {layer: set(v) for layer, v in straight[0][key].items()})

    # One epoch, then resumed to two, equals the straight run.
    experiment.train_and_evaluate(tiny_config(imagenet_dir, epochs=1), tmp_path / "resumed",
                                  progress=False)
    experiment.train_and_evaluate(tiny_config(imagenet_dir), tmp_path / "resumed", progress=False,
                                  resume=True)
    resumed = records(tmp_path / "resumed")
    assert len(resumed) == 2
    for a, b in zip(resumed, straight):
        a.pop("epoch_time"), b.pop("epoch_time")
        assert a.keys() == b.keys()
        flat = lambda r: np.array(jax_leaves(r))
        np.testing.assert_allclose(flat(a), flat(b), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # 11 s; mid-epoch resume of in-memory data stays in the default tier
def test_streamed_run_resumes_mid_epoch_with_the_same_batches(imagenet_dir, tmp_path, monkeypatch,
                                                              capsys):
    """3 steps per epoch (24 / 8) and a checkpoint every 2 steps: mid-epoch ones at global steps 2
    and 4, epoch-end ones after steps 3 and 6. Interrupted just after the one at step 4 (epoch 2,
    one batch in), the resumed run continues with batch 2 of epoch 2 and ends as an
    uninterrupted run, step by step."""
    config = lambda **values: tiny_config(imagenet_dir, checkpoint_every_steps=2, log_every_steps=1,
                                          **values)
    experiment.train_and_evaluate(config(), tmp_path / "straight", progress=False)
    out = tmp_path / "resumed"
    save = checkpoint.Checkpoints.save

    def save_then_stop(self, key, state, lines=(), partial=None, config=None):
        save(self, key, state, lines, partial, config)
        if partial is not None and key == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpoints, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        experiment.train_and_evaluate(config(), out, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / resume.PARTIAL_DIR).iterdir()) == ["2", "4"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    assert len(records(out)) == 1
    before = sorted(str(p) for p in out.rglob("*"))

    # Another batch size gives another step count: refused, nothing changed.
    with pytest.raises(ValueError, match=r"step-checkpoints/4 was written mid-epoch with 3 steps per "
                       r"epoch; this config gives 2 \(batch_size or limit changed\)"):
        experiment.train_and_evaluate(config(batch_size=12), out, progress=False, resume=True)
    assert sorted(str(p) for p in out.rglob("*")) == before

    # A damaged mid-epoch checkpoint is set aside; the run resumes from the newest intact one.
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    for file in (damaged / resume.PARTIAL_DIR / "4").rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(b"\0" * file.stat().st_size)
    experiment.train_and_evaluate(config(), damaged, progress=False, resume=True)
    assert "Resuming from the checkpoint after epoch 1, the newest intact one" in capsys.readouterr().err
    assert (damaged / "damaged-checkpoints" / "step-4").is_dir()
    assert [r["test_loss"] for r in records(damaged)] == pytest.approx(
        [r["test_loss"] for r in records(tmp_path / "straight")], rel=1e-6)

    starts, train_batches = [], streaming.StreamedDataset.train_batches

    def recorded(self, batch_size, seed, epoch, rows=slice(None), start=0):
        starts.append((epoch, start))
        return train_batches(self, batch_size, seed, epoch, rows, start)

    monkeypatch.setattr(streaming.StreamedDataset, "train_batches", recorded)
    summary = experiment.train_and_evaluate(config(), out, progress=False, resume=True)
    assert starts == [(1, 1)]  # epoch 2 (0-based 1) from its second batch
    assert summary["steps"] == 6
    resumed, straight = records(out), records(tmp_path / "straight")
    assert len(resumed) == 2
    for a, b in zip(resumed, straight):
        a.pop("epoch_time"), b.pop("epoch_time")
        np.testing.assert_allclose(jax_leaves(a), jax_leaves(b), rtol=1e-6, atol=1e-6)
    # Every step's loss, read back by TensorBoard: the same batches in the same order, each once.
    steps, straight_steps = (runs.scalars(d)["step/loss"] for d in (out, tmp_path / "straight"))
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in steps], [v for _, v in straight_steps], rtol=1e-6)
    # The mid-epoch checkpoint is kept beside the epoch ones; a second resume has nothing to do.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]


def test_mid_epoch_checkpoints_are_for_streamed_data(tmp_path):
    fashion = make_fashion_dir(tmp_path, 32, 8)
    with pytest.raises(ValueError, match="checkpoint_every_steps=5 applies to streamed datasets "
                       r"\(imagenet2012\) only; fashion_mnist's epochs are one compiled call each"):
        tiny_config(str(fashion), dataset="fashion_mnist", image_size=0, checkpoint_every_steps=5)
    with pytest.raises(ValueError, match="data_processes=2 applies to streamed datasets"):
        tiny_config(str(fashion), dataset="fashion_mnist", image_size=0, data_processes=2)
    with pytest.raises(ValueError, match="checkpoint_every_steps=-1 must be an int >= 0"):
        tiny_config(str(tmp_path), checkpoint_every_steps=-1)


def jax_leaves(record):
    """The record's numbers in a fixed order."""
    if isinstance(record, dict):
        return [x for key in sorted(record) for x in jax_leaves(record[key])]
    return [float(record)]


def test_streamed_divergence_and_bad_options(imagenet_dir, tmp_path):
    with pytest.raises(experiment.DivergenceError, match="diverged in epoch 1"):
        experiment.train_and_evaluate(tiny_config(imagenet_dir, learning_rate=1e12, **{"rule.name": "bp"}),
                       tmp_path / "run", progress=False)
    # Checkpointing every step: the steps before the first non-finite loss are checkpointed, the
    # diverged state is not.
    with pytest.raises(experiment.DivergenceError, match=r"diverged in epoch 1 at step 3: .* The "
                       r"last good checkpoint \(at step 2 of epoch 1\) is kept in .*step-checkpoints"):
        experiment.train_and_evaluate(tiny_config(imagenet_dir, learning_rate=1e12, checkpoint_every_steps=1,
                                   **{"rule.name": "bp"}), tmp_path / "every", progress=False)
    assert sorted(p.name for p in (tmp_path / "every" / resume.PARTIAL_DIR).iterdir()) == ["1", "2"]
    with pytest.raises(ValueError, match="augment='crop_flip' is for in-memory datasets"):
        experiment.train_and_evaluate(tiny_config(imagenet_dir, augment="crop_flip"), tmp_path / "a",
                                      progress=False)
    with pytest.raises(ValueError, match="image_size=16 applies to streamed datasets"):
        experiment.train_and_evaluate(tiny_config(imagenet_dir, dataset="mnist"), tmp_path / "b",
                                      progress=False)


def test_fig5_config():
    runs = {r.labels["rule"]: runner.run_config("fig5_imagenet", r)
            for r in configs.load("fig5_imagenet").runs()}
    assert set(runs) == {"bp", "usf", "pfa"} and configs.names()[-1] == "fig5_imagenet"
    bp, pfa = runs["bp"], runs["pfa"]
    assert (bp.model, bp.dataset, bp.epochs, bp.batch_size, bp.image_size) == (
        "resnet18", "imagenet2012", 75, 256, 224)
    assert (bp.data_processes, bp.checkpoint_every_steps) == (8, 1000)
    spec.resolve(bp)  # valid as a whole
    assert (bp.optimizer.learning_rate, bp.optimizer.lr_milestones, bp.optimizer.lr_decay) == (
        0.1, (20, 40, 60), 0.1)
    assert bp.optimizer.weight_decay == 1e-4 and runs["usf"].optimizer.weight_decay == 1e-4
    assert pfa.optimizer.weight_decay == (5e-4, 1e-4) and pfa.optimizer.wd_milestones == (1,)
