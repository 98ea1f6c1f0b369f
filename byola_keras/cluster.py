"""The processes of one pretraining job: who they are, the engine they train
on, and what they agree on.

A job is started by the user's launcher (srun, a Kubernetes indexed Job, ssh,
a test starting subprocesses): every process runs the same `byola-keras
pretrain` command with the same `--out` on storage they share, and learns its
place from, in this order:

1. `--coordinator HOST:PORT --num-processes N --process-id I` (HOST:PORT of
   process 0; TensorFlow needs every process's address, comma-separated, in
   process order);
2. Keras's variables `KERAS_DISTRIBUTION_JOB_ADDRESSES`,
   `KERAS_DISTRIBUTION_NUM_PROCESSES`, `KERAS_DISTRIBUTION_PROCESS_ID`;
3. TensorFlow only: `TF_CONFIG`;
4. `--detect-cluster` (JAX only): what `jax.distributed.initialize()` finds by
   itself (SLURM, Open MPI, Cloud TPU, ...). Never without the flag: SLURM's
   variables exist in one-process jobs too.

Nothing of these: one process, as before. Then (`Job`):

- the output folder is locked by process 0 only (the exclusive `flock` of
  `_files.FolderLock`), and its answer is shared with a collective: the
  processes of one job get in, a second job is refused;
- the log-mel cache is decoded once: the first process to take the cache's
  lock (a blocking `flock`, no collective, so decoding for hours meets no
  collective timeout) brings it up to date with the audio folder and marks
  it with the job's token, the others then only open it;
- before training, every process shows the others what it found (checkpoint
  step, data, stop request, devices): any difference stops every process
  with one line;
- after every step, the stop flags are combined (`any`), so all processes
  stop at the same step on a signal;
- a process that dies makes the engine's next collective fail in the others
  (gloo / gRPC errors, the coordination service's missed heartbeats):
  `lost_process_guard` turns that into `LostProcess`, one line that says to
  run the job again, which resumes from the last checkpoint.
"""

import contextlib
import json
import os
import random
import re
import socket

import numpy as np

from byola_keras import _files

KERAS_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)
FLAGS = "--coordinator/--num-processes/--process-id"
MULTI_PROCESS_BACKENDS = ("jax", "tensorflow")
EXIT_LOST_PROCESS = 4
JOB_FILE = ".job"
CACHE_LOCK = ".build.lock"
CACHE_JOB_FILE = ".built-for-job"


def local_addresses(count, host="localhost"):
    """`count` "HOST:PORT" addresses on this machine with ports the kernel
    picked as free, for a job whose processes all run here (trying a
    multi-process run on one CPU). The ports are released on return, so
    start the processes soon after."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [f"{host}:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LostProcess(RuntimeError):
    """A process of the job died or became unreachable; the others stopped."""


class ProcessGroup(dict):
    """Where the processes of a job come from: `addresses` (list or None),
    `num_processes`, `process_id` (None: detected by the engine), `source`."""

    __getattr__ = dict.__getitem__


def _int(value, what):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer; got {value!r}.") from None


def resolve(backend, coordinator=None, num_processes=None, process_id=None, detect=False, environ=None):
    """The `ProcessGroup` of this process, or None for a one-process run.

    Raises `ValueError` (one line naming the flag or variable) for an
    incomplete or inconsistent description, and on PyTorch for any
    multi-process one.
    """
    environ = os.environ if environ is None else environ
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given):
        if not all(given):
            raise ValueError(f"{FLAGS} go together: give all three, or none.")
        if detect:
            raise ValueError(f"Give either {FLAGS} or --detect-cluster, not both.")
        group = ProcessGroup(
            addresses=_addresses(coordinator), num_processes=_int(num_processes, "--num-processes"),
            process_id=_int(process_id, "--process-id"), source=FLAGS,
        )
    elif detect:
        if backend == "tensorflow":
            raise ValueError("--detect-cluster is for the jax backend; on TensorFlow set TF_CONFIG.")
        group = ProcessGroup(addresses=None, num_processes=None, process_id=None, source="--detect-cluster")
    elif any(environ.get(name) for name in KERAS_VARIABLES):
        missing = [n for n in KERAS_VARIABLES[1:] if not environ.get(n)]
        if missing:
            raise ValueError(f"{', '.join(missing)} must be set along with the other KERAS_DISTRIBUTION_ variables.")
        address = environ.get(KERAS_VARIABLES[0])
        group = ProcessGroup(
            addresses=_addresses(address) if address else None,
            num_processes=_int(environ[KERAS_VARIABLES[1]], KERAS_VARIABLES[1]),
            process_id=_int(environ[KERAS_VARIABLES[2]], KERAS_VARIABLES[2]),
            source="KERAS_DISTRIBUTION_*",
        )
    elif backend == "tensorflow" and environ.get("TF_CONFIG"):
        try:
            config = json.loads(environ["TF_CONFIG"])
            cluster, task = config["cluster"], config["task"]
            chiefs = len(cluster.get("chief", []))
            count = chiefs + len(cluster.get("worker", []))
            index = 0 if task["type"] == "chief" else chiefs + int(task["index"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"TF_CONFIG is not a valid cluster description ({err}).") from None
        group = ProcessGroup(addresses=None, num_processes=count, process_id=index, source="TF_CONFIG")
    else:
        return None
    count, index = group.num_processes, group.process_id
    if count is not None:
        if count < 1 or not 0 <= index < count:
            raise ValueError(
                f"{group.source}: the process id must be in [0, {count}) for {count} processes; got {index}."
            )
        if count == 1:
            return None
        if group.addresses is not None and len(group.addresses) > 1 and len(group.addresses) != count:
            raise ValueError(
                f"{group.source}: {len(group.addresses)} addresses for {count} processes."
            )
    if backend not in MULTI_PROCESS_BACKENDS:
        raise ValueError(
            f"Multi-process training needs the jax or tensorflow backend: Keras has no multi-process "
            f"distribution for {backend} ({group.source} asks for one); use --backend jax or tensorflow."
        )
    if backend == "tensorflow" and group.addresses is not None and len(group.addresses) != count:
        raise ValueError(
            f"{group.source}: TensorFlow needs the address of every process (HOST:PORT of process 0, "
            "1, ... separated by commas), or TF_CONFIG."
        )
    return group


def _addresses(text):
    addresses = [a.strip() for a in str(text).split(",") if a.strip()]
    if not addresses or any(":" not in a for a in addresses):
        raise ValueError(f"The coordinator must be HOST:PORT (or a comma-separated list of them); got {text!r}.")
    return addresses


# ----------------------------------------------------------------------------
# The job


class Job:
    """The processes of one run and the engine they train on.

    `one_process(...)` and `start(...)` make one. `all_gather(ints)` returns
    one row per process (a collective: every process calls it at the same
    point); `any(flag)`; `barrier()`; `scope()` builds and trains the model on
    every device of the job.
    """

    def __init__(self, engine=None, scope=None, replicas=1):
        self.engine = engine
        self._scope = scope
        if engine is None:
            self.process_id, self.num_processes = 0, 1
            self.replicas = self.local_replicas = int(replicas)
        else:
            self.process_id, self.num_processes = engine.process_id, engine.num_processes
            self.replicas, self.local_replicas = engine.replicas, engine.local_replicas
        self.data_parallel = engine is not None or scope is not None
        self.token = None

    @property
    def multi_process(self):
        return self.engine is not None

    @property
    def is_chief(self):
        return self.process_id == 0

    def scope(self):
        if self.engine is not None:
            return self.engine.scope()
        return self._scope if self._scope is not None else contextlib.nullcontext()

    def all_gather(self, values):
        values = [int(v) for v in values]
        if self.engine is None:
            return np.asarray([values], np.int64)
        return np.asarray(self.engine.all_gather(values), np.int64)

    def any(self, flag):
        if self.engine is None:
            return bool(flag)
        return bool(self.all_gather([bool(flag)]).any())

    def barrier(self):
        if self.engine is not None:
            self.all_gather([0])

    def describe(self):
        return {"processes": self.num_processes, "replicas": self.replicas}

    def fit_data(self, dataset, first, last, offset):
        """What `fit` trains on for epochs `first`..`last` (from batch `offset`
        of the first), and the `steps_per_epoch` to give it (None: its length)."""
        feed = getattr(self.engine, "feed", None)
        if feed is None:
            return (dataset.remainder(first, offset) if offset else dataset), None

        def batches():
            for epoch in range(first, last):
                for step in range(offset if epoch == first else 0, len(dataset)):
                    yield dataset.batch(step, epoch)

        shape = (dataset.local_batch_size, *dataset.batch(0, first).shape[1:])
        return feed(batches, shape), len(dataset) - offset

    @contextlib.contextmanager
    def lost_process_guard(self, newest_checkpoint):
        """Turns the engine's errors of a lost process into `LostProcess`;
        `newest_checkpoint()` names the checkpoint a rerun resumes from."""
        try:
            yield
        except Exception as error:
            if self.engine is None or not self.engine.is_peer_error(error):
                raise
            lines = [re.sub(r"\{\{[^}]*\}\}", "", line).strip() for line in str(error).splitlines()]
            detail = " ".join(line for line in lines if line)[:300] or type(error).__name__
            found = newest_checkpoint()
            resume = f"from {found}" if found else "from the start (no checkpoint yet)"
            raise LostProcess(
                f"Process {self.process_id} of {self.num_processes}: the job lost a process "
                f"({detail}). Every process stops; run the job again to resume {resume}."
            ) from None


def one_process(data_parallel=False, host_devices=None):
    """The `Job` of a one-process run (over every local device with `data_parallel`)."""
    if not data_parallel:
        return Job()
    from byola_keras import distribute

    if host_devices is not None:
        distribute.host_devices(host_devices)
    scope, replicas = distribute.data_parallel_scope()
    return Job(scope=scope, replicas=replicas)


def start(backend, group):
    """Starts the multi-process engine of `backend` for `group` and returns the `Job`."""
    from byola_keras.backend import multiprocess

    engine = multiprocess.start(backend, group.addresses, group.num_processes, group.process_id)
    return Job(engine)


@contextlib.contextmanager
def output_lock(job, out):
    """Holds the output folder for the job (process 0's `flock`), refuses a second job.

    Process 0 takes the lock and writes a random token to `OUT/.job`; every
    process learns with one collective whether it got the lock and the token,
    and with a second whether it reads the same token (`--out` must be one
    folder on storage every process shares).
    """
    lock, refusal, token = None, None, 0
    if job.is_chief:
        try:
            lock = _files.FolderLock(out, "output folder").acquire()
            token = random.SystemRandom().randrange(1, 2**31 - 1)
            _files.atomic_write(os.path.join(out, JOB_FILE), lambda f: f.write(str(token).encode()))
        except (_files.FolderInUse, OSError) as error:  # told to every process below
            refusal = error
    try:
        ok, token = (int(v) for v in job.all_gather([refusal is None, token])[0])
        if not ok:
            if refusal is not None:
                raise refusal
            raise _files.FolderInUse(
                f"The output folder '{out}' is in use by another run: process 0 of this job could not "
                "lock it (its message says why); wait for it to finish, stop it, or choose another --out."
            )
        job.token = token
        try:
            with open(os.path.join(out, JOB_FILE)) as f:
                seen = int(f.read().strip() or 0)
        except (OSError, ValueError):
            seen = 0
        shared = job.all_gather([seen == token])[:, 0]
        if not shared.all():
            others = ", ".join(str(i) for i in np.flatnonzero(shared == 0))
            raise ValueError(
                f"--out '{out}' is not the same folder for every process: process(es) {others} do not see "
                "what process 0 wrote there. Give every process one folder on shared storage."
            )
        yield
    finally:
        if lock is not None:
            lock.release()


def open_cache(job, audio_dir, cache_dir, workers, signals):
    """The run's `LogMelCache`, decoded once for the whole job.

    Under the cache folder's lock, the first process brings the cache up to
    date with the audio folder (the built-in corpus without one) and marks it
    with the job's token; a process that finds the mark only opens it.
    `signals.should_stop_decoding` stops a build, keeping what was decoded
    (`BuildStopped`); None if a stop was requested before it started.
    """
    from byola_keras import data as data_lib

    os.makedirs(cache_dir, exist_ok=True)
    mark = os.path.join(cache_dir, CACHE_JOB_FILE)

    def waiting():
        print(f"Waiting for the log-mel cache '{cache_dir}': another process is building it.", flush=True)

    with _files.file_lock(os.path.join(cache_dir, CACHE_LOCK), on_wait=waiting):
        if job.token is not None and _read(mark) == str(job.token):
            return data_lib.LogMelCache(cache_dir)
        if signals.requested:
            return None
        if audio_dir is None:
            audio_dir = data_lib.make_default_corpus()
            print(f"No AUDIO_DIR given: using the built-in synthetic corpus in {audio_dir}")
        files = data_lib.find_audio_files(audio_dir)
        cache = data_lib.LogMelCache.build(
            files, cache_dir, workers=workers, should_stop=signals.should_stop_decoding
        )
        if job.token is not None:
            _files.atomic_write(mark, lambda f: f.write(str(job.token).encode()))
        return cache


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def agree_to_start(job, checkpoint_step, data_identity, stop):
    """Every process shows what it found before training; returns whether any
    was asked to stop. Raises `ValueError` (on every process alike) when they
    found different checkpoints, data or device counts."""
    digest = int(data_identity["sha256"][:7], 16)
    rows = job.all_gather([checkpoint_step, digest, bool(stop), job.local_replicas])
    if rows[:, 2].any():
        return True
    steps = rows[:, 0]
    if len(set(steps.tolist())) > 1:
        found = ", ".join(f"process {i}: {'none' if s < 0 else f'step {s}'}" for i, s in enumerate(steps))
        raise ValueError(
            f"The processes found different checkpoints in --out ({found}): give every process the same "
            "--out on shared storage."
        )
    if len(set(rows[:, 1].tolist())) > 1:
        raise ValueError(
            "The processes see different audio data in their log-mel caches: give every process the "
            "same --cache-dir on shared storage (or the same --out without --cache-dir)."
        )
    if len(set(rows[:, 3].tolist())) > 1:
        raise ValueError(
            f"The processes have different numbers of devices ({rows[:, 3].tolist()}); "
            "data-parallel training needs the same number on every process."
        )
    return False


__all__ = [
    "EXIT_LOST_PROCESS",
    "Job",
    "LostProcess",
    "ProcessGroup",
    "agree_to_start",
    "one_process",
    "open_cache",
    "output_lock",
    "resolve",
    "start",
]
