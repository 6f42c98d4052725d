"""Captioned data and pretrained text encoders, on a tiny random T5 folder built here (transformers,
sprintdit[text])."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_vae
from PIL import Image

from sprintdit.api import Pipeline
from sprintdit.captions import TABLE_FILE, CaptionTable
from sprintdit.cli import main
from sprintdit.config import load_config
from sprintdit.data import ImageFolder
from sprintdit.errors import UserError
from sprintdit.models.sit import ModelConfig, SiT, TextConfig, null_condition
from sprintdit.prepare import PrepareConfig, prepare
from sprintdit.text_encoders import PretrainedTextEncoder

WORDS = ["a", "red", "blue", "bag", "shoe", "on", "the", "left", "right"]
T5_DIM, MAX_TOKENS = 16, 6


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """errors.warn says a message once per process; these tests check that it is said."""
    from sprintdit import errors

    monkeypatch.setattr(errors, "_warned", set())


VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}


def tiny_encoder_folder(folder, kind: str):
    """A 1-layer T5 encoder or CLIP text model with random weights and a word-level tokenizer that appends </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    if kind == "t5":
        T5EncoderModel(
            T5Config(
                vocab_size=len(VOCAB),
                d_model=T5_DIM,
                d_kv=8,
                num_heads=2,
                num_layers=1,
                d_ff=32,
                decoder_start_token_id=0,
            )
        ).save_pretrained(folder)
    else:
        CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(VOCAB),
                hidden_size=T5_DIM,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=16,
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=1,
            )
        ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return tiny_encoder_folder(tmp_path_factory.mktemp("t5"), "t5")


@pytest.fixture
def captioned_images(tmp_path):
    """Four images in two sub-folders; captions.jsonl captions three (one of them empty, one too long)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ("x/0.png", "x/1.png", "y/2.png", "y/3.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name)
    lines = [
        {"file": "x/0.png", "caption": "a red bag"},
        {"file": "x/1.png", "caption": ""},
        {"file": "y/2.png", "caption": "a blue shoe on the left a red bag on the right"},
    ]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root, tmp_path / "captions.jsonl", [line["caption"] for line in lines]


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_encoder_from_a_local_folder_gives_embeddings_of_the_documented_shape(kind, tmp_path, capsys):
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    folder = tiny_encoder_folder(tmp_path, kind)
    encoder = PretrainedTextEncoder(kind, folder, MAX_TOKENS)
    emb, keep = encoder(["a red bag", "", "a blue shoe on the left a red bag"])
    assert emb.shape == (3, MAX_TOKENS, T5_DIM) and emb.dtype == torch.float32 and keep.shape == (3, MAX_TOKENS)
    assert keep.sum(1).tolist() == [4, 1, MAX_TOKENS]  # 3 words + </s>; the empty text is </s> alone; truncated
    assert torch.equal(emb[~keep], torch.zeros_like(emb[~keep])) and emb[keep].abs().sum(-1).min() > 0
    assert "1 of 3 captions are longer than 6 tokens" in capsys.readouterr().err
    ids = AutoTokenizer.from_pretrained(str(folder))(["a red bag"], return_tensors="pt")["input_ids"]  # unpadded
    plain = (
        (T5EncoderModel if kind == "t5" else CLIPTextModel)
        .from_pretrained(str(folder))(input_ids=ids)
        .last_hidden_state[0]
    )  # (4, E)
    torch.testing.assert_close(emb[0, :4], plain)  # padding changes nothing at the caption's tokens


def test_a_missing_encoder_folder_names_what_to_get(tmp_path):
    with pytest.raises(UserError, match="t5-v1_1-xxl"):
        PretrainedTextEncoder("t5", tmp_path / "nowhere", 120)


def test_prepare_stores_caption_embeddings_and_reloads_them_exactly(t5_dir, captioned_images, tmp_path, capsys):
    root, jsonl, captions = captioned_images
    out = tmp_path / "prepared"
    cfg = PrepareConfig(
        images=str(root),
        out=str(out),
        captions=str(jsonl),
        text_encoder_path=str(t5_dir),
        max_tokens=MAX_TOKENS,
        progress=False,
    )
    prepare(cfg)
    err = capsys.readouterr().err
    assert (
        "1 of 4 images" in err and "no caption" in err and "truncated" in err
    )  # y/3.png skipped; the long caption cut
    table = CaptionTable.open(out)
    assert table.files == ["x/0.png", "x/1.png", "y/2.png"] and table.captions == captions and table.dim == T5_DIM
    emb, _ = PretrainedTextEncoder("t5", t5_dir, MAX_TOKENS)([""] + captions)
    assert torch.equal(table.rows(np.arange(4)), emb.half().float())  # stored in float16, read back bit for bit
    assert torch.equal(table.rows(np.array([2])), table.empty[None])  # the empty caption is the empty text
    stamp = (out / TABLE_FILE).stat().st_mtime_ns
    prepare(cfg)  # the same table again: kept
    assert (out / TABLE_FILE).stat().st_mtime_ns == stamp
    data = ImageFolder(root, 16, captions=str(out))
    x, y = data.load(torch.tensor([2, 0]))
    assert x.shape == (2, 3, 16, 16) and torch.equal(y, table.rows(np.array([3, 1])))


def test_prepare_with_a_vae_puts_caption_rows_in_the_shards(t5_dir, captioned_images, tmp_path):
    from sprintdit.data import LatentDataset

    root, jsonl, _ = captioned_images
    tiny_vae(tmp_path / "vae", sample_size=16)
    out = tmp_path / "latents"
    prepare(
        PrepareConfig(
            images=str(root),
            out=str(out),
            vae=str(tmp_path / "vae"),
            resolution=16,
            shard_size=2,
            captions=str(jsonl),
            text_encoder_path=str(t5_dir),
            max_tokens=MAX_TOKENS,
            progress=False,
        )
    )
    data = LatentDataset(out, 16)
    assert len(data) == 3 and data.num_classes == 0
    batch = data.load(torch.tensor([0, 1, 2]))
    torch.testing.assert_close(batch.y, data.caption_table.rows(np.array([1, 2, 3])), rtol=0, atol=0)


def tiny_text_run(images, captions, out, *extra):
    return [
        "train",
        "--config",
        "fashion_mnist_text",
        "--out",
        str(out),
        "--no-progress",
        "data.name=image_folder",
        f"data.root={images}",
        f"data.captions={captions}",
        "data.resolution=16",
        "model.preset=SiT-Nano/4",
        "train.batch_size=2",
        "train.log_every=1",
        "stages=[{name: pre, steps: 1, mask_ratio: 0.75}, {name: ft, steps: 1, mask_ratio: 0}]",
        "sample.steps=2",
        "sample.batch_size=2",
        *extra,
    ]


def test_t5_text_model_trains_on_prepared_embeddings_and_samples_prompts(t5_dir, captioned_images, tmp_path):
    root, jsonl, _ = captioned_images
    out = tmp_path / "prepared"
    prepare(
        PrepareConfig(
            images=str(root),
            out=str(out),
            captions=str(jsonl),
            text_encoder_path=str(t5_dir),
            max_tokens=MAX_TOKENS,
            progress=False,
        )
    )
    run = tmp_path / "run"
    assert main(tiny_text_run(root, out, run, "model.text.encoder=t5")) == 0
    saved = load_config(run / "config.yaml").model.text
    assert (saved.encoder, saved.dim, saved.max_tokens) == ("t5", T5_DIM, MAX_TOKENS) and saved.path == str(
        t5_dir.resolve()
    )
    pipe = Pipeline.from_pretrained(run, device="cpu")
    empty = CaptionTable.open(out).empty
    assert torch.equal(pipe.model.y_embedder.empty, empty)  # the unconditional input came with the weights
    images = pipe(prompts=["a red bag", "a blue shoe"], seeds=[0, 1], steps=2, guidance="cfg", scale=2.0)
    assert [im.size for im in images] == [(16, 16)] * 2
    again = pipe(prompts=["a blue shoe"], seeds=[1], steps=2, guidance="cfg", scale=2.0)
    assert np.array_equal(np.asarray(again[0]), np.asarray(images[1]))  # an image depends only on its prompt and seed


def test_the_all_zero_caption_is_the_empty_text():
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="SiT-Nano/4",
        input_size=[16, 16],
        in_channels=1,
        condition="text",
        text=TextConfig(encoder="t5", dim=8, max_tokens=5),
    )
    model = SiT(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        model.y_embedder.empty.copy_(torch.cat([torch.randn(2, 8), torch.zeros(3, 8)]))  # 2 kept tokens, 3 padding
    x, t = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.full((2,), 0.3, dtype=torch.float64)
    null = null_condition(model.config).double().expand(2, 5, 8)
    torch.testing.assert_close(model(x, t, null), model(x, t, model.y_embedder.empty.expand(2, 5, 8)))
    other = torch.randn(2, 5, 8, dtype=torch.float64)
    assert not torch.allclose(model(x, t, other), model(x, t, null))


def test_learned_captions_from_jsonl_train_and_sample_prompts_from_the_cli(captioned_images, tmp_path, capsys):
    root, jsonl, _ = captioned_images
    run = tmp_path / "run"
    assert main(tiny_text_run(root, jsonl, run)) == 0
    text = load_config(run / "config.yaml").model.text
    assert text.vocabulary == sorted(WORDS) and text.max_tokens == 1 + 12  # START + the longest caption
    (tmp_path / "prompts.txt").write_text("a red bag\n\na blue shoe on the left\n")
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--out",
                str(tmp_path / "s"),
                "--prompt",
                "a bag",
                "--prompts",
                str(tmp_path / "prompts.txt"),
                "--per-label",
                "2",
                "--guidance",
                "pdg",
                "--steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    npz = np.load(tmp_path / "s" / "pdg_euler2_s4.npz")
    assert npz["arr_0"].shape == (6, 16, 16, 3) and "arr_1" not in npz
    assert (tmp_path / "s" / "pdg_euler2_s4.prompts.txt").read_text().splitlines() == [
        "a bag",
        "a red bag",
        "a blue shoe on the left",
    ]
    with Image.open(tmp_path / "s" / "pdg_euler2_s4.png") as grid:  # 3 rows of 2, the prompts written to the left
        assert grid.size[1] == 3 * 18 + 2 and grid.size[0] > 2 * 18 + 2 + 40
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--out",
                str(tmp_path / "t"),
                "--prompt",
                "a purple bag",
                "--steps",
                "2",
            ]
        )
        == 2
    )
    assert "'purple'" in capsys.readouterr().err
    assert (
        main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "t"), "--labels", "0", "--steps", "2"]) == 2
    )
    assert "text-conditioned" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(run), "--num-samples", "4"]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_sparsify_keeps_the_text_path_and_samples_prompts(captioned_images, tmp_path):
    from sprintdit.density import SparseConfig
    from sprintdit.sparsify import sparsify

    root, jsonl, _ = captioned_images
    run = tmp_path / "dense"
    assert (
        main(
            tiny_text_run(
                root,
                jsonl,
                run,
                "model.sprint.fusion=none",
                "model.sprint.path_drop_prob=0",
                "sample.guidance=cfg",
                "stages=[{name: dense, steps: 2, mask_ratio: 0}]",
            )
        )
        == 0
    )
    result = sparsify(
        run, tmp_path / "sparse", SparseConfig(grid="2:3", pool_depth=1, modules=1, sparse_depth=1, dense_depth=0)
    )
    assert result.config.condition == "text" and result.flops_ratio < 1
    pipe = Pipeline.from_pretrained(tmp_path / "sparse", device="cpu")
    assert any("cross_attn" in k for k, _ in pipe.model.named_parameters())
    images = pipe(prompts=["a red bag", ""], seeds=[0, 1], steps=2)
    assert len(images) == 2 and images[0].size == (16, 16)
