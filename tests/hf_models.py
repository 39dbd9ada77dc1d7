"""Tiny Hugging Face models for tests: randomly initialised from a config, with a tokenizer trained here.

Three families, as users bring them: a GPT-2-style causal LM (its tokenizer adds no BOS), a Llama-style
causal LM (its tokenizer starts every text with <s>) and a BERT-style encoder ([CLS] ... [SEP]). Each is
saved with `save_pretrained` to a folder and loaded back from disk by the code under test.
"""

from __future__ import annotations

from pathlib import Path

# A module of each family that outputs [batch, tokens, 32]
HOOKS = {"gpt2": "transformer.h.0", "llama": "model.layers.1", "bert": "encoder.layer.0"}

WORDS = [
    "the",
    "a",
    "sparse",
    "autoencoder",
    "learns",
    "features",
    "of",
    "language",
    "model",
    "activations",
    "while",
    "researchers",
    "read",
    "latents",
    "that",
    "fire",
    "on",
    "tokens",
    "in",
    "contexts",
    "across",
    "many",
    "documents",
    "about",
    "cats",
    "dogs",
    "rivers",
    "and",
    "code",
]


def corpus(n_documents: int = 200, seed: int = 0) -> list[str]:
    """Deterministic documents of 5-40 words."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n_documents)]


def sequence_corpus(n_documents: int = 200, seed: int = 0) -> list[str]:
    """Documents that walk WORDS in order from a random start: each word says what comes next, so a model
    trained on them predicts well, and breaking its layers costs it (`corpus` holds no such structure)."""
    import random

    rng = random.Random(seed)
    documents = []
    for _ in range(n_documents):
        start, length = rng.randrange(len(WORDS)), rng.randint(5, 40)
        documents.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)))
    return documents


def _tokenizer(family: str, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {
        "gpt2": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        "bert": {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"},
    }[family]
    names = list(dict.fromkeys(specials.values()))
    tokenizer = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=names, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    if family == "llama":
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    elif family == "bert":
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)


def save_tiny_model(
    family: str,
    directory: Path,
    width: int = 32,
    layers: int = 2,
    seed: int = 0,
    *,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int | None = None,
    vocab_size: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> Path:
    """Write a `family` model (gpt2 | llama | bert) at random initialisation and its tokenizer to `directory`.

    Tiny by default; the GPU check (bench/gpu_check.py) builds a Llama of several hundred million parameters
    the same way: `heads` and `kv_heads` (llama), `intermediate` (default 2 × width; GPT-2's own 4 × width),
    `vocab_size` (default the tokenizer's; larger leaves ids no text uses, for a realistic output layer),
    `dtype` of the saved weights (default float32) and `device` to initialise on (a GPU initialises a large
    model in a moment)."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tokenizer = _tokenizer(family, corpus())
    vocab = vocab_size or len(tokenizer)
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=width, n_layer=layers, n_head=heads, n_inner=intermediate,  # None: 4 × width
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        build = transformers.GPT2LMHeadModel
    elif family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=intermediate or 2 * width, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        build = transformers.LlamaForCausalLM
    else:
        config = transformers.BertConfig(
            vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate or 2 * width, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        build = transformers.BertModel
    with torch.device(device or "cpu"):
        model = build(config)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_corpus(path: Path, n_documents: int = 200, seed: int = 0, documents=None) -> Path:
    """The corpus (or `documents`) as a .txt file, one document per line."""
    path.write_text("\n".join(documents if documents is not None else corpus(n_documents, seed)) + "\n")
    return path


def train_briefly(source: Path, directory: Path, steps: int = 150, seed: int = 0) -> Path:
    """A copy of the causal LM at `source` trained for `steps` Adam steps on `sequence_corpus`, so that its
    next-token predictions carry information (a random model's are near uniform, and ablating a layer of it
    changes little): what a model evaluation needs to tell a good SAE from a bad one."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source))
    stream = [t for text in sequence_corpus() for t in tokenizer(text + tokenizer.eos_token)["input_ids"]]
    usable = len(stream) // 32 * 32
    batches = torch.tensor(stream[:usable]).view(-1, 32)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        batch = batches[torch.randint(len(batches), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
