"""nse-tf: Neural Search-space Evolution (NSE, ICCV 2021) in TensorFlow/Keras."""

import setuptools

setuptools.setup(
    name="nse-tf",
    version="0.1.0",
    description=("Neural Search-space Evolution (NSE) neural architecture search in "
                 "TensorFlow/Keras, with NSENet backbones for EfficientDet-D0 on tf-models"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    # The repository's detection/ folder installs as `nse_tf_detection`: a top-level
    # package named `detection` would clash with other distributions'.
    packages=setuptools.find_packages(include=["nse_tf", "nse_tf.*"]) + ["nse_tf_detection"],
    package_dir={"nse_tf_detection": "detection"},
    package_data={"nse_tf": ["released_archs.json"], "nse_tf_detection": ["configs/*.yaml"]},
    install_requires=[
        # tf-models-official 2.20 pins the stack to TensorFlow 2.20 + tf_keras 2.20.
        "tensorflow==2.20.*",
        "tf-keras==2.20.*",
        "tf-models-official==2.20.0",
        "tensorflow-datasets>=4.9",
        "absl-py",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",       # ships the 'digits' images of the embedded demo data
        "scipy>=1.10",             # demo_digits_hard rendering (affine warps), t quantiles
        "numpy>=1.26,<2.4",        # tf-models' test helpers break on numpy 2.4
        "pillow<13",
        "importlib_resources",     # tfds builders import it
        "tensorboard>=2.20",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.8"]},
    entry_points={"console_scripts": [
        "nse-search=nse_tf.search:run",
        "nse-train-round=nse_tf.train_round:run",
        "nse-retrain=nse_tf.retrain:run",
        "nse-export=nse_tf.export:run",
    ]},
)
