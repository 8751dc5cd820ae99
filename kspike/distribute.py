"""Multi-worker training helpers: a checked ``TF_CONFIG``, a MultiWorkerMirroredStrategy that
fails in bounded time instead of waiting forever for a peer, and free local ports for workers
started on one machine (see docs/distributed.md)."""

import json
import os
import socket
import time

import tensorflow as tf


def free_ports(n, host="127.0.0.1"):
    """``n`` distinct TCP ports of ``host`` that are free now, e.g. for a TF_CONFIG of ``n``
    local workers.

    The ports are found by binding ``n`` sockets at once (so they differ) and closing them;
    another program could take one before the workers bind it.

    >>> import kspike
    >>> ports = kspike.distribute.free_ports(2)
    >>> len(set(ports)) == 2 and all(0 < p < 65536 for p in ports)
    True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an integer >= 1, received {n!r}.")
    sockets = []
    try:
        for _ in range(n):
            sockets.append(socket.socket())
            sockets[-1].bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def parse_tf_config(value=None):
    """Reads and checks a ``TF_CONFIG`` cluster description.

    Args:
        value: the JSON text (or an already parsed dict); None reads the ``TF_CONFIG``
            environment variable.

    Returns:
        dict with ``cluster`` (job name -> list of "host:port") and ``task`` (``type``,
        ``index``), the task pointing at an existing address of the cluster.

    Raises:
        ValueError: TF_CONFIG is missing, not JSON, or its cluster/task are malformed.
    """
    if value is None:
        value = os.environ.get("TF_CONFIG")
        if not value:
            raise ValueError("TF_CONFIG is not set: expected a JSON value such as "
                             '{"cluster": {"worker": ["host0:port", "host1:port"]}, '
                             '"task": {"type": "worker", "index": 0}}.')
    if isinstance(value, str):
        try:
            config = json.loads(value)
        except ValueError as error:
            raise ValueError(f"TF_CONFIG is not valid JSON ({error}); received {value!r}.") \
                from None
    else:
        config = value
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, received {config!r}.")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError("TF_CONFIG has no 'cluster' (job name -> list of 'host:port'); "
                         f"received {config!r}.")
    for job, addresses in cluster.items():
        if (not isinstance(addresses, list) or not addresses
                or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit()
                           for a in addresses)):
            raise ValueError(f"TF_CONFIG cluster job {job!r} must be a non-empty list of "
                             f"'host:port' strings, received {addresses!r}.")
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError("TF_CONFIG has no 'task' with 'type' and 'index' (which cluster "
                         f"member this process is); received {config!r}.")
    job, index = task["type"], task["index"]
    if job not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[job]):
        raise ValueError(f"TF_CONFIG task {task!r} is not a member of the cluster "
                         f"{cluster!r}: expected 'type' among {sorted(cluster)} and 'index' in "
                         "range.")
    return config


def _rendezvous(config, own, timeout):
    host, _, port = own.rpartition(":")
    listener = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", int(port)))
        listener.listen(16)
        listener.settimeout(0.05)
    except OSError as error:
        listener.close()
        raise OSError(f"This worker's TF_CONFIG address {own} cannot be listened on "
                      f"({error}); is another process using port {port}?") from None
    deadline = time.monotonic() + timeout
    peers = [a for addresses in config["cluster"].values() for a in addresses if a != own]
    try:
        while True:
            peers = [a for a in peers if not _reachable(a)]
            try:
                while True:  # answer the peers that connected meanwhile
                    listener.accept()[0].close()
            except OSError:
                pass
            if not peers:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Multi-worker start-up timed out after {timeout} s: the TF_CONFIG "
                    f"worker address(es) {', '.join(peers)} are not reachable from this worker ({own}). "
                    "Start every worker listed in TF_CONFIG with the same cluster, and check "
                    "the hosts, ports and firewalls.")
            time.sleep(0.2)
        # Keep answering a little longer: the peers may not have seen this worker yet.
        linger = time.monotonic() + 1.0
        while time.monotonic() < linger:
            try:
                listener.accept()[0].close()
            except OSError:
                pass
    finally:
        listener.close()


def _reachable(address):
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def multi_worker_strategy(timeout=60.0, communication="auto"):
    """A ``tf.distribute.MultiWorkerMirroredStrategy`` from ``TF_CONFIG`` with bounded waits.

    TensorFlow's own strategy waits forever for the workers of ``TF_CONFIG`` to come up and
    lets a collective wait forever for a peer that died. Here the start-up barrier and every
    collective operation (one all-reduce per training step) give up after ``timeout`` seconds.

    Args:
        timeout: seconds (> 0) to wait for all workers at start-up, and for the slowest worker
            in each collective operation afterwards.
        communication: "auto", "ring" or "nccl" (``tf.distribute.experimental.
            CommunicationImplementation``).

    Returns:
        The strategy; build the model and optimizer in its ``scope()`` and pass it to
        ``kspike.Trainer(..., strategy=...)``.

    Raises:
        ValueError: TF_CONFIG is missing or malformed (see ``parse_tf_config``).
        TimeoutError: a worker of TF_CONFIG was not reachable within ``timeout``; the message
            names its address.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"`timeout` must be a number of seconds > 0, received {timeout!r}.")
    implementations = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                       "ring": tf.distribute.experimental.CommunicationImplementation.RING,
                       "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}
    if communication not in implementations:
        raise ValueError(f"`communication` must be one of {sorted(implementations)}, received "
                         f"{communication!r}.")
    config = parse_tf_config()
    own = config["cluster"][config["task"]["type"]][config["task"]["index"]]
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=float(timeout), implementation=implementations[communication])
    # TensorFlow 2.21 waits without limit for every worker while it sets up its cluster
    # context, holding the GIL in C++ code that nothing can interrupt. So the workers meet
    # first here: each one listens on its own TF_CONFIG port and connects to every peer's port
    # (a peer answers either from this rendezvous or from its TensorFlow server, both TCP).
    _rendezvous(config, own, timeout)
    # The start-up barrier's timeout is a class attribute of the strategy's implementation
    # (0 = no limit), read during construction.
    from tensorflow.python.distribute import collective_all_reduce_strategy as collective
    extended = collective.CollectiveAllReduceExtended
    previous = getattr(extended, "_check_health_initial_timeout", 0)
    extended._check_health_initial_timeout = max(1, int(round(timeout)))
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as error:
        raise TimeoutError(f"Multi-worker start-up failed: not every worker of TF_CONFIG "
                           f"joined within {timeout} s ({error}).") from None
    finally:
        extended._check_health_initial_timeout = previous
    return strategy
