"""Temporary alias of `bmvae_tf.pipeline.sentence_vectors`, kept only for trainers/cca.py.

trainers/cca.py belongs to the evaluation restructuring and still imports the old name; delete
this file when its import becomes `from bmvae_tf.pipeline import sentence_vectors`.
"""

from bmvae_tf.pipeline.sentence_vectors import *  # noqa: F401,F403
