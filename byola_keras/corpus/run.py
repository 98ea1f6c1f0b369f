"""`byola-keras embed ENCODER INPUT --out OUT`: clip (and frame) embeddings of every audio file.

INPUT is a folder (searched recursively for the formats pretraining reads) or
a CSV manifest with a `path` column (its other columns are copied to the
output). The work, for each file not already in OUT:

1. decoding threads (`workers`) read the file, average its channels, resample
   it to 16 kHz and compute its log-mel on the host with the encoder's mel
   filters (`data.clip_log_mel`, the same maths as the model's front-end),
   then normalize it with the model's statistics, while the main thread runs
   the encoder on earlier files;
2. log-mels wait in buckets of similar length (`batches.BatchEncoder`) and
   run through the encoder a batch at a time, each clip's results equal to
   `WaveformEncoder.embed` on that file alone (up to rounding); a bucket runs
   when it fills a batch, or, when more than `WAITING_FRAMES` wait, the
   fullest one runs part of its clips, so the encoder works while decoding
   goes on;
3. every `part_size` files the rows are committed as one Parquet part
   (`store.EmbeddingStore`), so a killed run loses at most the files since
   the last part; a rerun skips every file whose path, size and modification
   time match a committed row, and re-embeds changed files after dropping
   their old rows.

Files are taken smallest first (so buckets fill one after the other). A file
that cannot be decoded, has NaN/inf samples (embedding them as zeros would
hide the damage) or gives a non-finite log-mel or embedding is skipped,
counted and listed with the reason in OUT/failed[-TAG].csv; it is tried again
by the next run.
"""

import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
import time

import numpy as np

from byola_keras import _files, frontend
from byola_keras.corpus import inputs as inputs_lib
from byola_keras.corpus.batches import MAX_BATCH_FRAMES, BatchEncoder
from byola_keras.corpus.progress import Progress
from byola_keras.corpus.store import EmbeddingStore, StoreError, pyarrow_modules
from byola_keras.data.audio import AudioDecodeError, audio_info, find_audio_files, load_audio
from byola_keras.data.cache import _file_state, _single_threaded_blas, clip_log_mel

PART_SIZE = 1000  # files per committed part
FRAMES_PART_BYTES = 256 << 20  # a part is also committed when its frame embeddings reach this
# Log-mel frames that may wait in buckets (about 5.5 min of audio, 8 MiB); beyond,
# the bucket holding the most runs (a power of two of its clips), so the encoder
# works while the decoders go on, even when no bucket fills a batch.
WAITING_FRAMES = 2 * MAX_BATCH_FRAMES
DECODE_AHEAD = 4  # files being decoded per worker


class EmbedError(ValueError):
    """A reason not to start (bad input, encoder, output folder); one line."""


@dataclasses.dataclass
class Summary:
    """What a run did.

    Attributes:
        out: the output folder.
        listed: files of this shard in INPUT.
        embedded: files embedded by this run.
        already: files whose committed rows were kept.
        failed: `[(path key, reason)]` of the files skipped by this run.
        dropped: old rows removed (changed files, files gone from INPUT).
        seconds: time spent from listing to the last commit.
        parts: parts this run committed.
    """

    out: str
    listed: int
    embedded: int
    already: int
    failed: list
    dropped: int
    seconds: float
    parts: int
    failed_path: object = None

    def line(self):
        text = (
            f"embed: {self.embedded:,} file(s) embedded, {self.already:,} already in '{self.out}', "
            f"{len(self.failed):,} failed"
        )
        if self.failed:
            text += f" (listed with the reason in '{self.failed_path}')"
        if self.dropped:
            text += f"; {self.dropped:,} old row(s) of changed or removed files dropped"
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        return text + f"; {rate:.1f} files/s."


def _items(input_path):
    """`(manifest columns, items)` of a folder or a manifest."""
    if os.path.isdir(input_path):
        try:
            files = find_audio_files(input_path)
        except (OSError, ValueError) as err:
            raise EmbedError(str(err)) from None
        return [], inputs_lib.folder_items(input_path, files)
    try:
        return inputs_lib.read_manifest(input_path)
    except inputs_lib.InputError as err:
        raise EmbedError(str(err)) from None


def _load_encoder(encoder):
    from byola_keras.embed import load_waveform_encoder
    from byola_keras.models import WaveformEncoder

    if isinstance(encoder, WaveformEncoder):
        return encoder, type(encoder).__name__
    try:
        return load_waveform_encoder(encoder), os.path.abspath(os.fspath(encoder))
    except (OSError, ValueError) as err:
        raise EmbedError(str(err)) from None


class _Decoder:
    """`path -> (normalized log-mel [n_mels, T], duration in s)`, or the reason it failed."""

    def __init__(self, model):
        layer = model.get_layer("log_mel")
        self.mel_matrix = frontend.mel_filterbank(
            sample_rate=frontend.SAMPLE_RATE, n_mels=layer.n_mels, f_min=layer.f_min, f_max=layer.f_max,
            htk=layer.htk,
        )
        self.min_samples = int(model.min_samples)
        self.min_frames = frontend.num_frames(self.min_samples)
        # As the model's Rescaling layer: x * (1 / std) + (-mean / std).
        self.scale = np.float32(1.0 / model.std)
        self.offset = np.float32(-model.mean / model.std)

    def __call__(self, path):
        try:
            rate, frames, _ = audio_info(path)
            with np.errstate(over="ignore", invalid="ignore"):  # checked below
                log_mel, nonfinite = clip_log_mel(path, mel_matrix=self.mel_matrix)
            if nonfinite:
                return f"{nonfinite} NaN/inf sample value(s)"
            if log_mel.shape[1] <= self.min_frames:
                # Possibly shorter than the model's minimum: zero-pad the waveform as the model does.
                wave = load_audio(path)
                if wave.shape[0] < self.min_samples:
                    wave = np.pad(wave, (0, self.min_samples - wave.shape[0]))
                    log_mel = frontend.log_mel_numpy(wave, mel_matrix=self.mel_matrix)
            if not np.isfinite(log_mel).all():
                return "its log-mel is not finite (sample values so large that their power overflows float32)"
            return log_mel * self.scale + self.offset, frames / rate
        except AudioDecodeError as err:
            return err.reason
        except MemoryError:
            return "out of memory while decoding"
        except Exception as err:  # noqa: BLE001 - one file never stops the run
            return f"unexpected {type(err).__name__}: {err}"


def _decoded(items, decode, workers):
    """Yields `(item, decode(item.path))` in order, `workers` threads decoding ahead (0: none)."""
    if workers == 0:
        for item in items:
            yield item, decode(item.path)
        return
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="byola-embed-decode")
    ahead = collections.deque()
    todo = iter(items)
    try:
        for item in todo:
            ahead.append((item, pool.submit(decode, item.path)))
            if len(ahead) >= DECODE_AHEAD * workers:
                break
        while ahead:
            item, future = ahead.popleft()
            following = next(todo, None)
            if following is not None:
                ahead.append((following, pool.submit(decode, following.path)))
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


Waiting = collections.namedtuple("Waiting", "item state log_mel duration")


class _Part:
    """Rows waiting for the next commit, turned into the two Parquet tables."""

    def __init__(self, columns, identity, frames):
        self.columns = columns
        self.metadata = {"byola_keras": json.dumps({k: identity[k] for k in ("encoder_id", "embedding_dim")})}
        self.dim = int(identity["embedding_dim"])
        self.frames = frames
        self.clear()

    def clear(self):
        self.rows, self.clip, self.frame_rows, self.frame_bytes = [], [], [], 0

    def add(self, waiting, clip, frames, stamps):
        self.rows.append(waiting)
        self.clip.append(clip)
        if self.frames:
            self.frame_rows.append((waiting.item, frames, stamps))
            self.frame_bytes += frames.nbytes

    def _embedding(self, pa, values):
        flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1), pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, self.dim)

    def tables(self):
        pa, _ = pyarrow_modules()
        items = [w.item for w in self.rows]
        clips = {"path": pa.array([i.key for i in items], pa.string())}
        for name in self.columns:
            clips[name] = pa.array([i.columns[name] for i in items], pa.string())
        clips["duration_s"] = pa.array([w.duration for w in self.rows], pa.float64())
        clips["file_size"] = pa.array([w.state[0] for w in self.rows], pa.int64())
        clips["file_mtime_ns"] = pa.array([w.state[1] for w in self.rows], pa.int64())
        clips["embedding"] = self._embedding(pa, np.stack(self.clip))
        clips = pa.table(clips).replace_schema_metadata(self.metadata)
        if not self.frames:
            return clips, None
        counts = [f.shape[0] for _, f, _ in self.frame_rows]
        frames = {"path": pa.array(np.repeat([i.key for i, _, _ in self.frame_rows], counts).tolist(), pa.string())}
        for name in self.columns:
            values = [i.columns[name] for i, _, _ in self.frame_rows]
            frames[name] = pa.array(np.repeat(np.array(values, dtype=object), counts).tolist(), pa.string())
        frames["frame"] = pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in counts]), pa.int32())
        frames["time_s"] = pa.array(np.concatenate([s for _, _, s in self.frame_rows]).astype(np.float32))
        stacked = np.concatenate([f for _, f, _ in self.frame_rows]) if counts else np.zeros((0, self.dim))
        frames["embedding"] = self._embedding(pa, stacked)
        return clips, pa.table(frames).replace_schema_metadata(self.metadata)


def embed_corpus(
    encoder,
    input_path,
    out,
    frames=False,
    batch_size=32,
    workers=None,
    shard=(0, 1),
    part_size=PART_SIZE,
    restart=False,
    quiet=False,
):
    """Embeds every audio file of a folder or manifest into Parquet parts under `out`.

    Args:
        encoder: a `WaveformEncoder` `.keras` file (or the model).
        input_path: a folder of audio (recursive) or a CSV manifest with a `path` column.
        out: the output folder (see `byola_keras.corpus.store`).
        frames: also write frame embeddings with their timestamps.
        batch_size: most clips per encoder call.
        workers: decoding threads (None: min(8, CPUs); 0: decode in the calling thread).
        shard: `(index, count)`: embed only the files of this shard.
        part_size: files per committed part.
        restart: remove what OUT holds first.
        quiet: no progress line on stderr.

    Returns:
        A `Summary`.

    Raises:
        EmbedError, StoreError, FolderInUse, ImportError: before any embedding, with one line.
    """
    started = time.perf_counter()
    pyarrow_modules()
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    columns, items = _items(os.fspath(input_path))
    index, count = shard
    mine = inputs_lib.in_shard(items, index, count)
    model, encoder_file = _load_encoder(encoder)
    from byola_keras.evaluation.embedding import encoder_fingerprint

    identity = {
        "encoder_id": encoder_fingerprint(model),
        "embedding_dim": int(model.embedding_dim),
        "frames": bool(frames),
        "columns": list(columns),
        "encoder_file": encoder_file,
    }
    store = EmbeddingStore(out, shard).open(identity, restart=restart)
    try:
        states = {item.key: _file_state(item.path) for item in mine}
        committed = store.committed()
        stale = {
            key
            for key, rows in committed.items()
            if (count == 1 or inputs_lib.shard_of(key, count) == index)
            and (len(rows) > 1 or states.get(key) is None or tuple(rows[0][1:]) != states[key])
        }
        dropped = store.drop(stale)
        done = {key for key in committed if key in states and key not in stale}
        todo = sorted(
            (item for item in mine if item.key not in done),
            key=lambda item: ((states[item.key] or (0, 0))[0], item.key),
        )
        summary = Summary(store.out, len(mine), 0, len(done), [], dropped, 0.0, 0, store.failed_path)
        if todo:
            _embed(model, todo, states, store, identity, summary, batch_size, workers, part_size, quiet)
        store.write_failed(summary.failed)
    finally:
        store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _embed(model, todo, states, store, identity, summary, batch_size, workers, part_size, quiet):
    batches = BatchEncoder(model, batch_size)
    part = _Part(identity["columns"], identity, identity["frames"])
    file_sizes = {item.key: (states[item.key] or (0, 0))[0] for item in todo}
    progress = Progress(len(todo), sum(file_sizes.values()), enabled=not quiet)
    buckets = collections.defaultdict(list)
    waiting_frames = 0

    def commit():
        if part.rows:
            store.commit(*part.tables())
            summary.parts += 1
            part.clear()
        store.write_failed(summary.failed)

    def keep(waiting, embedding, frame_embeddings):
        size = file_sizes[waiting.item.key]
        problem = None
        if waiting.state is None:
            problem = "its size and modification time cannot be read (os.stat failed)"
        elif not np.isfinite(embedding).all():
            problem = "its embedding is not finite"
        if problem:
            summary.failed.append((waiting.item.key, problem))
            progress.advance(1, size, failed=1)
            return
        stamps = model.timestamps((waiting.log_mel.shape[1] - 1) * frontend.HOP_LENGTH)
        part.add(waiting, embedding, frame_embeddings, stamps[: frame_embeddings.shape[0]])
        summary.embedded += 1
        progress.advance(1, size)
        if len(part.rows) >= part_size or part.frame_bytes >= FRAMES_PART_BYTES:
            commit()

    def run(bucket, batch_sizes=None):
        """Runs batches of a bucket (`batch_sizes`, default all of it); returns the frames they held."""
        entries = buckets[bucket]
        ran = 0
        for size in batch_sizes or batches.chunk_sizes(bucket, len(entries)):
            chunk, entries = entries[:size], entries[size:]
            clip, per_file = batches.run([w.log_mel for w in chunk], bucket)
            for waiting, embedding, frame_embeddings in zip(chunk, clip, per_file):
                keep(waiting, embedding, frame_embeddings)
            ran += sum(w.log_mel.shape[1] for w in chunk)
        if entries:
            buckets[bucket] = entries
        else:
            del buckets[bucket]
        return ran

    try:
        with _single_threaded_blas():
            for item, result in _decoded(todo, _Decoder(model), workers):
                if isinstance(result, str):
                    summary.failed.append((item.key, result))
                    progress.advance(1, file_sizes[item.key], failed=1)
                    continue
                log_mel, duration = result
                waiting = Waiting(item, states[item.key], log_mel, duration)
                if batches.is_long(log_mel.shape[1]):
                    keep(waiting, *batches.run_long(log_mel))
                    continue
                bucket = batches.bucket(log_mel.shape[1])
                buckets[bucket].append(waiting)
                waiting_frames += log_mel.shape[1]
                if len(buckets[bucket]) >= batches.rows(bucket):
                    waiting_frames -= run(bucket, [batches.rows(bucket)])
                while waiting_frames > WAITING_FRAMES:
                    fullest = max(buckets, key=lambda b: sum(w.log_mel.shape[1] for w in buckets[b]))
                    waiting_frames -= run(fullest, batches.chunk_sizes(fullest, len(buckets[fullest]))[:1])
            for bucket in sorted(buckets):
                run(bucket)
        commit()
    finally:
        progress.close()


def run_cli(args):
    """`byola-keras embed` (arguments checked by `_cli_options.embed_check`)."""
    try:
        summary = embed_corpus(
            args.encoder,
            args.input,
            args.out,
            frames=args.frames,
            batch_size=args.batch_size,
            workers=args.workers,
            shard=args.shard or (0, 1),
            part_size=args.part_size,
            restart=args.restart,
            quiet=args.quiet,
        )
    except (EmbedError, StoreError, _files.FolderInUse, ImportError) as err:
        print(f"byola-keras embed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"byola-keras embed: interrupted; the committed parts in '{args.out}' are kept: "
            "rerun the same command to go on",
            file=sys.stderr,
        )
        return 130
    print(summary.line(), flush=True)
    if summary.failed and not summary.embedded and not summary.already:
        return 1  # nothing at all could be embedded
    return 0
