import pytest
import torch

from sprintdit.errors import UserError
from sprintdit.layouts import FashionMNISTLayouts, all_layouts, caption_of, held_out, parse_caption
from sprintdit.models.sit import PAD, START, CrossAttention, ModelConfig, SiT, TextConfig, null_condition
from sprintdit.objective import FlowMatching, ObjectiveConfig
from sprintdit.sampling import SampleConfig, guided_output
from sprintdit.text import detokenize, tokenize

VOCAB = ["a", "bag", "left", "top"]


def text_model(pooled=False, **overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="SiT-Nano/4",
        input_size=[16, 16],
        in_channels=1,
        depth=6,
        condition="text",
        text=TextConfig(vocabulary=VOCAB, max_tokens=6, pooled=pooled),
        **overrides,
    )
    model = SiT(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def test_cross_attention_with_one_unpadded_token_equals_attending_to_it():
    torch.manual_seed(0)
    attn = CrossAttention(8, 2).double()
    x, text = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    keep = torch.tensor([[False, False, True, False], [True, False, False, False]])
    out = attn(x, text, keep)
    for b, j in ((0, 2), (1, 0)):  # softmax over one key: the output is that token's value, projected
        alone = attn(x[b : b + 1], text[b : b + 1, j : j + 1], torch.ones(1, 1, dtype=torch.bool))
        torch.testing.assert_close(out[b : b + 1], alone)


def test_tokenize_round_trips_and_refuses_unknown_words():
    ids = tokenize("a bag top left", VOCAB, 6)
    assert ids[0] == START and ids[-1] == PAD and len(ids) == 6 and detokenize(ids, VOCAB) == "a bag top left"
    assert torch.equal(null_condition(text_model().config), torch.tensor(tokenize("", VOCAB, 6)))
    with pytest.raises(UserError, match="'shoe'"):
        tokenize("a shoe", VOCAB, 6)


@pytest.mark.parametrize("pooled", [False, True])
def test_empty_text_cfg_at_scale_1_equals_the_conditional_model_and_pdg_is_its_composition(pooled):
    model = text_model(pooled)
    x, t = torch.randn(2, 1, 16, 16, dtype=torch.float64), 0.4
    y = torch.tensor([tokenize("a bag top left", VOCAB, 6), tokenize("a bag", VOCAB, 6)])
    tt = torch.full((2,), t, dtype=torch.float64)
    cond = model(x, tt, y)
    cfg1 = guided_output(model, y, SampleConfig(guidance="cfg", scale=1.0), 1)(x, t)
    torch.testing.assert_close(cfg1, cond)
    empty = null_condition(model.config).expand_as(y)
    uncond = model(x, tt, empty, path_drop=torch.ones(2, dtype=torch.bool))  # the path-dropped pass, empty text
    pdg = guided_output(model, y, SampleConfig(guidance="pdg", scale=3.0), 1)(x, t)
    torch.testing.assert_close(pdg, uncond + 3.0 * (cond - uncond))


def test_caption_dropout_gives_the_empty_text():
    from sprintdit.draws import Draws

    fm = FlowMatching(ObjectiveConfig(label_dropout=0.5), null_class=null_condition(text_model().config))
    y = torch.tensor([tokenize("a bag", VOCAB, 6)] * 64)
    dropped = fm.drop_labels(y, Draws(torch.Generator().manual_seed(0)))
    empty = (dropped == fm.null_class).all(1)
    # whole rows: the caption or the empty text
    assert 10 < empty.sum() < 54 and torch.equal(dropped[~empty], y[~empty])


def test_layouts_are_deterministic_and_captions_parse_back(fmnist_dir):
    layouts = all_layouts()
    assert len(layouts) == 4 * 10 + 6 * 100 and all(parse_caption(caption_of(l)) == l for l in layouts)
    a, b = FashionMNISTLayouts(str(fmnist_dir), size=8), FashionMNISTLayouts(str(fmnist_dir), size=8)
    xa, ya = a.load(torch.arange(8))
    xb, yb = b.load(torch.arange(8))
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (8, 1, 32, 32)
    assert not any(held_out(a.item(i)[0]) for i in range(8))
    held = FashionMNISTLayouts(str(fmnist_dir), "held_out", size=8)
    assert all(held_out(held.item(i)[0]) for i in range(8))


def test_the_learned_encoder_reads_word_order_from_the_start():
    """Two captions with the same words in another order (which garment stands where) must encode differently at
    init: without position embeddings the encoder is a bag of words and its mean token cannot tell them apart."""
    vocab = ["a", "and", "bag", "bottom", "left", "right", "shirt", "top"]
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="SiT-Nano/4",
        input_size=[16, 16],
        in_channels=1,
        condition="text",
        text=TextConfig(vocabulary=vocab, max_tokens=12),
    )
    encoder = SiT(cfg).eval().y_embedder
    ids = torch.tensor(
        [
            tokenize(c, vocab, 12)
            for c in ("a bag top left and a shirt bottom right", "a shirt top left and a bag bottom right")
        ]
    )
    with torch.no_grad():
        tokens, keep = encoder(ids)
    means = tokens.sum(1) / keep.sum(1, keepdim=True)  # (2, D)
    assert (means[0] - means[1]).abs().max() > 1e-3
