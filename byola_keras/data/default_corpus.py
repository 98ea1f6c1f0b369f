"""A small built-in audio corpus, synthesised on the spot: no download needed.

`make_default_corpus()` writes a few hundred short (1-3 s, 16 kHz mono) WAV and
FLAC clips of eight kinds of sound, so that the whole pipeline (decode, cache,
pretrain, embed, evaluate) can run anywhere, e.g. in tests, a quick start or a
smoke run. The sounds are procedural and deterministic given `seed`:

    tone        harmonic tones with vibrato and an envelope
    glide       harmonic notes gliding between pitches
    chirp       sine sweeps up or down, repeated
    noise       band-pass noise bursts
    drums       kick / snare / hi-hat patterns with decays
    vowel       vowel-like sounds: a pulse source shaped by formants
    clicks      click trains through short resonances
    mixture     two of the above mixed

Different kinds differ in pitch structure, spectral envelope and time pattern,
so pretraining has structure to learn, and `manifest.csv` (`path,label,split`)
allows a quick linear evaluation on the sound kind. It is a smoke-test corpus,
not a benchmark.
"""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf

from byola_keras import _files

SAMPLE_RATE = 16000
CORPUS_VERSION = 1
CLASSES = ("tone", "glide", "chirp", "noise", "drums", "vowel", "clicks", "mixture")
MARKER_FILE = "corpus.json"
MANIFEST_FILE = "manifest.csv"
_NYQUIST_GUARD = 7600.0
# (F1, F2, F3) in Hz of a few vowels.
_VOWELS = (
    (730, 1090, 2440),
    (530, 1840, 2480),
    (270, 2290, 3010),
    (570, 840, 2410),
    (300, 870, 2240),
)


def make_default_corpus(directory=None, num_clips=192, seed=0):
    """Writes (or reuses) the built-in synthetic corpus and returns its folder.

    Args:
        directory: where to write it; default
            `<cache root>/default-corpus-v1` (cache root: `$BYOLA_KERAS_CACHE`,
            else `byola-keras` in `$XDG_CACHE_HOME` or `~/.cache`), with `-n<num_clips>-s<seed>` appended when
            they are not the defaults.
        num_clips: number of clips (classes take turns: clip i is class i % 8).
        seed: seed of the synthesis; the same seed gives the same files.

    Returns:
        The folder (str): `<class>/<class>_<i>.wav|flac` files, `manifest.csv`
        (`path,label,split`, about 60/20/20 per class) and `corpus.json`, written
        last, which marks the corpus complete: a complete corpus with the same
        settings is returned at once.
    """
    if isinstance(num_clips, bool) or not isinstance(num_clips, (int, np.integer)) or num_clips < 1:
        raise ValueError(f"`num_clips` must be a positive integer; got {num_clips!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer; got {seed!r}.")
    num_clips, seed = int(num_clips), int(seed)
    if directory is None:
        name = f"default-corpus-v{CORPUS_VERSION}"
        if (num_clips, seed) != (192, 0):
            name += f"-n{num_clips}-s{seed}"
        directory = os.path.join(_files.cache_root(), name)
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"`directory` '{directory}' exists and is not a folder.")

    settings = {
        "version": CORPUS_VERSION,
        "num_clips": num_clips,
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
    }
    marker = os.path.join(directory, MARKER_FILE)
    if _is_complete(directory, marker, settings):
        return directory

    os.makedirs(directory, exist_ok=True)
    if os.path.exists(marker):
        os.remove(marker)
    _remove_old_clips(directory)

    def write_clip(i):
        label = CLASSES[i % len(CLASSES)]
        ext = "wav" if i % 2 == 0 else "flac"
        rel = f"{label}/{label}_{i:04d}.{ext}"
        path = os.path.join(directory, rel)
        tmp = f"{path}.tmp-{os.getpid()}.{ext}"
        sf.write(tmp, synthesize_clip(i, seed), SAMPLE_RATE, subtype="PCM_16", format=ext.upper())
        os.replace(tmp, path)
        within = i // len(CLASSES)
        return rel, label, {3: "valid", 4: "test"}.get(within % 5, "train")

    for label in CLASSES[:num_clips]:
        os.makedirs(os.path.join(directory, label), exist_ok=True)
    # Each clip has its own random generator, so the files do not depend on
    # the order the threads finish in; NumPy's array operations run outside
    # the GIL, so the synthesis runs on several cores at once.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, num_clips)) as pool:
        rows = list(pool.map(write_clip, range(num_clips)))
    _write_text(
        os.path.join(directory, MANIFEST_FILE),
        "path,label,split\n" + "".join(f"{r},{lab},{s}\n" for r, lab, s in rows),
    )
    _write_text(marker, json.dumps({**settings, "files": [r for r, _, _ in rows]}, indent=1))
    return directory


def _write_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _is_complete(directory, marker, settings):
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    if {k: info.get(k) for k in settings} != settings or len(info.get("files", ())) != settings[
        "num_clips"
    ]:
        return False
    return all(
        os.path.isfile(os.path.join(directory, rel)) for rel in info["files"]
    ) and os.path.isfile(os.path.join(directory, MANIFEST_FILE))


def _remove_old_clips(directory):
    """Removes clips of an older/other corpus written here (only our own file names)."""
    pattern = re.compile(r"^(%s)_\d+\.(wav|flac)(\.tmp-.*)?$" % "|".join(CLASSES))
    for label in CLASSES:
        folder = os.path.join(directory, label)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if pattern.match(name):
                    os.remove(os.path.join(folder, name))


# ----------------------------------------------------------------------------
# Synthesis


def synthesize_clip(index, seed=0):
    """The waveform (float32, 16 kHz, 1-3 s, peak below 1) of clip `index`."""
    rng = np.random.default_rng([seed, index, CORPUS_VERSION])
    num = int(rng.uniform(1.0, 3.0) * SAMPLE_RATE)
    label = CLASSES[index % len(CLASSES)]
    if label == "mixture":
        first, second = rng.choice(len(CLASSES) - 1, size=2, replace=False)
        a = _SYNTHS[CLASSES[first]](rng, num)
        b = _SYNTHS[CLASSES[second]](rng, num)
        wave = _normalize(a) + rng.uniform(0.3, 1.0) * _normalize(b)
    else:
        wave = _SYNTHS[label](rng, num)
    wave = _normalize(wave)
    wave = wave + 10 ** (rng.uniform(-60, -40) / 20) * rng.standard_normal(num)
    peak_db = rng.uniform(-20.0, -1.0)
    return (_normalize(wave) * 10 ** (peak_db / 20)).astype(np.float32)


def _normalize(x):
    peak = np.max(np.abs(x))
    return x / peak if peak > 0 else x


def _time(num):
    return np.arange(num) / SAMPLE_RATE


def _envelope(rng, num, attack=None, release=None):
    t = _time(num)
    dur = num / SAMPLE_RATE
    attack = rng.uniform(0.005, 0.15) if attack is None else attack
    release = rng.uniform(0.05, 0.4) if release is None else release
    rise = np.clip(t / attack, 0.0, 1.0)
    fall = np.clip((dur - t) / release, 0.0, 1.0)
    decay = np.exp(-t * rng.uniform(0.0, 2.0))
    return rise * fall * decay


def _harmonics(freq, amplitudes, rng):
    """Additive synthesis of a harmonic sound with instantaneous f0 `freq` (Hz)."""
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    out = np.zeros_like(freq)
    for k, amp in enumerate(amplitudes, start=1):
        audible = k * freq < _NYQUIST_GUARD
        if not audible.any():
            break
        out += amp * audible * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def _band_noise(rng, num, center, bandwidth):
    spec = np.fft.rfft(rng.standard_normal(num))
    freqs = np.fft.rfftfreq(num, 1 / SAMPLE_RATE)
    spec *= np.exp(-0.5 * ((freqs - center) / max(bandwidth, 20.0)) ** 2)
    return np.fft.irfft(spec, n=num)


def _tone(rng, num):
    t = _time(num)
    f0 = 2 ** rng.uniform(np.log2(110), np.log2(880))
    vibrato = 1 + rng.uniform(0.003, 0.02) * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
    tilt = rng.uniform(0.7, 2.0)
    amps = [k**-tilt for k in range(1, 40)]
    return _harmonics(f0 * vibrato, amps, rng) * _envelope(rng, num)


def _glide(rng, num):
    notes = int(rng.integers(1, 4))
    bounds = np.linspace(0, num, notes + 1).astype(int)
    out = np.zeros(num)
    tilt = rng.uniform(1.0, 2.0)
    amps = [k**-tilt for k in range(1, 25)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = b - a
        start, stop = 2 ** rng.uniform(np.log2(120), np.log2(1000), size=2)
        freq = start * (stop / start) ** np.linspace(0, 1, seg)
        out[a:b] = _harmonics(freq, amps, rng) * _envelope(rng, seg, release=0.05)
    return out


def _chirp(rng, num):
    count = int(rng.integers(1, 5))
    bounds = np.linspace(0, num, count + 1).astype(int)
    out = np.zeros(num)
    low, high = 2 ** rng.uniform(np.log2(150), np.log2(600)), 2 ** rng.uniform(
        np.log2(2000), np.log2(7000)
    )
    upward = rng.random() < 0.5
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = int((b - a) * rng.uniform(0.5, 0.95))
        ramp = np.linspace(0, 1, seg) if upward else np.linspace(1, 0, seg)
        freq = low * (high / low) ** ramp
        out[a : a + seg] = _harmonics(freq, [1.0, 0.3 * rng.random()], rng) * _envelope(
            rng, seg, attack=0.01, release=0.02
        )
    return out


def _noise(rng, num):
    out = np.zeros(num)
    for _ in range(int(rng.integers(1, 6))):
        length = int(rng.uniform(0.05, 0.5) * SAMPLE_RATE)
        length = min(length, num)
        start = int(rng.integers(0, num - length + 1))
        center = 2 ** rng.uniform(np.log2(300), np.log2(6000))
        burst = _band_noise(rng, length, center, center * rng.uniform(0.05, 0.5))
        out[start : start + length] += _normalize(burst) * _envelope(
            rng, length, attack=0.01, release=0.05
        )
    return out


def _drums(rng, num):
    t_hit = _time(int(0.3 * SAMPLE_RATE))
    out = np.zeros(num)
    step = int(rng.uniform(0.12, 0.4) * SAMPLE_RATE)
    pattern = rng.integers(0, 3, size=8)
    for j, start in enumerate(range(0, num, step)):
        kind = pattern[j % 8]
        if kind == 0:  # kick: a sine falling in pitch
            freq = 50 + 120 * np.exp(-t_hit / 0.03)
            hit = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * np.exp(-t_hit / 0.12)
        elif kind == 1:  # snare: noise plus a short tone
            hit = (
                _normalize(_band_noise(rng, t_hit.size, 3000, 2000))
                + 0.5 * np.sin(2 * np.pi * 190 * t_hit)
            ) * np.exp(-t_hit / 0.06)
        else:  # hi-hat: short bright noise
            hit = 0.5 * _normalize(_band_noise(rng, t_hit.size, 6500, 800)) * np.exp(-t_hit / 0.02)
        stop = min(num, start + hit.size)
        out[start:stop] += hit[: stop - start]
    return out


def _vowel(rng, num):
    syllables = int(rng.integers(1, 4))
    bounds = np.linspace(0, num, syllables + 1).astype(int)
    out = np.zeros(num)
    base = 2 ** rng.uniform(np.log2(90), np.log2(250))
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = b - a
        t = _time(seg)
        f0 = (
            base
            * (1 + 0.08 * rng.uniform(-1, 1) * np.linspace(0, 1, seg))
            * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))
        )
        formants = np.asarray(_VOWELS[int(rng.integers(len(_VOWELS)))]) * rng.uniform(0.9, 1.15)
        widths = np.asarray([80.0, 110.0, 160.0]) * rng.uniform(0.8, 1.5)
        mean_f0 = float(f0.mean())
        amps = []
        for k in range(1, int(_NYQUIST_GUARD // mean_f0) + 1):
            fk = k * mean_f0
            amps.append(
                sum(
                    np.exp(-0.5 * ((fk - f) / w) ** 2) / (1 + n)
                    for n, (f, w) in enumerate(zip(formants, widths))
                )
                + 0.01
            )
        out[a:b] = _harmonics(f0, amps, rng) * _envelope(rng, seg, attack=0.03, release=0.08)
    return out


def _clicks(rng, num):
    out = np.zeros(num)
    rate = rng.uniform(4, 40)
    resonance = rng.uniform(800, 5000)
    tau = rng.uniform(0.001, 0.006)
    t_click = _time(int(8 * tau * SAMPLE_RATE) + 1)
    click = np.exp(-t_click / tau) * np.sin(2 * np.pi * resonance * t_click)
    period = SAMPLE_RATE / rate
    jitter = rng.uniform(0.0, 0.2)
    pos = rng.uniform(0, period)
    while pos < num:
        start = int(pos)
        stop = min(num, start + click.size)
        out[start:stop] += rng.uniform(0.5, 1.0) * click[: stop - start]
        pos += period * (1 + jitter * rng.uniform(-1, 1))
    return out


_SYNTHS = {
    "tone": _tone,
    "glide": _glide,
    "chirp": _chirp,
    "noise": _noise,
    "drums": _drums,
    "vowel": _vowel,
    "clicks": _clicks,
}
