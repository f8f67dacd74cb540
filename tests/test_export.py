"""Tests of nse_tf.export: SavedModel for TF Serving (real encoded images, bad bytes), TFLite."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from nse_tf import arch as arch_lib
from nse_tf import data as data_lib
from nse_tf import demo_data
from nse_tf import export
from nse_tf import retrainer

TINY = "flops27@tiny*0.25:0|3|-|6|0|9+21"
# Every test here is slow: the module fixture trains a network for 300 steps, and the
# rest also load SavedModels in fresh processes or convert to TFLite.
pytestmark = pytest.mark.slow

SIZE = 32
STEPS = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished short retrain directory and its Keras model.

  300 steps (about 10 s) take the tiny net from chance to about 60 % on demo_digits, so its
  logits differ from image to image and int8 agreement means something (at 8 steps every
  image got the same near-tied logits, and one CI run's int8 argmax agreed on 19 %).
  Trained with the EfficientNet recipe's options (swish, SE, stochastic depth, dropout,
  label smoothing, RandAugment), so those train and export too.
  """
  model_dir = str(tmp_path_factory.mktemp("retrain"))
  arch = arch_lib.Architecture.from_compact(TINY)
  d = data_lib.get_data("demo_digits", image_size=SIZE, holdout_examples=0)
  cfg = retrainer.RetrainConfig(global_batch=32, epochs=1, steps_per_epoch=STEPS, lr=0.1,
                              warmup_epochs=0.2, ema_decay=0.9, eval_every=0, progress=False,
                              activation="swish", se=True, drop_path=0.2, dropout=0.2,
                              label_smoothing=0.1, augment="randaugment")
  r = retrainer.Retrainer(arch, cfg, tf.distribute.get_strategy(), d, model_dir)
  assert any(l.name.endswith("_drop") for l in r.model.layers)
  history = r.train()
  assert len(history) == STEPS and all(np.isfinite(h["loss"]) for h in history)
  arch.save(os.path.join(model_dir, "arch.json"))
  with open(os.path.join(model_dir, "model_config.json"), "w") as f:
    json.dump(r.model_config, f)
  r.write_final()
  model = retrainer.load_trained_model(model_dir)
  images, labels = export.take_images(d.validation(100), 100)
  accuracy = np.mean(model(images, training=False).numpy().argmax(-1) == labels)
  assert accuracy >= 0.3, f"the fixture's net did not leave chance ({accuracy:.2f})"
  return model_dir, model, r.model_config, d, images, labels


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  model_dir, model, config, *_ = trained
  export_dir = str(tmp_path_factory.mktemp("export"))
  path = export.export_saved_model(model, config, export_dir, max_pixels=1_000_000,
                                   extra_files={"arch.json": os.path.join(model_dir, "arch.json")})
  return export_dir, path, tf.saved_model.load(path)


def _png(image):
  return tf.io.encode_png(tf.constant(image, tf.uint8)).numpy()


def _jpeg(image):
  return tf.io.encode_jpeg(tf.constant(image, tf.uint8), quality=95).numpy()


def test_versioned_layout_and_refusal_to_overwrite(trained, exported):
  export_dir, path, _ = exported
  assert path == os.path.join(export_dir, "1")
  assert os.path.exists(os.path.join(path, "saved_model.pb"))
  assert os.path.exists(os.path.join(path, "assets.extra", "arch.json"))
  assert export.next_version(export_dir) == 2
  assert not [n for n in os.listdir(export_dir) if "tmp" in n]
  _, model, config, *_ = trained
  with pytest.raises(ValueError, match="already exists"):
    export.export_saved_model(model, config, export_dir, version=1)


def test_saved_model_logits_equal_keras(trained, exported):
  _, model, config, _, images, _ = trained
  loaded = exported[2]
  keras_logits = model(images, training=False).numpy()
  out = loaded.signatures["serving_images"](images=tf.constant(export.pixels_of(images, config)))
  diff = np.abs(out["logits"].numpy() - keras_logits).max()
  assert diff <= 1e-5, diff
  np.testing.assert_array_equal(out["classes"].numpy()[:, 0], keras_logits.argmax(-1))
  np.testing.assert_allclose(out["probabilities_all"].numpy().sum(-1), 1.0, rtol=1e-5)


def test_serving_default_on_encoded_images_matches_the_validation_pipeline(trained, exported):
  """PNG-encoded raw demo images through the served graph = Keras on the eval pipeline."""
  _, model, _, d, images, _ = trained
  raw = demo_data.load_demo("demo_digits")[2][:len(images)]     # the validation split's raw 8x8 pixels
  out = exported[2].signatures["serving_default"](
      image_bytes=tf.constant([_png(im) for im in raw]))
  assert out["valid"].numpy().all()
  probs = tf.nn.softmax(model(images, training=False)).numpy()
  np.testing.assert_array_equal(out["classes"].numpy()[:, 0], probs.argmax(-1))
  np.testing.assert_allclose(out["probabilities"].numpy()[:, 0], probs.max(-1), atol=1e-5)
  assert out["classes"].shape == (len(raw), 5)
  names = out["class_names"].numpy()[:, 0]
  assert [n.decode() for n in names] == [str(c) for c in probs.argmax(-1)]


def test_bad_and_odd_inputs_are_flagged_or_resized_not_fatal(exported):
  serve = exported[2].signatures["serving_default"]
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
  gray_png = tf.io.encode_png(tf.constant(rgb[..., :1])).numpy()
  rgba_png = tf.io.encode_png(tf.constant(np.concatenate([rgb, rgb[..., :1]], -1))).numpy()
  jpeg = _jpeg(rgb)
  big = _png(np.zeros((1001, 1001, 3), np.uint8))             # > max_pixels = 1e6
  huge_header = bytearray(_png(rgb))
  huge_header[16:24] = (100_000).to_bytes(4, "big") * 2      # claims 100000x100000
  batch = [jpeg, b"not an image at all", jpeg[:len(jpeg) // 3], b"", gray_png, rgba_png,
           _png(rgb[:1, :1]), _jpeg(rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)),
           big, bytes(huge_header), b"\x89PNG\r\n\x1a\n" + b"\x00" * 30,
           tf.io.encode_png(tf.constant(rgb.astype(np.uint16) * 257)).numpy()]
  out = {k: v.numpy() for k, v in serve(image_bytes=tf.constant(batch)).items()}
  expect = [True, False, False, False, True, True, True, True, False, False, False, True]
  np.testing.assert_array_equal(out["valid"], expect)
  bad = ~np.array(expect)
  assert (out["classes"][bad] == -1).all() and (out["probabilities"][bad] == 0).all()
  assert (out["classes"][~bad] >= 0).all() and (out["probabilities"][~bad] > 0).all()
  errors = [e.decode() for e in out["error"]]
  assert errors[0] == "" and "not a JPEG, PNG, GIF or BMP image" in errors[1]
  assert "corrupt or truncated" in errors[2] and "1000000 pixels" in errors[8]
  # A grayscale or RGBA image is answered like its RGB version; 16-bit PNGs like 8-bit.
  ref = {k: v.numpy() for k, v in serve(image_bytes=tf.constant(
      [_png(np.repeat(rgb[..., :1], 3, -1)), _png(rgb)])).items()}
  np.testing.assert_allclose(out["probabilities"][4], ref["probabilities"][0], atol=1e-6)
  np.testing.assert_allclose(out["probabilities"][5], ref["probabilities"][1], atol=1e-6)
  np.testing.assert_allclose(out["probabilities"][11], ref["probabilities"][1], atol=1e-6)
  # An empty batch, each bad input alone (one image per request, as TF Serving's REST
  # clients send them) and an all-invalid batch are answered, never failed as a whole:
  # the network must not run on a zero-size batch (some CPUs' kernels reject it).
  empty = {k: v.numpy() for k, v in serve(image_bytes=tf.constant([], tf.string)).items()}
  assert empty["valid"].shape == (0,) and empty["classes"].shape == (0, 5)
  bad_inputs = [batch[i] for i in np.flatnonzero(bad)]
  for request in [[b] for b in bad_inputs] + [bad_inputs]:
    out = {k: v.numpy() for k, v in serve(image_bytes=tf.constant(request)).items()}
    assert not out["valid"].any() and (out["classes"] == -1).all(), request
    assert (out["probabilities"] == 0).all() and all(out["error"]), out["error"]
  images = exported[2].signatures["serving_images"]
  assert images(images=tf.zeros([0, 8, 8, 3]))["classes"].shape == (0, 5)


_FRESH = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nse_tf", "tf_keras", "official"):
          raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())
    try:
      import nse_tf
      raise SystemExit("nse_tf importable")
    except ImportError:
      pass
    import tensorflow as tf
    m = tf.saved_model.load(sys.argv[1])
    out = m.signatures["serving_default"](
        image_bytes=tf.constant([open(sys.argv[2], "rb").read(), b"junk"]))
    print("RESULT", out["valid"].numpy().tolist(), out["classes"].numpy()[0].tolist())
    print("MODULES", sorted(n for n in sys.modules if n.split(".")[0] in ("nse_tf", "tf_keras")))
    sys.stdout.flush()
    # The saved_model_cli console script is `sys.exit(saved_model_cli.main())`: run its two
    # commands here, in the process that cannot import this project.
    from tensorflow.python.tools import saved_model_cli
    run = ["saved_model_cli", "run", "--dir", sys.argv[1], "--tag_set", "serve",
           "--signature_def", "serving_default", "--inputs"]
    for argv in (["saved_model_cli", "show", "--all", "--dir", sys.argv[1]],
                 run + ["image_bytes=" + sys.argv[3]], run + ["image_bytes=" + sys.argv[4]]):
      sys.argv = argv
      try:
        saved_model_cli.main()
      except SystemExit as e:
        assert not e.code, (argv, e.code)
      print("END", argv[1])
      sys.stdout.flush()
""")


def test_fresh_process_without_the_project_and_saved_model_cli(trained, exported, tmp_path):
  _, model, _, d, images, _ = trained
  path = exported[1]
  raw = demo_data.load_demo("demo_digits")[2][0]
  jpeg_path = tmp_path / "digit.jpg"
  jpeg_path.write_bytes(_jpeg(np.kron(raw, np.ones((8, 8, 1), np.uint8))))   # 64x64 JPEG
  script = tmp_path / "fresh.py"
  script.write_text(_FRESH)
  npy = tmp_path / "bytes.npy"
  np.save(npy, np.array([jpeg_path.read_bytes()], dtype=object), allow_pickle=True)
  bad_npy = tmp_path / "bad.npy"     # one request, one image, not valid: answered, not failed
  np.save(bad_npy, np.array([b"not an image"], dtype=object), allow_pickle=True)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  run = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
             env=env)
  proc = subprocess.run([sys.executable, "-I", str(script), path, str(jpeg_path), str(npy),
                         str(bad_npy)],
                        timeout=300, **run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "RESULT [True, False]" in out and "MODULES []" in out, out
  show, run_out = out.split("END show")
  for needle in ("signature_def['serving_default']", "signature_def['serving_images']",
                 "image_bytes", "dtype: DT_STRING", "probabilities", "error"):
    assert needle in show, needle
  good_out, bad_out = run_out.split("END run")[:2]
  assert "Result for output key valid" in good_out and "[ True]" in good_out, good_out
  assert "Result for output key valid" in bad_out and "[False]" in bad_out, bad_out
  assert "not a JPEG, PNG, GIF or BMP image" in bad_out and "[[-1" in bad_out, bad_out


def test_tflite_float_and_int8(trained, tmp_path):
  _, model, _, d, images, _ = trained
  calib, _ = export.take_images(d.train(50, repeat=False, augment=False), 50)
  float_model = export.tflite_float(model, SIZE)
  int8_model = export.tflite_int8(model, SIZE, calib)
  keras_logits = model(images, training=False).numpy()
  f = export.run_tflite(float_model, images)
  assert np.abs(f - keras_logits).max() <= 1e-4
  q = export.run_tflite(int8_model, images)
  interp = tf.lite.Interpreter(model_content=int8_model)
  assert interp.get_input_details()[0]["dtype"] == np.int8
  # Measured on this fixture (8 runs, 4 at once): agreement 0.94-0.97, centred relative error
  # 0.04-0.08. The bounds leave room for a differently trained net; the 200-image figure for
  # a fully trained network is in the README.
  assert np.mean(q.argmax(-1) == keras_logits.argmax(-1)) >= 0.85
  centred = lambda x: x - x.mean(0)
  assert (np.linalg.norm(centred(q) - centred(keras_logits))
          <= 0.25 * np.linalg.norm(centred(keras_logits)))


def test_export_to_a_full_or_unusable_dir_is_one_error_line(trained, small_disk, tmp_path,
                                                            one_error_line):
  """A full disk or a path under a regular file: one line, exit 2, no .tmp version left."""
  model_dir = trained[0]
  base, preexec = small_disk(300)          # the write probe (256 KiB) fits, a SavedModel not
  (tmp_path / "a_file").write_text("x")
  cases = [(os.path.join(base, "export"), preexec, ("No space left on device", "File too large")),
           (str(tmp_path / "a_file" / "export"), None, ("Not a directory",))]
  for export_dir, fn, needles in cases:
    one_error_line("export", [f"--model_dir={model_dir}", f"--export_dir={export_dir}",
                              "--verify_examples=0"], needles, preexec_fn=fn)
    if os.path.isdir(export_dir):
      assert [n for n in os.listdir(export_dir) if n != ".lock"] == [], os.listdir(export_dir)
