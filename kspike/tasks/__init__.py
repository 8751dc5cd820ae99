"""Benchmark tasks as tf.data pipelines (nothing is downloaded)."""
