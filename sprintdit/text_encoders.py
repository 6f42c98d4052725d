"""Frozen text encoders from local folders (model.text.encoder t5 | clip), through `transformers` (sprintdit[text]).

`PretrainedTextEncoder(kind, folder, max_tokens)(captions)` returns per-token embeddings (N, L, E) float32 with
zero rows at padding, and the keep mask (N, L). T5 (PixArt-alpha's encoder: T5 v1.1 XXL, 120 tokens) gives its
encoder's last hidden state; CLIP its text transformer's last hidden state (77 tokens). Longer captions are
truncated with one warning that counts them. The empty caption is encoded like any other (T5: the end token
alone), so its embedding is never all zero: the all-zero caption is left to mean "unconditional" (see
`models.sit.CaptionProjection`). Training never runs these: `sprintdit prepare --captions` stores the embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError, warn

MODEL_CLASSES = {"t5": "T5EncoderModel", "clip": "CLIPTextModel"}
WHERE_TO_GET = {
    "t5": "a T5 encoder folder (config.json, weights, tokenizer files), e.g. DeepFloyd/t5-v1_1-xxl as PixArt-alpha "
    "uses, from huggingface.co",
    "clip": "a CLIP text model folder (config.json, weights, tokenizer files), e.g. openai/clip-vit-large-patch14, "
    "from huggingface.co",
}
ENCODE_BATCH = 64  # captions per encoder forward


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("text encoders t5 and clip need transformers: pip install 'sprintdit[text]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


class PretrainedTextEncoder:
    def __init__(
        self,
        kind: str,
        folder: str | Path,
        max_tokens: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if kind not in MODEL_CLASSES:
            raise UserError(f"text encoder {kind!r} is not a pretrained one; choose one of {', '.join(MODEL_CLASSES)}")
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"text encoder folder {folder} is missing (no config.json): get {WHERE_TO_GET[kind]}")
        if max_tokens < 1:
            raise UserError(f"text encoder max_tokens must be >= 1, got {max_tokens}")
        transformers = import_transformers()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
            model = getattr(transformers, MODEL_CLASSES[kind]).from_pretrained(str(folder), torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the {kind} text encoder from {folder}: {str(err).splitlines()[0]}") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.kind, self.folder, self.max_tokens, self.device = kind, folder, max_tokens, torch.device(device)
        self.dim = int(model.config.hidden_size if kind == "clip" else model.config.d_model)

    def token_counts(self, captions: list[str]) -> list[int]:
        """Each caption's token count before truncation (special tokens included)."""
        return [len(ids) for ids in self.tokenizer(list(captions))["input_ids"]]

    @torch.no_grad()
    def __call__(self, captions: list[str], zero_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (N, L, E) float32 on the CPU, zero at padding (or, zero_padding False, the encoder's output
        there too), and keep (N, L) bool; L = max_tokens."""
        long = sum(n > self.max_tokens for n in self.token_counts(captions))
        if long:
            warn(f"{long} of {len(captions)} captions are longer than {self.max_tokens} tokens and were truncated")
        embeddings, keeps = [], []
        for start in range(0, len(captions), ENCODE_BATCH):
            tokens = self.tokenizer(
                list(captions[start : start + ENCODE_BATCH]),
                padding="max_length",
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            keep = tokens["attention_mask"].bool()  # (B, L)
            h = self.model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).last_hidden_state  # (B, L, E)
            embeddings.append((h.float() * keep[..., None] if zero_padding else h.float()).cpu())
            keeps.append(keep.cpu())
        return torch.cat(embeddings), torch.cat(keeps)


def load_encoder(cfg, encoder_path: str | None = None, device: str | torch.device = "cpu") -> PretrainedTextEncoder:
    """The t5 / clip encoder of a text model (ModelConfig cfg) from `encoder_path` (default: model.text.path), its
    width checked against the model's."""
    tx = cfg.text
    folder = encoder_path or tx.path
    if folder is None:
        raise UserError(
            f"prompts for this {tx.encoder} model need its text encoder folder: pass it (--text-encoder-path)"
        )
    encoder = PretrainedTextEncoder(tx.encoder, folder, tx.max_tokens, device)
    if encoder.dim != tx.dim:
        raise UserError(f"the text encoder at {folder} gives width {encoder.dim}; this model reads {tx.dim}")
    return encoder


def empty_caption(cfg, encoder_path: str | None = None, encoder: PretrainedTextEncoder | None = None) -> torch.Tensor:
    """(L, E) the empty text's embedding, the unconditional caption of diffusers' pipelines: padding rows zero where
    the model masks them, else the encoder's output there too (LattePipeline's unmasked negative prompt)."""
    encoder = encoder or load_encoder(cfg, encoder_path)
    return encoder([""], zero_padding=cfg.text.mask_padding)[0][0]


def encode_prompts(
    cfg, prompts: list[str], encoder_path: str | None = None, device: str | torch.device = "cpu", network=None
) -> torch.Tensor:
    """The condition a text model (ModelConfig cfg) samples from for each prompt: token ids (N, L) for the learned
    encoder, embeddings (N, L, E) from the encoder at `encoder_path` (default: model.text.path) for t5 and clip.
    `network`: where its unconditional caption is unset (all zero: a diffusers import), the same encoder fills it
    with the empty text's embedding, as diffusers' pipelines encode an empty negative prompt."""
    from .text import tokenize

    tx = cfg.text
    if cfg.condition != "text":
        raise UserError("this model is class-conditional: give class labels, not prompts")
    if tx.encoder == "learned":
        return torch.tensor([tokenize(p, tx.vocabulary, tx.max_tokens) for p in prompts])
    encoder = load_encoder(cfg, encoder_path, device)
    if network is not None and tx.null_caption == "encoded" and not network.y_embedder.empty.any():
        network.y_embedder.empty.copy_(empty_caption(cfg, encoder=encoder))
        warn("the model's unconditional caption was unset: it is the empty prompt's embedding by this encoder")
    return encoder(list(prompts))[0]  # (N, L, E)
