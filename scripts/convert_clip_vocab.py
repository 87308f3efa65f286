"""Convert open_clip's ``bpe_simple_vocab_16e6.txt.gz`` into Hugging Face ``vocab.json`` + ``merges.txt``.

The files are shipped in ``src/daami2i/assets/clip-tokenizer`` so that tests and examples build the
real CLIP BPE tokenizer offline. Run once (``pip install --no-deps open_clip_torch`` first):

    python scripts/convert_clip_vocab.py

The vocabulary is the CLIP construction: the 256 byte-level symbols, the same with the ``</w>``
end-of-word marker, one entry per merge, then the two special tokens (49408 entries in all).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "daami2i" / "assets" / "clip-tokenizer"
N_MERGES = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The printable stand-in character of each of the 256 bytes, in GPT-2/CLIP order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main() -> None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("open_clip_torch is not installed: pip install --no-deps open_clip_torch")
    src = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    vocab = byte_symbols()
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main()
