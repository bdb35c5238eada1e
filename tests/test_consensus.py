"""Consensus reranking (vgpt_cli/decode/consensus.py): the caption bank, its nearest images, the choice
among the beam's captions, and the bank saved in the model folder. Tiny random GPT-2 captioners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import D_IN, tiny_captioner

from vgpt_cli.data.manifest import Item
from vgpt_cli.decode import DecodeOptions, decode, pad_features
from vgpt_cli.decode.consensus import BANK_CAPTIONS, BANK_FEATURES, CaptionBank, pooled_features
from vgpt_cli.decode.search import (
    beam_search,
    decode_candidates,
    sample,
    sampled_candidates,
    sequence_log_probs,
)
from vgpt_cli.errors import ConfigError, ModelLoadError
from vgpt_cli.model import Captioner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Store:
    """The one method CaptionBank.from_store reads: cached (n, C) features by id."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def get(self, key: str) -> np.ndarray:
        return self.arrays[key]


def test_pooled_features_are_unit_means_over_the_real_tokens_only():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((n, 6)).astype(np.float16) for n in (3, 5)]
    f, n = pad_features(arrays)
    want = np.stack([a.astype(np.float64).mean(0) for a in arrays])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(pooled_features(f, n), want, atol=1e-6)  # the padding rows do not count


def test_neighbours_are_the_nearest_by_cosine_and_an_agreeing_candidate_wins():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((30, 8))
    bank = CaptionBank(feats, [[f"photo {i} caption {j}" for j in range(2)] for i in range(30)])
    query = rng.standard_normal((4, 8))
    got = bank.neighbours(query / np.linalg.norm(query, axis=1, keepdims=True), 5)
    cos = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ (feats / np.linalg.norm(feats, axis=1, keepdims=True)).T
    assert got == [list(np.argsort(-row, kind="stable")[:5]) for row in cos]  # float64 brute force
    # the candidate that says what the neighbours' captions say beats one that shares no word with them
    dog = CaptionBank(np.eye(3), [["a dog runs on the grass", "a brown dog running on grass"],
                                  ["a dog runs through grass", "the dog is running"], ["a red car on a road"]])
    scores = dog.consensus(["a man rides a bike", "a dog runs on the grass"], [0, 1])
    assert scores[1] > 0.5 and scores[0] == 0.0


def _bank_for(model: Captioner, n: int = 12, seed: int = 2) -> tuple[CaptionBank, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays = {f"i{k}": rng.standard_normal((4, D_IN)).astype(np.float16) for k in range(n)}
    words = ["a dog", "two cats", "the red car", "a man", "snow", "a beach"]
    items = [Item(k, [f"{k}.jpg"], [f"{words[j % 6]} on the grass", f"{words[(j + 1) % 6]} near water"])
             for j, k in enumerate(arrays)]
    return CaptionBank.from_store(Store(arrays), items), [arrays[k] for k in list(arrays)[:3]]


def test_decode_with_rerank_keeps_the_beam_caption_its_neighbours_agree_with_most():
    model = tiny_captioner().eval()
    model.caption_bank, images = _bank_for(model)
    f, n = pad_features(images)
    opts = DecodeOptions(beam_size=4, max_length=6, rerank=5)
    with torch.inference_mode():
        plain = decode(model, f, n, DecodeOptions(beam_size=4, max_length=6))
        beams = beam_search(model, f, n, DecodeOptions(beam_size=4, max_length=6), num_return=4)
        chosen = decode(model, f, n, opts)
    assert [h.text for h in plain] == [b[0].text for b in beams]  # rerank 0: the beam's best, as before
    near = model.caption_bank.neighbours(pooled_features(f, n), 5)
    for b in range(len(images)):
        scores = model.caption_bank.consensus([h.text for h in beams[b]], near[b])
        assert chosen[b].text == beams[b][int(np.argmax(scores))].text
    greedy = decode(model, f, n, DecodeOptions(beam_size=1, max_length=6, rerank=5))  # one candidate: as is
    assert [h.text for h in greedy] == [h.text for h in decode(model, f, n, DecodeOptions(beam_size=1, max_length=6))]


def test_the_bank_travels_in_the_model_folder_and_its_absence_is_one_line(tmp_path):
    model = tiny_captioner()
    model.caption_bank, images = _bank_for(model)
    folder = model.save_pretrained(tmp_path / "m")
    loaded = Captioner.from_pretrained(folder).caption_bank
    assert loaded.captions == model.caption_bank.captions
    assert np.allclose(loaded.features, model.caption_bank.features, atol=2e-3)  # float16 on disk
    bare = tiny_captioner().eval()
    f, n = pad_features(images)
    with pytest.raises(ConfigError, match="no caption bank.*--rerank 0"):
        decode(bare, f, n, DecodeOptions(beam_size=2, max_length=4, rerank=3))
    (folder / BANK_FEATURES).unlink()
    with pytest.raises(ModelLoadError, match="incomplete caption bank"):
        Captioner.from_pretrained(folder)
    (folder / BANK_CAPTIONS).write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=BANK_CAPTIONS):
        Captioner.from_pretrained(folder)


def test_the_python_api_and_serve_path_return_the_reranked_caption_first_among_the_beams():
    """ImageCaptioner (what `vgpt caption` and `vgpt serve` run): with the model's rerank, the caption is the
    consensus choice, and beams=True lists it first, then the other beams."""
    from types import SimpleNamespace

    from vgpt_cli.api import ImageCaptioner

    model = tiny_captioner().eval()
    model.caption_bank, images = _bank_for(model)
    model.generation = {"beam_size": 4, "max_length": 6, "rerank": 5}
    backbone = SimpleNamespace(dim=D_IN, name="toy", fingerprint=None)
    cap = ImageCaptioner(model, backbone, device="cpu")
    got = cap.caption_features(images, beams=True)
    f, n = pad_features(images)
    with torch.inference_mode():
        want = decode(model, f, n, DecodeOptions(beam_size=4, max_length=6, rerank=5))
        beams = beam_search(model, f, n, DecodeOptions(beam_size=4, max_length=6), num_return=4)
    assert [r.caption for r in got] == [h.text for h in want]
    for r, b in zip(got, beams):
        assert r.beams[0]["caption"] == r.caption and sorted(x["caption"] for x in r.beams) == sorted(h.text for h in b)
    plain = ImageCaptioner(model, backbone, device="cpu", rerank=0).caption_features(images)
    assert [r.caption for r in plain] == [b[0].text for b in beams]
    # sampled candidates through the same path; `vgpt serve`, whose answers carry gates, refuses them
    more = ImageCaptioner(model, backbone, device="cpu", rerank_samples=6)
    with torch.inference_mode():
        want = decode(model, f, n, DecodeOptions(beam_size=4, max_length=6, rerank=5, rerank_samples=6))
    assert [r.caption for r in more.caption_features(images)] == [h.text for h in want]
    from vgpt_cli.serve.app import create_app

    with pytest.raises(ConfigError, match="rerank_samples 6.*set it to 0"):
        create_app(more)


def test_sampled_candidates_join_the_beams_the_same_in_any_batch_and_the_choice_is_the_consensus():
    model = tiny_captioner().eval()
    model.caption_bank, images = _bank_for(model)
    f, n = pad_features(images)
    opts = DecodeOptions(beam_size=3, max_length=6, rerank=5, rerank_samples=6)
    with torch.inference_mode():
        together = decode_candidates(model, f, n, opts)
        alone = decode_candidates(model, f[1:2], n[1:2], opts)
        beams = beam_search(model, f, n, DecodeOptions(beam_size=3, max_length=6), num_return=3)
        sampled = sampled_candidates(model, f, n, opts)
    assert [h.text for h in alone[0]] == [h.text for h in together[1]]  # an image's candidates, whatever its batch
    near = model.caption_bank.neighbours(pooled_features(f, n), 5)
    for b in range(len(images)):
        pool = list(dict.fromkeys([h.text for h in beams[b]] + [h.text for h in sampled[b]]))
        assert {h.text for h in together[b]} == set(pool)  # the beams and the samples they lack
        assert together[b][0].text == pool[int(np.argmax(model.caption_bank.consensus(pool, near[b])))]
    assert sum(len(c) for c in together) > 3 * len(images)  # the samples add captions the beams did not have
    # a sampled caption's score is its log-probability under the model, recomputed by a teacher-forced pass
    h = sampled[0][0]
    ids = torch.tensor([h.token_ids])
    with torch.inference_mode():
        lp = sequence_log_probs(model, f[:1], n[:1], ids, torch.ones_like(ids, dtype=torch.bool))
    assert h.score == pytest.approx(float(lp.sum()), abs=1e-4)


def test_rerank_samples_is_refused_without_rerank_negative_or_with_gates():
    with pytest.raises(ConfigError, match="set rerank"):
        DecodeOptions(rerank_samples=4).validate()
    with pytest.raises(ConfigError, match="rerank_samples=-1"):
        DecodeOptions(rerank=5, rerank_samples=-1).validate()
    model = tiny_captioner().eval()
    model.caption_bank, images = _bank_for(model)
    f, n = pad_features(images)
    with pytest.raises(ConfigError, match="no gate values.*--rerank-samples 0"):
        decode_candidates(model, f, n, DecodeOptions(beam_size=2, max_length=4, rerank=3, rerank_samples=2),
                          return_gates=True)


def test_per_image_generators_draw_from_the_model_distribution():
    """sample(generators=...) draws by the inverse of the cumulative distribution: its frequencies match the
    softmax of the model's own first-step logits."""
    model = tiny_captioner().eval()
    _, images = _bank_for(model)
    f, n = pad_features(images[:1])
    with torch.inference_mode():
        state = model.start_decoding(model.encode(f, n), beams=1, max_length=1)
        logits, _ = model.decode_step(torch.full((1, 1), model.bos_token_id), state)
        want = (logits.float()[0] / 0.02).softmax(-1).topk(3)
        s = sample(model, f, n, 4000, max_length=1, temperature=0.02, generators=[torch.Generator().manual_seed(0)])
    got = [float((s.token_ids[:, 0] == i).float().mean()) for i in want.indices]
    assert np.allclose(got, want.values.numpy(), atol=0.02)  # 3 standard errors at 4,000 draws
