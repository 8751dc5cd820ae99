"""The few places where kspike needs Keras or TensorFlow internals, each behind one function.

Every function here reads something that Keras 3 / TensorFlow 2 expose only through private
attributes or ``keras.src`` / ``tensorflow.python`` modules. Keeping them in one module means a
new Keras or TensorFlow release breaks (at most) this file, and each function says why no
public API serves. The rest of kspike calls these functions and never touches the internals.
"""
import os

__all__ = ["call_count", "call_keyword_arguments", "inbound_input_tensors", "nested_layers",
           "output_structure",
           "own_variables",
           "loss_function_wrapper", "wrap_loss_function", "wrapped_loss_function",
           "in_xla_context", "tape_may_record", "native_inference_allowed",
           "mark_step_function", "unscale_loss_for_distribution",
           "keras_seed_state", "freeze_concrete_function"]


def call_count(layer):
    """How many times ``layer`` was called in functional graphs (its inbound nodes).

    Keras 3 has no public accessor for a layer's graph nodes; ``layer.input`` raises or
    picks the first call when a layer is shared, so chain checks need the node list.
    """
    return len(layer._inbound_nodes)


def call_keyword_arguments(layer):
    """[{keyword arguments} per inbound node] of ``layer``: the keywords it was called with in
    functional graphs (e.g. ``training=False``; see ``call_count`` for why)."""
    return [dict(node.arguments.kwargs) for node in layer._inbound_nodes]


def inbound_input_tensors(layer):
    """[[input tensors] per inbound node] of ``layer`` (see ``call_count`` for why)."""
    return [list(node.input_tensors) for node in layer._inbound_nodes]


def nested_layers(layer, include_self=False):
    """Every layer tracked inside ``layer`` (sub-models, wrapped cells), depth first.

    ``keras.Model.layers`` lists the top level only and Keras 3 has no public recursive walk;
    its own tracking (``_flatten_layers``) is the one that also finds RNN cells and
    ``TimeDistributed`` contents.
    """
    return list(layer._flatten_layers(include_self=include_self, recursive=True))


def output_structure(model):
    """The outputs of a functional model in the nesting it was built with (a tensor, list or
    dict), or None; ``model.outputs`` is always a flat list and Keras 3 keeps the structure
    private (``_outputs_struct``)."""
    return getattr(model, "_outputs_struct", None)


def own_variables(layer):
    """(trainable, non_trainable) variables created by ``layer`` itself, without those of the
    layers it tracks; ``layer.trainable_variables`` is recursive and Keras 3 keeps the
    per-layer lists private."""
    return list(layer._trainable_variables), list(layer._non_trainable_variables)


def loss_function_wrapper():
    """The class Keras 3 wraps its function losses in (``keras.losses.MeanSquaredError`` and
    the other built-in loss classes are subclasses); it is not exported by ``keras.losses``."""
    from keras.src.losses.losses import LossFunctionWrapper
    return LossFunctionWrapper


def wrap_loss_function(fn, name=None):
    """A ``keras.losses.Loss`` around an elementwise ``fn(y_true, y_pred)`` the way Keras builds
    its own loss classes (same reduction and masking), see ``loss_function_wrapper``."""
    return loss_function_wrapper()(fn, name=name)


def wrapped_loss_function(loss):
    """(fn, kwargs) of a Keras function-loss wrapper whose ``call`` is Keras' own, else None.

    The elementwise function and its keyword arguments are stored privately (``fn`` is public,
    ``_fn_kwargs`` is not); rules that need the per-element loss read them here.
    """
    wrapper = loss_function_wrapper()
    if isinstance(loss, wrapper) and type(loss).call is wrapper.call:
        return loss.fn, dict(loss._fn_kwargs)
    return None


def in_xla_context():
    """True while tracing inside an XLA-compiled function (e.g. ``jit_compile=True``).

    TensorFlow exposes no public query for the XLA context of the graph being built; kspike's
    native ops cannot be compiled by XLA and need to know. False on a TensorFlow without these
    internals.
    """
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


def tape_may_record():
    """True if a gradient tape may record the next op (TensorFlow has no public query);
    True, the safe answer, on a TensorFlow without this internal."""
    try:
        from tensorflow.python.eager import record
    except ImportError:
        return True
    return bool(record.could_possibly_record())


_STEP_CODES = set()


def mark_step_function(fn):
    """Mark the Python function ``fn`` (which kspike wraps in a ``tf.function`` of its own and
    never exports, e.g. the Trainer's steps) as one in which ``native_inference_allowed``
    holds. Returns ``fn``."""
    _STEP_CODES.add(fn.__code__)
    return fn


def native_inference_allowed():
    """True where a forward pass without a gradient tape may run kspike's native ops.

    Why: a graph holding a native op loads only in a process that has compiled and loaded
    kspike's library, so the native forward must never be traced into a function that a
    user can export (``tf.saved_model.save``, ``model.export``, ``kspike.export``). Such
    functions are built outside Keras' step functions, and TensorFlow gives no way to ask
    which function is being traced, so this allows exactly: eager execution (no graph at
    all), and tracing of the functions Keras builds for fit / evaluate / predict (the
    ``tf.function``s of ``TensorFlowTrainer._make_function`` / ``make_predict_function``,
    which Keras itself leaves out of every SavedModel) or that kspike marked with
    ``mark_step_function`` - recognised by their code being on the Python stack of the
    trace. Never while a SavedModel is written (``save_context``), nor in a ``tf.function``
    traced inside one of those functions (a frame of TensorFlow's tracing code comes first:
    that inner function might be saved later). Under a ``MirroredStrategy`` the replica
    function runs in a thread of its own that does not see the step function's frame, so
    there this answers False (the TensorFlow loop: same results, slower). False on a
    TensorFlow or Keras without these internals.
    """
    import sys

    import tensorflow as tf
    if tf.executing_eagerly():
        return True
    try:
        from tensorflow.python.eager.polymorphic_function import polymorphic_function
        from tensorflow.python.saved_model import save_context
        from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    except ImportError:
        return False
    if save_context.in_save_context():
        return False
    if not _KERAS_STEP_CODES:
        for name in ("_make_function", "make_train_function", "make_test_function",
                     "make_predict_function"):
            method = getattr(TensorFlowTrainer, name, None)
            codes = [method.__code__] if hasattr(method, "__code__") else []
            while codes:   # the functions defined inside the method, at any depth
                code = codes.pop()
                nested = [c for c in code.co_consts if hasattr(c, "co_consts")]
                _KERAS_STEP_CODES.update(nested)
                codes.extend(nested)
    tracing = os.path.dirname(polymorphic_function.__file__)
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code in _KERAS_STEP_CODES or code in _STEP_CODES:
            return True
        if code.co_filename.startswith(tracing):
            return False
        frame = frame.f_back
    return False


_KERAS_STEP_CODES = set()


def unscale_loss_for_distribution(value):
    """Undo the 1/replicas scaling Keras applies to a mean-reduced loss under a distribution
    strategy (``keras.src.losses.loss``; not exported by ``keras.losses``)."""
    from keras.src.losses.loss import unscale_loss_for_distribution as unscale
    return unscale(value)


def keras_seed_state():
    """The state variable of Keras' global seed generator (what ``keras.random`` draws from
    without an explicit seed), or None; checkpoints save it for bit-exact resumption and
    Keras 3 keeps the global generator private."""
    try:
        from keras.src.random import seed_generator
        return seed_generator.global_seed_generator().state.value
    except (ImportError, AttributeError):
        return None


def freeze_concrete_function(function):
    """``function`` (a concrete tf.function) with its variables folded in as constants.

    The LiteRT interpreter reads variables of a converted function as uninitialised memory, so
    the step function is frozen first; TensorFlow's own converters use
    ``convert_variables_to_constants_v2``, which has no public alias.
    """
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)
    return convert_variables_to_constants_v2(function)
