"""Benchmark tasks as tf.data pipelines (nothing is downloaded)."""
from kspike.tasks._common import (WindowAccuracy, WindowCrossEntropy, window_accuracy,
                                  window_cross_entropy, window_logits)
from kspike.tasks.evidence import evidence_accumulation, evidence_logits
from kspike.tasks.shd import shd
from kspike.tasks.static_images import encode_images, load_image_arrays, static_images
from kspike.tasks.smnist import mnist_logits, sequential_mnist, threshold_crossing_encoding
from kspike.tasks.store_recall import (RecallCrossEntropy, RecallError, recall_error,
                                       store_recall)

__all__ = ["sequential_mnist", "store_recall", "evidence_accumulation", "shd", "mnist_logits",
           "evidence_logits", "recall_error", "threshold_crossing_encoding", "window_logits",
           "window_cross_entropy", "window_accuracy", "RecallError", "RecallCrossEntropy",
           "WindowCrossEntropy", "WindowAccuracy", "static_images", "encode_images",
           "load_image_arrays"]
