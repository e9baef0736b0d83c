"""The tokenizer: SentencePiece BPE with byte fallback, trained on the task corpus.

Code must survive a round trip exactly (indentation, tabs, blank lines, trailing spaces), so the
model is trained with identity normalisation, no dummy prefix, no whitespace collapsing and
whitespace-only pieces allowed; anything outside the vocabulary falls back to bytes, so
``decode(encode(text)) == text`` for every string. The special tokens are:

``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2 (bos), ``</s>`` 3 (eos: closes the prompt and each output),
``<MOD>`` 4 (vision-conditioning marker after each vision-call argument), ``<ENDSTEP>`` 5 (end of
a code step), ``<OUT>`` 6 (start of execution output), ``<STOP>`` 7 (the request is done).

``<MOD>`` and friends are user-defined symbols: they are matched in text, so the code
``segment(t1<MOD>)`` encodes ``<MOD>`` as the single id 4.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

MOD, ENDSTEP, OUT, STOP = "<MOD>", "<ENDSTEP>", "<OUT>", "<STOP>"
SPECIALS = (MOD, ENDSTEP, OUT, STOP)
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MOD_ID, ENDSTEP_ID, OUT_ID, STOP_ID = range(8)   # fixed by train()
DEFAULT_PATH = Path(__file__).parent / "assets" / "tokenizer.model"
RECORD_SEP = "\n\x1e\n"     # between examples in a corpus file (task_templates.corpus)


class Tokenizer:
    """A SentencePiece model with VoxelPrompt's special tokens.

    Args:
        path: a ``.model`` file; the tokenizer shipped in ``voxelprompt/assets/`` if omitted.
        model_proto: the serialised model instead of a path.
    """

    def __init__(self, path: str | Path | None = None, *, model_proto: bytes | None = None):
        if model_proto is None:
            path = Path(path) if path is not None else DEFAULT_PATH
            if not path.exists():
                raise FileNotFoundError(f"tokenizer model {path} not found; train one with Tokenizer.train()")
            model_proto = path.read_bytes()
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.mod_id, self.endstep_id, self.out_id, self.stop_id = (self.sp.piece_to_id(s) for s in SPECIALS)
        ids = (self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mod_id, self.endstep_id,
               self.out_id, self.stop_id)
        if ids != tuple(range(8)):
            raise ValueError(f"tokenizer special ids are {ids}, expected 0..7 "
                             "(<pad> <unk> <s> </s> <MOD> <ENDSTEP> <OUT> <STOP>); train it with Tokenizer.train()")

    @classmethod
    def train(cls, texts: Iterable[str], path: str | Path | None = None, vocab_size: int = 3000,
              *, threads: int = 2) -> "Tokenizer":
        """Trains a BPE tokenizer on ``texts`` (prompts, code, outputs) and optionally saves it.

        Args:
            texts: an iterable of documents; newlines inside a text are kept.
            path: where to write the ``.model`` file (nothing is written if omitted).
            vocab_size: target vocabulary size (a soft limit: a small corpus may give fewer).
            threads: trainer threads.
        """
        import io
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(t for t in texts if t), model_writer=buf, model_type="bpe",
            vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=list(SPECIALS),
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_by_whitespace=True, split_digits=True,
            max_sentence_length=1 << 16, num_threads=threads, minloglevel=2)
        tok = cls(model_proto=buf.getvalue())
        if path is not None:
            tok.save(path)
        return tok

    def save(self, path: str | Path) -> None:
        """Writes the ``.model`` file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.proto)

    @property
    def vocab_size(self) -> int:
        """Number of ids (the language model's vocabulary size)."""
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Text to ids (no bos/eos added)."""
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; pad/bos/eos are dropped, ``<MOD>`` etc. are written out."""
        return self.sp.decode([int(i) for i in ids])

    def piece(self, i: int) -> str:
        """The piece string of one id (for debugging)."""
        return self.sp.id_to_piece(int(i))


def corpus_texts(path: str | Path) -> Iterator[str]:
    """The examples of a corpus file written by ``voxelprompt tasks corpus`` (``\\x1e``-separated)."""
    for text in Path(path).read_text().split(RECORD_SEP):
        if text.strip():
            yield text


def main(argv: list[str] | None = None) -> int:
    """``python -m voxelprompt.tokenizer CORPUS [VOCAB] [OUT]``: trains and writes the tokenizer."""
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 3:
        print("usage: python -m voxelprompt.tokenizer CORPUS [VOCAB_SIZE=3000] "
              "[OUT=voxelprompt/assets/tokenizer.model]", file=sys.stderr)
        return 2
    out = Path(argv[2]) if len(argv) > 2 else DEFAULT_PATH
    tok = Tokenizer.train(corpus_texts(argv[0]), out, vocab_size=int(argv[1]) if len(argv) > 1 else 3000)
    print(f"{out}: {tok.vocab_size} pieces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
