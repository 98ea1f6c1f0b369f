"""`byola-keras pretrain` as two real processes on one machine (JAX:
`keras.distribution` over gloo; TensorFlow: `MultiWorkerMirroredStrategy` from
TF_CONFIG) against one process over two devices; a second job refused; a
worker killed; a signal to one process; exact resume. PyTorch: the refusal.
The unit tests at the end run in this process."""

import json
import os
import subprocess

import keras
import numpy as np
import pytest

from byola_keras import _files, cluster
from byola_keras import pretrain as pretrain_lib
from byola_keras.data import SegmentDataset, make_default_corpus
from byola_keras.pretrain import CheckpointWriter
from tests.testing import pretrain_command

EPOCHS, STEPS = 2, 3
# The bound on a run, and so on how long the survivors of a killed process
# may take to stop: JAX's gloo fails at once on the closed connection,
# TensorFlow's coordination service notices missed heartbeats in seconds.
TIMEOUT = 600


def _cli(out, audio_dir, extra=()):
    return pretrain_command(out, audio_dir, EPOCHS, STEPS, extra)


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    for name in (pretrain_lib.KILL_ENV, "BYOLA_TEST_SIGNAL_AT", "TF_CONFIG", "XLA_FLAGS", *cluster.KERAS_VARIABLES):
        if name not in extra:
            env.pop(name, None)
    return env


def _process_env(index, addresses, extra):
    if keras.backend.backend() == "tensorflow":
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        return _env(TF_CONFIG=json.dumps(config), **extra)
    return _env(
        KERAS_DISTRIBUTION_JOB_ADDRESSES=",".join(addresses), KERAS_DISTRIBUTION_NUM_PROCESSES="2",
        KERAS_DISTRIBUTION_PROCESS_ID=str(index), **extra,
    )


def _job(out, audio_dir, env1=None, extra=()):
    """Runs the two processes of a job; `env1`: test hooks for process 1 only.
    Returns their `(returncode, stdout, stderr)`."""
    addresses = cluster.local_addresses(2)
    procs = [
        subprocess.Popen(
            _cli(out, audio_dir, extra), env=_process_env(i, addresses, (env1 or {}) if i == 1 else {}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, stdout, stderr))
    return results


def _checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-") and n.endswith(".npz"))


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    return make_default_corpus(str(tmp_path_factory.mktemp("corpus")), num_clips=8, seed=1)


@pytest.mark.large
def test_two_processes_train_as_one_process_on_two_devices_and_resume_exactly(tmp_path, audio_dir):
    """Two processes (global batch 4, 2 rows each) end bit-identical to one
    process on two devices (JAX: one SPMD program either way; TensorFlow:
    two replicas either way; each gradient sum has two terms, so no order
    of summation differs). On the way: a second job on the same --out is
    refused; process 1 SIGKILLed after step 3 makes process 0 stop with one
    line (exit code 4); SIGTERM to process 1 as step 5 begins stops both
    after it, with checkpoint 5 written by process 0 (exit code 75); the
    third run finishes. Process 1 never writes a checkpoint (it would kill
    itself half-way through one)."""
    out = tmp_path / "run"
    if keras.backend.backend() == "torch":
        addresses = cluster.local_addresses(2)
        done = subprocess.run(
            _cli(out, audio_dir), env=_process_env(0, addresses, {}), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1 and "Keras has no multi-process distribution for torch" in lines[0], lines
        assert "jax or tensorflow" in lines[0] and "Traceback" not in done.stderr
        return

    reference = tmp_path / "one_process"
    done = subprocess.run(
        _cli(reference, audio_dir, ("--data-parallel", "--host-devices", "2")),
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    # A second job on a folder in use (here: by this process) is refused by both processes.
    with _files.FolderLock(out, "output folder"):
        (code0, out0, err0), (code1, out1, err1) = _job(out, audio_dir)
    assert (code0, code1) == (2, 2), out0 + err0 + out1 + err1
    assert f"is in use by process {os.getpid()} " in out0
    assert f"The output folder '{out}' is in use by another run" in out1

    # Process 1 killed after step 3: process 0 stops with one line.
    (code0, out0, err0), (code1, _, _) = _job(out, audio_dir, {pretrain_lib.KILL_ENV: "step:3"})
    assert code1 == -9 and code0 == cluster.EXIT_LOST_PROCESS, out0 + err0
    newest = _checkpoints(out)[-1]
    error = [line for line in out0.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Process 0 of 2: the job lost a process" in error[0], out0
    assert f"run the job again to resume from {out / newest}." in error[0]
    assert "Traceback" not in err0

    # SIGTERM to process 1 as step 5 begins: both stop after it, checkpoint 5.
    (code0, out0, err0), (code1, out1, err1) = _job(out, audio_dir, {"BYOLA_TEST_SIGNAL_AT": "begin:5:TERM"})
    assert (code0, code1) == (75, 75), out0 + err0 + out1 + err1
    assert _checkpoints(out)[-1] == "checkpoint-000000005.npz"
    assert "Stopped by SIGTERM after step 2 of epoch 2" in out1
    assert "another process of the job received a signal" in out0 and "checkpoint-000000005.npz written" in out0

    (code0, out0, err0), (code1, out1, err1) = _job(out, audio_dir, {pretrain_lib.KILL_ENV: "write:partial:1"})
    assert (code0, code1) == (0, 0), out0 + err0 + out1 + err1
    assert "Multi-process data-parallel training: 2 processes, 2 device(s), 2 samples each" in out0
    assert "Encoder:" in out0
    assert [line for line in out1.splitlines() if not line.startswith("[Gloo]")] == []  # only process 0 prints
    assert not any(".tmp-" in name for name in os.listdir(out))
    meta_ref, ref = CheckpointWriter.read(reference / "checkpoint-000000006.npz")
    meta, got = CheckpointWriter.read(out / "checkpoint-000000006.npz")
    assert meta["distribution"] == {"backend": keras.backend.backend(), "processes": 2, "replicas": 2}
    for (name, _, _), a, b in zip(meta_ref["variables"], ref, got):
        np.testing.assert_array_equal(a, b, err_msg=name)
    encoder = keras.saving.load_model(str(out / "encoder.keras"), safe_mode=True)
    assert tuple(encoder(np.zeros((1, 16000), "float32")).shape) == (1, 64)
    with open(out / "history.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["epoch", "0", "1"]
    with open(out / "config.json") as f:
        resumes = json.load(f)["resumes"]
    assert [r["distribution"]["processes"] for r in resumes] == [2, 2]

    if keras.backend.backend() == "tensorflow":
        # One process (one replica) may not go on with a two-replica run.
        done = subprocess.run(
            _cli(out, audio_dir, ("--epochs", "3")), env=_env(), capture_output=True, text=True, timeout=TIMEOUT
        )
        assert done.returncode == 2, done.stdout + done.stderr
        assert "was trained on 2 TensorFlow replica(s) (2 process(es)); on 1" in done.stdout


# ----------------------------------------------------------------------------
# In this process


def test_shards_are_the_rows_of_the_global_batch():
    class Cache:
        lengths = np.arange(100, 150)
        n_mels = 4

        def __len__(self):
            return len(self.lengths)

        def read(self, i, start, stop):
            return np.full((4, stop - start), float(i)) + np.arange(start, stop) / 1000.0

    whole = SegmentDataset(Cache(), batch_size=8, segment_frames=16, seed=3)
    for count in (2, 4):
        shards = [SegmentDataset(Cache(), 8, segment_frames=16, seed=3, shard=(i, count)) for i in range(count)]
        assert shards[0].local_batch_size == 8 // count and len(shards[0]) == len(whole)
        for epoch, step in ((0, 0), (1, 5), (2, 3)):
            rows = np.concatenate([shard.batch(step, epoch) for shard in shards])
            np.testing.assert_array_equal(rows, whole.batch(step, epoch))
    with pytest.raises(ValueError, match="multiple of count"):
        SegmentDataset(Cache(), batch_size=6, shard=(0, 4))
    with pytest.raises(ValueError, match="0 <= index < count"):
        SegmentDataset(Cache(), batch_size=8, shard=(2, 2))


def test_processes_come_from_flags_keras_variables_or_tf_config():
    resolve = cluster.resolve
    assert resolve("jax", environ={}) is None
    assert resolve("torch", environ={"SLURM_NTASKS": "4"}) is None  # never detected without the flag
    group = resolve("jax", "h0:1234", 4, 2, environ={})
    assert (group.addresses, group.num_processes, group.process_id) == (["h0:1234"], 4, 2)
    keras_env = {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": "h0:1,h1:1", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": "1",
    }
    group = resolve("tensorflow", environ=keras_env)
    assert (group.addresses, group.process_id, group.source) == (["h0:1", "h1:1"], 1, "KERAS_DISTRIBUTION_*")
    assert resolve("jax", environ={**keras_env, "KERAS_DISTRIBUTION_NUM_PROCESSES": "1",
                                   "KERAS_DISTRIBUTION_PROCESS_ID": "0"}) is None
    tf_config = {"cluster": {"worker": ["a:1", "b:1", "c:1"]}, "task": {"type": "worker", "index": 2}}
    group = resolve("tensorflow", environ={"TF_CONFIG": json.dumps(tf_config)})
    assert (group.num_processes, group.source) == (3, "TF_CONFIG")
    assert resolve("jax", environ={"TF_CONFIG": json.dumps(tf_config)}) is None  # TF_CONFIG is TensorFlow's
    assert resolve("jax", detect=True, environ={}).source == "--detect-cluster"
    refusals = [
        (dict(backend="torch", environ=keras_env), "Keras has no multi-process distribution for torch"),
        (dict(backend="tensorflow", coordinator="h0:1", num_processes=2, process_id=0, environ={}),
         "TensorFlow needs the address of every process"),
        (dict(backend="tensorflow", detect=True, environ={}), "on TensorFlow set TF_CONFIG"),
        (dict(backend="jax", coordinator="h0:1", environ={}), "go together"),
        (dict(backend="jax", coordinator="h0", num_processes=2, process_id=0, environ={}), "HOST:PORT"),
        (dict(backend="jax", environ={"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}), "KERAS_DISTRIBUTION_PROCESS_ID"),
        (dict(backend="jax", environ={**keras_env, "KERAS_DISTRIBUTION_PROCESS_ID": "5"}), "in [0, 2)"),
        (dict(backend="jax", environ={"KERAS_DISTRIBUTION_NUM_PROCESSES": "3", "KERAS_DISTRIBUTION_PROCESS_ID": "0",
                                      "KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:1"}), "2 addresses for 3"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            resolve(**kwargs)


def test_resume_on_another_device_count_jax_yes_tensorflow_no(capsys):
    two = {"backend": "jax", "processes": 2, "replicas": 2}
    pretrain_lib._check_distribution(two, {"backend": "jax", "processes": 1, "replicas": 1}, "out")
    assert "trained on 2 process(es), 2 device(s) so far, now 1 and 1" in capsys.readouterr().out
    pretrain_lib._check_distribution(None, {"backend": "tensorflow", "processes": 1, "replicas": 1}, "out")
    with pytest.raises(pretrain_lib.ResumeMismatch, match="trained on 2 TensorFlow replica"):
        pretrain_lib._check_distribution(
            {**two, "backend": "tensorflow"}, {"backend": "tensorflow", "processes": 1, "replicas": 1}, "out"
        )


def test_local_addresses_are_distinct_free_ports_of_this_machine():
    import socket

    addresses = cluster.local_addresses(3, host="127.0.0.1")
    hosts, ports = zip(*(address.rsplit(":", 1) for address in addresses))
    assert set(hosts) == {"127.0.0.1"} and len(set(ports)) == 3
    for port in ports:  # released: a process can listen on each
        with socket.socket() as s:
            s.bind(("127.0.0.1", int(port)))
            s.listen()
