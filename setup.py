"""bmvae-tf: Bayesian mixture variational autoencoders for multimodal data, on TensorFlow."""

from setuptools import find_packages, setup

# One import namespace, bmvae_tf, over the repository's three top-level folders: the model code
# (bmvae_tf/), the Beam jobs (pipeline/ -> bmvae_tf.pipeline) and the training, evaluation and
# export edge (trainers/ -> bmvae_tf.trainers). Installed top-level packages named `pipeline` or
# `trainers` would shadow, or be shadowed by, any user module of those names.
PACKAGE_DIRS = {"bmvae_tf": "bmvae_tf", "bmvae_tf.pipeline": "pipeline", "bmvae_tf.trainers": "trainers"}


def _packages() -> list[str]:
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    return packages


setup(
    name="bmvae-tf",
    version="0.1.0",
    description="Bayesian mixture VAEs (BMVAE_M, BMVAE_P) and multimodal VAE baselines on TensorFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    package_data={"": ["*.yaml"], "bmvae_tf.pipeline": ["cub_splits/*.txt"]},
    install_requires=[
        "tensorflow~=2.21.0",
        "keras>=3.10,<4",
        "tensorflow-probability~=0.25.0",
        # TFP's TensorFlow extra: tf-keras matching the TensorFlow release.
        "tf-keras~=2.21.0",
        "apache-beam[tfrecord]~=2.77.0",
        # Beam's TensorFlow model handler (RunInference) imports tensorflow_hub.
        "tensorflow-hub>=0.16",
        # CUB captions: NLTK's tokenizers (no downloaded data needed) and gensim's FastText.
        "nltk>=3.9",
        "gensim>=4.3",
        "pillow>=10",
        "tensorflow-datasets~=4.9.0",
        "numpy>=1.26,<3",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "threadpoolctl>=3.1",  # evaluation pins BLAS threads for the small sklearn fits
        "matplotlib>=3.8",
        "pyyaml>=6.0",
        # tf.summary needs it; TensorFlow 2.21 no longer installs it.
        "tensorboard>=2.18",
        # `bmvae tune`: the search (Optuna 5.1 here), PostgreSQL storage for studies shared by hosts.
        "optuna~=5.1",
        "psycopg2-binary>=2.9,<3",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5"],
        # Beam's DaskRunner on a dask.distributed cluster (dask, distributed); tests/pipeline/test_dask.py.
        "dask": ["apache-beam[dask]~=2.77.0"],
    },
    entry_points={"console_scripts": ["bmvae=bmvae_tf.trainers.cli:main"]},
)
