"""Native (C++) time loops of ``kspike.SpikingRNN``, compiled on first use.

``spiking_ops.cc`` holds two TensorFlow ops that run the whole sequence of one LIF/ALIF layer
(forward, and the hand-written backward recurrence with dW_rec) without a TensorFlow op per
element-wise update (cells with synaptic delays have their own pair), and the per-synapse
eligibility-trace recursions of single-pass e-prop (``KspikeEpropTraces``, docs/eprop.md).
They are compiled against the installed TensorFlow the first time they
are needed (10-60 s with g++) and cached, keyed by the source, the TensorFlow version,
the compiler flags and the CPU, in ``$KSPIKE_CACHE_DIR`` (default ``~/.cache/kspike``).

Nothing else depends on them: without a C++ compiler, on a TensorFlow whose headers do not
compile, or with ``KSPIKE_NATIVE=0`` in the environment, ``load()`` returns None (warning once
with the reason, except when disabled on purpose) and ``kspike.SpikingRNN`` (and
``EProp(single_pass=True)``) run their TensorFlow loops, which give the same results.
"""
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings

__all__ = ["load", "available", "unavailable_reason", "cache_dir", "backward_stats", "SOURCE"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spiking_ops.cc")

_lock = threading.Lock()
_state = {"loaded": False, "module": None, "error": None, "library": None}


def cache_dir():
    """Directory of compiled libraries: ``$KSPIKE_CACHE_DIR`` or ``~/.cache/kspike``."""
    root = os.environ.get("KSPIKE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kspike")
    return os.path.join(root, "native")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler_command(tf, output):
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    arch = ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else []
    if arch and any(f in _cpu_flags().split() for f in ("avx512_fp16", "avx512fp16")):
        # TensorFlow's bundled Eigen does not compile with AVX512-FP16 enabled.
        arch.append("-mno-avx512fp16")
    # -ffp-contract=off: no fused multiply-adds, so element-wise updates round as in TensorFlow.
    return ([compiler, "-O3", *arch, "-ffp-contract=off", "-fPIC", "-shared", "-w", SOURCE,
             "-o", output] + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())


def _library_key(tf):
    """The cache key of the compiled library: the source's text, TensorFlow's version, the
    compiler command and the CPU's flags. The command enters without the source's location,
    so copies of kspike in several folders (virtual environments, checkouts) share one
    compiled library."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    probe = [os.path.basename(a) if a == SOURCE else a for a in _compiler_command(tf, "OUT")]
    return hashlib.sha256(b"\0".join([source, tf.__version__.encode(), " ".join(probe).encode(),
                                      _cpu_flags().encode()])).hexdigest()[:16]


def _build(tf):
    key = _library_key(tf)
    directory = cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        # An unwritable home: a private folder of the temporary directory instead.
        directory = os.path.join(tempfile.gettempdir(), f"kspike-native-{os.getuid()}")
        os.makedirs(directory, exist_ok=True)
    library = os.path.join(directory, f"spiking_ops_{key}.so")
    if not os.path.exists(library):
        print("kspike: compiling the native SpikingRNN loops for this TensorFlow and CPU "
              f"(once, 10-60 s; cached in {directory}) ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        # Compile to a private name, then rename: concurrent processes never load a partial file.
        handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(handle)
        try:
            result = subprocess.run(_compiler_command(tf, partial), capture_output=True,
                                    text=True, timeout=600)
            if result.returncode != 0:
                raise RuntimeError("compiling spiking_ops.cc failed:\n" + result.stderr[-2000:])
            os.replace(partial, library)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        print(f"kspike: native loops compiled in {time.monotonic() - start:.0f} s.",
              file=sys.stderr, flush=True)
    _state["library"] = library
    return tf.load_op_library(library)


def _disabled():
    return os.environ.get("KSPIKE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def load():
    """The compiled op module (``KspikeSpikingForward``, ``KspikeSpikingBackward``), or None.

    Compiles on the first call of a process when no cached library fits; later calls return
    the same module at once. Set ``KSPIKE_NATIVE=0`` to never use the native loops.
    """
    if _disabled():
        return None
    if _state["loaded"]:
        return _state["module"]
    with _lock:
        if not _state["loaded"]:
            import tensorflow as tf
            try:
                _state["module"] = _build(tf)
            except Exception as error:  # any failure means: use the TensorFlow loop
                _state["error"] = f"{type(error).__name__}: {error}"
                warnings.warn("kspike: the native SpikingRNN loops are unavailable "
                              f"({_state['error']}); using the TensorFlow loop (same results, "
                              "slower). Set KSPIKE_NATIVE=0 to silence this.", RuntimeWarning,
                              stacklevel=2)
            _state["loaded"] = True
    return _state["module"]


def available():
    """True when the native loops load (compiling them if needed)."""
    return load() is not None


def unavailable_reason():
    """Why ``load()`` returns None, as a sentence (the environment setting or the build
    error), or None when the native loops load."""
    if _disabled():
        return f"KSPIKE_NATIVE={os.environ['KSPIKE_NATIVE']!r} is set in the environment"
    if load() is None:
        return f"the native loops did not compile or load ({_state['error']})"
    return None


_STATS = ("sparse_steps", "dense_steps", "entries", "nonzero_psi", "nonzero_terms",
          "current_written", "current_skipped")


def backward_stats(reset=False):
    """What the native backward op (``KspikeSpikingBackward``) did since the library loaded
    or the last ``reset=True``, as a dict, or None when the native loops do not load:

    - ``sparse_steps`` / ``dense_steps``: steps (per batch shard) whose recurrent backward
      product dI_t W_rec^T added only the rows of the neurons with a nonzero pseudo-derivative
      term / took the dense product;
    - ``entries``: neurons x steps x batch rows differentiated;
    - ``nonzero_psi``: of those, the entries with a nonzero pseudo-derivative psi_t (0 in
      refractory periods); ``nonzero_terms``: with a nonzero dL/dz_t psi_t / A_t (layers
      with recurrent weights only);
    - ``current_written`` / ``current_skipped``: calls that wrote the gradient of the input
      current dL/dI_t (T, B, n) as an output / did not, because no op of the graph reads it
      (a training step that needs no gradient of the layer's inputs and has no bias: the
      weight gradients are summed in the loop from one block of steps at a time);
    - ``psi_fraction``, ``term_fraction``: nonzero_psi and nonzero_terms over ``entries``
      (None before any call).

    The counts cover every backward call of the process (all layers, all threads); ``reset``
    returns them and sets them to zero.
    """
    module = load()
    if module is None:
        return None
    counts = [int(c) for c in module.kspike_backward_stats(reset=bool(reset)).numpy()]
    stats = dict(zip(_STATS, counts))
    entries = stats["entries"]
    stats["psi_fraction"] = stats["nonzero_psi"] / entries if entries else None
    stats["term_fraction"] = stats["nonzero_terms"] / entries if entries else None
    return stats
