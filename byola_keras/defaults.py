"""The BYOL-A v1 and v2 settings, written once and read everywhere.

Values are the papers' (and the official code's where the papers are silent);
`docs/faithfulness.md` lists where byola-keras departs from them. This module
imports nothing heavy, so the command line can read it before Keras loads.
"""

VERSIONS = ("v1", "v2")

# Settings that differ between the two versions.
VERSION_DEFAULTS = {
    "v1": {
        "dim": 2048,  # AudioNTT2020 d = 512, 1024 or 2048
        "lr": 3e-4,
        "alpha": 0.4,  # log-mixup-exp: background weight ~ U(0, alpha)
        "fader_gain": None,  # no random linear fader in v1
        "probe_patience": 10,  # linear evaluation early stopping (v1 paper)
    },
    "v2": {
        "dim": 3072,  # AudioNTT2022: 1,024 conv + 2,048 MLP features per frame
        "lr": 1e-4,
        "alpha": 0.2,
        "fader_gain": 1.0,
        "probe_patience": 20,  # v2 paper
    },
}

# Settings shared by both versions.
COMMON_DEFAULTS = {
    "epochs": 100,
    "batch_size": 256,
    "tau": 0.99,  # EMA decay of the target network
    "adam_epsilon": 1e-8,  # PyTorch's Adam default (Keras's is 1e-7)
    "memory_size": 2048,  # mixup memory bank (FIFO of past pre-normalized inputs)
    "virtual_crop_scale": (1.0, 1.5),  # random resize crop canvas (F, T) scale
    "freq_scale": (0.6, 1.5),  # crop height range (clipped to 1.0)
    "time_scale": (0.6, 1.5),  # crop width range
    "projection_hidden": 4096,
    "projection_dim": 256,
}


def version_defaults(version):
    """All defaults for `"v1"` or `"v2"` as one new dict."""
    if version not in VERSION_DEFAULTS:
        raise ValueError(f"version must be one of {VERSIONS}; got {version!r}.")
    return {**COMMON_DEFAULTS, **VERSION_DEFAULTS[version]}
